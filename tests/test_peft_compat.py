"""lorakit against PEFT, the reference LoRA implementation: the same adapter weights give the same outputs and
gradients, adapter files load both ways, and the principal (PiSSA) init and its conversion agree with PEFT's.

Every case is spelled twice, once in lorakit's terms and once in PEFT's, so a test also checks that the
mapping between the two configurations is the one we document.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TOLERANCES, relative_error, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn

from lorakit import LoraConfig, adapter_parameters, inject, load_adapter, save_adapter
from lorakit.layers import lora_modules

peft = pytest.importorskip("peft")

# Same weights and the same ops, lorakit's products through oneDNN and PEFT's through torch's BLAS (lorakit.gemm).
RTOL = TOLERANCES["fp32 other GEMM kernel"][0]
# A principal init subtracts s·B·A from W and the adapter adds it back: invariants through a residual base.
PRINCIPAL_RTOL = TOLERANCES["fp32 reordered"][0]
CHANGED = TOLERANCES["adapter changes output"][0]
LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2 = ["c_attn", "c_proj", "c_fc"]


@dataclass(frozen=True)
class Case:
    """One tiny model and one adapter: lorakit's `LoraConfig` fields and PEFT's `LoraConfig` fields."""

    build: Callable[[], nn.Module]
    lorakit: dict[str, Any]
    peft: dict[str, Any] = field(default_factory=dict)

    def lorakit_config(self, **extra: Any) -> LoraConfig:
        return LoraConfig(rank=4, alpha=8, **self.lorakit, **extra)

    def peft_config(self, **extra: Any) -> Any:
        return peft.LoraConfig(r=4, lora_alpha=8, **self.peft, **extra)


CASES = {
    "llama": Case(tiny_llama, {"targets": ["llama"]}, {"target_modules": LLAMA}),
    "llama_rslora": Case(tiny_llama, {"targets": ["llama"], "rslora": True},
                         {"target_modules": LLAMA, "use_rslora": True}),
    "llama_rank_alpha_pattern": Case(
        tiny_llama,
        {"targets": ["llama"], "rank_pattern": {"q_proj": 2, "layers.1.mlp.down_proj": 6},
         "alpha_pattern": {"v_proj": 3.0}},
        {"target_modules": LLAMA, "rank_pattern": {"q_proj": 2, "layers.1.mlp.down_proj": 6},
         "alpha_pattern": {"v_proj": 3.0}},
    ),
    "llama_embedding": Case(tiny_llama, {"targets": ["embed_tokens", "q_proj", "v_proj"]},
                            {"target_modules": ["embed_tokens", "q_proj", "v_proj"]}),
    "bert_classifier_lora_only_bias": Case(
        tiny_bert,
        {"targets": ["query", "value"], "modules_to_save": ["classifier"], "bias": "lora_only"},
        {"target_modules": ["query", "value"], "modules_to_save": ["classifier"], "bias": "lora_only"},
    ),
    "gpt2_conv1d": Case(tiny_gpt2, {"targets": ["gpt2"]}, {"target_modules": GPT2, "fan_in_fan_out": True}),
}
# Embeddings have no principal init; every other case does.
PRINCIPAL_CASES = [name for name in CASES if name != "llama_embedding"]


# --------------------------------------------------------------------------------------------------- helpers


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """A scalar that depends on every logit, with fixed random weights (the same for both implementations)."""
    logits = model(input_ids=ids).logits
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7))
    return (logits * weights).sum()


def _randomize(params: dict[str, nn.Parameter], std: float = 0.1, seed: int = 0) -> None:
    """Non-zero adapter weights, so that a wrong layout, scaling or key cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key in sorted(params):
            params[key].copy_(torch.randn(params[key].shape, generator=g) * std)


def _peft_trainable(peft_model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in peft_model.named_parameters() if p.requires_grad}


def _peft_name(key: str, model: nn.Module) -> str:
    """The name in a PEFT model's `named_parameters()` of lorakit's adapter parameter `key`."""
    state = model.lorakit_state
    for saved in state.modules_to_save:
        if key.startswith(saved + "."):
            return f"base_model.model.{saved}.modules_to_save.default.{key.removeprefix(saved + '.')}"
    owner, _, leaf = key.rpartition(".")
    if leaf in ("lora_embedding_A", "lora_embedding_B"):  # bare Parameters in both libraries
        return f"base_model.model.{key}.default"
    if leaf == "bias" and owner in state.adapted:  # PEFT keeps the adapted layer's own bias under base_layer
        return f"base_model.model.{owner}.base_layer.bias"
    module, _, factor = owner.rpartition(".")  # <module>.lora_A.weight
    return f"base_model.model.{module}.{factor}.default.{leaf}"


def _paired(model: nn.Module, peft_model: nn.Module) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
    """(lorakit key, lorakit parameter, PEFT parameter) for every adapter parameter."""
    peft_params = dict(peft_model.named_parameters())
    return [(k, p, peft_params[_peft_name(k, model)]) for k, p in adapter_parameters(model).items()]


def _twins(case: Case, std: float = 0.1) -> tuple[nn.Module, nn.Module]:
    """The same random base adapted by lorakit and by PEFT, with the same random non-zero adapter weights."""
    model, peft_model = case.build(), peft.get_peft_model(case.build(), case.peft_config())
    inject(model, case.lorakit_config())
    _randomize(adapter_parameters(model), std)
    with torch.no_grad():
        for _, ours, theirs in _paired(model, peft_model):
            theirs.copy_(ours)
    return model, peft_model


def _assert_adapter_changes_output(model: nn.Module, base: nn.Module, ids: torch.Tensor) -> None:
    assert relative_error(_logits(model, ids), _logits(base, ids)) > CHANGED


# ----------------------------------------------------------------------------------- same weights, same model


@pytest.mark.parametrize("name", list(CASES))
def test_adapter_parameters_are_peft_trainable_parameters(name):
    case = CASES[name]
    model, peft_model = case.build(), peft.get_peft_model(case.build(), case.peft_config())
    inject(model, case.lorakit_config())
    ours = {_peft_name(k, model): tuple(p.shape) for k, p in adapter_parameters(model).items()}
    theirs = {k: tuple(p.shape) for k, p in _peft_trainable(peft_model).items()}
    assert ours == theirs


@pytest.mark.parametrize("name", list(CASES))
def test_same_adapter_weights_give_peft_outputs(name, token_ids):
    case = CASES[name]
    model, peft_model = _twins(case)
    _assert_adapter_changes_output(model, case.build(), token_ids)
    assert relative_error(_logits(model, token_ids), _logits(peft_model, token_ids)) <= RTOL


@pytest.mark.parametrize("name", list(CASES))
def test_same_adapter_weights_give_peft_gradients(name, token_ids):
    model, peft_model = _twins(CASES[name])
    _loss(model, token_ids).backward()
    _loss(peft_model, token_ids).backward()
    for key, ours, theirs in _paired(model, peft_model):
        assert ours.grad is not None and theirs.grad is not None, key
        assert ours.grad.norm() > 0, key
        assert relative_error(ours.grad, theirs.grad) <= RTOL, key


# ---------------------------------------------------------------------------------------------- adapter files


@pytest.mark.parametrize("name", list(CASES))
def test_lorakit_adapter_file_loads_in_peft_with_same_outputs(name, token_ids, tmp_path):
    case = CASES[name]
    model = case.build()
    inject(model, case.lorakit_config())
    _randomize(adapter_parameters(model))
    save_adapter(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(case.build(), tmp_path)
    _assert_adapter_changes_output(loaded, case.build(), token_ids)
    assert relative_error(_logits(loaded, token_ids), _logits(model, token_ids)) <= RTOL


@pytest.mark.parametrize("name", list(CASES))
def test_peft_adapter_file_loads_in_lorakit_with_same_outputs(name, token_ids, tmp_path):
    case = CASES[name]
    peft_model = peft.get_peft_model(case.build(), case.peft_config())
    _randomize(_peft_trainable(peft_model))
    peft_model.save_pretrained(tmp_path)
    model = case.build()
    load_adapter(model, tmp_path)
    _assert_adapter_changes_output(model, case.build(), token_ids)
    assert relative_error(_logits(model, token_ids), _logits(peft_model, token_ids)) <= RTOL


def test_embedding_table_in_peft_adapter_file_replaces_base_table_like_peft(token_ids, tmp_path):
    # With an embedding among the targets PEFT also saves that layer's whole table (`save_embedding_layers`,
    # for vocabularies grown during fine-tuning), and loading the file puts the table into the base model.
    case = CASES["llama_embedding"]
    peft_model = peft.get_peft_model(case.build(), case.peft_config())
    _randomize(_peft_trainable(peft_model))
    table = peft_model.base_model.model.model.embed_tokens.base_layer.weight
    with torch.no_grad():
        table[-8:].normal_(generator=torch.Generator().manual_seed(5))  # e.g. rows of newly added tokens
    peft_model.save_pretrained(tmp_path)
    model = case.build()
    load_adapter(model, tmp_path)
    assert torch.equal(model.model.embed_tokens.weight, table)
    reference = peft.PeftModel.from_pretrained(case.build(), tmp_path)
    assert relative_error(_logits(model, token_ids), _logits(reference, token_ids)) <= RTOL


# ------------------------------------------------------------------------------------ principal init vs PiSSA


def _principal_twins(case: Case, **lorakit_extra: Any) -> tuple[nn.Module, nn.Module]:
    model = case.build()
    inject(model, case.lorakit_config(init="principal", **lorakit_extra))
    return model, peft.get_peft_model(case.build(), case.peft_config(init_lora_weights="pissa"))


def _peft_layer(peft_model: nn.Module, name: str) -> nn.Module:
    return peft_model.base_model.model.get_submodule(name)


@pytest.mark.parametrize("name", PRINCIPAL_CASES)
def test_principal_factors_match_peft_pissa_up_to_singular_vector_signs(name):
    model, peft_model = _principal_twins(CASES[name])
    for module_name, module in lora_modules(model):
        layer = _peft_layer(peft_model, module_name)
        a, b = (t.detach() for t in module.factors())  # (r, in), (out, r)
        a_ref, b_ref = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        # Singular vectors are defined up to a sign per pair (u_i, v_i); align ours to PEFT's row by row.
        signs = torch.sign((a * a_ref).sum(dim=1))  # (r,)
        assert (signs != 0).all(), module_name
        assert relative_error(a * signs[:, None], a_ref) <= PRINCIPAL_RTOL, module_name
        assert relative_error(b * signs[None, :], b_ref) <= PRINCIPAL_RTOL, module_name


@pytest.mark.parametrize("name", PRINCIPAL_CASES)
def test_principal_residual_base_weight_matches_peft_pissa(name):
    model, peft_model = _principal_twins(CASES[name])
    original = dict(CASES[name].build().named_modules())
    for module_name, module in lora_modules(model):
        residual = module.weight.detach()
        residual_ref = _peft_layer(peft_model, module_name).base_layer.weight.detach()
        assert relative_error(residual, residual_ref) <= PRINCIPAL_RTOL, module_name
        assert relative_error(residual, original[module_name].weight.detach()) > CHANGED, module_name


@pytest.mark.parametrize("implementation", ["lorakit", "peft"])
@pytest.mark.parametrize("name", PRINCIPAL_CASES)
def test_principal_init_leaves_output_unchanged(name, implementation, token_ids):
    model, peft_model = _principal_twins(CASES[name])
    adapted = model if implementation == "lorakit" else peft_model
    expected = _logits(CASES[name].build(), token_ids)
    assert relative_error(_logits(adapted, token_ids), expected) <= PRINCIPAL_RTOL


def test_randomized_principal_residual_norm_is_within_2_percent_of_exact_pissa():
    case = CASES["llama"]
    # The tiny model's random weights have a flat spectrum (0.26, 0.24, 0.24, 0.23, ... for gate_proj), the worst
    # case for a sketch of exactly `rank` columns (lorakit's default, as PEFT's pissa_niter_N): 4 iterations leave
    # 1-5% depending on the seed; 16 bring every module within 2% for every seed tried.
    model, peft_model = _principal_twins(case, svd_iters=16, seed=0)
    for module_name, module in lora_modules(model):
        exact = _peft_layer(peft_model, module_name).base_layer.weight.detach().norm()
        randomized = module.weight.detach().norm()
        # The residual keeps what the rank-r factors miss, so a worse subspace gives a larger residual.
        assert randomized >= exact * (1 - PRINCIPAL_RTOL), module_name
        assert randomized <= exact * (1 + TOLERANCES["randomized SVD residual vs exact"][0]), module_name


# ------------------------------------------------------------------------------------ principal conversion


def _simulate_training(model: nn.Module, std: float = 0.02) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in sorted(adapter_parameters(model).items()):
            p.add_(torch.randn(p.shape, generator=g) * std)


def _load_converted(loader: str, base: nn.Module, path: Path) -> nn.Module:
    if loader == "peft":
        return peft.PeftModel.from_pretrained(base, path)
    load_adapter(base, path)
    return base


@pytest.mark.parametrize("loader", ["peft", "lorakit"])
@pytest.mark.parametrize("name", PRINCIPAL_CASES)
def test_converted_principal_adapter_on_original_base_reproduces_trained_model(name, loader, token_ids,
                                                                               tmp_path):
    case = CASES[name]
    model = case.build()
    inject(model, case.lorakit_config(init="principal"))
    _simulate_training(model)
    trained = _logits(model, token_ids)
    save_adapter(model, tmp_path, convert_principal=True)
    loaded = _load_converted(loader, case.build(), tmp_path)
    assert relative_error(trained, _logits(case.build(), token_ids)) > CHANGED
    assert relative_error(_logits(loaded, token_ids), trained) <= PRINCIPAL_RTOL


# ------------------------------------------------------------------------------------ the real bundled models


@pytest.fixture(scope="module")
def smollm2() -> tuple[nn.Module, Any]:
    from lorakit.models import load_model

    return load_model("smollm2")


@pytest.fixture(scope="module")
def minilm() -> tuple[nn.Module, Any]:
    from lorakit.models import load_model

    return load_model("minilm", head="sequence-classification", num_labels=2)


def _real_twins(base: nn.Module, config: LoraConfig, peft_config: Any) -> tuple[nn.Module, nn.Module]:
    model, peft_model = copy.deepcopy(base), peft.get_peft_model(copy.deepcopy(base), peft_config)
    inject(model, config)
    _randomize(adapter_parameters(model), std=0.02)
    with torch.no_grad():
        for _, ours, theirs in _paired(model, peft_model):
            theirs.copy_(ours)
    return model, peft_model


@pytest.mark.integration
def test_smollm2_same_adapter_weights_give_peft_outputs(smollm2):
    base, tokenizer = smollm2
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    model, peft_model = _real_twins(base, LoraConfig(rank=8, alpha=16, targets=["llama"]),
                                    peft.LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA))
    assert len(lora_modules(model)) == 7 * base.config.num_hidden_layers
    _assert_adapter_changes_output(model, base, ids)
    assert relative_error(_logits(model, ids), _logits(peft_model, ids)) <= RTOL


@pytest.mark.integration
def test_minilm_classifier_same_adapter_weights_give_peft_outputs(minilm):
    base, tokenizer = minilm
    batch = tokenizer(["a gripping, funny film", "dull and far too long"], padding=True, return_tensors="pt")
    targets, saved = ["query", "value"], ["classifier"]
    model, peft_model = _real_twins(
        base, LoraConfig(rank=8, alpha=16, targets=targets, modules_to_save=saved),
        peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, modules_to_save=saved))
    with torch.no_grad():
        ours, theirs, plain = (m(**batch).logits for m in (model, peft_model, base))
    assert relative_error(ours, plain) > CHANGED
    assert relative_error(ours, theirs) <= RTOL
