"""Merging an adapter trained on a quantized base: three explicit paths, each measured.

    dequantized   W ← deq(Q(W)) + ΔW, stored dense (fp32 or bf16): exactly the weights training saw.
    requantized   W ← Q(deq(Q(W)) + ΔW) in the base's own format: small, but ΔW meets a second rounding, which can
                  be as large as ΔW itself (the adapter's effect is partly lost).
    original      W ← W_fp + ΔW on the original full-precision base: what merging a QLoRA adapter with PEFT onto a
                  dense checkpoint does; the adapter learnt to correct Q(W), not W, so the quantization error
                  deq(Q(W)) - W_fp is left in the output.

Each path reports, on a probe batch, the largest |Δlogit| and the mean KL(p_unmerged ‖ p_merged) against the
unmerged quantized model; `merge_quantized` never chooses a path by itself.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lorakit import quant
from lorakit.errors import LorakitError, MergeStateError
from lorakit.inject import adapter_state
from lorakit.io import adapter_quantization
from lorakit.layers import lora_modules
from lorakit.merge import delta_weight, is_merged

MERGE_PATHS = ("dequantized", "requantized", "original")


@dataclass
class MergeError:
    """A merge path's error on a probe batch against the unmerged quantized model."""

    path: str
    max_abs_logit: float
    mean_kl: float

    def __str__(self) -> str:
        return f"merge path {self.path}: max |Δlogit| {self.max_abs_logit:.3g}, mean KL {self.mean_kl:.3g}"


def check_path(path: object) -> str:
    if path not in MERGE_PATHS:
        raise LorakitError(f"unknown merge path {path!r}; expected one of {', '.join(MERGE_PATHS)}")
    return str(path)


def logits(model: nn.Module, probe: Mapping[str, Tensor]) -> Tensor:
    """The model's logits on `probe` (keyword inputs), in fp32, without gradients."""
    with torch.no_grad():
        out = model(**probe)
    value = out.logits if hasattr(out, "logits") else out
    return value.float()


def logit_error(path: str, merged: Tensor, reference: Tensor) -> MergeError:
    """max |merged - reference| and the mean over positions of KL(softmax(reference) ‖ softmax(merged))."""
    kl = F.kl_div(F.log_softmax(merged, -1), F.log_softmax(reference, -1), log_target=True, reduction="none")
    return MergeError(path, (merged - reference).abs().max().item(), kl.sum(-1).mean().item())


def _dense_linear(layer: nn.Module, weight: Tensor) -> nn.Linear:
    out_features, in_features = weight.shape
    dense = nn.Linear(in_features, out_features, bias=isinstance(getattr(layer, "bias", None), Tensor), device="meta")
    dense.weight = nn.Parameter(weight, requires_grad=False)
    bias = getattr(layer, "bias", None)
    if isinstance(bias, Tensor):
        dense.bias = nn.Parameter(bias.data.to(weight.dtype), requires_grad=False)
    return dense


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> None:
    """Replace every remaining bitsandbytes layer (the block linears without an adapter) by a dense `nn.Linear`
    holding its dequantized weight, so the model saves as a plain checkpoint."""
    for name, module in list(model.named_modules()):
        weight = getattr(module, "weight", None)
        if hasattr(module, "lora_A") or not isinstance(weight, Tensor) or not quant.is_quantized(weight):
            continue
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, _dense_linear(module, quant.dequantize(weight, dtype)))
    model.lorakit_quantization = None  # type: ignore[assignment]


def merge_quantized(model: nn.Module, path: str, *, original: nn.Module | None = None,
                    probe: Mapping[str, Tensor] | None = None, dtype: torch.dtype = torch.float32
                    ) -> tuple[nn.Module, MergeError | None]:
    """Merge the adapters of `model` (its base quantized by `lorakit.quant`) by `path` and return the merged
    model with its error on `probe` (None without a probe).

    dequantized / requantized: merge in place into `model` (dequantized: every quantized layer becomes a dense
        one in `dtype`, so `merged_state_dict` / `export_merged` save a plain checkpoint).
    original: add ΔW to `original`, the unadapted full-precision base of the same architecture, in place, and
        return it; `model` is left unmerged.

    Raises `MergeStateError` when already merged, `LorakitError` for an unknown path, a base that is not
    quantized, a missing `original` or a non-finite ΔW; nothing changes then.
    """
    check_path(path)
    if is_merged(model):
        raise MergeStateError("adapters are already merged; merging twice would add ΔW twice (load it again)")
    adapter_state(model)
    modules = lora_modules(model)
    kinds = {quant.kind_of(m.weight) for _, m in modules}
    if None in kinds or not kinds:
        raise LorakitError("merge_quantized needs adapters on a quantized base; use lorakit.merge for a dense one")
    if path == "original" and original is None:
        raise LorakitError("merge path 'original' needs the full-precision base model (original=...)")
    deltas = [(name, module, delta_weight(module)) for name, module in modules]
    broken = [name for name, _, d in deltas if not torch.isfinite(d).all()]
    if broken:
        raise LorakitError(f"ΔW of {broken[0]!r} has NaN or inf values; nothing was merged")
    reference = logits(model, probe) if probe is not None else None
    merged = model
    with torch.no_grad():
        if path == "original":
            assert original is not None
            targets = dict(original.named_modules())
            missing = [name for name, _, _ in deltas if not isinstance(targets.get(name), nn.Linear)]
            if missing:
                raise LorakitError(f"the original base has no linear layer {missing[0]!r}; pass the model the "
                                   "adapter's base was quantized from")
            for name, _, delta in deltas:
                weight = targets[name].weight
                weight.copy_((weight.float() + delta).to(weight.dtype))
            merged = original
        else:
            for _, module, delta in deltas:
                kind = quant.kind_of(module.weight)
                matrix = quant.dequantize(module.weight, torch.float32) + delta
                if path == "requantized" and kind is not None:
                    module.weight = quant.quantize_weight(matrix, kind)
                else:
                    module.weight = nn.Parameter(matrix.to(dtype), requires_grad=False)
                    module.quantized = False  # type: ignore[attr-defined]
                module.merged = True
            if path == "dequantized":
                dequantize_model(model, dtype)
    error = logit_error(path, logits(merged, probe), reference) if probe is not None and reference is not None \
        else None
    return merged, error


PROBE_TEXTS = ("The capital of France is Paris.", "A quiet film that rewards patience.",
               "Write a short poem about the sea.", "def add(a, b):\n    return a + b")


def probe_batch(tokenizer: PreTrainedTokenizerBase) -> dict[str, Tensor]:
    """A fixed batch of four short texts, padded, as keyword inputs."""
    batch = tokenizer(list(PROBE_TEXTS), padding=True, truncation=True, max_length=32, return_tensors="pt")
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}


def merge_quantized_adapter(adapter: str | Path, out_dir: str | Path, path: str | None, *, model: str | None = None,
                            dtype: str = "float32", force: bool = False) -> tuple[Path, MergeError]:
    """`lorakit merge --merge-path PATH`: load the adapter on its base quantized as it was in training, merge by
    `path` and write a plain transformers directory; returns it with the error on a probe batch.

    Raises `LorakitError` (before anything is written) when the adapter was not trained on a quantized base,
    when `path` is missing or unknown, and for `requantized`, whose bitsandbytes codes no checkpoint written here
    can carry back (transformers would load them as a plain matrix).
    """
    from lorakit.export import DTYPES, export_merged, model_card
    from lorakit.inference import load_for_inference
    from lorakit.outputs import claim_output_dir

    kind = adapter_quantization(adapter)
    if kind is None:
        raise LorakitError(f"--merge-path applies to adapters trained on a quantized base; {adapter} was trained "
                           "on a dense one (merge it without --merge-path)")
    if path is None:
        raise LorakitError(f"{adapter} was trained on a {kind} base; name the merge path with --merge-path "
                           f"({' | '.join(MERGE_PATHS)}; see docs/quantization.md)")
    check_path(path)
    if path == "requantized":
        raise LorakitError(f"a re-quantized ({kind}) merged model cannot be saved as a checkpoint that reloads as "
                           "the same model; use --merge-path dequantized (what training saw) or original")
    if dtype not in DTYPES:
        raise LorakitError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    claim_output_dir(out_dir, kind="merged model", force=force, inputs=[adapter] + ([model] if model else []))
    loaded = load_for_inference(model, adapter, dense=True)  # a principal residual is rebuilt from the dense W
    dense = copy.deepcopy(loaded.model) if path == "original" else None
    quant.quantize_model(loaded.model, kind)  # the model as it was trained
    probe = probe_batch(loaded.tokenizer)
    card = model_card(loaded.base, Path(adapter), loaded.task_state, dtype, loaded.model)
    if dense is not None:  # the adapter on the full-precision base, merged there by the dense path
        error = logit_error(path, logits(dense, probe), logits(loaded.model, probe))
        return export_merged(dense, out_dir, loaded.tokenizer, dtype=DTYPES[dtype], card=card), error
    merged, measured = merge_quantized(loaded.model, path, probe=probe)
    assert measured is not None
    return export_merged(merged, out_dir, loaded.tokenizer, dtype=DTYPES[dtype], card=card), measured
