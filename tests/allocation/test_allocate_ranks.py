"""The allocation rule (lorakit.allocation.budget): exact properties on hand-made spectra and costs."""

from __future__ import annotations

import pytest
import torch

from lorakit.allocation.budget import allocate_ranks, energy_shares, minimum_budget, uniform_budget
from lorakit.errors import LorakitError


def _spent(ranks: dict[str, int], costs: dict[str, int]) -> int:
    return sum(r * costs[n] for n, r in ranks.items())


def _random_case(seed: int, modules: int = 7) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    g = torch.Generator().manual_seed(seed)
    spectra, costs = {}, {}
    for i in range(modules):
        length = int(torch.randint(2, 20, (1,), generator=g))
        decay = float(torch.rand(1, generator=g)) * 2
        spectra[f"m{i}"] = torch.rand(length, generator=g, dtype=torch.float64) * torch.arange(
            1, length + 1, dtype=torch.float64) ** -decay
        costs[f"m{i}"] = int(torch.randint(3, 40, (1,), generator=g))
    return spectra, costs


@pytest.mark.parametrize("seed", range(20))
def test_allocation_never_exceeds_the_budget_and_keeps_min_rank(seed):
    spectra, costs = _random_case(seed)
    budget = minimum_budget(costs, 2) + int(torch.randint(0, 2000, (1,), generator=torch.Generator().manual_seed(seed)))
    ranks = allocate_ranks(spectra, costs, budget, min_rank=2)
    assert _spent(ranks, costs) <= budget
    assert all(r >= 2 for r in ranks.values())
    assert all(r <= len(spectra[n]) for n, r in ranks.items())


@pytest.mark.parametrize("seed", range(10))
def test_a_larger_budget_never_lowers_any_rank(seed):
    spectra, costs = _random_case(seed)
    previous = allocate_ranks(spectra, costs, minimum_budget(costs))
    for budget in range(minimum_budget(costs), minimum_budget(costs) + 3000, 37):
        ranks = allocate_ranks(spectra, costs, budget)
        assert all(ranks[n] >= previous[n] for n in ranks), budget
        previous = ranks


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_equal_spectra_and_costs_at_a_uniform_budget_give_that_uniform_rank(rank):
    spectrum = torch.tensor([5.0, 4.0, 4.0, 2.0, 1.0, 1.0, 0.5, 0.25, 0.125, 0.1])
    spectra = {f"m{i}": spectrum.clone() for i in range(6)}
    costs = dict.fromkeys(spectra, 48)
    assert allocate_ranks(spectra, costs, uniform_budget(costs, rank)) == dict.fromkeys(spectra, rank)


def test_a_module_with_all_its_energy_in_one_direction_stays_at_min_rank():
    spectra = {"one direction": torch.tensor([3.0, 0.0, 0.0, 0.0]), "spread": torch.tensor([1.0, 1.0, 1.0, 1.0])}
    costs = {"one direction": 10, "spread": 10}
    ranks = allocate_ranks(spectra, costs, 1000)
    assert ranks == {"one direction": 1, "spread": 4}


def test_the_budget_goes_to_the_largest_gain_per_parameter():
    # m: shares 0.5, 0.3, 0.2 at cost 10 -> gains per parameter beyond rank 1: .03, .02
    # n: shares 0.4, 0.4, 0.2 at cost 25 -> .016, .008
    spectra = {"m": torch.tensor([5.0, 3.0, 2.0]), "n": torch.tensor([4.0, 4.0, 2.0])}
    costs = {"m": 10, "n": 25}
    assert allocate_ranks(spectra, costs, 35 + 10) == {"m": 2, "n": 1}
    assert allocate_ranks(spectra, costs, 35 + 20) == {"m": 3, "n": 1}
    assert allocate_ranks(spectra, costs, 35 + 20 + 25) == {"m": 3, "n": 2}
    assert allocate_ranks(spectra, costs, 35 + 20 + 50) == {"m": 3, "n": 3}


def test_ties_go_to_the_lower_component_before_the_module_listed_first():
    # m's second component and n's first both add .02 per parameter: n's (component 1) comes before m's (2)
    spectra = {"m": torch.tensor([5.0, 3.0, 2.0]), "n": torch.tensor([4.0, 4.0, 2.0])}
    costs = {"m": 10, "n": 20}
    assert allocate_ranks(spectra, costs, 30 + 10 + 20) == {"m": 2, "n": 2}
    assert allocate_ranks(spectra, costs, 30 + 10 + 19) == {"m": 2, "n": 1}  # n's does not fit: the walk stops


def test_the_walk_stops_at_the_first_component_that_does_not_fit():
    spectra = {"dear": torch.tensor([1.0, 1.0]), "cheap": torch.tensor([10.0, 1.0])}
    costs = {"dear": 10, "cheap": 1}  # gains per parameter beyond rank 1: dear .05, cheap .09
    assert allocate_ranks(spectra, costs, 11 + 5) == {"dear": 1, "cheap": 2}
    spectra["cheap"] = torch.tensor([100.0, 1.0])  # cheap .0099 now comes after dear .05, which does not fit
    assert allocate_ranks(spectra, costs, 11 + 5) == {"dear": 1, "cheap": 1}


def test_max_rank_caps_every_module():
    spectra = {"a": torch.ones(10), "b": torch.ones(10)}
    costs = {"a": 1, "b": 1}
    assert allocate_ranks(spectra, costs, 100, max_rank=4) == {"a": 4, "b": 4}


def test_the_result_does_not_depend_on_the_spectrum_order_or_scale():
    spectra = {"a": torch.tensor([1.0, 4.0, 2.0]), "b": torch.tensor([9.0, 0.5, 3.0])}
    costs = {"a": 3, "b": 5}
    scaled = {"a": torch.tensor([4.0, 2.0, 1.0]) * 2.0**20, "b": torch.tensor([0.5, 3.0, 9.0]) * 2.0**-20}
    for budget in range(8, 40):
        assert allocate_ranks(spectra, costs, budget) == allocate_ranks(scaled, costs, budget)


def test_energy_shares_sort_and_sum_to_one():
    shares = energy_shares(torch.tensor([1.0, 3.0, 0.0]))
    assert shares.tolist() == [0.75, 0.25, 0.0]
    assert energy_shares(torch.zeros(3)).tolist() == [0.0, 0.0, 0.0]


def test_a_budget_below_one_rank_per_module_names_the_minimum():
    costs = {"a": 100, "b": 250}
    with pytest.raises(LorakitError, match="need at least 350; raise the budget to 350"):
        allocate_ranks({"a": torch.ones(4), "b": torch.ones(4)}, costs, 349)
    assert allocate_ranks({"a": torch.ones(4), "b": torch.ones(4)}, costs, 350) == {"a": 1, "b": 1}


@pytest.mark.parametrize(("spectra", "costs", "match"), [
    ({"a": torch.ones(3)}, {"b": 1}, "name different modules"),
    ({"a": torch.tensor([1.0, -1.0])}, {"a": 1}, "finite non-negative"),
    ({"a": torch.tensor([1.0, float("nan")])}, {"a": 1}, "finite non-negative"),
    ({"a": torch.ones(3)}, {"a": 0}, "cost of 'a' must be a positive int"),
])
def test_bad_inputs_are_named(spectra, costs, match):
    with pytest.raises(LorakitError, match=match):
        allocate_ranks(spectra, costs, 100)


def test_a_spectrum_shorter_than_min_rank_is_an_error():
    with pytest.raises(LorakitError, match="fewer than min_rank 3"):
        allocate_ranks({"a": torch.ones(2)}, {"a": 1}, 100, min_rank=3)
