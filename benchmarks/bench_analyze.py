"""`lorakit analyze` end to end: a rank-16 adapter on all 210 SmolLM2 projections, analysed and reported.

    .venv/bin/python benchmarks/bench_analyze.py [--repeats 3] [--warmup 1] [--threads N]

The adapter: `targets=["llama"]` (q, k, v, o, gate, up, down in 30 layers), rank 16, alpha 32, A from the standard
init and B drawn N(0, 0.02²) so that ΔW ≠ 0, saved to a temporary directory with base `smollm2`. Each round times
`analyze_adapter(adapter)` + `write_report(...)` from the adapter's files, loading the base included (it is needed
for §7.3 and the token projection), against the same without the base (`base=False`: spectra only), interleaved.
Prints the median of each and one JSON line. Target: <= 10 s end to end on a 2-core machine. On a machine where
other work holds cores, pass `--threads 1`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from common import adapter_race_parser, machine, medians, parse_race_args, race

from lorakit import LoraConfig, inject, save_adapter
from lorakit.analysis import analyze_adapter, write_report
from lorakit.models import load_model

TARGET_S = 10.0


def make_adapter(path: Path, rank: int, alpha: float, seed: int) -> int:
    """Save a rank-`rank` adapter with a random nonzero B on every SmolLM2 projection; return its module count."""
    model, _ = load_model("smollm2")
    report = inject(model, LoraConfig(rank=rank, alpha=alpha, targets=["llama"], seed=seed))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    save_adapter(model, path, base_model="smollm2")
    return len(report.adapted)


def main() -> None:
    args = parse_race_args(adapter_race_parser(__doc__.splitlines()[0], repeats=3))

    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / "adapter"
        modules = make_adapter(adapter, args.rank, args.alpha, args.seed)

        def full() -> None:
            write_report(analyze_adapter(adapter), Path(tmp) / "full", force=True)

        def factors_only() -> None:
            write_report(analyze_adapter(adapter, base=False), Path(tmp) / "factors", force=True)

        times = race({"analyze": full, "factors_only": factors_only}, args.repeats, args.warmup)
        median = medians(times)
        figures = sorted(p.name for p in (Path(tmp) / "full").glob("*.png"))
    for name, value in median.items():
        print(f"median {name:14s} {value:7.3f} s  (n={len(times[name])})")
    print(f"analyze {median['analyze']:.3f} s  target: <= {TARGET_S:g} s")
    print(json.dumps({
        "benchmark": "analyze", "model": "smollm2", "modules": modules, "rank": args.rank, "alpha": args.alpha,
        "repeats": args.repeats, "warmup": args.warmup, **machine(), "figures": figures,
        "analyze_s": median["analyze"], "factors_only_s": median["factors_only"],
        "target_analyze_s": TARGET_S, "meets_target": median["analyze"] <= TARGET_S,
    }))


if __name__ == "__main__":
    main()
