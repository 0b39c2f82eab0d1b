"""Extractive question answering: find the answer to a question as a span of its context (SQuAD v1.1).

    task = ExtractiveQA(tokenizer)                       # records as `read_squad` gives them
    train = task.encode(read_squad("dev-v1.1.json", articles=slice(0, 38)))
    metrics = task.evaluate(model, task.encode(read_squad("dev-v1.1.json", articles=slice(38, 48))), 32)

Each (question, context) pair becomes one or more windows of `max_length` tokens: the question, then as much of
the context as fits; a long context is cut into windows that overlap by `stride` tokens, as in BERT's SQuAD runs
(Devlin et al. 2019, section 4.2). A window is labelled with the answer's first and last token, or with the [CLS]
token (position 0) when the answer is not wholly inside it. To answer, each window proposes its `n_best` start and
end tokens, pairs are kept when both lie in the context, in order, at most `max_answer_length` tokens apart, and
the best-scoring pair (start logit + end logit) over all the example's windows is the answer. The model is any
`...ForQuestionAnswering`; its new `qa_outputs` head is trained in full and saved with the adapter.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lorakit.errors import LorakitError
from lorakit.progress import progress
from lorakit.task import Batch, Features
from lorakit.train.data import chunks, move_batch, pad
from lorakit.train.readers import check_answers
from lorakit.train.tasks.classification import _pad_id

HEAD_NAMES = ("qa_outputs",)  # transformers' ...ForQuestionAnswering head (BERT, RoBERTa, Llama, ...)
_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
_FIELDS = ("question", "context", "answers")


class ExtractiveQA:
    """Answer a question with a span of its context; metric: SQuAD F1 (exact match is reported too), in percent.

    max_length: tokens per window (question, context and special tokens).
    stride: tokens of context shared by consecutive windows of one long context; default max_length // 3 (128 for
        384, the setting of BERT's SQuAD runs), at most max_length // 2.
    n_best: start and end candidates taken from each window when extracting the answer.
    max_answer_length: the longest answer, in tokens, that may be extracted.
    Records: {"id", "question", "context", "answers": {"text": [...], "answer_start": [...]}}; training uses the
    first answer, evaluation scores against all of them. Needs a fast tokenizer (for offset mappings).
    """

    name = "qa"
    metric = "f1"
    greater_is_better = True

    def __init__(self, tokenizer: PreTrainedTokenizerBase, *, max_length: int = 384, stride: int | None = None,
                 n_best: int = 20, max_answer_length: int = 30):
        if stride is None:
            stride = max_length // 3 if isinstance(max_length, int) else 0
        for option, value, least in (("max_length", max_length, 8), ("stride", stride, 0), ("n_best", n_best, 1),
                                     ("max_answer_length", max_answer_length, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise LorakitError(f"{option} must be an int >= {least}, got {value!r}")
        if stride > max_length // 2:
            raise LorakitError(f"stride ({stride}) must be at most half of max_length ({max_length}), so that "
                               f"consecutive windows advance through the context")
        if not getattr(tokenizer, "is_fast", False):
            raise LorakitError(f"extractive QA needs a fast tokenizer (for offset mappings), got "
                               f"{type(tokenizer).__name__}; load it with use_fast=True")
        self.tokenizer = tokenizer
        self.max_length, self.stride = max_length, stride
        self.n_best, self.max_answer_length = n_best, max_answer_length

    def state(self) -> dict[str, Any]:
        return {"task": self.name, "max_length": self.max_length, "stride": self.stride, "n_best": self.n_best,
                "max_answer_length": self.max_answer_length}

    def head_modules(self, model: nn.Module) -> list[str]:
        children = dict(model.named_children())
        found = [name for name in HEAD_NAMES if name in children]
        if not found:
            raise LorakitError(f"no span head in {type(model).__name__} (no top-level qa_outputs); load the model "
                               f"for question answering")
        return found

    def encode(self, records: list[dict[str, Any]]) -> list[Features]:
        """-> one feature per window: {"input_ids", ["token_type_ids"], "start_positions", "end_positions",
        "offsets": (start, end) characters of each context token, None elsewhere, "example": the record's index,
        "id", "context", "answers": the answer texts}."""
        if not records:
            return []
        for i, record in enumerate(records):
            _check_record(record, i)
        questions = [record["question"].lstrip() for record in records]  # leading spaces only waste tokens
        contexts = [record["context"] for record in records]
        try:
            encoded = self.tokenizer(questions, contexts, truncation="only_second", max_length=self.max_length,
                                     stride=self.stride, return_overflowing_tokens=True,
                                     return_offsets_mapping=True)
        except Exception as e:  # the tokenizer refuses a question that leaves no room for context
            raise LorakitError(f"cannot fit question and context in windows of {self.max_length} tokens ({e}); "
                               f"raise max_length or shorten the questions") from None
        features: list[Features] = []
        for j, example in enumerate(encoded["overflow_to_sample_mapping"]):
            record = records[example]
            sequence_ids = encoded.sequence_ids(j)
            offsets = [tuple(span) if side == 1 else None
                       for span, side in zip(encoded["offset_mapping"][j], sequence_ids, strict=True)]
            answers = record["answers"]
            start, end = answer_tokens(offsets, answers["answer_start"][0],
                                       answers["answer_start"][0] + len(answers["text"][0]))
            feature: Features = {"input_ids": encoded["input_ids"][j], "start_positions": start,
                                 "end_positions": end, "offsets": offsets, "example": example,
                                 "id": str(record.get("id", example)), "context": record["context"],
                                 "answers": list(answers["text"])}
            if "token_type_ids" in encoded:
                feature["token_type_ids"] = encoded["token_type_ids"][j]
            features.append(feature)
        return features

    def collate(self, features: list[Features]) -> Batch:
        """-> input_ids, attention_mask (and token_type_ids): (B, T), right-padded (positions count from the
        left); start_positions, end_positions: (B,)."""
        ids = [f["input_ids"] for f in features]
        batch = {"input_ids": pad(ids, _pad_id(self.tokenizer)), "attention_mask": pad([[1] * len(s) for s in ids], 0),
                 "start_positions": torch.tensor([f["start_positions"] for f in features], dtype=torch.long),
                 "end_positions": torch.tensor([f["end_positions"] for f in features], dtype=torch.long)}
        if "token_type_ids" in features[0]:
            batch["token_type_ids"] = pad([f["token_type_ids"] for f in features], 0)
        return batch

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """The mean of the start and end cross-entropies over the batch's windows (as BERT's SQuAD loss)."""
        start_logits, end_logits = self._logits(model, batch)
        return (F.cross_entropy(start_logits.float(), batch["start_positions"])
                + F.cross_entropy(end_logits.float(), batch["end_positions"])) / 2

    def evaluate(self, model: nn.Module, features: list[Features], batch_size: int) -> dict[str, float]:
        """exact_match and f1 (SQuAD v1.1, in percent, see `squad_scores`) of the best span per example over all
        its windows, and the mean window loss (`loss`)."""
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        best: dict[tuple[str, int], tuple[float, str]] = {}  # (id, example) -> (score, answer text)
        gold: dict[tuple[str, int], list[str]] = {}
        total_loss = 0.0
        try:
            with torch.no_grad():
                for part in progress(chunks(features, batch_size), desc="evaluate"):
                    batch = move_batch(self.collate(list(part)), device)
                    start_logits, end_logits = (x.float() for x in self._logits(model, batch))  # (B, T) each
                    total_loss += (F.cross_entropy(start_logits, batch["start_positions"], reduction="sum")
                                   + F.cross_entropy(end_logits, batch["end_positions"], reduction="sum")).item() / 2
                    for feature, starts, ends in zip(part, start_logits.tolist(), end_logits.tolist(), strict=True):
                        key = (feature["id"], feature["example"])
                        gold[key] = feature["answers"]
                        span = best_span(starts, ends, feature["offsets"], self.n_best, self.max_answer_length)
                        if span is not None and (key not in best or span[0] > best[key][0]):
                            best[key] = (span[0], feature["context"][span[1]:span[2]])
        finally:
            model.train(was_training)
        keys = list(gold)
        scores = squad_scores([best[k][1] if k in best else "" for k in keys], [gold[k] for k in keys])
        return {**scores, "loss": total_loss / max(len(features), 1)}

    def length(self, features: Features) -> int:
        return len(features["input_ids"])

    def _logits(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
        out = model(**{k: v for k, v in batch.items() if k in _INPUT_KEYS})
        if not hasattr(out, "start_logits"):
            raise LorakitError(f"{type(model).__name__} gives no start_logits; load the model for question "
                               f"answering")
        return out.start_logits, out.end_logits  # (B, T) each


def answer_tokens(offsets: list[tuple[int, int] | None], start_char: int, end_char: int) -> tuple[int, int]:
    """(first, last) token of the answer at characters [start_char, end_char) in one window, whose context tokens
    have character `offsets` (None for question and special tokens); (0, 0), the [CLS] token, when the answer is
    not wholly inside the window."""
    context = [t for t, span in enumerate(offsets) if span is not None]
    if not context:
        return 0, 0
    first, last = context[0], context[-1]
    if offsets[first][0] > start_char or offsets[last][1] < end_char:  # type: ignore[index]
        return 0, 0
    start = first
    while start <= last and offsets[start][0] <= start_char:  # type: ignore[index]
        start += 1
    end = last
    while end >= first and offsets[end][1] >= end_char:  # type: ignore[index]
        end -= 1
    return start - 1, end + 1


def best_span(start_logits: list[float], end_logits: list[float], offsets: list[tuple[int, int] | None],
              n_best: int, max_answer_length: int) -> tuple[float, int, int] | None:
    """The best answer span of one window: (start logit + end logit, first char, end char), or None.

    Candidates are the `n_best` highest start and end logits; a pair counts when both tokens are in the context
    (`offsets` not None), the end is not before the start, and the span is at most `max_answer_length` tokens.
    """
    n = len(offsets)  # logits may run past the window into padding
    starts = sorted(range(n), key=lambda t: -start_logits[t])[:n_best]
    ends = sorted(range(n), key=lambda t: -end_logits[t])[:n_best]
    found: tuple[float, int, int] | None = None
    for s in starts:
        for e in ends:
            first, last = offsets[s], offsets[e]
            if first is None or last is None or e < s or e - s + 1 > max_answer_length:
                continue
            score = start_logits[s] + end_logits[e]
            if found is None or score > found[0]:
                found = (score, first[0], last[1])
    return found


# --- the SQuAD v1.1 metric ---------------------------------------------------------------------------------------
# `evaluate`'s "squad" metric fetches its script from the Hugging Face hub, so it cannot run offline; these
# functions reproduce the official evaluate-v1.1.py (Rajpurkar et al. 2016) line for line.

def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, drop the articles a/an/the, and collapse whitespace (official SQuAD v1.1)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_f1(prediction: str, truth: str) -> float:
    """Token-overlap F1 of two answers after `normalize_answer` (0 when they share no token)."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(truth).split()
    same = sum((Counter(predicted) & Counter(expected)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(expected)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """exact_match and f1 over examples, in percent as the official script reports them: each prediction scores
    its best match among that example's reference answers. Raises LorakitError for an example with none."""
    if len(predictions) != len(references):
        raise LorakitError(f"{len(predictions)} predictions for {len(references)} examples")
    exact = f1 = 0.0
    for i, (prediction, truths) in enumerate(zip(predictions, references, strict=True)):
        if not truths:
            raise LorakitError(f"example {i} has no reference answers")
        exact += max(float(normalize_answer(prediction) == normalize_answer(t)) for t in truths)
        f1 += max(squad_f1(prediction, t) for t in truths)
    count = max(len(predictions), 1)
    return {"exact_match": 100.0 * exact / count, "f1": 100.0 * f1 / count}


_PUNCTUATION = frozenset(string.punctuation)


def _check_record(record: dict[str, Any], i: int) -> None:
    for field in _FIELDS:
        if field not in record:
            raise LorakitError(f"record {i} has no {field!r} field (it has: {', '.join(map(str, record))}); "
                               f"fix the record or map a column to {field!r}")
    for field in ("question", "context"):
        if not isinstance(record[field], str) or not record[field].strip():
            raise LorakitError(f"record {i}: field {field!r} must be non-empty text, got {record[field]!r}")
    if not isinstance(record["answers"], dict):
        raise LorakitError(f"record {i}: 'answers' must be {{'text': [...], 'answer_start': [...]}}, got "
                           f"{record['answers']!r}")
    check_answers(str(record.get("id", i)), record["context"], record["answers"], f"record {i}")
