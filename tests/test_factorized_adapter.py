"""Adapters of factorised models: the header records the base's factorised layout, and loading refuses a base whose
layout differs (a dense one above all) while adapters without the record load as before."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert
from safetensors import safe_open

from lorakit import LoraConfig, LorakitError, inject, load_adapter, save_adapter
from lorakit.compress import factorize
from lorakit.factorized import factorized_layout
from lorakit.io import FACTORIZATION_KEY, WEIGHTS_NAME

FFN = ["intermediate.dense", "output.dense"]


def _factorised(rank: int = 4) -> torch.nn.Module:
    model = tiny_bert()
    factorize(model, FFN, rank=rank)
    return model


def _saved(model: torch.nn.Module, path) -> torch.nn.Module:
    inject(model, LoraConfig(rank=2, targets=["query", "value"], init="gaussian", seed=1))
    save_adapter(model, path)
    return model


def _header(path) -> dict[str, str]:
    with safe_open(str(path / WEIGHTS_NAME), framework="pt") as f:
        return f.metadata()


def test_layout_is_empty_for_a_dense_model_and_depends_on_names_and_ranks():
    assert factorized_layout(tiny_bert()) == ""
    assert factorized_layout(_factorised(4)) == factorized_layout(_factorised(4)) != ""
    assert factorized_layout(_factorised(4)) != factorized_layout(_factorised(3))
    other = tiny_bert()
    factorize(other, ["intermediate.dense"], rank=4)
    assert factorized_layout(other) not in ("", factorized_layout(_factorised(4)))


def test_adapter_of_a_dense_model_has_no_factorization_field(tmp_path):
    _saved(tiny_bert(), tmp_path / "a")
    assert FACTORIZATION_KEY not in _header(tmp_path / "a")


def test_adapter_of_a_factorised_model_records_its_layout(tmp_path):
    model = _saved(_factorised(), tmp_path / "a")
    assert _header(tmp_path / "a")[FACTORIZATION_KEY] == factorized_layout(model)


def test_adapter_of_a_factorised_model_loads_on_the_same_layout_with_the_same_outputs(tmp_path, token_ids):
    trained = _saved(_factorised(), tmp_path / "a")
    fresh = _factorised()
    load_adapter(fresh, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(fresh(token_ids).logits, trained(token_ids).logits)


@pytest.mark.parametrize("base, what", [(tiny_bert, "a dense model"), (lambda: _factorised(3), "factorised "
                                                                                             "differently")])
def test_adapter_of_a_factorised_model_is_refused_on_another_layout_in_one_line(tmp_path, base, what):
    _saved(_factorised(), tmp_path / "a")
    model = base()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(LorakitError, match=rf"was trained on a factorised base \(layout [0-9a-f]{{16}}\) and this "
                                           rf"model is {what}.*; load it on its own base") as e:
        load_adapter(model, tmp_path / "a")
    assert "\n" not in str(e.value)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())  # nothing changed


def test_allow_base_mismatch_loads_a_factorised_adapter_on_the_dense_model(tmp_path):
    _saved(_factorised(), tmp_path / "a")
    report = load_adapter(tiny_bert(), tmp_path / "a", allow_base_mismatch=True)
    assert {n.rpartition(".")[2] for n in report.adapted} == {"query", "value"}


def test_adapter_without_the_field_loads_on_a_factorised_model_as_before(tmp_path):
    trained = _saved(tiny_bert(), tmp_path / "a")  # no record: e.g. written before the field existed
    model = _factorised()
    load_adapter(model, tmp_path / "a")
    saved = {k: v for k, v in trained.state_dict().items() if ".lora_" in k}
    loaded = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    assert saved and loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
