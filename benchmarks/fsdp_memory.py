"""Two processes under torchrun, ddp against fsdp, on SmolLM2 with a rank-8 LoRA on every linear layer: the bytes of
base weights each process holds, its resident memory, the peak of a training step and the step time, interleaved.

    .venv/bin/python benchmarks/fsdp_memory.py [--steps 6] [--repeats 2] [--batch 4] [--seq 128] [--model smollm2]

Each repeat launches `torchrun --nproc-per-node 2` once per mode (ddp fsdp ddp fsdp ...), one intra-op thread per
process. A worker loads the model, injects the adapter, wraps it (DDP, or lorakit.sharding.shard), builds
lorakit's optimizer and runs one warm-up step, then `--steps` timed steps of causal-LM loss on fixed random
tokens (batch x seq per process). Figures per process (the larger of the two ranks):
  base_bytes    storage of the frozen parameters the process holds (fsdp: its shards, padding included)
  rss_model     resident memory after wrapping and garbage collection, minus that before the model loaded
  step_peak     the peak resident memory during the timed steps (VmHWM reset before them), minus the same baseline
  step_s        median seconds per optimizer step on rank 0
Prints each run, the medians with the fsdp/ddp ratios, and one JSON line.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ("base_bytes", "rss_model", "step_peak", "step_s")


def _rss(field: str = "VmRSS") -> int:
    match = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) * 1024 if match else 0


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so RSS shows what is still held
    except OSError:
        pass


def _frozen_bytes(model: object) -> int:
    from torch.distributed.tensor import DTensor

    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # type: ignore[attr-defined]
        if p.requires_grad:
            continue
        local = p.to_local() if isinstance(p, DTensor) else p
        storage = local.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def worker(args: argparse.Namespace) -> None:
    import torch

    from lorakit import distributed, sharding
    from lorakit.config import LoraConfig
    from lorakit.inject import inject
    from lorakit.models import load_model
    from lorakit.train.loop import build_optimizer
    from lorakit.train.sections import OptimSection

    device = torch.device("cpu")
    world = distributed.init_world(device)
    _trim()
    baseline = _rss()
    torch.manual_seed(0)
    model, _ = load_model(args.model, head="causal-lm")
    inject(model, LoraConfig(rank=8, alpha=16, targets=["all-linear"]))
    if args.parallel == "fsdp":
        train_model = sharding.shard(model, world, device)
    else:
        train_model = distributed.wrap(model, world, device)
    _trim()
    rss_model = _rss() - baseline
    base_bytes = _frozen_bytes(model)
    optimizer = build_optimizer(model, OptimSection(lr=1e-4))
    vocab = int(model.config.vocab_size)  # type: ignore[union-attr]
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(world.rank))

    def step() -> None:
        loss = train_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer state allocated, kernels chosen
    _trim()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak below is the steps', not the load's
    times = []
    for _ in range(args.steps):
        distributed.barrier(world)
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = _rss("VmHWM") - baseline
    row = {"rank": world.rank, "parallel": args.parallel, "base_bytes": base_bytes, "rss_model": rss_model,
           "step_peak": peak, "step_s": statistics.median(times)}
    Path(args.out, f"rank{world.rank}.json").write_text(json.dumps(row))  # ranks printing at once would interleave
    distributed.shutdown(world)


def launch(args: argparse.Namespace, parallel: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__,
                   "--worker", f"--parallel={parallel}", f"--steps={args.steps}", f"--batch={args.batch}",
                   f"--seq={args.seq}", f"--model={args.model}", f"--out={out}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        log = Path(out, "log.txt")
        with log.open("w") as sink:  # a file, not a pipe: torchrun's helper process may hold a pipe open after exit
            code = subprocess.run(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT).returncode
        if code != 0:
            raise SystemExit(f"{parallel} run failed:\n{log.read_text()[-3000:]}")
        rows = [json.loads(f.read_text()) for f in sorted(Path(out).glob("rank*.json"))]
    assert len(rows) == 2, rows
    out = {k: float(max(r[k] for r in rows)) for k in ("base_bytes", "rss_model", "step_peak")}
    out["step_s"] = next(r["step_s"] for r in rows if r["rank"] == 0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--parallel", default="ddp", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=".", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    results: dict[str, list[dict[str, float]]] = {"ddp": [], "fsdp": []}
    for i in range(args.repeats):
        for parallel in ("ddp", "fsdp"):  # interleaved: ddp fsdp ddp fsdp ...
            row = launch(args, parallel)
            results[parallel].append(row)
            print(f"run {i} {parallel}: " + ", ".join(f"{k} {_show(k, row[k])}" for k in FIGURES), flush=True)
    medians = {p: {k: statistics.median(r[k] for r in rows) for k in FIGURES} for p, rows in results.items()}
    for parallel, row in medians.items():
        print(f"median {parallel} (per process): " + ", ".join(f"{k} {_show(k, row[k])}" for k in FIGURES))
    ratios = {k: medians["fsdp"][k] / medians["ddp"][k] for k in FIGURES}
    print("fsdp / ddp: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    print(json.dumps({"benchmark": "fsdp_memory", "model": args.model, "steps": args.steps, "batch": args.batch,
                      "seq": args.seq, "medians": medians, "ratios": ratios, "cpu_count": os.cpu_count()}))


def _show(key: str, value: float) -> str:
    return f"{value:.3f} s" if key == "step_s" else f"{value / 2**20:.1f} MiB"


if __name__ == "__main__":
    main()
