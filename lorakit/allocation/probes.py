"""Two short probes of a base model on a few batches, each giving one energy spectrum per target module.

- `activation_spectra`: the eigenvalues of the second moment of each module's input, E[x xᵀ] over the batches'
  real tokens (padding excluded). Its top eigenvectors are the directions EVA initialises A with (Paischer et al.
  2024, arXiv:2410.07170); the eigenvalues are the variance each captures. Forward passes only.
- `gradient_spectra`: the squared singular values of the gradient of the loss with respect to each module's
  weight, summed over the batches: the matrix whose top singular vectors LoRA-GA initialises A and B with (Wang
  et al. 2024, arXiv:2407.05000). A forward and a backward pass per batch.

Memory stays bounded whatever the number of batches: one (fan_in x fan_in) sum per module for activations, one
weight-sized gradient per module for gradients; no activation is kept. Each spectrum holds min(fan_in, fan_out)
entries, largest first: a rank beyond that is not possible.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.errors import LorakitError
from lorakit.layers import LoraEmbedding, LoraLinear
from lorakit.targets import LINEAR_TYPES
from lorakit.task import Batch

LossFn = Callable[[nn.Module, Batch], Tensor]  # a Task's `loss`: the mean loss of one batch, a scalar with grad
PROBES = ("activations", "gradients")
# Modules whose input is a vector (or a token id) per token, base layers or their LoRA modules (whose input is the
# same: the probes also read a model with adapters injected).
EMBEDDING_TYPES = (nn.Embedding, LoraEmbedding)
VECTOR_INPUT_TYPES = LINEAR_TYPES + EMBEDDING_TYPES + (LoraLinear,)


def activation_spectra(model: nn.Module, loss: LossFn, batches: Iterable[Batch], names: list[str]
                       ) -> dict[str, Tensor]:
    """Module name -> eigenvalues of Σ x xᵀ / n over the module's inputs x (fan_in,) at every real token of
    `batches` (float64, largest first, min(fan_in, fan_out) of them). A batch's `attention_mask` (B, T) selects the
    tokens when the input is (B, T, fan_in); an input of another shape counts every row. For an embedding, x is the
    one-hot token id, so the eigenvalues are the tokens' frequencies.

    Runs `loss(model, batch)` under `torch.no_grad()` in eval mode (the model's mode is restored).
    Raises LorakitError for a module kind without a vector input (convolutions: use the gradient probe).
    """
    modules = dict(model.named_modules())
    sums: dict[str, Tensor] = {}
    counts = dict.fromkeys(names, 0)
    current: dict[str, Tensor | None] = {"mask": None}

    def hook_for(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            rows = _token_rows(inputs[0], current["mask"])
            if isinstance(module, EMBEDDING_TYPES):  # one-hot inputs: Σ x xᵀ is the diagonal of token counts
                add = torch.bincount(rows, minlength=int(module.num_embeddings)).double()
            else:
                rows = rows.float()  # (N, fan_in)
                add = (rows.T @ rows).double()  # (fan_in, fan_in)
            sums[name] = sums[name] + add if name in sums else add
            counts[name] += int(rows.shape[0])
        return hook

    for name in names:
        if not isinstance(modules[name], VECTOR_INPUT_TYPES):
            raise LorakitError(f"the activation probe reads vector inputs of linear and embedding layers; {name!r} "
                               f"is a {type(modules[name]).__name__}: use the gradient probe, or exclude it")
    handles = [modules[name].register_forward_pre_hook(hook_for(name)) for name in names]
    try:
        with torch.no_grad(), _eval_mode(model):
            for batch in batches:
                current["mask"] = batch.get("attention_mask")
                loss(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for name in names:
        if name not in sums:
            raise LorakitError(f"{name!r} received no input in the probe's forward passes; it does not take part "
                               "in the task's loss: exclude it")
        keep = min(_weight_matrix(modules[name]).shape)
        if isinstance(modules[name], EMBEDDING_TYPES):
            values = sums[name] / max(counts[name], 1)
        else:
            values = torch.linalg.eigvalsh(sums[name] / max(counts[name], 1))  # ascending
        out[name] = torch.sort(values.clamp_min(0.0), descending=True).values[:keep]
    return out


def _token_rows(x: Tensor, mask: Tensor | None) -> Tensor:
    """The rows of a module input at real tokens: x[mask] when x is (B, T, ...) and mask (B, T), else every row.
    (N, fan_in) for vector inputs, (N,) for token ids."""
    if mask is not None and tuple(x.shape[:mask.dim()]) == tuple(mask.shape):
        x = x[mask.to(device=x.device, dtype=torch.bool)]
    return x.reshape(-1) if x.dtype in (torch.int64, torch.int32) else x.reshape(-1, x.shape[-1])


def gradient_spectra(model: nn.Module, loss: LossFn, batches: Iterable[Batch], names: list[str]
                     ) -> dict[str, Tensor]:
    """Module name -> squared singular values of G = Σ_batches ∂loss/∂W, W the module's weight as a matrix
    (convolutions: (out, in x kernel)), float64, largest first, min(fan_in, fan_out) of them.

    Only the target weights require grad while it runs, in eval mode (no dropout); afterwards every parameter's
    `requires_grad` and `.grad` and the model's mode are as they were.
    """
    modules = dict(model.named_modules())
    weights = {name: modules[name].weight for name in names}
    params = list(model.parameters())
    saved = [(p.requires_grad, p.grad) for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for w in weights.values():
            w.requires_grad_(True)
        with _eval_mode(model):
            for batch in batches:
                loss(model, batch).backward()
        out = {}
        for name, w in weights.items():
            if w.grad is None:
                raise LorakitError(f"{name!r} received no gradient in the probe's backward passes; it does not take "
                                   "part in the task's loss: exclude it")
            grad = w.grad.double()
            out[name] = torch.linalg.svdvals(grad.flatten(1) if grad.dim() > 2 else grad) ** 2
    finally:
        for p, (requires_grad, old_grad) in zip(params, saved, strict=True):
            p.requires_grad_(requires_grad)
            p.grad = old_grad
    return out


def _weight_matrix(module: nn.Module) -> Tensor:
    """The module's weight as a matrix, (fan_out, fan_in) or its transpose: its shape bounds the rank."""
    weight: Tensor = module.weight  # type: ignore[assignment]
    return weight.flatten(1) if weight.dim() > 2 else weight


@contextmanager
def _eval_mode(model: nn.Module) -> Any:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
