"""Injecting LoRA adapters: lorakit's `inject` against PEFT's `get_peft_model`, in one process, interleaved.

    .venv/bin/python benchmarks/bench_injection.py [--repeats 5] [--warmup 1] [--threads N]

The reference setting of the performance issue: SmolLM2-135M-Instruct (`load_model("smollm2")`, 30 layers),
rank 16, alpha 32 on every attention and MLP projection (`targets=["llama"]`; PEFT: the same seven module names),
210 modules, dropout 0, the standard init (A Kaiming-uniform, B zero), fp32. Each repetition adapts its own fresh
`copy.deepcopy` of the loaded base; the copy and a `gc.collect()` happen before the clock starts, so that neither
the copy nor a collection of an earlier copy's garbage lands in whichever call happens to trigger it.

Runs lorakit peft lorakit peft ... after `--warmup` rounds and prints the median wall time of each (process CPU
time beside it: on a shared machine it is the steadier figure), the ratio lorakit / PEFT, and one JSON line.
Targets: lorakit <= 0.3 s and <= 0.5 x PEFT. On a machine where other work holds cores, pass `--threads 1` (two
OpenMP threads contending with another process there slow both libraries down many times over).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from common import adapter_race_parser, machine, medians, parse_race_args, race_on_copies
from torch import nn

from lorakit import LoraConfig, inject
from lorakit.inject import plan
from lorakit.models import load_model

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def arms(config: LoraConfig) -> dict[str, Callable[[nn.Module], int]]:
    """Each arm adapts the model it is given and returns its number of trainable parameters."""
    import peft

    rank, alpha = config.rank, config.alpha

    def lorakit_inject(model: nn.Module) -> int:
        return inject(model, config).trainable_params

    def peft_inject(model: nn.Module) -> int:
        adapted = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=alpha,
                                                             target_modules=LLAMA_PROJECTIONS, lora_dropout=0.0))
        return sum(p.numel() for p in adapted.parameters() if p.requires_grad)

    return {"lorakit": lorakit_inject, "peft": peft_inject}


def main() -> None:
    args = parse_race_args(adapter_race_parser(__doc__.splitlines()[0], repeats=5))

    base, _ = load_model("smollm2")
    base.eval()
    config = LoraConfig(rank=args.rank, alpha=args.alpha, targets=["llama"], dropout=0.0, seed=args.seed)
    wall, cpu, trainable = race_on_copies(base, arms(config), args.repeats, args.warmup)
    if trainable["lorakit"] != trainable["peft"]:
        raise SystemExit(f"the arms adapt different models: trainable parameters {trainable}")

    median, median_cpu = medians(wall), medians(cpu)
    ratio, ratio_cpu = median["lorakit"] / median["peft"], median_cpu["lorakit"] / median_cpu["peft"]
    for name in wall:
        print(f"median {name:8s} {median[name]:7.4f} s  cpu {median_cpu[name]:7.4f} s  (n={len(wall[name])})")
    print(f"lorakit_over_peft {ratio:.3f} (cpu {ratio_cpu:.3f})  targets: lorakit <= 0.3 s, ratio <= 0.5")
    print(json.dumps({
        "benchmark": "injection", "model": "smollm2", "modules": len(plan(base, config).adapted), "rank": args.rank,
        "alpha": args.alpha, "dtype": "float32", "init": "standard", "repeats": args.repeats, "warmup": args.warmup,
        **machine(), "trainable_params": trainable["lorakit"],
        **{f"{name}_s": median[name] for name in wall}, **{f"{name}_cpu_s": median_cpu[name] for name in wall},
        "lorakit_over_peft": ratio, "lorakit_over_peft_cpu": ratio_cpu,
        "target_lorakit_s": 0.3, "target_lorakit_over_peft": 0.5,
        "meets_targets": median["lorakit"] <= 0.3 and ratio <= 0.5,
    }))


if __name__ == "__main__":
    main()
