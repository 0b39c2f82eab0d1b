"""Inference with an adapter: merged and unmerged lorakit against the base model (and PEFT), one process.

    .venv/bin/python benchmarks/bench_inference.py [--rounds 5] [--warmup 1]

SmolLM2-135M-Instruct with rank 16, alpha 32 on every attention and MLP projection; B is random (seeded, std
0.02) so the adapter changes the output. Four copies of the model:

    base      the model without adapters
    merged    lorakit, the adapter merged into the weights (`lorakit.merge`)
    unmerged  lorakit, the adapter applied on the fly
    peft      PEFT, the same factors, unmerged

Two workloads, each raced A B C D A B C D ... after warm-up, under `torch.inference_mode()`:

    forward   a batch of 4 x 128 tokens
    generate  greedy decoding of exactly 32 new tokens after a 16-token prompt, batch 1 (tokens/s = 32 / time)

Targets: merged <= 1.02 x base and unmerged <= 1.10 x base in time, for both. Prints medians and ratios and one
JSON line. Also checks that lorakit's merged and unmerged logits agree and equal PEFT's.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from common import machine, medians, race

from lorakit import LoraConfig, inject, merge
from lorakit.layers import lora_modules
from lorakit.models import load_model

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NEW_TOKENS = 32


def build_models(rank: int, alpha: float, seed: int) -> tuple[dict[str, torch.nn.Module], torch.nn.Module]:
    """(the four models, the tokenizer), all in eval mode."""
    import peft

    base, tokenizer = load_model("smollm2")
    base.eval().requires_grad_(False)
    unmerged = copy.deepcopy(base)
    inject(unmerged, LoraConfig(rank=rank, alpha=alpha, targets=["llama"], seed=seed))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in lora_modules(unmerged):
            module.lora_B.weight.normal_(0.0, 0.02, generator=gen)
    merged = copy.deepcopy(unmerged)
    merge(merged)

    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=LLAMA_PROJECTIONS, lora_dropout=0.0))
    ours_factors = {name: module for name, module in lora_modules(unmerged)}
    with torch.no_grad():
        for name, module in theirs.named_modules():
            if hasattr(module, "lora_A") and isinstance(module.lora_A, torch.nn.ModuleDict):
                source = ours_factors[name.removeprefix("base_model.model.")]
                module.lora_A["default"].weight.copy_(source.lora_A.weight)
                module.lora_B["default"].weight.copy_(source.lora_B.weight)
    models = {"base": base, "merged": merged, "unmerged": unmerged, "peft": theirs.eval()}
    return models, tokenizer


def check_outputs(models: dict[str, torch.nn.Module], ids: torch.Tensor) -> dict[str, float]:
    """Largest |logit difference| of merged and PEFT against lorakit unmerged, and of base (to show the adapter
    is not a no-op)."""
    with torch.inference_mode():
        logits = {name: model(input_ids=ids[:1, :32]).logits for name, model in models.items()}
    ref = logits["unmerged"]
    return {f"max_abs_diff_{name}": float((logits[name] - ref).abs().max()) for name in ("merged", "peft", "base")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    models, tokenizer = build_models(args.rank, args.alpha, args.seed)
    vocab = models["base"].get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (4, 128), generator=torch.Generator().manual_seed(args.seed))
    prompt = tokenizer("Give three tips for staying healthy and say why each matters.",
                       return_tensors="pt")["input_ids"][:, :16]
    checks = check_outputs(models, ids)

    def forward(model: torch.nn.Module) -> None:
        with torch.inference_mode():
            model(input_ids=ids)

    def generate(model: torch.nn.Module) -> None:
        with torch.inference_mode():
            model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                           min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.eos_token_id)

    results: dict[str, object] = {"benchmark": "inference", "model": "smollm2", "rank": args.rank,
                                  "rounds": args.rounds, "warmup": args.warmup, **machine(), **checks}
    for workload, run in (("forward", forward), ("generate", generate)):
        times = race({name: (lambda m=model, r=run: r(m)) for name, model in models.items()}, args.rounds,
                     args.warmup)
        median = medians(times)
        for name, value in median.items():
            results[f"{workload}_{name}_s"] = value
            print(f"median {workload:8s} {name:8s} {value:8.4f} s")
        for name in ("merged", "unmerged", "peft"):
            ratio = median[name] / median["base"]
            results[f"{workload}_{name}_over_base"] = ratio
            print(f"{workload}: {name}/base {ratio:.3f}")
        if workload == "generate":
            for name, value in median.items():
                results[f"generate_{name}_tokens_per_s"] = NEW_TOKENS / value
    print("logit checks:", "  ".join(f"{k} {v:.2e}" for k, v in checks.items()))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
