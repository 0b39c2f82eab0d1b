"""The one error type lorakit raises for bad input, so callers can tell it from a bug."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LorakitError(ValueError):
    """Bad input: the message names the problem and, where there is one, the fix."""


class ConfigError(LorakitError):
    """A configuration with one or more problems; every problem is listed in the message."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


class MergeStateError(LorakitError):
    """An operation that needs the adapters merged (or unmerged) met the other state."""


def did_you_mean(word: str, choices: Iterable[str], n: int = 3) -> str:
    """`" (did you mean 'x'?)"` for the closest choices, or `""` when none is close."""
    close = difflib.get_close_matches(word, sorted(set(choices)), n=n, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"
