"""Training configuration: dataclasses hold every default; YAML and `--section.key=value` flags only override.

`load_train_config` reports every problem in one `ConfigError`, from every phase at once (a YAML syntax error
aside, which stops the reading): duplicate YAML keys, unknown sections or keys, wrong types, NaN or infinite
numbers, values outside their range or choices, LoRA's own checks and contradictions between keys. Each problem
names where the key was set (the YAML file and line, or the flag), the key and what is allowed.

`lorakit.train.config_doc.config_help()` lists every key with its type, default, allowed values and meaning,
from these dataclasses (`lorakit train --help-config`, docs/config.md); `lorakit.train.preflight` holds the checks
that need the file system or the model, made before training starts.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from lorakit.errors import ConfigError, did_you_mean
from lorakit.factorized import is_factorized_dir
from lorakit.train.rank_pattern_file import read_rank_pattern_file
from lorakit.train.sections import BOUNDS, CHOICES, SECTION_TYPES, TrainConfig
from lorakit.train.yaml_loader import ConfigLoader, Problem


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML file (optional) and apply `section.key=value` overrides (`section.key.entry=value` sets one
    entry of a mapping such as data.columns). Relative data paths of the YAML file that exist only beside it are
    taken from there. `lora.rank_pattern` may be the path of a YAML file holding the mapping (`lorakit allocate`
    writes one). Raises `ConfigError` listing every problem, each with its file and line or flag."""
    raw: dict[str, Any] = {}
    where: dict[str, str] = {}
    problems: list[Problem] = []
    source = "flags"
    if path is not None:
        source = str(path)
        raw, lines, duplicates = _read_yaml(Path(path))
        where = {key: f"{path} line {line}" for key, line in lines.items()}
        problems += [(None, f"{path} line {second}: duplicate key {key} (first at line {first}); YAML keeps only "
                            f"the last value: delete one") for key, first, second in duplicates]
        _resolve_data_paths(raw, Path(path).parent)
    for item in overrides or []:
        problems += _apply_override(raw, item, where)
    problems += read_rank_pattern_file(raw, Path(path).parent if path is not None else None, where)
    return build_train_config(raw, source=source, where=where, problems=problems)


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, int], list[tuple[str, int, int]]]:
    """The YAML file's mapping, each dotted key's line and the duplicate keys; raises ConfigError for a file
    that is missing, unreadable, not UTF-8, not YAML, empty or not a mapping."""
    if path.is_dir():
        raise ConfigError([f"config file {path} is a directory; give the YAML file"])
    if not path.is_file():
        raise ConfigError([f"config file {str(path)!r} does not exist"])
    try:
        data = path.read_bytes()
        text = data.decode("utf-8-sig")
    except OSError as e:
        raise ConfigError([f"cannot read config file {path}: {e.strerror or e}"]) from None
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError([f"{path}: byte 0x{data[e.start]:02x} at byte offset {e.start} (line {line}) is not "
                           f"UTF-8; save the config as UTF-8"]) from None
    loader = ConfigLoader(text)
    try:
        value = loader.get_single_data()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError([f"{path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}"]) from None
    finally:
        loader.dispose()
    if value is None:
        raise ConfigError([f"{path} is empty; write the sections to set ({', '.join(SECTION_TYPES)}), at least "
                           f"data.train (lorakit train --help-config lists every key)"])
    if not isinstance(value, dict):
        kind = "list" if isinstance(value, list) else type(value).__name__
        raise ConfigError([f"{path} holds a YAML {kind}, not a mapping of sections; write `section:` lines "
                           f"({', '.join(SECTION_TYPES)}) with `key: value` lines under them"])
    return value, loader.key_lines, loader.duplicates


def _resolve_data_paths(raw: dict[str, Any], base: Path) -> None:
    """data.train / data.eval: a relative path that does not exist from the working directory but does from the
    YAML file's directory `base` is taken from there; an existing working-directory path wins."""
    data = raw.get("data")
    if not isinstance(data, dict) or base == Path("."):
        return
    for key in ("train", "eval"):
        value = data.get(key)
        if not isinstance(value, str) or not value or value.startswith("hf:"):
            continue
        probe = Path(_first_file(value)).expanduser()
        if not probe.is_absolute() and not probe.exists() and (base / probe).exists():
            data[key] = str(base / value)


def _first_file(value: str) -> str:
    """The source file of a `PREFIX.{SRC,TGT}` parallel spec, else `value`."""
    head, brace, rest = value.rpartition("{")
    if brace and rest.endswith("}"):
        return head + rest[:-1].split(",")[0].strip()
    return value


def _apply_override(raw: dict[str, Any], item: str, where: dict[str, str]) -> list[Problem]:
    key, sep, text = item.removeprefix("--").partition("=")
    if not sep or "." not in key or not all(key.split(".")):
        return [(None, f"override {item!r} must look like --section.key=value (e.g. --optim.lr=1e-4)")]
    section, _, name = key.partition(".")
    name, _, entry = name.partition(".")
    flag = f"flag --{key}={text}"
    where.setdefault(section, flag)
    where[f"{section}.{name}"] = flag
    try:
        value = yaml.load(text, Loader=ConfigLoader) if text != "" else ""
    except yaml.YAMLError:
        value = text  # not YAML: the type check names the key and the value
    if raw.get(section) is None:
        raw[section] = {}
    target = raw[section]
    if not isinstance(target, dict):
        return []  # reported once, as a section that is not a mapping
    if not entry:
        target[name] = value
    elif isinstance(target.setdefault(name, {}), dict):
        target[name][entry] = value
    else:
        return [(f"{section}.{name}", f"{section}.{name} is not a mapping, so {flag} cannot set an entry of it")]
    return []


# ---------------------------------------------------------------- building and checking


def build_train_config(raw: dict[str, Any], source: str = "config", *, where: dict[str, str] | None = None,
                       problems: list[Problem] | None = None) -> TrainConfig:
    """A TrainConfig from nested mappings (section -> key -> value). Every problem of every phase (and the
    `problems` found while reading) is raised at once as one ConfigError; `where` maps a dotted key (or a
    section) to where it was set, `source` names the rest."""
    found: list[Problem] = list(problems or [])
    if not isinstance(raw, dict):
        raise ConfigError([f"{source}: a config is a mapping of sections, got {type(raw).__name__}"])
    for name, value in raw.items():
        if name not in SECTION_TYPES:
            found.append((str(name), f"unknown section {name!r}{did_you_mean(str(name), SECTION_TYPES)}; "
                                     f"sections: {', '.join(SECTION_TYPES)}"))
        elif value is not None and not isinstance(value, dict):  # `optim:` with nothing under it is empty
            found.append((name, f"section {name!r} must be a mapping of keys, got {type(value).__name__} "
                                f"{value!r}"))
    sections: dict[str, Any] = {}
    for name, cls in SECTION_TYPES.items():
        values = raw.get(name)
        sections[name], section_problems = _build_section(name, cls, values if isinstance(values, dict) else {})
        found += section_problems
    config = TrainConfig(**sections)
    bad = {key for key, _ in found if key}
    found += [(keys[0], text) for keys, text in _cross_problems(config) if not bad.intersection(keys)]
    if found:
        where = where or {}
        texts = [text if key is None else f"{_location(key, where, source)}: {text}" for key, text in found]
        raise ConfigError([f"({i}) {text}" for i, text in enumerate(texts, 1)] if len(texts) > 1 else texts)
    return config


def _location(key: str, where: dict[str, str], source: str) -> str:
    return where.get(key) or where.get(key.partition(".")[0]) or source


def _build_section(section: str, cls: type, values: dict[str, Any]) -> tuple[Any, list[Problem]]:
    """The section built from its valid keys (a bad key keeps its default, so later checks still run), and the
    problems: unknown keys, types, NaN/inf, choices, bounds, then the dataclass's own validation (LoraConfig)."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    problems: list[Problem] = []
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{section}.{key}"
        problem = _key_problem(dotted, key, value, hints, known)
        if problem is not None:
            problems.append((dotted, problem))
        else:
            kwargs[key] = _coerce(value, hints[key])[0]
    try:
        return cls(**kwargs), problems
    except ConfigError as e:  # the section's own checks (LoraConfig): keep those not caused by a bad key
        bad = {key.partition(".")[2] for key, _ in problems if key}
        for text in e.problems:
            name = re.match(r"\w*", text).group()  # type: ignore[union-attr]
            if not any(re.search(rf"\b{re.escape(b)}\b", text) for b in bad):
                problems.append((f"{section}.{name}", f"{section}.{text}"))
        return cls(), problems


def _key_problem(dotted: str, key: str, value: Any, hints: dict[str, Any], known: list[str]) -> str | None:
    if key not in hints:
        return f"unknown key {dotted}{did_you_mean(str(key), known)}; known keys: {', '.join(known)}"
    coerced, ok = _coerce(value, hints[key])
    if not ok:
        return f"{dotted} must be {describe_type(hints[key])}, got {value!r}"
    if _non_finite(coerced):
        return f"{dotted} must be a finite number, got {value!r}"
    choices = CHOICES.get(dotted)
    if choices and coerced is not None and coerced not in choices:
        return f"{dotted} must be one of {', '.join(choices)}, got {coerced!r}{did_you_mean(str(coerced), choices)}"
    bound = BOUNDS.get(dotted)
    if bound and coerced is not None and not bound[1](coerced):
        return f"{dotted} must be {bound[0]}{' or null' if _optional(hints[key]) else ''}, got {coerced!r}"
    return None


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    if isinstance(value, list):
        return any(_non_finite(v) for v in value)
    return False


def _cross_problems(config: TrainConfig) -> list[tuple[tuple[str, ...], str]]:
    """Contradictions between keys, as (the keys involved, the first one's location; message)."""
    out: list[tuple[tuple[str, ...], str]] = []
    d, r = config.data, config.run
    if not d.train:
        out.append((("data.train",), "data.train must name a data file or dataset"))
    if d.task == "translation" and d.format not in (None, "parallel"):
        out.append((("data.format", "data.task"), f"data.task=translation reads parallel text: set "
                                                  f"data.format=parallel or leave it unset, got "
                                                  f"data.format={d.format!r}"))
    if d.format == "parallel" and d.task != "translation":
        out.append((("data.format", "data.task"), f"parallel text is translation: set data.task=translation, got "
                                                  f"data.task={d.task!r}"))
    if r.method == "head-only" and d.task in ("instruction", "translation"):
        out.append((("run.method", "data.task"), f"run.method=head-only needs a task with a head (classification, "
                                                 f"ner, qa), got data.task={d.task!r}"))
    if d.eval and d.eval_fraction > 0:
        out.append((("data.eval_fraction", "data.eval"), f"data.eval_fraction={d.eval_fraction} holds out part of "
                                                         f"train only when there is no data.eval, but data.eval is "
                                                         f"{d.eval!r}; remove one of them"))
    if d.labels is not None and d.task not in ("classification", "ner"):
        out.append((("data.labels", "data.task"), f"data.labels applies to classification and ner, not "
                                                  f"data.task={d.task!r}; remove it"))
    if r.parallel == "fsdp" and (r.method != "lora" or config.compress.enabled):
        out.append((("run.parallel", "run.method"), f"run.parallel=fsdp trains a LoRA adapter on an unfactorised base "
                                                    f"(run.method=lora, no compress), got run.method={r.method!r}"
                                                    f"{' with compress' if config.compress.enabled else ''}; "
                                                    "set run.parallel=ddp"))
    if r.fsdp_offload and r.parallel != "fsdp":
        out.append((("run.fsdp_offload", "run.parallel"), f"run.fsdp_offload offloads fsdp's shards, and run.parallel "
                                                          f"is {r.parallel!r}; set run.parallel=fsdp or remove it"))
    m = config.model
    if m.quantize_init != "qlora" and (m.quantize is None or r.method != "lora"):
        out.append((("model.quantize_init", "model.quantize"), f"model.quantize_init={m.quantize_init} initialises "
                                                               "LoRA on a quantized base: set model.quantize (nf4 or "
                                                               "int8) and run.method=lora, or remove it"))
    if m.quantize is not None and (r.method in ("full", "factors") or r.parallel == "fsdp" or config.compress.enabled):
        what = "run.parallel=fsdp" if r.parallel == "fsdp" else (
            "compress" if config.compress.enabled else f"run.method={r.method}")
        out.append((("model.quantize", "run.method"), f"model.quantize={m.quantize} freezes the base in "
                                                      f"{m.quantize}, which {what} would have to change or shard; "
                                                      "use run.method=lora (or head-only) without compress or fsdp, "
                                                      "or remove model.quantize"))
    if m.quantize_svd_iters is not None and m.quantize_init == "qlora":
        out.append((("model.quantize_svd_iters", "model.quantize_init"), "model.quantize_svd_iters sets the SVD of "
                                                                         "quantize_init qpissa or loftq, and "
                                                                         "model.quantize_init is qlora; set it to "
                                                                         "qpissa or loftq, or remove it"))
    if m.loftq_iters < 1:
        out.append((("model.loftq_iters",), f"model.loftq_iters must be >= 1, got {m.loftq_iters}"))
    out += _compress_problems(config)
    out += _distill_problems(config)
    sides = (("train_articles", d.train_articles, d.train), ("eval_articles", d.eval_articles, d.eval))
    for key, value, path in sides:
        if value is None:
            continue
        keys = (f"data.{key}", "data.format", f"data.{key.partition('_')[0]}")
        if len(value) != 2 or not 0 <= value[0] < value[1]:
            out.append((keys[:1], f"data.{key} must be [start, stop] with 0 <= start < stop, got {value!r}"))
        if d.format != "squad":
            out.append((keys[:2], f"data.{key} needs data.format=squad, got data.format={d.format!r}"))
        if not path:
            out.append((keys[::2], f"data.{key} needs data.{key.partition('_')[0]} to name the squad file"))
    return out


def _compress_problems(config: TrainConfig) -> list[tuple[tuple[str, ...], str]]:
    """The compress section against itself and run.method."""
    c, method = config.compress, config.run.method
    given = [f"compress.{n}" for n in ("ratio", "energy", "rank") if getattr(c, n) is not None]
    out: list[tuple[tuple[str, ...], str]] = []
    if len(given) > 1:
        out.append((tuple(given), f"{' and '.join(given)} are set; set at most one of compress.ratio, "
                                  "compress.energy and compress.rank"))
    if not given and method == "factors" and not is_factorized_dir(config.model.name):
        out.append((("run.method",), "run.method=factors trains the factors of a factorised model; set one of "
                                     "compress.ratio, compress.energy and compress.rank, or set model.name to a "
                                     "factorised model directory (lorakit factorize), or choose another run.method"))
    return out


# The training tasks a teacher can teach: their logits are a label's (classification) or a token's (causal LM).
DISTILL_TASKS = ("classification", "instruction", "translation")


def _distill_problems(config: TrainConfig) -> list[tuple[tuple[str, ...], str]]:
    """The distill section against itself and data.task."""
    k, task = config.distill, config.data.task
    out: list[tuple[tuple[str, ...], str]] = []
    if k.teacher_adapter is not None and not k.teacher:
        out.append((("distill.teacher_adapter", "distill.teacher"), "distill.teacher_adapter is applied on "
                                                                     "distill.teacher, which is not set; set the "
                                                                     "teacher's base model as distill.teacher"))
    if k.enabled and task not in DISTILL_TASKS:
        out.append((("distill.teacher", "data.task"), f"distillation supports data.task "
                                                      f"{', '.join(DISTILL_TASKS)}, got data.task={task!r}; unset "
                                                      "distill.teacher"))
    return out


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
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            return value, False
        try:
            return float(value), True
        except (ValueError, OverflowError):
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
        _, value_type = typing.get_args(hint)
        if not isinstance(value, dict):
            return value, False
        entries = {k: _coerce(v, value_type) for k, v in value.items()}
        return {k: v for k, (v, _) in entries.items()}, all(ok for _, ok in entries.values()) and all(
            isinstance(k, str) for k in value)
    return value, True


def _optional(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


_NAMES = {bool: ("true or false", "booleans"), int: ("an int", "ints"), float: ("a number", "numbers"),
          str: ("a string", "strings")}


def describe_type(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is list:
        return f"a list of {_NAMES[typing.get_args(hint)[0]][1]}"
    if origin is dict:
        return f"a mapping of strings to {_NAMES[typing.get_args(hint)[1]][1]}"
    return _NAMES[hint][0] if hint in _NAMES else str(hint)
