"""Bad training configs through `lorakit train`: each is exit code 2 and one error line that names the file and
line (or flag), the key and the fix; no traceback, and no file of the run changes."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import expect_cli_error, write_config

Setup = Callable[[Path, Path, Path, Path], list[str]]  # (tmp_path, model dir, train, dev) -> argv after "train"


def _config(tmp: Path, model: Path, train: Path, dev: Path, **sections: dict) -> Path:
    return write_config(tmp / "c.yaml", model, train, dev, tmp / "run", **sections)


def sections(**values: dict) -> Setup:
    """A config whose sections are updated with `values` (write_config's keys and any others)."""
    return lambda tmp, model, train, dev: [str(_config(tmp, model, train, dev, **values))]


def flags(*items: str) -> Setup:
    """The good config plus command-line overrides."""
    return lambda tmp, model, train, dev: [str(_config(tmp, model, train, dev)), *items]


def edited(edit: Callable[[str], str]) -> Setup:
    """The good config's YAML text, edited (yaml.safe_dump writes sections and keys sorted, two-space indents)."""
    def setup(tmp: Path, model: Path, train: Path, dev: Path) -> list[str]:
        path = _config(tmp, model, train, dev)
        path.write_text(edit(path.read_text()))
        return [str(path)]
    return setup


def text(content: str | bytes) -> Setup:
    def setup(tmp: Path, model: Path, train: Path, dev: Path) -> list[str]:
        path = tmp / "c.yaml"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return [str(path)]
    return setup


def out_dir(make: Callable[[Path], Path]) -> Setup:
    """The good config with run.out_dir at `make(tmp_path)`."""
    return lambda tmp, model, train, dev: [str(_config(tmp, model, train, dev, run={"out_dir": str(make(tmp))}))]


def _file_at(path: Path) -> Path:
    path.write_text("in the way\n")
    return path


def _read_only(path: Path) -> Path:
    path.mkdir()
    path.chmod(0o500)
    return path / "run"


CASES = [
    pytest.param(edited(lambda t: t.replace("  lr: 0.01\n", "  lr: 0.01\n  lr: 0.02\n")),
                 r"c\.yaml line \d+: duplicate key optim\.lr \(first at line \d+\); YAML keeps only the last",
                 id="duplicate-key"),
    pytest.param(edited(lambda t: t + "optim:\n  lr: 0.5\n"),
                 r"c\.yaml line \d+: duplicate key optim \(first at line \d+\)", id="duplicate-section"),
    pytest.param(edited(lambda t: t.replace("    text: sentence\n", "    text: sentence\n    text: other\n")),
                 r"c\.yaml line 5: duplicate key data\.columns\.text \(first at line 4\)", id="duplicate-nested-key"),
    pytest.param(edited(lambda t: t + "optm:\n  lr: 0.1\n"),
                 r"c\.yaml line \d+: unknown section 'optm' \(did you mean 'optim'\?\)", id="unknown-section"),
    pytest.param(sections(optim={"learning_rate": 0.1}), r"unknown key optim\.learning_rate", id="unknown-key"),
    pytest.param(sections(data={"train_limit": -1}), r"data\.train_limit must be >= 1 or null, got -1",
                 id="train-limit-negative"),
    pytest.param(sections(data={"eval_limit": 0}), r"data\.eval_limit must be >= 1 or null, got 0",
                 id="eval-limit-zero"),
    pytest.param(flags("--optim.max_steps=0"), r"flag --optim\.max_steps=0: optim\.max_steps must be >= 1 or null",
                 id="max-steps-zero"),
    pytest.param(edited(lambda t: t.replace("  lr: 0.01\n", "  lr: .nan\n")),
                 r"c\.yaml line \d+: optim\.lr must be a finite number, got nan", id="lr-nan"),
    pytest.param(flags("--optim.weight_decay=.inf"), r"optim\.weight_decay must be a finite number, got inf",
                 id="weight-decay-inf"),
    pytest.param(flags("--optim.clip_norm=nan"), r"optim\.clip_norm must be a finite number", id="clip-norm-nan"),
    pytest.param(flags("--data.eval_fraction=nan"), r"data\.eval_fraction must be a finite number",
                 id="eval-fraction-nan"),
    pytest.param(sections(lora={"dropout": float("nan")}), r"lora\.dropout must be a finite number",
                 id="lora-dropout-nan"),
    pytest.param(flags("--lora.alpha=-.inf"), r"lora\.alpha must be a finite number", id="lora-alpha-inf"),
    pytest.param(sections(optim={"batch_size": "sixteen"}), r"optim\.batch_size must be an int, got 'sixteen'",
                 id="wrong-type-int"),
    pytest.param(sections(lora={"targets": 5}), r"lora\.targets must be a list of strings, got 5",
                 id="wrong-type-list"),
    pytest.param(sections(run={"group_by_length": "maybe"}), r"run\.group_by_length must be true or false",
                 id="wrong-type-bool"),
    pytest.param(sections(lora={"rank": 0, "rnak": 3}, optim={"lr": -1, "batch_size": 0}),
                 r"\(1\) .*lora\.rank must be a positive int, got 0; \(2\) .*unknown key lora\.rnak.*; "
                 r"\(3\) .*optim\.batch_size must be >= 1, got 0; \(4\) .*optim\.lr must be > 0, got -1",
                 id="four-problems-at-once"),
    pytest.param(text("- model\n- data\n"), r"c\.yaml holds a YAML list, not a mapping of sections",
                 id="yaml-is-a-list"),
    pytest.param(text(""), r"c\.yaml is empty; write the sections", id="yaml-empty"),
    pytest.param(text("model:\n  name: [unclosed\n"), r"c\.yaml is not valid YAML at line 3", id="yaml-syntax"),
    pytest.param(text(b"model:\n  name: caf\xe9\n"), r"byte 0xe9 at byte offset 18 \(line 2\) is not UTF-8",
                 id="yaml-not-utf8"),
    pytest.param(edited(lambda t: t + "extra: [1\n"), r"is not valid YAML", id="yaml-unclosed-list"),
    pytest.param(edited(lambda t: t.replace("optim:\n", "optim: 5\nunused:\n")),
                 r"section 'optim' must be a mapping of keys, got int 5", id="section-not-a-mapping"),
    pytest.param(flags("--data.encoding=utf-9"), r"data\.encoding must be an encoding Python knows",
                 id="unknown-encoding"),
    pytest.param(flags("--run.seed=-1"), r"run\.seed must be in \[0, 2\*\*63\)", id="seed-negative"),
    pytest.param(flags("--data.eval_fraction=0.2"), r"data\.eval_fraction=0\.2 holds out part of train only when "
                 r"there is no data\.eval", id="eval-fraction-with-eval"),
    pytest.param(flags("optim.lr"), r"override 'optim\.lr' must look like --section\.key=value", id="bad-override"),
    pytest.param(lambda tmp, model, train, dev: [str(tmp)], r"config file .* is a directory", id="config-is-a-dir"),
    pytest.param(lambda tmp, model, train, dev: [str(tmp / "none.yaml")], r"none\.yaml' does not exist",
                 id="config-missing"),
    pytest.param(out_dir(lambda tmp: _file_at(tmp / "out")), r"run\.out_dir .*out is a file, not a directory",
                 id="out-dir-is-a-file"),
    pytest.param(out_dir(lambda tmp: _file_at(tmp / "out") / "run"),
                 r"run\.out_dir .*out/run cannot be created: .*out is a file", id="out-dir-under-a-file"),
    pytest.param(out_dir(lambda tmp: Path("/proc/lorakit-check/run")),
                 r"run\.out_dir /proc/lorakit-check/run is not writable", id="out-dir-unwritable"),
    pytest.param(out_dir(lambda tmp: _read_only(tmp / "ro")), r"is not writable", id="out-dir-read-only",
                 marks=pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")),
    pytest.param(flags("--data.max_length=65"),
                 r"data\.max_length=65 is more than the 64 positions of .*; set --data\.max_length=64 or less",
                 id="max-length-above-positions"),
]


@pytest.mark.parametrize("setup, message", CASES)
def test_bad_config_is_one_error_line(setup: Setup, message: str, tmp_path, tiny_classifier_dir, sentiment_tsv,
                                      capsys) -> None:
    argv = setup(tmp_path, tiny_classifier_dir, *sentiment_tsv)
    try:
        expect_cli_error(["train", *argv, "--quiet"], capsys, matches=message, watch=[tmp_path])
    finally:
        for path in tmp_path.rglob("*"):
            if path.is_dir():
                path.chmod(0o700)  # let pytest clean up a read-only case
