"""Tiny teachers and students on disk for the distillation tests (milliseconds to build)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

WORDS = ["[UNK]", "</s>", "[PAD]", "###", "Instruction:", "Response:", "say", "yes", "no", "hello", "world", "a",
         "b", "c", "good", "bad", "film", "great", "dull"]


def word_tokenizer(words: list[str] = WORDS) -> PreTrainedTokenizerFast:
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>", pad_token="[PAD]")


def tiny_causal(vocab_size: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def save_causal_dir(path: Path, seed: int, tokenizer: PreTrainedTokenizerBase | None = None) -> Path:
    """A tiny Llama with a word-level tokenizer, saved as a model directory."""
    tokenizer = tokenizer or word_tokenizer()
    tiny_causal(len(tokenizer), seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_classifier_dir(path: Path, tokenizer: PreTrainedTokenizerBase, labels: list[str], seed: int = 1) -> Path:
    """A tiny BERT sequence classifier over `tokenizer`'s vocabulary, with a task.json naming `labels`: what a
    fully fine-tuned classification run publishes as RUN/model."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=len(labels))
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "task.json").write_text(json.dumps({"task": "classification", "labels": labels, "text": "text",
                                                "text_pair": None, "label": "label", "max_length": 16}))
    return path
