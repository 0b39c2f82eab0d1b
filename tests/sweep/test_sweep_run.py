"""Running a sweep: resumable (a finished point is not trained again, an interrupted one continues from its
checkpoint), one sweep per directory, each finished point recorded. A stand-in trainer counts the trainings; the
tests that need real checkpoints train a tiny model for two steps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import write_config

from lorakit.errors import LorakitError
from lorakit.outputs import OutputExistsError, claim_output_dir
from lorakit.sweep import run as sweep_run
from lorakit.sweep.plan import plan_sweep
from lorakit.sweep.report import POINT_FILE
from lorakit.sweep.run import SweepPointError, run_sweep
from lorakit.train.results import read_results
from lorakit.train.run import RUN_KIND, TrainSummary, train_from_config
from lorakit.train.sections import TrainConfig


class CountingTrainer:
    """Stands in for train_from_config: claims the run directory as a run does and reports made-up figures
    (metric rank/100, rank x 1,000 trainable parameters); `calls` lists (point directory name, resume)."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[tuple[str, bool]] = []
        self.fail_on = fail_on

    def __call__(self, config: TrainConfig, *, resume: bool, force: bool, progress: bool) -> TrainSummary:
        out = Path(config.run.out_dir)
        self.calls.append((out.name, resume))
        if out.name == self.fail_on:
            raise LorakitError("loss is nan at step 2")
        if not resume:
            claim_output_dir(out, kind=RUN_KIND, force=force)
        rank = config.lora.rank
        return TrainSummary(task="classification", model=config.model.name, method="lora", metric="accuracy",
                            value=rank / 100, trainable_params=rank * 1000, total_params=10**6, steps=2,
                            train_seconds=float(rank), adapter_dir=str(out / "adapter"), adapter_bytes=0,
                            loss_curve=None)


@pytest.fixture
def config(tmp_path: Path, sentiment_tsv: tuple[Path, Path]) -> Path:
    return write_config(tmp_path / "c.yaml", "minilm", *sentiment_tsv, tmp_path / "run")


def _use(monkeypatch: pytest.MonkeyPatch, trainer: Any) -> Any:
    monkeypatch.setattr(sweep_run, "train_from_config", trainer)
    return trainer


def test_every_point_trains_once_and_the_tables_list_them(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = _use(monkeypatch, CountingTrainer())
    result = run_sweep(plan_sweep(config, ["--lora.rank=1,2,4"]))
    assert trainer.calls == [("lora.rank=1", False), ("lora.rank=2", False), ("lora.rank=4", False)]
    table = json.loads((result.out_dir / "sweep.json").read_text())
    assert [(p["point"], p["value"], p["trainable_params"]) for p in table["points"]] == [
        ("lora.rank=1", 0.01, 1000), ("lora.rank=2", 0.02, 2000), ("lora.rank=4", 0.04, 4000)]
    assert table["points"][1]["trainable_pct"] == pytest.approx(0.2)
    assert (result.out_dir / "pareto.png").is_file()
    assert "| lora.rank=4 | 0.0400 | 4,000 |" in (result.out_dir / "sweep.md").read_text()


def test_a_rerun_of_the_same_sweep_skips_the_finished_points(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _use(monkeypatch, CountingTrainer())
    first = run_sweep(plan_sweep(config, ["--lora.rank=1,2"]))
    trainer = _use(monkeypatch, CountingTrainer())
    lines: list[str] = []
    again = run_sweep(plan_sweep(config, ["--lora.rank=1,2"]), echo=lines.append)
    assert trainer.calls == []
    assert again.skipped == ["lora.rank=1", "lora.rank=2"] and again.rows == first.rows
    assert lines[0].startswith("[1/2] lora.rank=1: finished earlier, skipped")


def test_the_same_sweep_spelled_from_another_directory_continues(config: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _use(monkeypatch, CountingTrainer())
    run_sweep(plan_sweep(config, ["--lora.rank=1,2"]))
    trainer = _use(monkeypatch, CountingTrainer())
    monkeypatch.chdir(tmp_path)
    again = run_sweep(plan_sweep("c.yaml", ["--lora.rank=1,2"], out_dir="run/sweep"))
    assert trainer.calls == [] and len(again.skipped) == 2


def test_progress_names_the_point_its_command_and_its_place(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _use(monkeypatch, CountingTrainer())
    lines: list[str] = []
    plan = plan_sweep(config, ["--lora.rank=1,2"])
    run_sweep(plan, echo=lines.append)
    assert lines == [f"[1/2] lora.rank=1: {plan.points[0].command}", f"[2/2] lora.rank=2: {plan.points[1].command}"]


def test_a_failed_point_stops_the_sweep_keeping_the_finished_ones(config: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _use(monkeypatch, CountingTrainer(fail_on="lora.rank=2"))
    with pytest.raises(SweepPointError, match=r"point lora\.rank=2: loss is nan .*1 finished points are kept"):
        run_sweep(plan_sweep(config, ["--lora.rank=1,2,4"]))
    trainer = _use(monkeypatch, CountingTrainer())
    run_sweep(plan_sweep(config, ["--lora.rank=1,2,4"]))
    assert trainer.calls == [("lora.rank=2", False), ("lora.rank=4", False)]


def test_another_sweep_in_the_directory_is_refused_and_force_replaces_it(config: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _use(monkeypatch, CountingTrainer())
    out = run_sweep(plan_sweep(config, ["--lora.rank=1,2"])).out_dir
    before = (out / "sweep.json").read_bytes()
    trainer = _use(monkeypatch, CountingTrainer())
    with pytest.raises(OutputExistsError, match=r"holds another sweep \(grid lora\.rank=1,2\); pass --force"):
        run_sweep(plan_sweep(config, ["--lora.rank=2,4"]))
    assert trainer.calls == [] and (out / "sweep.json").read_bytes() == before
    run_sweep(plan_sweep(config, ["--lora.rank=2,4"]), force=True)
    assert trainer.calls == [("lora.rank=2", False), ("lora.rank=4", False)]
    assert not (out / "lora.rank=1").exists()


def test_an_edited_config_counts_as_another_sweep(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _use(monkeypatch, CountingTrainer())
    run_sweep(plan_sweep(config, ["--lora.rank=1,2"]))
    config.write_text(config.read_text().replace("seed: 3", "seed: 4"))
    with pytest.raises(OutputExistsError, match=r"config whose contents have changed"):
        run_sweep(plan_sweep(config, ["--lora.rank=1,2"]))


def test_a_sweep_never_writes_into_a_directory_of_other_files(config: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = _use(monkeypatch, CountingTrainer())
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match=r"files lorakit did not write"):
        run_sweep(plan_sweep(config, ["--lora.rank=1,2"], out_dir=tmp_path / "mine"))
    assert trainer.calls == [] and sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


def test_each_finished_point_is_recorded_with_its_command(config: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _use(monkeypatch, CountingTrainer())
    plan = plan_sweep(config, ["--lora.rank=1,2"])
    run_sweep(plan, record=tmp_path / "results.json", note="a sweep")
    entries = read_results(tmp_path / "results.json")
    assert [(e["command"], e["value"], e["note"]) for e in entries] == [
        (plan.points[0].command, 0.01, "a sweep"), (plan.points[1].command, 0.02, "a sweep")]
    assert "lora.rank=2" in (tmp_path / "results.md").read_text()


def test_a_bad_results_file_is_refused_before_any_training(config: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = _use(monkeypatch, CountingTrainer())
    with pytest.raises(LorakitError, match=r"a results file is a \.json file"):
        run_sweep(plan_sweep(config, ["--lora.rank=1,2"]), record=tmp_path / "results.txt")
    assert trainer.calls == [] and not (tmp_path / "run").exists()


# ---------------------------------------------------------------- real (tiny) trainings


def test_a_point_cut_short_continues_from_its_checkpoint(tmp_path: Path, tiny_classifier_dir: Path,
                                                         sentiment_tsv: tuple[Path, Path],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_config(tmp_path / "c.yaml", tiny_classifier_dir, *sentiment_tsv, tmp_path / "run",
                          optim={"max_steps": 2})
    plan = plan_sweep(config, ["--lora.rank=1,2"])
    run_sweep(plan)
    # As if the run had been killed after its checkpoint, before the sweep wrote the point's result.
    (plan.points[1].run_dir / POINT_FILE).unlink()
    calls: list[tuple[str, bool]] = []

    def spy(config: TrainConfig, *, resume: bool, force: bool, progress: bool) -> TrainSummary:
        calls.append((Path(config.run.out_dir).name, resume))
        return train_from_config(config, resume=resume, force=force, progress=progress)

    monkeypatch.setattr(sweep_run, "train_from_config", spy)
    result = run_sweep(plan_sweep(config, ["--lora.rank=1,2"]))
    assert calls == [("lora.rank=2", True)]
    assert result.rows[1]["status"] == "done" and result.rows[1]["resumed"] is True
    assert "(resumed)" in (plan.out_dir / "sweep.md").read_text()
