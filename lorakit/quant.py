"""A quantized base weight as a weight type: NF4 (with double quantization of its constants) and int8 (LLM.int8
style, one absmax per output row), stored by bitsandbytes.

This is the only module that imports bitsandbytes, and only when a model is quantized; a dense model never
touches it. A quantized weight is bitsandbytes' own parameter (`Params4bit` / `Int8Params`) adopted by the LoRA
module like a dense one; everything that reads it goes through `dequantize` (on demand, never cached) and
`linear` (whose backward dequantizes again instead of keeping an fp32 copy alive until the backward pass).
QLoRA (Dettmers et al., 2023, §3): a frozen NF4 base with block-wise absmax constants (block 64), themselves
quantized to 8 bits in blocks of 256 (double quantization), and fp32 (or bf16) LoRA factors.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import threading
from typing import Any, cast

import torch
from torch import Tensor, nn

from lorakit import gemm
from lorakit.errors import LorakitError

KINDS = ("nf4", "int8")
INSTALL_HINT = "pip install 'lorakit[quant]'"
NF4_BLOCK = 64  # QLoRA's block size for the NF4 constants


def bnb() -> Any:
    """The bitsandbytes module; raises `LorakitError` naming the extra to install when it is missing."""
    imported = sys.modules.get("bitsandbytes")
    if imported is not None:  # every matmul of a step asks: Logger.setLevel below clears every logger's cache
        return imported
    # On import, bitsandbytes warns on stderr that an optional accelerated CPU kernel (the `kernels` package) is
    # missing; its own fallback is what runs here, so the warning would only be a second line beside every error.
    noisy = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = noisy.level
    noisy.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError as exc:
        raise LorakitError(f"quantizing a model needs bitsandbytes, which is not installed ({INSTALL_HINT})") from exc
    finally:
        noisy.setLevel(level)
    return bitsandbytes


def check_kind(kind: object) -> str:
    """`kind` if it names a supported quantization, else a `LorakitError` listing them."""
    if kind not in KINDS:
        raise LorakitError(f"unknown quantization {kind!r}; expected one of {', '.join(KINDS)} (or none)")
    return str(kind)


def kind_of(weight: object) -> str | None:
    """'nf4' or 'int8' for a bitsandbytes-quantized weight, None for a dense one (without importing
    bitsandbytes: nothing is quantized while it is not loaded)."""
    if "bitsandbytes" not in sys.modules:
        return None
    if getattr(weight, "quant_state", None) is not None:
        return str(weight.quant_state.quant_type)  # type: ignore[attr-defined]
    if getattr(weight, "SCB", None) is not None and not getattr(weight, "has_fp16_weights", True):
        return "int8"
    return None


def is_quantized(weight: object) -> bool:
    return kind_of(weight) is not None


def shape(weight: Tensor) -> tuple[int, int]:
    """The (out, in) shape of the matrix a weight stands for (NF4 stores it packed, two values per byte)."""
    if getattr(weight, "quant_state", None) is not None:
        out, fan_in = weight.quant_state.shape  # type: ignore[attr-defined]
        return int(out), int(fan_in)
    return int(weight.shape[0]), int(weight.shape[1])


def dequantize(weight: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The (out, in) matrix a quantized weight stands for, freshly computed in `dtype` (a dense weight is
    returned as it is). The int8 formula is bitsandbytes' own: W ≈ CB · SCB / 127 per output row."""
    kind = kind_of(weight)
    if kind is None:
        return weight
    with torch.no_grad():
        if kind == "int8":
            scb: Tensor = weight.SCB  # type: ignore[attr-defined]
            return (weight.data.float() * (scb.float()[:, None] / 127.0)).to(dtype)
        matrix: Tensor = bnb().functional.dequantize_4bit(weight.data, weight.quant_state)  # type: ignore[attr-defined]
        return matrix.to(dtype)


_KERNEL_SUFFIX = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_scratch = threading.local()


def dequantize_transient(weight: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """`dequantize(weight, dtype)` written into a per-thread scratch buffer, one per (dtype, device) whatever the
    shape, that the next call overwrites: for a matmul that consumes the matrix at once, never to be kept.

    A training step dequantizes every projection twice. Fresh (out, in) buffers each time cost page faults, and
    interleaved with the activations that stay alive they fragment the heap, so that the step's peak resident
    memory grows by about the size of the weights quantization saved (measured in docs/quantization.md). One
    buffer serves every shape: the largest projection's size, not the sum over shapes."""
    kind = kind_of(weight)
    if kind is None:
        return weight
    rows, cols = shape(weight)
    out = _scratch_buffer("matrix", rows * cols, dtype, weight.device).view(rows, cols)
    with torch.no_grad():
        if kind == "int8":
            scb: Tensor = weight.SCB  # type: ignore[attr-defined]
            torch.mul(weight.data, (scb.float()[:, None] / 127.0).to(dtype), out=out)
        else:
            _dequantize_nf4_into(weight, out)
    return out


def _dequantize_nf4_into(weight: Tensor, out: Tensor) -> None:
    """bitsandbytes' NF4 decoding of `weight` into `out`. Its CPU kernel has no `out=` form, so on the CPU the
    kernel behind it is called with our buffer (the same arithmetic: equal bit for bit, tested); elsewhere, and
    wherever that kernel would not run (odd widths, blocks of 2048 and more), bitsandbytes' own function."""
    state = weight.quant_state  # type: ignore[attr-defined]
    rows, cols = out.shape
    kernel = None
    if out.device.type == "cpu" and cols % 2 == 0 and state.blocksize < 2048 and out.dtype in _KERNEL_SUFFIX:
        kernel = _cpu_kernel(f"cdequantize_blockwise_cpu_nf4_{_KERNEL_SUFFIX[out.dtype]}")
    if kernel is None:
        lib = bnb()
        if out.device.type == "cpu":
            out.copy_(lib.functional.dequantize_4bit(weight.data, state))
        else:
            lib.functional.dequantize_4bit(weight.data, state, out=out)
        return
    absmax = _block_absmax_transient(state) if state.nested else state.absmax.float()
    codes = weight.data.view(torch.uint8).reshape(rows, cols // 2)
    kernel(_pointer(codes), _pointer(absmax), _pointer(out), ctypes.c_longlong(state.blocksize),
           ctypes.c_longlong(rows), ctypes.c_longlong(cols))


_cpu_kernels: dict[str, Any] = {}


def _cpu_kernel(name: str) -> Any:
    """bitsandbytes' native CPU function `name`, or None where its library lacks it; looked up once."""
    if name not in _cpu_kernels:
        _cpu_kernels[name] = getattr(bnb().cextension.lib, name, None)
    return _cpu_kernels[name]


def _pointer(tensor: Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(tensor.data_ptr())


def _scratch_buffer(name: str, size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The first `size` entries of a per-thread flat buffer, one per (name, dtype, device), grown when a larger
    size is asked for: the next call with the same name overwrites it."""
    buffers: dict[tuple[Any, ...], Tensor] = getattr(_scratch, "buffers", None) or {}
    _scratch.buffers = buffers
    key = (name, dtype, device)
    if key not in buffers or buffers[key].numel() < size:
        buffers[key] = torch.empty(size, dtype=dtype, device=device)
    return buffers[key][:size]


def _block_absmax_transient(state: Any) -> Tensor:
    """The fp32 absmax of every NF4 block, decoded from double quantization (its 8-bit codes x the second level's
    absmax per block of 256, plus the offset) into scratch buffers: on the CPU bitsandbytes' own kernel, elsewhere
    its `dequantize_blockwise` arithmetic (one fp32 product, then the offset), without its fresh buffers."""
    codes, second = state.absmax, state.state2
    blocks, block = codes.numel(), second.blocksize
    decoded = _scratch_buffer("absmax", blocks, torch.float32, codes.device)
    kernel = _cpu_kernel("cdequantize_blockwise_cpu_fp32") if codes.device.type == "cpu" else None
    if (kernel is not None and codes.dtype == torch.uint8 and codes.is_contiguous()
            and second.code.dtype == second.absmax.dtype == torch.float32):
        kernel(_pointer(second.code), _pointer(codes), _pointer(second.absmax), _pointer(decoded),
               ctypes.c_longlong(block), ctypes.c_longlong(blocks))
        return decoded.add_(state.offset)
    index = _scratch_buffer("absmax-index", blocks, torch.int32, codes.device)
    index.copy_(codes.view(-1))
    torch.index_select(second.code, 0, index, out=decoded)
    whole = blocks - blocks % block
    decoded[:whole].view(-1, block).mul_(second.absmax[: whole // block, None])
    if whole < blocks:
        decoded[whole:].mul_(second.absmax[whole // block])
    return decoded.add_(state.offset)


def quantize_weight(matrix: Tensor, kind: str) -> nn.Parameter:
    """A frozen bitsandbytes parameter holding `matrix` (out, in) quantized as `kind` (on the CPU)."""
    check_kind(kind)
    lib = bnb()
    data = matrix.detach().to(torch.float32).contiguous().clone()
    param: nn.Parameter
    if kind == "nf4":
        param = lib.nn.Params4bit(data, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                  blocksize=NF4_BLOCK)
    else:
        param = lib.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False)
    quantized = cast(nn.Parameter, param.to(matrix.device))  # bitsandbytes quantizes on .to()
    return quantized


def quantize_linear(linear: nn.Linear, kind: str, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """A bitsandbytes `Linear4bit` (NF4, double quantization) or `Linear8bitLt` with `linear`'s weight quantized
    and its bias kept dense."""
    lib = bnb()
    bias = linear.bias is not None
    module: nn.Module
    if kind == "nf4":
        module = lib.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype,
                                   compress_statistics=True, quant_type="nf4", device="meta")
    else:
        module = lib.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                     device="meta")
    if kind == "nf4":
        # bitsandbytes would otherwise repack the codes in place into a CPU-only layout on the first eval forward
        # (and fail for fan_in < 64): the stored form must stay the one `dequantize` and the file formats read.
        module.support_avx512bf16_for_cpu = False  # type: ignore[assignment]
    module.weight = quantize_weight(linear.weight.data.to("cpu") if linear.weight.device.type != "cpu"
                                    else linear.weight.data, kind)
    if linear.bias is not None:
        module.bias = nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=linear.bias.requires_grad)
    return module


def stored_bytes(weight: Tensor) -> int:
    """Bytes a weight occupies, quantization constants included (for NF4: the packed codes, the 8-bit absmax per
    block of 64, and the second level's fp32 absmax per 256 blocks, code table and offset)."""
    kind = kind_of(weight)
    if kind is None:
        return weight.numel() * weight.element_size()
    if kind == "int8":
        scb: Tensor = weight.SCB  # type: ignore[attr-defined]
        return weight.numel() * weight.element_size() + scb.numel() * scb.element_size()
    state = weight.quant_state  # type: ignore[attr-defined]
    tensors = [weight.data, state.absmax, state.code]
    if state.nested:
        tensors += [state.state2.absmax, state.state2.code, state.offset]
    return sum(t.numel() * t.element_size() for t in tensors)


class _QuantLinear(torch.autograd.Function):
    """x Wᵀ + b with W dequantized in forward and again in backward: the only saved tensor is the input (the
    stored weight is referenced, not copied), so a step never holds an fp32 copy of every layer's weight."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.weight = weight
        ctx.dtype = x.dtype
        return gemm.linear(x, dequantize_transient(weight, x.dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, Tensor | None]:
        need_x, _, need_bias = ctx.needs_input_grad
        flat = grad.reshape(-1, grad.shape[-1])  # (N, out)
        grad_x = None
        if need_x:
            grad_x = gemm.matmul(flat, dequantize_transient(ctx.weight, grad.dtype)).view(*grad.shape[:-1], -1)
        grad_bias = flat.sum(0) if need_bias else None
        return grad_x, None, grad_bias


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`F.linear` over a quantized (frozen) weight; x (..., in) -> (..., out)."""
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        out: Tensor = _QuantLinear.apply(x, weight, bias)
        return out
    return gemm.linear(x, dequantize_transient(weight, x.dtype), bias)


def _is_dense_lora_linear(module: nn.Module) -> bool:
    """A lorakit `LoraLinear` over a dense `nn.Linear` weight (checked structurally: `lorakit.layers` imports
    this module)."""
    return (hasattr(module, "lora_A") and getattr(module, "quantized", None) is False
            and getattr(module, "fan_in_fan_out", True) is False and not getattr(module, "dora", False))


def block_linear_names(model: nn.Module) -> list[str]:
    """The `nn.Linear` layers inside the model's repeated blocks (children of an `nn.ModuleList`), and LoRA
    modules over them: the layers QLoRA quantizes. Embeddings, norms, poolers and task heads sit outside the
    blocks and stay dense."""
    modules = dict(model.named_modules())
    lists = [name for name, m in modules.items() if isinstance(m, nn.ModuleList) and name]
    return [name for name, m in modules.items()
            if (type(m) is nn.Linear or _is_dense_lora_linear(m)) and any(name.startswith(p + ".") for p in lists)
            and not hasattr(modules.get(name.rpartition(".")[0]), "lora_A")]  # not a LoRA factor


def quantize_model(model: nn.Module, kind: str, compute_dtype: torch.dtype = torch.float32) -> list[str]:
    """Replace, in place, every linear layer of the model's blocks by its quantized form; returns their names.
    Raises `LorakitError` for an unknown kind, a missing bitsandbytes, or a model with no such layers (nothing
    changed then)."""
    check_kind(kind)
    bnb()
    names = block_linear_names(model)
    if not names:
        raise LorakitError(f"{type(model).__name__} has no linear layers inside repeated blocks to quantize")
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        module = getattr(parent, leaf)
        if type(module) is nn.Linear:
            setattr(parent, leaf, quantize_linear(module, kind, compute_dtype))
        else:  # an adapted layer (a principal init's residual, or an adapter loaded on the dense base)
            module.weight = quantize_weight(module.weight.data, kind)
            module.quantized = True
    own_dense_tensors(model)
    model.lorakit_quantization = kind  # type: ignore[assignment]
    return names


def own_dense_tensors(model: nn.Module) -> None:
    """Copy the model's dense parameters and buffers into memory of their own, tensors that shared a storage
    (tied embeddings) still sharing one.

    transformers loads a safetensors checkpoint as views of the memory-mapped file. Once the block linears are
    quantized, the embeddings and norms that stay dense would keep the whole file mapped, and every page of the
    fp32 weights that quantizing read stays resident: about 400 MB for SmolLM2 (docs/quantization.md)."""
    copies: dict[int, torch.UntypedStorage] = {}  # by the data pointer of the storage copied
    owned: set[int] = set()  # data pointers of the copies (a tied tensor is met once per module holding it)
    with torch.no_grad():
        for module in model.modules():
            for registry in (module._parameters, module._buffers):
                for tensor in registry.values():
                    if tensor is None or is_quantized(tensor) or tensor.device.type == "meta":
                        continue
                    storage = tensor.untyped_storage()
                    if storage.data_ptr() in owned:
                        continue
                    if storage.nbytes() != tensor.numel() * tensor.element_size():  # a view into a larger block
                        tensor.data = tensor.data.clone()
                        owned.add(tensor.untyped_storage().data_ptr())
                        continue
                    if storage.data_ptr() not in copies:
                        copies[storage.data_ptr()] = storage.clone()
                        owned.add(copies[storage.data_ptr()].data_ptr())
                    tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device).set_(
                        copies[storage.data_ptr()], tensor.storage_offset(), tensor.size(), tensor.stride())


def model_quantization(model: nn.Module) -> str | None:
    """The kind `quantize_model` applied to `model`, or None for a dense model."""
    kind = getattr(model, "lorakit_quantization", None)
    return kind if isinstance(kind, str) else None


def numel(weight: Tensor) -> int:
    """Entries of the matrix a weight stands for (NF4 stores two per byte)."""
    if getattr(weight, "quant_state", None) is not None:
        out, fan_in = shape(weight)
        return out * fan_in
    return weight.numel()


def base_bytes(model: nn.Module) -> dict[str, int]:
    """Stored bytes of the model's weights: 'quantized' (bitsandbytes weights, constants included), 'dense'
    (everything else, each storage counted once) and 'total'."""
    quantized = dense = 0
    seen: set[int] = set()
    for p in model.parameters():
        if is_quantized(p):
            quantized += stored_bytes(p)
            continue
        ptr = p.untyped_storage().data_ptr() if p.device.type != "meta" else id(p)
        if ptr in seen:
            continue
        seen.add(ptr)
        dense += p.numel() * p.element_size()
    return {"quantized": quantized, "dense": dense, "total": quantized + dense}
