"""Exporting a merged model: a plain transformers directory with ΔW folded into W and no lorakit keys.

    merge_adapter("runs/sst2/adapter", "exports/sst2-merged", dtype=torch.bfloat16)   # what `lorakit merge` does
    export_merged(model, "out", tokenizer)                                             # a model already in hand
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lorakit.errors import LorakitError
from lorakit.fileio import atomic_write_dir
from lorakit.merge import merged_state_dict
from lorakit.outputs import MARK_NAME, claim_output_dir

MERGED_KIND = "merged model"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def merge_adapter(adapter: str | Path, out_dir: str | Path, *, model: str | None = None, dtype: str = "float32",
                  force: bool = False) -> Path:
    """Load `adapter` on its base (or on `model`), merge it and write the merged model to `out_dir`, in `dtype`
    (float32, bfloat16 or float16; ΔW is added in fp32 and rounded once), with the tokenizer, the task's label
    names and a model card.

    `out_dir` must be new or empty, or an earlier merged model that `force` replaces; it may not be, contain or
    lie inside the adapter or the base model directory. Checked before the model loads; raises LorakitError.

    An adapter trained on a quantized base is refused: it needs a named merge path
    (`lorakit.quant_merge.merge_quantized_adapter`, `lorakit merge --merge-path`).
    """
    from lorakit.inference import load_for_inference
    from lorakit.io import adapter_quantization

    if dtype not in DTYPES:
        raise LorakitError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    kind = adapter_quantization(adapter)
    if kind is not None:
        raise LorakitError(f"{adapter} was trained on a {kind} base; name the merge path with --merge-path "
                           "(dequantized | requantized | original; see docs/quantization.md)")
    inputs = [adapter] + ([model] if model else [])
    claim_output_dir(out_dir, kind=MERGED_KIND, force=force, inputs=inputs)
    loaded = load_for_inference(model, adapter)
    card = model_card(loaded.base, Path(adapter), loaded.task_state, dtype, loaded.model)
    return export_merged(loaded.model, out_dir, loaded.tokenizer, dtype=DTYPES[dtype], card=card)


def export_merged(model: nn.Module, out_dir: str | Path, tokenizer: PreTrainedTokenizerBase | None = None, *,
                  dtype: torch.dtype | None = None, card: str | None = None) -> Path:
    """Write `model` with its adapters merged as a directory that `AutoModel*.from_pretrained` loads, in `dtype`
    (default: the model's), with `card` as its README.md. The directory appears whole or not at all.

    The adapted model itself is left unchanged (its adapters stay unmerged and trainable).
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(type(model), "from_pretrained"):
        raise LorakitError("export_merged needs a transformers model; use merged_state_dict(model) for others")
    plain = cast(PreTrainedModel, type(model)(config))  # checked above: a transformers model class
    plain.load_state_dict(merged_state_dict(model), strict=True)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    if dtype is not None:
        plain.to(dtype=dtype)  # type: ignore[call-arg]

    def fill(tmp: Path) -> None:
        plain.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if card is not None:
            (tmp / "README.md").write_text(card)
        (tmp / MARK_NAME).write_text(json.dumps({"kind": MERGED_KIND}) + "\n")

    atomic_write_dir(out_dir, fill, what=MERGED_KIND)
    return Path(out_dir)


def model_card(base: str, adapter: Path, task_state: dict[str, Any] | None, dtype: str, model: nn.Module) -> str:
    """A short model card: what the merged model is, what it was made from and how to load it."""
    from lorakit.inject import adapter_state

    state = adapter_state(model)
    config = state.config
    task = task_state.get("task") if task_state else None
    labels = task_state.get("labels") if task_state else None
    name = adapter.resolve().parent.name if adapter.name == "adapter" else adapter.name  # a run's adapter/
    lines = ["---", f"base_model: {json.dumps(base)}", "library_name: transformers",
             "tags: [lorakit, lora, merged]", "---", "", f"# {name}: {base} with a LoRA adapter merged in", "",
             f"This is `{base}` with a LoRA adapter merged into its weights (W + scaling · B A, added in fp32, "
             f"saved in {dtype}). It loads with plain `transformers` and runs at the base model's speed.", "",
             "| | |", "|---|---|", f"| base model | `{base}` |", f"| adapter | `{adapter}` |",
             f"| rank, alpha | {config.rank}, {config.alpha} |", f"| adapted modules | {len(state.adapted)} |",
             f"| init | {config.init} |"]
    if state.modules_to_save:
        lines.append(f"| trained in full | {', '.join(state.modules_to_save)} |")
    if task:
        lines.append(f"| task | {task} |")
    if labels:
        lines.append(f"| labels | {', '.join(labels)} |")
    lines += ["", "Made with `lorakit merge`.", ""]
    return "\n".join(lines)
