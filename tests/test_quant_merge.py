"""lorakit.quant_merge: the three merge paths of an adapter trained on a quantized base, each measured."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, tiny_llama

from lorakit import LoraConfig, LorakitError, MergeStateError, inject, quant
from lorakit.layers import lora_modules
from lorakit.merge import delta_weight, merged_state_dict
from lorakit.quant_merge import logit_error, logits, merge_quantized

pytest.importorskip("bitsandbytes")


def _trained_qlora(kind: str = "nf4"):
    model = tiny_llama()
    quant.quantize_model(model, kind)
    inject(model, LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj", "up_proj"]))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, module in lora_modules(model):
            module.lora_B.weight.copy_(torch.randn(module.lora_B.weight.shape, generator=gen) * 0.2)
    return model


@pytest.fixture
def probe(token_ids):
    return {"input_ids": token_ids}


def test_dequantized_merge_equals_the_unmerged_quantized_model(probe):
    model = _trained_qlora()
    before = logits(model, probe)
    merged, error = merge_quantized(model, "dequantized", probe=probe)
    assert merged is model and not any(quant.is_quantized(p) for p in model.parameters())
    assert_close(logits(model, probe), before, "fp32 reordered")
    assert error is not None and error.max_abs_logit < 1e-4
    state = merged_state_dict(model)
    assert all(v.dtype == torch.float32 for v in state.values()) and not any("lora" in k for k in state)


def test_requantized_merge_keeps_the_format_and_reports_its_error(probe):
    model = _trained_qlora()
    before = logits(model, probe)
    _, error = merge_quantized(model, "requantized", probe=probe)
    module = next(m for _, m in lora_modules(model))
    assert quant.kind_of(module.weight) == "nf4" and module.merged
    expected = logit_error("requantized", logits(model, probe), before)
    assert error == expected and error.max_abs_logit > 0


def test_original_merge_adds_delta_to_the_full_precision_base(probe):
    model, original = _trained_qlora(), tiny_llama()
    name, module = lora_modules(model)[0]
    w = original.get_submodule(name).weight.detach().clone()
    merged, error = merge_quantized(model, "original", original=original, probe=probe)
    assert merged is original and not module.merged
    assert_close(original.get_submodule(name).weight, w + delta_weight(module), "fp32 reordered")
    dequantized_error = merge_quantized(_trained_qlora(), "dequantized", probe=probe)[1]
    assert error is not None and dequantized_error is not None
    assert error.max_abs_logit > 10 * dequantized_error.max_abs_logit  # the quantization error stays in


def test_logit_error_matches_a_float64_formula():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 7, generator=gen), torch.randn(2, 3, 7, generator=gen)
    p, q = torch.softmax(b.double(), -1), torch.softmax(a.double(), -1)
    kl = (p * (p.log() - q.log())).sum(-1).mean().item()
    error = logit_error("x", a, b)
    assert error.max_abs_logit == pytest.approx((a - b).abs().max().item())
    assert error.mean_kl == pytest.approx(kl, rel=1e-5)


def test_merging_twice_is_refused():
    model = _trained_qlora()
    merge_quantized(model, "requantized")
    with pytest.raises(MergeStateError, match="already merged"):
        merge_quantized(model, "requantized")


def test_unknown_path_and_missing_original_are_refused():
    model = _trained_qlora()
    with pytest.raises(LorakitError, match="unknown merge path 'fp16'"):
        merge_quantized(model, "fp16")
    with pytest.raises(LorakitError, match="needs the full-precision base"):
        merge_quantized(model, "original")
    assert not any(m.merged for _, m in lora_modules(model))


def test_quantizing_an_adapted_dense_model_keeps_its_adapter(token_ids):
    model = tiny_llama()
    inject(model, LoraConfig(rank=4, alpha=8, targets=["q_proj"]))
    quant.quantize_model(model, "int8")
    module = next(m for _, m in lora_modules(model))
    assert module.quantized and quant.kind_of(module.weight) == "int8"
    assert torch.isfinite(model(token_ids).logits).all()


@pytest.fixture(scope="module")
def nf4_adapter(tmp_path_factory, tiny_classifier_dir):
    """An adapter trained (3 steps) on the tiny classifier with an NF4 base, through `lorakit train`."""
    from conftest import NEGATIVE, POSITIVE, write_config

    from lorakit.cli import main

    root = tmp_path_factory.mktemp("nf4-run")
    train = root / "train.tsv"
    train.write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in
                                                   [(s, 1) for s in POSITIVE] * 2 + [(s, 0) for s in NEGATIVE] * 2))
    config = write_config(root / "c.yaml", tiny_classifier_dir, train, train, root / "run", optim={"max_steps": 3})
    assert main(["train", str(config), "--model.quantize=nf4", "--quiet"]) == 0
    return root / "run" / "adapter"


@pytest.mark.parametrize("path", ["dequantized", "original"])
def test_cli_merge_path_writes_the_model_its_path_promises(path, nf4_adapter, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    from lorakit.cli import main
    from lorakit.inference import load_for_inference
    from lorakit.io import adapter_quantization
    from lorakit.quant_merge import probe_batch

    assert adapter_quantization(nf4_adapter) == "nf4"
    assert main(["merge", "--adapter", str(nf4_adapter), "--out", str(tmp_path / "m"), "--merge-path", path]) == 0
    assert f"merge path {path}: max |Δlogit|" in capsys.readouterr().out
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    # dequantized: what training saw, the adapter on the NF4 base; original: on the full-precision base
    loaded = load_for_inference(None, nf4_adapter, dense=path == "original")
    probe = probe_batch(loaded.tokenizer)
    assert_close(logits(merged, probe), logits(loaded.model, probe), "fp32 reordered")


def test_inference_loads_a_qlora_adapter_on_the_base_quantized_as_in_training(nf4_adapter, tiny_classifier_dir):
    from lorakit.inference import load_for_inference
    from lorakit.io import load_adapter
    from lorakit.models import load_model
    from lorakit.quant_merge import probe_batch

    loaded = load_for_inference(None, nf4_adapter)
    assert quant.model_quantization(loaded.model) == "nf4"
    assert all(m.quantized for _, m in lora_modules(loaded.model))
    trained, _ = load_model(str(tiny_classifier_dir), head="sequence-classification", num_labels=2, quantize="nf4")
    load_adapter(trained, nf4_adapter)  # the model as `lorakit train` built it: quantized, then adapted
    probe = probe_batch(loaded.tokenizer)
    assert torch.equal(logits(loaded.model, probe), logits(trained.eval(), probe))
    dense = load_for_inference(None, nf4_adapter, dense=True)
    assert quant.model_quantization(dense.model) is None


def test_gguf_export_of_a_qlora_adapter_asks_for_a_merge_path_first(nf4_adapter, tmp_path):
    from lorakit.gguf.merged import export_gguf

    with pytest.raises(LorakitError, match=r"trained on a nf4 base; merge it first \(lorakit merge --merge-path"):
        export_gguf(None, tmp_path / "m.gguf", adapter=nf4_adapter)
    assert not (tmp_path / "m.gguf").exists()


def test_eval_applies_model_quantize_and_refuses_another_kind_than_the_adapter_s(nf4_adapter, tmp_path):
    from conftest import write_config

    from lorakit.train.config import load_train_config
    from lorakit.train.evaluate import evaluate_from_config

    run_config = nf4_adapter.parent / "config.json"
    import json

    data = json.loads(run_config.read_text())["data"]
    config_file = write_config(tmp_path / "c.yaml", json.loads(run_config.read_text())["model"]["name"],
                               data["train"], data["eval"], tmp_path / "unused")
    plain = evaluate_from_config(load_train_config(config_file, []), adapter=nf4_adapter)
    same = evaluate_from_config(load_train_config(config_file, ["--model.quantize=nf4"]), adapter=nf4_adapter)
    assert plain.metrics == same.metrics  # the adapter already runs on its NF4 base
    with pytest.raises(LorakitError, match=r"model\.quantize=int8, but .* was trained on a nf4 base"):
        evaluate_from_config(load_train_config(config_file, ["--model.quantize=int8"]), adapter=nf4_adapter)


def test_eval_of_a_base_with_model_quantize_scores_the_quantized_base():
    from lorakit.train.evaluate import _quantize_as_configured

    model = tiny_llama()
    _quantize_as_configured(model, "nf4", None)
    assert quant.model_quantization(model) == "nf4"
    dense = tiny_llama()
    _quantize_as_configured(dense, None, None)
    assert quant.model_quantization(dense) is None
