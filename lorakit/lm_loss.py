"""Causal-LM cross-entropy without the full logits tensor.

The language-model head is the largest tensor of a small model's training step: SmolLM2's 49,152-token
vocabulary over 4 x 128 positions is 100 MB of logits in fp32, and the usual loss keeps that, its float copy and
its log-softmax for backward. Here the head runs on the supervised positions only, gathered first, and in chunks
of rows; the gradient of each chunk with respect to its hidden states (and to the head, when that trains) is
computed right there in the forward pass, so no chunk's logits live past its own iteration:

    total, count = causal_lm_loss(model, input_ids, attention_mask, labels)   # sum over supervised tokens
    loss = chunked_cross_entropy(hidden, head.weight, head.bias, labels)      # (B, T, H) states -> mean

This is the fused linear-cross-entropy of Liger-Kernel and of Wijmans et al., "Cut Your Losses in Large-Vocabulary
Language Models" (2024), without their kernels. Computing the gradient in the forward pass costs two matmuls per
chunk (logits, then d/dh), as the plain loss does; recomputing the chunk in backward under
`torch.utils.checkpoint` would cost three, and is used only for a head that is not a plain linear layer (a LoRA
module on `lm_head`).
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from lorakit import gemm
from lorakit.distributed import unwrap

log = logging.getLogger(__name__)

IGNORE = -100  # label of positions outside the loss, as in torch's cross_entropy
DEFAULT_CHUNK_SIZE = 1024  # rows of logits per chunk: 1024 x 49,152 fp32 is 200 MB, and the matmul stays efficient

# Per model: does `head(final hidden states)` reproduce its logits? Keyed by whether the states come from the
# backbone (False) or from the model's own forward with output_hidden_states (True).
_VERIFIED: weakref.WeakKeyDictionary[nn.Module, dict[bool, bool]] = weakref.WeakKeyDictionary()


def chunked_cross_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, *,
                          chunk_size: int = DEFAULT_CHUNK_SIZE, reduction: Literal["mean", "sum"] = "mean"
                          ) -> Tensor:
    """Next-token cross-entropy of `hidden @ weight.T + bias` against `labels`, never holding more than
    `chunk_size` rows of logits.

    hidden: (B, T, H) final hidden states; weight: (V, H) output projection; bias: (V,) or None;
    labels: (B, T) token ids, IGNORE (-100) where there is no loss. Position t predicts labels[:, t + 1].
    Returns a float32 scalar: the mean over supervised positions, or their sum. Raises ValueError for
    mismatched shapes, a chunk_size that is not a positive int, or a mean over no supervised position.
    """
    _check_chunk_size(chunk_size)
    rows, targets = supervised_rows(hidden, labels)
    total = linear_cross_entropy_sum(rows, weight, bias, targets, chunk_size)
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if rows.shape[0] == 0:
        raise ValueError("labels supervise no position (all are -100 after the shift); the mean is undefined")
    return total / rows.shape[0]


def supervised_rows(hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(rows (N, H), targets (N,)): the hidden states of the N positions whose next token is supervised."""
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"hidden must be (B, T, H) and labels (B, T); got hidden {tuple(hidden.shape)} and "
                         f"labels {tuple(labels.shape)}")
    targets = labels[:, 1:]  # (B, T-1)
    supervised = targets != IGNORE
    return hidden[:, :-1][supervised], targets[supervised]  # (N, H), (N,)


def linear_cross_entropy_sum(rows: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                             chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """Summed cross-entropy of `rows @ weight.T + bias` (N, V) against `targets` (N,), in chunks of rows;
    a float32 scalar with gradients for whichever of rows, weight and bias require them."""
    _check_chunk_size(chunk_size)

    def chunk(start: int, stop: int, grad_rows: Tensor | None, grad_weight: Tensor | None,
              grad_bias: Tensor | None) -> Tensor:
        return _chunk_cross_entropy(rows[start:stop], weight, bias, targets[start:stop], grad_rows, grad_weight,
                                    grad_bias)

    return chunked_linear_loss(rows, weight, bias, chunk, chunk_size)


# chunk(start, stop, grad_rows, grad_weight, grad_bias) -> the summed loss of rows[start:stop]; writes d/d rows into
# grad_rows (the chunk's view) and adds d/d weight and d/d bias into the accumulators given (None: not wanted).
ChunkLoss = Callable[[int, int, Tensor | None, Tensor | None, Tensor | None], Tensor]


def chunked_linear_loss(rows: Tensor, weight: Tensor, bias: Tensor | None, chunk: ChunkLoss, chunk_size: int
                        ) -> Tensor:
    """A summed loss of the logits `rows @ weight.T + bias` (N, V), computed by `chunk` on chunks of rows, which
    also computes each chunk's gradients in forward, so no (N, V) tensor is ever whole; a float32 scalar with
    gradients for whichever of rows, weight and bias require them."""
    grad_on = torch.is_grad_enabled()
    wants = tuple(grad_on and t is not None and t.requires_grad for t in (rows, weight, bias))
    out: Tensor = _ChunkedLinearLoss.apply(rows, weight, bias, chunk, chunk_size, wants)
    return out


def head_cross_entropy_sum(rows: Tensor, head: nn.Module, targets: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE
                           ) -> Tensor:
    """As `linear_cross_entropy_sum` for any head module (a LoRA module on `lm_head`): each chunk runs under
    non-reentrant activation checkpointing, so its logits are recomputed in backward instead of kept."""
    _check_chunk_size(chunk_size)
    total = rows.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk_size):
        part, part_targets = rows[start:start + chunk_size], targets[start:start + chunk_size]
        if torch.is_grad_enabled():
            total = total + checkpoint(_head_chunk_sum, head, part, part_targets, use_reentrant=False)
        else:
            total = total + _head_chunk_sum(head, part, part_targets)
    return total


def causal_lm_loss(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor, *,
                   chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[Tensor, int]:
    """(summed next-token cross-entropy over the supervised positions of `labels`, their count) for a causal
    LM (a transformers `...ForCausalLM`, possibly with lorakit adapters, activation checkpointing or DDP).

    The final hidden states come from the model's backbone (`get_decoder()`), or, when the model is wrapped in
    DDP (whose forward must run for gradients to be synchronised) or has no backbone, from its own forward
    with `output_hidden_states=True` (and `logits_to_keep=1` where it takes that). The first call on a model
    checks, on one short row, that its output embeddings applied to those states give its logits; a model that
    post-processes logits (Gemma's soft-capping, Granite's scaling, ...) fails that check and is trained with
    the full logits instead, with one warning.
    """
    inner = unwrap(model)
    backbone = find_backbone(inner)
    via_forward = model is not inner or backbone is None
    head = find_output_head(inner)
    if head is None or not head_reproduces_logits(inner, head, input_ids, attention_mask, via_forward):
        return _full_logits_loss(model, input_ids, attention_mask, labels)
    source = model if via_forward else backbone
    assert source is not None
    hidden = final_hidden_states(source, input_ids, attention_mask, via_forward)  # (B, T, H)
    rows, targets = supervised_rows(hidden, labels)
    if isinstance(head, nn.Linear):
        return linear_cross_entropy_sum(rows, head.weight, head.bias, targets, chunk_size), int(rows.shape[0])
    return head_cross_entropy_sum(rows, head, targets, chunk_size), int(rows.shape[0])


class _ChunkedLinearLoss(torch.autograd.Function):
    """A summed loss of a linear layer's logits, with the gradients computed chunk by chunk in forward (by the
    chunk function) and only scaled by the incoming gradient in backward."""

    @staticmethod
    def forward(ctx: Any, rows: Tensor, weight: Tensor, bias: Tensor | None, chunk: ChunkLoss,
                chunk_size: int, wants: tuple[bool, bool, bool]) -> Tensor:
        want_rows, want_weight, want_bias = wants
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        grad_rows = torch.empty_like(rows) if want_rows else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if want_bias and bias is not None else None
        for start in range(0, rows.shape[0], chunk_size):
            stop = min(start + chunk_size, rows.shape[0])
            total += chunk(start, stop, None if grad_rows is None else grad_rows[start:stop], grad_weight, grad_bias)
        ctx.save_for_backward(grad_rows, grad_weight, grad_bias)
        ctx.dtypes = (rows.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_total: Tensor) -> tuple[Tensor | None, ...]:
        grads = [None if g is None else (g * grad_total).to(dtype)
                 for g, dtype in zip(ctx.saved_tensors, ctx.dtypes, strict=True)]
        return (*grads, None, None, None)


def _chunk_cross_entropy(rows: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                         grad_rows: Tensor | None, grad_weight: Tensor | None, grad_bias: Tensor | None) -> Tensor:
    """Summed cross-entropy of one chunk of n rows; writes d/d rows into `grad_rows` (n, H) and adds d/d weight
    and d/d bias into the accumulators that are given. Its own function so that the chunk's (n, V) tensor is
    freed before the next chunk's is allocated."""
    logits = gemm.linear(rows, weight, bias).float()  # (n, V)
    picked = logits.gather(1, targets[:, None]).squeeze(1)  # (n,)
    # logsumexp by hand, in place: torch.logsumexp would allocate a second (n, V) tensor.
    top = logits.amax(dim=-1, keepdim=True)  # (n, 1)
    exps = logits.sub_(top).exp_()  # (n, V); the logits are not needed again
    sums = exps.sum(dim=-1, keepdim=True)  # (n, 1)
    total = (top.squeeze(1) + sums.squeeze(1).log() - picked).sum()
    if grad_rows is None and grad_weight is None and grad_bias is None:
        return total
    probs = exps.div_(sums)  # softmax
    probs[torch.arange(len(targets), device=probs.device), targets] -= 1.0  # d loss / d logits = softmax - one_hot
    linear_backward(probs, rows, weight, grad_rows, grad_weight, grad_bias)
    return total


def linear_backward(grad_logits: Tensor, rows: Tensor, weight: Tensor, grad_rows: Tensor | None,
                    grad_weight: Tensor | None, grad_bias: Tensor | None) -> None:
    """From d loss / d logits (n, V, float32) of logits = rows @ weight.T + bias: write d/d rows (n, H) into
    `grad_rows` and add d/d weight (V, H) and d/d bias (V,) into the accumulators given."""
    grad = grad_logits.to(weight.dtype)
    if grad_rows is not None:
        grad_rows.copy_(gemm.matmul(grad, weight))
    if grad_weight is not None:
        grad_weight += grad.T @ rows.to(weight.dtype)
    if grad_bias is not None:
        grad_bias += grad_logits.sum(0)


def _head_chunk_sum(head: nn.Module, rows: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(head(rows).float(), targets, reduction="sum")


def _check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def find_backbone(model: nn.Module) -> nn.Module | None:
    """The module that returns the final (normed) hidden states: `model.model` for transformers' Llama."""
    get_decoder = getattr(model, "get_decoder", None)
    backbone = get_decoder() if callable(get_decoder) else None
    if not isinstance(backbone, nn.Module) or backbone is model:
        backbone = getattr(model, "base_model", None)
    return backbone if isinstance(backbone, nn.Module) and backbone is not model else None


def find_output_head(model: nn.Module) -> nn.Module | None:
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return head if isinstance(head, nn.Module) else None


def final_hidden_states(source: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, via_forward: bool
                  ) -> Tensor:
    """(B, T, H) final hidden states: `source` is the backbone, or (via_forward) the whole, possibly wrapped,
    model, whose last entry of `hidden_states` is the input of its head."""
    if not via_forward:
        return source(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    forward = unwrap(source).forward
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(forward).parameters else {}
    out = source(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=True,
                 **keep)
    hidden: Tensor = out.hidden_states[-1]
    return hidden


def head_reproduces_logits(model: nn.Module, head: nn.Module, input_ids: Tensor, attention_mask: Tensor | None,
                            via_forward: bool) -> bool:
    """Once per model (and source of hidden states): compare `head(final hidden)` with the model's logits on
    the first 16 tokens of the first row, in eval mode without grad."""
    known = _VERIFIED.setdefault(model, {})
    if via_forward in known:
        return known[via_forward]
    ids = input_ids[:1, :16]
    mask = None if attention_mask is None else attention_mask[:1, :16]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            source = model if via_forward else find_backbone(model)
            assert source is not None
            actual = head(final_hidden_states(source, ids, mask, via_forward))
        # Both sides run the same kernels on the same shapes, so they agree to rounding; the tolerance is far
        # below what soft-capping (c * tanh(x / c)) or a logit scale changes.
        tolerance = 1e-5 if min(expected.dtype.itemsize, actual.dtype.itemsize) >= 4 else 1e-3
        ok = actual.shape == expected.shape and bool(
            (actual.float() - expected.float()).abs().max() <= tolerance * expected.float().abs().max())
        reason = "its logits are not its output embeddings applied to its final hidden states"
    except Exception as e:  # any failure of this probe means: use the plain loss
        ok, reason = False, f"probing its hidden states failed ({type(e).__name__}: {e})"
    finally:
        for m, training in modes:
            m.training = training
    if not ok:
        log.warning("%s: computing the loss from the full logits (more memory), because %s",
                    type(model).__name__, reason)
    known[via_forward] = ok
    return ok


def _full_logits_loss(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor
                      ) -> tuple[Tensor, int]:
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
    targets = labels[:, 1:]  # (B, T-1)
    supervised = targets != IGNORE
    # Upcast only the supervised rows: a float32 copy of all (B, T, V) logits is the largest tensor in a step.
    picked = logits[:, :-1][supervised].float()  # (N, V)
    return F.cross_entropy(picked, targets[supervised], reduction="sum"), int(supervised.sum())
