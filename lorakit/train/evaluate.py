"""Scoring a model or an adapter on a config's evaluation data: what `lorakit eval` calls.

    scores = evaluate_from_config(config, adapter="runs/sst2/adapter")
    scores.metrics, scores.metric, scores.method, scores.record(command="lorakit eval ...")
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from lorakit import gemm, quant
from lorakit.errors import LorakitError
from lorakit.factorized import is_factorized_dir
from lorakit.inference import HEAD_FOR_TASK, factorized_base, load_for_inference
from lorakit.models import resolve_head
from lorakit.train.preflight import check_data_files
from lorakit.train.results import evaluated_method, results_task
from lorakit.train.run import load_data, task_options
from lorakit.train.sections import TrainConfig
from lorakit.train.tasks import TASKS, make_task, task_from_state

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """What an evaluation measured: `metrics` by name, the primary `metric`, and what was scored."""

    metrics: dict[str, float]
    metric: str
    results_task: str
    data: str
    model: str
    method: str

    def record(self, command: str, note: str | None = None) -> dict[str, Any]:
        """The entry `lorakit eval --record` appends to the results file."""
        return {"task": self.results_task, "data": self.data, "model": self.model, "method": self.method,
                "metric": self.metric, "value": self.metrics.get(self.metric), "trainable_params": 0,
                "trainable_pct": 0.0, "train_seconds": 0.0, "steps": 0, "metrics": self.metrics,
                "command": command, "note": note}


def evaluate_from_config(config: TrainConfig, adapter: str | Path | None = None, *, num_beams: int = 1
                         ) -> Evaluation:
    """Score the base model (zero-shot, where the task allows) or an adapter on the config's eval data.
    Translation (`data.task: translation`) is scored by BLEU and chrF of greedy (or beam) generations.

    The base is the config's model.name, except for an adapter trained on a factorised model (`compress` with
    `run.method: lora`), which is scored on the factorised model it records unless model.name is itself a factorised
    model directory (then the adapter must fit it).

    Raises LorakitError for a base model without the head the task needs (a new classifier has nothing to score
    before training), for missing evaluation data, and for a bad `num_beams`. The products run on
    `run.cpu_matmul`'s kernel (lorakit.gemm).
    """
    with gemm.cpu_matmul(config.run.cpu_matmul):
        return _evaluate(config, adapter, num_beams)


def _evaluate(config: TrainConfig, adapter: str | Path | None, num_beams: int) -> Evaluation:
    from lorakit.generation import SamplingConfig

    sampling = SamplingConfig(max_new_tokens=max(config.data.max_length // 2, 1), num_beams=num_beams)
    check_data_files(config.data)
    loaded = load_for_inference(_base_for(config.model.name, adapter), adapter)  # a misfit is one line
    model, tokenizer = loaded.model, loaded.tokenizer
    _quantize_as_configured(model, config.model.quantize, adapter)
    if loaded.task_state is not None:
        task = task_from_state(tokenizer, loaded.task_state)
    else:
        _check_zero_shot_head(config, resolve_head(cast(Any, model).config))
        task = make_task(config.data.task, tokenizer, **task_options(config))
    train_records, eval_records = load_data(config, task)
    if not eval_records:
        raise LorakitError("no evaluation data: set data.eval or data.eval_fraction")
    if hasattr(task, "fit_labels"):
        task.fit_labels(train_records)
    if config.data.task == "translation":  # score generated text, not the teacher-forced loss
        from lorakit.train.tasks.translation import evaluate_generation, translation_scores

        metrics = evaluate_generation(model, tokenizer, eval_records, sampling, translation_scores,
                                      batch_size=config.run.eval_batch_size)
        metric = "bleu"
    else:
        features = task.encode(eval_records)
        with torch.no_grad():
            metrics = task.evaluate(model, features, config.run.eval_batch_size)
        metric = TASKS[config.data.task].metric
    method = evaluated_method(config.model.name, adapter)
    if method == "base" and config.model.quantize is not None:
        method = f"base-{config.model.quantize}"
    return Evaluation(finite_metrics(metrics), metric, results_task(config), config.data.eval or config.data.train,
                      config.model.name, method)


def _quantize_as_configured(model: nn.Module, kind: str | None, adapter: str | Path | None) -> None:
    """Apply model.quantize to the loaded model (an adapter trained on a quantized base arrives quantized as it
    was trained); a kind other than the adapter's is refused."""
    if kind is None:
        return
    loaded = quant.model_quantization(model)
    if loaded is None:
        quant.quantize_model(model, kind)
    elif loaded != kind:
        raise LorakitError(f"model.quantize={kind}, but {adapter} was trained on a {loaded} base; remove "
                           f"model.quantize (the adapter runs on the base it was trained on) or set it to {loaded}")


def _base_for(model: str, adapter: str | Path | None) -> str:
    """model.name, or the factorised base an adapter trained on one records (model.name then names the dense model
    the run factorised, which the adapter does not fit)."""
    factorized = factorized_base(adapter) if adapter is not None else None
    if factorized is None or is_factorized_dir(model):
        return model
    log.info("the adapter was trained on the factorised model %s; scoring it there, not on model.name=%s",
             factorized, model)
    return factorized


def _check_zero_shot_head(config: TrainConfig, head: str) -> None:
    needed = HEAD_FOR_TASK[config.data.task]
    if head != needed:
        raise LorakitError(
            f"model {config.model.name!r} has no trained {needed} head (it loads as {head!r}), so task "
            f"{config.data.task!r} has nothing to score before training; pass --adapter DIR from a training run, "
            "or a model directory that has its own head")


def finite_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """`metrics` for JSON: a NaN or infinite value becomes None (JSON null) rather than the invalid `NaN`."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
