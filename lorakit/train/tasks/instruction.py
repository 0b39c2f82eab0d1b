"""Instruction tuning of a causal LM: learn to answer an (instruction, input) with the output.

    task = InstructionTuning(tokenizer)                 # Alpaca fields: instruction, input, output
    features = task.encode(read_records("alpaca_en_demo.json"))

Each record becomes one conversation in the model's own chat template: a user turn (the instruction, then a
blank line and the input when there is one) and an assistant turn (the output). The loss covers the assistant's
tokens only, end-of-turn included, so the model learns to answer and to stop, not to predict prompts. A tokenizer
without a chat template gets the plain Alpaca layout, `### Instruction:` / `### Response:`.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lorakit.errors import LorakitError
from lorakit.train.data import chunks, move_batch, pad
from lorakit.train.lm_loss import IGNORE, causal_lm_loss
from lorakit.train.task import Batch, Features

log = logging.getLogger(__name__)

_PROMPT, _RESPONSE = "### Instruction:\n{user}\n\n### Response:\n", "{output}"


class InstructionTuning:
    """Supervised fine-tuning on (instruction, input, output) records; metric: loss over response tokens.

    instruction, input, output: the record fields; `input` may be missing or empty.
    max_length: conversations are cut to this many tokens from the right; a record whose prompt alone fills
        `max_length` has nothing left to learn from and is skipped (with one logged warning per `encode`).
    system: an optional system message put before the user turn.
    """

    name = "instruction"
    metric = "loss"
    greater_is_better = False

    def __init__(self, tokenizer: PreTrainedTokenizerBase, *, instruction: str = "instruction",
                 input: str = "input", output: str = "output", max_length: int = 512, system: str | None = None):
        if not isinstance(max_length, int) or max_length < 2:
            raise LorakitError(f"max_length must be an int >= 2, got {max_length!r}")
        self.tokenizer = tokenizer
        self.instruction, self.input, self.output = instruction, input, output
        self.max_length, self.system = max_length, system
        self.uses_chat_template = bool(getattr(tokenizer, "chat_template", None))

    def state(self) -> dict[str, Any]:
        return {"task": self.name, "instruction": self.instruction, "input": self.input, "output": self.output,
                "max_length": self.max_length, "system": self.system}

    def head_modules(self, model: nn.Module) -> list[str]:
        return []  # the LM head is pretrained; nothing new to train in full

    def prompt_ids(self, record: dict[str, Any]) -> list[int]:
        """The token ids of `record`'s prompt, ending where the model should start answering (not truncated)."""
        return self._tokenize([self._prompt_text(record, 0)])[0]

    def generation_prompt(self, record: dict[str, Any], i: int = 0) -> tuple[str, bool]:
        """(prompt, chat) for `lorakit.generation.generate(..., [prompt], chat=chat)` to continue where this task's
        training prompt ends: the user turn when the tokenizer has a chat template (`generate` renders it with that
        template: the same tokens), else the plain `### Instruction:` layout (with the special tokens the tokenizer
        adds by default, where training puts only its BOS). Raises LorakitError for a system message with a chat
        template (`generate` renders a user turn only)."""
        if not self.uses_chat_template:
            return self._prompt_text(record, i), False
        if self.system:
            raise LorakitError("generation from a chat template with a system message is not supported; "
                               "drop system= or render the prompts yourself")
        return self._user_text(record, i), True

    def encode(self, records: list[dict[str, Any]]) -> list[Features]:
        """-> {"input_ids": [...], "labels": [...]} with labels IGNORE on the prompt; see the class docstring."""
        prompts = [self._prompt_text(record, i) for i, record in enumerate(records)]
        responses = [self._response_text(record, i) for i, record in enumerate(records)]
        prompt_ids = self._tokenize(prompts)
        if self.uses_chat_template:
            full_ids = self._tokenize(responses)  # each response text is the whole templated conversation
        else:
            end = [self.tokenizer.eos_token_id] if isinstance(self.tokenizer.eos_token_id, int) else []
            outputs = self._tokenize(responses, add_bos=False)
            full_ids = [p + r + end for p, r in zip(prompt_ids, outputs, strict=True)]
        features: list[Features] = []
        skipped: list[int] = []
        for i, (prompt, full) in enumerate(zip(prompt_ids, full_ids, strict=True)):
            if full[:len(prompt)] != prompt:
                raise LorakitError(f"record {i}: the chat template's prompt does not tokenize as a prefix of the "
                                   f"whole conversation, so the response cannot be located (an output that "
                                   f"starts with whitespace can cause this); strip the output's whitespace")
            if not 0 < len(prompt) < self.max_length or len(full) == len(prompt):
                skipped.append(i)
                continue
            ids = full[:self.max_length]  # keeps at least one response token: len(prompt) < max_length
            features.append({"input_ids": ids, "labels": [IGNORE] * len(prompt) + ids[len(prompt):]})
        if skipped:
            log.warning("skipped %d of %d records whose prompt alone has %d tokens or more (first: record %d); "
                        "raise max_length to keep them", len(skipped), len(records), self.max_length, skipped[0])
        if records and not features:
            raise LorakitError(f"every record's prompt is {self.max_length} tokens or longer; raise max_length")
        return features

    def collate(self, features: list[Features]) -> Batch:
        """-> input_ids, attention_mask, labels: (B, T), right-padded; labels IGNORE on prompt and padding."""
        ids = [f["input_ids"] for f in features]
        pad_id = next((t for t in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id) if isinstance(t, int)),
                      0)
        return {
            "input_ids": pad(ids, pad_id),
            "attention_mask": pad([[1] * len(seq) for seq in ids], 0),
            "labels": pad([f["labels"] for f in features], IGNORE),
        }

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """Next-token cross-entropy averaged over every supervised (response) token in the batch."""
        total, count = self._token_losses(model, batch)
        return total / count

    def evaluate(self, model: nn.Module, features: list[Features], batch_size: int) -> dict[str, float]:
        """loss (mean over all response tokens of `features`) and perplexity = exp(loss)."""
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        try:
            with torch.no_grad():
                for part in chunks(features, batch_size):
                    part_total, part_count = self._token_losses(model, move_batch(self.collate(list(part)), device))
                    total, count = total + part_total.item(), count + part_count
        finally:
            model.train(was_training)
        loss = total / max(count, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}  # exp overflows a float past ~709

    def length(self, features: Features) -> int:
        return len(features["input_ids"])

    def _token_losses(self, model: nn.Module, batch: Batch) -> tuple[Tensor, int]:
        """(summed cross-entropy over supervised tokens, their count). Position t predicts token t + 1. The
        head runs on the supervised positions only, in chunks, so the (B, T, V) logits never exist."""
        if not bool((batch["labels"][:, 1:] != IGNORE).any()):
            raise LorakitError("a batch has no response tokens to learn from; check the records' outputs")
        return causal_lm_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])

    def _user_text(self, record: dict[str, Any], i: int) -> str:
        instruction = _text(record, i, self.instruction)
        extra = record.get(self.input)
        if extra is not None and not isinstance(extra, str):
            raise LorakitError(f"record {i}: field {self.input!r} must be text, got {type(extra).__name__}")
        return instruction + "\n\n" + extra if extra and extra.strip() else instruction

    def _messages(self, record: dict[str, Any], i: int) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, {"role": "user", "content": self._user_text(record, i)}]

    def _prompt_text(self, record: dict[str, Any], i: int) -> str:
        if not self.uses_chat_template:
            head = self.system + "\n\n" if self.system else ""
            return head + _PROMPT.format(user=self._user_text(record, i))
        return self._render(self._messages(record, i), i, add_generation_prompt=True)

    def _response_text(self, record: dict[str, Any], i: int) -> str:
        """The output alone (plain layout), or the whole templated conversation (chat template)."""
        output = _text(record, i, self.output)
        if not self.uses_chat_template:
            return _RESPONSE.format(output=output)
        return self._render([*self._messages(record, i), {"role": "assistant", "content": output}], i)

    def _render(self, messages: list[dict[str, str]], i: int, add_generation_prompt: bool = False) -> str:
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja raises for templates that refuse a role (e.g. no system turn)
            raise LorakitError(f"record {i}: the tokenizer's chat template failed: {e}") from None
        if not isinstance(text, str):
            raise AssertionError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}")
        return text

    def _tokenize(self, texts: list[str], *, add_bos: bool = True) -> list[list[int]]:
        """Token ids with no special tokens added: chat templates write their own BOS; the plain layout gets
        the tokenizer's BOS (when it has one) before the prompt with `add_bos`."""
        if not texts:
            return []
        ids = [list(seq) for seq in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        bos = self.tokenizer.bos_token_id
        if self.uses_chat_template or not add_bos or not isinstance(bos, int):
            return ids
        return [[bos, *seq] for seq in ids]

def _text(record: dict[str, Any], i: int, field: str) -> str:
    value = record.get(field)
    if value is None:
        raise LorakitError(f"record {i} has no {field!r} field (it has: {', '.join(map(str, record))}); "
                           f"fix the record or map a column to {field!r}")
    if not isinstance(value, str):
        raise LorakitError(f"record {i}: field {field!r} must be text, got {type(value).__name__} {value!r}")
    return value
