"""Hugging Face LLaMA names and shapes in GGUF's terms: the architecture check, the tensor-name map and the q/k
row order llama.cpp expects.

    gguf_name("model.layers.3.self_attn.q_proj.weight")   # 'blk.3.attn_q.weight'
    to_gguf_rows(w, "blk.3.attn_q.weight", heads)          # rows reordered for llama.cpp's rotary embedding

Tensor names come from `gguf.TENSOR_NAMES`, so they are the ones `gguf.MODEL_TENSORS[MODEL_ARCH.LLAMA]` lists.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSOR, TENSOR_NAMES

from lorakit.errors import LorakitError

# The transformers model classes this exporter writes, and the GGUF architecture of each.
SUPPORTED: dict[str, MODEL_ARCH] = {"LlamaForCausalLM": MODEL_ARCH.LLAMA}
ARCH = MODEL_ARCH_NAMES[MODEL_ARCH.LLAMA]  # "llama", the prefix of the hyperparameter keys

_TOP: dict[str, MODEL_TENSOR] = {
    "model.embed_tokens": MODEL_TENSOR.TOKEN_EMBD,
    "model.norm": MODEL_TENSOR.OUTPUT_NORM,
    "lm_head": MODEL_TENSOR.OUTPUT,
}
_BLOCK: dict[str, MODEL_TENSOR] = {
    "input_layernorm": MODEL_TENSOR.ATTN_NORM,
    "self_attn.q_proj": MODEL_TENSOR.ATTN_Q,
    "self_attn.k_proj": MODEL_TENSOR.ATTN_K,
    "self_attn.v_proj": MODEL_TENSOR.ATTN_V,
    "self_attn.o_proj": MODEL_TENSOR.ATTN_OUT,
    "post_attention_layernorm": MODEL_TENSOR.FFN_NORM,
    "mlp.gate_proj": MODEL_TENSOR.FFN_GATE,
    "mlp.up_proj": MODEL_TENSOR.FFN_UP,
    "mlp.down_proj": MODEL_TENSOR.FFN_DOWN,
}
_BLOCK_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")


@dataclass(frozen=True)
class Heads:
    """Attention heads of the query and of the key/value projections (grouped-query attention: kv <= q)."""

    q: int
    kv: int


def check_architecture(model_class: str) -> MODEL_ARCH:
    """The GGUF architecture of a transformers model class; LorakitError naming it and the supported ones."""
    if model_class not in SUPPORTED:
        raise LorakitError(f"GGUF export does not support {model_class}; supported: {', '.join(SUPPORTED)} "
                           "(a causal LM; a classifier or encoder has no llama.cpp counterpart here)")
    return SUPPORTED[model_class]


def check_config(config: Any) -> Heads:
    """Refuse LLaMA variants llama.cpp's `llama` architecture would run differently from transformers: rope scaling,
    biases, another activation. Returns the head counts the q/k reordering needs."""
    problems = []
    rope = rope_parameters(config)
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_type {rope.get('rope_type')!r} (only plain rotary embeddings are written)")
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config.hidden_act!r} (llama.cpp's llama uses silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            problems.append(f"{flag}=true (the exporter writes no bias tensors)")
    if problems:
        raise LorakitError(f"GGUF export cannot write this LLaMA model: {'; '.join(problems)}")
    heads = config.num_attention_heads
    return Heads(q=heads, kv=getattr(config, "num_key_value_heads", None) or heads)


def rope_parameters(config: Any) -> dict[str, Any]:
    """{"rope_theta": ..., "rope_type": ...} from a transformers 5 `rope_parameters` or the older fields."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    scaling = getattr(config, "rope_scaling", None)
    if scaling and "rope_type" not in params:
        params["rope_type"] = scaling.get("rope_type", scaling.get("type"))
    return params


def gguf_name(hf_key: str) -> str:
    """The GGUF name of a transformers LLaMA state-dict key (`model.layers.0.mlp.up_proj.weight` ->
    `blk.0.ffn_up.weight`); LorakitError for a key with no GGUF counterpart."""
    owner, _, leaf = hf_key.rpartition(".")
    if owner in _TOP:
        return f"{TENSOR_NAMES[_TOP[owner]]}.{leaf}"
    match = _BLOCK_KEY.fullmatch(owner)
    if match and match.group(2) in _BLOCK:
        return f"{TENSOR_NAMES[_BLOCK[match.group(2)]].format(bid=int(match.group(1)))}.{leaf}"
    raise LorakitError(f"{hf_key!r} has no tensor in GGUF's llama layout; the exporter knows the LLaMA keys "
                       "(embed_tokens, layers.N.self_attn/mlp projections and norms, norm, lm_head)")


def to_gguf_rows(weight: np.ndarray, name: str, heads: Heads) -> np.ndarray:
    """`weight` (out, ...) with its rows in llama.cpp's order for `name`: the q and k projections' rows are
    reordered per head from transformers' half-split rotary layout (rotate_half) to llama.cpp's interleaved
    pairs, as llama.cpp's converter does; other tensors are returned as they are. transformers' GGUF loader
    applies the inverse on reading."""
    if ".attn_q." in name:
        n = heads.q
    elif ".attn_k." in name:
        n = heads.kv
    else:
        return weight
    shape = weight.shape
    # (n, 2, head_dim/2, ...): the two halves of each head -> (n, head_dim/2, 2, ...): their entries paired
    return weight.reshape(n, 2, shape[0] // n // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
