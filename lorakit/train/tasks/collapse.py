"""Predictions collapsed to one class: how a new head starts so that it does not happen, and how it is reported.

A token classifier trained on sparse labels (say 5% of words inside an entity) can end up tagging every word `O`
(entity F1 0.00) with a training loss that looks settled, at the entropy of the tag prior. The cause is the
start: a new head with a zero bias predicts every tag with the same probability, ~5 nats away from the data's
prior, and under Adam its bias moves about one learning rate per step, so it cannot close that gap in a few
hundred steps. The adapter, whose B factors move as fast (faster under LoRA+), closes it instead by adding one
constant direction to every token's hidden state; after the encoder's LayerNorms every token then looks the same,
and the entity signal is gone for good. `init_bias_to_prior` starts the head at the prior instead (Lin et al.
2017, "Focal Loss for Dense Object Detection", section 3.3, the prior initialisation of the last layer's bias).

Each classification task's `evaluate` also reports how many distinct classes its predictions used,

    metrics["predicted_classes"]      # 1.0: one class everywhere; in metrics.jsonl as "eval_predicted_classes"

and logs a warning when it is 1; `summary_warnings` turns the reported evaluation of a run into a warning row for
the training summary.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)
PREDICTED_CLASSES = "predicted_classes"


def prediction_spread(predicted: Iterable[str | int], *, unit: str, names: list[str] | None = None
                      ) -> dict[str, float]:
    """{"predicted_classes": the number of distinct classes in `predicted`} (0.0 when there are none). Logs a
    warning naming the class when it is a single one. `unit`: what one prediction is ("word", "example");
    `names`: class names by index, for predictions given as indices."""
    counts = Counter(predicted)
    if len(counts) == 1:
        (only, n), = counts.items()
        if names is not None and isinstance(only, int):
            only = names[only]
        log.warning("the model predicted %r for every one of the %d evaluated %ss: its predictions collapsed to a "
                    "single class, so its score says nothing about the other classes (see docs/tasks.md, "
                    "'Sparse labels')", only, n, unit)
    return {PREDICTED_CLASSES: float(len(counts))}


def summary_warnings(history: list[dict[str, Any]], best_step: int | None) -> list[str]:
    """Warnings for a run's training summary: one when the evaluation it reports (the one at `best_step`, else the
    last) predicted a single class everywhere. `history`: the loop's entries, evaluations keyed `eval_...`."""
    evals = [e for e in history if f"eval_{PREDICTED_CLASSES}" in e]
    reported = [e for e in evals if e["step"] == best_step] or evals[-1:]
    if not reported or reported[0][f"eval_{PREDICTED_CLASSES}"] != 1:
        return []
    return [f"the evaluation at step {reported[0]['step']} predicted one class for every example "
            f"(eval_{PREDICTED_CLASSES}=1): the model learnt only the majority class; see docs/tasks.md, "
            "'Sparse labels'"]


def init_bias_to_prior(model: nn.Module, heads: list[str], counts: list[int]) -> bool:
    """Set the bias of a new head's output layer to the log prior of the classes, log((count + 1) / (total + C))
    (add-one smoothed: a class absent from the training data gets a finite bias), so that the untrained model
    predicts the class distribution of the training data instead of a uniform one.

    heads: the head's top-level module names (`Task.head_modules`); its output layer is the last `nn.Linear` in
        them with `len(counts)` outputs. counts: training examples (or labelled tokens) per class, in logit order.
    Returns False, changing nothing, when the output layer has no bias or its bias is not all zero (a head that
    was trained already, loaded from a checkpoint, keeps its own).
    """
    layers = [m for h in heads for m in model.get_submodule(h).modules()
              if isinstance(m, nn.Linear) and m.out_features == len(counts)]
    bias = layers[-1].bias if layers else None
    if bias is None or bool(bias.detach().any()):
        log.info("the head's output layer has no zero bias to start at the class prior; left as it is")
        return False
    total = sum(counts) + len(counts)
    with torch.no_grad():
        bias.copy_(torch.tensor([(c + 1) / total for c in counts], dtype=torch.float64).log().to(bias.dtype))
    return True
