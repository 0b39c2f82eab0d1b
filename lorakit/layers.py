"""LoRA modules that adopt the base layer's own parameters.

Each module takes over the base layer's `weight` and `bias` Parameter objects under their own names (no copies),
so a base checkpoint's keys load into an adapted model unchanged, and adds the low-rank factors. The forward is

    y = base(x) + scaling * strength * B(A(dropout(x)))

with `scaling` = alpha / rank (or alpha / sqrt(rank) for rank-stabilised LoRA) and `strength` a run-time multiplier
(`set_strength`; 0 disables the adapter). Every module exposes its factors as matrices, A: (rank, fan_in) and
B: (fan_out, rank), so that one function (`lorakit.merge.delta_weight`) computes ΔW for all kinds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, cast, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit import dora as dora_math
from lorakit import quant
from lorakit.errors import MergeStateError
from lorakit.fused import lora_linear


@runtime_checkable
class LoraModule(Protocol):
    """What merge, io and init rely on; every LoRA module here provides it."""

    weight: nn.Parameter
    rank: int
    alpha: float
    scaling: float
    strength: float
    merged: bool

    def factors(self) -> tuple[Tensor, Tensor]:
        """(A, B) as matrices (rank, fan_in) and (fan_out, rank), views of the parameters."""
        ...

    def set_factors(self, a: Tensor, b: Tensor) -> None: ...

    def weight_matrix(self) -> Tensor:
        """The base weight as a (fan_out, fan_in) matrix, the layout in which ΔW = B @ A."""
        ...

    def matrix_to_weight(self, matrix: Tensor) -> Tensor:
        """Inverse of `weight_matrix`: a (fan_out, fan_in) matrix in the weight's own layout."""
        ...

    def lora_parameters(self) -> list[nn.Parameter]: ...


def _add_magnitude(module: nn.Module, out_features: int, dora: bool, factory: dict[str, Any]) -> None:
    """DoRA's magnitude vector m as `lora_magnitude_vector` (zeros until `lorakit.dora.initial_magnitude` or an
    adapter file fills it), or a None placeholder, so that `module.lora_magnitude_vector` always reads."""
    weight: Tensor = module.weight  # type: ignore[assignment]
    shape = dora_math.magnitude_shape(weight.dim(), out_features)
    module.register_parameter(dora_math.MAGNITUDE, nn.Parameter(torch.zeros(shape, **factory)) if dora else None)
    module.merged_norms = None  # type: ignore[assignment]  # ‖W + s·B A‖ recorded by merge, read by unmerge


def _refuse_training_while_merged(module: nn.Module) -> None:
    if module.training and torch.is_grad_enabled():
        raise MergeStateError(
            "adapters are merged into the base weights; call lorakit.unmerge(model) before training"
        )


def _zero_(params: list[nn.Parameter]) -> None:
    """Factors start at zero (ΔW = 0) until an init function or an adapter file fills them."""
    with torch.no_grad():
        for p in params:
            p.zero_()


def _zero_linear(in_features: int, out_features: int, factory: dict[str, Any]) -> nn.Linear:
    """A bias-free `nn.Linear` with a zero weight (out_features, in_features), built without `nn.Linear.__init__`:
    its Kaiming init would only be overwritten, and constructing the factors that way was about half of `inject`'s
    time on SmolLM2 (210 modules)."""
    layer = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(layer)
    layer.in_features, layer.out_features = in_features, out_features
    layer.weight = nn.Parameter(torch.zeros(out_features, in_features, **factory))
    layer.register_parameter("bias", None)
    return layer


class LoraLinear(nn.Module):
    """LoRA on `nn.Linear` (weight (out, in)) or on transformers' GPT-2 `Conv1D` (weight (in, out),
    `fan_in_fan_out=True`); with `dora=True`, DoRA (`lorakit.dora`): a magnitude vector rescales each output
    feature of W + s·B A."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, scaling: float, dropout: float = 0.0,
                 fan_in_fan_out: bool = False, dora: bool = False):
        super().__init__()
        self.weight: nn.Parameter = base.weight  # type: ignore[assignment]
        self.bias: nn.Parameter | None = base.bias  # type: ignore[assignment]
        self.fan_in_fan_out = fan_in_fan_out
        # A bitsandbytes weight (NF4 / int8) stays in its stored form; every read goes through `lorakit.quant`.
        self.quantized = quant.is_quantized(self.weight)
        shape = quant.shape(self.weight) if self.quantized else tuple(self.weight.shape)
        fan_in, fan_out = (shape if fan_in_fan_out else shape[::-1])
        self.in_features, self.out_features = int(fan_in), int(fan_out)
        self.rank, self.alpha, self.scaling, self.strength, self.merged = rank, alpha, scaling, 1.0, False
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._no_dropout = dropout == 0
        factor_dtype = _compute_dtype(base) if self.quantized else self.weight.dtype
        factory: dict[str, Any] = {"device": self.weight.device, "dtype": factor_dtype}
        self.lora_A = _zero_linear(self.in_features, rank, factory)
        self.lora_B = _zero_linear(rank, self.out_features, factory)
        self.dora = dora
        _add_magnitude(self, self.out_features, dora, factory)

    def base_forward(self, x: Tensor) -> Tensor:
        if self.quantized:
            return quant.linear(x, self.weight, self.bias)
        if not self.fan_in_fan_out:
            return F.linear(x, self.weight, self.bias)
        # Same arithmetic as transformers' Conv1D, so outputs match the unadapted model bit for bit.
        shape = x.shape[:-1] + (self.out_features,)
        flat = x.reshape(-1, x.shape[-1])  # (N, in)
        out = torch.addmm(self.bias, flat, self.weight) if self.bias is not None else flat @ self.weight
        return out.view(shape)

    # Set on the instance by `lorakit.bank.per_row_adapters` for the length of its block: runs this module with a
    # different adapter per batch row. The class default None means the module's own adapter.
    _per_row: Callable[[LoraLinear, Tensor], Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self._per_row is not None:
            return self._per_row(self, x)
        if self.merged:
            _refuse_training_while_merged(self)
            return self.base_forward(x)
        if self.strength == 0.0:
            return self.base_forward(x)
        scaling = self.scaling * self.strength
        if self.dora:
            return dora_math.linear_forward(self, x, scaling)
        weight, a, b = self.weight, self.lora_A.weight, self.lora_B.weight
        # Every attribute read here costs: a decoding step runs this 200 times for one token.
        if (not self.quantized and not self.fan_in_fan_out and (self._no_dropout or not self.training)
                and x.dtype == weight.dtype == a.dtype == b.dtype and not torch.is_autocast_enabled(x.device.type)):
            return lora_linear(x, weight, self.bias, a, b, scaling)
        out = self.base_forward(x)
        h = F.linear(self.dropout(x).to(a.dtype), a)  # (..., rank)
        if out.dtype != b.dtype or self.quantized:  # a low-precision base under fp32 factors
            return out + (F.linear(h, b) * scaling).to(out.dtype)
        # out + scaling * h @ B.T as one addmm: no (..., out) temporaries for the product and its scaled copy.
        flat = torch.addmm(out.reshape(-1, self.out_features), h.reshape(-1, self.rank), b.T, alpha=scaling)
        return flat.view(out.shape)

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.lora_A.weight, self.lora_B.weight

    def set_factors(self, a: Tensor, b: Tensor) -> None:
        with torch.no_grad():
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.copy_(b)

    def weight_matrix(self) -> Tensor:
        """For a quantized base, a fresh dequantized (out, in) copy in the factors' dtype (never cached)."""
        if self.quantized:
            return quant.dequantize(self.weight, self.lora_A.weight.dtype)
        return self.weight.T if self.fan_in_fan_out else self.weight

    def matrix_to_weight(self, matrix: Tensor) -> Tensor:
        return matrix.T if self.fan_in_fan_out else matrix

    def lora_parameters(self) -> list[nn.Parameter]:
        return [cast(nn.Parameter, self.lora_A.weight), cast(nn.Parameter, self.lora_B.weight),
                *_magnitude(self)]

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha:g}, "
                f"scaling={self.scaling:g}, merged={self.merged}" + (", dora=True" if self.dora else ""))


class LoraEmbedding(nn.Module):
    """LoRA on `nn.Embedding` (weight (num_embeddings, dim)). The factors keep PEFT's names and layout:
    `lora_embedding_A` (rank, num_embeddings) and `lora_embedding_B` (dim, rank), so ΔW = (B @ A).T."""

    def __init__(self, base: nn.Embedding, rank: int, alpha: float, scaling: float):
        super().__init__()
        self.weight = base.weight
        self.padding_idx, self.max_norm = base.padding_idx, base.max_norm
        self.norm_type, self.scale_grad_by_freq, self.sparse = base.norm_type, base.scale_grad_by_freq, base.sparse
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.rank, self.alpha, self.scaling, self.strength, self.merged = rank, alpha, scaling, 1.0, False
        factory: dict[str, Any] = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_embedding_A = nn.Parameter(torch.zeros(rank, self.num_embeddings, **factory))
        self.lora_embedding_B = nn.Parameter(torch.zeros(self.embedding_dim, rank, **factory))

    def _embed(self, ids: Tensor, table: Tensor) -> Tensor:
        return F.embedding(ids, table, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)

    def forward(self, ids: Tensor) -> Tensor:
        out = self._embed(ids, self.weight)
        if self.merged:
            _refuse_training_while_merged(self)
            return out
        if self.strength == 0.0:
            return out
        h = self._embed(ids, self.lora_embedding_A.T)  # (..., rank)
        return out + ((h @ self.lora_embedding_B.T) * (self.scaling * self.strength)).to(out.dtype)

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.lora_embedding_A, self.lora_embedding_B

    def set_factors(self, a: Tensor, b: Tensor) -> None:
        with torch.no_grad():
            self.lora_embedding_A.copy_(a)
            self.lora_embedding_B.copy_(b)

    def weight_matrix(self) -> Tensor:
        return self.weight.T  # (dim, num_embeddings)

    def matrix_to_weight(self, matrix: Tensor) -> Tensor:
        return matrix.T

    def lora_parameters(self) -> list[nn.Parameter]:
        return [self.lora_embedding_A, self.lora_embedding_B]

    def extra_repr(self) -> str:
        return (f"num={self.num_embeddings}, dim={self.embedding_dim}, rank={self.rank}, alpha={self.alpha:g}, "
                f"merged={self.merged}")


class LoraConv(nn.Module):
    """LoRA on `nn.Conv1d` / `nn.Conv2d` / `nn.Conv3d` (weight (out, in, *kernel)). A is a convolution with the
    base's kernel, stride, padding and dilation into `rank` channels; B is a 1x1 convolution back to `out`."""

    def __init__(self, base: nn.Conv1d | nn.Conv2d | nn.Conv3d, rank: int, alpha: float, scaling: float,
                 dropout: float = 0.0, dora: bool = False):
        super().__init__()
        self.weight = base.weight
        self.bias = base.bias
        self.stride, self.padding, self.dilation, self.groups = base.stride, base.padding, base.dilation, base.groups
        self.conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[self.weight.dim() - 2]
        self.rank, self.alpha, self.scaling, self.strength, self.merged = rank, alpha, scaling, 1.0, False
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        conv_cls = type(base)
        factory: dict[str, Any] = {"device": self.weight.device, "dtype": self.weight.dtype}
        # Keyword arguments typed Any: the stubs type each class's geometry as fixed-length tuples, `base` as a union.
        geometry: dict[str, Any] = {"kernel_size": base.kernel_size, "stride": base.stride, "padding": base.padding,
                                    "dilation": base.dilation}
        self.lora_A = conv_cls(base.in_channels, rank, **geometry, bias=False, **factory)
        self.lora_B = conv_cls(rank, base.out_channels, 1, 1, bias=False, **factory)
        self.dora = dora
        _add_magnitude(self, base.out_channels, dora, factory)
        _zero_(self.lora_parameters())

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.merged:
            _refuse_training_while_merged(self)
            return out
        if self.strength == 0.0:
            return out
        if self.dora:
            return dora_math.conv_forward(self, x, self.scaling * self.strength)
        h = self.lora_A(self.dropout(x).to(self.lora_A.weight.dtype))  # (N, rank, *spatial)
        return out + (self.lora_B(h) * (self.scaling * self.strength)).to(out.dtype)

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.lora_A.weight.flatten(1), self.lora_B.weight.flatten(1)

    def set_factors(self, a: Tensor, b: Tensor) -> None:
        with torch.no_grad():
            self.lora_A.weight.copy_(a.view_as(self.lora_A.weight))
            self.lora_B.weight.copy_(b.view_as(self.lora_B.weight))

    def weight_matrix(self) -> Tensor:
        return self.weight.flatten(1)  # (out, in * prod(kernel))

    def matrix_to_weight(self, matrix: Tensor) -> Tensor:
        return matrix.view(self.weight.shape)

    def lora_parameters(self) -> list[nn.Parameter]:
        return [cast(nn.Parameter, self.lora_A.weight), cast(nn.Parameter, self.lora_B.weight),
                *_magnitude(self)]

    def extra_repr(self) -> str:
        return f"weight={tuple(self.weight.shape)}, rank={self.rank}, alpha={self.alpha:g}, merged={self.merged}"


def _compute_dtype(base: nn.Module) -> torch.dtype:
    """The dtype a bitsandbytes layer computes in (its bias's, else `compute_dtype`, else fp32)."""
    bias = getattr(base, "bias", None)
    if isinstance(bias, Tensor) and bias.dtype.is_floating_point:
        return bias.dtype
    dtype = getattr(base, "compute_dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _magnitude(module: nn.Module) -> list[nn.Parameter]:
    magnitude = module._parameters.get(dora_math.MAGNITUDE)
    return [magnitude] if magnitude is not None else []


LORA_MODULE_TYPES = (LoraLinear, LoraEmbedding, LoraConv)


def lora_modules(model: nn.Module) -> list[tuple[str, LoraModule]]:
    """Every LoRA module of `model` with its dotted name, found by type, never by name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LORA_MODULE_TYPES)]  # type: ignore[misc]
