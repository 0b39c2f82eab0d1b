"""What the commands print: one strict JSON line, or a two-column table."""

from __future__ import annotations

import json
from typing import Any


def json_line(value: Any) -> str:
    """Strict JSON (a NaN or infinity becomes null: `NaN` is not JSON and breaks every reader of the line)."""
    from lorakit.train.evaluate import finite_metrics

    return json.dumps(finite_metrics(value) if isinstance(value, dict) else value, allow_nan=False)


def print_table(rows: list[tuple[str, str]]) -> None:
    """Two aligned columns on stdout."""
    width = max((len(k) for k, _ in rows), default=0)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
