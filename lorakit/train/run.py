"""From a `TrainConfig` to a trained adapter: load the base, read and encode the data, inject, fit, save.

This is what `lorakit train` and `lorakit eval` call; a Python user can call the same functions, or `fit`
directly with a model and task of their own.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lorakit import distributed, gemm, sharding
from lorakit.compress import FactorizeReport, LowRankLinear, factorization_of, save_factorized
from lorakit.config import LoraConfig
from lorakit.distill import check_teacher_source
from lorakit.distributed import World
from lorakit.errors import LorakitError
from lorakit.fileio import atomic_write_bytes, atomic_write_dir
from lorakit.inference import HEAD_FOR_TASK
from lorakit.inject import AdapterState, InjectionReport, inject, injection_report
from lorakit.io import TASK_NAME, save_adapter
from lorakit.models import load_model
from lorakit.outputs import MARK_NAME, OutputExistsError, claim_output_dir
from lorakit.quant_init import quantize_with_init
from lorakit.swiglu import fuse_gated_mlps
from lorakit.task import Features, Task
from lorakit.train.checkpoint import ADAPTER_DIR, list_checkpoints, load_weights
from lorakit.train.compress_setup import (
    check_disjoint,
    compress_model,
    head_exclusions,
    lora_base_layers,
    without_adapters,
)
from lorakit.train.data import check_labels, map_columns, read_records
from lorakit.train.distill_setup import distill_task
from lorakit.train.loop import TrainResult, fit
from lorakit.train.metrics_log import METRICS_FILE, plot_loss_curve
from lorakit.train.preflight import check_data_files, check_max_length, check_output_dir, resolve_device
from lorakit.train.readers import read_squad
from lorakit.train.results import method_label, results_task
from lorakit.train.sections import TrainConfig
from lorakit.train.tasks import make_task
from lorakit.train.tasks.collapse import summary_warnings

log = logging.getLogger(__name__)
RUN_KIND = "train run"
# What a run writes in its directory, and so what `--force` may replace; anything else there is left alone.
RUN_FILES = ("checkpoints", ADAPTER_DIR, "model", METRICS_FILE, "loss.png", "tensorboard", "config.json")


@dataclass
class Prepared:
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    task: Task
    train: list[Features]
    eval: list[Features]
    report: InjectionReport
    factorization: FactorizeReport | None = None  # set when `compress` factorised the model
    # With compress and LoRA: the base layers the LoRA modules replaced, by name, to publish the base without them.
    base_layers: dict[str, nn.Module] = field(default_factory=dict)


@dataclass
class TrainSummary:
    """What a run produced, for the summary table, the JSON line and the results file."""

    task: str
    model: str
    method: str
    metric: str
    value: float | None
    trainable_params: int
    total_params: int
    steps: int
    train_seconds: float
    adapter_dir: str
    adapter_bytes: int
    loss_curve: str | None
    warnings: list[str] = field(default_factory=list)  # e.g. predictions collapsed to one class

    def table(self) -> list[tuple[str, str]]:
        value = "n/a" if self.value is None else f"{self.value:.4f}"
        return [("task", self.task), ("model", self.model), ("method", self.method), (self.metric, value),
                ("trainable", f"{self.trainable_params:,} of {self.total_params:,} "
                              f"({100 * self.trainable_params / max(self.total_params, 1):.3f}%)"),
                ("steps", str(self.steps)), ("train seconds", f"{self.train_seconds:.1f}"),
                ("adapter", f"{self.adapter_dir} ({self.adapter_bytes:,} bytes)"),
                ("loss curve", self.loss_curve or "n/a")] + [("WARNING", w) for w in self.warnings]

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def load_data(config: TrainConfig, task: Task) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train and eval records, columns renamed to the task's fields; eval held out from train if no file."""
    d = config.data
    format = "parallel" if d.task == "translation" else d.format
    train = _records(task, d.train, format, d.train_articles, d.columns, d.encoding)
    if d.eval:
        evaluation = _records(task, d.eval, format, d.eval_articles, d.columns, d.encoding)
    elif d.eval_fraction > 0:
        order = list(range(len(train)))
        random.Random(config.run.seed).shuffle(order)
        cut = max(1, int(len(train) * d.eval_fraction))
        evaluation, train = [train[i] for i in order[:cut]], [train[i] for i in order[cut:]]
    else:
        evaluation = []
    if d.train_limit is not None:
        train = train[:d.train_limit]
    if d.eval_limit is not None:
        evaluation = evaluation[:d.eval_limit]
    return train, evaluation


def _records(task: Task, path: str, format: str | None, articles: list[int] | None, columns: dict[str, str],
             encoding: str = "utf-8") -> list[dict[str, Any]]:
    """One file's records, columns renamed; a task with `check_records` checks them here, where an error can name
    the file and the record's number in it (before any split, shuffle or limit renumbers them)."""
    reader = getattr(task, "read_records", None)  # a task with data of its own kind (images) reads it itself
    raw = reader(path) if callable(reader) else _read(path, format, articles, encoding)
    records = map_columns(raw, columns, path)
    check_labels(records, task.name, path, columns=columns, format=format, encoding=encoding)
    check = getattr(task, "check_records", None)
    if callable(check):
        check(records, path)
    return records


def _read(path: str, format: str | None, articles: list[int] | None, encoding: str = "utf-8"
          ) -> list[dict[str, Any]]:
    """read_records, or the SQuAD articles [start, stop) of a squad file (the config checks the format)."""
    if articles is not None:
        return read_squad(path, articles=slice(*articles), encoding=encoding)
    return read_records(path, format=format, encoding=encoding)


def task_options(config: TrainConfig) -> dict[str, Any]:
    if config.data.task == "image-classification":
        return {"labels": config.data.labels, "image_size": config.data.image_size}
    options: dict[str, Any] = {"max_length": config.data.max_length}
    if config.data.task in ("classification", "ner") and config.data.labels is not None:
        options["labels"] = config.data.labels
    if config.data.task == "classification" and "text_pair" in config.data.columns:
        options["text_pair"] = "text_pair"
    return options


def prepare(config: TrainConfig) -> Prepared:
    """Load the base model, build the task, read and encode the data and inject the adapter."""
    torch.manual_seed(config.run.seed)  # the new head's and the adapter's initial weights
    # The tokenizer comes with the bare model: a head loaded here would draw its random init from the seeded RNG.
    head = HEAD_FOR_TASK[config.data.task]  # a causal LM's or Whisper's tokenizer comes with that head's model
    _, tokenizer = load_model(config.model.name, head=head if head in ("causal-lm", "speech-seq2seq") else "base")
    task = make_task(config.data.task, tokenizer, **task_options(config))
    train_records, eval_records = load_data(config, task)
    num_labels = None
    if hasattr(task, "fit_labels"):
        num_labels = len(task.fit_labels(train_records))
    model, _ = load_model(config.model.name, head=HEAD_FOR_TASK[config.data.task], num_labels=num_labels,
                          dtype=getattr(torch, config.model.dtype),
                          quantize=config.model.quantize if config.model.quantize_init == "qlora" else None)
    check_max_length(config.data.max_length, model.config, config.model.name)
    train_features, eval_features = task.encode(train_records), task.encode(eval_records) if eval_records else []
    if hasattr(task, "init_head"):  # a new classifier head starts at the label prior of the training data
        task.init_head(model, train_features)
    lora = config.lora
    heads = [h for h in task.head_modules(model) if h not in lora.modules_to_save]
    if heads:
        lora = LoraConfig.from_dict({**lora.to_dict(), "modules_to_save": lora.modules_to_save + heads})
    lora_on_factors = config.compress.enabled and config.run.method == "lora"
    if lora_on_factors:
        check_disjoint(model, lora, config.compress.targets, head_exclusions(model, task))
    factorization = compress_model(config, model, task, train_features) if config.compress.enabled else None
    if config.run.fused_swiglu:
        fuse_gated_mlps(model)
    if config.run.activation_checkpointing:
        enable_activation_checkpointing(model)
    base_layers: dict[str, nn.Module] = {}
    if config.run.method == "lora":
        if lora_on_factors:
            base_layers = lora_base_layers(model, lora)
        report = inject(model, lora)
        if config.model.quantize and config.model.quantize_init != "qlora":  # needs the dense W: quantized here
            init_report = quantize_with_init(model, config.model.quantize, config.model.quantize_init,
                                             iters=config.model.loftq_iters,
                                             svd_iters=config.model.quantize_svd_iters,
                                             seed=config.run.seed)
            log.info("%s", init_report)
            report = injection_report(model)
    elif config.run.method == "factors":
        report = _unfreeze(model, heads + [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)])
    else:
        report = _unfreeze(model, heads if config.run.method == "head-only" else None)
    if config.distill.enabled:
        task, train_features = distill_task(config, model, tokenizer, task, train_features)
    return Prepared(model, tokenizer, task, train_features, eval_features, report, factorization, base_layers)


def _unfreeze(model: nn.Module, heads: list[str] | None) -> InjectionReport:
    """Baselines without adapters: train the named head modules only, or (heads None) every parameter."""
    for name, p in model.named_parameters():
        p.requires_grad_(heads is None or any(name.startswith(h + ".") for h in heads))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return InjectionReport([], heads or [], trainable, sum(p.numel() for p in model.parameters()))


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block's activations in backward instead of keeping them (transformers' own
    checkpointing, non-reentrant). Raises LorakitError for a model that does not support it."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise LorakitError(f"{type(model).__name__} does not support activation checkpointing; "
                           "set run.activation_checkpointing=false")
    # Non-reentrant checkpointing lets gradients reach the adapters even though the frozen base's inputs do not
    # require grad; the reentrant variant would silently train nothing.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)  # type: ignore[operator]
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)  # type: ignore[operator]
    if hasattr(model, "config"):
        config: Any = model.config
        config.use_cache = False


def train_from_config(config: TrainConfig, *, resume: bool = False, force: bool = False, progress: bool = False,
                      world: World | None = None) -> TrainSummary:
    """Run a whole training job and write `out_dir/adapter` (the best checkpoint's adapter, or the last one).

    `run.out_dir` must be new or empty; an earlier run there is continued with `resume` or replaced with `force`
    (its checkpoints, adapter, metrics and plots; nothing else), and a directory holding anything else is refused.
    All of this is checked before the model loads.
    """
    check_output_dir(config.run.out_dir)  # before any model loads
    check_data_files(config.data)
    sharding.check_launch(config.run.parallel)
    if config.distill.enabled:
        try:
            check_teacher_source(config.distill.teacher, config.distill.teacher_adapter)
        except LorakitError as e:
            raise LorakitError(f"distill: {e}") from None
    out_dir = Path(config.run.out_dir)
    fresh = not out_dir.exists()
    if not resume and World.from_env().is_main:
        _claim_run_dir(out_dir, force)
    device = resolve_device(config.run.device)
    world = world or distributed.init_world(device)
    device = distributed.device_for(world, device)
    try:
        with gemm.cpu_matmul(config.run.cpu_matmul):
            return _train(config, world, device, resume=resume, progress=progress)
    except LorakitError:
        if fresh and world.is_main:
            _remove_unused(out_dir)
        raise
    finally:
        distributed.shutdown(world)


def _remove_unused(out_dir: Path) -> None:
    """Remove a run directory this run created when nothing but its claim mark is in it (a refusal while
    preparing, such as a teacher that does not fit, writes nothing)."""
    if out_dir.is_dir() and [p.name for p in out_dir.iterdir()] in ([], [MARK_NAME]):
        shutil.rmtree(out_dir)


def _train(config: TrainConfig, world: World, device: torch.device, *, resume: bool, progress: bool
           ) -> TrainSummary:
    out_dir = Path(config.run.out_dir)
    prepared = prepare(config)
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out_dir / "config.json", json.dumps(config.to_dict(), indent=2).encode())
    result = fit(prepared.model, prepared.task, prepared.train, prepared.eval, config.optim, config.run,
                 world=world, resume=resume, progress=progress, device=device)
    adapter_dir = _publish(prepared, result, out_dir) if world.is_main else out_dir / "adapter"
    curve = plot_loss_curve(result.history, out_dir / "loss.png") if world.is_main else None
    method = method_label(config.run.method, config.lora.init, config.lora.dora, config.model.quantize,
                          config.model.quantize_init)
    if config.distill.enabled:
        method += "+distill"
    metric_value = _best_metrics(result, prepared.task.metric)
    return TrainSummary(
        task=results_task(config), model=config.model.name, method=method, metric=prepared.task.metric,
        value=metric_value, trainable_params=prepared.report.trainable_params,
        total_params=prepared.report.total_params, steps=result.steps, train_seconds=result.seconds,
        adapter_dir=str(adapter_dir), adapter_bytes=_dir_bytes(adapter_dir), loss_curve=str(curve) if curve else None,
        warnings=summary_warnings(result.history, result.best_step))


def _claim_run_dir(out_dir: Path, force: bool) -> None:
    """A fresh run's directory: new, empty, or an earlier run replaced on `force` (only the files a run writes)."""
    if list_checkpoints(out_dir) and not force:
        raise OutputExistsError(f"{out_dir} already holds checkpoints; pass --resume to continue, --force to start "
                                "over, or choose another run.out_dir")
    if claim_output_dir(out_dir, kind=RUN_KIND, force=force,
                         replace_hint="pass --resume to continue it or --force to start over"):
        for name in RUN_FILES:
            target = out_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)


def _best_metrics(result: TrainResult, metric: str) -> float | None:
    evals = [e for e in result.history if f"eval_{metric}" in e]
    if result.best_step is not None:
        evals = [e for e in evals if e["step"] == result.best_step] or evals
    return evals[-1][f"eval_{metric}"] if evals else None


def _publish(prepared: Prepared, result: TrainResult, out_dir: Path) -> Path:
    """Load the best checkpoint's weights (or the last) back into the model and publish them with the task
    beside them: the adapter as `out_dir/adapter`, or, for runs without adapters, the whole model as
    `out_dir/model` (a transformers directory). An adapter trained on a factorised model comes with that model
    (without the adapter) as `out_dir/model`, which the adapter records as its base by absolute path."""
    checkpoints = dict(list_checkpoints(out_dir))
    step = result.best_step if result.best_step in checkpoints else max(checkpoints)
    source = checkpoints[step]  # type: ignore[index]
    task_json = json.dumps(prepared.task.state(), indent=2) + "\n"
    if isinstance(getattr(prepared.model, "lorakit_state", None), AdapterState) and prepared.factorization is None:
        _publish_files(source / ADAPTER_DIR, out_dir / ADAPTER_DIR, task_json)  # as saved: no model load needed
        return out_dir / ADAPTER_DIR
    load_weights(prepared.model, source)
    if not isinstance(getattr(prepared.model, "lorakit_state", None), AdapterState):
        _publish_model(prepared, out_dir / "model", task_json)
        return out_dir / "model"
    _publish_model(prepared, out_dir / "model", task_json)  # an adapter on a factorised model
    base = str((out_dir / "model").resolve())

    def fill_rebased(tmp: Path) -> None:  # the checkpoint's adapter, saved again with its factorised base
        staged = save_adapter(prepared.model, tmp / ADAPTER_DIR, base_model=base)
        for file in staged.iterdir():
            file.rename(tmp / file.name)
        staged.rmdir()
        (tmp / TASK_NAME).write_text(task_json)

    atomic_write_dir(out_dir / ADAPTER_DIR, fill_rebased)
    return out_dir / ADAPTER_DIR


def _publish_files(source: Path, target: Path, task_json: str) -> None:
    """A checkpoint's adapter files, copied, with the task beside them (the model is not touched: under fsdp it
    is sharded)."""
    def fill(tmp: Path) -> None:
        for file in source.iterdir():
            shutil.copy2(file, tmp / file.name)
        (tmp / TASK_NAME).write_text(task_json)

    atomic_write_dir(target, fill)


def _publish_model(prepared: Prepared, directory: Path, task_json: str) -> None:
    """The model as a transformers directory with the task beside it; a factorised one with `factorization.json`
    (U and V as trained; load_model builds the LowRankLinear layers back) and without any LoRA modules."""
    def fill(tmp: Path) -> None:
        factorization = prepared.factorization
        if factorization is None and any(isinstance(m, LowRankLinear) for m in prepared.model.modules()):
            factorization = factorization_of(prepared.model)  # model.name was a factorised directory
        if factorization is not None:
            with without_adapters(prepared.model, prepared.base_layers):
                save_factorized(prepared.model, prepared.tokenizer, tmp, factorization, force=True)
        else:
            prepared.model.save_pretrained(tmp)  # type: ignore[operator]
            prepared.tokenizer.save_pretrained(tmp)
        (tmp / TASK_NAME).write_text(task_json)

    atomic_write_dir(directory, fill)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file()) if Path(path).is_dir() else 0

