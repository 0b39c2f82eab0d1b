"""The tasks lorakit can train, by name: the table the config and the CLI choose from.

    task = make_task("classification", tokenizer, text="sentence", labels=["0", "1"])
    task = make_task("ner", tokenizer, max_length=128)       # also "instruction" and "qa"
    task = task_from_state(tokenizer, saved_state)           # the task saved beside an adapter, rebuilt
"""

from __future__ import annotations

import inspect
from typing import Any

from transformers import PreTrainedTokenizerBase

from lorakit.errors import LorakitError, did_you_mean
from lorakit.task import Task
from lorakit.train.tasks.classification import SequenceClassification
from lorakit.train.tasks.image_classification import ImageClassification
from lorakit.train.tasks.instruction import InstructionTuning
from lorakit.train.tasks.ner import TokenClassification
from lorakit.train.tasks.qa import ExtractiveQA
from lorakit.train.tasks.transcription import Transcription

TaskClass = (type[SequenceClassification] | type[InstructionTuning] | type[TokenClassification] | type[ExtractiveQA]
             | type[Transcription] | type[ImageClassification])
TASKS: dict[str, TaskClass] = {
    "classification": SequenceClassification,
    "instruction": InstructionTuning,
    "ner": TokenClassification,
    "qa": ExtractiveQA,
    "translation": InstructionTuning,  # parallel text as instructions; `lorakit eval` scores its generations
    "transcription": Transcription,  # speech to text with Whisper: wav manifests, word error rate
    "image-classification": ImageClassification,  # an image model's logits: MNIST 5k, CSVs, image files
}

__all__ = ["TASKS", "ExtractiveQA", "ImageClassification", "InstructionTuning", "SequenceClassification",
           "TokenClassification", "Transcription", "make_task", "task_from_state", "task_options"]


def task_options(name: str) -> list[str]:
    """The keyword options task `name` accepts (its constructor's parameters after the tokenizer)."""
    parameters = inspect.signature(_task_class(name)).parameters
    return [p for p in parameters if p != "tokenizer"]


def make_task(name: str, tokenizer: PreTrainedTokenizerBase, **options: Any) -> Task:
    """Build task `name` (a key of `TASKS`) around `tokenizer`; `options` are its keyword arguments.

    Raises LorakitError for an unknown task or option, naming the known ones.
    """
    cls = _task_class(name)
    allowed = task_options(name)
    for option in options:
        if option not in allowed:
            raise LorakitError(f"unknown option {option!r} for task {name!r}{did_you_mean(option, allowed)}; "
                               f"it takes: {', '.join(allowed)}")
    return cls(tokenizer, **options)


def task_from_state(tokenizer: PreTrainedTokenizerBase, state: dict[str, Any]) -> Task:
    """Rebuild a task from its `state()` (which names the task under "task")."""
    name = state.get("task")
    if not isinstance(name, str):
        raise LorakitError(f"task state has no task name (keys: {', '.join(state)}); was it saved by lorakit?")
    options = {k: v for k, v in state.items() if k != "task"}
    try:
        return _task_class(name)(tokenizer, **options)  # type: ignore[arg-type]
    except TypeError as e:
        raise LorakitError(f"bad {name} task state {sorted(options)}: {e}") from None


def _task_class(name: str) -> TaskClass:
    if name not in TASKS:
        raise LorakitError(f"unknown task {name!r}{did_you_mean(name, TASKS)}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]
