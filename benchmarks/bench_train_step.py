"""One LoRA training step: lorakit vs PEFT vs the frozen model's forward, in one process, interleaved.

    .venv/bin/python benchmarks/bench_train_step.py [--steps 5] [--warmup 1]

The reference setting of the training-step performance issue: SmolLM2-135M-Instruct (`load_model("smollm2")`),
a batch of 4 x 128 random token ids with labels = input ids (every next token supervised), rank 16, alpha 32 on
every attention and MLP projection (`targets=["llama"]`, PEFT: the same seven module names), dropout 0, AdamW,
fp32. Four steps, each on its own copy of the model:

    lorakit       zero_grad, `InstructionTuning.loss` (the chunked loss of lorakit.lm_loss), backward, and
                  the optimizer `lorakit.train.loop.build_optimizer` makes (AdamW, fused kernel)
    lorakit_ckpt  the same with activation checkpointing (`enable_activation_checkpointing`, as
                  `run.activation_checkpointing: true` does)
    peft          zero_grad, the PEFT model's own `labels=` loss (full logits), backward, `torch.optim.AdamW`
    forward       the frozen base model's forward under `torch.no_grad()`

All use lr 1e-4 and weight decay 0.01 (torch's AdamW default). Run A B C D A B C D ... after `--warmup` rounds
(which also create the optimizers' state). Prints the median time of each, the ratios, and one JSON line.

Peak memory of a step: free heap memory is handed back to the OS (glibc's `malloc_trim(0)`, or jemalloc's purge of
every arena where jemalloc is preloaded), the kernel's resident-set
high-water mark is reset (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0), and the figure is VmHWM after the step
minus VmRSS before it: the most memory the step held at once beyond what was resident before, exact to the page
and independent of sampling. Where clear_refs cannot be written, a thread samples the RSS every millisecond
instead (the JSON line names the method). The medians over the measured rounds are reported.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import re
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lorakit import LoraConfig, inject
from lorakit.allocator import ALLOCATORS, active_allocator, use_allocator
from lorakit.errors import LorakitError
from lorakit.models import load_model
from lorakit.train.loop import build_optimizer
from lorakit.train.run import enable_activation_checkpointing
from lorakit.train.sections import OptimSection
from lorakit.train.tasks.instruction import InstructionTuning

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MB = 1024 * 1024


def _status_kb(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def _can_reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _free_memory_release() -> tuple[str, Callable[[], None]]:
    """(the allocator serving this process, a function that hands its free memory back to the OS): jemalloc's
    purge of every arena under jemalloc (`--allocator jemalloc`), glibc's `malloc_trim(0)` under glibc."""
    allocator, process = active_allocator(), ctypes.CDLL(None)
    if allocator == "jemalloc":
        def purge() -> None:
            if process.mallctl(b"arena.4096.purge", None, None, None, ctypes.c_size_t(0)) != 0:  # all arenas
                raise RuntimeError("jemalloc refused arena.4096.purge")

        return allocator, purge
    if allocator == "glibc":
        def trim_heap() -> None:
            process.malloc_trim(0)

        return allocator, trim_heap
    return allocator, lambda: None


class PeakMemory:
    """Peak resident memory of a block beyond the resident memory before it, in bytes (see the docstring)."""

    def __init__(self) -> None:
        self.method = "vmhwm" if _can_reset_peak() else "rss-sampling-1ms"
        self.allocator, self._release = _free_memory_release()

    def measure(self, step: Callable[[], None]) -> int:
        self._release()
        before = _status_kb("VmRSS") * 1024
        if self.method == "vmhwm":
            Path("/proc/self/clear_refs").write_text("5")
            step()
            return _status_kb("VmHWM") * 1024 - before
        peak, done = [before], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _status_kb("VmRSS") * 1024)
                time.sleep(0.001)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            step()
        finally:
            done.set()
            sampler.join()
        return max(peak[0], _status_kb("VmRSS") * 1024) - before


def step_arguments(description: str) -> argparse.Namespace:
    """The command line of the step races: rounds, warm-up and the reference setting's sizes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=5, help="measured rounds (each runs all four steps)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--allocator", choices=ALLOCATORS, default="system",
                        help="jemalloc: start again with jemalloc preloaded (lorakit.allocator), as run.allocator does")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    try:
        use_allocator(args.allocator, [sys.executable, *sys.argv])
    except LorakitError as e:
        parser.error(str(e))
    return args


def interleaved_steps(steps: dict[str, Callable[[], float | None]], rounds: int, warmup: int, memory: PeakMemory
                      ) -> tuple[dict[str, list[float]], dict[str, list[int]], dict[str, float | None]]:
    """Run the steps A B C ... A B C ..., `warmup` unmeasured rounds first; return each step's seconds and peak
    memory (bytes) per measured round, and the value its first call returned (a loss)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    peaks: dict[str, list[int]] = {name: [] for name in steps}
    first: dict[str, float | None] = {}
    for round_ in range(warmup + rounds):
        for name, step in steps.items():
            result: list[float | None] = []

            def run(step: Callable[[], float | None] = step, result: list[float | None] = result) -> None:
                result.append(step())

            start = time.perf_counter()
            peak = memory.measure(run)
            elapsed = time.perf_counter() - start
            first.setdefault(name, result[0])
            if round_ >= warmup:
                times[name].append(elapsed)
                peaks[name].append(peak)
            kind = "warmup" if round_ < warmup else "step"
            print(f"{kind} {round_}: {name:12s} {elapsed:7.3f} s  peak +{peak / MB:7.1f} MB", flush=True)
    return times, peaks, first


def build(batch_size: int, seq_len: int, rank: int, alpha: float, seed: int
          ) -> tuple[dict[str, Callable[[], float | None]], dict[str, torch.Tensor]]:
    """The four steps as closures (each returns its loss, or None) over their own model copies."""
    import peft

    base, tokenizer = load_model("smollm2")
    base.eval().requires_grad_(False)
    vocab = base.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    optim = OptimSection(lr=1e-4, weight_decay=0.01)
    ours = copy.deepcopy(base).train()
    inject(ours, LoraConfig(rank=rank, alpha=alpha, targets=["llama"], dropout=0.0, seed=seed))
    ours_opt = build_optimizer(ours, optim)
    ours_ckpt = copy.deepcopy(ours)
    enable_activation_checkpointing(ours_ckpt)
    ckpt_opt = build_optimizer(ours_ckpt, optim)
    task = InstructionTuning(tokenizer)

    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=LLAMA_PROJECTIONS, lora_dropout=0.0)).train()
    theirs_opt = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-4)

    def lorakit_step(model: torch.nn.Module = ours, opt: torch.optim.Optimizer = ours_opt) -> float:
        opt.zero_grad(set_to_none=True)
        loss = task.loss(model, batch)
        loss.backward()
        opt.step()
        return loss.item()

    def peft_step() -> float:
        theirs_opt.zero_grad(set_to_none=True)
        loss = theirs(**batch).loss
        loss.backward()
        theirs_opt.step()
        return float(loss.item())

    def forward_step() -> None:
        with torch.no_grad():
            base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    def lorakit_ckpt_step() -> float:
        return lorakit_step(ours_ckpt, ckpt_opt)

    return {"lorakit": lorakit_step, "lorakit_ckpt": lorakit_ckpt_step, "peft": peft_step,
            "forward": forward_step}, batch


def main() -> None:
    args = step_arguments(__doc__.splitlines()[0])

    steps, _ = build(args.batch_size, args.seq_len, args.rank, args.alpha, args.seed)
    memory = PeakMemory()
    times, peaks, first_losses = interleaved_steps(steps, args.steps, args.warmup, memory)
    median = {name: statistics.median(values) for name, values in times.items()}
    peak_mb = {name: statistics.median(values) / MB for name, values in peaks.items()}
    ratios = {"lorakit_over_peft": median["lorakit"] / median["peft"],
              "lorakit_over_forward": median["lorakit"] / median["forward"],
              "peft_over_forward": median["peft"] / median["forward"],
              "lorakit_over_peft_peak_memory": peak_mb["lorakit"] / peak_mb["peft"],
              "ckpt_over_peft_peak_memory": peak_mb["lorakit_ckpt"] / peak_mb["peft"],
              "ckpt_over_lorakit_time": median["lorakit_ckpt"] / median["lorakit"]}
    for name in steps:
        print(f"median {name:8s} {median[name]:7.3f} s  peak +{peak_mb[name]:7.1f} MB  (n={len(times[name])})")
    print("  ".join(f"{key} {value:.2f}" for key, value in ratios.items()))
    # B starts at zero in both, so the first steps' losses are the base model's: a check that both train the same.
    print(f"first-step loss: lorakit {first_losses['lorakit']:.6f}, peft {first_losses['peft']:.6f}")
    print(json.dumps({
        "benchmark": "train_step", "model": "smollm2", "batch_size": args.batch_size, "seq_len": args.seq_len,
        "rank": args.rank, "alpha": args.alpha, "dtype": "float32", "steps": args.steps, "warmup": args.warmup,
        "threads": torch.get_num_threads(), "memory_method": memory.method, "allocator": memory.allocator,
        **{f"{name}_s": median[name] for name in steps}, **{f"{name}_peak_mb": peak_mb[name] for name in steps},
        **ratios, "first_loss_lorakit": first_losses["lorakit"], "first_loss_peft": first_losses["peft"],
    }))


if __name__ == "__main__":
    main()
