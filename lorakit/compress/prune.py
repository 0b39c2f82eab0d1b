"""Rank pruning of a trained adapter: keep the top singular directions of each module's ΔW, save a smaller adapter.

For ΔW = s·B A (B (out, r), A (r, in)) the exact SVD comes from the factors (`lowrank.factor_svd`: two thin QRs and
an r x r SVD; the dense (out, in) ΔW is never formed). The best rank-k approximation in Frobenius and spectral norm
is U_k S_k V_kᵀ (Eckart & Young 1936), and it discards the share Σ_{i>k} σᵢ² / Σσᵢ² of ‖ΔW‖_F². It is saved as
B' = U_k sqrt(S_k / s'), A' = sqrt(S_k / s') V_kᵀ, where s' is the scaling PEFT and lorakit compute for the module
from the saved config: each module keeps its alpha (alpha_pattern where it differs from lora_alpha) and gets rank k
(rank_pattern where k differs from `r`), so s'·B'A' = U_k S_k V_kᵀ under either library, rsLoRA included.

A principal (PiSSA) adapter pairs with the residual base W - s·B₀A₀, so truncating its trained factors alone would
change what it adds to the original W. With `principal="convert"` the update relative to the original W,
s·(B A - B₀A₀) = [s·B, -s·B₀]·[A; A₀] (rank <= 2r, PiSSA §3.4), is pruned instead and saved as a standard-init
adapter on the original base.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from torch import Tensor

from lorakit.config import LoraConfig
from lorakit.dora import refuse_dora_adapter
from lorakit.errors import LorakitError
from lorakit.export import MERGED_KIND
from lorakit.fileio import atomic_write_dir
from lorakit.io import PRINCIPAL_NAME, WEIGHTS_NAME, adapter_checksum, read_adapter
from lorakit.lowrank import factor_svd
from lorakit.outputs import MARK_NAME, claim_output_dir, output_kind
from lorakit.peft_format import CONFIG_NAME, config_from_peft, from_peft_key

PRUNED_KIND = "pruned adapter"
PRINCIPAL_CHOICES = ("convert",)
_LAYER = re.compile(r"\.\d+\.")


@dataclass
class ModulePrune:
    """One module: its ΔW shape (out, in), rank before and after, ‖ΔW‖_F² and the share of it discarded."""

    name: str
    shape: tuple[int, int]
    rank_before: int
    rank_after: int
    energy: float
    discarded: float

    @property
    def kind(self) -> str:
        """`self_attn.q_proj` for `model.layers.3.self_attn.q_proj`: the path after the last layer index."""
        return _LAYER.split(self.name)[-1]


@dataclass
class PruneReport:
    """What `prune_adapter` wrote: sizes of the weights file before and after, and each module's ranks."""

    adapter: Path
    out: Path
    bytes_before: int
    bytes_after: int
    parameters_before: int
    parameters_after: int
    modules: list[ModulePrune]
    unchanged: list[str] = field(default_factory=list)  # adapted modules left as they were (embeddings, convs)

    @property
    def discarded(self) -> float:
        """The share of Σ‖ΔW‖_F² over all pruned modules that the pruning discarded."""
        total = sum(m.energy for m in self.modules)
        return sum(m.energy * m.discarded for m in self.modules) / total if total > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        return {"adapter": str(self.adapter), "out": str(self.out), "bytes_before": self.bytes_before,
                "bytes_after": self.bytes_after, "parameters_before": self.parameters_before,
                "parameters_after": self.parameters_after, "discarded": self.discarded,
                "modules": [asdict(m) for m in self.modules], "unchanged": self.unchanged}


def check_prune_args(rank: int | None, energy: float | None, principal: str | None) -> None:
    """Raise LorakitError unless exactly one of `rank` (an int >= 1) and `energy` (in (0, 1]) is given and
    `principal` is None or one of PRINCIPAL_CHOICES."""
    if (rank is None) == (energy is None):
        raise LorakitError("pass exactly one of rank (keep the top R directions of every module) and energy (keep "
                           "per module the fewest directions that hold this share of ‖ΔW‖²)")
    if rank is not None and (type(rank) is not int or rank < 1):
        raise LorakitError(f"rank must be an int >= 1, got {rank!r}")
    if energy is not None and not (isinstance(energy, (int, float)) and 0.0 < energy <= 1.0):
        raise LorakitError(f"energy must be in (0, 1], the share of ‖ΔW‖² to keep, got {energy!r}")
    if principal is not None and principal not in PRINCIPAL_CHOICES:
        raise LorakitError(f"principal must be one of {', '.join(PRINCIPAL_CHOICES)}, got {principal!r}")


def prune_adapter(adapter_dir: str | Path, out_dir: str | Path, *, rank: int | None = None,
                  energy: float | None = None, force: bool = False, principal: str | None = None) -> PruneReport:
    """Write to `out_dir` the adapter `adapter_dir` with each linear module's ΔW cut to its best rank-k
    approximation: k = min(rank, the module's rank), or the smallest k whose share of ‖ΔW‖_F² is >= `energy`.
    The other files of the adapter (task.json, ...) and every other tensor (modules_to_save, biases, embedding
    adapters) are kept as they were; the base fingerprint stays.

    Raises LorakitError, with nothing written, for bad arguments, a merged model directory, a principal adapter
    without `principal="convert"`, a rank above some module's min(out, in), or an `out_dir` that overlaps the
    adapter or holds other files (an earlier pruned adapter only with `force`).
    """
    check_prune_args(rank, energy, principal)
    source = Path(adapter_dir)
    _refuse_merged(source)
    raw, tensors, metadata = read_adapter(source)
    config = config_from_peft(raw, str(source / CONFIG_NAME))
    refuse_dora_adapter(config.dora, f"adapter {str(source)!r}", "cutting ΔW to its top singular directions")
    pairs = factor_keys(tensors)
    init_factors = _principal_factors(source, config, principal, list(pairs))
    if rank is not None:
        _check_rank_fits(rank, {n: (tensors[kb].shape[0], tensors[ka].shape[1]) for n, (ka, kb) in pairs.items()})
    svds, modules, ranks = {}, [], {}
    for name, (ka, kb) in pairs.items():
        a, b = tensors[ka].double(), tensors[kb].double()
        left, right = config.scaling_for(name) * b, a  # ΔW = left @ right, (out, r) @ (r, in)
        if name in init_factors:
            a0, b0 = init_factors[name]
            left = torch.cat([left, -config.scaling_for(name) * b0.double()], dim=1)  # (out, 2r)
            right = torch.cat([right, a0.double()], dim=0)  # (2r, in)
        svd = factor_svd(left, right)
        k = _kept_rank(svd.s, rank, energy)
        squares = svd.s ** 2
        total = float(squares.sum())
        modules.append(ModulePrune(name, (b.shape[0], a.shape[1]), a.shape[0], k, total,
                                   float(squares[k:].sum()) / total if total > 0 else 0.0))
        svds[name], ranks[name] = svd, k
    new_raw = refactored_config(raw, config, ranks, tensors, converted=bool(init_factors))
    new_config = config_from_peft(new_raw)
    out_tensors = dict(tensors)
    for name, (ka, kb) in pairs.items():
        svd, k = svds[name], ranks[name]
        root = (svd.s[:k] / new_config.scaling_for(name)).sqrt()  # (k,)
        out_tensors[kb] = (svd.u[:, :k] * root).to(tensors[kb].dtype).contiguous()  # (out, k)
        out_tensors[ka] = (root[:, None] * svd.v[:, :k].T).to(tensors[ka].dtype).contiguous()  # (k, in)
    new_meta = dict(metadata) | ({"lorakit_checksum": adapter_checksum(out_tensors)} if "lorakit_checksum" in metadata
                                 else {})
    weights = save_safetensors(out_tensors, metadata=new_meta)
    claim_output_dir(out_dir, kind=PRUNED_KIND, force=force, inputs=[source])
    skip = {WEIGHTS_NAME, CONFIG_NAME, MARK_NAME} | ({PRINCIPAL_NAME} if init_factors else set())

    def fill(tmp: Path) -> None:
        for item in source.iterdir():
            if item.name not in skip:
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        (tmp / WEIGHTS_NAME).write_bytes(weights)
        (tmp / CONFIG_NAME).write_text(json.dumps(new_raw, indent=2, sort_keys=True) + "\n")
        (tmp / MARK_NAME).write_text(json.dumps({"kind": PRUNED_KIND}) + "\n")

    atomic_write_dir(out_dir, fill, what=PRUNED_KIND)
    unchanged = sorted({n for k in tensors if (n := module_of_key(k)) is not None} - set(pairs))
    return PruneReport(source, Path(out_dir), (source / WEIGHTS_NAME).stat().st_size, len(weights),
                       sum(t.numel() for t in tensors.values()), sum(t.numel() for t in out_tensors.values()),
                       modules, unchanged)


def _refuse_merged(path: Path) -> None:
    if path.is_dir() and not (path / CONFIG_NAME).is_file() and (
            (path / "config.json").is_file() or output_kind(path) == MERGED_KIND):
        raise LorakitError(f"{str(path)!r} is a merged model (ΔW already folded into W), not an adapter: its "
                           "update's factors are gone; prune the adapter before merging (lorakit prune ADAPTER ... "
                           "--out DIR, then lorakit merge --adapter DIR)")


def factor_keys(tensors: dict[str, Tensor]) -> dict[str, tuple[str, str]]:
    """module -> (key of A, key of B) in the file, for the linear modules (2-D factors)."""
    keys = {from_peft_key(k): k for k in tensors}
    pairs = {}
    for name, key in sorted(keys.items()):
        module = name.removesuffix(".lora_A.weight")
        if module != name and tensors[key].dim() == 2 and f"{module}.lora_B.weight" in keys:
            pairs[module] = (key, keys[f"{module}.lora_B.weight"])
    if not pairs:
        raise LorakitError("the adapter holds no linear LoRA module (only embeddings or convolutions); nothing to "
                           "prune")
    return pairs


def _principal_factors(path: Path, config: LoraConfig, principal: str | None, names: list[str]
                       ) -> dict[str, tuple[Tensor, Tensor]]:
    """The initial factors (A₀, B₀) of a principal adapter being converted; {} for any other adapter."""
    if config.init != "principal":
        if principal is not None:
            raise LorakitError(f"--principal {principal} applies to principal (PiSSA) adapters; {str(path)!r} is a "
                               f"{config.init}-init adapter: drop the flag")
        return {}
    if principal is None:
        raise LorakitError(f"{str(path)!r} is a principal (PiSSA) adapter: its factors pair with the residual base "
                           "W - s·B₀A₀, so pruning them alone changes the model; pass --principal convert to prune "
                           "its update s·(BA - B₀A₀) on the original base instead (a standard adapter, rank <= 2r)")
    file = path / PRINCIPAL_NAME
    if not file.is_file():
        raise LorakitError(f"{file} is missing: converting a principal adapter needs its initial factors; re-save "
                           "the adapter from its run (save_adapter writes them)")
    init = load_file(file)
    missing = [n for n in names if f"{n}.A" not in init or f"{n}.B" not in init]
    if missing:
        raise LorakitError(f"{file} lacks the initial factors of {missing[0]!r}; re-save the adapter")
    return {n: (init[f"{n}.A"], init[f"{n}.B"]) for n in names}


def _check_rank_fits(rank: int, shapes: dict[str, tuple[int, int]]) -> None:
    for name, (out, fan_in) in shapes.items():
        if rank > min(out, fan_in):
            raise LorakitError(f"rank {rank} is above min(fan_out, fan_in) = {min(out, fan_in)} of {name!r} "
                               f"({out} x {fan_in}), the largest rank its ΔW can have; pass --rank <= "
                               f"{min(min(s) for s in shapes.values())}")


def _kept_rank(s: Tensor, rank: int | None, energy: float | None) -> int:
    """k = min(rank, len(s)), or the smallest k with Σ_{i<=k} σᵢ² >= energy · Σσᵢ² (1 for a zero ΔW)."""
    if rank is not None:
        return min(rank, s.numel())
    squares = s.double() ** 2
    total = float(squares.sum())
    if total <= 0:
        return 1
    shares = squares.cumsum(0) / total
    reached = (shares >= float(energy) * (1 - 1e-12)).nonzero()  # type: ignore[arg-type]
    return int(reached[0]) + 1 if reached.numel() else s.numel()


def refactored_config(raw: dict[str, Any], config: LoraConfig, ranks: dict[str, int], tensors: dict[str, Tensor],
                      *, converted: bool) -> dict[str, Any]:
    """The adapter_config.json of the pruned adapter: the most common rank as `r`, the others in rank_pattern,
    every module's alpha kept (alpha_pattern where it differs from lora_alpha), exact-name pattern keys."""
    all_ranks = {n: int(tensors[k].shape[0]) for k in tensors if (n := module_of_key(k)) is not None} | ranks
    counts = Counter(all_ranks.values())
    r = max(counts, key=lambda v: (counts[v], v))
    new = dict(raw)
    new["r"] = r
    new["rank_pattern"] = {re.escape(n): k for n, k in sorted(all_ranks.items()) if k != r}
    new["alpha_pattern"] = {re.escape(n): a for n in sorted(all_ranks)
                            if (a := config.alpha_for(n)) != config.alpha}
    if converted:
        new["init_lora_weights"] = True
    return new


def module_of_key(key: str) -> str | None:
    name = from_peft_key(key)
    for leaf in (".lora_A.weight", ".lora_embedding_A"):
        if name.endswith(leaf):
            return name.removesuffix(leaf)
    return None

