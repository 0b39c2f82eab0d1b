"""What the update writes, in words: output directions of ΔW read through a causal LM's unembedding.

A module that writes into the residual stream (`o_proj`, `down_proj`, GPT-2's `c_proj`, ...) adds
ΔW x = Σ_k σ_k (v_kᵀx) u_k to it. In the last layers, little stands between the residual stream and the logits,
so projecting u_k through the final norm's scale γ and the unembedding E (the "logit lens", nostalgebraist 2020)
gives the tokens that direction raises and lowers: scores = E (γ ⊙ u_k) (u_k centred first under a LayerNorm).

Sign: a singular pair (u_k, v_k) is defined up to a joint sign flip, and whether an input raises the + or the - end
depends on the sign of v_kᵀx. Each direction is oriented so that its largest-magnitude token score is positive;
the `plus` tokens are raised (and the `minus` tokens lowered) by inputs with v_kᵀx > 0, the reverse for v_kᵀx < 0.
Encoders (no LM head) are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lorakit.analysis.factors import module_kind_and_layer
from lorakit.analysis.spectrum import FactorSVD

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
                     layers: int = 2, directions: int = 2, top: int = 8) -> list[TokenDirection] | None:
    """The `top` tokens at each end of the first `directions` output directions of ΔW, for the residual writers
    in the last `layers` layers; None when `model` is not a causal LM."""
    readout = lm_readout(model)
    if readout is None:
        return None
    unembed, scale, centres = readout  # (vocab, hidden), (hidden,)
    out = []
    for name in readout_modules(list(svds), layers):
        svd = svds[name]
        if svd.u.shape[0] != unembed.shape[1]:
            continue
        u = svd.u[:, :directions].float()  # (hidden, K)
        if centres:
            u = u - u.mean(0, keepdim=True)
        scores = unembed @ (u if scale is None else scale[:, None] * u)  # (vocab, K)
        for k in range(scores.shape[1]):
            column = scores[:, k]
            if column.max() < -column.min():
                column = -column  # orientation: the strongest token at the + end (module docstring)
            plus, minus = torch.topk(column, top), torch.topk(-column, top)
            out.append(TokenDirection(name, module_kind_and_layer(name)[1], k + 1, float(svd.s[k]),
                                      _decode(tokenizer, plus.indices), plus.values.tolist(),
                                      _decode(tokenizer, minus.indices), (-minus.values).tolist()))
    return out


def _decode(tokenizer: PreTrainedTokenizerBase, ids: Tensor) -> list[str]:
    return [str(tokenizer.decode([int(i)])) for i in ids]
