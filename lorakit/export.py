"""Exporting a merged model: a plain transformers directory with ΔW folded into W and no lorakit keys."""

from __future__ import annotations

from pathlib import Path
from typing import cast

from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lorakit.errors import LorakitError
from lorakit.fileio import atomic_write_dir
from lorakit.merge import merged_state_dict


def export_merged(model: nn.Module, out_dir: str | Path, tokenizer: PreTrainedTokenizerBase | None = None) -> Path:
    """Write `model` with its adapters merged as a directory that `AutoModel*.from_pretrained` loads.

    The adapted model itself is left unchanged (its adapters stay unmerged and trainable).
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(type(model), "from_pretrained"):
        raise LorakitError("export_merged needs a transformers model; use merged_state_dict(model) for others")
    plain = cast(PreTrainedModel, type(model)(config))  # checked above: a transformers model class
    plain.load_state_dict(merged_state_dict(model), strict=True)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()

    def fill(tmp: Path) -> None:
        plain.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    atomic_write_dir(out_dir, fill)
    return Path(out_dir)
