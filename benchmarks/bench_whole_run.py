"""A whole training run: the SST-2 recipe with LoRA against full fine-tuning of the same steps, one process.

    .venv/bin/python benchmarks/bench_whole_run.py [--steps 40] [--rounds 5] [--warmup 1]

Each run is `lorakit.train.run.train_from_config` on recipes/sst2-minilm.yaml (MiniLM-L6, batch 32, 64 tokens,
LoRA r=8 on all linear layers plus the new classifier head) stopped after `--steps` optimizer steps
(`optim.max_steps`), with the recipe's end-of-run evaluation on the full dev set (872 sentences) and the saving
of the result. The full fine-tuning run is the same config with `run.method=full` and lr 5e-5 (the recorded
baseline of docs/results.md). Runs alternate LoRA, full, LoRA, full ... in fresh output directories.

Reported per method: the median wall time of the whole call (model loading, data encoding, training, evaluation,
saving) and of the training loop alone (`train_seconds`), and their ratios LoRA / full. Target: whole-run wall
time <= 0.8 x full fine-tuning's. A third arm, `lora_blas`, is the LoRA run with `run.cpu_matmul=blas`: full
fine-tuning's products run on torch's own kernel (lorakit.gemm routes the products of frozen bases only), so
lora_blas / full compares the two on one kernel. One JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

from common import machine, medians

from lorakit.train.config import load_train_config
from lorakit.train.run import train_from_config

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "sst2-minilm.yaml"
# lora_blas: LoRA with its products on torch's own kernel, as full fine-tuning's run (transformers' modules, whose
# weights train, are not routed through lorakit.gemm): LoRA against full fine-tuning on the same kernel.
METHODS = {"lora": [], "full": ["run.method=full", "optim.lr=5e-5"], "lora_blas": ["run.cpu_matmul=blas"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run (the recipe makes 250)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--steps and --rounds must be >= 1 and --warmup >= 0")
    logging.getLogger("lorakit").setLevel(logging.WARNING)
    import transformers

    transformers.logging.set_verbosity_error()  # the load report of the new classifier head, once per run
    transformers.logging.disable_progress_bar()

    wall: dict[str, list[float]] = {m: [] for m in METHODS}
    loop: dict[str, list[float]] = {m: [] for m in METHODS}
    accuracy: dict[str, list[float]] = {m: [] for m in METHODS}
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-") as tmp:
        for round_ in range(args.warmup + args.rounds):
            for method, overrides in METHODS.items():
                config = load_train_config(RECIPE, [f"optim.max_steps={args.steps}",
                                                    f"run.out_dir={tmp}/{method}-{round_}", *overrides])
                start = time.perf_counter()
                summary = train_from_config(config)
                elapsed = time.perf_counter() - start
                kind = "warmup" if round_ < args.warmup else "round"
                print(f"{kind} {round_}: {method:9s} whole {elapsed:7.2f} s  loop {summary.train_seconds:7.2f} s  "
                      f"accuracy {summary.value:.4f}", flush=True)
                if round_ >= args.warmup:
                    wall[method].append(elapsed)
                    loop[method].append(summary.train_seconds)
                    accuracy[method].append(float(summary.value or 0.0))

    wall_median, loop_median = medians(wall), medians(loop)
    ratios = {"lora_over_full_wall": wall_median["lora"] / wall_median["full"],
              "lora_over_full_loop": loop_median["lora"] / loop_median["full"],
              "lora_blas_over_full_wall": wall_median["lora_blas"] / wall_median["full"],
              "lora_blas_over_full_loop": loop_median["lora_blas"] / loop_median["full"]}
    for method in METHODS:
        print(f"median {method:9s} whole {wall_median[method]:7.2f} s  loop {loop_median[method]:7.2f} s")
    print("  ".join(f"{key} {value:.3f}" for key, value in ratios.items()))
    print(json.dumps({"benchmark": "whole_run", "recipe": "recipes/sst2-minilm.yaml", "steps": args.steps,
                      "rounds": args.rounds, "warmup": args.warmup, **machine(),
                      **{f"{m}_wall_s": v for m, v in wall_median.items()},
                      **{f"{m}_loop_s": v for m, v in loop_median.items()},
                      **{f"{m}_accuracy": accuracy[m][-1] for m in METHODS}, **ratios}))


if __name__ == "__main__":
    main()
