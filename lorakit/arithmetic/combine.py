"""Adapter arithmetic: one new adapter from several adapters of the same base, saved as a PEFT adapter.

    from lorakit.arithmetic import combine
    combine({"sst2": ("runs/sst2/adapter", 1.0), "toxic": ("runs/toxic/adapter", -0.5)}, "out/mix", method="linear")

The combined ΔW of each module is built from the weighted updates wᵢ·ΔWᵢ by the method (see `methods`); a negative
weight subtracts an adapter's behaviour. It is saved as factors B', A' with s'·B'A' equal to it, where s' is the
scaling PEFT and lorakit compute from the saved config (each module's alpha from the first adapter, its new rank in
rank_pattern where it differs from `r`, as `compress.prune` writes them), rsLoRA included.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors
from torch import Tensor

from lorakit.arithmetic.inputs import (
    Source,
    check_combine_args,
    check_same_base,
    chosen_modules,
    read_sources,
    shared_tensors,
)
from lorakit.arithmetic.methods import dare_merge, dense_svd, discarded_share, stacked_factors, ties_merge
from lorakit.compress.prune import module_of_key, refactored_config
from lorakit.fileio import atomic_write_dir
from lorakit.io import TASK_NAME, WEIGHTS_NAME, adapter_checksum
from lorakit.lowrank import factor_svd
from lorakit.outputs import MARK_NAME, claim_output_dir
from lorakit.peft_format import CONFIG_NAME, PREFIX, config_from_peft

log = logging.getLogger(__name__)

COMBINED_KIND = "combined adapter"


@dataclass
class ModuleCombine:
    """One module of the combination: its ΔW shape (out, in), the input ranks, the saved rank and the share of the
    combined ‖ΔW‖_F² that cutting it to that rank discarded (0 for `cat`)."""

    name: str
    shape: tuple[int, int]
    ranks_in: list[int]
    rank: int
    discarded: float


@dataclass
class CombineReport:
    """What `combine` wrote: the method, each input's path and weight, and every module's ranks."""

    out: Path
    method: str
    adapters: dict[str, tuple[str, float]]
    modules: list[ModuleCombine]

    def as_json(self) -> dict[str, Any]:
        return {"out": str(self.out), "method": self.method,
                "adapters": {n: {"path": p, "weight": w} for n, (p, w) in self.adapters.items()},
                "modules": [asdict(m) for m in self.modules]}


def combine(adapters: dict[str, tuple[str | Path, float]], out_dir: str | Path, *, method: str = "linear",
            rank: int | None = None, density: float | None = None, rate: float | None = None,
            targets: str = "same", seed: int = 0, force: bool = False) -> CombineReport:
    """Write to `out_dir` one adapter whose ΔW per module combines the adapters' weighted ΔWᵢ = sᵢ·BᵢAᵢ.

    adapters: {name: (adapter_dir, weight)}, all of one base; weights are finite numbers, negative subtracts.
    method: `linear` (Σ wᵢΔWᵢ, cut to its best rank-k approximation from the factors' SVD; k = min(rank, the
        module's rank); by default the sum of the input ranks, which is exact), `cat` (Σ wᵢΔWᵢ exactly as
        concatenated factors, rank Σrᵢ), `ties` (TIES-Merging with `density` in (0, 1]) or `dare` (DARE with drop
        `rate` in [0, 1), drawn from `seed`, then Σ). TIES and DARE form each module's dense (out, in) update in
        float64 and save its best rank-k approximation from a dense SVD, k = min(rank or Σrᵢ, out, in); the dropped
        share is in the report.
    targets: `same` (default: refuse adapters adapting different modules), `union` (a module an adapter lacks adds
        0) or `intersection` (only the modules all adapt).
    Tensors outside the LoRA factors (a modules_to_save head, biases, embedding adapters) must be equal in every
    adapter and are copied; so is task.json when all adapters hold the same one.

    Raises LorakitError, with nothing written, for bad arguments, adapters of different bases, different modules
    under `targets="same"`, a principal (PiSSA) adapter, differing non-factor tensors, or an `out_dir` that overlaps
    an input or holds other files (an earlier combined adapter only with `force`).
    """
    check_combine_args(adapters, method, rank=rank, density=density, rate=rate, targets=targets)
    sources = read_sources(adapters)
    check_same_base(sources)
    modules = chosen_modules(sources, targets)
    out_tensors = {k: t.clone() for k, t in shared_tensors(sources).items()}
    generator = torch.Generator().manual_seed(seed)
    results, report = {}, []
    for module in modules:
        having = [s for s in sources if module in s.pairs]
        left, right, s, k = _combine_module(having, module, method, rank, density, rate, generator)
        shape = having[0].shape(module)
        ranks_in = [int(src.tensors[src.pairs[module][0]].shape[0]) for src in having]
        report.append(ModuleCombine(module, shape, ranks_in, k, discarded_share(s, k)))
        results[module] = (left, right, s, k)
    first = sources[0]
    new_raw = _combined_config(first, modules, {m: r[3] for m, r in results.items()}, out_tensors, targets != "same")
    new_config = config_from_peft(new_raw)
    dtype = next(iter(first.tensors.values())).dtype
    for module, (left, right, s, k) in results.items():
        scaling = new_config.scaling_for(module)
        if s.numel() == 0:  # cat: the stacked factors as they are, the scaling taken out of the left one
            b, a = left / scaling, right
        else:
            root = (s[:k] / scaling).sqrt()  # (k,)
            b, a = left[:, :k] * root, root[:, None] * right[:, :k].T
        out_tensors[f"{PREFIX}{module}.lora_B.weight"] = b.to(dtype).contiguous()  # (out, k)
        out_tensors[f"{PREFIX}{module}.lora_A.weight"] = a.to(dtype).contiguous()  # (k, in)
    weights = save_safetensors(out_tensors, metadata=_metadata(sources, out_tensors, method, targets != "same"))
    claim_output_dir(out_dir, kind=COMBINED_KIND, force=force, inputs=[s.path for s in sources])
    task = _common_task(sources)

    def fill(tmp: Path) -> None:
        (tmp / WEIGHTS_NAME).write_bytes(weights)
        (tmp / CONFIG_NAME).write_text(json.dumps(new_raw, indent=2, sort_keys=True) + "\n")
        (tmp / MARK_NAME).write_text(json.dumps({"kind": COMBINED_KIND}) + "\n")
        if task is not None:
            shutil.copy2(task, tmp / TASK_NAME)

    atomic_write_dir(out_dir, fill, what=COMBINED_KIND)
    return CombineReport(Path(out_dir), method, {s.name: (str(s.path), s.weight) for s in sources}, report)


def _combine_module(having: list[Source], module: str, method: str, rank: int | None, density: float | None,
                    rate: float | None, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, int]:
    """(U or L, V or R, S, k) of one module: for `cat` the stacked factors L (out, Σr), R (Σr, in) and an empty S;
    otherwise U (out, p), V (in, p) and S (p,) of the combined update and the kept rank k."""
    left, right = stacked_factors([s.factors(module) for s in having])
    if method == "cat":
        return left, right, torch.empty(0, dtype=torch.float64), left.shape[1]
    if method == "linear":
        svd = factor_svd(left, right)
        u, s, v = svd.u, svd.s, svd.v
    else:
        updates = [a @ b for a, b in (s.factors(module) for s in having)]  # each (out, in), dense
        if method == "ties":
            merged = ties_merge(updates, float(density or 0.0))
        else:
            merged = dare_merge(updates, float(rate or 0.0), generator)
        u, s, v = dense_svd(merged)
    wanted = rank if rank is not None else left.shape[1]
    return u, v, s, max(1, min(wanted, s.numel()))


def _combined_config(first: Source, modules: list[str], ranks: dict[str, int], tensors: dict[str, Tensor],
                     renamed: bool) -> dict[str, Any]:
    """The first adapter's adapter_config.json with the new ranks (and, when the module sets differed, the exact
    names of the adapted modules as target_modules)."""
    raw = dict(first.raw)
    if renamed:
        adapted = set(modules) | {n for k in tensors if (n := module_of_key(k)) is not None}
        raw["target_modules"] = sorted(adapted)
    return refactored_config(raw, first.config, ranks, tensors, converted=False)


def _metadata(sources: list[Source], tensors: dict[str, Tensor], method: str, renamed: bool) -> dict[str, str]:
    """The first adapter's header, with a new checksum, the combination recorded, and (when the module sets
    differed) the fingerprint recomputed from the factors' shapes where that reproduces every input's own."""
    meta = dict(sources[0].metadata)
    if renamed:
        meta.pop("lorakit_fingerprint", None)
        if all(s.metadata.get("lorakit_fingerprint") == _shape_print(s.tensors, s.raw) for s in sources):
            meta["lorakit_fingerprint"] = _shape_print(tensors, sources[0].raw)
        else:
            log.warning("combined adapter saved without a base fingerprint: the inputs' could not be reproduced")
    meta["lorakit_combination"] = json.dumps({"method": method, "weights": {s.name: s.weight for s in sources}})
    meta["lorakit_checksum"] = adapter_checksum(tensors)
    return meta


def _shape_print(tensors: dict[str, Tensor], raw: dict[str, Any]) -> str:
    """`io.fingerprint` computed from an adapter's factors: each adapted module's base weight shape (out, in) for a
    linear layer ((in, out) under fan_in_fan_out), (num, dim) for an embedding."""
    lines = []
    for key, a in tensors.items():
        name = module_of_key(key)
        if name is None:
            continue
        b = tensors[key.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")]
        if "lora_embedding_A" in key:
            shape = (int(a.shape[1]), int(b.shape[0]))
        else:
            shape = (int(a.shape[1]), int(b.shape[0])) if raw.get("fan_in_fan_out") else (int(b.shape[0]),
                                                                                           int(a.shape[1]))
        lines.append(f"{name}:{shape}")
    return hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()[:16]


def _common_task(sources: list[Source]) -> Path | None:
    files = [s.path / TASK_NAME for s in sources]
    if all(f.is_file() for f in files) and len({f.read_bytes() for f in files}) == 1:
        return files[0]
    if any(f.is_file() for f in files):
        log.warning("the adapters' task.json files differ or some lack one; the combined adapter has none")
    return None
