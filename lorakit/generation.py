"""Text generation with one set of sampling controls, shared by `generate`, `chat` and evaluation."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lorakit.errors import ConfigError, LorakitError
from lorakit.progress import progress


@dataclass
class SamplingConfig:
    """Greedy when temperature is 0; otherwise sampling with temperature, top-p (nucleus) and top-k.
    `stop`: strings that end an answer (cut before the first one). `num_beams` > 1: beam search (with
    temperature 0; beam sampling otherwise), keeping that many hypotheses per prompt."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    num_beams: int = 1

    def __post_init__(self) -> None:
        problems = [f"{name} must be a finite number, got {getattr(self, name)!r}"
                    for name in ("temperature", "top_p", "repetition_penalty")
                    if not isinstance(getattr(self, name), (int, float)) or not math.isfinite(getattr(self, name))]
        if problems:  # NaN passes every comparison below unnoticed
            raise ConfigError(problems)
        if self.max_new_tokens <= 0:
            problems.append(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if isinstance(self.num_beams, bool) or not isinstance(self.num_beams, int) or self.num_beams < 1:
            problems.append(f"num_beams must be an int >= 1, got {self.num_beams!r}")
        if problems:
            raise ConfigError(problems)


def check_prompts(prompts: list[str], *, raw: bool) -> None:
    """Raise LorakitError for no prompts, or for an empty raw prompt (nothing to continue from: with `raw` the
    prompt is not wrapped in the chat template, so an empty one has no tokens at all)."""
    if not prompts:
        raise LorakitError("no prompt: pass --prompt TEXT or write prompts to standard input, one per line")
    empty = [i + 1 for i, p in enumerate(prompts) if not p.strip()]
    if raw and empty:
        raise LorakitError(f"prompt {empty[0]} is empty; a raw prompt (--raw) needs text to continue from")


def check_can_generate(model: nn.Module, name: str) -> None:
    """Raise LorakitError when `model` cannot generate text (an encoder such as BERT has no language-model head)."""
    can = getattr(model, "can_generate", None)
    if not callable(can) or not can():
        raise LorakitError(f"model {name!r} ({type(model).__name__}) cannot generate text: it is an encoder without "
                           "a language-model head; use a causal LM such as smollm2")


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """The model's chat template applied to `messages`, ready for the assistant's turn."""
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


@torch.no_grad()
def generate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
             sampling: SamplingConfig | None = None, *, chat: bool = True, batch_size: int = 16) -> list[str]:
    """Complete each prompt (as a user message in the chat template when `chat`); returns the new text only."""
    sampling = sampling or SamplingConfig()
    texts = [chat_prompt(tokenizer, [{"role": "user", "content": p}]) if chat else p for p in prompts]
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # new tokens must follow each prompt directly
    outputs: list[str] = []
    try:
        for start in progress(range(0, len(texts), batch_size), desc="generate"):
            chunk = texts[start:start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=not chat)
            enc = {k: v.to(next(model.parameters()).device) for k, v in enc.items()}
            ids = model.generate(**enc, **_generate_kwargs(sampling, tokenizer))  # type: ignore[operator]
            new = ids[:, enc["input_ids"].shape[1]:]
            outputs += [_cut(t, sampling.stop) for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def _generate_kwargs(sampling: SamplingConfig, tokenizer: PreTrainedTokenizerBase) -> dict[str, object]:
    kwargs: dict[str, object] = {"max_new_tokens": sampling.max_new_tokens, "pad_token_id": tokenizer.pad_token_id,
                                 "repetition_penalty": sampling.repetition_penalty, "num_beams": sampling.num_beams}
    if sampling.temperature == 0:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                      top_k=sampling.top_k or None)
    if sampling.stop:
        kwargs.update(stop_strings=sampling.stop, tokenizer=tokenizer)
    return kwargs


def _cut(text: str, stops: list[str]) -> str:
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return (text[:cut] if cut >= 0 else text).strip()
