"""The probes (lorakit.allocation.probes) against spectra known by construction or by a float64 formula."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, tiny_bert
from torch import nn

from lorakit.allocation.probes import activation_spectra, gradient_spectra
from lorakit.errors import LorakitError


class OneLayer(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer


def _sum_of_outputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model.layer(batch["x"]).sum()


def _padded(rows: torch.Tensor, lengths: list[int], fill: float) -> dict[str, torch.Tensor]:
    """rows (N, d) cut into sequences of `lengths`, right-padded with `fill` to (B, T, d), and their mask (B, T)."""
    width = max(lengths)
    x = torch.full((len(lengths), width, rows.shape[1]), fill)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    start = 0
    for i, n in enumerate(lengths):
        x[i, :n], mask[i, :n] = rows[start:start + n], 1
        start += n
    return {"x": x, "attention_mask": mask}


def test_activation_probe_gives_the_eigenvalues_of_a_known_input_covariance_and_skips_padding():
    variances = torch.tensor([9.0, 4.0, 2.5, 1.0, 0.25, 0.0625], dtype=torch.float64)
    d = len(variances)
    basis = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))[0]
    # 2d rows whose second moment Σ x xᵀ / n is basis · diag(variances) · basisᵀ: ± sqrt(d · variance) along each
    # axis
    rows = torch.cat([basis * variances.sqrt(), -basis * variances.sqrt()], dim=1).T * d**0.5  # (2d, d)
    batches = [_padded(rows[:5].float(), [3, 2], fill=1e3), _padded(rows[5:].float(), [4, 3], fill=-1e3)]
    model = OneLayer(nn.Linear(d, d + 2))
    spectra = activation_spectra(model, _sum_of_outputs, batches, ["layer"])
    assert_close(spectra["layer"], variances, "fp32 vs float64 formula")


def test_activation_probe_keeps_min_fan_in_fan_out_eigenvalues_largest_first():
    rows = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
    batch = {"x": rows.unsqueeze(0), "attention_mask": torch.ones(1, 40, dtype=torch.long)}
    spectra = activation_spectra(OneLayer(nn.Linear(6, 4)), _sum_of_outputs, [batch], ["layer"])
    expected = torch.linalg.eigvalsh((rows.double().T @ rows.double()) / 40).flip(0)[:4]
    assert_close(spectra["layer"], expected, "fp32 vs float64 formula")


def test_activation_probe_of_an_embedding_gives_the_token_frequencies():
    ids = torch.tensor([[3, 3, 3, 1, 0, 0], [2, 3, 1, 1, 7, 7]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])  # the pads (0) must not count
    model = OneLayer(nn.Embedding(10, 3))
    spectra = activation_spectra(model, lambda m, b: m.layer(b["x"]).sum(), [{"x": ids, "attention_mask": mask}],
                                 ["layer"])
    assert spectra["layer"].tolist() == [4 / 10, 3 / 10, 2 / 10]  # token 3 four times, 1 three times, 7 twice


def test_query_key_and_value_of_one_layer_see_the_same_input_spectrum():
    model = tiny_bert()
    ids = torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 2])}
    names = [f"bert.encoder.layer.0.attention.self.{m}" for m in ("query", "key", "value")]
    spectra = activation_spectra(model, lambda m, b: m(**b).loss, [batch], names)
    assert_close(spectra[names[1]], spectra[names[0]], "exact")
    assert_close(spectra[names[2]], spectra[names[0]], "exact")


def test_activation_probe_refuses_a_convolution():
    model = OneLayer(nn.Conv1d(2, 3, 1))
    with pytest.raises(LorakitError, match="use the gradient probe"):
        activation_spectra(model, lambda m, b: m.layer(b["x"]).sum(), [{"x": torch.ones(1, 2, 4)}], ["layer"])


def test_gradient_probe_gives_the_squared_singular_values_of_the_summed_gradient():
    g = torch.Generator().manual_seed(3)
    layer = nn.Linear(5, 3, bias=False)
    targets = [torch.randn(4, 3, generator=g) * 0.3 for _ in range(2)]
    inputs = [torch.randn(4, 5, generator=g) * 0.3 for _ in range(2)]
    batches = [{"x": x, "t": t} for x, t in zip(inputs, targets, strict=True)]

    def squared_error(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return 0.5 * ((model.layer(batch["x"]) - batch["t"]) ** 2).sum()

    spectra = gradient_spectra(OneLayer(layer), squared_error, batches, ["layer"])
    w = layer.weight.detach().double()
    # d/dW of ½‖W x - t‖² summed over rows and batches: Σ (W x - t) xᵀ
    grad = sum(((x.double() @ w.T - t.double()).T @ x.double() for x, t in zip(inputs, targets, strict=True)),
               torch.zeros(3, 5, dtype=torch.float64))
    assert_close(spectra["layer"].sqrt(), torch.linalg.svdvals(grad), "fp32 vs float64 formula")


def test_gradient_probe_leaves_requires_grad_grads_and_mode_as_they_were():
    model = tiny_bert().train()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("classifier"))
    sentinel = torch.full_like(model.classifier.weight, 7.0)
    model.classifier.weight.grad = sentinel
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(4))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 2])}
    names = ["bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.output.dense"]
    spectra = gradient_spectra(model, lambda m, b: m(**b).loss, [batch], names)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before
    assert model.classifier.weight.grad is sentinel
    assert all(p.grad is None for name, p in model.named_parameters() if not name.startswith("classifier.weight"))
    assert model.training
    assert [len(spectra[n]) for n in names] == [32, 32]  # min(fan_in, fan_out): (32, 32) and (64 -> 32)
    assert all(float(spectra[n][0]) > 0 and bool((spectra[n][:-1] >= spectra[n][1:]).all()) for n in names)


def test_gradient_probe_runs_without_dropout():
    model = tiny_bert()  # hidden and attention dropout 0.1: two passes in train mode would differ
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(5))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([1, 2])}
    names = ["bert.encoder.layer.0.attention.self.value"]
    first = gradient_spectra(model.train(), lambda m, b: m(**b).loss, [batch], names)
    second = gradient_spectra(model.train(), lambda m, b: m(**b).loss, [batch], names)
    assert_close(second[names[0]], first[names[0]], "exact")
