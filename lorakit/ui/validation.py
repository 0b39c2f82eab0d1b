"""A launch request checked the way `lorakit train` checks its config, every problem at once, before anything
starts: the run name, the YAML (parsed with the safe loader), the form's keys as `--section.key=value` flags
(so each message is the CLI's own, naming the file and line or the flag), file paths confined to the directories
the page may read, and an output directory no other run uses."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorakit.errors import ConfigError
from lorakit.train.sections import TrainConfig
from lorakit.ui.security import UiSettings, check_path, check_run_name

# The keys the form edits, in its order; everything else stays as the recipe or upload has it.
FORM_KEYS = ("model.name", "data.task", "data.train", "data.eval", "lora.rank", "lora.alpha", "lora.targets",
             "optim.lr", "optim.epochs", "optim.max_steps", "optim.batch_size")
PATH_KEYS = ("data.train", "data.eval", "distill.teacher", "distill.teacher_adapter")
UPLOAD_NAME = re.compile(r"[^A-Za-z0-9._-]")


class LaunchProblems(Exception):
    """Every problem found with a launch request, each one line for the page."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass
class LaunchPlan:
    """A checked request: the `lorakit train` arguments that start it and the config they give."""

    name: str
    out_dir: Path
    config: TrainConfig
    overrides: list[str]
    recipe: Path | None = None  # a recipe file, read where it lies
    upload_name: str | None = None  # else the uploaded YAML, saved with the launch record
    upload_text: str | None = None
    fields: dict[str, str] = field(default_factory=dict)


def recipe_names(settings: UiSettings) -> list[str]:
    d = settings.recipes_dir
    return sorted(p.name for p in d.glob("*.yaml") if p.is_file()) if d.is_dir() else []


def form_fields(raw: Any) -> dict[str, str]:
    """The form's keys as the text a user edits (YAML flow style), from a parsed config mapping."""
    out: dict[str, str] = {}
    for key in FORM_KEYS:
        section, _, name = key.partition(".")
        value = raw.get(section, {}).get(name) if isinstance(raw, dict) and isinstance(raw.get(section), dict) \
            else None
        if value is not None:
            out[key] = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
            out[key] = out[key].removesuffix("\n...").strip()
    return out


def read_request_yaml(settings: UiSettings, body: dict[str, Any]) -> tuple[str, str, Path | None]:
    """(YAML text, file name shown in messages, the recipe's path or None) of a request."""
    recipe = body.get("recipe")
    if recipe:
        if recipe not in recipe_names(settings):
            raise LaunchProblems([f"recipe {recipe!r} is not in {settings.shown(settings.recipes_dir)}; choose one "
                                  f"of: {', '.join(recipe_names(settings)) or '(none)'}"])
        path = settings.recipes_dir / recipe
        return path.read_text(encoding="utf-8-sig"), settings.shown(path), path
    text = body.get("yaml")
    if not isinstance(text, str) or not text.strip():
        raise LaunchProblems(["no config: pick a recipe or upload a YAML file"])
    name = UPLOAD_NAME.sub("_", Path(str(body.get("filename") or "upload.yaml")).name) or "upload.yaml"
    return text, name, None


def check_launch(settings: UiSettings, body: dict[str, Any], taken: set[str]) -> LaunchPlan:
    """The plan of a launch request, or LaunchProblems with every problem found. `taken`: the names of runs
    this page is running."""
    problems: list[str] = []
    name = body.get("name")
    if (bad := check_run_name(name)) is not None:
        problems.append(bad)
    text, shown, recipe = read_request_yaml(settings, body)
    fields = {k: str(v) for k, v in (body.get("fields") or {}).items() if k in FORM_KEYS and str(v).strip() != ""}
    overrides = [f"--{k}={v}" for k, v in fields.items()]
    out_dir = settings.runs_dir / str(name)
    if bad is None:
        problems += _out_dir_problems(settings, str(name), out_dir, taken)
        overrides.append(f"--run.out_dir={settings.shown(out_dir)}")
    problems += _path_problems(settings, text, fields, recipe.parent if recipe else None)
    config = None
    with tempfile.TemporaryDirectory(prefix="lorakit-ui-") as tmp:
        path = recipe if recipe is not None else Path(tmp) / shown
        if recipe is None:
            path.write_text(text, encoding="utf-8")
        try:
            from lorakit.train.config import load_train_config

            config = load_train_config(path, overrides)
        except ConfigError as e:
            problems += [p.replace(f"{tmp}/", "") for p in e.problems]
    if config is not None and not problems:
        problems += _preflight_problems(config)
    if problems or config is None:
        raise LaunchProblems(problems)
    return LaunchPlan(str(name), out_dir, config, overrides, recipe=recipe,
                      upload_name=None if recipe else shown, upload_text=None if recipe else text, fields=fields)


def _preflight_problems(config: TrainConfig) -> list[str]:
    """What `lorakit train` would refuse before loading the model: missing data files, an unwritable out_dir."""
    from lorakit.errors import LorakitError
    from lorakit.train.preflight import check_data_files, check_output_dir

    problems = []
    checks: list[Callable[[], None]] = [lambda: check_data_files(config.data),
                                        lambda: check_output_dir(config.run.out_dir)]
    for check in checks:
        try:
            check()
        except LorakitError as e:
            problems.append(str(e))
    return problems


def _out_dir_problems(settings: UiSettings, name: str, out_dir: Path, taken: set[str]) -> list[str]:
    shown = settings.shown(out_dir)
    if name in taken:
        return [f"run {name!r} is running into {shown}; two runs cannot share an output directory: choose another "
                "run name"]
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        return [f"{shown} already holds a run; choose another run name (or resume that run from its page)"]
    return []


def _path_problems(settings: UiSettings, text: str, fields: dict[str, str], beside: Path | None) -> list[str]:
    """Data, teacher and local model paths outside the directories the page may read. Read from the YAML with the
    safe loader and the form's values; a YAML that does not parse is reported by the config's own check."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError:
        raw = None
    values: dict[str, Any] = {}
    if isinstance(raw, dict):
        for key in (*PATH_KEYS, "model.name"):
            section, _, name = key.partition(".")
            if isinstance(raw.get(section), dict):
                values[key] = raw[section].get(name)
    values.update({k: v for k, v in fields.items() if k in (*PATH_KEYS, "model.name")})
    problems = []
    for key, value in values.items():
        if not isinstance(value, str) or not value.strip() or value.startswith("hf:"):
            continue
        if key == "model.name" and not (value.startswith(("/", "~", ".")) or settings.resolve(value).exists()
                                        or (beside is not None and (beside / value).exists())):
            continue  # a bundled name or a hub id
        head, brace, _ = value.rpartition("{")  # a parallel `PREFIX.{SRC,TGT}`: its directory
        probe = str(Path(head).parent) if brace else value
        if (bad := check_path(settings, key, probe, beside=beside)) is not None:
            problems.append(bad.replace(repr(probe), repr(value), 1))
    return problems
