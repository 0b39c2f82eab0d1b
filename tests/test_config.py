"""Config validation: every problem at once, each naming the field and the allowed values."""

from __future__ import annotations

import pytest

from lorakit import LoraConfig
from lorakit.errors import ConfigError


@pytest.mark.parametrize(("field", "value", "message"), [
    ("rank", 0, "rank must be a positive int, got 0"),
    ("rank", -3, "rank must be a positive int, got -3"),
    ("rank", 2.5, "rank must be a positive int, got 2.5"),
    ("alpha", 0, "alpha must be a positive number, got 0"),
    ("alpha", -1.0, "alpha must be a positive number"),
    ("dropout", 1.0, r"dropout must be in \[0, 1\), got 1.0"),
    ("dropout", -0.1, r"dropout must be in \[0, 1\)"),
    ("init", "pisa", "init must be one of standard, gaussian, principal, got 'pisa'"),
    ("bias", "some", "bias must be one of none, lora_only, all"),
    ("targets", [], "targets must name at least one"),
])
def test_bad_values_are_named(field, value, message):
    with pytest.raises(ConfigError, match=message):
        LoraConfig(**{field: value})


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as err:
        LoraConfig(rank=0, alpha=-1, dropout=2.0)
    assert len(err.value.problems) == 3


def test_unknown_keys_are_named_with_a_suggestion():
    with pytest.raises(ConfigError, match="unknown LoRA config key 'rnak'.*did you mean 'rank'"):
        LoraConfig.from_dict({"rnak": 8})


def test_svd_iters_needs_principal_init():
    with pytest.raises(ConfigError, match="svd_iters applies only to init='principal'"):
        LoraConfig(svd_iters=4)


def test_string_targets_become_a_list_and_dict_round_trips():
    config = LoraConfig(targets="llama", rank=4)
    assert config.targets == ["llama"]
    assert LoraConfig.from_dict(config.to_dict()) == config


def test_rank_pattern_values_are_validated():
    with pytest.raises(ConfigError, match=r"rank_pattern\['q_proj'\] must be a positive int"):
        LoraConfig(rank_pattern={"q_proj": 0})
