"""Several adapters at once (`lorakit.active`): scales (w₁, w₂) give the outputs of the exact weighted combination
that `combine(method="cat")` saves; set_scale acts on the next forward; the model is its own after the block; bad
input is refused by name."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from bank_adapters import randomize_factors, save_config_adapters
from conftest import TOLERANCES, assert_close, relative_error, tiny_gpt2, tiny_llama
from torch import nn

from lorakit import (
    ActiveAdapters,
    AdapterBank,
    LoraConfig,
    active_adapters,
    inject,
    load_adapter,
    merge,
    per_row_adapters,
    save_adapter,
    set_strength,
)
from lorakit.arithmetic import combine
from lorakit.errors import LorakitError, MergeStateError
from lorakit.layers import lora_modules

SUMMED_RTOL = TOLERANCES["fp32 reordered"][0]  # one wide product against a saved adapter's, summed in another order
CHANGED = TOLERANCES["adapter changes output"][0]
@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory) -> dict[str, Path]:
    return save_config_adapters(tmp_path_factory)


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(3))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _alone(adapter_dir: Path | None, ids: torch.Tensor) -> torch.Tensor:
    """Logits through the base with one adapter loaded the normal way (None: the base model)."""
    model = tiny_llama()
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
    return _logits(model, ids)


def _combined(adapter_dirs: dict[str, Path], weights: dict[str, float], out: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits through the exact weighted sum Σ wᵢΔWᵢ saved by combine(method="cat") and loaded the normal way."""
    combine({n: (adapter_dirs[n], w) for n, w in weights.items()}, out, method="cat", targets="union")
    return _alone(out, ids)


def _served(adapter_dirs: dict[str, Path]) -> tuple[nn.Module, AdapterBank]:
    """A base with adapter "a" loaded (for its LoRA modules) and a bank of all three adapters."""
    model = tiny_llama()
    load_adapter(model, adapter_dirs["a"])
    return model, AdapterBank.from_adapters(model, adapter_dirs)


@pytest.mark.parametrize("pair", [("a", "b"), ("c", "a")], ids=["same-modules", "union-of-modules"])
def test_scales_one_and_one_equal_the_cat_combination(adapter_dirs, ids, tmp_path, pair):
    model, bank = _served(adapter_dirs)
    with active_adapters(model, bank, dict.fromkeys(pair, 1.0)):
        both = _logits(model, ids)
    expected = _combined(adapter_dirs, dict.fromkeys(pair, 1.0), tmp_path / "cat", ids)
    for name in pair:
        assert relative_error(expected, _alone(adapter_dirs[name], ids)) > CHANGED, name  # each one matters
    assert relative_error(both, expected) <= SUMMED_RTOL


def test_weighted_scales_equal_the_weighted_combination(adapter_dirs, ids, tmp_path):
    weights = {"b": 0.7, "c": -1.3, "a": 0.25}  # not in bank order: the slots are gathered
    model, bank = _served(adapter_dirs)
    with active_adapters(model, bank, weights):
        got = _logits(model, ids)
    assert relative_error(got, _combined(adapter_dirs, weights, tmp_path / "cat", ids)) <= SUMMED_RTOL


def test_scale_zero_leaves_the_other_adapter_alone(adapter_dirs, ids):
    model, bank = _served(adapter_dirs)
    with active_adapters(model, bank, {"a": 1.0, "b": 1.0}) as active:
        active.set_scale("a", 0)
        got = _logits(model, ids)
    with per_row_adapters(model, bank, ["b"] * len(ids)):
        per_row = _logits(model, ids)
    alone = _alone(adapter_dirs["b"], ids)
    assert relative_error(alone, _alone(adapter_dirs["a"], ids)) > CHANGED
    assert relative_error(got, alone) <= SUMMED_RTOL
    assert relative_error(got, per_row) <= SUMMED_RTOL


def test_set_scale_takes_effect_on_the_next_forward(adapter_dirs, ids, tmp_path):
    model, bank = _served(adapter_dirs)
    with active_adapters(model, bank, {"a": 1.0, "b": 1.0}) as active:
        first = _logits(model, ids)
        active.set_scale("b", -0.5)
        second = _logits(model, ids)
        assert active.scales == {"a": 1.0, "b": -0.5}
    assert relative_error(second, first) > CHANGED
    expected = _combined(adapter_dirs, {"a": 1.0, "b": -0.5}, tmp_path / "cat", ids)
    assert relative_error(second, expected) <= SUMMED_RTOL


def test_adapters_the_block_does_not_name_are_inactive(adapter_dirs, ids):
    model, bank = _served(adapter_dirs)  # the model carries "a" and the bank holds a, b and c
    with active_adapters(model, bank, {"c": 1.0}):
        got = _logits(model, ids)
    assert relative_error(got, _alone(adapter_dirs["c"], ids)) <= SUMMED_RTOL


def test_module_strength_multiplies_the_whole_sum(adapter_dirs, ids):
    model, bank = _served(adapter_dirs)
    with active_adapters(model, bank, {"a": 0.5, "b": 0.5}):
        halved = _logits(model, ids)
    set_strength(model, 0.5)
    with active_adapters(model, bank, {"a": 1.0, "b": 1.0}):
        weakened = _logits(model, ids)
    assert relative_error(weakened, halved) <= SUMMED_RTOL
    set_strength(model, 0.0)
    with active_adapters(model, bank, {"a": 1.0, "b": 1.0}):
        assert_close(_logits(model, ids), _alone(None, ids), "exact")


def test_fan_in_fan_out_modules_give_the_adapter_s_outputs(tmp_path, ids):
    source = tiny_gpt2()
    inject(source, LoraConfig(rank=3, alpha=6, targets=["c_attn", "c_proj"]))
    randomize_factors(source, 7)
    model = tiny_gpt2()
    load_adapter(model, save_adapter(source, tmp_path / "g"))
    bank = AdapterBank.from_adapters(model, {"g": source})
    expected = _logits(model, ids)
    with active_adapters(model, bank, {"g": 2.0}) as active:
        active.set_scale("g", 1.0)
        got = _logits(model, ids)
    assert relative_error(expected, _logits(tiny_gpt2(), ids)) > CHANGED
    assert relative_error(got, expected) <= SUMMED_RTOL


def test_low_precision_base_under_fp32_factors_equals_the_module_s_own_forward(adapter_dirs, ids):
    model = tiny_llama().to(torch.bfloat16)
    load_adapter(model, adapter_dirs["b"])
    for _, module in lora_modules(model):
        module.lora_A.float()
        module.lora_B.float()
    bank = AdapterBank.from_adapters(model, {"b": adapter_dirs["b"]})
    assert all(a.dtype == torch.float32 for a, _ in bank.stacks.values())
    own = _logits(model, ids)
    with active_adapters(model, bank, {"b": 1.0}):
        got = _logits(model, ids)
    assert got.dtype == torch.bfloat16
    assert relative_error(own, _logits(tiny_llama().to(torch.bfloat16), ids)) > CHANGED
    assert relative_error(got, own) <= TOLERANCES[torch.bfloat16][0]


def test_model_is_back_to_its_own_adapter_after_the_block(adapter_dirs, ids):
    model, bank = _served(adapter_dirs)
    before = _logits(model, ids)
    with pytest.raises(RuntimeError, match="inside"):
        with active_adapters(model, bank, {"b": 1.0, "c": 1.0}) as active:
            assert relative_error(_logits(model, ids), before) > CHANGED  # the block did change the model
            raise RuntimeError("inside")
    assert_close(_logits(model, ids), before, "exact")
    assert all(m._per_row is None for _, m in lora_modules(model))
    with pytest.raises(LorakitError, match="has ended"):
        active.set_scale("b", 0.5)


def test_handle_reports_names_and_scales_in_the_block_s_order(adapter_dirs):
    model, bank = _served(adapter_dirs)
    with active_adapters(model, bank, {"c": 1, "a": -0.5}) as active:
        assert isinstance(active, ActiveAdapters)
        assert active.names == ("c", "a")
        assert active.scales == {"c": 1.0, "a": -0.5}
        active.scales["c"] = 3.0  # a copy: changing it changes nothing
        assert active.scales["c"] == 1.0
        assert repr(active) == "ActiveAdapters(c=1, a=-0.5)"


# -------------------------------------------------------------------------------------------------- errors


def test_unknown_name_is_refused_with_suggestion(adapter_dirs):
    model, bank = _served(adapter_dirs)
    with pytest.raises(LorakitError, match=r"no adapter 'bb' in the bank \(did you mean 'b'\?\)"):
        with active_adapters(model, bank, {"a": 1.0, "bb": 1.0}):
            pass
    with active_adapters(model, bank, {"a": 1.0, "b": 1.0}) as active:
        with pytest.raises(LorakitError, match=r"no active adapter 'bb' \(did you mean 'b'\?\)"):
            active.set_scale("bb", 1.0)
        with pytest.raises(LorakitError, match="'c' is in the bank but not active in this block"):
            active.set_scale("c", 1.0)


@pytest.mark.parametrize("scale", ["1.0", True, None, math.nan, math.inf, torch.tensor(1.0)],
                         ids=["string", "bool", "none", "nan", "inf", "tensor"])
def test_scale_that_is_not_a_finite_number_is_refused(adapter_dirs, scale):
    model, bank = _served(adapter_dirs)
    with pytest.raises(LorakitError, match="the scale of adapter 'b' must be a finite number"):
        with active_adapters(model, bank, {"a": 1.0, "b": scale}):
            pass
    with active_adapters(model, bank, {"a": 1.0, "b": 0.5}) as active:
        with pytest.raises(LorakitError, match="the scale of adapter 'b' must be a finite number"):
            active.set_scale("b", scale)
        assert active.scales == {"a": 1.0, "b": 0.5}  # a refused scale changes nothing


def test_every_problem_with_the_scales_is_named_at_once(adapter_dirs):
    model, bank = _served(adapter_dirs)
    with pytest.raises(LorakitError, match=r"no adapter 'x'.*the scale of adapter 'a' must be a finite number"):
        with active_adapters(model, bank, {"x": 1.0, "a": "high"}):
            pass
    with pytest.raises(LorakitError, match="at least one adapter"):
        with active_adapters(model, bank, {}):
            pass
    with pytest.raises(LorakitError, match="scales must be a mapping"):
        with active_adapters(model, bank, ["a", "b"]):  # type: ignore[arg-type]
            pass


def test_blocks_do_not_nest(adapter_dirs, ids):
    model, bank = _served(adapter_dirs)
    with active_adapters(model, bank, {"a": 1.0}):
        outer = _logits(model, ids)
        with pytest.raises(LorakitError, match="already active"):
            with active_adapters(model, bank, {"b": 1.0}):
                pass
        with pytest.raises(LorakitError, match="already active"):
            with per_row_adapters(model, bank, ["b"] * len(ids)):
                pass
        assert_close(_logits(model, ids), outer, "exact")  # the refused blocks left the outer one in place
    with per_row_adapters(model, bank, ["b"] * len(ids)), pytest.raises(LorakitError, match="already active"):
        with active_adapters(model, bank, {"a": 1.0}):
            pass
    assert all(m._per_row is None for _, m in lora_modules(model))


def test_dora_adapter_is_refused_by_name(adapter_dirs):
    model, plain = _served(adapter_dirs)
    name, (_, bt) = next(iter(plain.stacks.items()))
    scales = torch.ones(bt.shape[0], bt.shape[2])
    scales[plain.slot("b")] = 1.5  # m / ‖W + s·B A‖ of a DoRA adapter in slot "b"
    bank = AdapterBank(plain.names, plain.stacks, {name: scales})  # type: ignore[call-arg]
    with active_adapters(model, bank, {"a": 1.0, "c": 1.0}):  # slots whose row scales are 1 add up as LoRA
        pass
    with pytest.raises(LorakitError, match="'b' are DoRA adapters"):
        with active_adapters(model, bank, {"a": 1.0, "b": 1.0}):
            pass


def test_merged_model_and_training_mode_are_refused(adapter_dirs, ids):
    model, bank = _served(adapter_dirs)
    merge(model)
    with pytest.raises(MergeStateError, match="merged"):
        with active_adapters(model, bank, {"a": 1.0}):
            pass
    model, bank = _served(adapter_dirs)
    with active_adapters(model, bank, {"a": 1.0}):
        merge(model)  # merged inside the block: the next forward refuses rather than add ΔW twice
        with pytest.raises(MergeStateError, match="merged"):
            _logits(model, ids)
    model, bank = _served(adapter_dirs)
    model.train()
    with pytest.raises(LorakitError, match="inference"):
        with active_adapters(model, bank, {"a": 1.0}):
            pass
