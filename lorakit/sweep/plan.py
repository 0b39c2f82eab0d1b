"""A sweep planned and checked before anything trains: every point's config built, its data files found, its run
directory and its equivalent `lorakit train` command fixed.

    plan = plan_sweep("recipes/sst2-minilm.yaml", ["--lora.rank=1,2,4"], out_dir=None)
    plan.points[0].command   # lorakit train recipes/sst2-minilm.yaml --lora.rank=1 --run.out_dir=runs/.../lora.rank=1
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError, LorakitError
from lorakit.sweep.grid import Axis, GridPoint, dir_name, expand, parse_grid
from lorakit.train.config import load_train_config
from lorakit.train.preflight import check_data_files
from lorakit.train.sections import TrainConfig
from lorakit.train.tasks import TASKS


@dataclass
class SweepPoint:
    """One training of the sweep: its name (`lora.rank=4`), the flags that make it, its config (run.out_dir is
    `run_dir`) and the `lorakit train` command that runs it alone."""

    name: str
    settings: dict[str, str]
    overrides: list[str]
    run_dir: Path
    config: TrainConfig
    command: str


@dataclass
class SweepPlan:
    """Every point of a sweep, checked; `out_dir` holds one run directory per point and the sweep's tables."""

    config_path: str
    axes: list[Axis]
    fixed: list[str]
    out_dir: Path
    points: list[SweepPoint]
    metric: str
    greater_is_better: bool

    def identity(self) -> dict[str, Any]:
        """What makes two sweeps the same one: the config file, the grid, the fixed flags and a fingerprint of
        every point's whole config (so an edited YAML file counts as another sweep). Paths count by the files
        they name, so the same sweep started from another working directory is still the same."""
        configs = [comparable_config(p.config.to_dict()) for p in self.points]
        return {"config": os.path.realpath(self.config_path), "grid": {a.key: list(a.values) for a in self.axes},
                "fixed": self.fixed, "fingerprint": fingerprint(configs)}

    def allocator(self) -> str:
        """The memory allocator (`run.allocator`) of every point: one process trains them all, so a grid over it is
        refused (`LorakitError`)."""
        chosen = sorted({p.config.run.allocator for p in self.points})
        if len(chosen) > 1:
            raise LorakitError(f"run.allocator must be the same for every point of a sweep (one process trains "
                               f"them all), got {', '.join(chosen)}: run one sweep per allocator")
        return chosen[0]


def comparable_config(config: dict[str, Any]) -> dict[str, Any]:
    """A point's config (`TrainConfig.to_dict()`, or a run's config.json) as compared between runs: without
    run.out_dir (the sweep chooses it) and with data files as resolved paths."""
    out = json.loads(json.dumps(config, default=str))
    out.get("run", {}).pop("out_dir", None)
    data = out.get("data", {})
    for key in ("train", "eval"):
        if isinstance(data.get(key), str) and os.path.exists(data[key]):
            data[key] = os.path.realpath(data[key])
    return out  # type: ignore[no-any-return]


def fingerprint(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def plan_sweep(config_path: str | Path, overrides: list[str], out_dir: str | Path | None = None) -> SweepPlan:
    """Build and check every point of the sweep `overrides` describe over the YAML file `config_path`.

    `out_dir` defaults to `<run.out_dir of the config>/sweep`; point `lora.rank=4` runs in `out_dir/lora.rank=4`.
    Raises ConfigError listing every problem at once, each naming its point (`point lora.rank=0: ...`), or once
    when every point has it; nothing is written.
    """
    axes, fixed = parse_grid(overrides)
    grid = expand(axes)
    configs, problems = _load_points(str(config_path), fixed, grid)
    if problems:
        raise ConfigError([f"({i}) {p}" for i, p in enumerate(problems, 1)] if len(problems) > 1 else problems)
    out = Path(out_dir) if out_dir is not None else Path(configs[0].run.out_dir) / "sweep"
    names = _unique_dir_names(grid)
    points = []
    for point, config, name in zip(grid, configs, names, strict=True):
        run_dir = out / name
        config = dataclasses.replace(config, run=dataclasses.replace(config.run, out_dir=str(run_dir)))
        flags = [*fixed, *point.overrides]
        command = shlex.join(["lorakit", "train", str(config_path), *flags, f"--run.out_dir={run_dir}"])
        points.append(SweepPoint(point.name, dict(point.settings), flags, run_dir, config, command))
    metric, greater = _metric(points)
    return SweepPlan(str(config_path), axes, fixed, out, points, metric, greater)


def _load_points(config_path: str, fixed: list[str], grid: list[GridPoint]
                 ) -> tuple[list[TrainConfig], list[str]]:
    """Every point's config, and the problems: one a point has alone is named by the point, one that every point
    has (a bad YAML file, a bad fixed flag, a missing data file) is reported once."""
    configs: list[TrainConfig] = []
    found: list[list[str]] = []
    for point in grid:
        try:
            config = load_train_config(config_path, [*fixed, *point.overrides])
            check_data_files(config.data)
        except ConfigError as e:
            found.append([_without_own_flag(re.sub(r"^\(\d+\) ", "", p), point) for p in e.problems])
            continue
        except LorakitError as e:
            found.append([str(e)])
            continue
        configs.append(config)
        found.append([])
    shared = [p for p in found[0] if all(p in f for f in found)]
    problems = list(shared)
    for point, own in zip(grid, found, strict=True):
        problems += [f"point {point.name}: {p}" for p in own if p not in shared]
    return configs, problems


def _without_own_flag(problem: str, point: GridPoint) -> str:
    """`flag --lora.rank=0: lora.rank must be ...` as `lora.rank must be ...` when the flag is the point's own:
    the point's name already says it."""
    for flag in point.overrides:
        problem = problem.removeprefix(f"flag {flag}: ")
    return problem


def _unique_dir_names(grid: list[GridPoint]) -> list[str]:
    names: list[str] = []
    for i, point in enumerate(grid, 1):
        name = dir_name(point)
        names.append(name if name not in names else f"{name}-{i}")
    return names


def _metric(points: list[SweepPoint]) -> tuple[str, bool]:
    """The metric every point is scored by and whether higher is better; raises when the points' tasks differ in
    either (their results could not share one table or plot)."""
    tasks = {p.config.data.task for p in points}
    scored = {(TASKS[t].metric, TASKS[t].greater_is_better) for t in tasks}
    if len(scored) > 1:
        raise ConfigError([f"the points score different metrics ({', '.join(sorted(m for m, _ in scored))}, from "
                           f"data.task {', '.join(sorted(tasks))}); sweep one kind of task at a time"])
    return scored.pop()
