"""`lora.rank_pattern` given as a file: a YAML mapping of module names to ranks, or to `{rank: R, alpha: A}`
(`lorakit allocate` writes one), read into the config's rank_pattern and alpha_pattern."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from lorakit.errors import did_you_mean
from lorakit.train.yaml_loader import ConfigLoader, Problem


def read_rank_pattern_file(raw: dict[str, Any], base: Path | None, where: dict[str, str]) -> list[Problem]:
    """lora.rank_pattern given as a path: replaced by the YAML mapping of module names to ranks the file holds
    (what `lorakit allocate` writes). An entry may also be `{rank: R, alpha: A}`: R goes to lora.rank_pattern and A
    to lora.alpha_pattern, after the config's own alpha_pattern entries (the first matching pattern wins, so the
    config's come first). A relative path set in the YAML config is looked up from the working directory first,
    then from the config's directory `base` (as data paths are); a flag's from the working directory only. A file
    that is missing, unreadable or not such a mapping, and each bad entry, is a problem naming the key."""
    lora = raw.get("lora")
    value = lora.get("rank_pattern") if isinstance(lora, dict) else None
    if not isinstance(value, str) or not isinstance(lora, dict):
        return []
    key, file = "lora.rank_pattern", Path(value).expanduser()
    if base is not None and not where.get(key, "").startswith("flag ") and not file.is_absolute() \
            and not file.exists() and (base / file).exists():
        file = base / file
    del lora["rank_pattern"]  # on any problem below the default stands, so it is reported once
    hint = "give a YAML file mapping module names to ranks (lorakit allocate writes one) or the mapping itself"
    if not file.is_file():
        return [(key, f"{key} file {value!r} {'is a directory' if file.is_dir() else 'does not exist'}; {hint}")]
    loader: ConfigLoader | None = None
    try:
        loader = ConfigLoader(file.read_bytes().decode("utf-8-sig"))
        data = loader.get_single_data()
    except OSError as e:
        return [(key, f"cannot read {key} file {value!r}: {e.strerror or e}")]
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        return [(key, f"{key} file {value!r} is not UTF-8 YAML ({getattr(e, 'problem', None) or e}); {hint}")]
    finally:
        if loader is not None:
            loader.dispose()
    if not isinstance(data, dict):
        kind = "nothing" if data is None else f"a YAML {type(data).__name__}"
        return [(key, f"{key} file {value!r} holds {kind}, not a mapping of module names to ranks; {hint}")]
    problems: list[Problem] = [(key, f"{key} file {value!r} line {second}: duplicate module {name} (first at line "
                                     f"{first}); delete one") for name, first, second in loader.duplicates]
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    bad: list[str] = []
    for name, entry in data.items():
        if isinstance(name, str) and isinstance(entry, dict):
            rank, alpha, text = _pattern_entry(entry)
            if text:
                line = loader.key_lines.get(name)
                problems.append((key, f"{key} file {value!r} entry {name!r}{f' (line {line})' if line else ''}: "
                                      f"{text}"))
            elif rank is not None:
                ranks[name] = rank
                if alpha is not None:
                    alphas[name] = alpha
        elif isinstance(name, str) and _positive_int(entry):
            ranks[name] = entry
        else:
            bad.append(f"{name!r}: {entry!r}")
    if bad:
        problems.append((key, f"{key} file {value!r}: ranks must be positive ints (or {{rank: R, alpha: A}}) keyed "
                              f"by module names; bad entries: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}"))
    if not problems:
        lora["rank_pattern"] = ranks
        own = lora.get("alpha_pattern")
        if alphas and isinstance(own, dict | None):  # a bad alpha_pattern is reported by the type check
            lora["alpha_pattern"] = {**(own or {}), **{k: a for k, a in alphas.items() if k not in (own or {})}}
    return problems


_ENTRY_KEYS = ("rank", "alpha")


def _pattern_entry(entry: dict[Any, Any]) -> tuple[int | None, float | None, str]:
    """A rank-pattern file's `{rank: R, alpha: A}` entry: (rank, alpha or None, problems; '' when none)."""
    problems = [f"unknown key {k!r}{did_you_mean(str(k), _ENTRY_KEYS)}" for k in entry if k not in _ENTRY_KEYS]
    rank, alpha = entry.get("rank"), entry.get("alpha")
    if "rank" not in entry:
        problems.append("no rank")
    elif not _positive_int(rank):
        problems.append(f"rank must be a positive int, got {rank!r}")
    if "alpha" in entry and (isinstance(alpha, bool) or not isinstance(alpha, int | float)
                             or not math.isfinite(alpha) or alpha <= 0):
        problems.append(f"alpha must be a positive number, got {alpha!r}")
    if problems:
        return None, None, "; ".join(problems) + "; write the entry as a rank or {rank: R, alpha: A}"
    return rank, None if alpha is None else float(alpha), ""


def _positive_int(value: Any) -> bool:
    return type(value) is int and value > 0
