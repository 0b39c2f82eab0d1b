"""A training task that learns from a teacher: the student's own task, with its loss replaced by the KD mix.

    task = DistillTask(make_task("classification", tokenizer), teacher, kind="classification", alpha=0.5,
                       temperature=2.0)
    train = task.index(train)                       # each feature knows its position, for cached logits
    task.use_cache(task.build_cache(train, device=device))       # optional: teacher logits computed once
    fit(model, task, train, dev, optim, run)

Everything but the loss (encoding, batching, evaluation, the saved task state, the head modules) is the student
task's, so a distilled model is published, loaded and evaluated exactly as one trained without a teacher.
Classification distils the (B, C) logits; a causal LM (instruction tuning) distils the next-token distribution of
the response tokens only (the positions its labels supervise), in chunks of rows, so neither the student's nor
the teacher's vocabulary-sized logits are ever held whole.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.distill.cache import INDEX_KEY, LogitCache
from lorakit.distill.loss import (
    TeacherChunk,
    check_kd_settings,
    head_kd_sum,
    kd_loss,
    linear_kd_sum,
    rows_kd,
)
from lorakit.distill.teacher import KINDS, Teacher
from lorakit.distributed import unwrap
from lorakit.errors import LorakitError
from lorakit.lm_loss import (
    IGNORE,
    final_hidden_states,
    find_backbone,
    find_output_head,
    head_reproduces_logits,
    supervised_rows,
)
from lorakit.task import Batch, Features, Task

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 512  # rows per chunk: a few (512, V) fp32 tensors live at once, 100 MB each for V = 49,152
_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


class DistillTask:
    """`task` trained with α · its loss + (1 - α) · T² · KL(teacher_T || student_T) (see `lorakit.distill.loss`).

    kind: `classification` (logits (B, C)) or `causal-lm` (response tokens of a causal LM).
    alpha: the weight of the task loss, in [0, 1]; temperature: T > 0.
    chunk_size: rows of vocabulary-sized logits per chunk (causal LM).
    """

    def __init__(self, task: Task, teacher: Teacher, *, kind: str, alpha: float = 0.5, temperature: float = 2.0,
                 chunk_size: int = DEFAULT_CHUNK_SIZE):
        check_kd_settings(alpha, temperature)
        if kind not in KINDS:
            raise LorakitError(f"distillation supports {' and '.join(KINDS)} students, got {kind!r}")
        self.task, self.teacher, self.kind = task, teacher, kind
        self.alpha, self.temperature, self.chunk_size = alpha, temperature, chunk_size
        self.cache: LogitCache | None = None
        self.name, self.metric, self.greater_is_better = task.name, task.metric, task.greater_is_better

    # ------------------------------------------------------------------ the student task's, unchanged

    def head_modules(self, model: nn.Module) -> list[str]:
        return self.task.head_modules(model)

    def encode(self, records: list[dict[str, Any]]) -> list[Features]:
        return self.task.encode(records)

    def evaluate(self, model: nn.Module, features: list[Features], batch_size: int) -> dict[str, float]:
        return self.task.evaluate(model, features, batch_size)

    def length(self, features: Features) -> int:
        return self.task.length(features)

    def state(self) -> dict[str, Any]:
        return self.task.state()

    # ------------------------------------------------------------------ distillation

    def index(self, features: list[Features]) -> list[Features]:
        """The features, each with its position under `INDEX_KEY`, so a batch can look up cached logits."""
        return [{**f, INDEX_KEY: i} for i, f in enumerate(features)]

    def collate(self, features: list[Features]) -> Batch:
        """The student task's batch, plus `INDEX_KEY` (B,) when the features carry their positions."""
        batch = self.task.collate([{k: v for k, v in f.items() if k != INDEX_KEY} for f in features])
        if features and all(INDEX_KEY in f for f in features):
            batch[INDEX_KEY] = torch.tensor([f[INDEX_KEY] for f in features], dtype=torch.long)
        return batch

    def use_cache(self, cache: LogitCache | None) -> None:
        """Read the teacher's logits from `cache` (indexed by the features' positions) instead of running it."""
        self.cache = cache

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """The KD loss of the batch: the mean over examples (classification) or over response tokens (causal LM)."""
        inputs = {k: v for k, v in batch.items() if k != INDEX_KEY}
        if self.kind == "classification":
            student = model(**{k: v for k, v in inputs.items() if k in _INPUT_KEYS}).logits  # (B, C)
            teacher = self._cached(batch) if self.cache is not None else self.teacher_logits(inputs)
            return kd_loss(student, teacher.to(student.device), inputs["labels"], alpha=self.alpha,
                           temperature=self.temperature)
        return self._causal_loss(model, batch, inputs)

    def teacher_logits(self, batch: Batch) -> Tensor:
        """The teacher's logits for a batch, without grad: (B, C) for classification, (N, V) for the N supervised
        rows of a causal LM (in `supervised_rows` order: example by example, position by position)."""
        with torch.no_grad():
            self._teacher_on(batch["input_ids"].device)
            if self.kind == "classification":
                return self.teacher.model(**{k: v for k, v in batch.items() if k in _INPUT_KEYS}).logits.float()
            chunk, count = self._teacher_rows(batch)
            return chunk(0, count).float()

    def build_cache(self, features: list[Features], *, device: torch.device | str = "cpu", batch_size: int = 32,
                    max_bytes: int | None = None) -> LogitCache:
        """The teacher's logits over `features` (in order), as a `LogitCache`. Raises LorakitError, before running
        the teacher, when a causal LM's cache would take more than `max_bytes`."""
        offsets = None
        if self.kind == "causal-lm":
            counts = [sum(1 for label in f["labels"][1:] if label != IGNORE) for f in features]
            offsets = torch.tensor([0, *counts]).cumsum(0)
            vocab = int(_head_weight_rows(self.teacher.model))
            size = int(offsets[-1]) * vocab * 4
            if max_bytes is not None and size > max_bytes:
                raise LorakitError(f"the teacher-logit cache would take {size / 2**30:.1f} GiB ({int(offsets[-1]):,} "
                                   f"response tokens x {vocab:,} logits x 4 bytes), above distill.cache_max_gb="
                                   f"{max_bytes / 2**30:g}; run the teacher on the fly (distill.cache=false), use "
                                   "fewer examples, or raise distill.cache_max_gb")
        parts = []
        for start in range(0, len(features), batch_size):
            part = features[start:start + batch_size]
            batch = {k: v.to(device) for k, v in self.collate(part).items() if k != INDEX_KEY}
            parts.append(self.teacher_logits(batch).cpu())
        logits = torch.cat(parts) if parts else torch.zeros(0)
        if offsets is not None and logits.shape[0] != int(offsets[-1]):
            raise AssertionError(f"teacher gave {logits.shape[0]} rows for {int(offsets[-1])} response tokens")
        return LogitCache(logits, offsets)

    # ------------------------------------------------------------------ internals

    def _cached(self, batch: Batch) -> Tensor:
        assert self.cache is not None
        if INDEX_KEY not in batch:
            raise LorakitError("cached teacher logits need each batch's example positions; pass the training "
                               "features through DistillTask.index before training")
        return self.cache.for_examples(batch[INDEX_KEY].tolist())

    def _teacher_on(self, device: torch.device) -> None:
        first = next(self.teacher.model.parameters(), None)
        if first is not None and first.device != device:
            self.teacher.model.to(device)

    def _teacher_rows(self, batch: Batch) -> tuple[TeacherChunk, int]:
        """(teacher(start, stop) -> its logits for supervised rows [start, stop), the number of rows), from its
        final hidden states and head in chunks, or from its full logits when its head does not give its logits."""
        model, ids, mask, labels = self.teacher.model, batch["input_ids"], batch.get("attention_mask"), batch["labels"]
        backbone, head = find_backbone(model), find_output_head(model)
        if backbone is None or head is None or not head_reproduces_logits(model, head, ids, mask, False):
            logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
            rows, _ = supervised_rows(logits, labels)  # (N, V)
            return (lambda start, stop: rows[start:stop]), int(rows.shape[0])
        hidden, _ = supervised_rows(final_hidden_states(backbone, ids, mask, False), labels)  # (N, H)
        return (lambda start, stop: head(hidden[start:stop])), int(hidden.shape[0])

    def _causal_loss(self, model: nn.Module, batch: Batch, inputs: Batch) -> Tensor:
        ids, mask, labels = inputs["input_ids"], inputs.get("attention_mask"), inputs["labels"]
        if not bool((labels[:, 1:] != IGNORE).any()):
            raise LorakitError("a batch has no response tokens to learn from; check the records' outputs")
        if self.cache is not None:
            cached = self._cached(batch).to(ids.device)
            teacher: TeacherChunk = lambda start, stop: cached[start:stop]  # noqa: E731
        else:
            with torch.no_grad():
                self._teacher_on(ids.device)
                teacher, _ = self._teacher_rows(inputs)
        inner = unwrap(model)
        backbone, head = find_backbone(inner), find_output_head(inner)
        via_forward = model is not inner or backbone is None
        settings = {"alpha": self.alpha, "temperature": self.temperature}
        if head is None or not head_reproduces_logits(inner, head, ids, mask, via_forward):
            rows, targets = supervised_rows(model(input_ids=ids, attention_mask=mask).logits, labels)  # (N, V)
            with torch.no_grad():
                soft = teacher(0, rows.shape[0]).float()
            return rows_kd(rows.float(), soft, targets, self.alpha, self.temperature).mean()
        source = model if via_forward else backbone
        assert source is not None
        rows, targets = supervised_rows(final_hidden_states(source, ids, mask, via_forward), labels)  # (N, H), (N,)
        if isinstance(head, nn.Linear):
            total = linear_kd_sum(rows, head.weight, head.bias, targets, teacher, chunk_size=self.chunk_size,
                                  **settings)
        else:
            total = head_kd_sum(rows, head, targets, teacher, chunk_size=self.chunk_size, **settings)
        return total / rows.shape[0]


def _head_weight_rows(model: nn.Module) -> int:
    head = find_output_head(model)
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise LorakitError(f"{type(model).__name__} has no output head to cache logits of")
    return int(weight.shape[0])

