"""Small adapters for the arithmetic tests and their ΔW in float64, read back from the saved files."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import tiny_llama
from torch import nn

from lorakit import LoraConfig, inject, save_adapter
from lorakit.io import read_adapter
from lorakit.peft_format import config_from_peft, from_peft_key


def make_adapter(path: Path, seed: int, model: nn.Module | None = None, base: str = "tiny-llama",
                 **config) -> Path:
    """A rank-4 adapter (by default on tiny_llama, every linear module) with A and B drawn at random from `seed`,
    so each ΔW has full rank 4 and adapters of different seeds differ."""
    model = model if model is not None else tiny_llama()
    inject(model, LoraConfig(**{"rank": 4, "alpha": 8, "targets": ["llama"], "seed": seed, **config}))
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    save_adapter(model, path, base_model=base)
    return path


def deltas(path: Path) -> dict[str, torch.Tensor]:
    """Each linear module's ΔW = s·B A in float64, dense, with s as the saved config gives it."""
    raw, tensors, _ = read_adapter(path)
    config = config_from_peft(raw)
    found = {from_peft_key(k): t for k, t in tensors.items()}
    out = {}
    for key, a in found.items():
        if key.endswith(".lora_A.weight"):
            name = key.removesuffix(".lora_A.weight")
            out[name] = config.scaling_for(name) * found[f"{name}.lora_B.weight"].double() @ a.double()
    return out


def truncated(delta: torch.Tensor, k: int) -> torch.Tensor:
    """The best rank-k approximation of `delta` from its dense float64 SVD (Eckart-Young)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
