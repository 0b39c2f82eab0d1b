"""Token classification (one tag per word): named-entity recognition on CoNLL-2003 and the like.

    task = TokenClassification(tokenizer)                     # records: {"tokens": [...], "tags": [...]}
    train = task.encode(read_conll("conll2003/train.txt"))    # fits the tag set on the training records
    metrics = task.evaluate(model, task.encode(read_conll("conll2003/test.txt")), batch_size=32)

Words are tokenised into sub-tokens; a word's tag is learnt and predicted on its first sub-token only (the
others, and the special tokens, get label -100), as in BERT's CoNLL-2003 runs (Devlin et al. 2019, section 5.3).
The model is any `...ForTokenClassification` with `num_labels == len(task.labels)`; its new classifier head is
trained in full and saved with the adapter, its bias starting at the tag prior of the training data
(`init_head`). The metric is entity-level F1 from `seqeval`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lorakit.errors import LorakitError
from lorakit.progress import progress
from lorakit.task import Batch, Features
from lorakit.train.data import chunks, move_batch, pad
from lorakit.train.tasks.classification import _pad_id, classifier_head
from lorakit.train.tasks.collapse import init_bias_to_prior, prediction_spread

IGNORE = -100  # label of sub-tokens after a word's first, special tokens and padding (torch's ignore_index)
OUTSIDE = "O"  # the tag of a word outside every entity; also what a word cut off by max_length is predicted
_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


class TokenClassification:
    """Tag every word of a pre-split sentence; metric: entity-level F1 (`seqeval`, IOB2 tags such as B-PER).

    tokens, tags: the record fields holding the words and their tags (two lists of equal length).
    labels: the tag names, in the order of the model's logits; default: inferred by `fit_labels` from the first
        records encoded ("O" first, then by entity type, B- before I-).
    max_length: sentences are truncated to this many sub-tokens; the words cut off count as predicted "O" in
        `evaluate`, so truncation lowers recall instead of hiding gold entities.
    Needs a fast (Rust) tokenizer, whose `word_ids()` map sub-tokens back to words.
    """

    name = "ner"
    metric = "f1"
    greater_is_better = True

    def __init__(self, tokenizer: PreTrainedTokenizerBase, *, tokens: str = "tokens", tags: str = "tags",
                 labels: Sequence[str] | None = None, max_length: int = 128):
        if not isinstance(max_length, int) or max_length < 3:
            raise LorakitError(f"max_length must be an int >= 3, got {max_length!r}")
        if not getattr(tokenizer, "is_fast", False):
            raise LorakitError(f"token classification needs a fast tokenizer (for word_ids), got "
                               f"{type(tokenizer).__name__}; load it with use_fast=True")
        if labels is not None and (len(set(labels)) != len(labels) or len(labels) < 2):
            raise LorakitError(f"labels must be at least 2 distinct tags, got {list(labels)}")
        self.tokenizer = tokenizer
        self.tokens, self.tags, self.max_length = tokens, tags, max_length
        self.labels: list[str] | None = [str(tag) for tag in labels] if labels is not None else None

    def state(self) -> dict[str, Any]:
        return {"task": self.name, "labels": self.labels, "tokens": self.tokens, "tags": self.tags,
                "max_length": self.max_length}

    def fit_labels(self, records: list[dict[str, Any]]) -> list[str]:
        """Set (once) and return the tag set: the distinct tags of `records`, "O" first, then by entity type."""
        if self.labels is None:
            found = {tag for i, record in enumerate(records) for tag in self._words(record, i)[1]}
            if len(found) < 2:
                raise LorakitError(f"the training records have {len(found)} distinct tag(s) in field "
                                   f"{self.tags!r} ({sorted(found)}); token classification needs at least 2")
            self.labels = sorted(found, key=lambda tag: (tag != OUTSIDE, tag[2:], tag))
        return self.labels

    def head_modules(self, model: nn.Module) -> list[str]:
        """Top-level classifier modules (`classifier` for BERT-likes, `score` for decoders); checks their size."""
        return classifier_head(model, self.labels, "token classification")

    def init_head(self, model: nn.Module, features: list[Features]) -> None:
        """Start a new head at the tag prior of `features` (the encoded training set): its bias becomes the log share
        of each tag among the labelled sub-tokens. Without it, on sparse labels (a few % of words in an entity) the
        adapter learns the prior by making every token's hidden state the same, and the model tags everything
        `O`; see `lorakit.train.tasks.collapse`. A head whose bias is not all zero is left alone."""
        if self.labels is None:
            raise LorakitError("the task has no labels yet: encode the training records first, or pass labels=")
        labels = self.labels
        counts = Counter(label for feature in features for label in feature["labels"] if label != IGNORE)
        init_bias_to_prior(model, self.head_modules(model), [counts[i] for i in range(len(labels))])

    def encode(self, records: list[dict[str, Any]]) -> list[Features]:
        """-> {"input_ids", ["token_type_ids"], "labels": tag index on each word's first sub-token, else -100,
        "tags": every word's tag index, "starts": each word's first sub-token position (-1 when cut off)}."""
        if not records:
            return []
        index = {tag: i for i, tag in enumerate(self.fit_labels(records))}
        words, targets = [], []
        for i, record in enumerate(records):
            tokens, tags = self._words(record, i)
            for position, tag in enumerate(tags):
                if tag not in index:
                    raise LorakitError(f"record {i}: tag {tag!r} (word {position}, {tokens[position]!r}) is not in "
                                       f"the label set ({', '.join(index)}) learnt from the training data; fix the "
                                       f"record or pass labels=")
            words.append(tokens)
            targets.append([index[tag] for tag in tags])
        try:
            encoded = self.tokenizer(words, is_split_into_words=True, truncation=True, max_length=self.max_length)
        except ValueError as e:  # byte-level BPE tokenizers (GPT-2, RoBERTa) refuse pre-split words by default
            raise LorakitError(f"the tokenizer cannot take pre-split words: {e}") from None
        features: list[Features] = []
        for i, target in enumerate(targets):
            labels, starts = align_labels(encoded.word_ids(i), target)
            feature: Features = {"input_ids": encoded["input_ids"][i], "labels": labels, "tags": target,
                                 "starts": starts}
            if "token_type_ids" in encoded:
                feature["token_type_ids"] = encoded["token_type_ids"][i]
            features.append(feature)
        return features

    def collate(self, features: list[Features]) -> Batch:
        """-> input_ids, attention_mask, labels (and token_type_ids): (B, T), right-padded; labels -100 on pads."""
        ids = [f["input_ids"] for f in features]
        batch = {"input_ids": pad(ids, _pad_id(self.tokenizer)), "attention_mask": pad([[1] * len(s) for s in ids], 0),
                 "labels": pad([f["labels"] for f in features], IGNORE)}
        if "token_type_ids" in features[0]:
            batch["token_type_ids"] = pad([f["token_type_ids"] for f in features], 0)
        return batch

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """Cross-entropy averaged over the labelled (first) sub-tokens of the batch, in float32."""
        logits = self._logits(model, batch)  # (B, T, C)
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE)

    def evaluate(self, model: nn.Module, features: list[Features], batch_size: int) -> dict[str, float]:
        """Entity-level precision, recall and f1 (micro over all entities), f1 per entity type (`f1_PER`, ...),
        the mean cross-entropy over labelled sub-tokens (`loss`), and the number of distinct tags predicted
        (`predicted_classes`; 1.0, e.g. `O` for every word, also logs a warning); see `entity_scores`."""
        if self.labels is None:
            raise LorakitError("the task has no labels yet: encode the training records first, or pass labels=")
        labels = self.labels
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        gold: list[list[str]] = []
        predicted: list[list[str]] = []
        total_loss, count = 0.0, 0
        try:
            with torch.no_grad():
                for part in progress(chunks(features, batch_size), desc="evaluate"):
                    batch = move_batch(self.collate(list(part)), device)
                    logits = self._logits(model, batch).float()  # (B, T, C)
                    total_loss += F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(),
                                                  ignore_index=IGNORE, reduction="sum").item()
                    count += int((batch["labels"] != IGNORE).sum())
                    best = logits.argmax(-1).tolist()  # (B, T)
                    for feature, row in zip(part, best, strict=True):
                        gold.append([labels[t] for t in feature["tags"]])
                        predicted.append([labels[row[s]] if s >= 0 else OUTSIDE for s in feature["starts"]])
        finally:
            model.train(was_training)
        return {**entity_scores(gold, predicted), "loss": total_loss / max(count, 1),
                **prediction_spread((tag for row in predicted for tag in row), unit="word")}

    def length(self, features: Features) -> int:
        return len(features["input_ids"])

    def _logits(self, model: nn.Module, batch: Batch) -> Tensor:
        logits = model(**{k: v for k, v in batch.items() if k in _INPUT_KEYS}).logits  # (B, T, C)
        if self.labels is not None and logits.shape[-1] != len(self.labels):
            raise LorakitError(f"the model gives {logits.shape[-1]} logits per token but the task has "
                               f"{len(self.labels)} labels; load it with num_labels={len(self.labels)}")
        return logits

    def _words(self, record: dict[str, Any], i: int) -> tuple[list[str], list[str]]:
        """The record's words and tags, checked: two non-empty lists of strings of equal length."""
        fields = []
        for field in (self.tokens, self.tags):
            value = record.get(field)
            if value is None:
                raise LorakitError(f"record {i} has no {field!r} field (it has: {', '.join(map(str, record))}); "
                                   f"fix the record or map a column to {field!r}")
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise LorakitError(f"record {i}: field {field!r} must be a list of strings, got {value!r}")
            fields.append(value)
        tokens, tags = fields
        if len(tokens) != len(tags) or not tokens:
            raise LorakitError(f"record {i}: {len(tokens)} tokens but {len(tags)} tags; each word needs one tag "
                               f"(and a record at least one word)")
        blank = [k for k, tag in enumerate(tags) if not tag.strip()]
        if blank:
            raise LorakitError(f"record {i}: empty tag for word {blank[0]} ({tokens[blank[0]]!r}) in field "
                               f"{self.tags!r}; every word needs a tag (O outside entities): fill it in")
        return tokens, tags


def align_labels(word_ids: list[int | None], tags: list[int]) -> tuple[list[int], list[int]]:
    """(labels per sub-token, first sub-token per word) from a fast tokenizer's `word_ids()` for one sentence.

    labels[t] = tags[w] when sub-token t is the first of word w, else -100 (later sub-tokens, special tokens).
    starts[w] = that t, or -1 for a word with no sub-token (cut off by truncation, or one the tokenizer drops).
    """
    labels = [IGNORE] * len(word_ids)
    starts = [-1] * len(tags)
    previous = None
    for t, word in enumerate(word_ids):
        if word is not None and word != previous:
            labels[t], starts[word] = tags[word], t
        previous = word
    return labels, starts


def entity_scores(gold: list[list[str]], predicted: list[list[str]]) -> dict[str, float]:
    """Entity-level scores of IOB2 tag sequences with `seqeval` (the CoNLL `conlleval` counting: an entity is
    right only when its type and both ends match): precision, recall, f1 (micro over all entities, each in [0, 1])
    and `f1_<TYPE>` for each entity type in `gold` or `predicted`. Undefined ratios (no entities) are 0."""
    # seqeval imports scikit-learn (~1 s), so it is loaded when first scored, not with lorakit.
    from seqeval.metrics import classification_report
    from seqeval.metrics.sequence_labeling import get_entities

    for i, (g, p) in enumerate(zip(gold, predicted, strict=True)):
        if len(g) != len(p):
            raise LorakitError(f"sentence {i}: {len(g)} gold tags but {len(p)} predicted")
    if not get_entities(gold) and not get_entities(predicted):
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}  # seqeval's report would divide by zero
    report = classification_report(gold, predicted, output_dict=True, zero_division=0)
    micro = report["micro avg"]
    scores = {"precision": float(micro["precision"]), "recall": float(micro["recall"]),
              "f1": float(micro["f1-score"])}
    for kind, row in report.items():
        if not kind.endswith(" avg"):
            scores[f"f1_{kind}"] = float(row["f1-score"])
    return scores
