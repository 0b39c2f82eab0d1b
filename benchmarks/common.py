"""What every benchmark here shares: the interleaved race and its report.

    times = race({"lorakit": f, "peft": g}, rounds=5, warmup=1)   # f g f g ... ; seconds per call
    summary = medians(times)
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

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
