"""Training configuration: dataclasses hold every default; YAML and `--section.key=value` flags only override.

`load_train_config` reports every problem at once (unknown sections or keys, wrong types, bad values), each
naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorakit.config import LoraConfig
from lorakit.errors import ConfigError, did_you_mean


@dataclass
class ModelSection:
    """name: `smollm2`, `minilm`, a local directory or a hub id. dtype: float32, bfloat16 or float16."""

    name: str = "smollm2"
    dtype: str = "float32"


@dataclass
class DataSection:
    """task: `classification`, `instruction`, `ner` or `qa`. format: one of `lorakit.train.data.FORMATS` (default:
    from the file's suffix), e.g. `conll`, `squad`, or `parallel` for translation pairs as instructions. columns maps
    a task field (text, text_pair, label, instruction, input, output, tokens, tags) to a column of the data file.
    eval_fraction holds out that share of `train` when there is no `eval` file. train_articles / eval_articles:
    `[start, stop)` article indices to take from a `squad` file (a split by article: no context on both sides)."""

    task: str = "instruction"
    train: str = ""
    eval: str | None = None
    format: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    max_length: int = 256
    train_limit: int | None = None
    eval_limit: int | None = None
    eval_fraction: float = 0.0
    labels: list[str] | None = None
    train_articles: list[int] | None = None
    eval_articles: list[int] | None = None


@dataclass
class OptimSection:
    """AdamW; lr of the B factors is lr x lora_plus_ratio (LoRA+, Hayou et al. 2024, §3: ratio ~16 for B).
    Linear warm-up for warmup_steps, then cosine, linear or constant. Steps are optimizer steps; max_steps
    overrides epochs."""

    lr: float = 2e-4
    lora_plus_ratio: float = 1.0
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 16
    grad_accum: int = 1
    clip_norm: float | None = 1.0


@dataclass
class RunSection:
    """method: what trains: `lora` (the adapter, plus any new task head), `head-only` (the task head alone) or
    `full` (every parameter; the baseline LoRA is measured against).
    eval_every / save_every: in optimizer steps (0: only at the end). keep_last: checkpoints kept besides the
    best. early_stopping: evaluations without improvement before stopping (None: never)."""

    out_dir: str = "runs/default"
    seed: int = 0
    eval_every: int = 0
    save_every: int = 0
    keep_last: int = 2
    early_stopping: int | None = None
    log_every: int = 10
    eval_batch_size: int = 32
    group_by_length: bool = True
    method: str = "lora"
    activation_checkpointing: bool = False
    mixed_precision: str = "no"
    device: str = "auto"


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(TrainConfig)}  # type: ignore[misc]
_SECTION_TYPES = {"model": ModelSection, "data": DataSection, "lora": LoraConfig, "optim": OptimSection,
                  "run": RunSection}
_CHOICES = {
    ("model", "dtype"): ("float32", "bfloat16", "float16"),
    ("data", "task"): ("classification", "instruction", "ner", "qa"),
    ("optim", "schedule"): ("cosine", "linear", "constant"),
    ("run", "mixed_precision"): ("no", "bf16", "fp16"),
    ("run", "device"): ("auto", "cpu", "cuda"),
    ("run", "method"): ("lora", "head-only", "full"),
}


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML file (optional) and apply `section.key=value` overrides; raises `ConfigError` listing all
    problems."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    for item in overrides or []:
        _apply_override(raw, item)
    return build_train_config(raw, source=str(path) if path else "flags")


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError([f"config file {str(path)!r} does not exist"])
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError([f"{path} is not valid YAML{where}: {getattr(e, 'problem', e)}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path} must hold a mapping of sections ({', '.join(_SECTION_TYPES)})"])
    return data


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.removeprefix("--").partition("=")
    if not sep or "." not in key:
        raise ConfigError([f"override {item!r} must look like section.key=value (e.g. optim.lr=1e-4)"])
    section, _, name = key.partition(".")
    value = yaml.safe_load(text) if text != "" else ""
    if not isinstance(raw.get(section, {}), dict):
        raise ConfigError([f"section {section!r} must be a mapping"])
    raw.setdefault(section, {})[name] = value


def build_train_config(raw: dict[str, Any], source: str = "config") -> TrainConfig:
    problems: list[str] = []
    sections: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in _SECTION_TYPES:
            problems.append(f"{source}: unknown section {name!r}{did_you_mean(name, _SECTION_TYPES)}; "
                            f"sections: {', '.join(_SECTION_TYPES)}")
        elif not isinstance(value, dict):
            problems.append(f"{source}: section {name!r} must be a mapping, got {type(value).__name__}")
    for name, cls in _SECTION_TYPES.items():
        values = raw.get(name) if isinstance(raw.get(name), dict) else {}
        built, section_problems = _build_section(name, cls, values or {})
        problems += [f"{source}: {p}" for p in section_problems]
        sections[name] = built
    if problems:
        raise ConfigError(problems)
    config = TrainConfig(**sections)
    problems = [f"{source}: {p}" for p in _value_problems(config)]
    if problems:
        raise ConfigError(problems)
    return config


def _build_section(section: str, cls: type, values: dict[str, Any]) -> tuple[Any, list[str]]:
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    problems, kwargs = [], {}
    for key, value in values.items():
        if key not in hints:
            problems.append(f"unknown key {section}.{key}{did_you_mean(key, known)}; "
                            f"known keys: {', '.join(known)}")
            continue
        coerced, ok = _coerce(value, hints[key])
        if not ok:
            problems.append(f"{section}.{key} must be {_describe(hints[key])}, got {value!r}")
            continue
        choices = _CHOICES.get((section, key))
        if choices and coerced not in choices:
            problems.append(f"{section}.{key} must be one of {', '.join(choices)}, got {coerced!r}"
                            f"{did_you_mean(str(coerced), choices)}")
            continue
        kwargs[key] = coerced
    if problems:
        return None, problems
    try:
        return cls(**kwargs), []
    except ConfigError as e:
        return None, [f"{section}: {p}" for p in e.problems]


def _coerce(value: Any, hint: Any) -> tuple[Any, bool]:
    """Check `value` against a type hint; ints pass as floats and numeric strings like '1e-4' (which YAML reads
    as strings) as floats."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None, True
        for arg in args:
            if arg is type(None):
                continue
            coerced, ok = _coerce(value, arg)
            if ok:
                return coerced, True
        return value, False
    if hint is bool:
        return value, isinstance(value, bool)
    if hint is int:
        return value, isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value), True
        if isinstance(value, str):
            try:
                return float(value), True
            except ValueError:
                return value, False
        return value, False
    if hint is str:
        return value, isinstance(value, str)
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            return value, False
        items = [_coerce(v, item) for v in value]
        return [v for v, _ in items], all(ok for _, ok in items)
    if origin is dict:
        key_type, value_type = typing.get_args(hint)
        if not isinstance(value, dict):
            return value, False
        entries = {k: _coerce(v, value_type) for k, v in value.items()}
        return {k: v for k, (v, _) in entries.items()}, all(ok for _, ok in entries.values()) and all(
            isinstance(k, str) for k in value)
    return value, True


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    if origin is dict:
        return f"a mapping to {_describe(typing.get_args(hint)[1])}"
    return {bool: "true or false", int: "an int", float: "a number", str: "a string"}.get(hint, str(hint))


def _value_problems(config: TrainConfig) -> list[str]:
    out = []
    o, r, d = config.optim, config.run, config.data
    positive = [("optim.lr", o.lr), ("optim.batch_size", o.batch_size), ("optim.grad_accum", o.grad_accum),
                ("optim.epochs", o.epochs), ("optim.lora_plus_ratio", o.lora_plus_ratio),
                ("data.max_length", d.max_length), ("run.eval_batch_size", r.eval_batch_size),
                ("run.log_every", r.log_every)]
    out += [f"{k} must be > 0, got {v!r}" for k, v in positive if v <= 0]
    non_negative = [("optim.warmup_steps", o.warmup_steps), ("optim.weight_decay", o.weight_decay),
                    ("run.eval_every", r.eval_every), ("run.save_every", r.save_every)]
    out += [f"{k} must be >= 0, got {v!r}" for k, v in non_negative if v < 0]
    if o.max_steps is not None and o.max_steps <= 0:
        out.append(f"optim.max_steps must be > 0 or null, got {o.max_steps!r}")
    if o.clip_norm is not None and o.clip_norm <= 0:
        out.append(f"optim.clip_norm must be > 0 or null, got {o.clip_norm!r}")
    if not 0.0 <= d.eval_fraction < 1.0:
        out.append(f"data.eval_fraction must be in [0, 1), got {d.eval_fraction!r}")
    if r.keep_last < 1:
        out.append(f"run.keep_last must be >= 1 (the newest checkpoint is what --resume needs), got {r.keep_last}")
    if r.method == "head-only" and d.task == "instruction":
        out.append(f"run.method=head-only needs a task with a head (classification, ner, qa), got "
                   f"data.task={d.task!r}")
    out += _article_problems(d)
    if not d.train:
        out.append("data.train must name a data file or dataset")
    if r.early_stopping is not None and r.early_stopping <= 0:
        out.append(f"run.early_stopping must be > 0 or null, got {r.early_stopping!r}")
    return out


def _article_problems(d: DataSection) -> list[str]:
    out = []
    sides = (("train_articles", d.train_articles, d.train), ("eval_articles", d.eval_articles, d.eval))
    for key, value, path in sides:
        if value is None:
            continue
        if len(value) != 2 or not 0 <= value[0] < value[1]:
            out.append(f"data.{key} must be [start, stop] with 0 <= start < stop, got {value!r}")
        if d.format != "squad":
            out.append(f"data.{key} needs data.format=squad, got data.format={d.format!r}")
        if not path:
            out.append(f"data.{key} needs data.{key.partition('_')[0]} to name the squad file")
    return out
