"""`lorakit combine` end to end on tiny adapters: it writes an adapter that loads, prints a table per module kind or
one JSON report, and parses NAME=DIR[:WEIGHT] arguments (negative weights included)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from arithmetic.arithmetic_helpers import deltas, make_adapter
from conftest import tiny_llama

from lorakit import load_adapter
from lorakit.arithmetic import METHODS, TARGET_CHOICES
from lorakit.cli import main
from lorakit.cli_tools import COMBINE_METHODS, COMBINE_TARGETS, parse_combine_adapters
from lorakit.io import WEIGHTS_NAME


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return make_adapter(tmp_path / "a", seed=1), make_adapter(tmp_path / "b", seed=2)


def test_cli_combine_writes_an_adapter_that_loads_and_holds_the_weighted_sum(pair, tmp_path, capsys):
    a, b = pair
    out = tmp_path / "c"
    assert main(["combine", f"a={a}", f"b={b}:-0.5", "--method", "cat", "--out", str(out)]) == 0
    model = tiny_llama()
    load_adapter(model, out)  # strict: every key and shape fits the base
    want, got = deltas(a), deltas(out)
    assert got.keys() == want.keys()
    for name, d in got.items():
        torch.testing.assert_close(d, want[name] - 0.5 * deltas(b)[name], rtol=1e-5, atol=1e-6)


def test_cli_combine_table_names_each_module_kind_its_ranks_and_the_size(pair, tmp_path, capsys):
    a, b = pair
    out = tmp_path / "c"
    assert main(["combine", f"a={a}", f"b={b}", "--rank", "3", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "self_attn.q_proj  4+4 -> 3," in text and "mlp.down_proj" in text
    size = (out / WEIGHTS_NAME).stat().st_size
    assert f"linear of 2 adapters (a 1, b 1): 14 modules, {size:,} bytes; written to {out}" in text


def test_cli_combine_json_prints_one_object_with_each_module_and_the_size(pair, tmp_path, capsys):
    a, b = pair
    out = tmp_path / "c"
    assert main(["combine", f"a={a}:2", f"b={b}:-1", "--method", "dare", "--rate", "0.5", "--seed", "3",
                 "--rank", "2", "--out", str(out), "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert report["method"] == "dare" and report["bytes"] == (out / WEIGHTS_NAME).stat().st_size
    assert report["adapters"] == {"a": {"path": str(a), "weight": 2.0}, "b": {"path": str(b), "weight": -1.0}}
    assert {m["rank"] for m in report["modules"]} == {2} and all(0 < m["discarded"] < 1 for m in report["modules"])
    assert {m["name"] for m in report["modules"]} == set(deltas(out))


def test_cli_combine_union_of_different_modules_adapts_all_of_them(tmp_path, capsys):
    a = make_adapter(tmp_path / "a", seed=1, targets=["q_proj", "v_proj"])
    b = make_adapter(tmp_path / "b", seed=2, targets=["v_proj"])
    assert main(["combine", f"a={a}", f"b={b}", "--targets", "union", "--out", str(tmp_path / "c"), "--json"]) == 0
    ranks = {m["name"]: m["ranks_in"] for m in json.loads(capsys.readouterr().out)["modules"]}
    assert sorted(len(r) for r in ranks.values()) == [1, 1, 2, 2]  # q_proj from a only, v_proj from both


def test_cli_combine_force_replaces_an_earlier_combined_adapter(pair, tmp_path):
    a, b = pair
    out = tmp_path / "c"
    assert main(["combine", f"a={a}", f"b={b}", "--out", str(out)]) == 0
    assert main(["combine", f"a={a}", f"b={b}", "--rank", "1", "--out", str(out), "--force"]) == 0
    assert all(torch.linalg.matrix_rank(d).item() == 1 for d in deltas(out).values())


@pytest.mark.parametrize("item, parsed", [
    ("a=runs/a", ("a", "runs/a", 1.0)),
    ("toxic=runs/x/adapter:-0.5", ("toxic", "runs/x/adapter", -0.5)),
    ("b=dir:with:colons:2e-1", ("b", "dir:with:colons", 0.2)),
    ("c=d=e:3", ("c", "d=e", 3.0)),
])
def test_adapter_argument_parses_name_directory_and_weight(item, parsed):
    name, path, weight = parsed
    assert parse_combine_adapters([item]) == {name: (path, weight)}


def test_the_cli_choices_are_the_librarys():
    assert COMBINE_METHODS == METHODS and COMBINE_TARGETS == TARGET_CHOICES
