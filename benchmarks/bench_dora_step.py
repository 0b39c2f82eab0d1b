"""One DoRA training step: lorakit vs PEFT, beside each library's plain LoRA step, in one process, interleaved.

    .venv/bin/python benchmarks/bench_dora_step.py [--steps 5] [--warmup 1]

The setting of the LoRA step race (benchmarks/bench_train_step.py): SmolLM2-135M-Instruct, a batch of 4 x 128
random token ids with labels = input ids, rank 16, alpha 32 on every attention and MLP projection, dropout 0,
AdamW (lr 1e-4, weight decay 0.01), fp32. Four steps, each on its own copy of the model:

    lorakit_dora  `dora: true`: zero_grad, `InstructionTuning.loss` (lorakit's chunked loss), backward, the
                  optimizer `lorakit.train.loop.build_optimizer` makes
    lorakit_lora  the same without DoRA
    peft_dora     `use_dora=True`: zero_grad, the PEFT model's own `labels=` loss, backward, `torch.optim.AdamW`
    peft_lora     the same without DoRA

Run A B C D A B C D ... after `--warmup` rounds; peak memory of each step is measured as in bench_train_step
(VmHWM after the step minus VmRSS before it). Prints the medians, the ratios and one JSON line.
"""

from __future__ import annotations

import copy
import json
import statistics
from collections.abc import Callable

import torch
from bench_train_step import LLAMA_PROJECTIONS, MB, PeakMemory, interleaved_steps, step_arguments

from lorakit import LoraConfig, inject
from lorakit.models import load_model
from lorakit.train.loop import build_optimizer
from lorakit.train.sections import OptimSection
from lorakit.train.tasks.instruction import InstructionTuning


def build(batch_size: int, seq_len: int, rank: int, alpha: float, seed: int) -> dict[str, Callable[[], float]]:
    import peft

    base, tokenizer = load_model("smollm2")
    base.eval().requires_grad_(False)
    vocab = base.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    task = InstructionTuning(tokenizer)
    optim = OptimSection(lr=1e-4, weight_decay=0.01)

    def ours(dora: bool) -> Callable[[], float]:
        model = copy.deepcopy(base).train()
        inject(model, LoraConfig(rank=rank, alpha=alpha, targets=["llama"], dropout=0.0, seed=seed, dora=dora))
        opt = build_optimizer(model, optim)

        def step() -> float:
            opt.zero_grad(set_to_none=True)
            loss = task.loss(model, batch)
            loss.backward()
            opt.step()
            return loss.item()
        return step

    def theirs(dora: bool) -> Callable[[], float]:
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=LLAMA_PROJECTIONS, lora_dropout=0.0, use_dora=dora)).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step() -> float:
            opt.zero_grad(set_to_none=True)
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            return float(loss.item())
        return step

    return {"lorakit_dora": ours(True), "lorakit_lora": ours(False), "peft_dora": theirs(True),
            "peft_lora": theirs(False)}


def main() -> None:
    args = step_arguments(__doc__.splitlines()[0])

    steps = build(args.batch_size, args.seq_len, args.rank, args.alpha, args.seed)
    memory = PeakMemory()
    times, peaks, first_losses = interleaved_steps(dict(steps), args.steps, args.warmup, memory)
    median = {name: statistics.median(values) for name, values in times.items()}
    peak_mb = {name: statistics.median(values) / MB for name, values in peaks.items()}
    ratios = {"dora_over_peft_dora": median["lorakit_dora"] / median["peft_dora"],
              "dora_over_own_lora": median["lorakit_dora"] / median["lorakit_lora"],
              "peft_dora_over_peft_lora": median["peft_dora"] / median["peft_lora"],
              "dora_over_peft_dora_peak_memory": peak_mb["lorakit_dora"] / peak_mb["peft_dora"]}
    for name in steps:
        print(f"median {name:12s} {median[name]:7.3f} s  peak +{peak_mb[name]:7.1f} MB  (n={len(times[name])})")
    print("  ".join(f"{key} {value:.2f}" for key, value in ratios.items()))
    # B starts at zero and m at ‖W‖, so every first-step loss is the base model's: a check that all four agree.
    print("first-step loss: " + ", ".join(f"{name} {loss:.6f}" for name, loss in first_losses.items()
                                          if loss is not None))
    print(json.dumps({
        "benchmark": "dora_step", "model": "smollm2", "batch_size": args.batch_size, "seq_len": args.seq_len,
        "rank": args.rank, "alpha": args.alpha, "dtype": "float32", "steps": args.steps, "warmup": args.warmup,
        "threads": torch.get_num_threads(), "memory_method": memory.method, "allocator": memory.allocator,
        **{f"{name}_s": median[name] for name in steps}, **{f"{name}_peak_mb": peak_mb[name] for name in steps},
        **ratios, **{f"first_loss_{name}": loss for name, loss in first_losses.items()},
    }))


if __name__ == "__main__":
    main()
