"""`LoraConfig`: the one place where LoRA defaults live.

YAML files, adapter files and CLI flags only override these fields. Validation reports every problem at once.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from lorakit.errors import ConfigError, did_you_mean

INIT_METHODS = ("standard", "gaussian", "principal")
BIAS_MODES = ("none", "lora_only", "all")


@dataclass
class LoraConfig:
    """What to adapt and how.

    rank, alpha: ΔW = (alpha / rank) · B·A (Hu et al. 2021, §4.1); with `rslora=True` the scaling is
    alpha / sqrt(rank) (Kalajdzievski 2023), which keeps the update's size stable as the rank grows.
    targets: bare module names (`q_proj`, matched against the last component of a module's name), dotted
        suffixes (`attention.output.dense`), globs over the full dotted name (`model.layers.*.mlp.*`),
        regular expressions (`re:...`, full match) or one preset name (`llama`, `bert`, `gpt2`, `all-linear`).
    exclude: patterns, same syntax, removed from the targets.
    init: `standard` (A Kaiming-uniform, B zero, so ΔW starts at zero), `gaussian` (A ~ N(0, 1/rank), B zero)
        or `principal` (PiSSA, Meng et al. 2024: A and B from the top-r singular triplets of W, the residual
        frozen).
    svd_iters: for `principal`: None for the exact SVD, or the number of power iterations of a randomized SVD
        (Halko et al. 2011) on a sketch of `rank` columns, PEFT's `pissa_niter_<svd_iters>`: >10x faster on
        SmolLM2, within 2% of the exact residual there at 4 iterations (see `lorakit.init.OVERSAMPLE`).
    dropout: dropout on the adapter's input (the base path is untouched), in [0, 1).
    bias: which biases train: `none`, `lora_only` (those of adapted modules) or `all` (every module's own bias).
    rslora: scale by alpha / sqrt(rank) instead of alpha / rank (see rank, alpha).
    dora: DoRA (Liu et al. 2024, PEFT's `use_dora`): a trained magnitude per output feature rescales W + s·B·A,
        W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖ (see `lorakit.dora`); on linear and convolution layers, not embeddings.
    rank_pattern / alpha_pattern: per-module overrides, pattern -> value; the first matching pattern wins. In a
        training config `rank_pattern` may also be the path of a YAML file mapping module names to a rank or to
        `{rank: R, alpha: A}` (the alpha joins alpha_pattern after the config's own entries); `lorakit allocate`
        writes one from a probe of the model, under a parameter budget.
    modules_to_save: modules trained in full and saved with the adapter (e.g. a new classifier head).
    seed: seeds the adapter's initial weights when set; null: the global torch RNG.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["all-linear"])
    exclude: list[str] = field(default_factory=list)
    init: str = "standard"
    svd_iters: int | None = None
    dropout: float = 0.0
    bias: str = "none"
    rslora: bool = False
    dora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    def problems(self) -> list[str]:
        """Every problem with this config, as messages that name the field and the allowed values."""
        out: list[str] = []
        out += _check_rank("rank", self.rank)
        out += _check_alpha("alpha", self.alpha)
        for key, value in self.rank_pattern.items():
            out += _check_rank(f"rank_pattern[{key!r}]", value)
        for key, alpha in self.alpha_pattern.items():
            out += _check_alpha(f"alpha_pattern[{key!r}]", alpha)
        if not _is_number(self.dropout) or not 0.0 <= float(self.dropout) < 1.0:
            out.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INIT_METHODS:
            out.append(f"init must be one of {', '.join(INIT_METHODS)}, got {self.init!r}"
                       f"{did_you_mean(str(self.init), INIT_METHODS)}")
        if self.bias not in BIAS_MODES:
            out.append(f"bias must be one of {', '.join(BIAS_MODES)}, got {self.bias!r}")
        if self.svd_iters is not None and (type(self.svd_iters) is not int or self.svd_iters < 0):
            out.append(f"svd_iters must be None (exact SVD) or an int >= 0, got {self.svd_iters!r}")
        if self.svd_iters is not None and self.init != "principal":
            out.append(f"svd_iters applies only to init='principal', got init={self.init!r}")
        for name in ("targets", "exclude", "modules_to_save"):
            value = getattr(self, name)
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                out.append(f"{name} must be a list of non-empty strings, got {value!r}")
        if not self.targets:
            out.append("targets must name at least one module pattern or preset")
        if not isinstance(self.rslora, bool):
            out.append(f"rslora must be true or false, got {self.rslora!r}")
        if not isinstance(self.dora, bool):
            out.append(f"dora must be true or false, got {self.dora!r}")
        return out

    def rank_for(self, module_name: str) -> int:
        from lorakit.targets import first_match

        key = first_match(module_name, self.rank_pattern)
        return self.rank if key is None else int(self.rank_pattern[key])

    def alpha_for(self, module_name: str) -> float:
        from lorakit.targets import first_match

        key = first_match(module_name, self.alpha_pattern)
        return self.alpha if key is None else float(self.alpha_pattern[key])

    def scaling_for(self, module_name: str) -> float:
        rank, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraConfig:
        """Build from a mapping; unknown keys are an error naming each key and the known ones."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in data if k not in known]
        if unknown:
            raise ConfigError(
                [f"unknown LoRA config key {k!r}{did_you_mean(k, known)}; known keys: {', '.join(known)}"
                 for k in unknown]
            )
        return cls(**data)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_rank(name: str, value: object) -> list[str]:
    if type(value) is not int or value <= 0:
        return [f"{name} must be a positive int, got {value!r}"]
    return []


def _check_alpha(name: str, value: object) -> list[str]:
    if not _is_number(value) or not math.isfinite(float(value)) or float(value) <= 0:  # type: ignore[arg-type]
        return [f"{name} must be a positive number, got {value!r}"]
    return []
