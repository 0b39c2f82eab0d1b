"""DoRA: the magnitude-rescaled forward against a float64 formula and against PEFT's DoRA (outputs, gradients,
files both ways), merge and unmerge, the principal init under it, mixed-adapter batches, and what it refuses."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import TOLERANCES, relative_error, tiny_gpt2, tiny_llama
from torch import nn

from lorakit import LoraConfig, adapter_parameters, inject, load_adapter, merge, save_adapter, unmerge
from lorakit.bank import AdapterBank, per_row_adapters
from lorakit.dora import MAGNITUDE, row_norms
from lorakit.errors import ConfigError, LorakitError
from lorakit.layers import lora_modules
from lorakit.merge import merged_state_dict

peft = pytest.importorskip("peft")

RTOL = TOLERANCES[torch.float32][0]
REORDERED = TOLERANCES["fp32 reordered"][0]
CHANGED = TOLERANCES["adapter changes output"][0]
LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class TinyConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean((2, 3)))


CASES: dict[str, tuple[Callable[[], nn.Module], list[str], dict]] = {
    "llama": (tiny_llama, LLAMA, {}),
    "gpt2_conv1d": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], {"fan_in_fan_out": True}),
    "conv2d": (TinyConvNet, ["conv", "head"], {}),
}


def _inputs(name: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    if name == "conv2d":
        return {"x": torch.randn(2, 3, 6, 6, generator=g)}
    return {"input_ids": torch.randint(0, 64, (2, 9), generator=g)}


def _output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def _peft_name(key: str) -> str:
    owner, _, leaf = key.rpartition(".")
    if leaf == MAGNITUDE:
        return f"base_model.model.{owner}.{MAGNITUDE}.default.weight"
    module, _, factor = owner.rpartition(".")
    return f"base_model.model.{module}.{factor}.default.{leaf}"


def _randomize_dora(model: nn.Module, seed: int = 0) -> None:
    """Non-zero factors and a magnitude moved off its initial norms, so every term of the formula matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in sorted(adapter_parameters(model).items()):
            if key.endswith(MAGNITUDE):
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _dora_model(name: str, seed: int = 0, **extra) -> nn.Module:
    build, targets, _ = CASES[name]
    model = build()
    inject(model, LoraConfig(rank=4, alpha=8, targets=targets, dora=True, **extra))
    _randomize_dora(model, seed)
    return model


def _twins(name: str) -> tuple[nn.Module, nn.Module]:
    build, targets, peft_extra = CASES[name]
    model = _dora_model(name)
    peft_model = peft.get_peft_model(build(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                              use_dora=True, **peft_extra))
    theirs = dict(peft_model.named_parameters())
    with torch.no_grad():
        for key, p in adapter_parameters(model).items():
            theirs[_peft_name(key)].copy_(p)
    return model, peft_model


# ------------------------------------------------------------------------------------------------ the formula


def test_row_norms_equal_the_norms_of_the_dense_sum():
    g = torch.Generator().manual_seed(0)
    w, a, b = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((12, 20), (3, 20), (12, 3)))
    expected = torch.linalg.norm(w + 0.7 * b @ a, dim=1)
    assert relative_error(row_norms(w.float(), a.float(), b.float(), 0.7), expected) <= RTOL


def test_forward_and_gradients_equal_the_float64_formula_with_the_norm_held_constant():
    torch.manual_seed(0)
    layer = nn.Linear(16, 10)
    model = nn.Sequential(layer)
    inject(model, LoraConfig(rank=3, alpha=6, targets=["0"], dora=True))
    _randomize_dora(model)
    module = dict(lora_modules(model))["0"]
    x = torch.randn(5, 16)
    out = model(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()

    w, bias = module.weight.detach().double(), module.bias.detach().double()
    a = module.lora_A.weight.detach().double().requires_grad_()
    b = module.lora_B.weight.detach().double().requires_grad_()
    m = module.lora_magnitude_vector.detach().double().requires_grad_()
    s = module.scaling
    adapted = w + s * b @ a
    norms = torch.linalg.norm(adapted, dim=1).detach()  # DoRA §4.3: a constant for the gradient
    expected = x.double() @ (m[:, None] * adapted / norms[:, None]).T + bias
    (expected * weights.double()).sum().backward()
    assert relative_error(out, expected) <= RTOL
    for ours, reference in ((module.lora_A.weight, a), (module.lora_B.weight, b), (module.lora_magnitude_vector, m)):
        assert relative_error(ours.grad, reference.grad) <= RTOL


def test_fresh_dora_adapter_leaves_the_output_unchanged():
    model, base = tiny_llama(), tiny_llama()
    inject(model, LoraConfig(rank=4, targets=["llama"], dora=True))
    inputs = _inputs("llama")
    assert relative_error(_output(model, inputs), _output(base, inputs)) <= RTOL


# ------------------------------------------------------------------------------------------------- vs PEFT


@pytest.mark.parametrize("name", list(CASES))
def test_same_weights_give_peft_dora_outputs(name):
    model, peft_model = _twins(name)
    inputs = _inputs(name)
    with torch.no_grad():
        ours, theirs, base = _output(model, inputs), _output(peft_model, inputs), _output(CASES[name][0](), inputs)
    assert relative_error(ours, base) > CHANGED
    assert relative_error(ours, theirs) <= RTOL


@pytest.mark.parametrize("name", list(CASES))
def test_same_weights_give_peft_dora_gradients(name):
    model, peft_model = _twins(name)
    inputs = _inputs(name)
    outputs = [_output(m, inputs) for m in (model, peft_model)]
    weights = torch.randn(outputs[0].shape, generator=torch.Generator().manual_seed(7))
    for out in outputs:
        (out * weights).sum().backward()
    theirs = dict(peft_model.named_parameters())
    for key, p in adapter_parameters(model).items():
        assert relative_error(p.grad, theirs[_peft_name(key)].grad) <= RTOL, key


def test_lorakit_dora_file_loads_in_peft_with_same_outputs(tmp_path):
    model = _dora_model("llama")
    save_adapter(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    inputs = _inputs("llama")
    with torch.no_grad():
        assert relative_error(_output(loaded, inputs), _output(model, inputs)) <= RTOL


def test_peft_dora_file_loads_in_lorakit_with_same_outputs(tmp_path):
    _, peft_model = _twins("llama")
    peft_model.save_pretrained(tmp_path)
    model = tiny_llama()
    load_adapter(model, tmp_path)
    assert all(m.lora_magnitude_vector is not None for _, m in lora_modules(model))
    inputs = _inputs("llama")
    with torch.no_grad():
        assert relative_error(_output(model, inputs), _output(peft_model, inputs)) <= RTOL


def test_dora_file_without_magnitudes_is_refused_naming_the_missing_key(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from lorakit.io import adapter_checksum

    save_adapter(_dora_model("llama"), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    with safe_open(str(weights), "pt") as f:
        metadata = f.metadata()
    kept = {k: v for k, v in load_file(weights).items() if MAGNITUDE not in k}
    save_file(kept, weights, metadata={**metadata, "lorakit_checksum": adapter_checksum(kept)})
    with pytest.raises(LorakitError, match=f"does not fit this model: missing key '.*{MAGNITUDE}'"):
        load_adapter(tiny_llama(), tmp_path)


# ------------------------------------------------------------------------------------------ merge, principal


@pytest.mark.parametrize("name", list(CASES))
def test_merged_equals_unmerged_and_unmerge_restores_the_base(name):
    model = _dora_model(name)
    model.eval()
    inputs = _inputs(name)
    base_weights = {n: m.weight.detach().clone() for n, m in lora_modules(model)}
    with torch.no_grad():
        unmerged = _output(model, inputs)
        merge(model)
        merged = _output(model, inputs)
        unmerge(model)
        again = _output(model, inputs)
    assert relative_error(merged, unmerged) <= REORDERED
    assert relative_error(again, unmerged) <= REORDERED
    for n, m in lora_modules(model):
        assert relative_error(m.weight, base_weights[n]) <= REORDERED, n


def test_merged_state_dict_loads_into_a_plain_model_with_the_adapted_outputs():
    model = _dora_model("llama")
    plain = tiny_llama()
    plain.load_state_dict(merged_state_dict(model))
    inputs = _inputs("llama")
    with torch.no_grad():
        assert relative_error(_output(plain, inputs), _output(model, inputs)) <= REORDERED


def test_principal_init_under_dora_starts_at_the_original_output_and_matches_peft():
    model = tiny_llama()
    inject(model, LoraConfig(rank=4, alpha=8, targets=["llama"], dora=True, init="principal"))
    peft_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=LLAMA, use_dora=True, init_lora_weights="pissa"))
    inputs = _inputs("llama")
    with torch.no_grad():
        ours, theirs, base = _output(model, inputs), _output(peft_model, inputs), _output(tiny_llama(), inputs)
    assert relative_error(ours, base) <= REORDERED
    assert relative_error(theirs, base) <= REORDERED
    peft_params = dict(peft_model.named_parameters())
    for key, p in adapter_parameters(model).items():
        if key.endswith(MAGNITUDE):  # m = ‖W_res + s·B₀A₀‖ = ‖W‖ in both
            assert relative_error(p, peft_params[_peft_name(key)]) <= REORDERED, key


def test_converted_principal_dora_adapter_on_the_original_base_gives_the_same_outputs(tmp_path):
    model = tiny_llama()
    inject(model, LoraConfig(rank=4, alpha=8, targets=["llama"], dora=True, init="principal"))
    _randomize_dora(model)
    save_adapter(model, tmp_path, convert_principal=True)
    plain = tiny_llama()
    load_adapter(plain, tmp_path)
    inputs = _inputs("llama")
    with torch.no_grad():
        assert relative_error(_output(plain, inputs), _output(model, inputs)) <= REORDERED


# ------------------------------------------------------------------------------------------- mixed batches


def test_mixed_batch_rows_equal_each_adapter_alone(tmp_path):
    dora_model, lora_model = _dora_model("llama", seed=1), tiny_llama()
    inject(lora_model, LoraConfig(rank=4, alpha=8, targets=["llama"]))
    with torch.no_grad():
        for p in adapter_parameters(lora_model).values():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    save_adapter(dora_model, tmp_path / "dora")
    host = tiny_llama()
    inject(host, LoraConfig(rank=4, alpha=8, targets=["llama"]), initialize=False)
    host.eval()
    bank = AdapterBank.from_adapters(host, {"dora": tmp_path / "dora", "lora": lora_model})
    ids = _inputs("llama")["input_ids"][:1].repeat(3, 1)
    with torch.no_grad(), per_row_adapters(host, bank, ["lora", None, "dora"]):
        rows = host(input_ids=ids).logits
        expected = [_output(m, {"input_ids": ids[:1]}) for m in (lora_model, tiny_llama(), dora_model)]
    for row, reference in zip(rows, expected, strict=True):
        assert relative_error(row, reference[0]) <= REORDERED


# ---------------------------------------------------------------------------------------------- refusals


def test_dora_on_an_embedding_is_refused_naming_the_layer_and_the_fix():
    model = tiny_llama()
    with pytest.raises(ConfigError, match=r"dora applies to linear and convolution layers; 'model.embed_tokens' is "
                                          r"an Embedding \(exclude it"):
        inject(model, LoraConfig(targets=["embed_tokens", "q_proj"], dora=True))
    assert not lora_modules(model)


def test_dora_must_be_a_boolean():
    with pytest.raises(ConfigError, match="dora must be true or false, got 'yes'"):
        LoraConfig(dora="yes")  # type: ignore[arg-type]


def test_training_step_moves_the_magnitude():
    model = _dora_model("llama")
    magnitudes = {k: p.detach().clone() for k, p in adapter_parameters(model).items() if k.endswith(MAGNITUDE)}
    optimizer = torch.optim.SGD(adapter_parameters(model).values(), lr=0.1)
    inputs = _inputs("llama")
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    optimizer.step()
    moved = [k for k, p in adapter_parameters(model).items() if k in magnitudes and not torch.equal(p, magnitudes[k])]
    assert len(moved) == len(magnitudes)


def test_inference_reuses_norms_until_a_weight_changes():
    model = _dora_model("llama")
    model.eval()
    inputs = _inputs("llama")
    module = dict(lora_modules(model))["model.layers.0.self_attn.q_proj"]
    with torch.no_grad():
        first = _output(model, inputs)
        cached = module.__dict__["_dora_norms"]
        assert torch.equal(_output(model, inputs), first)
        assert module.__dict__["_dora_norms"] is cached
        module.lora_B.weight.mul_(2.0)  # an in-place change must not reuse the stale norms
        changed = _output(model, inputs)
    assert module.__dict__["_dora_norms"] is not cached
    fresh = _dora_model("llama")
    with torch.no_grad():
        dict(lora_modules(fresh))["model.layers.0.self_attn.q_proj"].lora_B.weight.mul_(2.0)
        assert relative_error(changed, _output(fresh, inputs)) <= RTOL


def test_zero_magnitude_entry_takes_the_composed_path_with_the_same_gradients():
    # The fused layer recovers z from y = z ⊙ m / ‖·‖, which needs m ≠ 0; a zero entry must fall back, not divide.
    def gradients(zero: bool) -> list[torch.Tensor]:
        model = _dora_model("llama")
        module = dict(lora_modules(model))["model.layers.0.self_attn.q_proj"]
        with torch.no_grad():
            module.lora_magnitude_vector[3] = 0.0
        if not zero:  # the same values through the composed path of every module: dropout forces it
            for _, m in lora_modules(model):
                m._no_dropout = False
        inputs = _inputs("llama")
        out = _output(model, inputs)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(7))).sum().backward()
        return [p.grad for p in adapter_parameters(model).values()]

    fused, composed = gradients(True), gradients(False)
    assert all(torch.isfinite(g).all() for g in fused)
    for ours, reference in zip(fused, composed, strict=True):
        assert relative_error(ours, reference) <= REORDERED


def test_inspect_reports_a_dora_adapter(tmp_path):
    from lorakit import inspect_adapter

    save_adapter(_dora_model("llama"), tmp_path / "dora")
    plain = tiny_llama()
    inject(plain, LoraConfig(rank=4, targets=["llama"]))
    save_adapter(plain, tmp_path / "plain")
    assert inspect_adapter(tmp_path / "dora")["dora"] is True
    assert inspect_adapter(tmp_path / "plain")["dora"] is False
