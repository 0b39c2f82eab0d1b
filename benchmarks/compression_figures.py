"""The trade-off figures of docs/compression.md, drawn from recorded results (no training here).

    .venv/bin/python benchmarks/compression_figures.py [--results docs/results.json] \
        [--truncation runs/factorize-truncation.json] [--out docs/figures]

- `compression-sst2.png`: SST-2 dev accuracy of MiniLM against the share of the encoder's linear parameters kept,
  after truncation alone (`run.method=head-only`) and after recovery fine-tuning (`run.method=factors`), plain SVD
  against activation-aware, with the uncompressed full fine-tuning as a line. The points are the rows of the
  results file whose command is `lorakit train recipes/sst2-minilm.yaml ... --compress.ratio=R` (the newest row of
  each ratio, method and run method), so every point is a recorded command; and the fine-tuned model truncated
  without training: `lorakit eval recipes/sst2-minilm.yaml --model.name=.../rR-M` rows (the directories
  `lorakit factorize --ratio R --method M` wrote, named so in docs/compression.md).
- `compression-smollm2.png`: SmolLM2's held-out perplexity on the Alpaca demo set against the ratio, truncation
  alone (the JSON line `benchmarks/factorize_truncation.py` prints) and, where recorded, after recovery fine-tuning
  (`lorakit train recipes/alpaca-smollm2.yaml ... --compress.ratio=R --run.method=factors` rows).

Prints the points it drew, one line each.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("svd", "activation")
STYLE = {"svd": ("tab:blue", "plain SVD"), "activation": ("tab:orange", "activation-aware")}


def compression_points(rows: list[dict[str, Any]], recipe: str) -> dict[tuple[str, str, float], dict[str, Any]]:
    """(run method, compression method, ratio) -> the newest result row of `recipe` trained with that setting."""
    points: dict[tuple[str, str, float], dict[str, Any]] = {}
    for row in rows:
        command = row.get("command") or ""
        ratio = re.search(r"--compress\.ratio=([0-9.]+)(?:\s|$)", command)
        if not command.startswith(f"lorakit train recipes/{recipe}") or ratio is None:
            continue
        method = re.search(r"--compress\.method=(\w+)", command)
        points[(row["method"], method.group(1) if method else "svd", float(ratio.group(1)))] = row
    return points


def truncated_points(rows: list[dict[str, Any]], recipe: str) -> dict[tuple[str, float], dict[str, Any]]:
    """(method, ratio) -> the newest eval row of `recipe` on a factorised directory named `rR-M`."""
    points: dict[tuple[str, float], dict[str, Any]] = {}
    for row in rows:
        command = row.get("command") or ""
        name = re.search(r"--model\.name=\S*/r([0-9.]+)-(svd|activation)(?:\s|$)", command)
        if command.startswith(f"lorakit eval recipes/{recipe}") and name:
            points[(name.group(2), float(name.group(1)))] = row
    return points


def uncompressed_full(rows: list[dict[str, Any]], recipe: str) -> dict[str, Any] | None:
    full = [r for r in rows if r["method"] == "full" and (r.get("command") or "").startswith(
        f"lorakit train recipes/{recipe}") and "--compress." not in r["command"]]
    return full[-1] if full else None


def sst2_figure(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib.pyplot as plt

    points = compression_points(rows, "sst2-minilm.yaml")
    fig, ax = plt.subplots(figsize=(7.0, 5.6))
    for method in METHODS:
        color, label = STYLE[method]
        for run, line, stage in (("factors", "-", "recovery"), ("head-only", ":", "truncation only, new head")):
            xs = sorted(r for m, c, r in points if m == run and c == method)
            if xs:
                ys = [points[(run, method, x)]["value"] for x in xs]
                ax.plot(xs, ys, line, marker="o", color=color, label=f"{label}, {stage}")
                for x, y in zip(xs, ys, strict=True):
                    print(f"sst2 {method:10s} {stage:15s} ratio {x}: accuracy {y:.4f}")
    truncated = truncated_points(rows, "sst2-minilm.yaml")
    for method in METHODS:
        color, label = STYLE[method]
        xs = sorted(r for m, r in truncated if m == method)
        if xs:
            ys = [truncated[(method, x)]["value"] for x in xs]
            ax.plot(xs, ys, "--", marker="^", color=color, label=f"{label}, fine-tuned model truncated")
            for x, y in zip(xs, ys, strict=True):
                print(f"sst2 {method:10s} fine-tuned, truncated ratio {x}: accuracy {y:.4f}")
    distilled = [(r, row) for (m, c, r), row in points.items() if m == "factors+distill" and c == "svd"]
    for ratio, row in distilled:
        ax.plot([ratio], [row["value"]], "*", color="tab:green", markersize=11,
                label="plain SVD, recovery distilled from the full fine-tune" if ratio == distilled[0][0] else None)
    full = uncompressed_full(rows, "sst2-minilm.yaml")
    if full is not None:
        ax.axhline(full["value"], color="black", linewidth=1,
                   label=f"uncompressed, full fine-tuning ({full['value']:.4f})")
        ax.axhline(full["value"] - 0.03, color="black", linewidth=1, linestyle="--", label="3 points below it")
    ax.set_xlabel("share of the encoder's linear parameters kept (compress.ratio)")
    ax.set_ylabel("SST-2 dev accuracy")
    ax.set_title("MiniLM on SST-2, factorised")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def smollm2_figure(rows: list[dict[str, Any]], truncation: dict[str, Any] | None, out: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if truncation is not None:
        for method in METHODS:
            color, label = STYLE[method]
            pts = sorted((p["ratio"], p["perplexity"]) for p in truncation["points"] if p["method"] == method)
            if pts:
                ax.plot(*zip(*pts, strict=True), ":", marker="o", color=color, label=f"{label}, truncation only")
                for x, y in pts:
                    print(f"smollm2 {method:10s} truncation only ratio {x}: perplexity {y:.4g}")
        ax.axhline(math.exp(truncation["dense_loss"]), color="black", linewidth=1,
                   label=f"dense ({math.exp(truncation['dense_loss']):.2f})")
    points = compression_points(rows, "alpaca-smollm2.yaml")
    for method in METHODS:
        color, label = STYLE[method]
        xs = sorted(r for m, c, r in points if m == "factors" and c == method)
        if xs:
            ys = [math.exp(points[("factors", method, x)]["value"]) for x in xs]
            ax.plot(xs, ys, "-", marker="s", color=color, label=f"{label}, recovery")
            for x, y in zip(xs, ys, strict=True):
                print(f"smollm2 {method:10s} recovery        ratio {x}: perplexity {y:.4g}")
    ax.set_yscale("log")
    ax.set_xlabel("share of the projections' parameters kept (ratio)")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title("SmolLM2-135M on the Alpaca demo set, factorised")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(ROOT / "docs" / "results.json"))
    parser.add_argument("--truncation", default=str(ROOT / "runs" / "factorize-truncation.json"),
                        help="the JSON line of benchmarks/factorize_truncation.py (skipped when missing)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "figures"))
    args = parser.parse_args()
    rows = json.loads(Path(args.results).read_text())
    truncation_file = Path(args.truncation)
    truncation = json.loads(truncation_file.read_text()) if truncation_file.is_file() else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sst2_figure(rows, out / "compression-sst2.png")
    smollm2_figure(rows, truncation, out / "compression-smollm2.png")
    print(f"wrote {out / 'compression-sst2.png'} and {out / 'compression-smollm2.png'}")


if __name__ == "__main__":
    main()
