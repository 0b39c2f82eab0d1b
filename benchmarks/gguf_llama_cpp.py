"""The GGUF exports run by llama.cpp itself (through llama-cpp-python): logits of the merged file, and of the base
file with the adapter's LoRA file applied at load time, against lorakit's fp32 model.

    OMP_NUM_THREADS=1 PYTHONPATH=DIR_WITH_llama_cpp .venv/bin/python benchmarks/gguf_llama_cpp.py [--adapter DIR]

A measurement, not a test; llama-cpp-python is not a lorakit dependency (it builds llama.cpp from source:
`pip install --target DIR llama-cpp-python`). The adapter defaults to runs/mt-lora/adapter. It exports SmolLM2 with
the adapter merged (f16, q8_0), SmolLM2 alone (f16) and the adapter alone, evaluates the token ids of a few chat
prompts (lorakit's tokenizer; llama.cpp's own tokenization of the same text is compared too) and prints the max and
mean |Δlogit| and the top-1 agreement of every position against lorakit's fp32 model with the adapter unmerged,
then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from llama_cpp import Llama

from lorakit.gguf import export_gguf, export_lora_gguf
from lorakit.inference import load_for_inference

PROMPTS = ["Translate to French: The weather is lovely today.", "What is the capital of Germany?",
           "Write one sentence about the sea.", "Count from 1 to 12."]


def llama_logits(path: Path, batches: list[list[int]], lora: Path | None = None) -> list[np.ndarray]:
    kwargs: dict[str, Any] = {"lora_path": str(lora)} if lora else {}
    llm = Llama(model_path=str(path), n_ctx=256, logits_all=True, n_threads=1, n_batch=256, verbose=False,
                **kwargs)
    out = []
    for ids in batches:
        llm.reset()
        llm.eval(ids)
        out.append(np.array(llm.scores[:len(ids)], dtype=np.float32))
    return out


def compare(got: list[np.ndarray], want: list[np.ndarray]) -> dict[str, float]:
    diff = np.concatenate([np.abs(g - w).ravel() for g, w in zip(got, want, strict=True)])
    top = np.concatenate([g.argmax(-1) == w.argmax(-1) for g, w in zip(got, want, strict=True)])
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "top1_agree": float(top.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default="runs/mt-lora/adapter")
    parser.add_argument("--out-dir", help="where the .gguf files go (default: a temporary directory)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(args.out_dir or tempfile.mkdtemp(prefix="gguf-llama-cpp-"))
    loaded = load_for_inference(None, args.adapter)
    tok = loaded.tokenizer
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS]
    batches = [tok(t)["input_ids"] for t in texts]
    with torch.no_grad():
        reference = [loaded.model(torch.tensor([ids])).logits[0].numpy() for ids in batches]
    files = {kind: export_gguf(None, work / f"merged-{kind}.gguf", adapter=args.adapter, type=kind, force=True).out
             for kind in ("f16", "q8_0")}
    base = export_gguf(loaded.base, work / "base-f16.gguf", force=True).out
    lora = export_lora_gguf(args.adapter, work / "adapter.gguf", force=True).out
    results: dict[str, Any] = {}
    for name, logits in [("merged f16", llama_logits(files["f16"], batches)),
                         ("merged q8_0", llama_logits(files["q8_0"], batches)),
                         ("base f16 + LoRA file", llama_logits(base, batches, lora))]:
        results[name] = compare(logits, reference)
        print(f"llama.cpp, {name}: max |Δlogit| {results[name]['max_abs']:.3g}, mean {results[name]['mean_abs']:.3g}, "
              f"top-1 agrees {results[name]['top1_agree']:.1%}")
    llm = Llama(model_path=str(files["f16"]), n_ctx=256, vocab_only=True, verbose=False)
    same = [llm.tokenize(t.encode(), add_bos=False, special=True) == ids for t, ids in zip(texts, batches, strict=True)]
    results["same_token_ids"] = all(same)
    print(f"llama.cpp tokenizes the {len(texts)} prompts as lorakit: {same}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
