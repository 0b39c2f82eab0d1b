"""lorakit.quant: NF4 / int8 base weights through bitsandbytes, and LoRA over them."""

from __future__ import annotations

import gc
import logging
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, tiny_bert, tiny_llama
from torch import nn
from transformers import LlamaForCausalLM

from lorakit import LoraConfig, LorakitError, inject, merge, quant
from lorakit.errors import ConfigError
from lorakit.io import fingerprint
from lorakit.layers import LoraLinear, lora_modules

bnb = pytest.importorskip("bitsandbytes")


def _weight(seed: int = 0, shape: tuple[int, int] = (48, 64)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.05


def _nf4_reference(weight) -> torch.Tensor:
    """NF4 decoded by hand from the stored codes: code table[nibble] x block absmax, the absmax themselves
    decoded from their 8-bit blockwise codes (double quantization) plus the offset."""
    state = weight.quant_state
    packed = weight.data.flatten()
    nibbles = torch.stack([packed >> 4, packed & 0xF], dim=1).flatten().long()  # high nibble first
    s2 = state.state2
    codes = s2.code[state.absmax.long()]
    padded = F.pad(codes, (0, -codes.numel() % s2.blocksize)).view(-1, s2.blocksize)  # (blocks of 256, 256)
    absmax = (padded * s2.absmax[:, None]).flatten()[: codes.numel()] + state.offset
    values = state.code[nibbles].view(-1, state.blocksize) * absmax[:, None]
    return values.flatten()[: state.shape.numel()].view(state.shape)


def test_nf4_dequantize_equals_a_decoding_of_the_stored_codes():
    weight = quant.quantize_weight(_weight(), "nf4")
    assert quant.kind_of(weight) == "nf4" and weight.quant_state.nested
    assert_close(quant.dequantize(weight), _nf4_reference(weight), torch.float32)


def test_int8_dequantize_equals_bitsandbytes_own():
    weight = quant.quantize_weight(_weight(), "int8")
    expected = bnb.functional.int8_vectorwise_dequant(weight.data, weight.SCB)
    assert_close(quant.dequantize(weight), expected.float(), torch.float32)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_layer_output_equals_bitsandbytes_layer(kind):
    linear = nn.Linear(64, 48)
    layer = quant.quantize_linear(linear, kind)
    x = torch.randn(5, 64)
    assert_close(quant.linear(x, layer.weight, layer.bias), layer(x).float(), "fp32 reordered")


@pytest.mark.parametrize("kind, rel", [("nf4", 0.15), ("int8", 0.01)])
def test_dequantized_weight_is_close_to_the_original(kind, rel):
    w = _weight()
    assert torch.linalg.norm(quant.dequantize(quant.quantize_weight(w, kind)) - w) < rel * torch.linalg.norm(w)


def test_quantize_model_quantizes_block_linears_only():
    model = tiny_bert()
    names = quant.quantize_model(model, "nf4")
    modules = dict(model.named_modules())
    assert names and all(".layer." in n for n in names)
    assert all(quant.is_quantized(modules[n].weight) for n in names)
    dense = ["bert.embeddings.word_embeddings", "bert.pooler.dense", "classifier",
             "bert.encoder.layer.0.output.LayerNorm"]
    assert not any(quant.is_quantized(modules[n].weight) for n in dense)


def _mapped(path) -> bool:
    return str(path) in Path("/proc/self/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings from /proc")
def test_quantized_model_releases_the_checkpoint_file_it_was_loaded_from(tmp_path):
    tiny_llama(tie=True).save_pretrained(tmp_path)
    model = LlamaForCausalLM.from_pretrained(tmp_path)
    checkpoint = (tmp_path / "model.safetensors").resolve()
    assert _mapped(checkpoint)  # transformers loaded it as views of the mapped file
    embedding = model.model.embed_tokens.weight.detach().clone()
    quant.quantize_model(model, "nf4")
    gc.collect()
    assert not _mapped(checkpoint)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied, still one storage
    assert torch.equal(model.model.embed_tokens.weight, embedding)


@pytest.mark.parametrize("kind, limit", [("nf4", 0.16), ("int8", 0.28)])
def test_stored_bytes_of_quantized_weights_within_limit(kind, limit):
    w = _weight(shape=(256, 512))
    assert quant.stored_bytes(quant.quantize_weight(w, kind)) <= limit * w.numel() * 4


def test_unknown_kind_is_refused():
    with pytest.raises(LorakitError, match="unknown quantization 'nf3'"):
        quant.quantize_model(tiny_llama(), "nf3")


def test_missing_bitsandbytes_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(LorakitError, match=r"pip install 'lorakit\[quant\]'"):
        quant.bnb()


def _qlora(kind: str = "nf4", seed: int = 0):
    model = tiny_llama(seed)
    quant.quantize_model(model, kind)
    inject(model, LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"]))
    return model


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_lora_forward_and_gradients_match_float64_reference(kind):
    model = _qlora(kind)
    name, module = next((n, m) for n, m in lora_modules(model) if n.endswith("down_proj"))
    assert isinstance(module, LoraLinear) and module.quantized
    with torch.no_grad():
        module.lora_B.weight.normal_()
    x = torch.randn(3, 5, module.in_features, requires_grad=True)
    out = module(x)
    g = torch.randn_like(out)
    out.backward(g)
    w = quant.dequantize(module.weight).double()
    a = module.lora_A.weight.detach().double().requires_grad_()
    b = module.lora_B.weight.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    ref = F.linear(x64, w) + module.scaling * F.linear(F.linear(x64, a), b)
    ref.backward(g.double())
    assert_close(out.double(), ref.detach(), "fp32 vs float64 formula")
    assert_close(x.grad.double(), x64.grad, "fp32 vs float64 formula")
    assert_close(module.lora_A.weight.grad.double(), a.grad, "fp32 vs float64 formula")
    assert_close(module.lora_B.weight.grad.double(), b.grad, "fp32 vs float64 formula")


def test_module_holds_no_dense_copy_of_a_quantized_weight(token_ids):
    model = _qlora()
    model(token_ids).logits.sum().backward()
    module = next(m for _, m in lora_modules(model))
    held = {n: t for n, t in [*module.named_parameters(), *module.named_buffers()] if not n.startswith("lora_")}
    assert list(held) == ["weight"] and held["weight"].dtype == torch.uint8
    assert not any(t.dtype == torch.float32 and t.numel() >= module.in_features * module.out_features
                   for t in vars(module).values() if isinstance(t, torch.Tensor))


def test_zero_b_keeps_the_quantized_model_output(token_ids):
    model = tiny_llama()
    quant.quantize_model(model, "nf4")
    before = model(token_ids).logits
    inject(model, LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj"]))
    assert_close(model(token_ids).logits, before, "exact")


def test_fingerprint_of_quantized_base_equals_the_dense_one():
    dense, quantized = tiny_llama(), tiny_llama()
    quant.quantize_model(quantized, "nf4")
    targets = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    assert fingerprint(dense, targets) == fingerprint(quantized, targets)


def test_dora_on_a_quantized_base_is_refused():
    model = tiny_llama()
    quant.quantize_model(model, "nf4")
    with pytest.raises(ConfigError, match="dora over a quantized base"):
        inject(model, LoraConfig(rank=4, targets=["q_proj"], dora=True))


def test_plain_merge_on_a_quantized_base_is_refused_and_leaves_weights():
    model = _qlora()
    module = next(m for _, m in lora_modules(model))
    stored = module.weight.data.clone()
    with pytest.raises(LorakitError, match="choose a merge path"):
        merge(model)
    assert torch.equal(module.weight.data, stored) and not module.merged


def test_principal_init_on_a_quantized_base_stores_the_quantized_residual():
    model = tiny_llama()
    quant.quantize_model(model, "nf4")
    name = "model.layers.0.self_attn.q_proj"
    w0 = quant.dequantize(model.get_submodule(name).weight)
    inject(model, LoraConfig(rank=4, alpha=4, targets=["q_proj", "v_proj"], init="principal"))
    module = model.get_submodule(name)
    a, b = module.factors()
    expected = quant.quantize_weight(w0 - module.scaling * (b @ a).detach(), "nf4")
    assert quant.kind_of(module.weight) == "nf4"
    assert torch.equal(module.weight.data, expected.data)


def test_model_quantize_key_is_checked_at_load_time(tmp_path):
    from lorakit.train.config import load_train_config

    path = tmp_path / "c.yaml"
    path.write_text("data:\n  task: classification\n  train: d.tsv\nmodel:\n  quantize: nf3\n")
    with pytest.raises(ConfigError, match="model.quantize"):
        load_train_config(path)
    path.write_text("data:\n  task: classification\n  train: d.tsv\nmodel:\n  quantize: nf4\n")
    assert load_train_config(path).model.quantize == "nf4"


def test_injection_report_shows_base_bytes_stored_and_dense():
    model = tiny_llama()
    dense_bytes = sum(p.numel() * 4 for p in model.parameters())
    quant.quantize_model(model, "nf4")
    report = inject(model, LoraConfig(rank=4, targets=["q_proj"]))
    assert report.dense_base_bytes == dense_bytes
    assert report.base_bytes == quant.base_bytes(model)["total"] - sum(
        p.numel() * 4 for _, m in lora_modules(model) for p in m.lora_parameters())
    assert report.base_bytes < report.dense_base_bytes and "MiB stored quantized" in str(report)
    assert report.total_params == dense_bytes // 4 + sum(p.numel() for _, m in lora_modules(model)
                                                         for p in m.lora_parameters())


@pytest.mark.parametrize("kind, dtype, shape", [
    ("nf4", torch.float32, (96, 128)),  # fewer blocks than one second-level block of 256
    ("nf4", torch.float32, (256, 256)),  # whole second-level blocks only
    ("nf4", torch.float32, (320, 128)),  # whole second-level blocks and a remainder
    ("nf4", torch.bfloat16, (320, 128)),
    ("int8", torch.float32, (96, 128))])
def test_transient_dequantization_equals_bitsandbytes_own_bit_for_bit(kind, dtype, shape):
    weight = quant.quantize_weight(_weight(shape=shape), kind)
    expected = (bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(dtype) if kind == "nf4"
                else quant.dequantize(weight, dtype))
    assert torch.equal(quant.dequantize_transient(weight, dtype), expected)


def test_transient_dequantization_reuses_one_buffer_for_every_shape():
    large = quant.quantize_weight(_weight(1, shape=(320, 128)), "nf4")
    first, second = (quant.quantize_weight(_weight(seed, shape=(96, 128)), "nf4") for seed in (2, 3))
    pointer = quant.dequantize_transient(large).data_ptr()  # grows the buffer to the largest shape first
    a = quant.dequantize_transient(first)
    values = a.clone()
    b = quant.dequantize_transient(second)
    assert a.data_ptr() == b.data_ptr() == pointer  # the same scratch buffer, overwritten
    assert torch.equal(b, quant.dequantize(second)) and not torch.equal(b, values)
    assert torch.equal(quant.dequantize_transient(large), quant.dequantize(large))


def test_bitsandbytes_accessor_leaves_logging_alone_once_imported(monkeypatch):
    quant.bnb()
    calls = []
    monkeypatch.setattr(logging.Logger, "setLevel", lambda self, level: calls.append(level))
    assert quant.bnb() is bnb
    assert calls == []  # setLevel clears every logger's cache: 0.2 ms on each of a step's 420 dequantizations


def test_transient_dequantization_falls_back_for_an_odd_width():
    weight = quant.quantize_weight(_weight(shape=(8, 63)), "nf4")  # bitsandbytes' CPU kernel needs an even width
    assert torch.equal(quant.dequantize_transient(weight), quant.dequantize(weight))


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_training_step_saves_no_dense_weight_for_backward(kind):
    model = _qlora(kind)
    module = next(m for n, m in lora_modules(model) if n.endswith("down_proj"))
    with torch.no_grad():
        module.lora_B.weight.normal_()
    saved: list[tuple[int, ...]] = []
    x = torch.randn(3, 5, module.in_features, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out = module(x)
    out.sum().backward()
    assert saved and (module.out_features, module.in_features) not in saved
    assert x.grad is not None and module.lora_A.weight.grad is not None


@pytest.mark.parametrize("shape", [(96, 128), (320, 128)])
def test_transient_dequantization_without_the_native_constant_kernel_is_still_bit_equal(monkeypatch, shape):
    weight = quant.quantize_weight(_weight(shape=shape), "nf4")
    monkeypatch.setitem(quant._cpu_kernels, "cdequantize_blockwise_cpu_fp32", None)  # the torch arithmetic
    expected = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    assert torch.equal(quant.dequantize_transient(weight), expected)
