"""The main job (`make demo`): LoRA on the bundled SmolLM2-135M-Instruct, on a task it cannot do out of the box.

1. Score the base model on held-out examples of the built-in task (`lorakit.demo_task`, exact match, greedy).
2. Inject rank-8 adapters into every attention and MLP projection and train them with the library's loop.
3. Score the adapted model on the same held-out examples.
4. Save the adapter, load it into a fresh base, merge it, and check the merged model gives the same answers.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorakit import demo_task
from lorakit.config import LoraConfig
from lorakit.generation import SamplingConfig, generate
from lorakit.inject import inject
from lorakit.io import load_adapter, save_adapter
from lorakit.merge import merge
from lorakit.models import load_model, model_bytes
from lorakit.outputs import claim_output_dir
from lorakit.train.loop import fit
from lorakit.train.sections import OptimSection, RunSection
from lorakit.train.tasks import make_task

Echo = Callable[[str], None]
DEMO_KIND = "demo"


def demo_accuracy(model: Any, tokenizer: Any, records: list[dict[str, str]]) -> tuple[float, list[str]]:
    sampling = SamplingConfig(max_new_tokens=demo_task.MAX_NEW_TOKENS)
    answers = generate(model, tokenizer, [r["instruction"] for r in records], sampling, batch_size=50)
    return demo_task.score(answers, [r["output"] for r in records]), answers


def run_demo(out_dir: Path = Path("runs/demo"), *, force: bool = False, progress: bool = False,
             echo: Echo = lambda _: None) -> dict[str, Any]:
    """Run the demo and return its figures (the keys of the JSON line `lorakit demo` prints last).

    `out_dir` must be new or empty, or an earlier demo's directory that `force` replaces (checked first)."""
    if claim_output_dir(out_dir, kind=DEMO_KIND, force=force):
        for name in ("train", "adapter"):
            shutil.rmtree(Path(out_dir) / name, ignore_errors=True)
    started = time.perf_counter()
    model, tokenizer = load_model("smollm2")
    base_bytes = model_bytes(model)
    train, held_out = demo_task.split()
    echo(f"task: reverse a list of 3-5 digits; {len(train)} training and {len(held_out)} held-out examples")
    echo(f"  e.g. {held_out[0]['instruction']!r} -> {held_out[0]['output']!r}")

    base_accuracy, base_answers = demo_accuracy(model, tokenizer, held_out)
    echo(f"base model: exact match {base_accuracy:.3f} (e.g. answers {base_answers[0]!r})")

    lora = LoraConfig(rank=demo_task.RANK, alpha=demo_task.ALPHA, targets=demo_task.TARGETS, seed=demo_task.SEED)
    report = inject(model, lora)
    echo(f"lora: {report}")
    task = make_task("instruction", tokenizer, max_length=demo_task.MAX_LENGTH)
    optim = OptimSection(lr=demo_task.LEARNING_RATE, warmup_steps=demo_task.WARMUP_STEPS, schedule="linear",
                         max_steps=demo_task.STEPS, batch_size=demo_task.BATCH_SIZE, weight_decay=0.0)
    run = RunSection(out_dir=str(out_dir / "train"), seed=demo_task.SEED, log_every=5)
    result = fit(model, task, task.encode(train), [], optim, run, progress=progress)
    echo(f"trained {result.steps} steps in {result.seconds:.1f} s (final loss {result.history[-1]['loss']:.4f})")

    adapted_accuracy, adapted_answers = demo_accuracy(model, tokenizer, held_out)
    echo(f"adapted model: exact match {adapted_accuracy:.3f} (e.g. answers {adapted_answers[0]!r})")

    adapter_dir = save_adapter(model, out_dir / "adapter", base_model="smollm2")
    adapter_bytes = sum(p.stat().st_size for p in adapter_dir.iterdir())
    fresh, _ = load_model("smollm2")
    load_adapter(fresh, adapter_dir)
    merge(fresh)
    _, merged_answers = demo_accuracy(fresh, tokenizer, held_out)
    same = sum(a == b for a, b in zip(merged_answers, adapted_answers, strict=True))
    echo(f"adapter saved to {adapter_dir} ({adapter_bytes:,} bytes); reloaded and merged into a fresh base: "
         f"{same}/{len(held_out)} answers identical to the unmerged adapter's")
    return {
        "base_accuracy": base_accuracy,
        "adapted_accuracy": adapted_accuracy,
        "trainable_fraction": report.trainable_fraction,
        "adapter_bytes": adapter_bytes,
        "model_bytes": base_bytes,
        "seconds": round(result.seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "merged_answers_identical": same == len(held_out),
    }
