"""Tiny bases on disk and adapters with nonzero updates for the analysis tests (milliseconds each)."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import tiny_llama
from tokenizers import AddedToken, Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast

from lorakit import LoraConfig, inject, save_adapter


def word_tokenizer(size: int = 128) -> PreTrainedTokenizerFast:
    """One word per id, `w0` ... `w127`, split at spaces: a token's text names its id. The special tokens (`w0`
    unknown, `w1` end) match whole words only, so `w12` stays one token."""
    backend = Tokenizer(WordLevel({f"w{i}": i for i in range(size)}, unk_token="w0"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=AddedToken("w0", single_word=True),
                                   eos_token=AddedToken("w1", single_word=True))


def tiny_causal_lm_dir(path: Path) -> Path:
    """tiny_llama (2 layers, hidden 32, vocab 128) and a word tokenizer, saved as a local model directory."""
    tiny_llama().save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def adapter(path: Path, base: str, *, seed: int = 0, **config) -> Path:
    """An adapter on tiny_llama with B drawn at random (so ΔW ≠ 0), recording `base` as its base model."""
    model = tiny_llama()
    inject(model, LoraConfig(**{"rank": 4, "targets": ["llama"], "seed": seed, **config}))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    save_adapter(model, path, base_model=base)
    return path
