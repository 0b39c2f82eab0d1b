"""combine refuses bad input with one line naming the problem and the fix, and writes nothing."""

from __future__ import annotations

import math

import pytest
import torch
from arithmetic_helpers import make_adapter
from conftest import snapshot, tiny_bert
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit.arithmetic import combine
from lorakit.errors import LorakitError


@pytest.fixture
def pair(tmp_path):
    return make_adapter(tmp_path / "a", seed=1), make_adapter(tmp_path / "b", seed=2)


def _expect(adapters, out, matches: str, **kwargs) -> str:
    with pytest.raises(LorakitError, match=matches) as info:
        combine(adapters, out, **kwargs)
    assert "\n" not in str(info.value)
    assert not out.exists()
    return str(info.value)


@pytest.mark.parametrize("weight", [math.nan, math.inf, "1.0", True, None])
def test_weight_that_is_not_a_finite_number_is_refused(pair, tmp_path, weight):
    a, b = pair
    _expect({"a": (a, 1.0), "b": (b, weight)}, tmp_path / "c", r"weight of adapter 'b' must be a finite number")


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, math.nan])
def test_ties_density_outside_zero_one_is_refused(pair, tmp_path, density):
    a, b = pair
    _expect({"a": (a, 1.0), "b": (b, 1.0)}, tmp_path / "c", r"density must be a number in \(0, 1\]", method="ties",
             density=density)


@pytest.mark.parametrize("rate", [1.0, -0.01, 2.0])
def test_dare_rate_outside_zero_one_is_refused(pair, tmp_path, rate):
    a, b = pair
    _expect({"a": (a, 1.0), "b": (b, 1.0)}, tmp_path / "c", r"rate must be a number in \[0, 1\)", method="dare",
             rate=rate)


def test_ties_without_a_density_is_refused(pair, tmp_path):
    a, b = pair
    _expect({"a": (a, 1.0), "b": (b, 1.0)}, tmp_path / "c", r"method 'ties' needs density", method="ties")


def test_unknown_method_is_refused_with_the_choices(pair, tmp_path):
    a, b = pair
    _expect({"a": (a, 1.0), "b": (b, 1.0)}, tmp_path / "c", r"unknown method 'svd'; choose one of linear, cat, ties",
             method="svd")


def test_a_rank_for_the_exact_cat_is_refused(pair, tmp_path):
    a, b = pair
    _expect({"a": (a, 1.0), "b": (b, 1.0)}, tmp_path / "c", r"use method 'linear'", method="cat", rank=2)


def test_adapters_recorded_on_different_bases_are_refused(tmp_path):
    a = make_adapter(tmp_path / "a", seed=1)
    b = make_adapter(tmp_path / "b", seed=2, base="other-llama")
    _expect({"a": (a, 1.0), "b": (b, 1.0)}, tmp_path / "c",
             r"trained on different bases \('tiny-llama', 'other-llama'\); combine only adapters of one base")


def test_adapters_of_bases_with_other_shapes_are_refused_even_under_one_name(tmp_path):
    def wider() -> LlamaForCausalLM:  # tiny_llama with a wider MLP (48, not 64)
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2)).eval()

    a = make_adapter(tmp_path / "a", seed=1)
    b = make_adapter(tmp_path / "b", seed=2, model=wider())
    _expect({"a": (a, 1.0), "b": (b, 1.0)}, tmp_path / "c",
             r"saved on bases whose adapted layers differ \(fingerprints \w+, \w+\); combine only adapters of one")
    b2 = make_adapter(tmp_path / "b2", seed=2, model=wider(), targets=["gate_proj"])
    _expect({"a": (a, 1.0), "b": (b2, 1.0)}, tmp_path / "c", r"adapt '[^']*gate_proj' with different shapes",
             targets="union")


def test_adapters_of_different_modules_are_refused_unless_targets_says_how(tmp_path):
    a = make_adapter(tmp_path / "a", seed=1, targets=["q_proj", "v_proj"])
    b = make_adapter(tmp_path / "b", seed=2, targets=["v_proj"])
    message = _expect({"a": (a, 1.0), "b": (b, 1.0)}, tmp_path / "c", r"adapter 'b' does not adapt 2 module\(s\)")
    assert "targets='union'" in message and "targets='intersection'" in message


def test_differing_classifier_heads_are_refused_naming_the_tensor(tmp_path):
    kw = {"targets": ["query", "value"], "modules_to_save": ["classifier"]}
    a = make_adapter(tmp_path / "a", seed=1, model=tiny_bert(seed=0), base="tiny-bert", **kw)
    b = make_adapter(tmp_path / "b", seed=2, model=tiny_bert(seed=3), base="tiny-bert", **kw)
    _expect({"a": (a, 1.0), "b": (b, 1.0)}, tmp_path / "c", r"differ in 1 tensor\(s\) .*first: '[^']*classifier")


def test_principal_adapter_is_refused_with_the_conversion_command(tmp_path):
    a = make_adapter(tmp_path / "a", seed=1)
    p = make_adapter(tmp_path / "p", seed=2, init="principal")
    _expect({"a": (a, 1.0), "p": (p, 1.0)}, tmp_path / "c",
             r"'p' .* is a principal \(PiSSA\) adapter.*--principal convert --rank 8 --out DIR")


def test_output_directory_with_foreign_files_is_refused_and_left_alone(pair, tmp_path):
    a, b = pair
    out = tmp_path / "c"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    before = snapshot(out)
    with pytest.raises(LorakitError, match=r"files lorakit did not write \(notes.txt\)"):
        combine({"a": (a, 1.0), "b": (b, 1.0)}, out)
    assert snapshot(out) == before


def test_output_inside_an_input_is_refused(pair, tmp_path):
    a, b = pair
    with pytest.raises(LorakitError, match=r"overlaps the input"):
        combine({"a": (a, 1.0), "b": (b, 1.0)}, a / "c")
    assert not (a / "c").exists()


def test_an_adapter_of_embeddings_only_is_refused_by_name(pair, tmp_path):
    a, _ = pair
    e = make_adapter(tmp_path / "e", seed=3, targets=["embed_tokens"])
    _expect({"a": (a, 1.0), "emb": (e, 1.0)}, tmp_path / "c", r"adapter 'emb' .* holds no linear LoRA module")
