"""1 process vs 2 processes (torchrun, gloo) on the SST-2 LoRA recipe: training throughput, interleaved.

    .venv/bin/python benchmarks/distributed_scaling.py [--steps 60] [--repeats 2]

The global batch is the same in both (32 = 1 x 32 = 2 x 16), so the runs do the same work per step. On a
2-core machine the single process uses both cores through intra-op threads and each of the two processes one;
expect well under 2x. Prints medians of examples/s, their ratio, and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "sst2-minilm.yaml"


def run(nproc: int, steps: int, out_dir: Path) -> float:
    """Examples per training second of one run."""
    per_rank = 32 // nproc
    flags = ["--quiet", f"--optim.max_steps={steps}", f"--optim.batch_size={per_rank}",
             f"--run.out_dir={out_dir}", "--data.eval_limit=32"]
    if nproc == 1:
        command = [sys.executable, "-m", "lorakit", "train", str(RECIPE), *flags]
        env = dict(os.environ)
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   "-m", "lorakit", "train", str(RECIPE), *flags]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc))}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    return steps * 32 / summary["train_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    results: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for nproc in (1, 2):  # interleaved: 1 2 1 2 ...
                results[nproc].append(run(nproc, args.steps, Path(tmp) / f"r{i}-{nproc}"))
                print(f"run {i} nproc={nproc}: {results[nproc][-1]:.1f} examples/s", flush=True)
    one, two = statistics.median(results[1]), statistics.median(results[2])
    print(f"median: 1 process {one:.1f} examples/s, 2 processes {two:.1f} examples/s, ratio {two / one:.2f}x")
    print(json.dumps({"benchmark": "distributed_scaling", "steps": args.steps, "examples_per_s_1": one,
                      "examples_per_s_2": two, "ratio": two / one, "cpu_count": os.cpu_count()}))


if __name__ == "__main__":
    main()
