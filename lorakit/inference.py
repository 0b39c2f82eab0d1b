"""Loading a model for inference: the one loader behind `merge`, `generate`, `chat`, `eval` and the Python API.

    loaded = load_for_inference(adapter="runs/sst2/adapter")   # the base the adapter records, its head, its labels
    loaded = load_for_inference("smollm2")                      # a base alone
    loaded.model, loaded.tokenizer, loaded.task_state

The adapter directory is read and checked (files, checksum, finite values, `task.json`) before the base model is
loaded, so a bad adapter costs no model load. Without `model`, the base is the one the adapter records; a base
the adapter does not fit is refused in one line naming both.

An adapter trained on a factorised model (`compress` with `run.method: lora`) records that model's directory as an
absolute path; when the run directory has moved, the factorised `model` directory beside the adapter (as a run
publishes them) is its base. Such an adapter loads only onto a model with the same factorised layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lorakit import quant
from lorakit.errors import LorakitError
from lorakit.factorized import is_factorized_dir
from lorakit.io import FACTORIZATION_KEY, adapter_quantization, load_adapter, read_adapter, read_task_state
from lorakit.models import load_model

DEFAULT_MODEL = "smollm2"
# The model head each training task trains (`data.task` -> `load_model(head=...)`).
HEAD_FOR_TASK: dict[str, str] = {"classification": "sequence-classification", "instruction": "causal-lm",
                                 "translation": "causal-lm", "image-classification": "image-classification",
                                 "ner": "token-classification", "qa": "question-answering",
                                 "transcription": "speech-seq2seq"}
_LABELLED_HEADS = ("sequence-classification", "token-classification", "image-classification")


@dataclass
class Loaded:
    """A model ready for inference (eval mode) with its tokenizer; `base` is the base model it was built on and
    `task_state` the training task saved with the adapter or model (labels, max_length, ...), if any."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    base: str
    task_state: dict[str, Any] | None
    adapter: Path | None


def recorded_base(adapter: str | Path) -> str | None:
    """The base model an adapter directory records (`base_model_name_or_path`, else lorakit's header field); for an
    adapter trained on a factorised model whose recorded directory is gone, the factorised `model` directory beside
    the adapter's directory, if there is one."""
    raw_config, _, metadata = read_adapter(adapter)
    base = raw_config.get("base_model_name_or_path") or metadata.get("lorakit_base_model") or None
    if not metadata.get(FACTORIZATION_KEY) or (base is not None and is_factorized_dir(base)):
        return base
    beside = Path(adapter).expanduser().resolve().parent / "model"
    return str(beside) if is_factorized_dir(beside) else base


def factorized_base(adapter: str | Path) -> str | None:
    """The factorised model an adapter was trained on (`recorded_base`), or None for an adapter of a plain model."""
    _, _, metadata = read_adapter(adapter)
    return recorded_base(adapter) if metadata.get(FACTORIZATION_KEY) else None


def load_for_inference(model: str | None = None, adapter: str | Path | None = None, *,
                       dtype: torch.dtype = torch.float32, dense: bool = False) -> Loaded:
    """The base `model` (default: the adapter's recorded base, else `smollm2`) with `adapter` applied, with the
    head and label names of the task the adapter (or a fully fine-tuned model directory) was trained for.

    An adapter trained on a quantized base (QLoRA; its file records the kind) runs on the base quantized the same
    way, as in training: quantization is deterministic, and a QPiSSA / LoftQ residual is rebuilt from the dense W
    before it is quantized. `dense=True` keeps the full-precision base instead (what merging onto the original
    weights needs).

    Raises LorakitError for a missing or damaged adapter, an invalid `task.json`, or a base the adapter does not
    fit.
    """
    adapter_dir = Path(adapter) if adapter is not None else None
    base = model
    if adapter_dir is not None:
        recorded = recorded_base(adapter_dir)  # also validates the adapter before any model loads
        base = base or recorded
        task_state = read_task_state(adapter_dir)
    base = base or DEFAULT_MODEL
    if adapter_dir is None:
        task_state = read_task_state(base) if Path(base).is_dir() else None  # a published full fine-tune
    head, labels = _head_and_labels(task_state)
    num_labels = len(labels) if labels and head in _LABELLED_HEADS else None
    loaded_model, tokenizer = load_model(base, head=head, num_labels=num_labels, dtype=dtype)
    if labels and head in _LABELLED_HEADS:
        set_label_names(loaded_model, labels)
    if adapter_dir is not None:
        load_adapter(loaded_model, adapter_dir)
        kind = adapter_quantization(adapter_dir)
        if kind is not None and not dense:
            quant.quantize_model(loaded_model, kind)
    return Loaded(loaded_model.eval(), tokenizer, base, task_state, adapter_dir)


def _head_and_labels(task_state: dict[str, Any] | None) -> tuple[str, list[str] | None]:
    if task_state is None:
        return "auto", None
    task = task_state["task"]
    if task not in HEAD_FOR_TASK:
        raise LorakitError(f"task.json names task {task!r}, which this lorakit does not know; known tasks: "
                           f"{', '.join(HEAD_FOR_TASK)}")
    return HEAD_FOR_TASK[task], task_state.get("labels")


def set_label_names(model: nn.Module, labels: list[str]) -> None:
    """Give a classifier's config the task's label names (id2label / label2id), so that a saved or merged model
    reports `positive`, not `LABEL_1`."""
    config: Any = getattr(model, "config", None)
    if config is None:
        return
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
