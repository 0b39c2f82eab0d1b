"""export_lora_gguf: an adapter alone in llama.cpp's LoRA layout, read back with gguf.GGUFReader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import assert_close
from gguf_models import lora_adapter, tiny_llama_dir
from safetensors.torch import load_file, save_file

from lorakit.errors import LorakitError
from lorakit.gguf import export_lora_gguf
from lorakit.gguf.names import Heads, to_gguf_rows
from lorakit.inference import load_for_inference
from lorakit.layers import lora_modules
from lorakit.merge import delta_weight

HEADS = Heads(q=4, kv=2)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_dir(tmp_path_factory.mktemp("gguf-lora") / "base")


def _read(path: Path) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: np.array(t.data).reshape([int(n) for n in reversed(t.shape)]) for t in reader.tensors}


def test_lora_file_holds_the_factors_in_llama_cpp_layout(base, tmp_path) -> None:
    adapter = lora_adapter(tmp_path / "adapter", base)
    report = export_lora_gguf(adapter, tmp_path / "a.gguf")
    fields, tensors = _read(report.out)
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == 8.0
    assert report.folded == [] and report.modules == 14 and len(tensors) == 28
    saved = load_file(adapter / "adapter_model.safetensors")
    for layer in range(2):
        for hf, name, rows in [("self_attn.q_proj", "attn_q", 64), ("self_attn.k_proj", "attn_k", 32),
                               ("mlp.down_proj", "ffn_down", 64)]:
            key = f"base_model.model.model.layers.{layer}.{hf}"
            a, b = saved[f"{key}.lora_A.weight"], saved[f"{key}.lora_B.weight"]
            lora_a, lora_b = tensors[f"blk.{layer}.{name}.weight.lora_a"], tensors[f"blk.{layer}.{name}.weight.lora_b"]
            assert lora_a.dtype == np.float32 and lora_a.shape == (4, a.shape[1]) and lora_b.shape == (rows, 4)
            assert np.array_equal(lora_a, a.numpy())
            assert np.array_equal(lora_b, to_gguf_rows(b.numpy(), f"blk.{layer}.{name}.weight", HEADS))
    assert not np.array_equal(tensors["blk.0.attn_q.weight.lora_b"],
                              saved["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].numpy())


@pytest.mark.parametrize(("config", "folded"), [({}, 0), ({"rslora": True}, 14), (
    {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 3.0}}, 2)],
    ids=["plain", "rslora", "per-module-rank-and-alpha"])
def test_llama_cpp_rule_alpha_over_rank_times_b_a_gives_each_delta_w(base, tmp_path, config, folded) -> None:
    """llama.cpp adds (alpha / rank) · lora_b @ lora_a, the rank read from lora_b; that is ΔW in GGUF's row order,
    also where the adapter's scaling is not alpha / rank (folded into lora_b)."""
    adapter = lora_adapter(tmp_path / "adapter", base, **config)
    report = export_lora_gguf(adapter, tmp_path / "a.gguf")
    fields, tensors = _read(report.out)
    alpha = float(fields["adapter.lora.alpha"])  # type: ignore[arg-type]
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    modules = lora_modules(load_for_inference(None, adapter).model)
    for module_name, module in modules:
        layer, leaf = module_name.split(".")[2], module_name.split(".")[-1]
        name = f"blk.{layer}.{names[leaf]}.weight"
        lora_a, lora_b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
        applied = torch.from_numpy((alpha / lora_b.shape[1]) * (lora_b @ lora_a))
        assert_close(applied, torch.from_numpy(to_gguf_rows(delta_weight(module).detach().numpy(), name, HEADS)),
                     torch.float32)
    assert len(report.folded) == folded  # rsLoRA everywhere; the q_proj alpha of 3 (v_proj's rank 2 keeps alpha/r)


def _edit_adapter(src: Path, dst: Path, *, config: dict | None = None, tensors: dict | None = None) -> Path:
    """A copy of adapter `src` with `config` keys and `tensors` added (and the checksum dropped)."""
    shutil.copytree(src, dst)
    if config:
        path = dst / "adapter_config.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | config))
    if tensors:
        saved = load_file(dst / "adapter_model.safetensors") | tensors
        save_file(saved, dst / "adapter_model.safetensors")
    return dst


@pytest.mark.parametrize("case", ["principal", "dora", "modules_to_save", "embedding", "bias"])
def test_what_the_lora_layout_cannot_hold_is_refused_in_one_line_and_nothing_is_written(base, tmp_path,
                                                                                         case) -> None:
    if case == "principal":
        adapter, match = lora_adapter(tmp_path / "a", base, init="principal"), "principal \\(PiSSA\\) adapter"
    elif case == "dora":
        plain = lora_adapter(tmp_path / "plain", base)
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
        adapter, match = _edit_adapter(plain, tmp_path / "a", tensors={key: torch.ones(64)}), "DoRA adapter"
    elif case == "modules_to_save":
        adapter, match = lora_adapter(tmp_path / "a", base, modules_to_save=["lm_head"]), "modules_to_save or biases"
    elif case == "embedding":
        adapter, match = lora_adapter(tmp_path / "a", base, targets=["q_proj", "embed_tokens"]), "embedding"
    else:
        plain = lora_adapter(tmp_path / "plain", base)
        key = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias"
        adapter, match = _edit_adapter(plain, tmp_path / "a", tensors={key: torch.zeros(64)}), "biases"
    with pytest.raises(LorakitError, match=match) as error:
        export_lora_gguf(adapter, tmp_path / "out.gguf")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out.gguf").exists()


def test_lm_head_adapter_is_written_as_output_but_refused_on_tied_embeddings(base, tmp_path) -> None:
    adapter = lora_adapter(tmp_path / "a", base, targets=["q_proj", "lm_head"])
    _, tensors = _read(export_lora_gguf(adapter, tmp_path / "untied.gguf").out)
    assert tensors["output.weight.lora_b"].shape == (320, 4)
    tied = tiny_llama_dir(tmp_path / "tied", tie=True)  # a PEFT adapter may adapt lm_head of a tied model
    with pytest.raises(LorakitError, match="adapts lm_head, which .* ties to the embeddings"):
        export_lora_gguf(adapter, tmp_path / "out.gguf", model=str(tied))
    assert not (tmp_path / "out.gguf").exists()
