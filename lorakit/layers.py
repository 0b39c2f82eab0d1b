"""LoRA modules that adopt the base layer's own parameters.

Each module takes over the base layer's `weight` and `bias` Parameter objects under their own names (no copies),
so a base checkpoint's keys load into an adapted model unchanged, and adds the low-rank factors. The forward is

    y = base(x) + scaling * strength * B(A(dropout(x)))

with `scaling` = alpha / rank (or alpha / sqrt(rank) for rank-stabilised LoRA) and `strength` a run-time multiplier
(`set_strength`; 0 disables the adapter). Every module exposes its factors as matrices, A: (rank, fan_in) and
B: (fan_out, rank), so that one function (`lorakit.merge.delta_weight`) computes ΔW for all kinds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol, cast, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from lorakit import dora as dora_math
from lorakit import gemm, quant
from lorakit.errors import LorakitError, MergeStateError
from lorakit.fused import lora_linear
from lorakit.quant_fused import quant_lora_linear


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
            return gemm.linear_function(x, self.weight, self.bias)
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
        if (self.quantized and (self._no_dropout or not self.training) and x.dtype == a.dtype == b.dtype
                and not torch.is_autocast_enabled(x.device.type)):
            return quant_lora_linear(x, weight, self.bias, a, b, scaling)
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


# The forwards of the plain convolution classes: a subclass with any other forward (padding of its own, as
# EfficientNet's `Conv2dStaticSamePadding`) is run through that forward.
_PLAIN_CONV_FORWARDS = (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)


class _ConvFactor(nn.Module):
    """LoRA's A of a convolution: a weight (rank, in / groups, *kernel) applied by the adapted layer's own
    convolution (`convolve(x, weight, bias)`: its padding, stride, dilation and groups), so that A sees exactly the
    input the base weight sees."""

    def __init__(self, weight: nn.Parameter, convolve: Callable[[Tensor, Tensor, Tensor | None], Tensor]):
        super().__init__()
        self.weight = weight
        self.convolve = convolve

    def forward(self, x: Tensor) -> Tensor:
        return self.convolve(x, self.weight, None)


class LoraConv(nn.Module):
    """LoRA on `nn.Conv1d` / `nn.Conv2d` / `nn.Conv3d` and their subclasses (weight (out, in / groups, *kernel)).

    A is a convolution with the base's kernel, stride, padding, dilation and groups into `rank` channels; B is a
    1x1 convolution back to `out` with the same groups (PEFT's layout for B). Group j's outputs thus read only A's
    j-th block of rank / groups channels, which read only group j's inputs: ΔW has the base weight's shape, one
    rank-(rank / groups) update per group, and merges exactly. rank must be a multiple of groups (as in PEFT).

    A subclass with a forward of its own (EfficientNet's `Conv2dStaticSamePadding` pads in `forward`) is run
    through that forward, for the base weight and for A alike (`torch.func.functional_call` with the weight
    swapped), so its padding is kept: with B = 0 the output is the base layer's, bit for bit.
    """

    def __init__(self, base: nn.Conv1d | nn.Conv2d | nn.Conv3d, rank: int, alpha: float, scaling: float,
                 dropout: float = 0.0, dora: bool = False):
        super().__init__()
        if rank % base.groups:
            raise LorakitError(grouped_rank_problem(type(base).__name__, rank, base.groups, base.in_channels,
                                                    tuple(base.weight.shape[2:])))
        self.weight = base.weight
        self.bias = base.bias
        self.stride, self.padding, self.dilation, self.groups = base.stride, base.padding, base.dilation, base.groups
        self._conv_fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[self.weight.dim() - 2]
        # Kept out of the module tree (no state-dict keys, no second copy of W): only its forward is borrowed.
        self.__dict__["_own_forward"] = None if type(base).forward in _PLAIN_CONV_FORWARDS else base
        self.conv = self.convolve  # `lorakit.dora` calls module.conv(x, weight, bias, ...) as F.conv2d
        self.rank, self.alpha, self.scaling, self.strength, self.merged = rank, alpha, scaling, 1.0, False
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory: dict[str, Any] = {"device": self.weight.device, "dtype": self.weight.dtype}
        kernel = tuple(self.weight.shape[2:])
        a = torch.zeros(rank, base.in_channels // self.groups, *kernel, **factory)  # (rank, in / groups, *kernel)
        self.lora_A = _ConvFactor(nn.Parameter(a), self.convolve)
        one: Any = (1,) * len(kernel)
        b_conv: Any = type_of_conv(self.weight.dim())
        self.lora_B: nn.Conv2d = b_conv(rank, base.out_channels, one, groups=self.groups, bias=False,
                                        **factory)  # weight (out, rank / groups, 1, ...); typed as one of the three
        self.dora = dora
        _add_magnitude(self, base.out_channels, dora, factory)
        _zero_(self.lora_parameters())

    def convolve(self, x: Tensor, weight: Tensor, bias: Tensor | None, *_: Any) -> Tensor:
        """The base layer's convolution of `x` with `weight` and `bias` (the base's own forward for a subclass
        that has one). Extra arguments (stride, padding, ... as F.conv2d takes them) are the layer's and ignored."""
        own = self.__dict__["_own_forward"]
        if own is not None:
            swapped: dict[str, Any] = {"weight": weight, "bias": bias}
            return cast(Tensor, functional_call(own, swapped, (x,)))
        return cast(Tensor, self._conv_fn(x, weight, bias, self.stride, self.padding, self.dilation, self.groups))

    def forward(self, x: Tensor) -> Tensor:
        out = self.convolve(x, self.weight, self.bias)
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
        """A (rank, in / groups · prod(kernel)), a view; B (out, rank), with groups > 1 block-diagonal (group j's
        outputs use only A's rows of block j), a new tensor, so that ΔW = B @ A still holds."""
        a, b = self.lora_A.weight.flatten(1), self.lora_B.weight.flatten(1)  # b: (out, rank / groups)
        if self.groups == 1:
            return a, b
        return a, torch.block_diag(*b.chunk(self.groups, dim=0))  # (out, rank)

    def set_factors(self, a: Tensor, b: Tensor) -> None:
        """Write A (rank, fan_in) and B (out, rank); with groups > 1 only B's diagonal blocks are kept."""
        with torch.no_grad():
            self.lora_A.weight.copy_(a.view_as(self.lora_A.weight))
            if self.groups > 1:
                out_g, rank_g = b.shape[0] // self.groups, self.rank // self.groups
                b = torch.cat([b[j * out_g:(j + 1) * out_g, j * rank_g:(j + 1) * rank_g] for j in range(self.groups)])
            self.lora_B.weight.copy_(b.reshape(self.lora_B.weight.shape))

    def weight_matrix(self) -> Tensor:
        return self.weight.flatten(1)  # (out, in / groups * prod(kernel))

    def matrix_to_weight(self, matrix: Tensor) -> Tensor:
        return matrix.view(self.weight.shape)

    def lora_parameters(self) -> list[nn.Parameter]:
        return [cast(nn.Parameter, self.lora_A.weight), cast(nn.Parameter, self.lora_B.weight),
                *_magnitude(self)]

    def extra_repr(self) -> str:
        groups = f", groups={self.groups}" if self.groups > 1 else ""
        return (f"weight={tuple(self.weight.shape)}{groups}, rank={self.rank}, alpha={self.alpha:g}, "
                f"merged={self.merged}")


def type_of_conv(weight_dim: int) -> type[nn.Module]:
    """The plain convolution class for a weight of `weight_dim` dimensions (out, in, *kernel)."""
    kinds: dict[int, type[nn.Module]] = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}
    return kinds[weight_dim]


def grouped_rank_problem(name: str, rank: int, groups: int, in_channels: int, kernel: tuple[int, ...]) -> str:
    """Why `rank` does not fit a convolution with `groups` groups (rank must be a multiple of groups)."""
    fan_in = (in_channels // groups) * math.prod(kernel)
    depthwise = (f"; this is a depthwise convolution (one input channel per group): rank = {groups} gives each "
                 f"channel a rank-1 update of its {fan_in}-value kernel, with {fan_in + 1} factor values per "
                 f"channel, more than the kernel itself") if in_channels == groups else ""
    return (f"rank {rank} for {name}: a grouped convolution (groups={groups}) gets one low-rank update per group, "
            f"so rank must be a multiple of {groups} (as in PEFT){depthwise}; exclude it from the targets or set its "
            f"rank with rank_pattern")


def grouped_a_to_peft(module: LoraConv, a: Tensor) -> Tensor:
    """A in PEFT's layout: (rank, in, *kernel), a dense convolution (PEFT builds A without groups) that is zero
    outside the diagonal blocks, block j reading group j's input channels; with PEFT's grouped B, PEFT computes
    exactly this module's output."""
    rank_g, in_g = module.rank // module.groups, a.shape[1]
    dense = a.new_zeros(a.shape[0], in_g * module.groups, *a.shape[2:])
    for j in range(module.groups):
        dense[j * rank_g:(j + 1) * rank_g, j * in_g:(j + 1) * in_g] = a[j * rank_g:(j + 1) * rank_g]
    return dense


def grouped_a_from_peft(module: LoraConv, dense: Tensor, key: str) -> Tensor:
    """Inverse of `grouped_a_to_peft`; raises LorakitError when the dense A reads across groups (a PEFT adapter
    trained with groups > 1 has such an A: its update does not fit a grouped weight, and PEFT cannot merge it)."""
    in_g = module.lora_A.weight.shape[1]
    rank_g = module.rank // module.groups
    blocks = [dense[j * rank_g:(j + 1) * rank_g, j * in_g:(j + 1) * in_g] for j in range(module.groups)]
    a = torch.cat(blocks)
    outside = dense.clone()  # zero where `grouped_a_to_peft` writes; anything left reads across groups
    for j in range(module.groups):
        outside[j * rank_g:(j + 1) * rank_g, j * in_g:(j + 1) * in_g] = 0
    if bool(outside.ne(0).any()):
        raise LorakitError(f"{key}: this A reads input channels outside its own group (groups={module.groups}); "
                           "lorakit's grouped LoRA keeps each group's update inside its group, so that ΔW fits the "
                           "grouped weight and merges; this adapter's update cannot be expressed that way")
    return a


def peft_layout(modules: dict[str, LoraModule], params: dict[str, Tensor]) -> dict[str, Tensor]:
    """Adapter tensors by state-dict key, with each grouped convolution's A in PEFT's dense layout."""
    out = dict(params)
    for module, key in _grouped_a_keys(modules, out):
        out[key] = grouped_a_to_peft(module, out[key])
    return out


def lorakit_layout(modules: dict[str, LoraModule], found: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of `peft_layout`, for a file's tensors; a tensor of another shape is left for the caller's check."""
    out = dict(found)
    for module, key in _grouped_a_keys(modules, out):
        dense_shape = (module.rank, module.lora_A.weight.shape[1] * module.groups, *module.weight.shape[2:])
        if tuple(out[key].shape) == dense_shape:
            out[key] = grouped_a_from_peft(module, out[key], key)
    return out


def _grouped_a_keys(modules: dict[str, LoraModule], tensors: dict[str, Tensor]) -> list[tuple[LoraConv, str]]:
    """(module, its A's key) for every grouped convolution whose A is among `tensors`."""
    found: list[tuple[LoraConv, str]] = []
    for name, module in modules.items():
        key = f"{name}.lora_A.weight"
        if isinstance(module, LoraConv) and module.groups > 1 and key in tensors:
            found.append((module, key))
    return found


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
