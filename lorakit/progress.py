"""Progress bars where a user waits (evaluation passes, generation, the first SmolLM2 conversion).

They are drawn on stderr, and only when stderr is a terminal: piped output, logs and tests stay clean. Set
`LORAKIT_PROGRESS=0` to turn them off everywhere, `=1` to draw them even without a terminal.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def _disabled() -> bool | None:
    """tqdm's `disable`: None means "only on a terminal"."""
    setting = os.environ.get("LORAKIT_PROGRESS")
    if setting == "0":
        return True
    if setting == "1":
        return False
    return None


def progress(items: Iterable[T], *, desc: str, total: int | None = None, unit: str = "batch") -> Iterator[T]:
    """`items`, with a progress bar named `desc` while they are consumed."""
    from tqdm.auto import tqdm

    yield from tqdm(items, desc=desc, total=total, unit=unit, disable=_disabled(), leave=False, dynamic_ncols=True)


def stage(desc: str, steps: int) -> Any:
    """A bar for a job of a few long steps (`with stage("converting", 3) as bar: ...; bar.update()`)."""
    from tqdm.auto import tqdm

    return tqdm(total=steps, desc=desc, unit="step", disable=_disabled(), leave=False, dynamic_ncols=True)
