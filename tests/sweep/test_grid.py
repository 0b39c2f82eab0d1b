"""The sweep's grid: values split at top-level commas, axes against fixed flags, every problem at once."""

from __future__ import annotations

import pytest

from lorakit.errors import ConfigError
from lorakit.sweep.grid import GridPoint, dir_name, expand, parse_grid, split_values


def test_commas_split_values_and_the_product_varies_the_first_key_slowest() -> None:
    axes, fixed = parse_grid(["--lora.rank=1,2", "--optim.lr=1e-3,1e-4"])
    assert fixed == []
    assert [p.name for p in expand(axes)] == ["lora.rank=1 optim.lr=1e-3", "lora.rank=1 optim.lr=1e-4",
                                              "lora.rank=2 optim.lr=1e-3", "lora.rank=2 optim.lr=1e-4"]


def test_a_single_value_is_a_fixed_flag_every_point_shares() -> None:
    axes, fixed = parse_grid(["--optim.lr=1e-3", "lora.rank=4,8"])
    assert fixed == ["--optim.lr=1e-3"]
    assert [p.overrides for p in expand(axes)] == [["--lora.rank=4"], ["--lora.rank=8"]]


def test_bracketed_lists_are_one_value_each_for_a_list_key() -> None:
    axes, _ = parse_grid(["--lora.targets=[query,value], [query, key, value]"])
    assert axes[0].values == ("[query,value]", "[query, key, value]")


def test_commas_inside_braces_and_quotes_do_not_split() -> None:
    assert split_values("x.{en,de},'a,b',\"c,d\"") == (["x.{en,de}", "'a,b'", '"c,d"'], None)
    _, fixed = parse_grid(["--data.train=x.{en,de}", "--lora.rank=1,2"])
    assert fixed == ["--data.train=x.{en,de}"]


def test_unbalanced_brackets_are_a_problem_not_a_split() -> None:
    assert split_values("[a,b")[1] is not None
    assert split_values("a],b")[1] is not None


@pytest.mark.parametrize("flag, matches", [
    ("--lora.targets=query,value", r"ambiguous: lora\.targets takes a list.*brackets"),
    ("--lora.rank=[4,8]", r"takes one value per point.*--lora\.rank=4,8"),
    ("--lora.rank=", r"list of values is empty"),
    ("--lora.rank=4,,8", r"value 2 of the list is empty"),
    ("--lora.rank=4,4", r"'4' is listed twice"),
    ("--lora.rnak=1,2", r"unknown key lora\.rnak \(did you mean 'rank'\?\)"),
    ("--lora.rank.x=1,2", r"lora\.rank is not a mapping"),
    ("--run.out_dir=a,b", r"set by the sweep.*--out"),
    ("--lora.rank=4", r"nothing to sweep"),
    ("rank=4,8", r"must look like --section\.key=value"),
])
def test_bad_sweep_flags_are_refused_with_the_flag_and_the_fix(flag: str, matches: str) -> None:
    with pytest.raises(ConfigError, match=matches):
        parse_grid([flag])


def test_an_int_and_a_float_of_equal_value_are_distinct_values() -> None:
    axes, _ = parse_grid(["--lora.alpha=4,4.0"])
    assert axes[0].values == ("4", "4.0")


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        parse_grid(["--lora.rnak=1,2", "--lora.rank=", "--optim.lr=1,1", "--lora.rank=3,4"])
    assert len(info.value.problems) == 4


def test_a_key_given_twice_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"lora\.rank is given twice"):
        parse_grid(["--lora.rank=1,2", "--lora.rank=4"])


def test_directory_names_read_like_the_point_and_keep_list_items() -> None:
    point = GridPoint((("lora.targets", "[query, value]"), ("lora.rank", "4")))
    assert dir_name(point) == "lora.targets=query+value,lora.rank=4"
    assert dir_name(GridPoint((("data.train", "../a b/x.tsv"),))) == "data.train=.._a_b_x.tsv"
    assert dir_name(GridPoint((("lora.rank_pattern", "{}"), ("run.seed", "1")))) == "lora.rank_pattern=empty,run.seed=1"


def test_an_overlong_directory_name_is_cut_and_stays_distinct() -> None:
    a, b = (GridPoint((("data.train", "d" * 200 + end),)) for end in ("1", "2"))
    assert len(dir_name(a)) <= 120 and dir_name(a) != dir_name(b)


def test_a_mapping_key_takes_braced_mappings_or_bare_values_such_as_files() -> None:
    axes, _ = parse_grid(["--data.columns={text: a, label: b},{text: c}", "--lora.rank_pattern=a.yaml,b.yaml"])
    assert [a.values for a in axes] == [("{text: a, label: b}", "{text: c}"), ("a.yaml", "b.yaml")]
