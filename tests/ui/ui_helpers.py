"""Shared values of the page's tests: the upload cap and a tiny recipe."""

from __future__ import annotations

UPLOAD_CAP = 4096


def tiny_recipe(max_steps: int = 6, out_dir: str = "runs/default") -> dict:
    return {
        "model": {"name": "tiny-bert"},
        "data": {"task": "classification", "train": "data/train.tsv", "eval": "data/dev.tsv",
                 "columns": {"text": "sentence", "label": "label"}, "max_length": 16},
        "lora": {"rank": 4, "alpha": 8, "targets": ["query", "value"]},
        "optim": {"lr": 1e-2, "batch_size": 8, "max_steps": max_steps, "warmup_steps": 1},
        "run": {"out_dir": out_dir, "log_every": 1, "eval_every": 0, "seed": 3},
    }
