"""An adapter's updates in factor form: ΔW = left · right for every adapted linear module, read from its files.

A plain LoRA module holds A (r, in) and B (out, r) with ΔW = s · B A, s = alpha / r (alpha / sqrt(r) with rsLoRA;
Hu et al. 2021 §4.1, `LoraConfig.scaling_for`). A principal (PiSSA) adapter was trained on the residual
W - s·B₀A₀, so its update relative to the original W is s·(B A - B₀A₀) = [s·B, -s·B₀] · [A; A₀] (Meng et al. 2024
§3.4): still a product of two thin factors, of rank 2r. Nothing here forms a dense ΔW.

Only linear-like modules (2-D factors: `nn.Linear`, GPT-2's `Conv1D`) are analysed; embeddings and convolutions
are listed as skipped with the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from lorakit.config import LoraConfig
from lorakit.dora import refuse_dora_adapter
from lorakit.errors import LorakitError
from lorakit.io import PRINCIPAL_NAME, read_adapter
from lorakit.peft_format import CONFIG_NAME, config_from_peft, from_peft_key

_LAYER = re.compile(r"\.(\d+)\.")


@dataclass
class ModuleFactors:
    """One module's trained factors: A (r, in), B (out, r), the scaling s, and for a principal adapter its initial
    factors A₀ (r, in), B₀ (out, r), which the update is measured from (None until known)."""

    name: str
    a: Tensor
    b: Tensor
    scaling: float
    a0: Tensor | None = None
    b0: Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in): the shape of ΔW in the `nn.Linear` layout."""
        return int(self.b.shape[0]), int(self.a.shape[1])

    def update(self) -> tuple[Tensor, Tensor]:
        """(left (out, k), right (k, in)) in float64 with ΔW = left @ right; k = r, or 2r for a principal adapter."""
        left, right = self.scaling * self.b.double(), self.a.double()
        if self.a0 is not None and self.b0 is not None:
            left = torch.cat([left, -self.scaling * self.b0.double()], dim=1)  # (out, 2r)
            right = torch.cat([right, self.a0.double()], dim=0)  # (2r, in)
        return left, right


@dataclass
class AdapterFactors:
    """Everything the analysis reads from an adapter directory."""

    path: Path
    config: LoraConfig
    base: str | None  # the base model it records
    task_type: str | None  # PEFT's task_type (CAUSAL_LM, SEQ_CLS, ...)
    modules: dict[str, ModuleFactors]
    skipped: dict[str, str] = field(default_factory=dict)  # module -> why it is not analysed
    principal_missing: bool = False  # a principal adapter saved without its initial factors


def module_kind_and_layer(name: str) -> tuple[str, int | None]:
    """(`self_attn.q_proj`, 12) for `model.layers.12.self_attn.q_proj`: the path after the last layer index and
    that index; (name, None) for a module outside numbered layers. The path, not the last word, is the kind, so
    GPT-2's `attn.c_proj` and `mlp.c_proj` stay apart."""
    matches = list(_LAYER.finditer(name))
    if not matches:
        return name, None
    last = matches[-1]
    return name[last.end():], int(last.group(1))


def read_factors(path: str | Path) -> AdapterFactors:
    """Read the factors of every adapted module of the adapter directory `path` (lorakit's or PEFT's).

    Raises LorakitError, naming the path, for a file or a directory that is not an adapter, a damaged adapter, or
    one whose factors disagree in rank.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LorakitError(f"{str(path)!r} is a file, not an adapter directory; pass the directory that holds "
                           f"{CONFIG_NAME} and the adapter's weights")
    raw_config, tensors, metadata = read_adapter(path)
    config = config_from_peft(raw_config, str(path / CONFIG_NAME))
    refuse_dora_adapter(config.dora, f"adapter {str(path)!r}", "the analysis of ΔW = s·B A")
    found = {from_peft_key(k): t for k, t in tensors.items()}
    modules: dict[str, ModuleFactors] = {}
    skipped: dict[str, str] = {}
    for key in sorted(found):
        if key.endswith(".lora_embedding_A"):
            skipped[key.removesuffix(".lora_embedding_A")] = "an embedding (only linear modules are analysed)"
        if not key.endswith(".lora_A.weight"):
            continue
        name = key.removesuffix(".lora_A.weight")
        a, b = found[key], found.get(f"{name}.lora_B.weight")
        if b is None:
            raise LorakitError(f"{path}: module {name!r} has a lora_A factor but no lora_B; re-save the adapter")
        if a.dim() != 2:
            skipped[name] = f"a convolution ({a.dim()}-D factors; only linear modules are analysed)"
            continue
        if b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise LorakitError(f"{path}: module {name!r} has factors of different ranks (A {tuple(a.shape)}, "
                               f"B {tuple(b.shape)}); the adapter is inconsistent: re-save it")
        modules[name] = ModuleFactors(name, a.float(), b.float(), config.scaling_for(name))
    if not modules:
        what = f"only {', '.join(sorted(skipped))} (not linear)" if skipped else "no LoRA factors"
        raise LorakitError(f"adapter {str(path)!r} holds {what}; nothing to analyse")
    factors = AdapterFactors(path, config, raw_config.get("base_model_name_or_path")
                             or metadata.get("lorakit_base_model") or None, raw_config.get("task_type"),
                             modules, skipped)
    if config.init == "principal":
        _attach_principal(factors)
    return factors


def _attach_principal(factors: AdapterFactors) -> None:
    file = factors.path / PRINCIPAL_NAME
    if not file.is_file():
        factors.principal_missing = True  # the analysis recomputes A₀, B₀ from the base's W
        return
    try:
        init = load_file(file)
    except Exception as e:  # safetensors raises its own error type for every kind of damage
        raise LorakitError(f"{file} is truncated or corrupted ({type(e).__name__}: {e}); re-save the adapter") from None
    for name, module in factors.modules.items():
        a0, b0 = init.get(f"{name}.A"), init.get(f"{name}.B")
        if a0 is None or b0 is None or a0.shape != module.a.shape or b0.shape != module.b.shape:
            raise LorakitError(f"{file} lacks the initial factors of {name!r} (or they do not match its shape); "
                               "re-save the adapter")
        module.a0, module.b0 = a0.float(), b0.float()


def check_comparable(first: AdapterFactors, second: AdapterFactors) -> list[str]:
    """The modules two adapters both adapt, in order; raises LorakitError when they were trained on different
    bases (recorded names, or a shared module whose shape differs) or share no analysable module."""
    if first.base and second.base and first.base != second.base:
        raise LorakitError(f"{str(first.path)!r} was trained on {first.base!r} and {str(second.path)!r} on "
                           f"{second.base!r}; subspaces of different base models cannot be compared: pass two "
                           "adapters of the same base")
    common = [n for n in first.modules if n in second.modules]
    if not common:
        raise LorakitError(f"{str(first.path)!r} and {str(second.path)!r} adapt no linear module in common "
                           f"({_few(first.modules)} against {_few(second.modules)}); compare adapters with the same "
                           "targets")
    for name in common:
        if first.modules[name].shape != second.modules[name].shape:
            raise LorakitError(f"module {name!r} is {first.modules[name].shape} in {str(first.path)!r} but "
                               f"{second.modules[name].shape} in {str(second.path)!r}: the adapters were trained on "
                               "different base models; pass two adapters of the same base")
    return common


def _few(names: dict[str, ModuleFactors], n: int = 2) -> str:
    shown = sorted(names)[:n]
    return ", ".join(shown) + (f" and {len(names) - n} more" if len(names) > n else "")
