"""PEFT's LoRA format: its state-dict keys and its `adapter_config.json`, translated both ways.

Keys are PEFT's (`base_model.model.<module>.lora_A.weight`, `...lora_embedding_A`, `...base_layer.bias`, saved
modules under their own names); `adapter_config.json` holds exactly PEFT's LoraConfig keys (0.21), since PEFT warns
about unknown ones. Reading is strict: PEFT features lorakit does not implement are errors, all listed at once.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import ConfigError, did_you_mean
from lorakit.inject import adapter_state
from lorakit.layers import lora_modules

CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."

# Keys of PEFT's LoraConfig (0.21) that lorakit reads, and those it accepts only at their neutral value.
_PEFT_READ = {"r", "lora_alpha", "target_modules", "exclude_modules", "lora_dropout", "bias", "use_rslora",
              "rank_pattern", "alpha_pattern", "modules_to_save", "init_lora_weights", "fan_in_fan_out", "use_dora"}
_PEFT_NEUTRAL: dict[str, Any] = {
    "lora_bias": False, "layers_to_transform": None, "layers_pattern": None,
    "layer_replication": None, "target_parameters": None, "trainable_token_indices": None, "use_qalora": False,
    "alora_invocation_tokens": None, "use_bdlora": None, "megatron_config": None, "loftq_config": {},
    "eva_config": None, "corda_config": None, "arrow_config": None, "lora_ga_config": None, "kasa_config": None,
    "monteclora_config": None, "velora_config": None,
}
_PEFT_IGNORED = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
                 "peft_version", "megatron_core", "qalora_group_size", "ensure_weight_tying", "runtime_config"}


def to_peft_key(key: str, targets: set[str]) -> str:
    owner, _, leaf = key.rpartition(".")
    if leaf == "bias" and owner in targets:
        key = f"{owner}.base_layer.bias"  # PEFT keeps the adapted layer's own parameters under `base_layer`
    return PREFIX + key


def from_peft_key(key: str) -> str:
    return key.removeprefix(PREFIX).replace(".base_layer.", ".")


def peft_config(model: nn.Module, config: LoraConfig, base: str | None, *, doubled: bool) -> dict[str, Any]:
    state = adapter_state(model)
    modules = dict(lora_modules(model))
    factor = 2 if doubled else 1
    alpha_factor = (2 ** 0.5 if config.rslora else 2.0) if doubled else 1.0
    rank_pattern = {_exact(n): m.rank * factor for n, m in modules.items() if m.rank != config.rank}
    alpha_pattern = {_exact(n): m.alpha * alpha_factor for n, m in modules.items() if m.alpha != config.alpha}
    if config.init == "principal" and not doubled:
        init: Any = "pissa" if config.svd_iters is None else f"pissa_niter_{config.svd_iters}"
    else:
        init = "gaussian" if config.init == "gaussian" and not doubled else True
    return {
        "peft_type": "LORA",
        "task_type": _peft_task_type(model),
        "base_model_name_or_path": base,
        "r": config.rank * factor,
        "lora_alpha": config.alpha * alpha_factor,
        "target_modules": list(state.adapted),
        "exclude_modules": None,
        "lora_dropout": config.dropout,
        "bias": config.bias,
        "use_rslora": config.rslora,
        "use_dora": config.dora,
        "fan_in_fan_out": any(getattr(m, "fan_in_fan_out", False) for m in modules.values()),
        "modules_to_save": list(state.modules_to_save) or None,
        "init_lora_weights": init,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "inference_mode": True,
        **_PEFT_NEUTRAL,
    }


def _exact(name: str) -> str:
    """A PEFT pattern key that matches exactly module `name` (PEFT reads pattern keys as regular expressions)."""
    return name.replace(".", r"\.")


def _peft_task_type(model: nn.Module) -> str | None:
    cls = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                         ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS")):
        if cls.endswith(suffix):
            return task
    return None


def config_from_peft(data: dict[str, Any], source: str = CONFIG_NAME) -> LoraConfig:
    """Translate a PEFT LoRA `adapter_config.json` into a `LoraConfig`, strictly: unknown keys and PEFT features
    lorakit does not implement are errors, all listed at once."""
    problems = []
    known = _PEFT_READ | set(_PEFT_NEUTRAL) | _PEFT_IGNORED
    for key in data:
        if key not in known:
            problems.append(f"{source}: unknown key {key!r}{did_you_mean(key, known)}")
    if data.get("peft_type", "LORA") != "LORA":
        problems.append(f"{source}: peft_type {data.get('peft_type')!r} is not a LoRA adapter (expected 'LORA')")
    for key, neutral in _PEFT_NEUTRAL.items():
        if key in data and data[key] not in (neutral, None, {}, False):
            problems.append(f"{source}: {key}={data[key]!r} is a PEFT feature lorakit does not support")
    init_value = data.get("init_lora_weights", True)
    init, svd_iters = "standard", None
    if isinstance(init_value, str) and init_value.startswith("pissa"):
        init = "principal"
        if "_niter_" in init_value:
            svd_iters = int(init_value.rsplit("_", 1)[-1])
    elif init_value == "gaussian":
        init = "gaussian"
    elif init_value not in (True, False):
        problems.append(f"{source}: init_lora_weights={init_value!r} is not supported (use true, gaussian or pissa)")
    if problems:
        raise ConfigError(problems)

    def patterns(value: Any) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str):  # PEFT: a string is a regular expression, or the all-linear preset
            return [value] if value == "all-linear" else [f"re:{value}"]
        return list(value)

    def keyed(mapping: dict[str, Any] | None) -> dict[str, Any]:
        return {rf"re:(.*\.)?({k})": v for k, v in (mapping or {}).items()}  # PEFT's get_pattern_key semantics

    return LoraConfig(
        rank=data.get("r", 8), alpha=data.get("lora_alpha", 8), targets=patterns(data.get("target_modules")),
        exclude=patterns(data.get("exclude_modules")), init=init, svd_iters=svd_iters,
        dropout=data.get("lora_dropout", 0.0), bias=data.get("bias", "none"), rslora=data.get("use_rslora", False),
        dora=bool(data.get("use_dora") or False),
        rank_pattern=keyed(data.get("rank_pattern")), alpha_pattern=keyed(data.get("alpha_pattern")),
        modules_to_save=list(data.get("modules_to_save") or []),
    )
