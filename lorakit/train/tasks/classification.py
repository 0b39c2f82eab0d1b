"""Sequence classification (one text or a text pair -> one label): sentiment (SST-2), paraphrase (MRPC), topic.

    task = SequenceClassification(tokenizer, text="sentence", label="label")
    train = task.encode(train_records)          # fits the label set on the training records
    dev = task.encode(dev_records)              # a label outside that set is an error naming the record

The model is any `...ForSequenceClassification` with `num_labels == len(task.labels)`; its new classifier head
is trained in full and saved with the adapter (`head_modules`), as in the LoRA paper's GLUE runs (section 5.1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lorakit.errors import LorakitError
from lorakit.progress import progress
from lorakit.task import Batch, Features
from lorakit.train.data import chunks, move_batch, pad
from lorakit.train.tasks.collapse import prediction_spread

# Head names used by transformers' ...ForSequenceClassification classes (BERT/RoBERTa/DeBERTa, Llama/Qwen/GPT-2,
# and DistilBERT's freshly initialised extra layer).
HEAD_NAMES = ("pre_classifier", "classifier", "score")
_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


class SequenceClassification:
    """Classify a text (or a text pair) into one of `labels`; metric: accuracy (macro F1 is reported too).

    text, text_pair, label: the record fields holding the text, the optional second text, and the label.
    labels: the label names, in the order of the model's logits; default: inferred by `fit_labels` from the
        first records encoded (sorted: numerically when every label is an integer, else as strings).
    max_length: texts are truncated to this many tokens (a pair is truncated longest-first).
    Labels may be strings or ints in the data; they are compared as strings, so `1` and `"1"` are the same, and
    without surrounding spaces; an empty label is an error.
    """

    name = "classification"
    metric = "accuracy"
    greater_is_better = True

    def __init__(self, tokenizer: PreTrainedTokenizerBase, *, text: str = "text", text_pair: str | None = None,
                 label: str = "label", labels: Sequence[str | int] | None = None, max_length: int = 128):
        if not isinstance(max_length, int) or max_length < 2:
            raise LorakitError(f"max_length must be an int >= 2, got {max_length!r}")
        if labels is not None and len(set(map(str, labels))) != len(labels):
            raise LorakitError(f"labels must be distinct, got {list(labels)}")
        if labels is not None and len(labels) < 2:
            raise LorakitError(f"classification needs at least 2 labels, got {list(labels)}")
        self.tokenizer = tokenizer
        self.text, self.text_pair, self.label, self.max_length = text, text_pair, label, max_length
        self.labels: list[str] | None = [str(name) for name in labels] if labels is not None else None

    def state(self) -> dict[str, Any]:
        return {"task": self.name, "labels": self.labels, "text": self.text, "text_pair": self.text_pair,
                "label": self.label, "max_length": self.max_length}

    def fit_labels(self, records: list[dict[str, Any]]) -> list[str]:
        """Set (once) and return the label set: the distinct labels of `records`, sorted."""
        if self.labels is None:
            found = {self._label(record, i) for i, record in enumerate(records)}
            if len(found) < 2:
                raise LorakitError(f"the training records have {len(found)} distinct label(s) in field "
                                   f"{self.label!r} ({sorted(found)}); classification needs at least 2")
            numeric = all(_is_int(name) for name in found)
            self.labels = sorted(found, key=int) if numeric else sorted(found)
        return self.labels

    def head_modules(self, model: nn.Module) -> list[str]:
        """Top-level classifier modules: `classifier`/`score` (and DistilBERT's `pre_classifier`), else the
        top-level Linear with out_features == the number of labels. Checks the head's size against `labels`."""
        return classifier_head(model, self.labels, "sequence classification")

    def encode(self, records: list[dict[str, Any]]) -> list[Features]:
        """Tokenise records into {"input_ids", ["token_type_ids"], "label": index into `labels`}."""
        if not records:
            return []
        index = {name: i for i, name in enumerate(self.fit_labels(records))}
        texts, pairs, targets = [], [], []
        for i, record in enumerate(records):
            texts.append(self._text(record, i, self.text))
            if self.text_pair is not None:
                pairs.append(self._text(record, i, self.text_pair))
            label = self._label(record, i)
            if label not in index:
                raise LorakitError(f"record {i}: label {label!r} is not in the label set "
                                   f"({', '.join(index)}) learnt from the training data; fix the record or "
                                   f"pass labels=")
            targets.append(index[label])
        encoded = self.tokenizer(texts, pairs if self.text_pair is not None else None, truncation=True,
                                 max_length=self.max_length)
        features: list[Features] = []
        for i, target in enumerate(targets):
            feature: Features = {"input_ids": encoded["input_ids"][i], "label": target}
            if "token_type_ids" in encoded:
                feature["token_type_ids"] = encoded["token_type_ids"][i]
            features.append(feature)
        return features

    def collate(self, features: list[Features]) -> Batch:
        """-> input_ids, attention_mask (and token_type_ids): (B, T) with T the longest; labels: (B,)."""
        side = getattr(self.tokenizer, "padding_side", "right")
        ids = [f["input_ids"] for f in features]
        batch = {
            "input_ids": pad(ids, _pad_id(self.tokenizer), side=side),
            "attention_mask": pad([[1] * len(seq) for seq in ids], 0, side=side),
            "labels": torch.tensor([f["label"] for f in features], dtype=torch.long),
        }
        if "token_type_ids" in features[0]:
            batch["token_type_ids"] = pad([f["token_type_ids"] for f in features], 0, side=side)
        return batch

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """Mean cross-entropy of the model's logits (B, num_labels), computed in float32."""
        return F.cross_entropy(self._logits(model, batch).float(), batch["labels"])

    def evaluate(self, model: nn.Module, features: list[Features], batch_size: int) -> dict[str, float]:
        """accuracy, macro F1 (`macro_f1`), mean cross-entropy (`loss`) over `features`, and the number of distinct
        labels predicted (`predicted_classes`; 1.0, one label for every example, also logs a warning)."""
        return score_classifier(model, features, batch_size, self.collate, self._logits, self.labels, unit="example")

    def length(self, features: Features) -> int:
        return len(features["input_ids"])

    def _logits(self, model: nn.Module, batch: Batch) -> Tensor:
        logits = model(**{k: v for k, v in batch.items() if k in _INPUT_KEYS}).logits  # (B, num_labels)
        if self.labels is not None and logits.shape[-1] != len(self.labels):
            raise LorakitError(f"the model gives {logits.shape[-1]} logits but the task has {len(self.labels)} "
                               f"labels; load it with num_labels={len(self.labels)}")
        return logits

    def _field(self, record: dict[str, Any], i: int, field: str) -> Any:
        if field not in record or record[field] is None:
            raise LorakitError(f"record {i} has no {field!r} field (it has: {', '.join(map(str, record))}); "
                               f"fix the record or map a column to {field!r}")
        return record[field]

    def _label(self, record: dict[str, Any], i: int) -> str:
        """The record's label as a string, without surrounding spaces (`"1 "` is `"1"`, not a new class)."""
        label = "" if record.get(self.label, "") is None else str(self._field(record, i, self.label)).strip()
        if not label:
            raise LorakitError(f"record {i}: empty label in field {self.label!r}; every example needs a label: fill "
                               f"it in or delete the record")
        return label

    def _text(self, record: dict[str, Any], i: int, field: str) -> str:
        value = self._field(record, i, field)
        if not isinstance(value, str):
            raise LorakitError(f"record {i}: field {field!r} must be text, got {type(value).__name__} {value!r}")
        return value


def score_classifier(model: nn.Module, features: list[Features], batch_size: int,
                     collate: Callable[[list[Features]], Batch], logits_of: Callable[[nn.Module, Batch], Tensor],
                     labels: list[str] | None, unit: str) -> dict[str, float]:
    """A classifier's evaluation, shared by the text and image tasks: accuracy, macro F1 (`macro_f1`), mean
    cross-entropy (`loss`) and the number of distinct labels predicted (`predicted_classes`; one label for every
    `unit` also logs a warning). `logits_of(model, batch)` gives (B, num_labels); features carry `label`."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    predictions: list[int] = []
    total_loss = 0.0
    try:
        with torch.no_grad():
            for part in progress(chunks(features, batch_size), desc="evaluate"):
                batch = move_batch(collate(list(part)), device)
                logits = logits_of(model, batch).float()  # (B, num_labels)
                total_loss += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
                predictions += logits.argmax(-1).tolist()
    finally:
        model.train(was_training)
    targets = [f["label"] for f in features]
    correct = sum(p == t for p, t in zip(predictions, targets, strict=True))
    return {"accuracy": correct / max(len(targets), 1), "macro_f1": macro_f1(predictions, targets),
            "loss": total_loss / max(len(targets), 1), **prediction_spread(predictions, unit=unit, names=labels)}


def classifier_head(model: nn.Module, labels: list[str] | None, kind: str) -> list[str]:
    """The names of `model`'s top-level classifier modules (`HEAD_NAMES`, else a top-level Linear with one output
    per label); raises LorakitError when there is none, or when the model's `num_labels` is not `len(labels)`.
    `kind` ("sequence classification") names what to load the model for, in the error."""
    children = dict(model.named_children())
    found = [name for name in HEAD_NAMES if name in children]
    if not found and labels is not None:
        found = [name for name, module in children.items()
                 if isinstance(module, nn.Linear) and module.out_features == len(labels)]
    if not found:
        raise LorakitError(f"no classifier head in {type(model).__name__} (no top-level "
                           f"{' / '.join(HEAD_NAMES)}); load the model for {kind}")
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    if labels is not None and num_labels is not None and num_labels != len(labels):
        raise LorakitError(f"{type(model).__name__} has {num_labels} outputs but the task has "
                           f"{len(labels)} labels ({', '.join(labels)}); load it with num_labels={len(labels)}")
    return found


def macro_f1(predictions: list[int], targets: list[int]) -> float:
    """The unweighted mean of per-class F1 over the classes present in `targets` or `predictions` (as
    scikit-learn's `f1_score(average="macro")`); F1 = 2TP / (2TP + FP + FN). 0.0 for no examples."""
    classes = set(predictions) | set(targets)
    if not classes:
        return 0.0
    total = 0.0
    for c in classes:
        tp = sum(p == c and t == c for p, t in zip(predictions, targets, strict=True))
        fp = sum(p == c and t != c for p, t in zip(predictions, targets, strict=True))
        fn = sum(p != c and t == c for p, t in zip(predictions, targets, strict=True))
        total += 2 * tp / (2 * tp + fp + fn)
    return total / len(classes)


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's pad id, else its end-of-sequence id (Llama-family tokenizers have no pad), else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(candidate, int):
            return candidate
    return 0


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True
