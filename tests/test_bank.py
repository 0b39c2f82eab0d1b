"""Mixed-adapter batches (`lorakit.bank`): each row of one forward equals that row run alone with its adapter
loaded the normal way; None rows equal the base model; bad input is refused with the adapter and module named."""

from __future__ import annotations

import pytest
import torch
from bank_adapters import save_config_adapters
from conftest import TOLERANCES, assert_close, relative_error, tiny_llama
from torch import nn

from lorakit import AdapterBank, load_adapter, merge, per_row_adapters
from lorakit.errors import LorakitError, MergeStateError
from lorakit.layers import LoraLinear, lora_modules

MIXED_RTOL = TOLERANCES["fp32 reordered"][0]  # batched products sum in another order than one adapter's addmm
CHANGED = TOLERANCES["adapter changes output"][0]
@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory) -> dict[str, object]:
    return save_config_adapters(tmp_path_factory)


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 128, (5, 7), generator=torch.Generator().manual_seed(3))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _alone(adapter_dir: object | None, ids: torch.Tensor) -> torch.Tensor:
    """Logits of `ids` through the base with the adapter at `adapter_dir` loaded the normal way (None: base)."""
    model = tiny_llama()
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
    return _logits(model, ids)


def _served(adapter_dirs: dict[str, object]) -> tuple[nn.Module, AdapterBank]:
    """A base with adapter "a" loaded (for its LoRA modules) and a bank of all three adapters."""
    model = tiny_llama()
    load_adapter(model, adapter_dirs["a"])
    return model, AdapterBank.from_adapters(model, adapter_dirs)


@pytest.mark.parametrize("names", [["a", "b", "c"], ["b", None, "a", "c", "b"]], ids=["consecutive", "gathered"])
def test_each_row_equals_that_row_alone_with_its_adapter(adapter_dirs, ids, names):
    model, bank = _served(adapter_dirs)
    ids = ids[: len(names)]
    with per_row_adapters(model, bank, names):
        mixed = _logits(model, ids)
    base = _alone(None, ids)
    for row, name in enumerate(names):
        alone = _alone(adapter_dirs[name] if name else None, ids[row: row + 1])
        if name is not None:
            assert relative_error(alone, base[row: row + 1]) > CHANGED, name
        assert relative_error(mixed[row: row + 1], alone) <= MIXED_RTOL, (row, name)


def test_none_rows_equal_the_base_model_exactly(adapter_dirs, ids):
    model, bank = _served(adapter_dirs)
    with per_row_adapters(model, bank, [None] * len(ids)):
        mixed = _logits(model, ids)
    assert_close(mixed, _alone(None, ids), "exact")


def test_model_behaves_as_before_after_the_block(adapter_dirs, ids):
    model, bank = _served(adapter_dirs)
    before = _logits(model, ids)
    with per_row_adapters(model, bank, ["c"] * len(ids)):
        during = _logits(model, ids)
    assert relative_error(during, before) > CHANGED  # the block did change the model, for a while
    assert_close(_logits(model, ids), before, "exact")
    assert all(m._per_row is None for _, m in lora_modules(model))


def test_bank_from_models_and_factors_equals_bank_from_files(adapter_dirs, ids):
    model, bank = _served(adapter_dirs)
    source = tiny_llama()
    load_adapter(source, adapter_dirs["b"])
    factors = {n: (*m.factors(), m.scaling) for n, m in lora_modules(source)}
    other = AdapterBank.from_adapters(model, {"b": source, "b2": factors})
    for name, (a, b) in other.stacks.items():
        assert_close(a[1], a[2], "exact")
        assert_close(b[1], b[2], "exact")
        assert_close(b[1], bank.stacks[name][1][2][: b.shape[1]], "exact")


def test_generate_with_beams_gives_each_row_its_adapter(adapter_dirs):
    model, bank = _served(adapter_dirs)
    prompts = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(4))
    settings = {"max_new_tokens": 4, "num_beams": 3, "num_return_sequences": 2, "do_sample": False,
                "pad_token_id": 0}
    with torch.no_grad(), per_row_adapters(model, bank, ["b", "c"]):
        mixed = model.generate(prompts, **settings)  # (2 * 2, 9): the batch is expanded 3-fold inside
    for row, name in enumerate(["b", "c"]):
        alone = tiny_llama()
        load_adapter(alone, adapter_dirs[name])
        with torch.no_grad():
            expected = alone.generate(prompts[row: row + 1], **settings)
        assert torch.equal(mixed[2 * row: 2 * row + 2], expected), name


def test_same_as_peft_mixed_batch_with_adapter_names(adapter_dirs, ids):
    peft = pytest.importorskip("peft")
    model, bank = _served(adapter_dirs)
    names = ["c", "a", "b", "a", "c"]
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), adapter_dirs["a"], adapter_name="a")
    for name in ("b", "c"):
        theirs.load_adapter(adapter_dirs[name], adapter_name=name)
    with torch.no_grad():
        expected = theirs(input_ids=ids, adapter_names=names).logits
    with per_row_adapters(model, bank, names):
        assert relative_error(_logits(model, ids), expected) <= MIXED_RTOL


# -------------------------------------------------------------------------------------------------- errors


def test_wrong_number_of_names_is_refused(adapter_dirs, ids):
    model, bank = _served(adapter_dirs)
    with per_row_adapters(model, bank, ["a", "b"]), pytest.raises(LorakitError, match="2 row names"):
        _logits(model, ids)  # 5 rows


def test_unknown_name_is_refused_with_suggestion(adapter_dirs):
    model, bank = _served(adapter_dirs)
    with pytest.raises(LorakitError, match=r"no adapter 'bb'.*did you mean 'b'"):
        with per_row_adapters(model, bank, ["a", "bb"]):
            pass
    with pytest.raises(LorakitError, match="one adapter name"):
        with per_row_adapters(model, bank, "a"):  # type: ignore[arg-type]
            pass


def test_adapter_with_other_shapes_is_refused_naming_adapter_and_module(adapter_dirs):
    model, _ = _served(adapter_dirs)
    name = "model.layers.0.self_attn.q_proj"
    bad = {name: (torch.zeros(2, 16), torch.zeros(32, 2), 1.0)}
    with pytest.raises(LorakitError, match=rf"adapter 'wide': '{name}' has A \(2, 16\)"):
        AdapterBank.from_adapters(model, {"a": adapter_dirs["a"], "wide": bad})


def test_adapter_for_modules_the_model_did_not_adapt_is_refused(adapter_dirs):
    model = tiny_llama()
    load_adapter(model, adapter_dirs["c"])  # q_proj and down_proj only
    with pytest.raises(LorakitError, match="adapter 'a' adapts .* no LoRA module in this model"):
        AdapterBank.from_adapters(model, {"a": adapter_dirs["a"]})


def test_merged_model_and_training_mode_are_refused(adapter_dirs):
    model, bank = _served(adapter_dirs)
    merge(model)
    with pytest.raises(MergeStateError):
        with per_row_adapters(model, bank, ["a"]):
            pass
    model, bank = _served(adapter_dirs)
    model.train()
    with pytest.raises(LorakitError, match="inference"):
        with per_row_adapters(model, bank, ["a"]):
            pass


def test_blocks_do_not_nest(adapter_dirs):
    model, bank = _served(adapter_dirs)
    with per_row_adapters(model, bank, ["a"]), pytest.raises(LorakitError, match="already active"):
        with per_row_adapters(model, bank, ["b"]):
            pass
    assert all(m._per_row is None for _, m in lora_modules(model) if isinstance(m, LoraLinear))
