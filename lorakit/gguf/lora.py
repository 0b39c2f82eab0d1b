"""An adapter alone as a GGUF LoRA file: what `llama-cli -m base.gguf --lora adapter.gguf` and Ollama's `ADAPTER`
apply on top of the base model's GGUF at run time.

    export_lora_gguf("runs/mt-lora/adapter", "mt-lora.gguf")

llama.cpp's layout (as its convert_lora_to_gguf writes it): `general.type = adapter`, `adapter.type = lora`, one
`adapter.lora.alpha` for the file, and per adapted weight `blk.N.attn_q.weight.lora_a` (A, rank x fan_in) and
`.lora_b` (B, fan_out x rank), in f32. llama.cpp adds (alpha / rank) · B·A, the rank read from each B, so a plain
LoRA adapter (one alpha, any ranks) is written as it is. An adapter whose scaling is not alpha / rank for the one
alpha, per-module alphas or rsLoRA's alpha / sqrt(rank), gets its scaling folded into B
(B' = B · scaling · rank / alpha), which makes the file exact under llama.cpp's rule.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from lorakit.errors import LorakitError
from lorakit.gguf.names import ARCH, Heads, check_architecture, check_config, gguf_name, to_gguf_rows
from lorakit.gguf.output import check_out_file, write_atomically

log = logging.getLogger(__name__)

_FACTOR = re.compile(r"(?P<module>.+)\.lora_(?P<which>[AB])\.weight")


@dataclass
class LoraGgufExport:
    """What `export_lora_gguf` wrote: the file, its size, the alpha it records, the modules whose scaling was
    folded into B (their scaling is not alpha / rank) and the base model whose config the layout came from."""

    out: Path
    bytes: int
    alpha: float
    modules: int
    folded: list[str]
    base: str

    def as_json(self) -> dict[str, Any]:
        return {"out": str(self.out), "bytes": self.bytes, "alpha": self.alpha, "modules": self.modules,
                "folded": len(self.folded), "base": self.base}


def export_lora_gguf(adapter_dir: str | Path, out_file: str | Path, *, model: str | None = None,
                     force: bool = False) -> LoraGgufExport:
    """Write the LoRA adapter at `adapter_dir` as a llama.cpp LoRA GGUF file at `out_file`. The base model's
    config (`model`, default: the base the adapter records) gives the architecture and the head counts the q/k
    rows are reordered by; the base's weights are not needed by the file.

    Raises LorakitError, before anything is written, for what the layout cannot hold: a principal (PiSSA) adapter
    (its update is relative to a residual base), DoRA (a magnitude vector), saved modules or biases, embedding
    adapters, an adapter trained on a factorised model, a base other than LlamaForCausalLM; and for an existing
    `out_file` without `force`.
    """
    from lorakit.inference import recorded_base
    from lorakit.io import FACTORIZATION_KEY, read_adapter
    from lorakit.peft_format import config_from_peft, from_peft_key

    out = check_out_file(out_file, force=force)
    raw_config, tensors, metadata = read_adapter(adapter_dir)
    _refuse_unwritable(raw_config, tensors, metadata.get(FACTORIZATION_KEY))
    config = config_from_peft(raw_config)
    if config.init == "principal":
        raise LorakitError(f"{adapter_dir} is a principal (PiSSA) adapter: its update is relative to a residual "
                           "base, which a llama.cpp LoRA file cannot express; convert it first (lorakit prune "
                           "--principal convert) or export the merged model (lorakit export --adapter)")
    factors = _pairs({from_peft_key(k): v for k, v in tensors.items()}, adapter_dir)
    base = model or recorded_base(adapter_dir)
    if not base:
        raise LorakitError(f"{adapter_dir} records no base model; pass model= (--model) to name it")
    heads, tied = _base_layout(base)
    alpha = float(config.alpha)
    written: dict[str, np.ndarray] = {}
    folded = []
    for module, (a, b) in factors.items():
        name = gguf_name(f"{module}.weight")
        if name == "output.weight" and tied:
            raise LorakitError(f"{adapter_dir} adapts lm_head, which {base} ties to the embeddings; llama.cpp has "
                               "no separate output tensor to apply it to: export the merged model instead")
        rank, scaling = a.shape[0], config.scaling_for(module)
        b = b.double()
        if not math.isclose(scaling, alpha / rank, rel_tol=1e-12):
            b = b * (scaling * rank / alpha)  # llama.cpp multiplies by alpha / rank: B'·(alpha/rank) = B·scaling
            folded.append(module)
        written[f"{name}.lora_a"] = a.float().numpy()                                      # (rank, fan_in)
        written[f"{name}.lora_b"] = to_gguf_rows(b.float().numpy(), name, heads)         # (fan_out, rank)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, ARCH)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        where = Path(adapter_dir).resolve()
        writer.add_name(where.parent.name if where.name == "adapter" else where.name)  # a run's adapter/
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        for tensor_name, value in written.items():
            writer.add_tensor(tensor_name, np.ascontiguousarray(value, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    write_atomically(out, write, what="GGUF LoRA adapter")
    if folded:
        log.info("folded the scaling of %d modules into lora_b (their scaling is not alpha / rank)", len(folded))
    return LoraGgufExport(out, out.stat().st_size, alpha, len(factors), folded, str(base))


def _refuse_unwritable(raw_config: dict[str, Any], tensors: dict[str, torch.Tensor], factorized: Any) -> None:
    """One line for the first thing in the adapter a llama.cpp LoRA file has no place for."""
    keys = list(tensors)
    dora = [k for k in keys if "lora_magnitude_vector" in k]
    if dora or raw_config.get("use_dora"):
        raise LorakitError("a DoRA adapter has a magnitude vector that llama.cpp's LoRA format cannot hold; "
                           "export the merged model instead (lorakit export --adapter DIR)")
    if factorized:
        raise LorakitError("this adapter was trained on a factorised model, which llama.cpp does not run; "
                           "export the merged model instead")
    embeddings = [k for k in keys if "lora_embedding_" in k]
    if embeddings:
        raise LorakitError(f"the adapter adapts an embedding ({embeddings[0]}), which this exporter does not write "
                           "as a LoRA file; export the merged model instead")
    others = [k for k in keys if not _FACTOR.fullmatch(k)]
    if others:
        raise LorakitError(f"the adapter saves {len(others)} tensor(s) besides LoRA factors (first: {others[0]}; "
                           "modules_to_save or biases) that llama.cpp's LoRA format cannot hold; export the merged "
                           "model instead")


def _pairs(found: dict[str, torch.Tensor], adapter_dir: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (A, B)} from lorakit-named keys; LorakitError naming a module with one factor missing."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in found.items():
        match = _FACTOR.fullmatch(key)
        assert match is not None  # _refuse_unwritable let only factors through
        parts.setdefault(match.group("module"), {})[match.group("which")] = value
    lonely = [m for m, p in parts.items() if len(p) != 2]
    if lonely:
        raise LorakitError(f"{adapter_dir} has only one LoRA factor for {lonely[0]!r}; re-save the adapter")
    return {m: (p["A"], p["B"]) for m, p in parts.items()}


def _base_layout(base: str) -> tuple[Heads, bool]:
    """(head counts, tied embeddings) of the base model, which must be a LlamaForCausalLM."""
    from lorakit.models import load_model

    model, _ = load_model(base, head="causal-lm")
    check_architecture(type(model).__name__)
    config: Any = model.config
    return check_config(config), bool(getattr(config, "tie_word_embeddings", False))
