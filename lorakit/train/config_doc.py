"""The listing of every training-config key, generated from the dataclasses: `lorakit train --help-config` prints
`config_help()`, and docs/config.md is `config_markdown()` (a test checks that the page is current).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import textwrap
import typing

from lorakit.train.config import describe_type
from lorakit.train.sections import BOUNDS, CHOICES, SECTION_TYPES


def config_help() -> str:
    """Every section and key of a training config: its type, default, allowed values and what it does, taken
    from the dataclasses (their types and defaults, `CHOICES`, `BOUNDS` and their docstrings' `key: text`
    lines). What `lorakit train --help-config` prints and docs/config.md holds."""
    out: list[str] = []
    for section, cls in SECTION_TYPES.items():
        summary, docs = key_docs(cls)
        out += textwrap.wrap(f"{section}: {summary}", 114, subsequent_indent=" " * 4)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            dotted = f"{section}.{f.name}"
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc,operator]
            facts = [describe_type(hints[f.name]), f"default {json.dumps(default)}"]
            if dotted in CHOICES:
                facts.append(f"one of {', '.join(CHOICES[dotted])}")
            elif dotted in BOUNDS:
                facts.append(BOUNDS[dotted][0])
            out.append(f"  {dotted} ({'; '.join(facts)})")
            out += textwrap.wrap(docs.get(f.name, ""), 110, initial_indent=" " * 6, subsequent_indent=" " * 6)
        out.append("")
    return "\n".join(out)


def config_markdown() -> str:
    """docs/config.md: `config_help()` in a Markdown page."""
    return ("# Training configuration\n\n"
            "Every key of a `lorakit train` YAML file (or `--section.key=value` flag), with its type, default,\n"
            "allowed values and meaning, generated from the dataclasses in `lorakit/train/sections.py` and\n"
            "`lorakit/config.py`; `lorakit train --help-config` prints the same. Regenerate with\n\n"
            "    python -c \"from lorakit.train.config_doc import config_markdown as m; print(m(), end='')\" "
            "> docs/config.md\n\n```\n" + config_help() + "```\n")


_DOC_ENTRY = re.compile(r"([a-z_][a-z0-9_]*(?:\s*[,/]\s*[a-z_][a-z0-9_]*)*):\s+(.*)")


def key_docs(cls: type) -> tuple[str, dict[str, str]]:
    """(the docstring's summary, key -> its explanation) from `key: text` lines (also `a, b: text` and
    `a / b: text`) of a dataclass's docstring; indented lines continue an entry, a blank line ends it."""
    summary: list[str] = []
    docs: dict[str, str] = {}
    current: list[str] = []
    for line in inspect.cleandoc(cls.__doc__ or "").splitlines():
        match = _DOC_ENTRY.fullmatch(line)
        if match:
            current = [name.strip() for name in re.split(r"[,/]", match.group(1))]
            docs.update(dict.fromkeys(current, match.group(2).strip()))
        elif not line.strip():
            current = []
        elif current:
            for name in current:
                docs[name] += " " + line.strip()
        elif not docs:
            summary.append(line.strip())
    return " ".join(summary), docs
