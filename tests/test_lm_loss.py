"""lorakit.lm_loss: the chunked causal-LM cross-entropy against the plain full-logits loss."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCES, relative_error, tiny_llama
from torch import Tensor, nn
from transformers import LlamaForCausalLM

from lorakit import LoraConfig, inject, lm_loss
from lorakit.layers import lora_modules
from lorakit.lm_loss import IGNORE, causal_lm_loss, chunked_cross_entropy
from lorakit.train.run import enable_activation_checkpointing

LOSS_RTOL = TOLERANCES[torch.float32][0]  # the same matmuls on fewer rows: fp32 roundoff
# Gradients go through softmax - one_hot computed in place and a sum in another order.
GRAD_RTOL = TOLERANCES["fp32 reordered"][0]
CHUNK_SIZES = [1, 4, 7, 1024]  # one row, chunks that do not divide N (N = 15 below), one chunk for everything


def batch() -> tuple[Tensor, Tensor, Tensor]:
    """(input_ids, attention_mask, labels) (3, 12): a prompt masked in row 0, nothing supervised in row 1,
    right padding in row 2; N = 8 + 0 + 7 = 15 supervised next-token positions."""
    ids = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    labels = ids.clone()
    labels[0, :4] = IGNORE  # prompt: positions 1..3 are not targets, 4..11 are (8)
    labels[1] = IGNORE
    labels[2, 8:] = IGNORE  # padding; targets 1..7 (7)
    labels[2, 0] = IGNORE  # position 0 is never a target anyway
    return ids, mask, labels


def lora_llama(seed: int = 0, targets: list[str] | None = None, tie: bool = False) -> LlamaForCausalLM:
    """A tiny Llama with adapters whose B is random, so that every factor gets a non-zero gradient."""
    model = tiny_llama(seed, tie=tie).train()
    inject(model, LoraConfig(rank=4, alpha=8, targets=targets or ["llama"], seed=seed))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, module in lora_modules(model):
            b = module.factors()[1]
            b.copy_(torch.randn(b.shape, generator=generator) * 0.1)
    return model


def full_logits_loss(model: nn.Module, ids: Tensor, mask: Tensor, labels: Tensor) -> Tensor:
    """The reference: the model's own (B, T, V) logits, shifted, through torch's cross_entropy."""
    logits = model(input_ids=ids, attention_mask=mask).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE)


def chunked_loss(model: nn.Module, ids: Tensor, mask: Tensor, labels: Tensor, chunk_size: int) -> Tensor:
    total, count = causal_lm_loss(model, ids, mask, labels, chunk_size=chunk_size)
    return total / count


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def assert_loss_and_grads_match(model: nn.Module, chunk_size: int) -> None:
    ids, mask, labels = batch()
    params = trainable(model)
    expected = full_logits_loss(model, ids, mask, labels)
    expected_grads = torch.autograd.grad(expected, list(params.values()))
    actual = chunked_loss(model, ids, mask, labels, chunk_size)
    actual_grads = torch.autograd.grad(actual, list(params.values()))
    assert relative_error(actual.detach(), expected.detach()) <= LOSS_RTOL
    for name, a, e in zip(params, actual_grads, expected_grads, strict=True):
        assert e.abs().sum() > 0, name  # a zero reference gradient would make the comparison vacuous
        assert relative_error(a, e) <= GRAD_RTOL, name


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_lora_loss_and_gradients_equal_the_full_logits_loss(chunk_size: int) -> None:
    assert_loss_and_grads_match(lora_llama(), chunk_size)


def test_supervised_positions_are_counted_after_the_shift() -> None:
    ids, mask, labels = batch()
    assert causal_lm_loss(lora_llama(), ids, mask, labels)[1] == 15 == int((labels[:, 1:] != IGNORE).sum())


def test_a_row_without_labels_adds_nothing() -> None:
    model = lora_llama()
    ids, mask, labels = batch()
    with torch.no_grad():
        both = chunked_loss(model, ids[:2], mask[:2], labels[:2], 4)
        alone = chunked_loss(model, ids[:1], mask[:1], labels[:1], 4)
    assert (labels[1] == IGNORE).all()
    assert relative_error(both, alone) <= LOSS_RTOL


@pytest.mark.parametrize("chunk_size", [3, 1024])
def test_gradients_match_with_activation_checkpointing(chunk_size: int) -> None:
    reference = lora_llama()
    model = lora_llama()
    enable_activation_checkpointing(model)
    ids, mask, labels = batch()
    expected = full_logits_loss(reference, ids, mask, labels)
    expected_grads = torch.autograd.grad(expected, list(trainable(reference).values()))
    actual = chunked_loss(model, ids, mask, labels, chunk_size)
    actual_grads = torch.autograd.grad(actual, list(trainable(model).values()))
    assert relative_error(actual.detach(), expected.detach()) <= LOSS_RTOL
    for a, e in zip(actual_grads, expected_grads, strict=True):
        assert relative_error(a, e) <= GRAD_RTOL


@pytest.mark.parametrize("chunk_size", [4, 1024])
def test_full_fine_tuning_of_a_tied_head_matches(chunk_size: int) -> None:
    """Every parameter trains, the head's weight is the embedding table: d/d weight is computed per chunk."""
    model = tiny_llama(tie=True).train()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert_loss_and_grads_match(model, chunk_size)


@pytest.mark.parametrize("chunk_size", [4, 1024])
def test_a_lora_module_on_the_head_is_trained_through_checkpointed_chunks(chunk_size: int) -> None:
    model = lora_llama(targets=["q_proj", "lm_head"])
    assert any(name == "lm_head" for name, _ in lora_modules(model))
    assert_loss_and_grads_match(model, chunk_size)


def test_states_from_the_models_own_forward_match(monkeypatch: pytest.MonkeyPatch) -> None:
    """The path taken under DDP (and for models without a backbone): output_hidden_states, logits_to_keep=1."""
    monkeypatch.setattr(lm_loss, "find_backbone", lambda model: None)
    model = lora_llama()
    ids, mask, labels = batch()
    causal_lm_loss(model, ids, mask, labels)  # the one-time probe
    calls: list[tuple[int, ...]] = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: calls.append(tuple(out.shape)))
    causal_lm_loss(model, ids, mask, labels)
    hook.remove()
    assert calls == [(3, 1, 128)]  # the model's own head ran on the last position only
    assert_loss_and_grads_match(model, 7)


def test_the_head_never_runs_on_all_positions() -> None:
    model = lora_llama()
    ids, mask, labels = batch()
    causal_lm_loss(model, ids, mask, labels)  # the first call probes the model once, on one short row
    calls: list[tuple[int, ...]] = []
    model.lm_head.register_forward_hook(lambda module, args, out: calls.append(tuple(out.shape)))
    causal_lm_loss(model, ids, mask, labels)[0].backward()
    assert calls == []


class ScaledLogits(LlamaForCausalLM):
    """A head that post-processes its logits (as Granite's logits_scaling does)."""

    def forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = super().forward(*args, **kwargs)
        out.logits = out.logits / 4.0
        return out


def test_a_model_that_rescales_its_logits_gets_the_full_logits_loss(caplog: pytest.LogCaptureFixture) -> None:
    base = tiny_llama()
    model = ScaledLogits(base.config).train()
    model.load_state_dict(base.state_dict())
    ids, mask, labels = batch()
    with caplog.at_level(logging.WARNING):
        actual = chunked_loss(model, ids, mask, labels, 4)
    assert "computing the loss from the full logits" in caplog.text
    assert relative_error(actual.detach(), full_logits_loss(model, ids, mask, labels).detach()) <= LOSS_RTOL


# --- chunked_cross_entropy on plain tensors ------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_chunked_cross_entropy_with_bias_matches_in_every_gradient(chunk_size: int) -> None:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 10, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, requires_grad=True)
    bias = torch.randn(50, generator=generator, requires_grad=True)
    labels = torch.randint(0, 50, (3, 10), generator=generator)
    labels[1, 2:] = IGNORE
    logits = F.linear(hidden, weight, bias)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=IGNORE)
    expected_grads = torch.autograd.grad(expected, [hidden, weight, bias])
    actual = chunked_cross_entropy(hidden, weight, bias, labels, chunk_size=chunk_size)
    actual_grads = torch.autograd.grad(actual, [hidden, weight, bias])
    assert actual.dtype == torch.float32
    assert relative_error(actual.detach(), expected.detach()) <= LOSS_RTOL
    for a, e in zip(actual_grads, expected_grads, strict=True):
        assert relative_error(a, e) <= GRAD_RTOL
    total = chunked_cross_entropy(hidden, weight, bias, labels, chunk_size=chunk_size, reduction="sum")
    assert relative_error(total.detach(), expected.detach() * int((labels[:, 1:] != IGNORE).sum())) <= LOSS_RTOL


def test_chunked_cross_entropy_without_grad_builds_no_graph() -> None:
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.randn(20, 8)
    with torch.no_grad():
        loss = chunked_cross_entropy(hidden, weight, None, torch.randint(0, 20, (2, 5)))
    assert loss.grad_fn is None and not loss.requires_grad


def test_bad_arguments_are_errors() -> None:
    hidden, weight = torch.randn(2, 5, 8), torch.randn(20, 8)
    labels = torch.randint(0, 20, (2, 5))
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got 0"):
        chunked_cross_entropy(hidden, weight, None, labels, chunk_size=0)
    with pytest.raises(ValueError, match=r"labels \(B, T\); got hidden \(2, 5, 8\) and labels \(2, 4\)"):
        chunked_cross_entropy(hidden, weight, None, labels[:, :4])
    with pytest.raises(ValueError, match="labels supervise no position"):
        chunked_cross_entropy(hidden, weight, None, torch.full((2, 5), IGNORE))
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum', got 'none'"):
        chunked_cross_entropy(hidden, weight, None, labels, reduction="none")  # type: ignore[arg-type]
