"""A tiny LLaMA with a byte-level BPE tokenizer on disk, and LoRA adapters on it with nonzero updates, for the GGUF
export tests (tens of milliseconds each)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lorakit import LoraConfig, inject, save_adapter

TEXTS = ["the cat sat on the mat", "a dog ate the bone", "hello world, hello there", "numbers 12 and 345"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
VOCAB = 320  # 256 byte symbols, 3 special tokens, the rest merges; the model has a few unused ids on top


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style) trained on TEXTS, with SmolLM2's special tokens and a chat template."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(TEXTS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<|endoftext|>",
                                        bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama_config(tie: bool = False) -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def tiny_llama_dir(path: Path, *, tie: bool = False, seed: int = 0) -> Path:
    """A random LlamaForCausalLM (2 layers, hidden 64, 4 query and 2 key/value heads) and the BPE tokenizer."""
    torch.manual_seed(seed)
    LlamaForCausalLM(tiny_llama_config(tie)).save_pretrained(path)
    bpe_tokenizer().save_pretrained(path)
    return path


def lora_adapter(path: Path, base: Path, *, seed: int = 0, **config) -> Path:
    """A LoRA adapter on the model at `base` with B drawn at random (so ΔW ≠ 0); `config` overrides LoraConfig."""
    from lorakit.models import load_model

    model, _ = load_model(str(base))
    inject(model, LoraConfig(**{"rank": 4, "alpha": 8, "targets": ["llama"], "seed": seed, **config}))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_adapter(model, path, base_model=str(base))
    return path
