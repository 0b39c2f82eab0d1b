"""The fp32 products of a LoRA training step on SmolLM2: torch's own kernel against lorakit.gemm's oneDNN, interleaved.

    .venv/bin/python benchmarks/bench_cpu_matmul.py [--rounds 30] [--tokens 512] [--threads N]

For each product a training step of SmolLM2-135M-Instruct at a batch of 4 x 128 runs (the projections' forward
x Wᵀ and input gradient g W, the output head's logits and their input gradient over 508 rows), one process,
interleaved per round: `torch.mm` on the same operands (what `F.linear` and `@` run, oneMKL in the x86 wheels) and
`lorakit.gemm` with `cpu_matmul: onednn`. Each call repeats the product `--inner` times. Prints each shape's
GFLOP/s, the median of the per-round time ratios (onednn / torch), the largest error of each against a float64
product relative to the product's scale, the step's FLOP-weighted ratio, and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from common import add_threads_option, apply_threads, machine, race

from lorakit import gemm

# (name, rows, inner, columns, weight transposed): a (rows, inner) @ (inner, columns) product and how many of it a
# step runs (30 layers). The forward reads the weight as (columns, inner): x Wᵀ; the input gradient reads it as is.
VOCAB, HIDDEN, MLP = 49152, 576, 1536
LAYER_SHAPES = [("q/o forward", HIDDEN, HIDDEN, True, 60), ("k/v forward", HIDDEN, 192, True, 60),
                ("gate/up forward", HIDDEN, MLP, True, 60), ("down forward", MLP, HIDDEN, True, 30),
                ("q/o input grad", HIDDEN, HIDDEN, False, 60), ("k/v input grad", 192, HIDDEN, False, 60),
                ("gate/up input grad", MLP, HIDDEN, False, 60), ("down input grad", HIDDEN, MLP, False, 30)]


def operands(rows: int, inner: int, columns: int, forward: bool, generator: torch.Generator
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(a (rows, inner), b (inner, columns)); b a transposed view of an (columns, inner) weight in forward."""
    a = torch.randn(rows, inner, generator=generator)
    if forward:
        return a, torch.randn(columns, inner, generator=generator).T
    return a, torch.randn(inner, columns, generator=generator)


def relative_error(result: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    reference = a.double() @ b.double()
    return float((result.double() - reference).abs().max() / reference.abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--inner", type=int, default=3, help="products per timed call")
    parser.add_argument("--tokens", type=int, default=512, help="rows of the projections' products")
    add_threads_option(parser)
    args = parser.parse_args()
    apply_threads(parser, args.threads)
    if not gemm.onednn_available():
        parser.error("this torch build has no oneDNN (torch.backends.mkldnn): nothing to race")
    generator = torch.Generator().manual_seed(0)
    shapes = [(name, args.tokens, inner, out, fwd, count) for name, inner, out, fwd, count in LAYER_SHAPES]
    shapes += [("head logits", args.tokens - 4, HIDDEN, VOCAB, True, 1),
               ("head input grad", args.tokens - 4, VOCAB, HIDDEN, False, 1)]
    results, total = {}, {"torch": 0.0, "onednn": 0.0}
    for name, rows, inner, columns, forward, count in shapes:
        a, b = operands(rows, inner, columns, forward, generator)

        def torch_mm(a: torch.Tensor = a, b: torch.Tensor = b) -> None:
            for _ in range(args.inner):
                torch.mm(a, b)

        def onednn_mm(a: torch.Tensor = a, b: torch.Tensor = b) -> None:
            for _ in range(args.inner):
                gemm.matmul(a, b)

        with gemm.cpu_matmul("onednn"):
            times = race({"torch": torch_mm, "onednn": onednn_mm}, args.rounds, args.warmup, verbose=False)
            errors = {"torch": relative_error(torch.mm(a, b), a, b), "onednn": relative_error(gemm.matmul(a, b), a, b)}
        flops = 2 * rows * inner * columns * args.inner
        median = {k: statistics.median(v) for k, v in times.items()}
        ratio = statistics.median(o / t for o, t in zip(times["onednn"], times["torch"], strict=True))
        for k in total:
            total[k] += median[k] / args.inner * count
        results[name] = {"shape": [rows, inner, columns], "per_step": count, "ratio": ratio,
                         **{f"{k}_gflops": flops / median[k] / 1e9 for k in median},
                         **{f"{k}_rel_error": e for k, e in errors.items()}}
        print(f"{name:20s} ({rows} x {inner}) @ ({inner} x {columns}): torch {flops / median['torch'] / 1e9:6.1f} "
              f"GFLOP/s, onednn {flops / median['onednn'] / 1e9:6.1f} GFLOP/s, ratio {ratio:.3f}; relative error "
              f"torch {errors['torch']:.1e}, onednn {errors['onednn']:.1e}")
    step_ratio = total["onednn"] / total["torch"]
    print(f"a step's base and head products: torch {total['torch']:.3f} s, onednn {total['onednn']:.3f} s, "
          f"ratio {step_ratio:.3f}")
    print(json.dumps({"benchmark": "cpu_matmul", "tokens": args.tokens, "rounds": args.rounds, **machine(),
                      "step_torch_s": total["torch"], "step_onednn_s": total["onednn"], "step_ratio": step_ratio,
                      "shapes": results}))


if __name__ == "__main__":
    main()
