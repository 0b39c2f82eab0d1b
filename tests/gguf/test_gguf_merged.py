"""export_gguf: a tiny LLaMA with a LoRA adapter merged, read back by transformers' own GGUF loader."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import assert_close
from gguf_models import lora_adapter, tiny_llama_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit.errors import LorakitError
from lorakit.gguf import export_gguf
from lorakit.gguf.merged import add_tensor
from lorakit.inference import load_for_inference
from lorakit.merge import adapters_disabled, merged_state_dict

IDS = torch.tensor([[1, 40, 7, 255, 300, 12, 99, 3, 64]])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gguf-merged")
    base = tiny_llama_dir(root / "base")
    return base, lora_adapter(root / "adapter", base)


def _gguf_logits(path: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(IDS).logits


def _logits_with(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits of `model`'s architecture with the plain weights `state` (no adapter)."""
    plain = type(model)(model.config).eval()
    plain.load_state_dict(state, strict=True)
    with torch.no_grad():
        return plain(IDS).logits


def _q8_0(w: torch.Tensor) -> torch.Tensor:
    """Q8_0 written out: per block of 32 along a row, d = max|x| / 127, q = round(x / d), stored as q and d in
    f16, read back as q · f16(d)."""
    blocks = w.float().reshape(-1, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    q = torch.where(d > 0, torch.round(blocks * (1 / d.clamp_min(1e-30))), torch.zeros_like(blocks))
    return (q * d.half().float()).reshape(w.shape)


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_gguf_read_by_transformers_gives_the_merged_model_with_rounded_weights(tiny, tmp_path, kind) -> None:
    base, adapter = tiny
    loaded = load_for_inference(None, adapter)
    state = merged_state_dict(loaded.model)
    with torch.no_grad():
        merged = loaded.model(IDS).logits
        with adapters_disabled(loaded.model):
            unadapted = loaded.model(IDS).logits
    rounding = (lambda w: w.half().float()) if kind == "f16" else _q8_0
    rounded = {k: rounding(v) if v.ndim == 2 else v for k, v in state.items()}
    out = export_gguf(None, tmp_path / "m.gguf", adapter=adapter, type=kind).out
    logits = _gguf_logits(out)
    gap = (logits - merged).abs().max().item()
    print(f"{kind}: max |Δlogit| against the fp32 merged model {gap:.2e} (the adapter moves them by "
          f"{(merged - unadapted).abs().max().item():.2e})")
    assert_close(logits, _logits_with(loaded.model, rounded), "fp32 reordered")
    assert gap < (merged - unadapted).abs().max().item() / (20 if kind == "f16" else 2)


def test_gguf_tensors_have_llama_names_and_shapes(tiny, tmp_path) -> None:
    base, adapter = tiny
    reader = gguf.GGUFReader(export_gguf(None, tmp_path / "m.gguf", adapter=adapter).out)
    known = gguf.MODEL_TENSORS[gguf.MODEL_ARCH.LLAMA]
    expected = {gguf.TENSOR_NAMES[t].format(bid=b) + ".weight": t for t in known for b in range(2)}
    hidden, ffn, vocab, kv = 64, 128, 320, 32  # kv: 2 key/value heads of 16
    shapes = {gguf.MODEL_TENSOR.TOKEN_EMBD: [hidden, vocab], gguf.MODEL_TENSOR.OUTPUT: [hidden, vocab],
              gguf.MODEL_TENSOR.OUTPUT_NORM: [hidden], gguf.MODEL_TENSOR.ATTN_NORM: [hidden],
              gguf.MODEL_TENSOR.FFN_NORM: [hidden], gguf.MODEL_TENSOR.ATTN_Q: [hidden, hidden],
              gguf.MODEL_TENSOR.ATTN_K: [hidden, kv], gguf.MODEL_TENSOR.ATTN_V: [hidden, kv],
              gguf.MODEL_TENSOR.ATTN_OUT: [hidden, hidden], gguf.MODEL_TENSOR.FFN_GATE: [hidden, ffn],
              gguf.MODEL_TENSOR.FFN_UP: [hidden, ffn], gguf.MODEL_TENSOR.FFN_DOWN: [ffn, hidden]}
    assert len(reader.tensors) == 3 + 9 * 2
    for tensor in reader.tensors:
        assert tensor.name in expected, tensor.name
        assert [int(n) for n in tensor.shape] == shapes[expected[tensor.name]], tensor.name
        assert tensor.tensor_type.name == ("F32" if len(tensor.shape) == 1 else "F16"), tensor.name


def test_gguf_metadata_holds_the_hyperparameters_and_the_tokenizer(tiny, tmp_path) -> None:
    base, _ = tiny
    reader = gguf.GGUFReader(export_gguf(str(base), tmp_path / "m.gguf").out)

    def field(key: str) -> object:
        return reader.fields[key].contents()

    assert field("general.architecture") == "llama" and field("general.type") == "model"
    assert [field(f"llama.{k}") for k in ("block_count", "embedding_length", "feed_forward_length",
                                          "attention.head_count", "attention.head_count_kv", "context_length",
                                          "vocab_size", "rope.dimension_count")] == [2, 64, 128, 4, 2, 64, 320, 16]
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    assert isinstance(tokens, list) and isinstance(types, list)
    assert len(tokens) == 320 and tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert types[:3] == [gguf.TokenType.CONTROL] * 3 and types[-1] == gguf.TokenType.UNUSED
    assert [field(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")] == [1, 2, 2]
    assert field("tokenizer.ggml.add_bos_token") is False
    assert "<|im_start|>" in str(field("tokenizer.chat_template"))


def test_gguf_tokenizer_read_by_transformers_tokenizes_as_the_original(tiny, tmp_path) -> None:
    base, adapter = tiny
    loaded = load_for_inference(None, adapter)
    out = export_gguf(None, tmp_path / "m.gguf", adapter=adapter).out
    tokenizer = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    for text in ["the cat sat on the mat", "hello there, 12 dogs!", "<|im_start|>user\nhi<|im_end|>"]:
        assert tokenizer(text)["input_ids"] == loaded.tokenizer(text)["input_ids"], text
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == loaded.tokenizer.apply_chat_template(
        messages, tokenize=False)


def test_tied_embeddings_are_written_once_and_read_back_tied(tmp_path) -> None:
    base = tiny_llama_dir(tmp_path / "tied", tie=True)
    out = export_gguf(str(base), tmp_path / "m.gguf").out
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(out).tensors}
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight


def test_q8_0_quantizes_rows_of_whole_blocks_and_writes_others_in_f16(tmp_path) -> None:
    writer = gguf.GGUFWriter(tmp_path / "t.gguf", "llama")
    rng = np.random.default_rng(0)
    kinds = [add_tensor(writer, "a", rng.standard_normal((4, 64)), gguf.GGMLQuantizationType.Q8_0),
             add_tensor(writer, "b", rng.standard_normal((4, 48)), gguf.GGMLQuantizationType.Q8_0),
             add_tensor(writer, "c", rng.standard_normal(48), gguf.GGMLQuantizationType.Q8_0)]
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert kinds == ["Q8_0", "F16", "F32"]
    assert [t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "t.gguf").tensors] == kinds


def test_unknown_architecture_is_refused_by_name_and_nothing_is_written(tiny_classifier_dir, tmp_path) -> None:
    with pytest.raises(LorakitError, match=r"does not support BertModel; supported: LlamaForCausalLM"):
        export_gguf(str(tiny_classifier_dir), tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_existing_file_is_replaced_only_with_force_and_only_if_it_is_gguf(tiny, tmp_path) -> None:
    base, _ = tiny
    out = tmp_path / "m.gguf"
    out.write_bytes(b"not a model")
    with pytest.raises(LorakitError, match="exists; pass force=True"):
        export_gguf(str(base), out)
    with pytest.raises(LorakitError, match="is not a GGUF file"):
        export_gguf(str(base), out, force=True)
    assert out.read_bytes() == b"not a model"
    out.unlink()
    first = export_gguf(str(base), out).out.read_bytes()
    export_gguf(str(base), out, type="q8_0", force=True)
    assert out.read_bytes() != first and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    with pytest.raises(LorakitError, match="is a directory"):
        export_gguf(str(base), tmp_path, force=True)


def test_an_error_while_writing_leaves_no_file(tiny, tmp_path, monkeypatch) -> None:
    base, _ = tiny

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(LorakitError, match="no space left on device while writing GGUF model"):
        export_gguf(str(base), tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_unknown_type_is_refused(tiny, tmp_path) -> None:
    with pytest.raises(LorakitError, match=r"type must be one of f16, q8_0, got 'q4_0'"):
        export_gguf(str(tiny[0]), tmp_path / "m.gguf", type="q4_0")


def test_a_dora_adapter_merges_into_the_gguf_like_any_other(tiny, tmp_path) -> None:
    base, _ = tiny
    adapter = lora_adapter(tmp_path / "dora", base, dora=True)
    loaded = load_for_inference(None, adapter)
    rounded = {k: v.half().float() if v.ndim == 2 else v for k, v in merged_state_dict(loaded.model).items()}
    out = export_gguf(None, tmp_path / "dora.gguf", adapter=adapter).out
    assert_close(_gguf_logits(out), _logits_with(loaded.model, rounded), "fp32 reordered")
