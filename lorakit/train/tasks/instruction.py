"""Instruction tuning of a causal LM: learn to answer as the assistant of a conversation.

    task = InstructionTuning(tokenizer)
    features = task.encode(read_records("alpaca_en_demo.json"))   # or OpenAI messages, or ShareGPT

Each record is one conversation, in one of three layouts told apart by their fields (`conversation.py`): Alpaca
(`instruction`, `input`, `output`: a user turn, the instruction then a blank line and the input when there is
one, and an assistant turn, the output), OpenAI `messages` (role/content) or ShareGPT `conversations`
(from/value), multi-turn with an optional system turn. The conversation is rendered with the model's own chat
template and the loss covers the assistant's tokens only, every assistant turn with its end-of-turn, so the model
learns to answer and to stop, not to predict prompts. A tokenizer without a chat template gets the plain layout,
`### Instruction:` / `### Response:`.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lorakit.errors import LorakitError
from lorakit.lm_loss import IGNORE, causal_lm_loss
from lorakit.progress import progress
from lorakit.task import Batch, Features
from lorakit.train.data import chunks, move_batch, pad
from lorakit.train.tasks.conversation import (
    PLAIN_PROMPT,
    Message,
    Span,
    detect_layout,
    encode_chat,
    encode_plain,
    read_messages,
    record_name,
)

log = logging.getLogger(__name__)


class InstructionTuning:
    """Supervised fine-tuning on conversations; metric: loss over the assistant's tokens.

    instruction, input, output: the fields of Alpaca-layout records; `input` may be missing or empty.
    max_length: conversations are cut to this many tokens from the right; a record whose prompt before the first
        reply fills `max_length` has nothing left to learn from and is skipped (with one logged warning per
        `encode`).
    system: a system message put first in every conversation that has none of its own.
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
        """The token ids of `record`'s conversation up to where the model should start its last reply, exactly as
        in training (not truncated)."""
        ids, spans = self._encode(self._conversations([record]))[0]
        return ids[:spans[-1][0]]

    def generation_prompt(self, record: dict[str, Any], i: int = 0) -> tuple[str, bool]:
        """(prompt, chat) for `lorakit.generation.generate(..., [prompt], chat=chat)` to continue where this task's
        training prompt ends: the user turn when the tokenizer has a chat template (`generate` renders it with that
        template: the same tokens), else the plain `### Instruction:` layout (with the special tokens the tokenizer
        adds by default, where training puts only its BOS). For Alpaca-layout records. Raises LorakitError for a
        system message with a chat template (`generate` renders a user turn only)."""
        if not self.uses_chat_template:
            return self._prompt_text(record, i), False
        if self.system:
            raise LorakitError("generation from a chat template with a system message is not supported; "
                               "drop system= or render the prompts yourself")
        return self._user_text(record, i), True

    def check_records(self, records: list[dict[str, Any]], source: str) -> None:
        """Check a file's records before any split (layout, fields, roles, turn order), naming `source` and the
        record's number in it. Raises LorakitError; `encode` checks the same, naming the record only."""
        self._conversations(records, source)

    def encode(self, records: list[dict[str, Any]]) -> list[Features]:
        """-> {"input_ids": [...], "labels": [...]} with labels IGNORE outside the assistant's turns; see the class
        docstring. Raises LorakitError naming the record for a malformed record or a chat template that breaks
        the prefix property (`conversation.encode_chat`)."""
        features: list[Features] = []
        skipped: list[int] = []
        for i, (full, spans) in enumerate(self._encode(self._conversations(records))):
            labels = [IGNORE] * len(full)
            for start, end in spans:
                labels[start:end] = full[start:end]
            ids, labels = full[:self.max_length], labels[:self.max_length]
            if all(label == IGNORE for label in labels[1:]):  # position 0 is never predicted
                skipped.append(i)
                continue
            features.append({"input_ids": ids, "labels": labels})
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
                for part in progress(chunks(features, batch_size), desc="evaluate"):
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

    def _conversations(self, records: list[dict[str, Any]], source: str | None = None) -> list[list[Message]]:
        """Each record as messages (system, user, assistant), the task's system message first where none is."""
        layout = detect_layout(records, (self.instruction, self.output), source)
        if layout == "alpaca":
            conversations = [[{"role": "user", "content": self._user_text(record, i, source)},
                              {"role": "assistant", "content": _text(record, i, self.output, source)}]
                             for i, record in enumerate(records)]
        else:
            conversations = [read_messages(record, i, layout, source) for i, record in enumerate(records)]
        if not self.system:
            return conversations
        system: Message = {"role": "system", "content": self.system}
        return [c if c[0]["role"] == "system" else [system, *c] for c in conversations]

    def _encode(self, conversations: list[list[Message]]) -> list[tuple[list[int], list[Span]]]:
        if self.uses_chat_template:
            return encode_chat(self.tokenizer, conversations)
        return encode_plain(self.tokenizer, conversations)

    def _user_text(self, record: dict[str, Any], i: int, source: str | None = None) -> str:
        instruction = _text(record, i, self.instruction, source)
        extra = record.get(self.input)
        if extra is not None and not isinstance(extra, str):
            raise LorakitError(f"{record_name(i, source)}: field {self.input!r} must be text, got "
                               f"{type(extra).__name__}")
        return instruction + "\n\n" + extra if extra and extra.strip() else instruction

    def _prompt_text(self, record: dict[str, Any], i: int) -> str:
        """The plain layout's prompt of an Alpaca record (what `encode_plain` tokenizes before the reply)."""
        head = self.system + "\n\n" if self.system else ""
        return head + PLAIN_PROMPT.format(user=self._user_text(record, i))


def _text(record: dict[str, Any], i: int, field: str, source: str | None = None) -> str:
    value = record.get(field)
    if value is None:
        raise LorakitError(f"{record_name(i, source)} has no {field!r} field (it has: {', '.join(map(str, record))}); "
                           f"fix the record or map a column to {field!r}")
    if not isinstance(value, str):
        raise LorakitError(f"{record_name(i, source)}: field {field!r} must be text, got {type(value).__name__} "
                           f"{value!r}")
    return value
