"""The adapters `combine` reads, and every check on them, made before anything is computed or written.

Adapters combine when they were trained on the same base (the recorded base model name, the factorised layout and,
for the same targets, the `lorakit_fingerprint`; for the modules they share, the same ΔW shapes), adapt the same
linear modules (or the caller says how to treat the others: `targets="union"` counts a module an adapter lacks as
ΔW = 0, `targets="intersection"` keeps only the modules all adapt), are not principal (PiSSA) adapters, and hold the
same values in every other tensor (modules_to_save such as a classifier head, trained biases, embedding adapters).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lorakit.compress.prune import factor_keys
from lorakit.config import LoraConfig
from lorakit.dora import refuse_dora_adapter
from lorakit.errors import LorakitError
from lorakit.io import FACTORIZATION_KEY, read_adapter
from lorakit.peft_format import CONFIG_NAME, config_from_peft

METHODS = ("linear", "cat", "ties", "dare")
TARGET_CHOICES = ("same", "union", "intersection")


@dataclass
class Source:
    """One input adapter: its name in the combination, weight, files and linear modules (module -> (A key, B key))."""

    name: str
    path: Path
    weight: float
    raw: dict[str, Any]
    config: LoraConfig
    tensors: dict[str, Tensor]
    metadata: dict[str, str]
    pairs: dict[str, tuple[str, str]]

    def shape(self, module: str) -> tuple[int, int]:
        """(out, in) of the module's ΔW."""
        ka, kb = self.pairs[module]
        return int(self.tensors[kb].shape[0]), int(self.tensors[ka].shape[1])

    def factors(self, module: str) -> tuple[Tensor, Tensor]:
        """(w·s·B (out, r), A (r, in)) in float64: the weighted ΔW of the module is their product."""
        ka, kb = self.pairs[module]
        left = self.weight * self.config.scaling_for(module) * self.tensors[kb].double()
        return left, self.tensors[ka].double()

    @property
    def base(self) -> str:
        return str(self.raw.get("base_model_name_or_path") or self.metadata.get("lorakit_base_model") or "")


def check_combine_args(adapters: dict[str, tuple[str | Path, float]], method: str, *, rank: int | None,
                       density: float | None, rate: float | None, targets: str) -> None:
    """Raise LorakitError for an empty combination, a weight that is not a finite number, an unknown method or
    targets choice, a rank that is not an int >= 1 (or any rank for `cat`), and a density (TIES, in (0, 1]) or
    rate (DARE, in [0, 1)) that is out of range or given to another method."""
    if not adapters:
        raise LorakitError("combine needs at least one adapter: pass {name: (adapter_dir, weight), ...}")
    for name, entry in adapters.items():
        if not (isinstance(entry, tuple) and len(entry) == 2):
            raise LorakitError(f"adapter {name!r}: expected (adapter_dir, weight), got {entry!r}")
        weight = entry[1]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise LorakitError(f"weight of adapter {name!r} must be a finite number (negative subtracts), got "
                               f"{weight!r}")
    if method not in METHODS:
        raise LorakitError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if targets not in TARGET_CHOICES:
        raise LorakitError(f"targets must be one of {', '.join(TARGET_CHOICES)}, got {targets!r}")
    if rank is not None and (type(rank) is not int or rank < 1):
        raise LorakitError(f"rank must be an int >= 1, got {rank!r}")
    if rank is not None and method == "cat":
        raise LorakitError("method 'cat' is exact and its rank is the sum of the adapters' ranks; drop rank (--rank), "
                           "or use method 'linear' to cut the sum to a chosen rank")
    _check_fraction("density", density, method, "ties", "(0, 1]", lambda v: 0.0 < v <= 1.0)
    _check_fraction("rate", rate, method, "dare", "[0, 1)", lambda v: 0.0 <= v < 1.0)


def _check_fraction(key: str, value: float | None, method: str, owner: str, interval: str, inside: Any) -> None:
    if value is None:
        if method == owner:
            raise LorakitError(f"method {owner!r} needs {key} in {interval}")
        return
    if method != owner:
        raise LorakitError(f"{key} applies to method {owner!r}, not {method!r}; drop it")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not inside(float(value)):
        raise LorakitError(f"{key} must be a number in {interval}, got {value!r}")


def read_sources(adapters: dict[str, tuple[str | Path, float]]) -> list[Source]:
    """Each adapter read from disk, refused if it is a principal (PiSSA) adapter."""
    sources = []
    for name, (path, weight) in adapters.items():
        path = Path(path)
        raw, tensors, metadata = read_adapter(path)
        config = config_from_peft(raw, str(path / CONFIG_NAME))
        refuse_dora_adapter(config.dora, f"adapter {name!r} ({path})", "adding its ΔW to others'")
        if config.init == "principal":
            raise LorakitError(f"adapter {name!r} ({path}) is a principal (PiSSA) adapter: its factors pair with the "
                               "residual base W - s·B₀A₀; convert it first to a standard adapter on the original base "
                               f"(lorakit prune {path} --principal convert --rank {2 * config.rank} --out DIR)")
        try:
            pairs = factor_keys(tensors)
        except LorakitError:
            raise LorakitError(f"adapter {name!r} ({path}) holds no linear LoRA module (only embeddings or "
                               "convolutions); combine adds linear modules' ΔW: leave it out") from None
        sources.append(Source(name, path, float(weight), raw, config, tensors, metadata, pairs))
    return sources


def check_same_base(sources: list[Source]) -> None:
    """Refuse adapters whose recorded base, factorised layout, fingerprint (same targets) or shared ΔW shapes
    differ."""
    first = sources[0]
    for other in sources[1:]:
        pair = f"adapters {first.name!r} and {other.name!r}"
        if first.base and other.base and first.base != other.base:
            raise LorakitError(f"{pair} were trained on different bases ({first.base!r}, {other.base!r}); combine "
                               "only adapters of one base")
        if first.metadata.get(FACTORIZATION_KEY) != other.metadata.get(FACTORIZATION_KEY):
            raise LorakitError(f"{pair} were trained on bases factorised differently; combine only adapters of one "
                               "base")
        prints = first.metadata.get("lorakit_fingerprint"), other.metadata.get("lorakit_fingerprint")
        if set(first.pairs) == set(other.pairs) and all(prints) and prints[0] != prints[1]:
            raise LorakitError(f"{pair} were saved on bases whose adapted layers differ (fingerprints {prints[0]}, "
                               f"{prints[1]}); combine only adapters of one base")
        for module in sorted(set(first.pairs) & set(other.pairs)):
            if first.shape(module) != other.shape(module):
                raise LorakitError(f"{pair} adapt {module!r} with different shapes ({first.shape(module)}, "
                                   f"{other.shape(module)}): they belong to different bases; combine only adapters "
                                   "of one base")


def chosen_modules(sources: list[Source], targets: str) -> list[str]:
    """The linear modules the combination adapts; refuses differing module sets under `targets="same"`."""
    sets = [set(s.pairs) for s in sources]
    union, common = set().union(*sets), set.intersection(*sets)
    if union != common and targets == "same":
        odd = next(s for s in sources if set(s.pairs) != union)
        missing = sorted(union - set(odd.pairs))
        raise LorakitError(f"adapter {odd.name!r} does not adapt {len(missing)} module(s) the others do (first: "
                           f"{missing[0]!r}); pass targets='union' (--targets union: a missing module adds "
                           "ΔW = 0) or targets='intersection' (--targets intersection: only the modules all adapt)")
    chosen = union if targets == "union" else common
    if not chosen:
        raise LorakitError("the adapters share no adapted linear module; targets='union' (--targets union) keeps all "
                           "of them")
    return sorted(chosen)


def shared_tensors(sources: list[Source]) -> dict[str, Tensor]:
    """The tensors outside the linear factors (modules_to_save, biases, embedding adapters), which must be equal in
    every adapter: a combination cannot add them. Refuses, naming the tensors, when they differ."""
    def others(s: Source) -> dict[str, Tensor]:
        factor_keys = {k for pair in s.pairs.values() for k in pair}
        return {k: t for k, t in s.tensors.items() if k not in factor_keys}

    first = others(sources[0])
    for source in sources[1:]:
        mine = others(source)
        differ = sorted(set(first) ^ set(mine))
        differ += sorted(k for k in set(first) & set(mine)
                         if first[k].shape != mine[k].shape or not torch.equal(first[k], mine[k]))
        if differ:
            raise LorakitError(f"adapters {sources[0].name!r} and {source.name!r} differ in {len(differ)} tensor(s) "
                               f"outside the LoRA factors (first: {differ[0]!r}; a modules_to_save head, a trained "
                               "bias or an embedding adapter), which combine cannot add; combine adapters trained "
                               "with the same saved modules and no trained biases")
    return first
