"""The contract between the training loop and a task (classification, instruction tuning, NER, QA, ...).

A task owns everything task-specific: the model head, tokenisation, batching of its features, the loss and the
evaluation metric. The loop owns optimisation, checkpoints, logging and distribution, and never looks inside a
batch.
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor, nn

Features = dict[str, Any]  # one tokenised example, e.g. {"input_ids": [...], "labels": 1}
Batch = dict[str, Tensor]


class Task(Protocol):
    name: str
    metric: str  # the primary metric `evaluate` returns, used for best checkpoints and early stopping
    greater_is_better: bool

    def head_modules(self, model: nn.Module) -> list[str]:
        """Modules trained in full and saved with the adapter (a new classifier head), or []."""
        ...

    def encode(self, records: list[dict[str, Any]]) -> list[Features]:
        """Tokenise raw records; raises LorakitError naming the record for bad input."""
        ...

    def collate(self, features: list[Features]) -> Batch:
        """Pad a list of features into a batch (dynamic padding: to the longest in the batch)."""
        ...

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """Mean loss over the batch's supervised positions (a scalar with grad)."""
        ...

    def evaluate(self, model: nn.Module, features: list[Features], batch_size: int) -> dict[str, float]:
        """Metrics on `features`; must include `self.metric`. Runs under `torch.no_grad()` in eval mode."""
        ...

    def length(self, features: Features) -> int:
        """Token count of one example, for grouping batches by length and for tokens/s."""
        ...

    def state(self) -> dict[str, Any]:
        """What must be saved with the adapter to use it again (e.g. the label names), JSON-serialisable."""
        ...
