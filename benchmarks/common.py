"""What every benchmark here shares: the interleaved race and its report.

    times = race({"lorakit": f, "peft": g}, rounds=5, warmup=1)   # f g f g ... ; seconds per call
    summary = medians(times)
"""

from __future__ import annotations

import argparse
import copy
import gc
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def race(steps: dict[str, Callable[[], object]], rounds: int, warmup: int = 1, *, verbose: bool = True
         ) -> dict[str, list[float]]:
    """Run every step once per round, in order (A B C A B C ...), `warmup` unmeasured rounds first; return
    the measured seconds of each step, one entry per round."""
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got {rounds} and {warmup}")
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(warmup + rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                times[name].append(elapsed)
            if verbose:
                kind = "warmup" if round_ < warmup else "round"
                print(f"{kind} {round_}: {name:16s} {elapsed:8.4f} s", flush=True)
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in times.items()}


def machine() -> dict[str, object]:
    """CPU model, threads and torch version, for the JSON line."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    return {"cpu": model, "threads": torch.get_num_threads(), "torch": torch.__version__}


def race_on_copies(base: torch.nn.Module, arms: dict[str, Callable[[torch.nn.Module], Any]], rounds: int,
                   warmup: int, *, keep: Callable[[Any], Any] = lambda result: result
                   ) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, Any]]:
    """`race` for arms that change the model they are given: each call gets a fresh `copy.deepcopy(base)`, made
    (and the garbage of the previous copy collected) before the clock starts. Returns the wall and process-CPU
    seconds of each arm per measured round, and `keep(result)` of each arm's last call (taken after the clock
    stops, so the copy it came from can be freed)."""
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got {rounds} and {warmup}")
    wall: dict[str, list[float]] = {name: [] for name in arms}
    cpu: dict[str, list[float]] = {name: [] for name in arms}
    kept: dict[str, Any] = {}
    for round_ in range(warmup + rounds):
        for name, arm in arms.items():
            model = copy.deepcopy(base)
            gc.collect()
            start, start_cpu = time.perf_counter(), time.process_time()
            result = arm(model)
            elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            kept[name] = keep(result)
            del model, result
            if round_ >= warmup:
                wall[name].append(elapsed)
                cpu[name].append(elapsed_cpu)
            kind = "warmup" if round_ < warmup else "round"
            print(f"{kind} {round_}: {name:14s} {elapsed:8.4f} s (cpu {elapsed_cpu:8.4f} s)", flush=True)
    return wall, cpu, kept


def adapter_race_parser(description: str, repeats: int) -> argparse.ArgumentParser:
    """The options of a race over one adapter: --repeats, --warmup, --rank, --alpha, --seed and --threads."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--repeats", type=int, default=repeats, help="measured rounds (each runs every arm)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--seed", type=int, default=0)
    add_threads_option(parser)
    return parser


def parse_race_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse, check --repeats and --warmup, and apply --threads."""
    args = parser.parse_args()
    if args.repeats < 1 or args.warmup < 0:
        parser.error(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    apply_threads(parser, args.threads)
    return args


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own). On a machine where other work holds cores, 1: "
                             "two OpenMP threads contending with another process there run products 30x slower")


def apply_threads(parser: argparse.ArgumentParser, threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            parser.error(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
