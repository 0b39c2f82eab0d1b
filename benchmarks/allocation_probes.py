"""Which probe `lorakit allocate` should default to: the two probes' allocations on one config, compared.

    .venv/bin/python benchmarks/allocation_probes.py [CONFIG] [--like-rank 8] [--probe-batches 8] [--threads N]

A measurement, not a test: for CONFIG (default recipes/sst2-minilm.yaml) it prepares the model and data as
`lorakit allocate` does and, for each probe, allocates the budget of uniform rank `--like-rank` from

- the first `--probe-batches` training batches (what `lorakit allocate` uses), and
- the next `--probe-batches` batches (another draw of the same data), and, for the gradient probe, the first
  batches again under a classifier head drawn with another seed (the new head is random, and the gradient
  reaching the encoder passes through it).

It prints, per probe, the seconds the probe took and the mean rank per module kind, then the agreement between
allocations: the share of the spent budget two allocations place alike, sum_m min(r1, r2)·cost_m / spent (1: the
same ranks), for each probe against its other draw, against the other probe and against uniform. One JSON line
at the end holds every figure. Quote ratios: these machines are shared.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from lorakit.allocation.allocate import probe_batch_list, target_names, without_adapter
from lorakit.allocation.budget import allocate_ranks, uniform_budget
from lorakit.allocation.pattern_file import summary_rows
from lorakit.allocation.probes import activation_spectra, gradient_spectra
from lorakit.inject import fan_in_out
from lorakit.train.config import load_train_config
from lorakit.train.run import prepare


def agreement(a: dict[str, int], b: dict[str, int], costs: dict[str, int]) -> float:
    spent = max(sum(a[n] * costs[n] for n in a), sum(b[n] * costs[n] for n in b))
    return sum(min(a[n], b[n]) * costs[n] for n in a) / spent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", nargs="?", default="recipes/sst2-minilm.yaml")
    parser.add_argument("--like-rank", type=int, default=8)
    parser.add_argument("--probe-batches", type=int, default=8)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_train_config(args.config)
    prepared = prepare(without_adapter(config))
    names = target_names(prepared.model, config.lora, prepared.task)
    modules = dict(prepared.model.named_modules())
    costs = {n: sum(fan_in_out(modules[n])) for n in names}
    budget = uniform_budget(costs, args.like_rank)
    n = args.probe_batches
    batches = probe_batch_list(prepared.task, prepared.train, config, 2 * n, torch.device("cpu"))
    first, second = batches[:n], batches[n:]
    probes = {"activations": activation_spectra, "gradients": gradient_spectra}
    ranks: dict[str, dict[str, int]] = {}
    seconds: dict[str, float] = {}
    for probe, spectra_of in probes.items():
        for draw, part in (("first", first), ("next", second)):
            started = time.perf_counter()
            spectra = spectra_of(prepared.model, prepared.task.loss, part, names)
            if draw == "first":
                seconds[probe] = time.perf_counter() - started
            ranks[f"{probe}/{draw}"] = allocate_ranks(spectra, costs, budget)
    other_seed = dataclasses.replace(config, run=dataclasses.replace(config.run, seed=config.run.seed + 1))
    other = prepare(without_adapter(other_seed))  # another random head, the same first batches
    ranks["gradients/other head"] = allocate_ranks(gradient_spectra(other.model, other.task.loss, first, names),
                                                   costs, budget)
    uniform = dict.fromkeys(names, args.like_rank)
    for probe in probes:
        print(f"\n{probe} probe ({seconds[probe]:.1f} s on {n} batches), mean rank per module kind:")
        for kind, text in summary_rows(ranks[f"{probe}/first"]):
            print(f"  {kind:<45} {text}")
    pairs = {
        "activations: first vs next batches": ("activations/first", "activations/next"),
        "gradients: first vs next batches": ("gradients/first", "gradients/next"),
        "gradients: head seed 0 vs 1": ("gradients/first", "gradients/other head"),
        "activations vs gradients": ("activations/first", "gradients/first"),
    }
    figures = {label: agreement(ranks[a], ranks[b], costs) for label, (a, b) in pairs.items()}
    figures |= {f"{probe} vs uniform": agreement(ranks[f"{probe}/first"], uniform, costs) for probe in probes}
    print("\nshare of the spent budget placed alike:")
    for label, value in figures.items():
        print(f"  {label:<40} {value:.3f}")
    spent = {k: sum(r[m] * costs[m] for m in r) for k, r in ranks.items()}
    print(json.dumps({"config": args.config, "like_rank": args.like_rank, "budget": budget, "spent": spent,
                      "probe_seconds": seconds, "agreement": figures, "ranks": ranks}))


if __name__ == "__main__":
    main()
