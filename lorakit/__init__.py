"""lorakit: low-rank adaptation (LoRA) of pretrained transformers.

    from lorakit import LoraConfig, inject, merge, save_adapter
    report = inject(model, LoraConfig(rank=16, alpha=32, targets=["llama"]))

    bank = AdapterBank.from_adapters(model, {"math": "adapters/math", "chat": "adapters/chat"})
    with per_row_adapters(model, bank, ["math", "chat", None]):  # one adapter per batch row, in one forward
        logits = model(input_ids=ids).logits
"""

from lorakit.active import ActiveAdapters, active_adapters
from lorakit.bank import AdapterBank, per_row_adapters
from lorakit.config import LoraConfig
from lorakit.errors import ConfigError, LorakitError, MergeStateError
from lorakit.inject import InjectionReport, adapter_parameters, inject
from lorakit.io import inspect_adapter, load_adapter, save_adapter
from lorakit.merge import adapters_disabled, delta_weight, is_merged, merge, merged_state_dict, set_strength, unmerge

__version__ = "0.1.0"

__all__ = [
    "ActiveAdapters", "AdapterBank", "ConfigError", "InjectionReport", "LoraConfig", "LorakitError",
    "MergeStateError", "active_adapters", "adapter_parameters", "adapters_disabled", "delta_weight", "inject",
    "inspect_adapter", "is_merged", "load_adapter", "load_for_inference", "load_model", "merge", "merge_adapter",
    "merged_state_dict", "per_row_adapters", "save_adapter", "set_strength", "unmerge",
]


def __getattr__(name: str):  # these pull in transformers' Auto classes; import them on first use
    if name == "load_model":
        from lorakit.models import load_model

        return load_model
    if name == "load_for_inference":
        from lorakit.inference import load_for_inference

        return load_for_inference
    if name == "merge_adapter":
        from lorakit.export import merge_adapter

        return merge_adapter
    raise AttributeError(f"module 'lorakit' has no attribute {name!r}")
