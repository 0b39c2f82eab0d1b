"""lorakit.distill.loss: the KD loss against the formula written out by hand, and the chunked causal-LM form
against the whole-logits computation, forward and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import approx, assert_close
from torch import nn

from lorakit.distill.loss import head_kd_sum, kd_loss, linear_kd_sum
from lorakit.errors import LorakitError


def _hand_kd(student: list[list[float]], teacher: list[list[float]], labels: list[int], alpha: float,
             t: float) -> float:
    """α·CE + (1 - α)·T²·KL(p_teacher || p_student) at temperature T, the mean over examples, in plain Python."""
    def softmax(row: list[float]) -> list[float]:
        exps = [math.exp(x) for x in row]
        return [e / sum(exps) for e in exps]

    total = 0.0
    for s, q, y in zip(student, teacher, labels, strict=True):
        ce = -math.log(softmax(s)[y])
        p_s = softmax([x / t for x in s])
        p_t = softmax([x / t for x in q])
        kl = sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s, strict=True))
        total += alpha * ce + (1 - alpha) * t * t * kl
    return total / len(labels)


@pytest.mark.parametrize("alpha, temperature", [(0.5, 2.0), (0.0, 1.0), (0.3, 4.0), (1.0, 0.5)])
def test_kd_loss_equals_the_hand_computed_formula(alpha, temperature):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g,
                                                                                          dtype=torch.float64) * 3
    labels = torch.tensor([0, 2, 1, 1, 0])
    got = kd_loss(student, teacher, labels, alpha=alpha, temperature=temperature)
    expected = _hand_kd(student.tolist(), teacher.tolist(), labels.tolist(), alpha, temperature)
    assert got.item() == approx(expected, "fp32 vs float64 formula")  # kd_loss computes in float32


def test_alpha_one_is_the_task_cross_entropy():
    student, teacher = torch.randn(4, 5), torch.randn(4, 5)
    labels = torch.tensor([1, 0, 4, 2])
    assert torch.equal(kd_loss(student, teacher, labels, alpha=1.0, temperature=3.0),
                       F.cross_entropy(student, labels))


def test_soft_term_vanishes_when_the_student_is_the_teacher():
    logits = torch.randn(4, 6)
    loss = kd_loss(logits, logits.clone(), torch.tensor([0, 1, 2, 3]), alpha=0.0, temperature=2.0)
    assert loss.item() == approx(0.0, torch.float32)


@pytest.mark.parametrize("alpha, temperature, message", [(1.5, 2.0, "alpha must be in \\[0, 1\\]"),
                                                         (-0.1, 2.0, "alpha must be in \\[0, 1\\]"),
                                                         (0.5, 0.0, "temperature must be a positive number"),
                                                         (0.5, -1.0, "temperature must be a positive number")])
def test_bad_alpha_or_temperature_is_refused(alpha, temperature, message):
    with pytest.raises(LorakitError, match=message):
        kd_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([0, 1]), alpha=alpha, temperature=temperature)


def test_logits_of_another_label_set_are_refused():
    with pytest.raises(LorakitError, match="teacher must have the student's label set"):
        kd_loss(torch.zeros(2, 2), torch.zeros(2, 3), torch.tensor([0, 1]), alpha=0.5, temperature=2.0)


def _reference_sum(rows, weight, bias, targets, teacher, alpha, t):
    """The summed per-row KD loss from whole (N, V) logits, by plain autograd in float64."""
    logits = rows @ weight.T + bias
    log_p = torch.log(torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True))
    ce = -log_p[torch.arange(len(targets)), targets]
    p_s = torch.exp(logits / t) / torch.exp(logits / t).sum(-1, keepdim=True)
    p_t = torch.exp(teacher / t) / torch.exp(teacher / t).sum(-1, keepdim=True)
    kl = (p_t * (torch.log(p_t) - torch.log(p_s))).sum(-1)
    return (alpha * ce + (1 - alpha) * t * t * kl).sum()


def _inputs(n: int = 11, h: int = 6, v: int = 13):
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    teacher = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    return rows, weight, bias, targets, teacher


@pytest.mark.parametrize("chunk_size", [1, 4, 11, 64])
def test_chunked_linear_kd_equals_the_whole_logits_loss_and_its_gradients(chunk_size):
    rows, weight, bias, targets, teacher = _inputs()
    got = linear_kd_sum(rows, weight, bias, targets, lambda a, b: teacher[a:b], alpha=0.4, temperature=2.5,
                        chunk_size=chunk_size)
    grads = torch.autograd.grad(got * 0.7, (rows, weight, bias))
    expected = _reference_sum(rows, weight, bias, targets, teacher, 0.4, 2.5)
    expected_grads = torch.autograd.grad(expected * 0.7, (rows, weight, bias))
    assert_close(got.double(), expected, "fp32 reordered")  # the loss is summed in float32
    for a, b in zip(grads, expected_grads, strict=True):
        assert_close(a, b, "fp32 reordered")  # the logits are taken to float32


def test_chunked_kd_through_any_head_module_equals_the_linear_form():
    rows, weight, bias, targets, teacher = _inputs()
    head = nn.Linear(6, 13, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    wrapped = nn.Sequential(head)  # not an nn.Linear: the checkpointed path
    got = head_kd_sum(rows, wrapped, targets, lambda a, b: teacher[a:b], alpha=0.4, temperature=2.5, chunk_size=4)
    grads = torch.autograd.grad(got, (rows, head.weight, head.bias))
    expected = _reference_sum(rows, weight, bias, targets, teacher, 0.4, 2.5)
    expected_grads = torch.autograd.grad(expected, (rows, weight, bias))
    assert_close(got.double(), expected, "fp32 reordered")
    for a, b in zip(grads, expected_grads, strict=True):
        assert_close(a, b, "fp32 reordered")  # the logits are taken to float32
