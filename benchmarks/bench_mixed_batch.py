"""A mixed-adapter batch (each row its own adapter, one forward) against the same batch with one shared adapter:
lorakit and PEFT, in one process, interleaved.

    .venv/bin/python benchmarks/bench_mixed_batch.py [--repeats 5] [--peft-repeats 3] [--decode-steps 3]

The reference setting of the mixed-batch performance issue: SmolLM2-135M-Instruct (`load_model("smollm2")`), fp32,
`--adapters` (32) adapters of rank 16, alpha 32 on every attention and MLP projection (`targets=["llama"]`), each
with seeded random non-zero A and B (so the per-row products do real work) saved as adapter directories that both
libraries load. A batch of 32 sequences, row n using adapter n:

    lorakit_mixed    `per_row_adapters(model, bank, names)` over `AdapterBank.from_adapters(model, dirs)`: the
                     rows name the bank's slots in order, so every module uses slices of its stacks
    lorakit_shuffled the same adapters in a shuffled row order, so every module gathers its rows' factors
                     (`index_select`) in each forward; decode only (a prefill spreads the gather over 64 tokens)
    lorakit_shared   the same model outside the block: its own (single) adapter on every row, LoraLinear's path
    peft_mixed       PEFT after `load_adapter` of every adapter: `model(..., adapter_names=names)`
    peft_shared      the same PEFT model with its active adapter on every row

Two measurements for each, under `torch.no_grad()`:

    prefill   a forward over 32 x `--prompt-len` (64) token ids, building a fresh KV cache
    decode    one new token per sequence given the KV cache of a prefill; the cache is cropped back to the prompt
              (`DynamicCache.crop`) after each step, outside the timed region

Each round runs every configuration in turn (A B C D A B C D ...): one prefill, then `--decode-steps` decode steps,
all on one KV cache (built once, by a prefill through the single-adapter model: the values in it do not change the
work). Warm-up: that prefill, then `--warmup` unmeasured decode steps of each configuration.
The lorakit block is entered outside the timed region (in serving, once per generate call); its entry time, which
resolves the rows for every module, is reported on its own. PEFT's mixed forward loops over the adapters in every module
and a prefill is seconds long on a CPU, so PEFT runs `--peft-repeats` rounds (default 3) where lorakit runs
`--repeats` (5). Prints the median of each, the ratios mixed/shared for each library (of the medians, and the
median of the per-round ratios), the relative error between the two libraries' mixed decode logits (same cache,
same input), and one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from common import machine
from torch import nn

from lorakit import AdapterBank, LoraConfig, inject, load_adapter, per_row_adapters, save_adapter
from lorakit.layers import lora_modules
from lorakit.models import load_model

Step = Callable[[], None]
T = TypeVar("T")


def timed(setup: dict[str, float], label: str, fn: Callable[[], T]) -> T:
    """`fn()`, its wall time recorded in `setup[label]` and printed."""
    start = time.perf_counter()
    result = fn()
    setup[label] = time.perf_counter() - start
    print(f"setup: {label} {setup[label]:.1f} s", flush=True)
    return result


def make_adapters(base: nn.Module, count: int, rank: int, alpha: float, seed: int, root: Path) -> list[Path]:
    """`count` adapter directories with seeded random factors: A ~ N(0, 1/fan_in), B ~ N(0, 0.02²)."""
    scratch = copy.deepcopy(base)
    inject(scratch, LoraConfig(rank=rank, alpha=alpha, targets=["llama"]), initialize=False)
    dirs = []
    for i in range(count):
        g = torch.Generator().manual_seed(seed + i)
        for _, module in lora_modules(scratch):
            a, b = module.factors()
            module.set_factors(torch.randn(a.shape, generator=g) / a.shape[1] ** 0.5,
                               torch.randn(b.shape, generator=g) * 0.02)
        dirs.append(save_adapter(scratch, root / f"adapter{i:02d}"))
    return dirs


def next_tokens(ids: torch.Tensor) -> torch.Tensor:
    """(B, 1): the token each row decodes next (any will do)."""
    return ids[:, -1:].flip(0).contiguous()


@dataclass
class Variant:
    """One configuration's two steps; each timed call runs inside `block()`, entered outside the timing."""

    prefill: Step | None  # None: decode only
    decode: Step
    reset: Step  # crops the KV cache back to the prompt after a decode step
    repeats: int
    block: Callable[[], AbstractContextManager[object]] = nullcontext


def variant(forward: Callable[..., Any], ids: torch.Tensor, cache: Any, repeats: int, warmup: int,
            block: Callable[[], AbstractContextManager[object]] = nullcontext, *, with_prefill: bool = True
            ) -> Variant:
    """Steps over `forward`, decoding on `cache` (the KV cache of a prefill of `ids`, shared by all variants: the
    values in it do not change the work); `warmup` unmeasured decode steps first."""
    prompt_len = ids.shape[1]
    next_ids = next_tokens(ids)

    def prefill() -> None:
        forward(input_ids=ids, use_cache=True)

    def decode() -> None:
        forward(input_ids=next_ids, cache=cache, use_cache=True)

    def reset() -> None:
        cache.crop(prompt_len - cache.get_seq_length())  # a negative count drops that many tokens

    with block():
        for _ in range(warmup):
            decode()
            reset()
    return Variant(prefill if with_prefill else None, decode, reset, repeats, block)


def _seconds(step: Step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="measured rounds of the lorakit steps")
    parser.add_argument("--peft-repeats", type=int, default=3, help="measured rounds of the PEFT steps")
    parser.add_argument("--decode-steps", type=int, default=3, help="measured decode steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured decode steps first")
    parser.add_argument("--adapters", type=int, default=32, help="adapters, and rows in the batch")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-peft", action="store_true", help="lorakit only")
    args = parser.parse_args()
    if min(args.repeats, args.peft_repeats, args.decode_steps, args.adapters) < 1 or args.warmup < 0:
        parser.error("--repeats, --peft-repeats, --decode-steps and --adapters must be >= 1, --warmup >= 0")
    torch.set_grad_enabled(False)
    setup: dict[str, float] = {}
    agreement = float("nan")

    base, _ = load_model("smollm2")
    base.eval()
    config: Any = base.config
    vocab = int(config.vocab_size)
    ids = torch.randint(0, vocab, (args.adapters, args.prompt_len), generator=torch.Generator().manual_seed(args.seed))
    names = [f"adapter{i:02d}" for i in range(args.adapters)]
    tmp = tempfile.TemporaryDirectory(prefix="bench-mixed-")
    dirs = timed(setup, "save_adapters",
                 lambda: make_adapters(base, args.adapters, args.rank, args.alpha, args.seed, Path(tmp.name)))
    adapters: dict[str, str | Path] = dict(zip(names, dirs, strict=True))

    ours = copy.deepcopy(base)
    load_adapter(ours, dirs[0])  # the single-adapter model, and the LoRA modules the bank feeds
    bank = timed(setup, "lorakit_bank", lambda: AdapterBank.from_adapters(ours, adapters))
    cache = timed(setup, "prefill_for_cache", lambda: ours(input_ids=ids, use_cache=True).cache)
    shuffled = random.Random(args.seed).sample(names, len(names))
    variants = {
        "lorakit_mixed": variant(ours, ids, cache, args.repeats, args.warmup,
                                 lambda: per_row_adapters(ours, bank, names)),
        "lorakit_shuffled": variant(ours, ids, cache, args.repeats, args.warmup,
                                    lambda: per_row_adapters(ours, bank, shuffled), with_prefill=False),
        "lorakit_shared": variant(ours, ids, cache, args.repeats, args.warmup),
    }
    if not args.no_peft:
        import peft

        def load_peft() -> nn.Module:
            model = peft.PeftModel.from_pretrained(copy.deepcopy(base), dirs[0], adapter_name=names[0])
            for name, path in list(adapters.items())[1:]:
                model.load_adapter(path, adapter_name=name, low_cpu_mem_usage=True)  # no init before loading
            model.set_adapter(names[0])
            return model.eval()

        theirs = timed(setup, "peft_load_adapters", load_peft)

        def peft_mixed(**kwargs: Any) -> Any:
            return theirs(**kwargs, adapter_names=names)

        variants["peft_mixed"] = variant(peft_mixed, ids, cache, args.peft_repeats, args.warmup)
        variants["peft_shared"] = variant(theirs, ids, cache, args.peft_repeats, args.warmup)
        # Both libraries' mixed decode steps from the same cache: the same logits, or the race is not fair.
        logits = {}
        for name, forward in (("lorakit", ours), ("peft", peft_mixed)):
            with variants[f"{name}_mixed"].block():
                logits[name] = forward(input_ids=next_tokens(ids), cache=cache).logits.double()
            variants[f"{name}_mixed"].reset()
        agreement = float((logits["lorakit"] - logits["peft"]).norm() / logits["peft"].norm())
        print(f"mixed decode logits, lorakit vs PEFT: relative error {agreement:.2e}")

    entry: dict[str, list[float]] = {"in_order": [], "shuffled": []}
    times: dict[str, list[float]] = {f"{name}_{kind}": [] for name, v in variants.items()
                                     for kind in ("prefill", "decode") if kind == "decode" or v.prefill}
    per_round: dict[str, list[float]] = {key: [] for key in times}  # the round's figure, for paired ratios
    for round_ in range(max(args.repeats, args.peft_repeats)):
        for name, v in variants.items():  # interleaved: mixed, shared, mixed, shared ...
            if round_ >= v.repeats:
                continue
            with v.block():
                prefill = _seconds(v.prefill) if v.prefill else float("nan")
                decodes = []
                for _ in range(args.decode_steps):
                    decodes.append(_seconds(v.decode))
                    v.reset()
            if v.prefill:
                times[f"{name}_prefill"].append(prefill)
                per_round[f"{name}_prefill"].append(prefill)
            times[f"{name}_decode"] += decodes
            per_round[f"{name}_decode"].append(statistics.median(decodes))
            print(f"round {round_}: {name:16s} prefill {prefill:8.4f} s  decode "
                  + " ".join(f"{d:.4f}" for d in decodes) + " s", flush=True)
        for order, rows in (("in_order", names), ("shuffled", shuffled)):
            start = time.perf_counter()
            with per_row_adapters(ours, bank, rows):
                entry[order].append(time.perf_counter() - start)

    median = {key: statistics.median(values) for key, values in times.items()}

    def ratio(name: str, numerator: str, denominator: str) -> None:
        ratios[name] = median[numerator] / median[denominator]
        # The same ratio taken within each round (the two ran back to back), then the median: steadier than the
        # ratio of medians when the machine's load drifts.
        ratios[f"{name}_paired"] = statistics.median(
            a / b for a, b in zip(per_round[numerator], per_round[denominator], strict=True))

    ratios: dict[str, float] = {}
    for lib in ("lorakit",) if args.no_peft else ("lorakit", "peft"):
        for kind in ("prefill", "decode"):
            ratio(f"{lib}_{kind}_mixed_over_shared", f"{lib}_mixed_{kind}", f"{lib}_shared_{kind}")
    ratio("lorakit_decode_shuffled_over_shared", "lorakit_shuffled_decode", "lorakit_shared_decode")
    ratio("lorakit_decode_gathered_over_sliced", "lorakit_shuffled_decode", "lorakit_mixed_decode")
    entry_s = {f"block_entry_{order}_s": statistics.median(values) for order, values in entry.items()}
    for key, value in median.items():
        print(f"median {key:24s} {value:8.4f} s  (n={len(times[key])})")
    for key, value in entry_s.items():
        print(f"median {key:24s} {value:8.4f} s")
    for key, value in ratios.items():
        print(f"{key:44s} {value:6.2f}")
    print(json.dumps({
        "benchmark": "mixed_batch", "model": "smollm2", "adapters": args.adapters, "batch_size": args.adapters,
        "prompt_len": args.prompt_len, "rank": args.rank, "alpha": args.alpha, "dtype": "float32",
        "repeats": args.repeats, "peft_repeats": args.peft_repeats, "decode_steps": args.decode_steps,
        "warmup": args.warmup, **machine(),
        **{f"{key}_s": value for key, value in median.items()}, **ratios, **entry_s,
        "mixed_logits_rel_error_lorakit_vs_peft": agreement,
        **{f"setup_{key}_s": value for key, value in setup.items()},
    }))
    tmp.cleanup()


if __name__ == "__main__":
    main()
