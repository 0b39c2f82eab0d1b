"""Exporting a merged model: plain transformers loads it with the adapted outputs, in the dtype asked for, with the
task's label names and a model card; the adapted model itself is left as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TOLERANCES, tiny_llama
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from lorakit import LoraConfig, inject, is_merged, save_adapter
from lorakit.errors import LorakitError
from lorakit.export import export_merged, merge_adapter
from lorakit.io import TASK_NAME
from lorakit.outputs import MARK_NAME, output_kind


def _adapted_llama() -> torch.nn.Module:
    model = tiny_llama()
    inject(model, LoraConfig(rank=2, alpha=4, targets=["q_proj", "v_proj"], seed=0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def test_exported_model_loads_in_plain_transformers_with_the_adapted_outputs(tmp_path: Path, token_ids) -> None:
    model = _adapted_llama()
    export_merged(model, tmp_path / "out")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    rtol, atol = TOLERANCES["fp32 reordered"]
    with torch.no_grad():
        torch.testing.assert_close(plain(token_ids).logits, model(token_ids).logits, rtol=rtol, atol=atol)
    assert not is_merged(model) and output_kind(tmp_path / "out") == "merged model"


def test_export_in_bfloat16_rounds_the_fp32_merge_once(tmp_path: Path) -> None:
    model = _adapted_llama()
    export_merged(model, tmp_path / "out", dtype=torch.bfloat16)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    from lorakit.merge import merged_state_dict

    expected = merged_state_dict(model)["model.layers.0.self_attn.q_proj.weight"].to(torch.bfloat16)
    assert plain.dtype == torch.bfloat16
    assert torch.equal(plain.model.layers[0].self_attn.q_proj.weight, expected)


def test_merge_adapter_writes_label_names_and_a_model_card(tmp_path: Path, tiny_classifier_dir: Path) -> None:
    from lorakit.models import load_model

    model, _ = load_model(str(tiny_classifier_dir), head="sequence-classification", num_labels=2)
    inject(model, LoraConfig(rank=2, alpha=4, targets=["query"], modules_to_save=["classifier"], seed=0))
    adapter = save_adapter(model, tmp_path / "adapter")
    (adapter / TASK_NAME).write_text(json.dumps({"task": "classification", "labels": ["neg", "pos"]}))
    out = merge_adapter(adapter, tmp_path / "merged", dtype="float16")
    plain = AutoModelForSequenceClassification.from_pretrained(out, dtype="auto")
    assert plain.config.id2label == {0: "neg", 1: "pos"} and plain.dtype == torch.float16
    card = (out / "README.md").read_text()
    assert f"base_model: \"{tiny_classifier_dir}\"" in card and "| labels | neg, pos |" in card
    assert "saved in float16" in card and (out / MARK_NAME).is_file()


def test_merge_adapter_refuses_an_unknown_dtype_before_loading(tmp_path: Path) -> None:
    with pytest.raises(LorakitError, match="dtype must be one of float32, bfloat16, float16, got 'fp8'"):
        merge_adapter(tmp_path / "adapter", tmp_path / "out", dtype="fp8")
    assert not (tmp_path / "out").exists()
