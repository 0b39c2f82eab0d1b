"""A model, with an adapter's ΔW folded in, as one GGUF file that llama.cpp and Ollama run.

    export_gguf("smollm2", "smollm2.gguf")                                        # the base alone
    export_gguf("smollm2", "tuned.gguf", adapter="runs/mt-lora/adapter", type="q8_0")

The file holds llama.cpp's `llama` architecture: the hyperparameters under `llama.*`, the tensors under GGUF's
names (`token_embd`, `blk.N.attn_q`, ...), the q/k rows in llama.cpp's rotary order, and the tokenizer with its
chat template. transformers reads it back with `from_pretrained(dir, gguf_file=name)`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lorakit.errors import LorakitError
from lorakit.gguf.names import Heads, check_architecture, check_config, gguf_name, rope_parameters, to_gguf_rows
from lorakit.gguf.output import check_out_file, write_atomically
from lorakit.gguf.tokenizer import write_tokenizer

log = logging.getLogger(__name__)

# --type: the file type recorded in general.file_type, and the type of 2-D weights (norms stay f32 in both).
TYPES: dict[str, tuple[gguf.LlamaFileType, gguf.GGMLQuantizationType]] = {
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}


@dataclass
class GgufExport:
    """What `export_gguf` wrote: the file, its size, its tensors by GGML type and the seconds it took."""

    out: Path
    bytes: int
    tensor_types: dict[str, str]
    seconds: float

    def as_json(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for kind in self.tensor_types.values():
            counts[kind] = counts.get(kind, 0) + 1
        return {"out": str(self.out), "bytes": self.bytes, "tensors": counts, "seconds": round(self.seconds, 2)}


def export_gguf(model_name_or_dir: str | None, out_file: str | Path, *, adapter: str | Path | None = None,
                type: str = "f16", force: bool = False) -> GgufExport:
    """Write `model_name_or_dir` (a bundled name, model directory or hub id; with `adapter`, default: the base the
    adapter records), with `adapter`'s ΔW merged into W in fp32, as a GGUF file at `out_file`.

    type: `f16` (2-D weights in f16, norms in f32, as llama.cpp's converter writes them) or `q8_0` (2-D weights
        with rows of a multiple of 32 in Q8_0, 8-bit blocks of 32 with one f16 scale; others f16).
    force: replace an existing GGUF file at `out_file` (never a directory or another kind of file).

    Raises LorakitError for an unknown type, an existing `out_file` without `force`, a model other than a
    LlamaForCausalLM (named), a LLaMA variant the `llama` architecture would run differently, or a tokenizer
    llama.cpp cannot reproduce; all before anything is written.
    """
    started = time.perf_counter()
    if type not in TYPES:
        raise LorakitError(f"type must be one of {', '.join(TYPES)}, got {type!r}")
    out = check_out_file(out_file, force=force)
    model, tokenizer = _load(model_name_or_dir, adapter)
    arch = check_architecture(type_name(model))
    config: Any = model.config
    heads = check_config(config)
    from lorakit.merge import merged_state_dict

    state = merged_state_dict(model) if adapter is not None else model.state_dict()
    tensors = gguf_tensors(state, heads, tied=bool(getattr(config, "tie_word_embeddings", False)))
    file_type, weight_type = TYPES[type]
    written: dict[str, str] = {}

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(_model_name(model_name_or_dir, adapter, config))
        write_hyperparameters(writer, config, heads)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_tokenizer(writer, tokenizer, int(config.vocab_size))
        for name, value in tensors.items():
            written[name] = add_tensor(writer, name, value, weight_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    write_atomically(out, write, what="GGUF model")
    seconds = time.perf_counter() - started
    log.info("wrote %s (%s, %d tensors) in %.1f s", out, type, len(written), seconds)
    return GgufExport(out, out.stat().st_size, written, seconds)


def _load(model: str | None, adapter: str | Path | None) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    if adapter is not None:
        from lorakit.inference import load_for_inference
        from lorakit.io import adapter_quantization

        kind = adapter_quantization(adapter)
        if kind is not None:
            raise LorakitError(f"{adapter} was trained on a {kind} base; merge it first (lorakit merge --merge-path "
                               "dequantized, see docs/quantization.md) and export the merged directory")
        loaded = load_for_inference(model, adapter)
        return loaded.model, loaded.tokenizer
    if model is None:
        raise LorakitError("export_gguf needs a model (a bundled name, model directory or hub id) or an adapter")
    from lorakit.models import load_model

    return load_model(model)


def type_name(model: nn.Module) -> str:
    """The class name of `model` (`LlamaForCausalLM`); a function because `export_gguf`'s `type` argument hides
    the builtin there."""
    return type(model).__name__


def _model_name(model: str | None, adapter: str | Path | None, config: Any) -> str:
    base = model or getattr(config, "_name_or_path", None) or "model"
    return f"{Path(str(base)).name} + {Path(adapter).name}" if adapter is not None else Path(str(base)).name


def write_hyperparameters(writer: gguf.GGUFWriter, config: Any, heads: Heads) -> None:
    """The `llama.*` keys llama.cpp and transformers' GGUF loader read: sizes, heads, rotary base and dims, eps."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads.q
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(heads.q)
    writer.add_head_count_kv(heads.kv)
    writer.add_rope_freq_base(float(rope_parameters(config)["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_rope_dimension_count(int(head_dim))
    if head_dim * heads.q != config.hidden_size:  # llama.cpp assumes hidden/heads unless told
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))


def gguf_tensors(state: dict[str, torch.Tensor], heads: Heads, *, tied: bool) -> dict[str, np.ndarray]:
    """A merged LLaMA state dict as float32 arrays under GGUF names, q/k rows reordered; `lm_head` is left out
    when it is tied to the embeddings and equal to them (GGUF readers then use `token_embd` for both)."""
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from rope.freq_base
        if key == "lm_head.weight" and tied and torch.equal(value, state["model.embed_tokens.weight"]):
            continue
        name = gguf_name(key)
        out[name] = to_gguf_rows(value.detach().float().cpu().numpy(), name, heads)
    return out


def add_tensor(writer: gguf.GGUFWriter, name: str, value: np.ndarray,
               weight_type: gguf.GGMLQuantizationType) -> str:
    """Add one tensor: 1-D (norms) in f32; 2-D in `weight_type`, falling back to f16 for Q8_0 when a row is not
    a whole number of 32-value blocks. Returns the GGML type's name."""
    if value.ndim < 2:
        writer.add_tensor(name, np.ascontiguousarray(value, dtype=np.float32))
        return "F32"
    block, _ = gguf.GGML_QUANT_SIZES[weight_type]
    if weight_type == gguf.GGMLQuantizationType.F16 or value.shape[-1] % block != 0:
        writer.add_tensor(name, np.ascontiguousarray(value, dtype=np.float16))
        return "F16"
    data = gguf.quants.quantize(np.ascontiguousarray(value, dtype=np.float32), weight_type)
    writer.add_tensor(name, data, raw_dtype=weight_type)
    return weight_type.name
