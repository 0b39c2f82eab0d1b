"""How much truncation alone costs: SmolLM2's projections factorised at several parameter ratios, plain SVD against
activation-aware (SVD-LLM whitening), scored by the held-out loss of the Alpaca demo recipe, before any recovery
fine-tuning. A measurement, not a test.

    .venv/bin/python benchmarks/factorize_truncation.py [--ratios 0.9,0.7,0.5,0.3] [--calibration 16]

The model, data and held-out split are those of `lorakit train recipes/alpaca-smollm2.yaml` (the 10% held out, 99
examples); the activation-aware method gathers each layer's input covariance on the first `--calibration` training
examples. Prints one line per point and one JSON line at the end.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from common import add_threads_option, apply_threads, machine

from lorakit.compress import factorize
from lorakit.train.config import load_train_config
from lorakit.train.run import prepare

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "alpaca-smollm2.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.9,0.7,0.5,0.3", help="parameter ratios of the chosen layers")
    parser.add_argument("--methods", default="svd,activation")
    parser.add_argument("--calibration", type=int, default=16, help="training examples for the input covariances")
    parser.add_argument("--eval-batch-size", type=int, default=8)
    add_threads_option(parser)
    args = parser.parse_args()
    apply_threads(parser, args.threads)

    config = load_train_config(RECIPE, ["--run.method=full"])  # no adapter: the plain pretrained model
    prepared = prepare(config)
    model, task = prepared.model.eval(), prepared.task
    calibration = [task.collate(prepared.train[i:i + 4]) for i in range(0, args.calibration, 4)]
    calibration = [{k: v for k, v in batch.items() if k != "labels"} for batch in calibration]

    def held_out_loss(m: torch.nn.Module) -> float:
        return task.evaluate(m, prepared.eval, args.eval_batch_size)["loss"]

    base_loss = held_out_loss(model)
    print(f"dense: held-out loss {base_loss:.4f}, perplexity {math.exp(base_loss):.3f}", flush=True)
    points = []
    for ratio in (float(r) for r in args.ratios.split(",")):
        for method in args.methods.split(","):
            copy_ = copy.deepcopy(model)
            started = time.perf_counter()
            report = factorize(copy_, ["llama"], ratio=ratio, method=method,
                               calibration=calibration if method == "activation" else None)
            seconds = time.perf_counter() - started
            loss = held_out_loss(copy_)
            point = {"ratio": ratio, "method": method, "loss": loss, "perplexity": math.exp(loss),
                     "params_before": report.parameters_before, "params_after": report.parameters_after,
                     "factorized": len(report.factorized), "factorize_s": seconds}
            points.append(point)
            print(f"ratio {ratio} {method:10s}: held-out loss {loss:.4f}, perplexity {math.exp(loss):.2f}, "
                  f"{report.parameters_after:,} of {report.parameters_before:,} parameters, "
                  f"{len(report.factorized)} layers factorised, {seconds:.1f} s", flush=True)
            del copy_
    print(json.dumps({"benchmark": "factorize_truncation", "model": "smollm2", "recipe": "alpaca-smollm2",
                      "held_out": len(prepared.eval), "calibration_examples": args.calibration,
                      "dense_loss": base_loss, "points": points, **machine()}))


if __name__ == "__main__":
    main()
