"""1 process vs 2 processes (torchrun, gloo; ddp, and fsdp with --fsdp) on the SST-2 LoRA recipe: training
throughput, interleaved.

    .venv/bin/python benchmarks/distributed_scaling.py [--steps 60] [--repeats 2] [--fsdp]

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


def run(nproc: int, steps: int, out_dir: Path, parallel: str = "ddp") -> float:
    """Examples per training second of one run."""
    per_rank = 32 // nproc
    flags = ["--quiet", f"--optim.max_steps={steps}", f"--optim.batch_size={per_rank}",
             f"--run.out_dir={out_dir}", "--data.eval_limit=32", f"--run.parallel={parallel}"]
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
    parser.add_argument("--fsdp", action="store_true", help="add 2 processes with run.parallel=fsdp")
    args = parser.parse_args()
    arms = [(1, "ddp"), (2, "ddp")] + ([(2, "fsdp")] if args.fsdp else [])
    results: dict[tuple[int, str], list[float]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for nproc, parallel in arms:  # interleaved: 1 2 1 2 ... (1 2 2-fsdp ... with --fsdp)
                results[nproc, parallel].append(run(nproc, args.steps, Path(tmp) / f"r{i}-{nproc}-{parallel}",
                                                    parallel))
                print(f"run {i} nproc={nproc} {parallel}: {results[nproc, parallel][-1]:.1f} examples/s", flush=True)
    one, two = statistics.median(results[1, "ddp"]), statistics.median(results[2, "ddp"])
    print(f"median: 1 process {one:.1f} examples/s, 2 processes {two:.1f} examples/s, ratio {two / one:.2f}x")
    row = {"benchmark": "distributed_scaling", "steps": args.steps, "examples_per_s_1": one,
           "examples_per_s_2": two, "ratio": two / one, "cpu_count": os.cpu_count()}
    if args.fsdp:
        fsdp = statistics.median(results[2, "fsdp"])
        print(f"median: 2 processes fsdp {fsdp:.1f} examples/s, ratio {fsdp / one:.2f}x to 1 process, "
              f"{fsdp / two:.2f}x to 2 ddp")
        row |= {"examples_per_s_2_fsdp": fsdp, "ratio_fsdp": fsdp / one}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
