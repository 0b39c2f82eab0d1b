"""The token projection: constructed output directions of ΔW read through a constructed unembedding give the
tokens they were built to point at, at the end the sign convention puts them, or, with inputs, at the end the sign
of the mean input projection puts them; the net effect is the unembedded update of the mean input; encoders are
skipped."""

from __future__ import annotations

import pytest
import torch
from conftest import approx, tiny_bert, tiny_gpt2, tiny_llama
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from lorakit.analysis.probe import InputProbe, InputStats
from lorakit.analysis.spectrum import FactorSVD
from lorakit.analysis.tokens import lm_readout, net_effects, readout_modules, token_directions

LAST_O = "model.layers.1.self_attn.o_proj"


def _tokenizer(size: int = 128) -> PreTrainedTokenizerFast:
    backend = Tokenizer(WordLevel({f"w{i}": i for i in range(size)}, unk_token="w0"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0")


def _model_reading_axes():
    """A tiny Llama whose unembedding reads hidden axis t as token t (t < 32), token 40 as -axis 5 at half
    strength, and whose final norm scales nothing: scores of a direction u are u itself, plus token 40's."""
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[:32] = torch.eye(32)
        model.lm_head.weight[40, 5] = -0.5
        model.model.norm.weight.fill_(1.0)
    return model


def _svd(columns: list[torch.Tensor], sigma: list[float]) -> FactorSVD:
    u = torch.stack(columns, dim=1).double()  # (hidden, k)
    return FactorSVD(u, torch.tensor(sigma, dtype=torch.float64), torch.eye(64, len(sigma), dtype=torch.float64))


def test_directions_name_the_tokens_they_point_at_with_the_strongest_at_the_plus_end():
    e = torch.eye(32)
    first = 0.9 * e[5] + 0.3 * e[9] - 0.2 * e[7]
    second = -(0.8 * e[7]) + 0.1 * e[3]  # stored with the sign that puts its strongest token at the - end
    svd = _svd([first / first.norm(), second / second.norm()], [3.0, 1.0])
    tokens = token_directions(_model_reading_axes(), _tokenizer(), {LAST_O: svd}, directions=2, top=2)
    assert tokens is not None and [t.index for t in tokens] == [1, 2]
    assert tokens[0].plus == ["w5", "w9"] and tokens[0].minus == ["w40", "w7"]
    assert tokens[0].sigma == 3.0 and tokens[0].layer == 1
    assert tokens[1].plus[0] == "w7"  # flipped: the convention puts the largest-magnitude score at the + end
    assert tokens[1].plus_scores[0] > 0 and tokens[1].minus_scores[0] < 0


def test_the_final_norm_scale_weighs_the_directions():
    model = _model_reading_axes()
    with torch.no_grad():
        model.model.norm.weight[9] = 10.0  # axis 9 now outweighs axis 5
    u = torch.eye(32)[5] * 0.9 + torch.eye(32)[9] * 0.3
    tokens = token_directions(model, _tokenizer(), {LAST_O: _svd([u / u.norm()], [1.0])}, directions=1, top=1)
    assert tokens is not None and tokens[0].plus == ["w9"]


def test_only_residual_writers_of_the_last_layers_are_read():
    names = [f"model.layers.{i}.{k}" for i in range(4) for k in ("self_attn.q_proj", "self_attn.o_proj",
                                                                    "mlp.down_proj")]
    assert readout_modules(names, 2) == ["model.layers.2.self_attn.o_proj", "model.layers.2.mlp.down_proj",
                                         "model.layers.3.self_attn.o_proj", "model.layers.3.mlp.down_proj"]
    assert readout_modules(["transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_proj"], 1) == [
        "transformer.h.1.mlp.c_proj"]


def test_gpt2_readout_centres_under_its_layer_norm():
    readout = lm_readout(tiny_gpt2())
    assert readout is not None
    unembed, scale, centres = readout
    assert unembed.shape == (128, 32) and scale is not None and scale.shape == (32,) and centres
    llama = lm_readout(tiny_llama())
    assert llama is not None and not llama[2]  # RMSNorm does not centre


def test_an_encoder_has_no_token_projection():
    svd = _svd([torch.eye(32)[0]], [1.0])
    assert lm_readout(tiny_bert()) is None
    assert token_directions(tiny_bert(), _tokenizer(), {"bert.encoder.layer.1.output.dense": svd}) is None


def _inputs(mean: torch.Tensor, mean_abs: list[float]) -> InputProbe:
    stats = InputStats(mean.double(), torch.tensor(mean_abs, dtype=torch.float64))
    return InputProbe(texts=1, tokens=4, truncated=0, modules={LAST_O: stats})


def _two_directions() -> FactorSVD:
    e = torch.eye(32)
    first = 0.9 * e[5] + 0.3 * e[9] - 0.2 * e[7]  # stored scores: + w5 w9, - w40 w7
    second = -(0.8 * e[7]) + 0.1 * e[3]  # stored scores: + w3, - w7 (the convention flips it: w7 at +)
    return _svd([first / first.norm(), second / second.norm()], [3.0, 1.0])


@pytest.mark.parametrize("signs", [(1, 1), (1, -1), (-1, 1), (-1, -1)])
def test_with_inputs_a_direction_is_flipped_exactly_when_the_mean_input_projection_is_negative(signs):
    svd = _two_directions()  # V = the first two input axes, so v_kᵀx̄ = x̄[k]
    mean = torch.zeros(64)
    mean[0], mean[1] = 0.5 * signs[0], 0.25 * signs[1]
    stored = token_directions(_model_reading_axes(), _tokenizer(), {LAST_O: svd}, top=2,
                              inputs=_inputs(torch.zeros(64), [0.0, 0.0]))  # mean 0: the convention
    assert stored is not None and [t.oriented_by for t in stored] == ["convention", "convention"]
    tokens = token_directions(_model_reading_axes(), _tokenizer(), {LAST_O: svd}, top=2,
                              inputs=_inputs(mean, [0.7, 0.4]))
    assert tokens is not None
    as_stored = [("w5", "w40"), ("w3", "w7")]  # the strongest (plus, minus) tokens with the SVD's own sign
    for t, sign, (plus, minus) in zip(tokens, signs, as_stored, strict=True):
        assert t.oriented_by == "texts"
        assert (t.plus[0], t.minus[0]) == ((plus, minus) if sign > 0 else (minus, plus))
        assert t.plus_scores[0] > 0 > t.minus_scores[0]
    assert [t.mean_projection for t in tokens] == [0.5, 0.25]  # oriented: positive whatever the stored sign
    assert [t.mean_abs_projection for t in tokens] == [0.7, 0.4]


def test_the_net_effect_is_the_unembedded_update_of_the_mean_input():
    model = _model_reading_axes()
    with torch.no_grad():
        model.model.norm.weight[:] = torch.linspace(0.5, 2.0, 32)
    g = torch.Generator().manual_seed(0)
    left, right = torch.randn(32, 3, generator=g, dtype=torch.float64), torch.randn(3, 64, generator=g,
                                                                                      dtype=torch.float64)
    u, s, vh = torch.linalg.svd(left @ right, full_matrices=False)
    svd = FactorSVD(u[:, :3], s[:3], vh[:3].T)
    mean = torch.randn(64, generator=g, dtype=torch.float64)
    (effect,) = net_effects(model, _tokenizer(), {LAST_O: svd}, _inputs(mean, [0.0] * 3), top=3)
    delta = left @ right @ mean  # ΔW x̄, dense
    scores = model.lm_head.weight.double() @ (model.model.norm.weight.double() * delta)  # E (γ ⊙ ΔW x̄)
    top, bottom = torch.topk(scores, 3), torch.topk(-scores, 3)
    assert effect.raised == [f"w{i}" for i in top.indices.tolist()]
    assert effect.lowered == [f"w{i}" for i in bottom.indices.tolist()]
    assert effect.raised_scores == approx(top.values.tolist(), "fp32 vs float64 formula")
    assert effect.norm == approx(float(delta.norm()), "float64 reordered")
    assert effect.mean_input_norm == approx(float(mean.norm()))
