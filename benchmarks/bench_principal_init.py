"""Principal (PiSSA) init of a whole model: lorakit against PEFT, randomized and exact SVD, in one process.

    .venv/bin/python benchmarks/bench_principal_init.py [--repeats 5] [--exact-repeats 3] [--warmup 1] [--threads N]

The reference setting of the performance issue: SmolLM2-135M-Instruct (`load_model("smollm2")`), rank 16,
alpha 32 on every attention and MLP projection (`targets=["llama"]`), 210 weight matrices, fp32. Four arms, each
adapting its own fresh `copy.deepcopy` of the loaded base (the copy and a `gc.collect()` before the clock starts):

    lorakit        inject(..., LoraConfig(init="principal", svd_iters=4))   randomized SVD, 4 power iterations
    peft_niter_4   get_peft_model(..., init_lora_weights="pissa_niter_4")   torch.svd_lowrank, niter=4
    lorakit_exact  inject(..., LoraConfig(init="principal"))                exact SVD
    peft_exact     get_peft_model(..., init_lora_weights="pissa")           exact SVD

The two randomized arms race lorakit peft lorakit peft ... for `--warmup` + `--repeats` rounds; then the two exact
arms race for `--exact-repeats` rounds, without warm-up. One exact round takes ~10 s on one EPYC core, so the
default of 3 keeps the whole script near 2 minutes there; each of those medians still comes from interleaved runs.
Prints the median wall time of each arm (process CPU time beside it, the steadier figure on a shared machine), the
ratios and one JSON line. On a machine where other work holds cores, pass `--threads 1`: two OpenMP threads that
contend with another process there make the products and the exact SVD 30-200x slower, for both libraries.

Quality: the residual base weight W - scaling · B A of each of the 210 matrices, from the last round of each arm.
Its Frobenius norm, summed over the matrices and as the worst single matrix, relative to the exact SVD's
(the optimum, Eckart-Young): a randomized SVD that missed part of the top-r subspace leaves a larger residual.

Targets: lorakit exact / lorakit randomized >= 10; lorakit randomized / PEFT pissa_niter_4 <= 0.7; lorakit's
randomized residual within 2% of its exact one.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
from common import add_threads_option, apply_threads, machine, medians, race_on_copies
from torch import Tensor, nn

from lorakit import LoraConfig, inject
from lorakit.layers import lora_modules
from lorakit.models import load_model

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# An arm adapts the model it is given and returns the residual base weights, keyed by module name.
Arm = Callable[[nn.Module], dict[str, Tensor]]


def arms(rank: int, alpha: float, seed: int, svd_iters: int) -> dict[str, Arm]:
    import peft
    from peft.tuners.lora import LoraLayer

    def lorakit_arm(iters: int | None) -> Arm:
        config = LoraConfig(rank=rank, alpha=alpha, targets=["llama"], dropout=0.0, init="principal",
                            svd_iters=iters, seed=seed)

        def run(model: nn.Module) -> dict[str, Tensor]:
            inject(model, config)
            return {name: module.weight for name, module in lora_modules(model)}
        return run

    def peft_arm(init: str) -> Arm:
        def run(model: nn.Module) -> dict[str, Tensor]:
            adapted = peft.get_peft_model(model, peft.LoraConfig(
                r=rank, lora_alpha=alpha, target_modules=LLAMA_PROJECTIONS, lora_dropout=0.0, init_lora_weights=init))
            return {name.removeprefix("base_model.model."): module.base_layer.weight
                    for name, module in adapted.named_modules() if isinstance(module, LoraLayer)}
        return run

    return {"lorakit": lorakit_arm(svd_iters), f"peft_niter_{svd_iters}": peft_arm(f"pissa_niter_{svd_iters}"),
            "lorakit_exact": lorakit_arm(None), "peft_exact": peft_arm("pissa")}


def residual_norms(residuals: dict[str, Tensor]) -> dict[str, float]:
    return {key: torch.linalg.matrix_norm(w.detach().float()).item() for key, w in residuals.items()}


def residual_excess(norms: dict[str, float], exact: dict[str, float]) -> tuple[float, float]:
    """(summed norm / summed exact norm, worst per-matrix norm / exact norm)."""
    if norms.keys() != exact.keys():
        raise SystemExit(f"the arms adapted different modules: {sorted(norms.keys() ^ exact.keys())[:5]}")
    total = sum(norms.values()) / sum(exact.values())
    return total, max(norms[k] / exact[k] for k in norms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="measured rounds of the randomized arms")
    parser.add_argument("--exact-repeats", type=int, default=3,
                        help="measured rounds of the exact-SVD arms (~10-16 s each on 2 cores; no warm-up)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds of the randomized arms first")
    parser.add_argument("--svd-iters", type=int, default=4, help="power iterations of both randomized SVDs")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--seed", type=int, default=0)
    add_threads_option(parser)
    args = parser.parse_args()
    if min(args.repeats, args.exact_repeats) < 1 or args.warmup < 0:
        parser.error("--repeats and --exact-repeats must be >= 1 and --warmup >= 0, got "
                     f"{args.repeats}, {args.exact_repeats} and {args.warmup}")
    apply_threads(parser, args.threads)

    torch.manual_seed(args.seed)  # torch.svd_lowrank (PEFT) draws from the global generator
    base, _ = load_model("smollm2")
    base.eval()
    every = arms(args.rank, args.alpha, args.seed, args.svd_iters)
    peft_fast = f"peft_niter_{args.svd_iters}"
    fast = {name: every[name] for name in ("lorakit", peft_fast)}
    exact = {name: every[name] for name in ("lorakit_exact", "peft_exact")}
    wall, cpu, norms = race_on_copies(base, fast, args.repeats, args.warmup, keep=residual_norms)
    exact_wall, exact_cpu, exact_norms = race_on_copies(base, exact, args.exact_repeats, 0, keep=residual_norms)
    wall, cpu, norms = wall | exact_wall, cpu | exact_cpu, norms | exact_norms

    median, median_cpu = medians(wall), medians(cpu)
    ratios = {
        "exact_over_randomized": median["lorakit_exact"] / median["lorakit"],
        "lorakit_over_peft_niter": median["lorakit"] / median[peft_fast],
        "lorakit_exact_over_peft_exact": median["lorakit_exact"] / median["peft_exact"],
        "exact_over_randomized_cpu": median_cpu["lorakit_exact"] / median_cpu["lorakit"],
        "lorakit_over_peft_niter_cpu": median_cpu["lorakit"] / median_cpu[peft_fast],
    }
    residual = {"lorakit_residual_over_exact": residual_excess(norms["lorakit"], norms["lorakit_exact"]),
                "peft_niter_residual_over_exact": residual_excess(norms[peft_fast], norms["peft_exact"]),
                "lorakit_exact_residual_over_peft_exact": residual_excess(norms["lorakit_exact"], norms["peft_exact"])}
    for name in wall:
        print(f"median {name:14s} {median[name]:8.3f} s  cpu {median_cpu[name]:8.3f} s  (n={len(wall[name])})")
    print("  ".join(f"{key} {value:.3f}" for key, value in ratios.items()))
    for key, (total, worst) in residual.items():
        print(f"{key}: summed {total:.5f}, worst matrix {worst:.5f}")
    print("targets: exact_over_randomized >= 10, lorakit_over_peft_niter <= 0.7, lorakit_residual_over_exact <= 1.02")
    meets = (ratios["exact_over_randomized"] >= 10 and ratios["lorakit_over_peft_niter"] <= 0.7
             and residual["lorakit_residual_over_exact"][0] <= 1.02)
    print(json.dumps({
        "benchmark": "principal_init", "model": "smollm2", "matrices": len(norms["lorakit"]), "rank": args.rank,
        "alpha": args.alpha, "dtype": "float32", "svd_iters": args.svd_iters, "repeats": args.repeats,
        "exact_repeats": args.exact_repeats, "warmup": args.warmup, "exact_warmup": 0, **machine(),
        **{f"{name}_s": median[name] for name in wall}, **{f"{name}_cpu_s": median_cpu[name] for name in wall},
        **ratios,
        **{key: total for key, (total, _) in residual.items()},
        **{f"{key}_worst_matrix": worst for key, (_, worst) in residual.items()},
        "residual_norm_sum": {name: sum(values.values()) for name, values in norms.items()},
        "meets_targets": meets,
    }))


if __name__ == "__main__":
    main()
