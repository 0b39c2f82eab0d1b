"""How sure a distillation teacher is on the student's training data: its accuracy there and its mean top
probability at T = 1 and at the distillation temperature. A measurement for docs/compression.md, not a test.

    .venv/bin/python benchmarks/teacher_confidence.py [--config recipes/sst2-minilm.yaml] \
        [--teacher runs/sst2-full/model] [--temperature 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json

import torch
from common import add_threads_option, apply_threads

from lorakit.inference import load_for_inference
from lorakit.train.config import load_train_config
from lorakit.train.run import prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="recipes/sst2-minilm.yaml")
    parser.add_argument("--teacher", default="runs/sst2-full/model")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=64)
    add_threads_option(parser)
    args = parser.parse_args()
    apply_threads(parser, args.threads)

    prepared = prepare(load_train_config(args.config, ["--run.method=head-only"]))  # the student's training data
    teacher = load_for_inference(args.teacher).model.eval()
    correct, top, top_t, count = 0, 0.0, 0.0, 0
    with torch.no_grad():
        for start in range(0, len(prepared.train), args.batch_size):
            batch = prepared.task.collate(prepared.train[start:start + args.batch_size])
            labels = batch.pop("labels")
            logits = teacher(**batch).logits  # (B, C)
            correct += int((logits.argmax(-1) == labels).sum())
            top += float(logits.softmax(-1).amax(-1).sum())
            top_t += float((logits / args.temperature).softmax(-1).amax(-1).sum())
            count += len(labels)
    result = {"teacher": args.teacher, "examples": count, "accuracy": correct / count,
              "mean_top_probability": top / count, "temperature": args.temperature,
              "mean_top_probability_at_temperature": top_t / count}
    print(f"teacher {args.teacher} on {count} training examples: accuracy {result['accuracy']:.4f}, mean top "
          f"probability {result['mean_top_probability']:.4f} (T=1), "
          f"{result['mean_top_probability_at_temperature']:.4f} (T={args.temperature:g})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
