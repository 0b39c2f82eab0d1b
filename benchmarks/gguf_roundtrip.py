"""How close a GGUF export of SmolLM2 with an adapter merged comes to the model lorakit runs: logits after a round
trip through the file, read back by transformers' own GGUF loader.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gguf_roundtrip.py [--adapter DIR] [--out-dir DIR]

A measurement, not a test. The adapter defaults to runs/mt-lora/adapter when it exists, else a random rank-8 LoRA
on every linear layer (B ~ N(0, 0.02²), so ΔW ≠ 0). For f16 and q8_0 it exports the merged model
(`lorakit.gguf.export_gguf`), reads it back with `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` and
prints, over every position of a few chat prompts, the max and mean |Δlogit| against lorakit's fp32 model (the
adapter unmerged), the share of positions whose top token agrees, the file size and the export time; then the same
for the adapter alone as a llama.cpp LoRA file (size and time). For scale it prints how far the adapter moves the
logits (adapted against base). One JSON line at the end holds every figure.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit import LoraConfig, inject, save_adapter
from lorakit.gguf import export_gguf, export_lora_gguf
from lorakit.inference import load_for_inference
from lorakit.merge import adapters_disabled
from lorakit.models import load_model

PROMPTS = ["Translate to French: The weather is lovely today.", "What is the capital of Germany?",
           "Write one sentence about the sea.", "Count from 1 to 12."]


def random_adapter(path: Path) -> Path:
    model, _ = load_model("smollm2")
    inject(model, LoraConfig(rank=8, alpha=16, targets=["all-linear"], seed=0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return save_adapter(model, path, base_model="smollm2")


def logits_of(model: Any, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(ids).logits[0] for ids in batches]


def compare(got: list[torch.Tensor], want: list[torch.Tensor]) -> dict[str, float]:
    diff = torch.cat([(g - w).abs().flatten() for g, w in zip(got, want, strict=True)])
    top = torch.cat([(g.argmax(-1) == w.argmax(-1)).float() for g, w in zip(got, want, strict=True)])
    return {"max_abs": diff.max().item(), "mean_abs": diff.mean().item(), "top1_agree": top.mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", help="default: runs/mt-lora/adapter if present, else a random LoRA")
    parser.add_argument("--out-dir", help="where the .gguf files go (default: a temporary directory)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(args.out_dir or tempfile.mkdtemp(prefix="gguf-roundtrip-"))
    work.mkdir(parents=True, exist_ok=True)
    adapter = Path(args.adapter) if args.adapter else Path("runs/mt-lora/adapter")
    if not adapter.is_dir():
        adapter = random_adapter(work / "random-adapter")
    print(f"adapter {adapter}; files in {work}")

    loaded = load_for_inference(None, adapter)
    tok = loaded.tokenizer
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS]
    batches = [torch.tensor([tok(t)["input_ids"]]) for t in texts]
    reference = logits_of(loaded.model, batches)
    with adapters_disabled(loaded.model):
        base = logits_of(loaded.model, batches)
    effect = compare(reference, base)
    print(f"{sum(b.shape[1] for b in batches)} positions over {len(PROMPTS)} prompts; the adapter moves the logits "
          f"by max {effect['max_abs']:.3g}, mean {effect['mean_abs']:.3g} (top-1 agrees with the base on "
          f"{effect['top1_agree']:.1%})")
    results: dict[str, Any] = {"adapter": str(adapter), "adapter_effect": effect}
    for kind in ("f16", "q8_0"):
        report = export_gguf(None, work / f"smollm2-{kind}.gguf", adapter=adapter, type=kind, force=True)
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(work, gguf_file=report.out.name, dtype=torch.float32).eval()
        read_s = time.perf_counter() - started
        gguf_tok = AutoTokenizer.from_pretrained(work, gguf_file=report.out.name)
        same_ids = all(gguf_tok(t)["input_ids"] == tok(t)["input_ids"] for t in texts)
        figures = compare(logits_of(model, batches), reference)
        results[kind] = {**figures, "bytes": report.bytes, "export_s": report.seconds, "read_s": read_s,
                         "same_token_ids": same_ids}
        print(f"{kind}: max |Δlogit| {figures['max_abs']:.3g}, mean {figures['mean_abs']:.3g}, top-1 agrees "
              f"{figures['top1_agree']:.1%}; {report.bytes / 2**20:.1f} MiB, exported in {report.seconds:.1f} s "
              f"(model load included), read back in {read_s:.1f} s; tokenizer gives the same ids: {same_ids}")
        del model
    started = time.perf_counter()
    lora = export_lora_gguf(adapter, work / "adapter.gguf", force=True)
    results["lora"] = {"bytes": lora.bytes, "export_s": time.perf_counter() - started, "folded": len(lora.folded)}
    print(f"LoRA file: {lora.modules} modules, alpha {lora.alpha:g}, {lora.bytes / 2**20:.2f} MiB in "
          f"{results['lora']['export_s']:.1f} s (base model config load included)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
