"""Adapter arithmetic on two real tasks: SmolLM2's translation adapter and the demo's digit-reversal adapter,
each scored on both tasks, then their exact sum (`cat`), the translation adapter minus the demo's, the translation
adapter plus 0.3 x the demo's, and TIES at density 0.2 (rank: the sum of the two). A measurement for
docs/arithmetic.md, not a test.

    .venv/bin/python benchmarks/arithmetic_demo.py [--translation runs/mt-lora/adapter] [--demo runs/demo/adapter] \
        [--out runs/arithmetic] [--sentences 40]

Digit reversal: exact match on the demo's 200 held-out lists (greedy). Translation: BLEU and chrF (sacrebleu) of
greedy translations of the first `--sentences` Multi30k test pairs, as `lorakit eval recipes/multi30k-smollm2.yaml`
computes them. Prints one line per adapter and one JSON line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import add_threads_option, apply_threads

from lorakit import demo_task
from lorakit.arithmetic import combine
from lorakit.demo import demo_accuracy
from lorakit.inference import load_for_inference
from lorakit.train.config import load_train_config
from lorakit.train.evaluate import evaluate_from_config

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--translation", default="runs/mt-lora/adapter")
    parser.add_argument("--demo", default="runs/demo/adapter")
    parser.add_argument("--out", default="runs/arithmetic")
    parser.add_argument("--sentences", type=int, default=40)
    add_threads_option(parser)
    args = parser.parse_args()
    apply_threads(parser, args.threads)

    out = Path(args.out)
    summed = out / "translation+demo"
    minus = out / "translation-demo"
    combine({"translation": (args.translation, 1.0), "demo": (args.demo, 1.0)}, summed, method="cat", force=True)
    combine({"translation": (args.translation, 1.0), "demo": (args.demo, -1.0)}, minus, method="cat", force=True)
    damped, ties = out / "translation+0.3demo", out / "ties"
    combine({"translation": (args.translation, 1.0), "demo": (args.demo, 0.3)}, damped, method="cat", force=True)
    combine({"translation": (args.translation, 1.0), "demo": (args.demo, 1.0)}, ties, method="ties", density=0.2,
            force=True)
    adapters = {"base": None, "translation": args.translation, "demo": args.demo, "translation + demo": str(summed),
                "translation - demo": str(minus), "translation + 0.3 demo": str(damped),
                "TIES, density 0.2": str(ties)}
    _, held_out = demo_task.split()
    test = ROOT.parent / "shared" / "data" / "multi30k" / "test.{de,en}"  # the data lies beside the repository
    config = load_train_config(ROOT / "recipes" / "multi30k-smollm2.yaml", [
        f"--data.eval={test}", f"--data.eval_limit={args.sentences}"])
    rows = {}
    for name, adapter in adapters.items():
        loaded = load_for_inference("smollm2", adapter)
        reversal, _ = demo_accuracy(loaded.model, loaded.tokenizer, held_out)
        metrics = evaluate_from_config(config, adapter=adapter).metrics
        rows[name] = {"reversal_exact": reversal, "bleu": metrics.get("bleu"), "chrf": metrics.get("chrf")}
        print(f"{name:20s} digit reversal {reversal:.3f}  translation BLEU {metrics.get('bleu', float('nan')):.2f} "
              f"chrF {metrics.get('chrf', float('nan')):.2f}", flush=True)
    print(json.dumps({"benchmark": "arithmetic_demo", "sentences": args.sentences, "rows": rows}))


if __name__ == "__main__":
    main()
