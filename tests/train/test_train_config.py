"""lorakit.train.config: every recipe loads; every problem is reported at once, each with its file and line or
flag; duplicate keys, NaN, bad limits and non-mapping YAML are errors; data paths relative to the YAML file."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from lorakit.errors import ConfigError
from lorakit.train.config import load_train_config
from lorakit.train.sections import SECTION_TYPES

RECIPES = sorted((REPO_ROOT / "recipes").rglob("*.yaml"))


def test_recipe_count():
    assert len(RECIPES) >= 8 and REPO_ROOT / "recipes" / "mnist-efficientnet.yaml" in RECIPES, [p.name for p in RECIPES]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads(path):
    config = load_train_config(path)
    assert config.data.train and config.run.out_dir.startswith("runs/")


# --- every problem at once, each where it was set ---------------------------------------------------------------

def problems(tmp_path, text: str, overrides: list[str] | None = None) -> list[str]:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_train_config(path, overrides)
    return err.value.problems


GOOD = "data:\n  task: classification\n  train: d.tsv\n"


def test_four_problems_of_four_phases_come_in_one_error(tmp_path):
    found = problems(tmp_path, GOOD + "lora:\n  rank: 0\n  rnak: 3\noptim:\n  lr: -1\n  batch_size: 0\n")
    assert len(found) == 4, found
    assert [p[:4] for p in found] == ["(1) ", "(2) ", "(3) ", "(4) "]
    text = " ".join(found)
    for part in ["line 5: lora.rank must be a positive int, got 0", "line 6: unknown key lora.rnak",
                 "line 8: optim.lr must be > 0, got -1", "line 9: optim.batch_size must be >= 1, got 0"]:
        assert part in text


def test_flag_problems_name_the_flag(tmp_path):
    found = problems(tmp_path, GOOD, ["--optim.lr=nan", "--run.sed=1"])
    assert found == ["(1) flag --optim.lr=nan: optim.lr must be a finite number, got 'nan'",
                     "(2) flag --run.sed=1: unknown key run.sed (did you mean 'seed'?); known keys: out_dir, seed, "
                     "eval_every, save_every, keep_last, early_stopping, log_every, eval_batch_size, group_by_length, "
                     "method, activation_checkpointing, fused_swiglu, mixed_precision, device, parallel, fsdp_offload, "
                     "allocator, cpu_matmul"]


def test_lora_problems_from_its_own_validation_join_the_others(tmp_path):
    found = problems(tmp_path, GOOD + "lora:\n  svd_iters: 2\noptim:\n  lr: 0\n")
    assert "line 5: lora.svd_iters applies only to init='principal'" in found[0] and "optim.lr" in found[1]


def test_a_bad_key_does_not_also_fail_the_checks_that_read_it(tmp_path):
    found = problems(tmp_path, GOOD + "lora:\n  init: pricipal\n  svd_iters: 2\nrun:\n  method: head-only\n",
                     ["--data.task=clasification"])
    assert len(found) == 2 and "did you mean 'classification'" in found[0] and "did you mean 'principal'" in found[1]


@pytest.mark.parametrize("text, message", [
    ("optim:\n  lr: 0.1\n  lr: 0.2\n", r"line 6: duplicate key optim.lr \(first at line 5\)"),
    ("optim: {}\noptim:\n  lr: 0.2\n", r"line 5: duplicate key optim \(first at line 4\)"),
    ("data:\n  columns:\n    text: a\n    text: b\n", r"line 7: duplicate key data.columns.text \(first at line 6\)"),
    ("lora:\n  rank_pattern:\n    q: 2\n    q: 4\n", r"duplicate key lora.rank_pattern.q"),
])
def test_duplicate_keys_at_any_level_name_both_lines(tmp_path, text, message):
    found = problems(tmp_path, GOOD + text)
    assert any(re.search(message, p) for p in found), found


def test_merge_key_overridden_by_a_later_key_is_not_a_duplicate(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(GOOD + "optim:\n  <<: {lr: 0.1, batch_size: 4}\n  lr: 0.2\n")
    config = load_train_config(path)
    assert (config.optim.lr, config.optim.batch_size) == (0.2, 4)


# --- numbers -----------------------------------------------------------------------------------------------------

def _float_keys() -> list[str]:
    keys = []
    for section, cls in SECTION_TYPES.items():
        for name, hint in typing.get_type_hints(cls).items():
            if typing.get_origin(hint) is not dict and float in (hint, *typing.get_args(hint)):
                keys.append(f"{section}.{name}")
    return keys


FLOAT_KEYS = _float_keys()


def test_the_float_keys_are_the_expected_ones():
    assert set(FLOAT_KEYS) >= {"optim.lr", "optim.weight_decay", "optim.clip_norm", "data.eval_fraction",
                               "lora.dropout", "lora.alpha"}


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "nan", "1e999"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_key_rejects_nan_and_infinity(key, value):
    with pytest.raises(ConfigError, match=rf"{re.escape(key)} must be a finite number"):
        load_train_config(None, ["data.train=x.tsv", f"{key}={value}"])


def test_nan_inside_a_mapping_of_numbers_is_rejected():
    with pytest.raises(ConfigError, match=r"lora.alpha_pattern must be a finite number"):
        load_train_config(None, ["data.train=x.tsv", "lora.alpha_pattern={q: .nan}"])


@pytest.mark.parametrize("key", ["data.train_limit", "data.eval_limit", "optim.max_steps", "run.early_stopping"])
@pytest.mark.parametrize("value", [-1, 0])
def test_count_limits_must_be_at_least_one_or_null(key, value):
    with pytest.raises(ConfigError, match=rf"{re.escape(key)} must be >= 1 or null, got {value}"):
        load_train_config(None, ["data.train=x.tsv", f"{key}={value}"])
    assert load_train_config(None, ["data.train=x.tsv", f"{key}=null"]) is not None


@pytest.mark.parametrize("key", ["optim.batch_size", "optim.grad_accum", "run.eval_batch_size", "run.log_every",
                                 "run.keep_last", "lora.rank"])
def test_counts_must_be_positive(key):
    with pytest.raises(ConfigError, match=rf"{re.escape(key)} must be (>= 1|a positive int), got 0"):
        load_train_config(None, ["data.train=x.tsv", f"{key}=0"])


@pytest.mark.parametrize("override, message", [
    ("run.seed=-1", r"run.seed must be in \[0, 2\*\*63\), got -1"),
    ("data.encoding=utf-9", "data.encoding must be an encoding Python knows"),
    ("data.max_length=4", "data.max_length must be >= 8"),
    ("data.eval=dev.tsv", "data.eval_fraction=0.1 holds out part of train only when there is no data.eval"),
    ("data.task=qa", "data.labels applies to classification and ner"),
])
def test_values_and_contradictions_are_named(override, message):
    base = ["data.train=x.tsv", "data.task=classification", "data.eval_fraction=0.1", "data.labels=[a, b]"]
    if override.startswith("data.eval="):
        base.remove("data.labels=[a, b]")
    with pytest.raises(ConfigError, match=message):
        load_train_config(None, [*base, override])


# --- reading -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("", r"c.yaml is empty; write the sections"),
    ("# only a comment\n", r"c.yaml is empty"),
    ("- data\n- optim\n", r"c.yaml holds a YAML list, not a mapping of sections"),
    ("just words\n", r"c.yaml holds a YAML str"),
    ("optim: 5\n" + GOOD, r"section 'optim' must be a mapping of keys, got int 5"),
])
def test_yaml_that_is_not_a_mapping_of_sections_is_named(tmp_path, text, message):
    assert re.search(message, " ".join(problems(tmp_path, text)))


def test_an_empty_section_is_allowed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(GOOD + "optim:\n")
    assert load_train_config(path).optim.lr == 2e-4


def test_config_that_is_not_utf8_names_the_byte(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"model:\n  name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"byte 0xe9 at byte offset 18 \(line 2\) is not UTF-8"):
        load_train_config(path)


def test_override_sets_one_entry_of_a_mapping(tmp_path):
    config = load_train_config(None, ["data.train=x.tsv", "--data.columns.text=sentence", "data.columns.label=y"])
    assert config.data.columns == {"text": "sentence", "label": "y"}


def test_override_that_is_not_yaml_is_kept_as_text_and_type_checked():
    with pytest.raises(ConfigError, match=r"optim.lr must be a number, got '\['"):
        load_train_config(None, ["data.train=x.tsv", "optim.lr=["])


def test_malformed_override_is_one_of_the_problems():
    with pytest.raises(ConfigError) as err:
        load_train_config(None, ["lr", "optim.lr=-1"])
    assert len(err.value.problems) == 3  # the override, optim.lr, and data.train missing


# --- data paths relative to the YAML file -----------------------------------------------------------------------

def test_data_path_missing_from_cwd_is_taken_beside_the_yaml(tmp_path, monkeypatch):
    (tmp_path / "conf" / "data").mkdir(parents=True)
    (tmp_path / "conf" / "data" / "train.tsv").write_text("text\tlabel\n")
    (tmp_path / "conf" / "c.yaml").write_text("data:\n  train: data/train.tsv\n  eval: data/none.tsv\n")
    monkeypatch.chdir(tmp_path)
    config = load_train_config("conf/c.yaml")
    assert config.data.train == str(Path("conf") / "data" / "train.tsv")
    assert config.data.eval == "data/none.tsv"  # found nowhere: left as written, the reader names it


def test_data_path_existing_from_cwd_wins_over_the_yaml_dir(tmp_path, monkeypatch):
    for root in (tmp_path, tmp_path / "conf"):
        (root / "data").mkdir(parents=True)
        (root / "data" / "train.tsv").write_text("text\tlabel\n")
    (tmp_path / "conf" / "c.yaml").write_text("data:\n  train: data/train.tsv\n")
    monkeypatch.chdir(tmp_path)
    assert load_train_config("conf/c.yaml").data.train == "data/train.tsv"


def test_parallel_spec_and_flags_resolve_as_written(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    for suffix in ("de", "en"):
        (tmp_path / "conf" / f"t.{suffix}").write_text("x\n")
    (tmp_path / "conf" / "c.yaml").write_text("data:\n  task: translation\n  train: t.{de,en}\n")
    monkeypatch.chdir(tmp_path)
    assert load_train_config("conf/c.yaml").data.train == str(Path("conf") / "t.{de,en}")
    assert load_train_config("conf/c.yaml", ["data.train=t.{de,en}"]).data.train == "t.{de,en}"


def test_parallel_text_is_the_translation_task(tmp_path):
    with pytest.raises(ConfigError, match=r"parallel text is translation: set data.task=translation"):
        load_train_config(None, ["data.train=t.{de,en}", "data.format=parallel"])
    with pytest.raises(ConfigError, match=r"data.task=translation reads parallel text"):
        load_train_config(None, ["data.train=t.csv", "data.task=translation", "data.format=csv"])
    assert load_train_config(None, ["data.train=t.{de,en}", "data.task=translation"]).data.task == "translation"
