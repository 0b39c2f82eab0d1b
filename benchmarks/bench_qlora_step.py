"""One QLoRA training step (NF4 base): lorakit vs PEFT + bitsandbytes vs lorakit's fp32 LoRA, interleaved.

    .venv/bin/python benchmarks/bench_qlora_step.py [--steps 5] [--warmup 1] [--batch-size 4] [--seq-len 128]

The reference setting: SmolLM2-135M-Instruct, a batch of 4 x 128 random token ids with labels =
input ids, rank 16, alpha 32 on every attention and MLP projection, dropout 0, AdamW, fp32 factors. Arms, each on
its own model:

    qlora        lorakit on `load_model("smollm2", quantize="nf4")` (block linears NF4, double quantization),
                 its MLPs fused as `lorakit train` does by default (`run.fused_swiglu`, lorakit.swiglu)
    qlora_ckpt   the same with activation checkpointing
    peft_bnb     PEFT's bitsandbytes LoRA layers on the same NF4 base (`model.is_loaded_in_4bit`, as a 4-bit load
                 through transformers sets it), its own `labels=` loss, `torch.optim.AdamW`
    lora         lorakit on the fp32 base, its MLPs fused the same way
    lora_ckpt    the same with activation checkpointing

Run A B C D E A B C D E ... after `--warmup` rounds. Memory of an arm = its model's resident weights (stored bytes,
quantization constants included, plus the adapter) + the step's peak increment (bench_train_step.PeakMemory).
Targets: qlora memory <= 0.75x lora's, qlora_ckpt <= 0.5x lora_ckpt's; qlora time <= 0.9x peft_bnb's; qlora
against lora reported (bitsandbytes on CPU dequantizes every weight per matmul). Prints medians, ratios and one
JSON line. Time figures on a machine shared with other work are ratios at best: say so when quoting them.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable

import torch
from bench_train_step import MB, PeakMemory, interleaved_steps, step_arguments

from lorakit import LoraConfig, inject, load_model, quant
from lorakit.swiglu import fuse_gated_mlps
from lorakit.train.loop import build_optimizer
from lorakit.train.run import enable_activation_checkpointing
from lorakit.train.sections import OptimSection
from lorakit.train.tasks.instruction import InstructionTuning

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _resident(model: torch.nn.Module) -> int:
    return quant.base_bytes(model)["total"]


def build(args) -> tuple[dict[str, Callable[[], float | None]], dict[str, int]]:
    import peft

    ids = torch.randint(0, 49152, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(args.seed))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    optim = OptimSection(lr=1e-4, weight_decay=0.01)
    config = LoraConfig(rank=args.rank, alpha=args.alpha, targets=["llama"], dropout=0.0, seed=args.seed)
    steps: dict[str, Callable[[], float | None]] = {}
    resident: dict[str, int] = {}
    for name, kind, ckpt in (("qlora", "nf4", False), ("qlora_ckpt", "nf4", True), ("lora", None, False),
                             ("lora_ckpt", None, True)):
        model, tokenizer = load_model("smollm2", quantize=kind)
        inject(model, config)
        fuse_gated_mlps(model)  # as `lorakit train` does (run.fused_swiglu)
        model.train()
        if ckpt:
            enable_activation_checkpointing(model)
        opt = build_optimizer(model, optim)
        task = InstructionTuning(tokenizer)

        def step(model: torch.nn.Module = model, opt: torch.optim.Optimizer = opt,
                 task: InstructionTuning = task) -> float:
            opt.zero_grad(set_to_none=True)
            loss = task.loss(model, batch)
            loss.backward()
            opt.step()
            return loss.item()

        steps[name], resident[name] = step, _resident(model)
    base, _ = load_model("smollm2", quantize="nf4")
    base.is_loaded_in_4bit = True
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=args.rank, lora_alpha=args.alpha,
                                                       target_modules=LLAMA_PROJECTIONS, lora_dropout=0.0)).train()
    theirs_opt = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-4)

    def peft_step() -> float:
        theirs_opt.zero_grad(set_to_none=True)
        loss = theirs(**batch).loss
        loss.backward()
        theirs_opt.step()
        return float(loss.item())

    steps["peft_bnb"], resident["peft_bnb"] = peft_step, _resident(theirs)
    return steps, resident


def main() -> None:
    args = step_arguments(__doc__.splitlines()[0])
    steps, resident = build(args)
    memory = PeakMemory()
    times, peaks, first = interleaved_steps(steps, args.steps, args.warmup, memory)
    median = {n: statistics.median(v) for n, v in times.items()}
    total_mb = {n: (resident[n] + statistics.median(peaks[n])) / MB for n in steps}
    ratios = {"qlora_over_peft_bnb_time": median["qlora"] / median["peft_bnb"],
              "qlora_over_lora_time": median["qlora"] / median["lora"],
              "qlora_over_lora_memory": total_mb["qlora"] / total_mb["lora"],
              "qlora_ckpt_over_lora_ckpt_memory": total_mb["qlora_ckpt"] / total_mb["lora_ckpt"],
              "qlora_over_peft_bnb_memory": total_mb["qlora"] / total_mb["peft_bnb"]}
    for name in steps:
        print(f"median {name:10s} {median[name]:7.3f} s  weights {resident[name] / MB:7.1f} MB  "
              f"weights + step peak {total_mb[name]:7.1f} MB")
    print("  ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    print(f"first-step loss: qlora {first['qlora']:.6f}, peft_bnb {first['peft_bnb']:.6f}, lora {first['lora']:.6f}")
    print(json.dumps({"benchmark": "qlora_step", "model": "smollm2", "batch_size": args.batch_size,
                      "seq_len": args.seq_len, "rank": args.rank, "steps": args.steps, "warmup": args.warmup,
                      "threads": torch.get_num_threads(), "memory_method": memory.method, "allocator": memory.allocator,
                      **{f"{n}_s": median[n] for n in steps}, **{f"{n}_mb": total_mb[n] for n in steps}, **ratios}))


if __name__ == "__main__":
    main()
