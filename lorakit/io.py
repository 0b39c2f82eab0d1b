"""Adapter files in PEFT's on-disk layout: `adapter_config.json` + `adapter_model.safetensors`.

Keys are PEFT's (`base_model.model.<module>.lora_A.weight`, `...lora_embedding_A`, `...base_layer.bias`, saved
modules under their own names), so `peft.PeftModel.from_pretrained` loads a lorakit adapter and `load_adapter`
loads a PEFT LoRA adapter. lorakit's own facts (base fingerprint, checksum, version) travel in the safetensors
header's metadata, which PEFT ignores. A principal (PiSSA) adapter also stores its initial factors in
`principal_init.safetensors`, from which the residual base is rebuilt on load without an SVD.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from lorakit import quant
from lorakit.config import LoraConfig
from lorakit.errors import ConfigError, LorakitError
from lorakit.factorized import factorized_layout
from lorakit.fileio import atomic_write_dir
from lorakit.inject import (
    BuiltAdapter,
    InjectionReport,
    adapter_parameters,
    adapter_state,
    build_adapter,
    initial_factors,
    inject,
    injection_report,
    subtract_principal,
)
from lorakit.layers import LoraModule, lora_modules, lorakit_layout, peft_layout
from lorakit.peft_format import CONFIG_NAME, config_from_peft, from_peft_key, peft_config, to_peft_key

log = logging.getLogger(__name__)

WEIGHTS_NAME = "adapter_model.safetensors"
PRINCIPAL_NAME = "principal_init.safetensors"
TASK_NAME = "task.json"  # the training task's state (labels, max_length...), written beside a trained adapter
FORMAT_VERSION = "1"
# The header field naming the factorised layout of the base an adapter was trained on (`factorized_layout`); absent
# for an adapter of a plain model.
FACTORIZATION_KEY = "lorakit_factorization"
QUANTIZATION_KEY = "lorakit_quantization"  # the base's quantization (nf4, int8) when the adapter was trained on one

def fingerprint(model: nn.Module, targets: list[str]) -> str:
    """A short hash of the target modules' names and base weight shapes: what an adapter must fit."""
    modules = dict(model.named_modules())
    text = "\n".join(f"{n}:{_logical_shape(modules[n].weight)}" for n in sorted(targets))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _logical_shape(weight: Tensor) -> tuple[int, ...]:
    """The shape a weight stands for: a quantized base's matrix shape, so an adapter fits the dense and the
    quantized forms of one base alike."""
    return quant.shape(weight) if quant.is_quantized(weight) else tuple(weight.shape)


def adapter_checksum(tensors: dict[str, Tensor]) -> str:
    """SHA-256 over the tensors' names and bytes in name order: the `lorakit_checksum` an adapter file's header
    holds, checked on every read."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------- saving


def save_adapter(model: nn.Module, path: str | Path, *, convert_principal: bool = False,
                 base_model: str | None = None) -> Path:
    """Write the model's adapter to directory `path` atomically and return the path.

    convert_principal: for a principal-initialised adapter, save instead the plain LoRA adapter of rank 2r whose
        ΔW applies to the *original* W (PiSSA §3.4: ΔW = s·(B A - B₀ A₀) = s·[B, -B₀]·[A; A₀]).
    base_model: recorded as `base_model_name_or_path`; defaults to the model's own name or path.
    """
    state = adapter_state(model)
    config = state.config
    targets = set(state.adapted)
    params = {k: p.detach().cpu().clone().contiguous() for k, p in adapter_parameters(model).items()}
    tensors = {to_peft_key(k, targets): v for k, v in peft_layout(dict(lora_modules(model)), params).items()}
    if convert_principal:
        if config.init != "principal":
            raise LorakitError(f"convert_principal applies to init 'principal' adapters; this one is {config.init!r}")
        tensors.update(_principal_as_plain_lora(model))
    base = base_model or getattr(getattr(model, "config", None), "_name_or_path", None) or None
    metadata = {
        "format": "pt",
        "lorakit_format": FORMAT_VERSION,
        "lorakit_fingerprint": fingerprint(model, state.adapted),
        "lorakit_base_model": str(base or ""),
        "lorakit_checksum": adapter_checksum(tensors),
    }
    layout = factorized_layout(model)
    if layout:
        metadata[FACTORIZATION_KEY] = layout
    kind = quant.model_quantization(model)
    if kind:  # informational: the adapter loads on the dense or the quantized base alike
        metadata[QUANTIZATION_KEY] = kind
    peft_json = peft_config(model, config, base, doubled=convert_principal)
    principal = None
    if config.init == "principal" and not convert_principal:
        principal = {f"{n}.A": a.contiguous() for n, (a, _) in state.principal_init.items()}
        principal |= {f"{n}.B": b.contiguous() for n, (_, b) in state.principal_init.items()}

    def fill(tmp: Path) -> None:
        (tmp / WEIGHTS_NAME).write_bytes(save_safetensors(tensors, metadata=metadata))
        (tmp / CONFIG_NAME).write_text(json.dumps(peft_json, indent=2, sort_keys=True) + "\n")
        if principal:
            (tmp / PRINCIPAL_NAME).write_bytes(save_safetensors(principal, metadata={"format": "pt"}))

    atomic_write_dir(path, fill)
    return Path(path)


def _principal_as_plain_lora(model: nn.Module) -> dict[str, Tensor]:
    state = adapter_state(model)
    out = {}
    for name, module in lora_modules(model):
        a0, b0 = state.principal_init[name]
        a, b = module.factors()
        a_param, b_param = module.lora_parameters()[:2]  # a DoRA magnitude carries over unchanged
        wide_a = torch.cat([a.detach().float(), a0], dim=0)  # (2r, fan_in)
        wide_b = torch.cat([b.detach().float(), -b0], dim=1)  # (fan_out, 2r)
        ka = to_peft_key(_param_key(name, module, a_param), set())
        kb = to_peft_key(_param_key(name, module, b_param), set())
        out[ka] = wide_a.view(2 * a.shape[0], *a_param.shape[1:]).to(a_param.dtype).contiguous()
        out[kb] = wide_b.view(b_param.shape[0], 2 * a.shape[0], *b_param.shape[2:]).to(b_param.dtype).contiguous()
    return out


def _param_key(name: str, module: LoraModule | nn.Module, param: nn.Parameter) -> str:
    return next(f"{name}.{k}" for k, p in cast(nn.Module, module).named_parameters() if p is param)


# ---------------------------------------------------------------------------------------------- loading


def read_adapter(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, str]]:
    """(config json, tensors, header metadata) of an adapter directory, with errors that name the file."""
    path = Path(path)
    if not path.is_dir():
        raise LorakitError(f"adapter directory {str(path)!r} does not exist")
    config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    for p in (config_path, weights_path):
        if not p.is_file():
            raise LorakitError(f"{p} is missing; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LorakitError(f"{config_path} is not valid JSON ({e}); re-save the adapter") from None
    if not isinstance(config, dict):
        raise LorakitError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
    tensors, metadata = _read_safetensors(weights_path)
    if "lorakit_checksum" in metadata and adapter_checksum(tensors) != metadata["lorakit_checksum"]:
        raise LorakitError(f"{weights_path} is corrupted (checksum mismatch); re-save or re-copy the adapter")
    broken = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if broken:
        raise LorakitError(f"{weights_path} holds NaN or infinite values in {len(broken)} tensor(s) (first: "
                           f"{broken[0]!r}); the run that wrote it diverged: retrain with a lower optim.lr")
    return config, tensors, metadata


def read_task_state(directory: str | Path) -> dict[str, Any] | None:
    """The training task's state saved beside an adapter or a fully fine-tuned model (`task.json`), or None when
    there is none. Raises LorakitError naming the file when it is not a JSON object with a task name."""
    path = Path(directory) / TASK_NAME
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LorakitError(f"{path} is not valid JSON ({e}); restore it from the run's checkpoint or delete it "
                           "to use the adapter without its task") from None
    if not isinstance(state, dict) or not isinstance(state.get("task"), str):
        raise LorakitError(f"{path} must be a JSON object with a \"task\" name (as lorakit writes it); restore it "
                           "from the run or delete it")
    labels = state.get("labels")
    if labels is not None and (not isinstance(labels, list) or not all(isinstance(x, str) for x in labels)
                               or len(set(labels)) != len(labels)):
        raise LorakitError(f"{path}: \"labels\" must be a list of distinct strings, got {labels!r}")
    return state


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    data = path.read_bytes()
    try:
        tensors = load_safetensors(data)
        header_len = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
    except Exception as e:  # safetensors raises its own error type for every kind of damage
        raise LorakitError(f"{path} is truncated or corrupted ({type(e).__name__}: {e}); re-save the adapter") from None
    return tensors, metadata


def load_adapter(model: nn.Module, path: str | Path, *, allow_base_mismatch: bool = False) -> InjectionReport:
    """Inject the adapter saved at `path` into the (unadapted) base `model` and load its weights.

    Strict: keys missing from the file, keys the model does not expect and shape mismatches are all reported in
    one error, as is a base whose target names and shapes differ from the ones the adapter was saved on, or (for an
    adapter trained on a factorised model) whose factorised layers differ from its base's (override either with
    `allow_base_mismatch=True`). Nothing is changed unless everything fits.
    """
    raw_config, tensors, metadata = read_adapter(path)
    if not allow_base_mismatch:
        _check_factorization(model, metadata, path)
    config = config_from_peft(raw_config, str(Path(path) / CONFIG_NAME))
    built = _build_for(model, config, metadata, path)
    selection, modules = built.selection, built.modules
    found = lorakit_layout(built.lora, {from_peft_key(k): v for k, v in tensors.items()})
    # PEFT saves the whole table of an adapted embedding by default (`save_embedding_layers`, for resized
    # vocabularies); the key is optional and, as in PEFT, the saved table replaces the base's on load.
    tables = {f"{n}.weight": cast(nn.Parameter, modules[n].weight) for n in selection.adapted
              if isinstance(modules[n], nn.Embedding) and f"{n}.weight" in found}
    saved_print = metadata.get("lorakit_fingerprint")
    other_base = bool(saved_print) and saved_print != fingerprint(model, selection.adapted)
    if other_base and metadata.get("lorakit_base_model") and not allow_base_mismatch:
        raise LorakitError(f"{_wrong_base(model, metadata, path)} (the adapted layers' shapes differ); pass "
                           "allow_base_mismatch=True to load it anyway")
    _check_fit(path, found, {k: tuple(p.shape) for k, p in (built.parameters() | tables).items()})
    if other_base and not allow_base_mismatch:
        raise LorakitError(f"adapter {str(path)!r} was saved on another base whose adapted layers differ from this "
                           "model's; pass allow_base_mismatch=True to load it anyway")
    principal = _read_principal(Path(path), selection.adapted) if config.init == "principal" else None
    inject(model, config, initialize=False, built=built)
    params = adapter_parameters(model) | {k: model.get_parameter(k) for k in tables}
    with torch.no_grad():
        for key, value in found.items():
            params[key].copy_(value.to(params[key].dtype))
    if config.init == "principal":
        _rebuild_residual(model, config, principal)
    return injection_report(model)


def _build_for(model: nn.Module, config: LoraConfig, metadata: dict[str, str], path: str | Path) -> BuiltAdapter:
    """The adapter's modules built on `model`; an adapter whose targets are absent from this model is named as
    made for another base in one line, not as a list of every pattern that matched nothing."""
    try:
        return build_adapter(model, config)
    except ConfigError as e:
        if metadata.get("lorakit_base_model"):
            raise LorakitError(_wrong_base(model, metadata, path)) from None
        raise LorakitError(f"adapter {str(path)!r} does not fit this model: {_first(e.problems)}") from None


def _check_factorization(model: nn.Module, metadata: dict[str, str], path: str | Path) -> None:
    """Refuse an adapter trained on a factorised base for a model whose factorised layers (names and ranks) differ,
    a dense model above all: its target layers may have the same shapes, so nothing else would notice."""
    saved = metadata.get(FACTORIZATION_KEY)
    this = factorized_layout(model)
    if not saved or saved == this:
        return
    what = "a dense model" if not this else f"factorised differently (layout {this})"
    base = metadata.get("lorakit_base_model") or "the factorised model it was trained on"
    raise LorakitError(f"adapter {str(path)!r} was trained on a factorised base (layout {saved}) and this model is "
                       f"{what}; load it on its own base ({base}), or pass allow_base_mismatch=True to load it anyway")


def _wrong_base(model: nn.Module, metadata: dict[str, str], path: str | Path) -> str:
    this = getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
    trained = metadata.get("lorakit_base_model") or "another model"
    return (f"adapter {str(path)!r} was trained on {trained!r}, this model is {this!r}; load it on its own base "
            f"(--model {trained})")


def _check_fit(path: str | Path, found: dict[str, Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    """File tensors against the parameters the built modules own: every missing, unexpected or mis-shaped key."""
    problems = [f"missing key {k!r} (shape {tuple(s)})" for k, s in expected.items() if k not in found]
    problems += [f"unexpected key {k!r}" for k in found if k not in expected]
    problems += [f"shape mismatch for {k!r}: file {tuple(found[k].shape)}, model {tuple(s)}"
                 for k, s in expected.items() if k in found and tuple(found[k].shape) != tuple(s)]
    if problems:
        raise LorakitError(f"adapter {str(path)!r} does not fit this model: {_first(problems, 10)}")


def _first(problems: list[str], n: int = 3) -> str:
    """At most `n` problems, and how many more there are: one readable line, not one line per module."""
    more = f"; and {len(problems) - n} more" if len(problems) > n else ""
    return "; ".join(problems[:n]) + more


def _read_principal(path: Path, targets: list[str]) -> dict[str, tuple[Tensor, Tensor]] | None:
    file = path / PRINCIPAL_NAME
    if not file.is_file():
        return None
    tensors, _ = _read_safetensors(file)
    missing = [n for n in targets if f"{n}.A" not in tensors or f"{n}.B" not in tensors]
    if missing:
        raise LorakitError(f"{file} lacks the initial factors of {', '.join(missing)}; re-save the adapter")
    return {n: (tensors[f"{n}.A"].float(), tensors[f"{n}.B"].float()) for n in targets}


def _rebuild_residual(model: nn.Module, config: LoraConfig, principal: dict[str, tuple[Tensor, Tensor]] | None
                      ) -> None:
    """Turn the original W of each target into the residual W - s·B₀A₀ the principal adapter was trained on."""
    state = adapter_state(model)
    if principal is None:
        log.warning("no %s: recomputing the principal init by SVD to rebuild the residual base", PRINCIPAL_NAME)
    generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
    for name, module in lora_modules(model):
        # Without the file: the exact SVD gives the same factors as `inject` did; a randomized SVD draws a new
        # sketch (adapter files keep no seed), so its factors are close to the trained ones, not equal.
        a0, b0 = principal[name] if principal is not None else initial_factors(module, config, generator)
        subtract_principal(module, a0, b0)
        state.principal_init[name] = (a0, b0)


def load_adapter_weights(model: nn.Module, path: str | Path) -> None:
    """Copy the weights of the adapter at `path` into a model that already carries the same adapter (resuming a
    run). Strict: the file's keys and shapes must equal the model's adapter parameters."""
    _, tensors, _ = read_adapter(path)
    found = lorakit_layout(dict(lora_modules(model)), {from_peft_key(k): v for k, v in tensors.items()})
    params = adapter_parameters(model)
    _check_fit(path, found, {k: tuple(p.shape) for k, p in params.items()})
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(found[key].to(param.dtype))


def inspect_adapter(path: str | Path) -> dict[str, Any]:
    """A summary of an adapter directory: base, targets, ranks, parameter count and sizes.

    The ranks are read from the factors themselves; an `adapter_config.json` whose `r` (or `rank_pattern`) says
    otherwise is an inconsistent adapter and raises LorakitError naming the first disagreeing module.
    """
    raw_config, tensors, metadata = read_adapter(path)
    config = config_from_peft(raw_config)
    ranks = factor_ranks(tensors)
    for module, rank in ranks.items():
        if rank != config.rank_for(module):
            raise LorakitError(f"{Path(path) / WEIGHTS_NAME} holds rank-{rank} factors for {module!r} but "
                               f"{CONFIG_NAME} says rank {config.rank_for(module)}; the adapter is inconsistent: "
                               "re-save it")
    files = [p for p in Path(path).iterdir() if p.is_file()]
    counts = sorted(set(ranks.values()))
    return {
        "base_model": raw_config.get("base_model_name_or_path") or metadata.get("lorakit_base_model"),
        "fingerprint": metadata.get("lorakit_fingerprint"),
        "quantization": metadata.get(QUANTIZATION_KEY),
        "task_type": raw_config.get("task_type"),
        "rank": config.rank, "ranks": counts,
        "alpha": config.alpha, "init": config.init, "rslora": config.rslora, "dora": config.dora,
        "targets": len(ranks),
        "rank_overrides": len(config.rank_pattern),
        "modules_to_save": config.modules_to_save,
        "parameters": sum(t.numel() for t in tensors.values()),
        "bytes": sum(p.stat().st_size for p in files),
    }


def factor_ranks(tensors: dict[str, Tensor]) -> dict[str, int]:
    """The rank of each adapted module, read from its A factor's first dimension (PEFT or lorakit keys)."""
    ranks = {}
    for key, tensor in tensors.items():
        name = from_peft_key(key)
        for leaf in (".lora_A.weight", ".lora_embedding_A"):
            if name.endswith(leaf):
                ranks[name.removesuffix(leaf)] = int(tensor.shape[0])
    return ranks


def adapter_quantization(adapter: str | Path) -> str | None:
    """The quantization (nf4, int8) of the base an adapter was trained on, from its header; None if dense."""
    kind = read_adapter(adapter)[2].get(QUANTIZATION_KEY)
    return kind or None
