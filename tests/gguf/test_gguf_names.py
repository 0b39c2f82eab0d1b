"""lorakit.gguf.names: GGUF tensor names, the q/k row order, the architecture check."""

from __future__ import annotations

import numpy as np
import pytest
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from lorakit.errors import LorakitError
from lorakit.gguf.names import Heads, check_architecture, gguf_name, to_gguf_rows


@pytest.mark.parametrize(("name", "rows"), [("blk.0.attn_q.weight", 64), ("blk.0.attn_k.weight", 32)])
def test_transformers_gguf_loader_undoes_the_q_k_row_order(name, rows) -> None:
    weight = np.random.default_rng(0).standard_normal((rows, 64)).astype(np.float32)
    written = to_gguf_rows(weight, name, Heads(q=4, kv=2))
    processor = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    assert not np.array_equal(written, weight)
    assert np.array_equal(processor.process(written, name).weights, weight)


def test_q_k_rows_pair_each_heads_two_halves() -> None:
    """Within a head of dim 4, transformers rotates entries (0, 2) and (1, 3) together; llama.cpp (0, 1), (2, 3)."""
    weight = np.arange(8, dtype=np.float32)[:, None]  # two heads of dim 4, one column
    assert to_gguf_rows(weight, "blk.0.attn_q.weight", Heads(q=2, kv=2))[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert to_gguf_rows(weight, "blk.0.attn_v.weight", Heads(q=2, kv=2)) is weight


@pytest.mark.parametrize(("key", "name"), [("model.embed_tokens.weight", "token_embd.weight"),
                                           ("model.norm.weight", "output_norm.weight"),
                                           ("lm_head.weight", "output.weight"),
                                           ("model.layers.11.self_attn.o_proj.weight", "blk.11.attn_output.weight"),
                                           ("model.layers.0.post_attention_layernorm.weight", "blk.0.ffn_norm.weight"),
                                           ("model.layers.2.mlp.down_proj.weight", "blk.2.ffn_down.weight")])
def test_llama_keys_get_gguf_names(key, name) -> None:
    assert gguf_name(key) == name


def test_a_key_without_gguf_counterpart_is_refused_by_name() -> None:
    with pytest.raises(LorakitError, match="'model.layers.0.self_attn.q_norm.weight' has no tensor"):
        gguf_name("model.layers.0.self_attn.q_norm.weight")


def test_other_architectures_are_refused_naming_the_supported_one() -> None:
    with pytest.raises(LorakitError, match="does not support Qwen2ForCausalLM; supported: LlamaForCausalLM"):
        check_architecture("Qwen2ForCausalLM")
