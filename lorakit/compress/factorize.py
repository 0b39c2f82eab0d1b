"""Factorising a model's linear layers: W (out, in) replaced by a rank-k pair U·Vᵀ (`LowRankLinear`).

Two truncations (`method`):
- "svd": the best rank-k approximation of W itself, U_k Σ_k V_kᵀ (Eckart & Young 1936); its metric is ‖W‖_F².
- "activation": truncation-aware data whitening (SVD-LLM, Wang et al. 2024, §3.1; ASVD's motivation): the rank-k
  W' minimising the error of the layer's outputs on calibration inputs X (tokens, in), ‖X (W - W')ᵀ‖_F. With
  C = XᵀX (+ damping) = L Lᵀ (Cholesky), take the SVD W L = U Σ Vᵀ and W' = U_k Σ_k V_kᵀ L⁻¹.
  Why it is optimal: ‖X (W - W')ᵀ‖_F² = tr((W - W') C (W - W')ᵀ) = ‖(W - W') L‖_F² = ‖W L - W' L‖_F², and as L is
  invertible W' ↦ W' L is a bijection of the rank-k matrices, so Eckart–Young on W L gives the minimum Σ_{i>k} σᵢ².
  Its metric is the output energy ‖X Wᵀ‖_F² = ‖W L‖_F²; layers whose inputs are large hold more of it.

The rank of each module (exactly one of):
- `rank`: the same k for every module (k <= min(in, out); the pair is built even where it saves nothing);
- `energy`: per module the smallest k whose σ₁² + ... + σ_k² is at least that share of the module's total;
- `ratio`: a global budget, ratio · Σ in·out parameters over the chosen modules, spent greedily one rank at a time on
  the module whose next σ² (in the method's metric, not normalised per module) per parameter (in + out) is largest;
  every module starts at rank 1 and none grows past the largest rank that still saves parameters.
With `energy`, a module whose k would not save parameters (k·(in + out) >= in·out) is kept dense.

`rank_multiple` m (default 1) makes the `energy` and `ratio` ranks multiples of m: `energy` rounds each k up, `ratio`
starts every module at rank m and grows it m ranks at a time (priority: the next m σ² per parameter). A module whose
largest parameter-saving rank is below m keeps steps of 1. On CPUs with 16-float vector registers (AVX-512) the
thin products x·V run ~10% faster when k is a multiple of 16 (docs/compression.md, Speed).
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.errors import LorakitError
from lorakit.factorized import LowRankLinear
from lorakit.lowrank import factor_svd
from lorakit.targets import LINEAR_TYPES, select_modules

log = logging.getLogger(__name__)

METHODS = ("svd", "activation")
# Added to C = XᵀX as a share of its mean diagonal, so the Cholesky exists when X has fewer tokens than features or
# dependent columns; small enough that the optimum moves by ~1e-6 relatively.
DAMPING = 1e-6

Calibration = Callable[[nn.Module], object] | Iterable[Mapping[str, Any] | Tensor] | Mapping[str, Any] | Tensor


@dataclass
class ModuleFactor:
    """One chosen module: weight shape (out, in), the rank kept (None: left dense), parameters (weights and bias)
    before and after, and the share of the module's energy (‖W‖_F², or its output energy for "activation")
    discarded."""

    name: str
    shape: tuple[int, int]
    rank: int | None
    parameters_before: int
    parameters_after: int
    discarded: float


@dataclass
class FactorizeReport:
    """What `factorize` did to each chosen module."""

    method: str
    modules: list[ModuleFactor]

    @property
    def parameters_before(self) -> int:
        return sum(m.parameters_before for m in self.modules)

    @property
    def parameters_after(self) -> int:
        return sum(m.parameters_after for m in self.modules)

    @property
    def factorized(self) -> list[str]:
        return [m.name for m in self.modules if m.rank is not None]

    def as_json(self) -> dict[str, Any]:
        return {"method": self.method, "parameters_before": self.parameters_before,
                "parameters_after": self.parameters_after, "modules": [asdict(m) for m in self.modules]}


@dataclass
class _Spectrum:
    """W ≈ U diag(S) Vᵀ with V already carrying the whitening (Vᵀ L⁻¹), float64; S descending."""

    u: Tensor  # (out, p)
    s: Tensor  # (p,)
    v: Tensor  # (in, p)


def check_factorize_args(rank: int | None, energy: float | None, ratio: float | None, method: str,
                         rank_multiple: int = 1) -> None:
    """Raise LorakitError unless exactly one of `rank` (int >= 1), `energy` (in (0, 1]) and `ratio` (in (0, 1]) is
    given, `method` is one of METHODS and `rank_multiple` is an int >= 1."""
    given = [n for n, v in (("rank", rank), ("energy", energy), ("ratio", ratio)) if v is not None]
    if len(given) != 1:
        raise LorakitError("pass exactly one of rank (the same rank everywhere), energy (per module the share of "
                           "energy to keep) and ratio (the share of the chosen layers' parameters to keep), got "
                           + (", ".join(given) if given else "none"))
    if rank is not None and (type(rank) is not int or rank < 1):
        raise LorakitError(f"rank must be an int >= 1, got {rank!r}")
    for label, value in (("energy", energy), ("ratio", ratio)):
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                      and 0.0 < value <= 1.0):
            raise LorakitError(f"{label} must be in (0, 1], got {value!r}")
    if method not in METHODS:
        raise LorakitError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if type(rank_multiple) is not int or rank_multiple < 1:
        raise LorakitError(f"rank_multiple must be an int >= 1, got {rank_multiple!r}")


def factorize(model: nn.Module, targets: list[str], *, exclude: list[str] | None = None, rank: int | None = None,
              energy: float | None = None, ratio: float | None = None, method: str = "svd",
              calibration: Calibration | None = None, rank_multiple: int = 1) -> FactorizeReport:
    """Replace the linear layers of `model` matched by `targets` (lorakit's pattern syntax and presets, as for LoRA
    targets; `exclude` removes matches) by `LowRankLinear` pairs, in place, and report each module.

    `calibration` (needed for method "activation"): a callable run as `calibration(model)`, or batches, each a dict
    of model keyword arguments or an input-id tensor (one, or an iterable of them); the inputs each chosen layer
    sees are gathered with forward hooks, under `torch.no_grad()`. `rank_multiple`: the `energy` and `ratio` ranks
    are multiples of it (module docstring).

    Raises LorakitError, with the model unchanged, for bad arguments, targets that match no linear layer, a rank
    above some module's min(in, out), a ratio too small for rank 1 everywhere, or an empty calibration set.
    """
    check_factorize_args(rank, energy, ratio, method, rank_multiple)
    if method == "activation" and calibration is None:
        raise LorakitError("method 'activation' needs calibration inputs (a callable or an iterable of batches)")
    modules = dict(model.named_modules())
    selection = select_modules(model, targets, exclude or [], [], modules=modules)
    others = [n for n in selection.adapted if not isinstance(modules[n], LINEAR_TYPES)]
    if others:
        raise LorakitError(f"factorize works on linear layers only; targets also match {', '.join(others)} "
                           f"({', '.join(sorted({type(modules[n]).__name__ for n in others}))}); exclude them")
    names = selection.adapted
    weights = {n: _dense_weight(modules[n]) for n in names}
    if rank is not None:
        too_big = [f"{n} {tuple(w.shape)}" for n, w in weights.items() if rank > min(w.shape)]
        if too_big:
            raise LorakitError(f"rank {rank} is larger than min(fan_in, fan_out) of {', '.join(too_big)}; use rank "
                               f"<= {min(min(w.shape) for w in weights.values())}")
    covariances = _input_covariances(model, modules, names, calibration) if method == "activation" else {}
    spectra = {n: _spectrum(w, covariances.get(n)) for n, w in weights.items()}
    biases = {n: modules[n].bias.numel() if modules[n].bias is not None else 0 for n in names}  # type: ignore[union-attr]
    ranks = _choose_ranks(spectra, weights, biases, rank, energy, ratio, rank_multiple)
    report: list[ModuleFactor] = []
    new: dict[str, LowRankLinear] = {}
    for name in names:
        module, w, spec, k = modules[name], weights[name], spectra[name], ranks[name]
        bias: Tensor | None = module.bias  # type: ignore[assignment]
        extra = bias.numel() if bias is not None else 0
        squares = spec.s ** 2
        total = float(squares.sum())
        before = w.numel() + extra
        if k is None:
            report.append(ModuleFactor(name, tuple(w.shape), None, before, before, 0.0))  # type: ignore[arg-type]
            continue
        up, down = _balanced_factors(spec, k, whitened=method == "activation")
        ref = module.weight
        layer = LowRankLinear.from_factors(up.to(ref.dtype), down.to(ref.dtype),
                                           None if bias is None else bias.detach())
        layer.to(device=ref.device)
        new[name] = layer
        discarded = float(squares[k:].sum()) / total if total > 0 else 0.0
        report.append(ModuleFactor(name, tuple(w.shape), k, before, k * sum(w.shape) + extra,  # type: ignore[arg-type]
                                   discarded))
    for name, layer in new.items():
        layer.train(modules[name].training)
        parent, _, child = name.rpartition(".")
        setattr(modules[parent], child, layer)
    log.info("factorized %d of %d modules (%s): %d -> %d parameters", len(new), len(names), method,
             sum(m.parameters_before for m in report), sum(m.parameters_after for m in report))
    return FactorizeReport(method, report)


def _balanced_factors(spec: _Spectrum, k: int, whitened: bool) -> tuple[Tensor, Tensor]:
    """U (out, k) and V (in, k) with U·Vᵀ the kept rank-k weight and both factors equally scaled: U_k √Σ_k and
    V_k √Σ_k for orthonormal U_k, V_k. The whitened V (L⁻ᵀ V_k) is not orthonormal (L⁻¹ is large where the
    calibration inputs are small), so the kept W' = U_k Σ_k (L⁻ᵀ V_k)ᵀ is split again from its own SVD, computed
    from these factors (`lowrank.factor_svd`); W' is unchanged, but its factors no longer differ in scale by
    L⁻¹'s, which made recovery fine-tuning of the activation-aware factors unstable (docs/compression.md)."""
    if not whitened:
        root = spec.s[:k].sqrt()
        return spec.u[:, :k] * root, spec.v[:, :k] * root
    svd = factor_svd(spec.u[:, :k] * spec.s[:k], spec.v[:, :k].T)
    root = svd.s.sqrt()
    return svd.u * root, svd.v * root


def _dense_weight(module: nn.Module) -> Tensor:
    """The (out, in) weight in float64; GPT-2's Conv1D stores it transposed."""
    w: Tensor = module.weight  # type: ignore[assignment]
    return (w if isinstance(module, nn.Linear) else w.T).detach().double()


def _spectrum(w: Tensor, covariance: Tensor | None) -> _Spectrum:
    """The SVD of W (out, in), or of W L for C = L Lᵀ with V replaced by L⁻ᵀ V so that W = U diag(S) Vᵀ."""
    if covariance is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return _Spectrum(u, s, vh.T)
    c = covariance + DAMPING * float(covariance.diagonal().mean().clamp_min(1e-30)) * torch.eye(
        covariance.shape[0], dtype=covariance.dtype)
    low = torch.linalg.cholesky(c)  # (in, in) lower, C = L Lᵀ
    u, s, vh = torch.linalg.svd(w @ low, full_matrices=False)
    # V_kᵀ L⁻¹ = (L⁻ᵀ V_k)ᵀ: a triangular solve against Lᵀ instead of an inverse
    v = torch.linalg.solve_triangular(low.T, vh.T, upper=True)  # (in, p)
    return _Spectrum(u, s, v)


def _input_covariances(model: nn.Module, modules: dict[str, nn.Module], names: list[str],
                       calibration: Calibration | None) -> dict[str, Tensor]:
    """C = XᵀX (float64, (in, in)) of the inputs each module in `names` receives while the model runs on
    `calibration`."""
    sums: dict[str, Tensor] = {}
    tokens = dict.fromkeys(names, 0)

    def hook(name: str) -> Callable[..., None]:
        def gather(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()  # (tokens, in)
            sums[name] = sums[name] + x.T @ x if name in sums else x.T @ x
            tokens[name] += x.shape[0]
        return gather

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            if callable(calibration):
                calibration(model)
            else:
                # one batch passed bare (a tensor, a dict) is one batch, not an iterable of rows or keys
                batches = [calibration] if isinstance(calibration, (Tensor, Mapping)) else calibration or []
                for batch in batches:
                    if isinstance(batch, Tensor):
                        model(input_ids=batch)
                    else:
                        model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    if all(t == 0 for t in tokens.values()):
        raise LorakitError("the calibration set is empty: no chosen layer saw any input; pass at least one batch")
    unseen = [n for n, t in tokens.items() if t == 0]
    if unseen:
        raise LorakitError(f"the calibration inputs never reached {', '.join(unseen)}; exclude these modules or "
                           "use method 'svd'")
    return {n: c.cpu() for n, c in sums.items()}


def _choose_ranks(spectra: dict[str, _Spectrum], weights: dict[str, Tensor], biases: dict[str, int],
                  rank: int | None, energy: float | None, ratio: float | None, multiple: int
                  ) -> dict[str, int | None]:
    """The kept rank per module, None for a module left dense."""
    if rank is not None:
        return dict.fromkeys(spectra, rank)
    if energy is not None:
        out: dict[str, int | None] = {}
        for name, spec in spectra.items():
            out_f, in_f = weights[name].shape
            squares = spec.s ** 2
            total = float(squares.sum())
            # a relative slack of 1e-12 so that energy 1.0 is met by the last nonzero σ despite roundoff
            share = (squares.cumsum(0) / total) if total > 0 else torch.ones_like(squares)
            k = min(math.ceil((int((share < energy - 1e-12).sum()) + 1) / multiple) * multiple, len(squares))
            out[name] = None if k * (in_f + out_f) >= in_f * out_f else min(k, len(squares))
        return out
    assert ratio is not None
    return _allocate(spectra, weights, biases, ratio, multiple)


def _allocate(spectra: dict[str, _Spectrum], weights: dict[str, Tensor], biases: dict[str, int], ratio: float,
              multiple: int = 1) -> dict[str, int | None]:
    """Greedy budget allocation: every module at its step (`multiple`, or 1 where the module cannot reach it), then
    one step at a time to the module whose next step's σ² per parameter is largest, while the budget (ratio times
    the modules' parameters, biases included, which stay) allows and the module still saves parameters. A module
    where even rank 1 saves nothing stays dense."""
    total = sum(w.numel() + biases[n] for n, w in weights.items())
    cost = {n: sum(w.shape) for n, w in weights.items()}  # parameters per rank: in + out
    largest = {n: min(min(w.shape), (w.numel() - 1) // cost[n]) for n, w in weights.items()}
    step = {n: multiple if largest[n] >= multiple else 1 for n in weights}
    cap = {n: largest[n] // step[n] * step[n] for n in weights}
    floor = sum(biases.values()) + sum(step[n] * cost[n] if cap[n] >= 1 else w.numel() for n, w in weights.items())
    budget = ratio * total
    if floor > budget:
        smallest = "rank 1" if multiple == 1 else f"rank {multiple} (rank_multiple)"
        raise LorakitError(f"ratio {ratio} leaves {math.floor(budget)} parameters, fewer than {smallest} in every "
                           f"chosen module needs ({floor}); use ratio >= {floor / total:.4g} or fewer targets")
    ranks = dict(step)
    spent = floor

    def priority(name: str, k: int) -> float:  # the next step's σ² per parameter, negated for the min-heap
        return -float((spectra[name].s[k:k + step[name]] ** 2).sum()) / (step[name] * cost[name])

    heap = [(priority(n, step[n]), n) for n in weights if cap[n] > step[n]]
    heapq.heapify(heap)
    while heap:
        _, name = heapq.heappop(heap)
        if spent + step[name] * cost[name] > budget:
            continue  # this module's next step does not fit; smaller modules' may
        ranks[name] += step[name]
        spent += step[name] * cost[name]
        k = ranks[name]
        if k < cap[name]:
            heapq.heappush(heap, (priority(name, k), name))
    never = [n for n in weights if cap[n] < 1]
    out: dict[str, int | None] = dict(ranks)
    for name in never:
        out[name] = None
    return out
