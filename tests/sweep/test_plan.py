"""Planning a sweep: every point's config built and checked before anything trains, each with its directory and
its `lorakit train` command."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from conftest import write_config

from lorakit.errors import ConfigError, LorakitError
from lorakit.sweep.plan import plan_sweep
from lorakit.train.config import load_train_config


@pytest.fixture
def config(tmp_path: Path, sentiment_tsv: tuple[Path, Path]) -> Path:
    return write_config(tmp_path / "c.yaml", "minilm", *sentiment_tsv, tmp_path / "run")


def test_each_point_runs_in_its_own_directory_under_the_config_run_out_dir(config: Path, tmp_path: Path) -> None:
    plan = plan_sweep(config, ["--lora.rank=2,4"])
    assert plan.out_dir == tmp_path / "run" / "sweep"
    assert [p.run_dir for p in plan.points] == [plan.out_dir / "lora.rank=2", plan.out_dir / "lora.rank=4"]
    assert [p.config.lora.rank for p in plan.points] == [2, 4]
    assert all(p.config.run.out_dir == str(p.run_dir) for p in plan.points)


def test_out_overrides_the_sweep_directory(config: Path, tmp_path: Path) -> None:
    plan = plan_sweep(config, ["--lora.rank=2,4"], out_dir=tmp_path / "elsewhere")
    assert plan.points[0].run_dir == tmp_path / "elsewhere" / "lora.rank=2"


def test_a_point_command_builds_the_same_config_as_the_sweep(config: Path) -> None:
    plan = plan_sweep(config, ["--optim.lr=1e-3", "--lora.targets=[query],[query,value]", "--lora.rank=2,4"])
    assert len(plan.points) == 4
    for point in plan.points:
        words = shlex.split(point.command)
        assert words[:3] == ["lorakit", "train", str(config)]
        assert load_train_config(words[2], words[3:]) == point.config
    assert plan.points[1].config.lora.targets == ["query"] and plan.points[1].config.optim.lr == 1e-3
    assert plan.points[3].config.lora.targets == ["query", "value"]


def test_bad_values_are_all_reported_each_naming_its_point(config: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        plan_sweep(config, ["--lora.rank=0,4,-1"])
    assert info.value.problems == ["(1) point lora.rank=0: lora.rank must be a positive int, got 0",
                                   "(2) point lora.rank=-1: lora.rank must be a positive int, got -1"]
    assert not (tmp_path / "run").exists()


def test_a_problem_every_point_has_is_reported_once(config: Path) -> None:
    with pytest.raises(ConfigError) as info:
        plan_sweep(config, ["--lora.rank=2,4", "--optim.lr=-1"])
    assert len(info.value.problems) == 1
    assert "optim.lr must be > 0" in info.value.problems[0] and "point" not in info.value.problems[0]


def test_a_missing_data_file_of_one_point_is_found_before_training(config: Path, tmp_path: Path) -> None:
    train = config.parent / "train.tsv"
    with pytest.raises(ConfigError, match=r"point data.train=.*nowhere\.tsv: .*nowhere\.tsv"):
        plan_sweep(config, [f"--data.train={train},{tmp_path / 'nowhere.tsv'}"])


def test_the_metric_and_its_direction_come_from_the_task(config: Path, tmp_path: Path) -> None:
    plan = plan_sweep(config, ["--lora.rank=2,4"])
    assert (plan.metric, plan.greater_is_better) == ("accuracy", True)
    data = tmp_path / "instructions.jsonl"
    data.write_text('{"instruction": "say hi", "output": "hi"}\n')
    other = write_config(tmp_path / "i.yaml", "smollm2", data, data, tmp_path / "i", data={"columns": {}})
    plan = plan_sweep(other, ["--lora.rank=2,4", "--data.task=instruction"])
    assert (plan.metric, plan.greater_is_better) == ("loss", False)


def test_the_identity_changes_when_the_config_file_changes(config: Path) -> None:
    before = plan_sweep(config, ["--lora.rank=2,4"]).identity()
    assert plan_sweep(config, ["--lora.rank=2,4"]).identity() == before
    config.write_text(config.read_text().replace("seed: 3", "seed: 4"))
    after = plan_sweep(config, ["--lora.rank=2,4"]).identity()
    assert after["grid"] == before["grid"] and after["fingerprint"] != before["fingerprint"]


def test_the_sweep_runs_under_the_one_allocator_its_points_share(config: Path) -> None:
    assert plan_sweep(config, ["--lora.rank=2,4", "--run.allocator=jemalloc"]).allocator() == "jemalloc"
    assert plan_sweep(config, ["--lora.rank=2,4"]).allocator() == "system"
    with pytest.raises(LorakitError, match="run.allocator must be the same for every point"):
        plan_sweep(config, ["--run.allocator=system,jemalloc"]).allocator()
