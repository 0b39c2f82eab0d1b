"""Adapters on tiny_llama for the tests of banks and of several active adapters: different ranks, alpha and rank
patterns, rsLoRA, and an adapter of only some modules (zeros elsewhere), with random non-zero factors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from torch import nn

from lorakit import LoraConfig, inject, save_adapter
from lorakit.layers import lora_modules

CONFIGS = {
    "a": LoraConfig(rank=2, alpha=4, targets=["llama"]),
    "b": LoraConfig(rank=6, alpha=3, targets=["llama"], rank_pattern={"v_proj": 3}, alpha_pattern={"o_proj": 9.0}),
    "c": LoraConfig(rank=4, alpha=8, targets=["q_proj", "down_proj"], rslora=True),
}


def randomize_factors(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in lora_modules(model):
            for p in module.lora_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def save_config_adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved adapter per entry of CONFIGS, seeded by its position."""
    out = {}
    for seed, (name, config) in enumerate(CONFIGS.items()):
        model = tiny_llama()
        inject(model, config)
        randomize_factors(model, seed)
        out[name] = Path(save_adapter(model, tmp_path_factory.mktemp(name)))
    return out
