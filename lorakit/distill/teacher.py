"""The teacher of a distillation: loaded once for inference (eval mode, frozen), checked against the student.

    teacher = load_teacher("runs/sst2-full/model")                          # a fine-tuned or merged model directory
    teacher = load_teacher("minilm", adapter="runs/sst2-lora/adapter")     # a base + an adapter
    teacher = load_teacher("runs/sst2-lora/adapter")                       # an adapter alone: its recorded base
    check_teacher(teacher, student_model, student_tokenizer, kind="classification", labels=["0", "1"])

Loading goes through `lorakit.inference.load_for_inference`, the loader every command uses, so a teacher's head and
label names come from the `task.json` saved beside it. The student reads the teacher's logits for the student's own
token ids, so the two must share the vocabulary (the same tokenizer), and, for classification, the label set in
the same order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lorakit.errors import LorakitError
from lorakit.inference import load_for_inference
from lorakit.io import CONFIG_NAME as ADAPTER_CONFIG_NAME
from lorakit.models import BUNDLED_MODELS

KINDS = ("classification", "causal-lm")  # what a student learns from its teacher: a label's or a token's logits
_KIND_SUFFIXES = {"ForSequenceClassification": "classification", "ForCausalLM": "causal-lm",
                  "LMHeadModel": "causal-lm"}


@dataclass
class Teacher:
    """A frozen teacher model in eval mode. `name` says where it came from (for messages), `labels` are its label
    names (classification: from its task.json or config; None where unknown), `kind` what its logits are."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    name: str
    kind: str | None
    labels: list[str] | None

    def fingerprint(self) -> str:
        """SHA-256 over the teacher's parameter and buffer names and bytes: the same weights give the same
        fingerprint wherever they were loaded from (a directory, a base + adapter, a merged copy)."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(str(tensor.dtype).encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


def check_teacher_source(teacher: str, adapter: str | None = None) -> None:
    """Raise LorakitError, before anything loads, for a teacher or adapter path that does not exist. `teacher` is a
    bundled name, a model directory, an adapter directory, or a hub id `owner/name`."""
    if not teacher:
        raise LorakitError("no teacher given; name a model directory, a base model with an adapter, or an adapter")
    path = Path(teacher).expanduser()
    hub_like = teacher.count("/") == 1 and not teacher.startswith((".", "/", "~"))
    if teacher not in BUNDLED_MODELS and not path.is_dir() and not (hub_like and not path.exists()):
        what = "is a file, not a directory" if path.exists() else "does not exist"
        raise LorakitError(f"teacher {teacher!r} {what}; give a model directory (a fine-tuned or merged model), a "
                           f"base with an adapter, an adapter directory, or one of: {', '.join(BUNDLED_MODELS)}")
    if adapter is not None and not Path(adapter).expanduser().is_dir():
        raise LorakitError(f"teacher adapter {adapter!r} does not exist; give the adapter directory a run published "
                           "(RUN/adapter)")


def load_teacher(teacher: str, *, adapter: str | None = None, dtype: torch.dtype = torch.float32) -> Teacher:
    """Load a teacher for inference, frozen (no parameter requires grad) and in eval mode.

    teacher: a model directory (a fully fine-tuned or merged model, with its task.json), a bundled name or hub id,
        or an adapter directory (loaded on the base it records).
    adapter: an adapter to apply on `teacher` (then a base model).
    Raises LorakitError for a path that does not exist or a model or adapter that does not load.
    """
    check_teacher_source(teacher, adapter)
    if adapter is None and (Path(teacher).expanduser() / ADAPTER_CONFIG_NAME).is_file():
        loaded = load_for_inference(adapter=teacher, dtype=dtype)
        name = f"{teacher} (on {loaded.base})"
    else:
        loaded = load_for_inference(teacher, adapter, dtype=dtype)
        name = teacher if adapter is None else f"{teacher} + {adapter}"
    model = loaded.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    kind = model_kind(model)
    labels = teacher_labels(model, loaded.task_state) if kind == "classification" else None
    return Teacher(model, loaded.tokenizer, name, kind, labels)


def model_kind(model: nn.Module) -> str | None:
    """`classification` or `causal-lm` from the model's class name (transformers' naming), else None."""
    cls = type(model).__name__
    return next((kind for suffix, kind in _KIND_SUFFIXES.items() if cls.endswith(suffix)), None)


def teacher_labels(model: nn.Module, task_state: dict[str, Any] | None) -> list[str] | None:
    """The teacher's label names: its task.json's, else its config's id2label unless those are transformers'
    placeholders (LABEL_0, ...)."""
    if task_state is not None and isinstance(task_state.get("labels"), list):
        return [str(label) for label in task_state["labels"]]
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    names = [str(id2label[i]) for i in sorted(id2label)]
    return None if names == [f"LABEL_{i}" for i in range(len(names))] else names


def check_teacher(teacher: Teacher, student: nn.Module, tokenizer: PreTrainedTokenizerBase, *, kind: str,
                  labels: list[str] | None = None) -> None:
    """Raise LorakitError, naming both sides and the fix, unless `teacher` can teach `student`: the same kind of
    logits, the same vocabulary (tokenizer and, for a causal LM, output head size) and, for classification, the
    same label set in the same order."""
    if kind not in KINDS:
        raise LorakitError(f"distillation needs a classification or causal-LM student, got {kind!r}")
    if teacher.kind != kind:
        got = teacher.kind or type(teacher.model).__name__
        raise LorakitError(f"teacher {teacher.name} is a {got} model, the student a {kind} model; give a "
                           f"{kind} teacher (one trained on the student's task)")
    _check_vocabulary(teacher, tokenizer)
    if kind == "causal-lm":
        mine, theirs = _output_rows(student), _output_rows(teacher.model)
        if mine != theirs:
            raise LorakitError(f"teacher {teacher.name} predicts {theirs} tokens, the student {mine}; the teacher must "
                               "have the student's vocabulary (a model of the same family and tokenizer)")
        return
    count = int(getattr(teacher.model.config, "num_labels", 0))
    theirs_labels = teacher.labels
    if labels is not None and (count != len(labels) or (theirs_labels is not None and theirs_labels != labels)):
        shown = theirs_labels if theirs_labels is not None else f"{count} unnamed labels"
        raise LorakitError(f"teacher {teacher.name} has labels {shown}, the student's task {labels}; the label sets "
                           "must be the same, in the same order: give a teacher trained on this task, or set "
                           "data.labels to the teacher's order")


def _check_vocabulary(teacher: Teacher, tokenizer: PreTrainedTokenizerBase) -> None:
    mine, theirs = tokenizer.get_vocab(), teacher.tokenizer.get_vocab()
    if mine == theirs:
        return
    differ = sorted(set(mine.items()) ^ set(theirs.items()), key=lambda item: item[1])
    example = f" (e.g. {differ[0][0]!r})" if differ else ""
    raise LorakitError(f"teacher {teacher.name} has a vocabulary of {len(theirs):,} tokens, the student "
                       f"{len(mine):,}, and they differ{example}; the teacher reads the student's token ids, so it "
                       "must use the student's tokenizer: give a teacher of the student's family")


def _output_rows(model: nn.Module) -> int:
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor):
        return int(weight.shape[0])
    return int(getattr(getattr(model, "config", None), "vocab_size", 0))
