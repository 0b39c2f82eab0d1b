"""The sweep's grid: which config keys take several values, and the points of their product.

A flag `--section.key=v1,v2,...` lists the values of one key, separated by commas outside brackets, braces and
quotes; each value is read as `lorakit train --section.key=VALUE` reads it. A flag with one value is a fixed
override that every point shares. A key whose values are lists (lora.targets, data.labels, ...) writes each
point's list in brackets: `--lora.targets=[query,value],[query,key,value]` is two points;
`--lora.targets=query,value` is refused as ambiguous (one point with both, or two points?). A mapping is written
in braces: `--data.columns={text: a},{text: b}`.

    axes, fixed = parse_grid(["--lora.rank=1,2,4", "--optim.lr=1e-3"])
    points = expand(axes)   # lora.rank=1, lora.rank=2, lora.rank=4
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import re
import types
import typing
from dataclasses import dataclass
from typing import Any

import yaml

from lorakit.errors import ConfigError, did_you_mean
from lorakit.train.sections import SECTION_TYPES

# Keys the sweep sets itself: each point's run directory lies under the sweep's directory.
FIXED_BY_SWEEP = ("run.out_dir",)
_CLOSERS = {"[": "]", "{": "}", "(": ")"}
_MAX_DIR_NAME = 120


@dataclass(frozen=True)
class Axis:
    """One swept key and its values as written on the command line (e.g. `lora.rank`, ("1", "2", "4"))."""

    key: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class GridPoint:
    """One combination: a value (as written) for each axis, in the order the axes were given."""

    settings: tuple[tuple[str, str], ...]

    @property
    def name(self) -> str:
        """`lora.rank=4 lora.alpha=8`: how progress, errors and tables name the point."""
        return " ".join(f"{key}={value}" for key, value in self.settings)

    @property
    def overrides(self) -> list[str]:
        """The point's `--section.key=value` flags, as `lorakit train` takes them."""
        return [f"--{key}={value}" for key, value in self.settings]


def parse_grid(overrides: list[str]) -> tuple[list[Axis], list[str]]:
    """Split sweep flags into axes (keys with several values) and fixed overrides (one value), in their order.

    Raises ConfigError listing every problem at once: a malformed flag, a key given twice or unknown, an empty
    value list, an empty or repeated value, unbalanced brackets, a list key whose values are not each
    in brackets, brackets around the values of a key that takes one value, a key the sweep sets itself, or no key
    with several values."""
    axes: list[Axis] = []
    fixed: list[str] = []
    problems: list[str] = []
    seen: set[str] = set()
    for item in overrides:
        key, sep, text = item.removeprefix("--").partition("=")
        flag = f"--{key}={text}"
        if not sep or "." not in key or not all(key.split(".")):
            problems.append(f"override {item!r} must look like --section.key=value (e.g. --lora.rank=4,8)")
            continue
        if key in seen:
            problems.append(f"{key} is given twice; list all of its values in one flag, e.g. --{key}=A,B")
            continue
        seen.add(key)
        values, problem = split_values(text)
        hint = None
        if problem is None:
            hint, problem = key_type(key)
        if problem is None:
            problem = _values_problem(key, text, values, hint)
        if problem is not None:
            problems.append(f"{flag}: {problem}")
        elif len(values) == 1:
            fixed.append(flag)
        else:
            axes.append(Axis(key, tuple(values)))
    if not problems and not axes:
        problems.append("nothing to sweep: no key lists several values; give at least one, e.g. --lora.rank=4,8,16 "
                        "(lorakit train runs a single configuration)")
    if problems:
        raise ConfigError(problems)
    return axes, fixed


def expand(axes: list[Axis]) -> list[GridPoint]:
    """Every combination of the axes' values; the first axis changes slowest."""
    return [GridPoint(tuple(zip((a.key for a in axes), combo, strict=True)))
            for combo in itertools.product(*(a.values for a in axes))]


def split_values(text: str) -> tuple[list[str], str | None]:
    """`text` cut at the commas outside brackets, braces, parentheses and quotes, each piece stripped; or the
    problem (unbalanced brackets or quotes)."""
    pieces, depth, quote, start = [], [], "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in _CLOSERS:
            depth.append(_CLOSERS[ch])
        elif ch in _CLOSERS.values():
            if not depth or depth.pop() != ch:
                return [], f"unbalanced {ch!r} at character {i + 1}"
        elif ch == "," and not depth:
            pieces.append(text[start:i].strip())
            start = i + 1
    if quote or depth:
        return [], f"unclosed {quote or 'bracket'} (expected {quote or depth[-1]!r} before the end)"
    return pieces + [text[start:].strip()], None


def key_type(key: str) -> tuple[Any, str | None]:
    """The type hint of dotted config key `key` (`section.key`, or `section.key.entry` of a mapping), or the
    problem naming the known sections or keys."""
    section, _, rest = key.partition(".")
    name, _, entry = rest.partition(".")
    if section not in SECTION_TYPES:
        return None, (f"unknown section {section!r}{did_you_mean(section, SECTION_TYPES)}; sections: "
                      f"{', '.join(SECTION_TYPES)}")
    cls = SECTION_TYPES[section]
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    if name not in known:
        return None, f"unknown key {section}.{name}{did_you_mean(name, known)}; known keys: {', '.join(known)}"
    hint = hints[name]
    if not entry:
        return hint, None
    if _container(hint) != "{":
        return None, f"{section}.{name} is not a mapping, so {key} names no entry of it"
    return typing.get_args(_strip_optional(hint))[1], None


def _values_problem(key: str, text: str, values: list[str], hint: Any) -> str | None:
    if key in FIXED_BY_SWEEP:
        return f"{key} is set by the sweep (each point runs in its own directory under the sweep's); use --out DIR"
    if text.strip() == "":
        return f"the list of values is empty; write the values to sweep, separated by commas, e.g. --{key}=A,B"
    empty = [i for i, v in enumerate(values, 1) if not v]
    if empty:
        return f"value {empty[0]} of the list is empty; remove the extra comma"
    opener = _container(hint)
    if opener is None and values[0].startswith("[") and len(values) == 1:
        return (f"{key} takes one value per point, not a list; write the values to sweep without brackets, "
                f"e.g. --{key}={values[0][1:-1]}")
    # `a,b` of a list key could be one list or two points; a mapping's commas are always inside its braces.
    if opener == "[" and len(values) > 1:
        bare = [v for v in values if not v.startswith("[") and v not in ("null", "~")]
        if bare:
            return (f"ambiguous: {key} takes a list, so write each point's list in brackets ({bare[0]!r} is not), "
                    f"e.g. --{key}=[query,value],[query,key,value] for two points")
    parsed = [_parsed(v) for v in values]
    for i, value in enumerate(parsed):
        if value in parsed[:i]:
            first = values[parsed.index(value)]
            same = "" if first == values[i] else f" (as {first!r})"
            return f"{values[i]!r} is listed twice{same}; list each value once"
    return None


def _parsed(text: str) -> str:
    """A value as `lorakit train` reads it, for comparing values (`4` and `4.0` stay distinct: int and float)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    return f"{type(value).__name__}:{value!r}"


def _strip_optional(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def _container(hint: Any) -> str | None:
    """"[" for a list-valued key, "{" for a mapping, None for a key that takes one value."""
    origin = typing.get_origin(_strip_optional(hint))
    return "[" if origin is list else "{" if origin is dict else None


def dir_name(point: GridPoint) -> str:
    """A directory name for the point: `lora.rank=4,lora.targets=query+value`. List (or mapping) items are joined
    with `+` (`empty` for `[]` or `{}`), anything outside letters, digits and `._=+,-` becomes `_`; an overlong name
    is cut and given a hash."""
    parts = []
    for key, text in point.settings:
        value = text
        if text[:1] + text[-1:] in ("[]", "{}"):
            value = "+".join(v.strip().strip("'\"") for v in split_values(text[1:-1])[0]) or "empty"
        parts.append(f"{key}={value}")
    name = re.sub(r"[^A-Za-z0-9._=+,-]+", "_", ",".join(parts)).strip("_") or "point"
    if len(name) > _MAX_DIR_NAME:
        digest = hashlib.sha256(point.name.encode()).hexdigest()[:8]
        name = f"{name[:_MAX_DIR_NAME - 9]}-{digest}"
    return name
