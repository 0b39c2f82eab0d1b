"""Choosing which modules to adapt: patterns, presets, and errors that point at the right name.

Pattern syntax (one syntax everywhere: targets, exclude, modules_to_save, rank_pattern, alpha_pattern):
- `q_proj`: a bare name matches the last component of a module's dotted name;
- `attention.output.dense`: a dotted name matches a whole-component suffix;
- `model.layers.*.mlp.*`: a glob (`*`, `?`, `[...]`) matches the full dotted name;
- `re:model\\.layers\\.[0-3]\\..*`: a regular expression must match the full dotted name.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from lorakit.errors import ConfigError, did_you_mean
from lorakit.factorized import LowRankLinear

try:  # GPT-2 style linear layer with a (fan_in, fan_out) weight.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency, this only guards odd installs
    Conv1D = None  # type: ignore[assignment,misc]

PRESETS: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    # DINOv2 (transformers 5 names): attention projections and the MLP; not the patch embedding (a Conv2d).
    "dinov2": ["q_proj", "k_proj", "v_proj", "o_proj", "mlp.fc1", "mlp.fc2"],
    # Whisper: self-attention of encoder and decoder, the decoder's cross-attention, and the MLPs; not the
    # convolutions of the audio stem, the embeddings or the output projection (tied to the token embeddings).
    "whisper": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "all-linear": [],  # every nn.Linear / Conv1D but the output head; resolved against the model
}

LINEAR_TYPES: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())
ADAPTABLE_TYPES: tuple[type, ...] = LINEAR_TYPES + (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def matches(pattern: str, name: str) -> bool:
    """Whether module `name` matches `pattern` (see the module docstring for the syntax)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def first_match(name: str, patterns: Iterable[str]) -> str | None:
    """The first pattern that matches `name`, or None."""
    return next((p for p in patterns if matches(p, name)), None)


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, ADAPTABLE_TYPES)


# Task heads of transformers' models; `all-linear` adapts the backbone, and a head is trained in full
# (modules_to_save) when it is new.
HEAD_NAMES = {"lm_head", "classifier", "score", "qa_outputs"}


def output_head_names(model: nn.Module, modules: dict[str, nn.Module] | None = None) -> set[str]:
    """Names of the model's output projection (`lm_head`) and task heads (`classifier`, `score`, `qa_outputs`),
    which `all-linear` skips. `modules`: `dict(model.named_modules())` where the caller has it."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    out = set()
    for name, module in (modules if modules is not None else dict(model.named_modules())).items():
        parts = name.split(".")
        if (head is not None and module is head) or parts[0] in HEAD_NAMES or parts[-1] in HEAD_NAMES:
            out.add(name)
    return out


def shared_weight_owners(model: nn.Module, modules: dict[str, nn.Module] | None = None) -> dict[str, list[str]]:
    """Module name -> other modules holding the same `weight` Parameter (tied embeddings)."""
    owners: dict[int, list[str]] = {}
    for name, module in (modules if modules is not None else dict(model.named_modules())).items():
        weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if weight is not None:
            owners.setdefault(id(weight), []).append(name)
    return {n: [o for o in names if o != n] for names in owners.values() if len(names) > 1 for n in names}


@dataclass(frozen=True)
class Selection:
    """The outcome of matching: module names, in the model's order."""

    adapted: list[str]  # the names of the modules that get LoRA factors
    modules_to_save: list[str]


def select_modules(model: nn.Module, targets: list[str], exclude: list[str], modules_to_save: list[str], *,
                   modules: dict[str, nn.Module] | None = None) -> Selection:
    """Resolve patterns against `model`. Every problem is collected and raised at once as a `ConfigError`.

    modules: `dict(model.named_modules())` where the caller has already walked the model.
    """
    if modules is None:
        modules = dict(model.named_modules())
    names = [n for n in modules if n]
    factors = factor_names(modules)
    adaptable = [n for n in names if is_adaptable(modules[n]) and n not in factors]
    problems: list[str] = []
    chosen: set[str] = set()
    expanded = _expand_presets(model, modules, targets, adaptable)
    for pattern in expanded:
        hits = [n for n in names if matches(pattern, n)]
        good = [n for n in hits if is_adaptable(modules[n]) and n not in factors]
        if not hits:
            problems.append(_no_match_message(pattern, names, adaptable))
        elif not good and all(n in factors for n in hits):
            problems.append(f"target {pattern!r} matches only factors of factorised layers "
                            f"({', '.join(hits[:3])}{', ...' if len(hits) > 3 else ''}), which lorakit neither adapts "
                            "nor factorises again; target layers left dense, or train the factors themselves "
                            "(run.method=factors)")
        elif not good:
            kinds = sorted({type(modules[n]).__name__ for n in hits})
            problems.append(
                f"target {pattern!r} matches only modules lorakit cannot adapt ({', '.join(kinds)}); "
                f"adaptable kinds: Linear, Conv1D, Embedding, Conv1d, Conv2d, Conv3d"
            )
        chosen.update(good)
    for pattern in exclude:
        hits = [n for n in names if matches(pattern, n)]
        if not hits:
            problems.append("exclude " + _no_match_message(pattern, names, adaptable).removeprefix("target "))
        chosen.difference_update(hits)
    saved: list[str] = []
    for pattern in modules_to_save:
        hits = [n for n in names if matches(pattern, n)]
        if not hits:
            problems.append("modules_to_save " + _no_match_message(pattern, names, adaptable).removeprefix("target "))
        saved += [n for n in hits if n not in saved]
    ordered = [n for n in names if n in chosen]
    if not ordered and not problems:
        problems.append(f"targets {targets!r} minus exclude {exclude!r} leave no module to adapt")
    problems += _structural_problems(model, modules, ordered, saved)
    if problems:
        raise ConfigError(problems)
    return Selection(ordered, saved)


def factor_names(modules: dict[str, nn.Module]) -> set[str]:
    """The `down` and `up` factors of the model's factorised layers (`LowRankLinear`): linear layers LoRA leaves
    alone (`all-linear` skips them), as the pair stands for one weight U·Vᵀ."""
    return {f"{n}.{child}" if n else child for n, m in modules.items() if isinstance(m, LowRankLinear)
            for child in ("down", "up")}


def _expand_presets(model: nn.Module, modules: dict[str, nn.Module], targets: list[str], adaptable: list[str]
                    ) -> list[str]:
    out: list[str] = []
    heads = output_head_names(model, modules)
    for pattern in targets:
        if pattern == "all-linear":
            out += [n for n in adaptable if isinstance(modules[n], LINEAR_TYPES) and n not in heads]
        elif pattern in PRESETS:
            out += PRESETS[pattern]
        else:
            out.append(pattern)
    return out


def _no_match_message(pattern: str, names: list[str], adaptable: list[str]) -> str:
    last_parts = {n.rsplit(".", 1)[-1] for n in names}
    hint = did_you_mean(pattern.rsplit(".", 1)[-1], list(last_parts) + list(PRESETS))
    available = sorted({n.rsplit(".", 1)[-1] for n in adaptable})
    return (f"target {pattern!r} matches no module{hint} (adaptable module names: {', '.join(available)}; "
            f"presets: {', '.join(PRESETS)})")


def _structural_problems(model: nn.Module, modules: dict[str, nn.Module], targets: list[str],
                         saved: list[str]) -> list[str]:
    problems: list[str] = []
    shared = shared_weight_owners(model, modules)
    for name in targets + saved:
        if name in shared:
            problems.append(
                f"{name!r} shares its weight with {', '.join(repr(o) for o in shared[name])} (tied embeddings); "
                "adapting or training it would change the other too. Exclude it, or untie the weights first "
                "(config.tie_word_embeddings=False and a copied output weight)"
            )
    for name in targets:
        module = modules[name]
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.padding_mode != "zeros":
            problems.append(f"{name!r}: LoRA supports convolutions with zero padding only (padding_mode "
                            f"{module.padding_mode!r})")
        if isinstance(module, nn.Embedding) and module.max_norm is not None:
            problems.append(f"{name!r}: LoRA does not support embeddings with max_norm (they renormalise W in place)")
        inside = [s for s in saved if name == s or name.startswith(s + ".")]
        if inside:
            problems.append(f"{name!r} is both a LoRA target and inside modules_to_save {inside[0]!r}; choose one")
    return problems
