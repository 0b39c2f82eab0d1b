"""Initialising LoRA on a base that is about to be quantized, and the error each initialisation leaves.

    qlora    A standard, B = 0; the base is Q(W)                        (QLoRA, Dettmers et al. 2023)
    qpissa   s·B A = the top-r of W; the base is Q(W - s·B A)            (PiSSA, Meng et al. 2024, §3.5)
    loftq    T alternations: Q ← Q(W - s·B A); s·B A ← top-r of W - deq(Q)  (LoftQ, Li et al. 2023, Alg. 1),
             started from qpissa's factors, keeping the best alternation

The error of an initialisation is ‖W - (deq(Q) + s·B A)‖_F, against plain QLoRA's ‖W - deq(Q(W))‖_F. Both
principal methods need the full-precision W, so they run on a dense adapted model and quantize it themselves;
the adapter then records a principal init (A₀, B₀ with Q = Q(W - s·B₀ A₀)), and loading it on the dense base then
`lorakit.quant.quantize_model` rebuilds the same quantized residual bit for bit (quantization is deterministic).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lorakit import init as lora_init
from lorakit import quant
from lorakit.errors import LorakitError
from lorakit.inject import adapter_state
from lorakit.layers import LoraLinear, lora_modules

METHODS = ("qlora", "qpissa", "loftq")


@dataclass
class MatrixError:
    """One target's errors: ‖W - (deq(Q) + s·B A)‖_F of the method, and plain QLoRA's ‖W - deq(Q(W))‖_F."""

    name: str
    error: float
    qlora_error: float


@dataclass
class InitReport:
    method: str
    kind: str
    matrices: list[MatrixError]

    @property
    def error(self) -> float:
        return sum(m.error for m in self.matrices)

    @property
    def qlora_error(self) -> float:
        return sum(m.qlora_error for m in self.matrices)

    @property
    def cut(self) -> float:
        """The share of plain QLoRA's summed error that the method removes."""
        return 1.0 - self.error / self.qlora_error if self.qlora_error else 0.0

    def __str__(self) -> str:
        return (f"{self.method} on {self.kind}: summed ‖W - (Q(res) + s·BA)‖_F {self.error:.4g} over "
                f"{len(self.matrices)} matrices, plain QLoRA {self.qlora_error:.4g} ({100 * self.cut:.1f}% less)")


def reconstruction_error(weight: Tensor, quantized: Tensor, a: Tensor, b: Tensor, scaling: float) -> float:
    """‖W - (deq(Q) + s·B A)‖_F in float64."""
    approx = quant.dequantize(quantized, torch.float64) + scaling * (b.double() @ a.double())
    return torch.linalg.norm(weight.double() - approx).item()


def init_matrix(weight: Tensor, rank: int, scaling: float, kind: str, method: str, *, iters: int = 5,
                svd_iters: int | None = None, generator: torch.Generator | None = None
                ) -> tuple[Tensor, Tensor, nn.Parameter, tuple[Tensor, Tensor]]:
    """For one weight W (out, in): A (rank, in) and B (out, rank) to start training from, the quantized base Q,
    and (A₀, B₀) with Q = Q(W - s·B₀ A₀) exactly (what an adapter file records to rebuild Q from W). For qlora A
    and B are zeros (the caller keeps its own standard init); for qpissa (A₀, B₀) = (A, B); for loftq they are the
    factors of the previous alternation, which the last Q was quantized against."""
    w = weight.detach().float()
    zeros = torch.zeros(rank, w.shape[1]), torch.zeros(w.shape[0], rank)
    if method == "qlora":
        return *zeros, quant.quantize_weight(w, kind), zeros
    if method == "qpissa":
        a, b = lora_init.principal_factors(w, rank, scaling, svd_iters=svd_iters, generator=generator)
        return a, b, quant.quantize_weight(lora_init.residual(w, a, b, scaling), kind), (a, b)
    # Started from the principal factors rather than from zero: the first Q is QPiSSA's, and re-fitting the factors
    # to W - deq(Q) can only lower the error for that Q, so LoftQ never ends above QPiSSA; from zero it can stall
    # above it (Q(W)'s error is not low-rank). The best alternation is kept.
    previous = lora_init.principal_factors(w, rank, scaling, svd_iters=svd_iters, generator=generator)
    best: tuple[float, Tensor, Tensor, nn.Parameter, tuple[Tensor, Tensor]] | None = None
    for _ in range(iters):
        q = quant.quantize_weight(lora_init.residual(w, *previous, scaling), kind)
        a, b = lora_init.principal_factors(w - quant.dequantize(q), rank, scaling, svd_iters=svd_iters,
                                           generator=generator)
        error = reconstruction_error(w, q, a, b, scaling)
        if best is None or error < best[0]:
            best = (error, a, b, q, previous)
        previous = (a, b)
    assert best is not None
    return best[1], best[2], best[3], best[4]


def quantize_with_init(model: nn.Module, kind: str, method: str, *, iters: int = 5, svd_iters: int | None = None,
                       seed: int = 0) -> InitReport:
    """Quantize the dense, freshly adapted `model` as `kind` with the initialisation `method` (qlora, qpissa or
    loftq with `iters` alternations) on every adapted linear layer of its blocks, and report the errors.

    qpissa and loftq overwrite the factors and record the adapter as a principal init (A₀, B₀ kept for saving).
    Raises `LorakitError` for an unknown method or kind, a quantized or merged model, or a DoRA adapter.
    """
    if method not in METHODS:
        raise LorakitError(f"unknown quantized init {method!r}; expected one of {', '.join(METHODS)}")
    quant.check_kind(kind)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise LorakitError(f"iters must be a positive int, got {iters!r}")
    state = adapter_state(model)
    if state.config.dora:
        raise LorakitError("dora over a quantized base is not supported yet; set dora false")
    targets = [(n, m) for n, m in lora_modules(model) if isinstance(m, LoraLinear) and not m.fan_in_fan_out]
    if any(m.quantized or m.merged for _, m in targets):
        raise LorakitError("quantize_with_init needs a dense, unmerged adapted model (load the base without "
                           "quantize, inject, then call it)")
    blocks = set(quant.block_linear_names(model))
    generator = torch.Generator().manual_seed(seed)
    matrices = []
    for name, module in targets:
        if name not in blocks:
            continue
        w = module.weight.detach().float()
        a, b, q, (a0, b0) = init_matrix(w, module.rank, module.scaling, kind, method, iters=iters,
                                        svd_iters=svd_iters, generator=generator)
        plain = quant.quantize_weight(w, kind) if method != "qlora" else q
        zero_a, zero_b = torch.zeros_like(a), torch.zeros_like(b)
        matrices.append(MatrixError(name, reconstruction_error(w, q, a, b, module.scaling),
                                    reconstruction_error(w, plain, zero_a, zero_b, module.scaling)))
        if method != "qlora":
            module.set_factors(a, b)
            state.principal_init[name] = (a0.clone(), b0.clone())
        module.weight = q
        module.quantized = True
    if method != "qlora":
        state.config = dataclasses.replace(state.config, init="principal", svd_iters=svd_iters)
    if quant.block_linear_names(model):  # the block linears without an adapter
        quant.quantize_model(model, kind)
    model.lorakit_quantization = kind  # type: ignore[assignment]
    return InitReport(method, kind, matrices)
