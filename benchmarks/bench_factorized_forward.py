"""The forward of a factorised SmolLM2 against the dense model, one process, interleaved.

    .venv/bin/python benchmarks/bench_factorized_forward.py [--ratio 0.5] [--rank-multiple 16] [--rounds 15]

All 210 projections of SmolLM2-135M-Instruct (`llama` preset) factorised with `lorakit.compress.factorize` at
`--ratio` of their parameters (plain SVD; the method does not change the shapes' cost), twice, then raced against
the dense model under `torch.inference_mode()`:

    dense         the model as loaded
    factorised    every projection a LowRankLinear (x -> x V -> x V Uᵀ + b), ranks in steps of --rank-multiple
    factorised-1  the same with ranks in steps of 1 (rank_multiple=1, the library's default)

Workload: the forward of a batch of 4 x 128 token ids, all logits computed (the untouched output head included).
Target at ratio 0.5: factorised <= 0.68 x dense. Prints medians, the ratio, parameter and byte counts of the model
and of the factorised layers, the largest logit difference, and one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from common import add_threads_option, apply_threads, machine, medians, race

from lorakit.compress import factorize
from lorakit.models import load_model

TARGET = 0.68
BATCH, LENGTH = 4, 128


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's distinct parameters (tied ones counted once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rank-multiple", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    add_threads_option(parser)
    args = parser.parse_args()
    apply_threads(parser, args.threads)

    dense, _ = load_model("smollm2")
    dense.eval().requires_grad_(False)
    factorised, steps_of_one = copy.deepcopy(dense), copy.deepcopy(dense)
    report = factorize(factorised, ["llama"], ratio=args.ratio, rank_multiple=args.rank_multiple)
    factorize(steps_of_one, ["llama"], ratio=args.ratio)
    ids = torch.randint(0, dense.config.vocab_size, (BATCH, LENGTH), generator=torch.Generator().manual_seed(args.seed))

    def forward(model: torch.nn.Module) -> torch.Tensor:
        with torch.inference_mode():
            return model(input_ids=ids).logits

    times = race({"dense": lambda: forward(dense), "factorised": lambda: forward(factorised),
                  "factorised-1": lambda: forward(steps_of_one)}, args.rounds, args.warmup)
    summary = medians(times)
    ratio = summary["factorised"] / summary["dense"]
    ratio_1 = summary["factorised-1"] / summary["dense"]
    difference = (forward(dense) - forward(factorised)).abs().max().item()
    for name, value in summary.items():
        print(f"median forward {name:12s} {value:8.4f} s")
    print(f"factorised/dense {ratio:.3f} (target <= {TARGET}; ranks multiples of {args.rank_multiple}); "
          f"factorised-1/dense {ratio_1:.3f}")
    print(f"parameters: model {sum(p.numel() for p in dense.parameters()):,} -> "
          f"{sum(p.numel() for p in factorised.parameters()):,}; factorised layers {report.parameters_before:,} -> "
          f"{report.parameters_after:,}; bytes {model_bytes(dense):,} -> {model_bytes(factorised):,}")
    print(f"largest |logit difference| from the dense model {difference:.2f} (truncation, not an error)")
    print(json.dumps({"benchmark": "factorized_forward", "ratio": args.ratio, "rank_multiple": args.rank_multiple,
                      "batch": [BATCH, LENGTH], "rounds": args.rounds, "median_s": summary,
                      "factorised_over_dense": round(ratio, 4), "factorised_1_over_dense": round(ratio_1, 4),
                      "target": TARGET, "met": ratio <= TARGET,
                      "parameters": {"dense": sum(p.numel() for p in dense.parameters()),
                                     "factorised": sum(p.numel() for p in factorised.parameters()),
                                     "layers_before": report.parameters_before,
                                     "layers_after": report.parameters_after},
                      "bytes": {"dense": model_bytes(dense), "factorised": model_bytes(factorised)},
                      **machine()}))


if __name__ == "__main__":
    main()
