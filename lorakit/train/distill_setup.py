"""What a training run does with a `distill` section: load and check the teacher, wrap the student's task, and
read or build the teacher-logit cache."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lorakit import distributed
from lorakit.distill import (
    CACHE_NAME,
    DistillTask,
    LogitCache,
    check_teacher,
    data_fingerprint,
    load_teacher,
    read_cache,
    write_cache,
)
from lorakit.distributed import World
from lorakit.errors import LorakitError
from lorakit.task import Features, Task
from lorakit.train.preflight import resolve_device
from lorakit.train.sections import TrainConfig

log = logging.getLogger(__name__)


def distill_task(config: TrainConfig, model: nn.Module, tokenizer: PreTrainedTokenizerBase, task: Task,
             train: list[Features]) -> tuple[DistillTask, list[Features]]:
    """The student task wrapped to learn from the `distill` section's teacher (loaded and checked against the
    student), and the training features indexed for it; with `distill.cache`, the teacher's logits are read from
    the cache file, or computed once and written there."""
    d = config.distill
    kind = "classification" if config.data.task == "classification" else "causal-lm"
    try:
        teacher = load_teacher(d.teacher, adapter=d.teacher_adapter, dtype=getattr(torch, config.model.dtype))
        check_teacher(teacher, model, tokenizer, kind=kind, labels=getattr(task, "labels", None))
    except LorakitError as e:
        raise LorakitError(f"distill: {e}") from None
    distilled = DistillTask(task, teacher, kind=kind, alpha=d.alpha, temperature=d.temperature,
                            chunk_size=d.chunk_size)
    train = distilled.index(train)
    if d.cache:
        distilled.use_cache(_teacher_cache(config, distilled, train))
    return distilled, train


def _teacher_cache(config: TrainConfig, task: DistillTask, train: list[Features]) -> LogitCache:
    """The teacher-logit cache of this run's training data and teacher: read from distill.cache_path (default
    run.out_dir/teacher-logits.safetensors) when it is there (refused when stale), else computed and written."""
    d = config.distill
    path = Path(d.cache_path) if d.cache_path else Path(config.run.out_dir) / CACHE_NAME
    keys = {"data": data_fingerprint(train), "teacher": task.teacher.fingerprint(), "kind": task.kind}
    if path.is_file():
        try:
            return read_cache(path, **keys)
        except LorakitError as e:
            raise LorakitError(f"distill: {e}") from None
    world = World.from_env()
    device = distributed.device_for(world, resolve_device(config.run.device))
    try:
        cache = task.build_cache(train, device=device, batch_size=config.run.eval_batch_size,
                                 max_bytes=int(d.cache_max_gb * 2**30))
    except LorakitError as e:
        raise LorakitError(f"distill: {e}") from None
    finally:
        task.teacher.model.to("cpu")  # the teacher is not needed again: free the accelerator's memory
    if world.is_main:
        write_cache(path, cache.logits, cache.offsets, teacher_name=task.teacher.name, **keys)
    log.info("cached the teacher's logits over %d training examples in %s", len(train), path)
    return cache
