"""Bad input to the commands that read adapters and write outputs (merge, generate, chat, eval, inspect, train's
and demo's output directories) and to the command line itself: exit 2, one `error:` line naming the problem and
the fix, no traceback, and every file that was there before byte-identical after."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import expect_cli_error, snapshot, write_config
from safetensors.torch import load_file, save_file

from lorakit.cli import main
from lorakit.io import CONFIG_NAME, TASK_NAME, WEIGHTS_NAME


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_classifier_dir: Path) -> dict[str, Path]:
    """One tiny classification run (config, data, run directory with its adapter), trained once for the module."""
    root = tmp_path_factory.mktemp("trained")
    rows = [("a fine film", 1), ("great acting", 1), ("a dull film", 0), ("bad acting", 0)] * 4
    train = root / "train.tsv"
    train.write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
    config = write_config(root / "c.yaml", tiny_classifier_dir, train, train, root / "run", optim={"max_steps": 2})
    assert main(["train", str(config), "--quiet"]) == 0
    return {"root": root, "config": config, "run": root / "run", "adapter": root / "run" / "adapter",
            "model": tiny_classifier_dir}


def _copy_adapter(trained: dict[str, Path], tmp_path: Path, change: Callable[[Path], None] | None = None) -> Path:
    target = tmp_path / "adapter"
    target.mkdir()
    for file in trained["adapter"].iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    if change is not None:
        change(target)
    return target


def _nan_factor(adapter: Path) -> None:
    tensors = load_file(adapter / WEIGHTS_NAME)
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, adapter / WEIGHTS_NAME, metadata={"format": "pt"})


def _other_rank_in_config(adapter: Path) -> None:
    config = json.loads((adapter / CONFIG_NAME).read_text())
    config["r"] = 8
    (adapter / CONFIG_NAME).write_text(json.dumps(config))


def _truncate(adapter: Path) -> None:
    data = (adapter / WEIGHTS_NAME).read_bytes()
    (adapter / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])


ADAPTER_DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "invalid task.json": (lambda a: (a / TASK_NAME).write_text("{not json"), r"task\.json is not valid JSON"),
    "task.json without a task": (lambda a: (a / TASK_NAME).write_text("[1, 2]"), r"task\.json must be a JSON object"),
    "task.json with an unknown task": (lambda a: (a / TASK_NAME).write_text('{"task": "poetry"}'),
                                       r"names task 'poetry'"),
    "task.json with repeated labels": (lambda a: (a / TASK_NAME).write_text('{"task": "classification", "labels": '
                                                                            '["0", "0"]}'), r"distinct strings"),
    "NaN factors": (_nan_factor, r"NaN or infinite values .* lower optim\.lr"),
    "truncated weights": (_truncate, r"truncated or corrupted"),
    "missing weights": (lambda a: (a / WEIGHTS_NAME).unlink(), r"adapter_model\.safetensors is missing"),
    "adapter_config.json not JSON": (lambda a: (a / CONFIG_NAME).write_text("r: 4"), r"is not valid JSON"),
    "adapter_config.json a list": (lambda a: (a / CONFIG_NAME).write_text("[]"), r"must hold a JSON object"),
    "config rank disagrees with the tensors": (_other_rank_in_config, r"shape mismatch|rank"),
}


@pytest.mark.parametrize("damage, matches", ADAPTER_DAMAGE.values(), ids=ADAPTER_DAMAGE.keys())
def test_merge_of_a_damaged_adapter(damage: Callable[[Path], None], matches: str, trained: dict[str, Path],
                                    tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter = _copy_adapter(trained, tmp_path, damage)
    expect_cli_error(["merge", "--adapter", adapter, "--out", tmp_path / "merged"], capsys, matches=matches,
                     watch=[tmp_path])
    assert not (tmp_path / "merged" / "config.json").exists()


@pytest.mark.parametrize("damage, matches", [ADAPTER_DAMAGE["NaN factors"], ADAPTER_DAMAGE["invalid task.json"]],
                         ids=["NaN factors", "invalid task.json"])
def test_eval_of_a_damaged_adapter(damage: Callable[[Path], None], matches: str, trained: dict[str, Path],
                                   tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter = _copy_adapter(trained, tmp_path, damage)
    expect_cli_error(["eval", trained["config"], "--adapter", adapter], capsys, matches=matches,
                     watch=[tmp_path, trained["run"]])


def test_inspect_reports_a_config_rank_that_the_tensors_contradict(trained: dict[str, Path], tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    adapter = _copy_adapter(trained, tmp_path, _other_rank_in_config)
    expect_cli_error(["inspect", adapter], capsys, matches=r"holds rank-4 factors .* says rank 8", watch=[tmp_path])


def _foreign_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    return folder


MERGE_OUTPUTS: dict[str, tuple[Callable[[dict[str, Path], Path], Path], str]] = {
    "into the adapter itself": (lambda t, tmp: tmp / "adapter", r"overlaps the input"),
    "into a folder inside the adapter": (lambda t, tmp: tmp / "adapter" / "merged", r"overlaps the input"),
    "into the base model directory": (lambda t, tmp: t["model"], r"overlaps the input"),
    "into a folder of someone else's files": (lambda t, tmp: _foreign_dir(tmp), r"files lorakit did not write"),
    "onto a file": (lambda t, tmp: _file(tmp), r"is a file, not a directory"),
}


def _file(tmp_path: Path) -> Path:
    (tmp_path / "out.bin").write_bytes(b"\x00\x01")
    return tmp_path / "out.bin"


@pytest.mark.parametrize("where, matches", MERGE_OUTPUTS.values(), ids=MERGE_OUTPUTS.keys())
def test_merge_never_writes_over_what_it_did_not_create(where: Callable[[dict[str, Path], Path], Path], matches: str,
                                                        trained: dict[str, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    adapter = _copy_adapter(trained, tmp_path)
    out = where(trained, tmp_path)
    expect_cli_error(["merge", "--model", trained["model"], "--adapter", adapter, "--out", out], capsys,
                     matches=matches, watch=[tmp_path, trained["model"]])


def test_merge_over_its_own_output_needs_force(trained: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(trained["adapter"]), "--out", str(out)]) == 0
    expect_cli_error(["merge", "--adapter", trained["adapter"], "--out", out], capsys,
                     matches=r"earlier lorakit merged model; pass --force", watch=[tmp_path])
    assert main(["merge", "--adapter", str(trained["adapter"]), "--out", str(out), "--force"]) == 0


def test_merge_onto_another_base_is_one_short_line(trained: dict[str, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    line = expect_cli_error(["merge", "--model", "minilm", "--adapter", trained["adapter"], "--out", tmp_path / "m"],
                            capsys, matches=r"was trained on '.*tiny-bert.*', this model is 'minilm'",
                            watch=[trained["run"]])
    assert len(line) < 400


GENERATE: dict[str, tuple[list[str], str]] = {
    "temperature nan": (["--prompt", "hi", "--temperature", "nan"], r"temperature must be a finite number"),
    "temperature inf": (["--prompt", "hi", "--temperature", "inf"], r"temperature must be a finite number"),
    "top-p nan": (["--prompt", "hi", "--top-p", "nan"], r"top_p must be a finite number"),
    "top-p 0": (["--prompt", "hi", "--top-p", "0"], r"top_p must be in \(0, 1\]"),
    "negative top-k": (["--prompt", "hi", "--top-k", "-1"], r"top_k must be >= 0"),
    "no new tokens": (["--prompt", "hi", "--max-new-tokens", "0"], r"max_new_tokens must be > 0"),
    "max-new-tokens not a number": (["--prompt", "hi", "--max-new-tokens", "ten"], r"invalid int value: 'ten'"),
    "empty raw prompt": (["--prompt", "", "--raw"], r"prompt 1 is empty"),
    "blank raw prompt": (["--prompt", "ok", "--prompt", "   ", "--raw"], r"prompt 2 is empty"),
    "an encoder": (["--model", "minilm", "--prompt", "hi"], r"'minilm' \(BertModel\) cannot generate text"),
    "a missing model directory": (["--model", "./no/such/model", "--prompt", "hi"], r"no such directory"),
}


@pytest.mark.parametrize("flags, matches", GENERATE.values(), ids=GENERATE.keys())
def test_generate_rejects(flags: list[str], matches: str, capsys: pytest.CaptureFixture[str]) -> None:
    expect_cli_error(["generate", *flags], capsys, matches=matches)


def test_chat_with_an_encoder_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    expect_cli_error(["chat", "--model", "minilm"], capsys, matches=r"cannot generate text")


EVAL: dict[str, tuple[Callable[[dict[str, Path], Path], list[Any]], str]] = {
    "num-beams 0": (lambda t, tmp: ["--adapter", t["adapter"], "--num-beams", "0"], r"num_beams must be an int >= 1"),
    "a base without the task's head": (lambda t, tmp: [], r"has no trained sequence-classification head"),
    "a results file that is not JSON": (lambda t, tmp: ["--adapter", t["adapter"], "--record", _text(tmp, "r.json")],
                                        r"not a readable results file"),
    "a results file that is not a list": (lambda t, tmp: ["--adapter", t["adapter"], "--record",
                                                          _text(tmp, "r.json", "{}")], r"not a lorakit results file"),
    "a results file without .json": (lambda t, tmp: ["--adapter", t["adapter"], "--record", tmp / "results.md"],
                                     r"a results file is a \.json file"),
    "a missing adapter": (lambda t, tmp: ["--adapter", tmp / "none"], r"adapter directory .* does not exist"),
}


def _text(tmp_path: Path, name: str, text: str = "not json") -> Path:
    (tmp_path / name).write_text(text)
    return tmp_path / name


@pytest.mark.parametrize("flags, matches", EVAL.values(), ids=EVAL.keys())
def test_eval_rejects(flags: Callable[[dict[str, Path], Path], list[Any]], matches: str, trained: dict[str, Path],
                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expect_cli_error(["eval", trained["config"], *flags(trained, tmp_path)], capsys, matches=matches,
                     watch=[tmp_path, trained["run"]])


TRAIN_OUTPUTS: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "a folder of someone else's files": (lambda tmp: [f"--run.out_dir={_foreign_dir(tmp)}"],
                                         r"files lorakit did not write"),
    "someone else's files with --force": (lambda tmp: [f"--run.out_dir={_foreign_dir(tmp)}", "--force"],
                                          r"files lorakit did not write"),
    "a bad --record path": (lambda tmp: [f"--run.out_dir={tmp / 'run'}", "--record", str(_text(tmp, "r.json"))],
                            r"not a readable results file"),
}


@pytest.mark.parametrize("flags, matches", TRAIN_OUTPUTS.values(), ids=TRAIN_OUTPUTS.keys())
def test_train_refuses_outputs(flags: Callable[[Path], list[str]], matches: str, trained: dict[str, Path],
                               tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expect_cli_error(["train", trained["config"], "--quiet", *flags(tmp_path)], capsys, matches=matches,
                     watch=[tmp_path])


def test_train_over_a_run_whose_checkpoints_were_removed_keeps_its_adapter_and_metrics(
        trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for item in ("adapter", "metrics.jsonl", ".lorakit-output.json"):
        source = trained["run"] / item
        if source.is_dir():
            (run / item).mkdir()
            for file in source.iterdir():
                (run / item / file.name).write_bytes(file.read_bytes())
        else:
            (run / item).write_bytes(source.read_bytes())
    expect_cli_error(["train", trained["config"], "--quiet", f"--run.out_dir={run}"], capsys,
                     matches=r"earlier lorakit train run; pass --resume to continue it or --force", watch=[tmp_path])


def test_demo_refuses_a_folder_it_did_not_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expect_cli_error(["demo", "--out", _foreign_dir(tmp_path)], capsys, matches=r"files lorakit did not write",
                     watch=[tmp_path])


COMMAND_LINES: dict[str, tuple[list[str], str]] = {
    "no command": ([], r"the following arguments are required: COMMAND"),
    "an unknown command": (["tran"], r"invalid choice: 'tran'"),
    "an unknown flag": (["inspect", "x", "--jsn"], r"unrecognized arguments: --jsn"),
    "merge without --adapter": (["merge", "--out", "x"], r"merge needs --adapter"),
    "merge without --out": (["merge", "--adapter", "x"], r"the following arguments are required: --out"),
    "merge with an unknown dtype": (["merge", "--adapter", "x", "--out", "y", "--dtype", "fp8"],
                                    r"argument --dtype: invalid choice: 'fp8'"),
    "train without a config": (["train"], r"the following arguments are required: config"),
    "an override that is not key=value": (["train", "c.yaml", "--optim.lr"], r"unrecognized arguments"),
}


@pytest.mark.parametrize("argv, matches", COMMAND_LINES.values(), ids=COMMAND_LINES.keys())
def test_command_line_errors_are_one_line(argv: list[str], matches: str, capsys: pytest.CaptureFixture[str]) -> None:
    expect_cli_error(argv, capsys, matches=matches)


def test_a_bug_is_one_line_with_exit_1_and_the_traceback_only_under_verbose(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr("lorakit.io.inspect_adapter", broken)
    assert main(["inspect", "x"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: unexpected RuntimeError: boom (this is a bug in lorakit; rerun with -v for the traceback)"]
    with pytest.raises(RuntimeError, match="boom"):
        main(["-v", "inspect", "x"])


def test_watched_files_are_compared_byte_for_byte(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"1")
    before = snapshot(tmp_path)
    (tmp_path / "a").write_bytes(b"2")
    assert snapshot(tmp_path) != before
