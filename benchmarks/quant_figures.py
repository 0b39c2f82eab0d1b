"""Quantized base figures on SmolLM2-135M-Instruct: stored bytes of NF4 / int8, and the initialisation error.

    .venv/bin/python benchmarks/quant_figures.py [--ranks 16 64] [--iters 5] [--svd-iters N] [--every 1] [--threads 1]

Bytes: the 210 attention and MLP projections (the linear layers of the 30 blocks) quantized by `lorakit.quant`,
constants included (NF4: packed codes, 8-bit block absmax, the second level's fp32 absmax, code tables, offset;
int8: codes and one fp32 absmax per row), against their fp32 bytes; the layers that stay dense (embeddings, norms,
tied head) reported apart. Targets: NF4 <= 0.16x, int8 <= 0.28x.

Initialisation: for every projection (or every `--every`-th), ‖W - (deq(Q(res)) + s·BA)‖_F of QPiSSA and of LoftQ
(`--iters` alternations) against plain QLoRA's ‖W - deq(Q(W))‖_F, summed, at each rank (NF4, block 64, double
quantization; exact SVD, or randomized with `--svd-iters`). A measurement, not a race: no timing is reported.
Prints one line per setting and one JSON line.
"""

from __future__ import annotations

import argparse
import json

import torch
from common import machine

from lorakit import load_model, quant
from lorakit.quant_init import init_matrix, reconstruction_error


def stored_bytes(kind: str) -> dict[str, float]:
    model, _ = load_model("smollm2")
    names = quant.block_linear_names(model)
    fp32 = sum(model.get_submodule(n).weight.numel() * 4 for n in names)
    quant.quantize_model(model, kind)
    counts = quant.base_bytes(model)
    return {"kind": kind, "layers": len(names), "fp32_bytes": fp32, "quantized_bytes": counts["quantized"],
            "ratio": counts["quantized"] / fp32, "dense_bytes": counts["dense"]}


def init_errors(ranks: list[int], iters: int, svd_iters: int | None, every: int) -> list[dict[str, object]]:
    model, _ = load_model("smollm2")
    names = quant.block_linear_names(model)[::every]
    rows = []
    for rank in ranks:
        sums = {"qlora": 0.0, "qpissa": 0.0, "loftq": 0.0}
        generator = torch.Generator().manual_seed(0)
        for name in names:
            w = model.get_submodule(name).weight.detach()
            for method in sums:
                a, b, q, _ = init_matrix(w, rank, 1.0, "nf4", method, iters=iters, svd_iters=svd_iters,
                                         generator=generator)
                sums[method] += reconstruction_error(w, q, a, b, 1.0)
        row: dict[str, object] = {"rank": rank, "matrices": len(names), "svd_iters": svd_iters, "iters": iters,
                                  **{f"{m}_error": v for m, v in sums.items()}}
        row["qpissa_cut"] = 1 - sums["qpissa"] / sums["qlora"]
        row["loftq_cut"] = 1 - sums["loftq"] / sums["qlora"]
        print(f"rank {rank}: {len(names)} matrices, summed error qlora {sums['qlora']:.3f}, qpissa "
              f"{sums['qpissa']:.3f} ({100 * row['qpissa_cut']:.1f}% less), loftq x{iters} {sums['loftq']:.3f} "
              f"({100 * row['loftq_cut']:.1f}% less)", flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--svd-iters", type=int, default=None)
    parser.add_argument("--every", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-init", action="store_true", help="report the bytes only")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [stored_bytes(kind) for kind in quant.KINDS]
    for s in sizes:
        print(f"{s['kind']}: {s['layers']} block linears, {s['quantized_bytes'] / 2**20:.1f} MiB stored vs "
              f"{s['fp32_bytes'] / 2**20:.1f} MiB fp32 = {s['ratio']:.3f}x; dense layers "
              f"{s['dense_bytes'] / 2**20:.1f} MiB", flush=True)
    errors = [] if args.skip_init else init_errors(args.ranks, args.iters, args.svd_iters, args.every)
    print(json.dumps({"benchmark": "quant_figures", "bytes": sizes, "init": errors, "machine": machine()}))


if __name__ == "__main__":
    main()
