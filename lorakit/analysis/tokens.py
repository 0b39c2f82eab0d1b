"""What the update writes, in words: output directions of ΔW read through a causal LM's unembedding.

A module that writes into the residual stream (`o_proj`, `down_proj`, GPT-2's `c_proj`, ...) adds
ΔW x = Σ_k σ_k (v_kᵀx) u_k to it. In the last layers, little stands between the residual stream and the logits,
so projecting u_k through the final norm's scale γ and the unembedding E (the "logit lens", nostalgebraist 2020)
gives the tokens that direction raises and lowers: scores = E (γ ⊙ u_k) (u_k centred first under a LayerNorm).
The lens is an approximation: it applies the final norm's scale but not its division by the residual's RMS (which
shrinks every score of a position alike), and it ignores what later blocks do with the module's output (nothing,
for the last layer's MLP output).

Sign: a singular pair (u_k, v_k) is defined up to a joint sign flip, and whether an input raises the + or the - end
depends on the sign of v_kᵀx. With texts (`probe.probe_inputs`: the inputs x each module sees on their tokens, in
the adapted model), each direction is oriented by the sign of the mean v_kᵀx, so its `plus` tokens are the ones the
update promotes on those texts and its `minus` tokens the ones it suppresses; `net_effects` reads the module's mean
contribution ΔW x̄ = Σ_k σ_k (v_kᵀx̄) u_k the same way. Without texts (or where the mean is exactly 0) the
convention puts the largest-magnitude token score at the + end: the `plus` tokens are raised by inputs with
v_kᵀx > 0 and lowered by inputs with v_kᵀx < 0. Encoders (no LM head) are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lorakit.analysis.factors import module_kind_and_layer
from lorakit.analysis.probe import InputProbe
from lorakit.lowrank import FactorSVD

# The last projection of an attention or MLP block, which writes into the residual stream, by architecture.
RESIDUAL_WRITERS = ("o_proj", "down_proj", "c_proj", "out_proj", "dense_4h_to_h", "fc2", "wo", "w2")
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


@dataclass
class TokenDirection:
    """The tokens at both ends of output direction `index` (1 = largest σ) of one module's ΔW."""

    module: str
    layer: int | None
    index: int
    sigma: float
    plus: list[str]
    plus_scores: list[float]
    minus: list[str]
    minus_scores: list[float]
    oriented_by: str = "convention"  # "texts": `plus` is what the update promotes on them (module docstring)
    mean_projection: float | None = None  # mean v_kᵀx over the texts' tokens, v_k oriented (so >= 0)
    mean_abs_projection: float | None = None  # mean |v_kᵀx|: how strongly the texts drive this direction at all


@dataclass
class NetEffect:
    """The tokens one module's mean contribution ΔW x̄ (x̄ its mean input over the texts' tokens) raises and
    lowers most, read through the final norm's scale and the unembedding; `norm` is ‖ΔW x̄‖."""

    module: str
    layer: int | None
    norm: float
    mean_input_norm: float  # ‖x̄‖
    raised: list[str]
    raised_scores: list[float]
    lowered: list[str]
    lowered_scores: list[float]


@dataclass
class TokenProbe:
    """The texts the token directions were oriented on and what each readout module adds on them on average."""

    texts: int
    tokens: int
    truncated: int  # texts cut to `probe.MAX_TOKENS` tokens
    effects: list[NetEffect]


def lm_readout(model: nn.Module) -> tuple[Tensor, Tensor | None, bool] | None:
    """(unembedding E (vocab, hidden), final norm scale γ or None, whether the norm centres) of a causal LM, or
    None for a model without an LM head."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not type(model).__name__.endswith(_CAUSAL_SUFFIXES) or not isinstance(getattr(head, "weight", None), Tensor):
        return None
    body = getattr(model, "base_model", model)
    norms = [m for m in body.children() if "norm" in type(m).__name__.lower()]
    norm = norms[-1] if norms else None  # the final norm is the body's last norm child (Llama `norm`, GPT-2 `ln_f`)
    scale = getattr(norm, "weight", None)
    centres = norm is not None and "rms" not in type(norm).__name__.lower()
    return head.weight.detach().float(), scale.detach().float() if isinstance(scale, Tensor) else None, centres  # type: ignore[union-attr]


def readout_modules(names: list[str], layers: int) -> list[str]:
    """The residual-stream writers among `names` in the last `layers` layers that have any."""
    writers = [n for n in names if n.rsplit(".", 1)[-1] in RESIDUAL_WRITERS and module_kind_and_layer(n)[1] is not None]
    last = sorted({module_kind_and_layer(n)[1] for n in writers}, reverse=True)[:layers]  # type: ignore[type-var]
    return [n for n in writers if module_kind_and_layer(n)[1] in last]


def token_directions(model: nn.Module, tokenizer: PreTrainedTokenizerBase, svds: dict[str, FactorSVD], *,
                     layers: int = 2, directions: int = 2, top: int = 8, inputs: InputProbe | None = None
                     ) -> list[TokenDirection] | None:
    """The `top` tokens at each end of the first `directions` output directions of ΔW, for the residual writers
    in the last `layers` layers; None when `model` is not a causal LM.

    inputs: statistics of each module's inputs on texts (`probe.probe_inputs`, projected on the module's V): a
        module found there has its directions oriented by the sign of the mean v_kᵀx (module docstring).
    """
    readout = lm_readout(model)
    if readout is None:
        return None
    out = []
    for name in readout_modules(list(svds), layers):
        svd = svds[name]
        if svd.u.shape[0] != readout[0].shape[1]:
            continue
        scores = _read(readout, svd.u[:, :directions])  # (vocab, K)
        stats = inputs.modules.get(name) if inputs is not None else None
        for k in range(scores.shape[1]):
            column, mean, mean_abs = scores[:, k], None, None
            if stats is not None:
                mean, mean_abs = float(svd.v[:, k].double() @ stats.mean), float(stats.mean_abs_projection[k])
            if mean:
                column = column if mean > 0 else -column  # orientation: the sign of v_kᵀx on the texts
            elif column.max() < -column.min():
                column = -column  # orientation by convention: the strongest token at the + end
            plus, minus = torch.topk(column, top), torch.topk(-column, top)
            out.append(TokenDirection(name, module_kind_and_layer(name)[1], k + 1, float(svd.s[k]),
                                      _decode(tokenizer, plus.indices), plus.values.tolist(),
                                      _decode(tokenizer, minus.indices), (-minus.values).tolist(),
                                      "texts" if mean else "convention", abs(mean) if mean is not None else None,
                                      mean_abs))
    return out


def net_effects(model: nn.Module, tokenizer: PreTrainedTokenizerBase, svds: dict[str, FactorSVD],
                inputs: InputProbe, *, top: int = 8) -> list[NetEffect]:
    """For each module of `inputs` (that `svds` has and whose output is the LM's hidden size), the `top` tokens
    that ΔW x̄ = U diag(σ) Vᵀ x̄ raises and lowers most: scores E (γ ⊙ ΔW x̄), in logits before the final norm's
    division by the residual's RMS. [] when `model` is not a causal LM."""
    readout = lm_readout(model)
    if readout is None:
        return []
    out = []
    for name, stats in inputs.modules.items():
        svd = svds.get(name)
        if svd is None or svd.u.shape[0] != readout[0].shape[1]:
            continue
        delta = svd.u @ (svd.s * (svd.v.T @ stats.mean))  # (out,) = ΔW x̄, float64
        scores = _read(readout, delta[:, None])[:, 0]  # (vocab,)
        raised, lowered = torch.topk(scores, top), torch.topk(-scores, top)
        out.append(NetEffect(name, module_kind_and_layer(name)[1], float(delta.norm()), float(stats.mean.norm()),
                             _decode(tokenizer, raised.indices), raised.values.tolist(),
                             _decode(tokenizer, lowered.indices), (-lowered.values).tolist()))
    return out


def _read(readout: tuple[Tensor, Tensor | None, bool], vectors: Tensor) -> Tensor:
    """Token scores (vocab, K) of residual-stream vectors (hidden, K): E (γ ⊙ vectors), centred first under a
    LayerNorm (which removes a vector's mean over the hidden axis)."""
    unembed, scale, centres = readout  # (vocab, hidden), (hidden,)
    vectors = vectors.float()
    if centres:
        vectors = vectors - vectors.mean(0, keepdim=True)
    return unembed @ (vectors if scale is None else scale[:, None] * vectors)


def _decode(tokenizer: PreTrainedTokenizerBase, ids: Tensor) -> list[str]:
    return [str(tokenizer.decode([int(i)])) for i in ids]
