"""The base model an adapter was trained on, for the parts of the analysis that need W (§7.3, token projection).

The base is the one the adapter records (or `model`), loaded with the head of the task it was trained for (from
`task.json`, else PEFT's `task_type`), so that module names match the adapter's.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lorakit.analysis.factors import AdapterFactors
from lorakit.errors import LorakitError
from lorakit.inference import HEAD_FOR_TASK
from lorakit.io import read_task_state
from lorakit.models import load_model

# PEFT's task_type -> lorakit's head, for adapters saved without a task.json (PEFT's own).
HEAD_FOR_TASK_TYPE = {"CAUSAL_LM": "causal-lm", "SEQ_CLS": "sequence-classification",
                      "TOKEN_CLS": "token-classification", "QUESTION_ANS": "question-answering"}


@dataclass
class Base:
    """The loaded base model (fp32, eval mode), its tokenizer and the name it was loaded by."""

    name: str
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase


def base_name(factors: AdapterFactors, model: str | None = None) -> str:
    """The base to load: `model`, else the one the adapter records; LorakitError when there is neither."""
    name = model or factors.base
    if not name:
        raise LorakitError(f"adapter {str(factors.path)!r} records no base model; pass --model (the base it was "
                           "trained on), or --no-base to analyse the factors alone")
    return name


def load_base(factors: AdapterFactors, model: str | None = None) -> Base:
    """Load `model` (default: the base `factors` records) with the head the adapter was trained with.

    Raises LorakitError when the adapter records no base and none is given, or when the base cannot be loaded.
    """
    name = base_name(factors, model)
    loaded, tokenizer = load_model(name, head=head_for(factors))
    return Base(name, loaded, tokenizer)


def head_for(factors: AdapterFactors) -> str:
    """The head the adapter was trained with (`causal-lm`, `sequence-classification`, ...), from its `task.json`,
    else PEFT's `task_type`; `auto` (the model's own) when it records neither."""
    state = read_task_state(factors.path)
    task = state.get("task") if state else None
    return HEAD_FOR_TASK.get(str(task)) or HEAD_FOR_TASK_TYPE.get(str(factors.task_type)) or "auto"


def base_weights(base: Base, factors: AdapterFactors) -> dict[str, Tensor]:
    """W of every analysed module in the ΔW = B A layout (out, in), fp32 (a GPT-2 `Conv1D` stores (in, out)).

    Raises LorakitError naming the first module the base lacks or whose shape differs from the adapter's.
    """
    modules = dict(base.model.named_modules())
    out: dict[str, Tensor] = {}
    for name, module in factors.modules.items():
        layer = modules.get(name)
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise LorakitError(f"base {base.name!r} has no linear module {name!r} that adapter "
                               f"{str(factors.path)!r} adapts; pass --model with the base it was trained on")
        w = weight.detach().float()
        w = w.T if type(layer).__name__ == "Conv1D" else w  # transformers' Conv1D: weight (in, out)
        if tuple(w.shape) != module.shape:
            raise LorakitError(f"module {name!r} is {tuple(w.shape)} in base {base.name!r} but the adapter's ΔW is "
                               f"{module.shape}; pass --model with the base it was trained on")
        out[name] = w
    return out
