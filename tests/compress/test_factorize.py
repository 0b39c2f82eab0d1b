"""factorize: low-rank pairs against dense products, full rank against the original logits, the activation-aware
truncation against plain SVD and against its optimum computed another way, rank choice, bad input, training."""

from __future__ import annotations

import pytest
import torch
from conftest import TOLERANCES, assert_close, relative_error, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn

from lorakit.compress import LowRankLinear, factorize
from lorakit.errors import LorakitError


def _anisotropic_inputs(seed: int, tokens: int = 256, features: int = 48) -> torch.Tensor:
    """(tokens, features) float64 inputs whose covariance has eigenvalues spread over four decades, in a random
    basis."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, features, generator=g, dtype=torch.float64)
    scales = torch.logspace(-2, 0, features, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(features, features, generator=g, dtype=torch.float64))
    return (z * scales) @ rotation.T


def _single_layer(seed: int, fan_in: int = 48, fan_out: int = 40) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(fan_in, fan_out, dtype=torch.float64))


def _output_error(model: nn.Module, dense: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x) - (x @ dense.T + bias)).norm())


def test_low_rank_linear_output_equals_dense_product():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(7, generator=g, dtype=torch.float64)
    x = torch.randn(2, 4, 5, generator=g, dtype=torch.float64)
    layer = LowRankLinear.from_factors(u, v, bias)
    assert_close(layer(x), x @ (u @ v.T).T + bias)
    assert_close(layer.dense_weight(), u @ v.T)
    assert sum(p.numel() for p in layer.parameters()) == 3 * (5 + 7) + 7


def test_factorized_layer_output_equals_product_of_its_factors():
    model = _single_layer(0)
    factorize(model, ["0"], rank=6)
    layer = model[0]
    assert isinstance(layer, LowRankLinear) and layer.rank == 6
    x = _anisotropic_inputs(1)
    with torch.no_grad():
        assert_close(layer(x), x @ (layer.up.weight @ layer.down.weight).T + layer.up.bias)


def test_svd_truncation_equals_the_dense_svd_truncation():
    model = _single_layer(0)
    w = model[0].weight.detach().clone()
    report = factorize(model, ["0"], rank=5)
    u, s, vh = torch.linalg.svd(w)
    assert_close(model[0].dense_weight().detach(), u[:, :5] @ torch.diag(s[:5]) @ vh[:5], "float64 reordered")
    assert report.modules[0].discarded == pytest.approx(float((s[5:] ** 2).sum() / (s ** 2).sum()))


@pytest.mark.parametrize("method", ["svd", "activation"])
def test_full_rank_factorization_reproduces_bert_logits(method, token_ids):
    model = tiny_bert()
    with torch.no_grad():
        expected = model(input_ids=token_ids).logits
    report = factorize(model, ["bert"], rank=32, method=method, calibration=[{"input_ids": token_ids}])
    assert len(report.factorized) == 12 == sum(isinstance(m, LowRankLinear) for m in model.modules())
    with torch.no_grad():
        assert_close(model(input_ids=token_ids).logits, expected, "fp32 reordered")


@pytest.mark.parametrize("method", ["svd", "activation"])
def test_full_rank_factorization_reproduces_llama_logits(method, token_ids):
    model = tiny_llama()
    with torch.no_grad():
        expected = model(input_ids=token_ids).logits
    factorize(model, ["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], rank=32, method=method,
              calibration=[token_ids])
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == 10
    with torch.no_grad():
        assert_close(model(input_ids=token_ids).logits, expected, "fp32 reordered")


def test_full_rank_factorization_of_gpt2_conv1d_layers_reproduces_logits(token_ids):
    model = tiny_gpt2()
    with torch.no_grad():
        expected = model(input_ids=token_ids).logits
    factorize(model, ["gpt2"], rank=32)
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == 8
    with torch.no_grad():
        assert_close(model(input_ids=token_ids).logits, expected, "fp32 reordered")


def test_factorizing_a_factorized_model_again_raises():
    model = tiny_llama()
    factorize(model, ["all-linear"], ratio=0.5)
    with pytest.raises(LorakitError, match=r"target 'down' matches only factors of factorised layers"):
        factorize(model, ["down"], ratio=0.5)
    with pytest.raises(LorakitError, match=r"leave no module to adapt"):  # all-linear skips the factors
        factorize(model, ["all-linear"], ratio=0.5)


def test_ratio_half_keeps_at_most_half_of_the_chosen_parameters():
    model = tiny_llama()
    before = {n: sum(p.numel() for p in m.parameters()) for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and n != "lm_head"}
    report = factorize(model, ["all-linear"], ratio=0.5)
    modules = dict(model.named_modules())
    after = sum(sum(p.numel() for p in modules[n].parameters()) for n in before)
    assert report.parameters_before == sum(before.values())
    assert after == report.parameters_after <= 0.5 * sum(before.values())
    # the greedy allocation spends the budget: one more rank of the cheapest module would not fit
    assert report.parameters_after + min(sum(m.shape) for m in report.modules) > 0.5 * report.parameters_before


def test_rank_multiple_makes_ratio_ranks_multiples_within_the_budget():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 128), nn.Linear(128, 96), nn.Linear(96, 12))  # the last cannot reach 16
    before = sum(p.numel() for p in model.parameters())
    report = factorize(model, ["0", "1", "2"], ratio=0.5, rank_multiple=16)
    ranks = {m.name: m.rank for m in report.modules}
    assert ranks["0"] % 16 == 0 and ranks["1"] % 16 == 0 and ranks["0"] >= 16 and ranks["1"] >= 16
    assert ranks["2"] is not None and 1 <= ranks["2"] < 16  # its largest parameter-saving rank is 10: steps of 1
    assert report.parameters_after == sum(p.numel() for p in model.parameters()) <= 0.5 * before
    # the budget is spent: no module below its largest parameter-saving rank has a next step that fits
    growable = [(16 if m.name != "2" else 1) * sum(m.shape) for m in report.modules
                if m.rank is not None and m.rank < (m.shape[0] * m.shape[1] - 1) // sum(m.shape) // 16 * 16
                or m.name == "2" and m.rank < 10]
    assert growable and all(report.parameters_after + cost > 0.5 * before for cost in growable)


def test_rank_multiple_rounds_the_energy_rank_up():
    exact = factorize(_single_layer(0, 96, 128), ["0"], energy=0.5).modules[0].rank
    rounded = factorize(_single_layer(0, 96, 128), ["0"], energy=0.5, rank_multiple=16).modules[0].rank
    assert exact is not None and exact % 16 != 0 and rounded == -(-exact // 16) * 16


def test_rank_multiple_one_allocates_as_before():
    plain, ones = tiny_llama(), tiny_llama()
    assert ([m.rank for m in factorize(plain, ["all-linear"], ratio=0.4).modules]
            == [m.rank for m in factorize(ones, ["all-linear"], ratio=0.4, rank_multiple=1).modules])


def test_energy_picks_the_smallest_rank_holding_that_share():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64, bias=False, dtype=torch.float64))
    u, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))
    s = 0.8 ** torch.arange(64, dtype=torch.float64)
    with torch.no_grad():
        model[0].weight.copy_(u @ torch.diag(s) @ v.T)
    squares = [float(x) ** 2 for x in s]
    energy = 0.9
    expected = next(k for k in range(1, 65) if sum(squares[:k]) >= energy * sum(squares))
    assert sum(squares[:expected - 1]) < energy * sum(squares)
    report = factorize(model, ["0"], energy=energy)
    assert report.modules[0].rank == expected == model[0].rank
    assert 1 - report.modules[0].discarded >= energy > 1 - report.modules[0].discarded - squares[expected - 1] / sum(
        squares)


def test_energy_keeps_a_module_dense_when_its_rank_would_not_save_parameters():
    model = _single_layer(0, 8, 8)
    report = factorize(model, ["0"], energy=1.0)
    assert report.modules[0].rank is None and isinstance(model[0], nn.Linear)
    assert report.parameters_after == report.parameters_before


@pytest.mark.parametrize("seed", range(5))
def test_activation_aware_output_error_is_below_plain_svd_at_the_same_rank(seed):
    x = _anisotropic_inputs(seed)
    errors = {}
    for method in ("svd", "activation"):
        model = _single_layer(seed)
        dense, bias = model[0].weight.detach().clone(), model[0].bias.detach().clone()
        factorize(model, ["0"], rank=8, method=method, calibration=lambda m: m(x))
        errors[method] = _output_error(model, dense, bias, x)
    assert errors["activation"] < errors["svd"]


def test_activation_aware_output_error_is_the_optimum_from_the_symmetric_square_root():
    """‖X(W - W')ᵀ‖_F² for the best rank k is the tail Σ_{i>k} σᵢ² of W·C^{1/2}, whichever square root of C = XᵀX:
    here the symmetric one from an eigendecomposition, where factorize uses a Cholesky factor."""
    x = _anisotropic_inputs(3)
    model = _single_layer(3)
    dense, bias = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    report = factorize(model, ["0"], rank=8, method="activation", calibration=[{"input": x}])
    evals, evecs = torch.linalg.eigh(x.T @ x)
    root = evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T
    s = torch.linalg.svdvals(dense @ root)
    optimum = float((s[8:] ** 2).sum())
    assert _output_error(model, dense, bias, x) ** 2 == pytest.approx(optimum, rel=1e-5)  # damping 1e-6 of mean diag
    assert report.modules[0].discarded == pytest.approx(optimum / float((s ** 2).sum()), rel=1e-5)


def test_activation_aware_factors_are_balanced_and_keep_the_optimal_weight():
    """U and V of the whitened truncation carry √σ of the kept weight each, as plain SVD's do: U (out, k) and
    V (in, k) with UᵀU = VᵀV = diag(σ(W')), the singular values of W' = U Vᵀ, however small the inputs."""
    x = _anisotropic_inputs(4) * torch.logspace(-3, 0, 48, dtype=torch.float64)  # some input directions tiny
    model = _single_layer(4)
    factorize(model, ["0"], rank=6, method="activation", calibration=[{"input": x}])
    u, v = model[0].up.weight.detach(), model[0].down.weight.detach().T  # (40, 6), (48, 6)
    s = torch.linalg.svdvals(u @ v.T)[:6]
    assert_close(u.T @ u, torch.diag(s), row="float64 reordered")
    assert_close(v.T @ v, torch.diag(s), row="float64 reordered")


def test_a_bare_batch_calibrates_like_a_list_of_one(token_ids):
    ranks = []
    for calibration in (token_ids, {"input_ids": token_ids}, [token_ids]):
        report = factorize(tiny_llama(), ["all-linear"], ratio=0.5, method="activation", calibration=calibration)
        ranks.append([m.rank for m in report.modules])
    assert ranks[0] == ranks[1] == ranks[2]


class _TwoBranches(nn.Module):
    """Two same-shape linears, the second fed inputs ten times larger."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.small = nn.Linear(48, 48, dtype=torch.float64)
        self.large = nn.Linear(48, 48, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.small(x) + self.large(10 * x)


def test_activation_aware_ratio_gives_more_rank_to_the_layer_with_larger_inputs():
    model = _TwoBranches()
    x = _anisotropic_inputs(0)
    report = factorize(model, ["small", "large"], ratio=0.5, method="activation", calibration=lambda m: m(x))
    ranks = {m.name: m.rank for m in report.modules}
    assert ranks["large"] > ranks["small"]


def test_backward_through_a_factorized_model_reaches_the_factors(token_ids):
    model = tiny_llama().train()
    factorize(model, ["all-linear"], ratio=0.5)
    model(input_ids=token_ids, labels=token_ids).loss.backward()
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert layers and all(m.training for m in layers)
    for layer in layers:
        for p in (layer.up.weight, layer.down.weight):
            assert p.grad is not None and float(p.grad.norm()) > 0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"ratio": 0.0}, r"ratio must be in \(0, 1\], got 0\.0"),
    ({"ratio": 1.5}, r"ratio must be in \(0, 1\], got 1\.5"),
    ({"energy": 0.0}, r"energy must be in \(0, 1\], got 0\.0"),
    ({"energy": 2}, r"energy must be in \(0, 1\], got 2"),
    ({"rank": 0}, r"rank must be an int >= 1, got 0"),
    ({"rank": 33}, r"rank 33 is larger than min\(fan_in, fan_out\) of .*q_proj \(32, 32\).*use rank <= 16"),
    ({"rank": 4, "energy": 0.9}, r"exactly one of rank .* got rank, energy"),
    ({"rank": 4, "method": "asvd"}, r"method must be one of svd, activation, got 'asvd'"),
    ({"rank": 4, "method": "activation"}, r"method 'activation' needs calibration inputs"),
    ({"rank": 4, "method": "activation", "calibration": []}, r"calibration set is empty"),
    ({"ratio": 0.01}, r"ratio 0\.01 leaves \d+ parameters, fewer than rank 1 .* use ratio >= "),
    ({"ratio": 0.5, "rank_multiple": 0}, r"rank_multiple must be an int >= 1, got 0"),
])
def test_bad_arguments_raise_and_leave_the_model_unchanged(kwargs, message):
    model = tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LorakitError, match=message):
        factorize(model, ["all-linear"], **kwargs)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_targets_matching_a_non_linear_module_raise():
    with pytest.raises(LorakitError, match=r"linear layers only; targets also match model\.embed_tokens"):
        factorize(tiny_llama(), ["embed_tokens", "q_proj"], rank=4)


def test_factorized_logits_degrade_gracefully_at_half_the_parameters(token_ids):
    """A sanity bound, not a quality claim: half the parameters of a random model changes logits, but not into
    noise of a larger scale than the logits themselves."""
    model = tiny_llama()
    with torch.no_grad():
        expected = model(input_ids=token_ids).logits
    factorize(model, ["all-linear"], ratio=0.5)
    with torch.no_grad():
        error = relative_error(model(input_ids=token_ids).logits, expected)
    assert TOLERANCES["adapter changes output"][0] < error < 1.0
