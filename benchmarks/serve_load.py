"""Load test of `lorakit serve` over loopback: concurrent clients, random adapters per request, a fixed number of new
tokens each; total tokens/s and p50/p95 request latency for four servers, one after another:

    mixed        this server: continuous batching, each row on its own adapter (AdapterBank, per_row_adapters)
    one_adapter  the same server with every request on one adapter (the ceiling the mixed batch is held to)
    swap         the same engine forced to one adapter per batch (`Engine.single_adapter`): rows of other
                 adapters wait until the batch of the current one has drained
    naive_peft   a server that answers one request at a time with PEFT (`set_adapter`, then `generate`)

    .venv/bin/python benchmarks/serve_load.py [--clients 32] [--adapters 8] [--rank 16] [--max-tokens 64]
                                              [--requests 32] [--naive-requests 8]

SmolLM2-135M-Instruct in fp32; `--adapters` adapters of rank `--rank` on every attention and MLP projection with
seeded random non-zero factors. Every request asks for exactly `--max-tokens` tokens (`ignore_eos`, greedy).
`--requests` requests per server, sent by `--clients` client threads at once; the naive PEFT server answers
`--naive-requests` (fewer: it is slow), so its latency percentiles are not comparable (its tokens/s is).
Prints one line per server and one JSON line. The servers run in turn, not interleaved (a server is a long-lived
thread); on a shared machine, quote the ratios.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch
from common import machine

from lorakit import LoraConfig, inject, save_adapter
from lorakit.layers import lora_modules
from lorakit.models import load_model
from lorakit.serve.app import create_app
from lorakit.serve.limits import ServeSettings

PROMPTS = ["Write a short poem about the sea.", "What is the capital of France?", "Explain LoRA in one sentence.",
           "List three fruits.", "How do I boil an egg?", "Tell me a fun fact about owls."]


def make_adapters(count: int, rank: int, root: Path) -> dict[str, Path]:
    model, _ = load_model("smollm2")
    inject(model, LoraConfig(rank=rank, alpha=2 * rank, targets=["llama"]))
    out = {}
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        for _, module in lora_modules(model):
            a, b = module.factors()  # type: ignore[operator]
            module.set_factors(torch.randn(a.shape, generator=g) / a.shape[1] ** 0.5,  # type: ignore[operator]
                               torch.randn(b.shape, generator=g) * 0.02)
        out[f"ad{i}"] = Path(save_adapter(model, root / f"ad{i}"))
    return out


def serve(app: Any) -> tuple[str, Any]:
    import uvicorn

    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


def load(url: str, names: list[str], requests: int, clients: int, max_tokens: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    jobs = [(rng.choice(names), rng.choice(PROMPTS)) for _ in range(requests)]

    def one(job: tuple[str, str]) -> tuple[float, int]:
        start = time.perf_counter()
        r = httpx.post(f"{url}/v1/completions", timeout=3600, json={
            "model": job[0], "prompt": job[1], "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
        r.raise_for_status()
        return time.perf_counter() - start, int(r.json()["usage"]["completion_tokens"])

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, jobs))
    wall = time.perf_counter() - start
    latencies = sorted(t for t, _ in results)
    tokens = sum(n for _, n in results)
    return {"tokens_per_s": tokens / wall, "p50_s": statistics.median(latencies),
            "p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], "tokens": tokens,
            "wall_s": wall, "requests": len(results)}


def naive_peft_app(adapters: dict[str, Path]) -> Any:
    from fastapi import FastAPI
    from peft import PeftModel

    model, tokenizer = load_model("smollm2")
    names = list(adapters)
    peft = PeftModel.from_pretrained(model, str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(str(adapters[name]), adapter_name=name)
    peft.eval()
    lock = threading.Lock()
    app = FastAPI()

    @app.post("/v1/completions")
    def complete(body: dict[str, Any]) -> dict[str, Any]:
        with lock, torch.no_grad():  # one request at a time
            peft.set_adapter(body["model"])
            ids = tokenizer(body["prompt"], return_tensors="pt")
            out = peft.generate(**ids, max_new_tokens=body["max_tokens"], min_new_tokens=body["max_tokens"],
                                do_sample=False, pad_token_id=tokenizer.eos_token_id)
        n = out.shape[1] - ids["input_ids"].shape[1]
        return {"usage": {"completion_tokens": n}}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--naive-requests", type=int, default=8)
    parser.add_argument("--skip", nargs="*", default=[], help="servers to leave out")
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(args.adapters, args.rank, Path(tmp))
        names = list(adapters)
        settings = ServeSettings(model="smollm2", adapters=adapters, max_batch_size=args.clients,
                                 request_timeout_s=24 * 3600)  # a swap run queues for long
        app = None if {"mixed", "one_adapter", "swap"} <= set(args.skip) else create_app(settings)
        if app is not None:
            url, server = serve(app)
            load(url, names, 4, 4, 4, seed=99)  # warm-up
            engine = app.app.state.engine
            plan = [("mixed", names, False), ("one_adapter", names[:1], False), ("swap", names, True)]
            for label, chosen, single in plan:
                if label in args.skip:
                    continue
                engine.single_adapter = single
                results[label] = load(url, chosen, args.requests, args.clients, args.max_tokens, seed=1)
                print(label, json.dumps(results[label]), flush=True)
            server.should_exit = True
            engine.stop()
        if "naive_peft" not in args.skip:
            url, server = serve(naive_peft_app(adapters))
            results["naive_peft"] = load(url, names, args.naive_requests, args.clients, args.max_tokens, seed=1)
            print("naive_peft", json.dumps(results["naive_peft"]), flush=True)
            server.should_exit = True
    ratios = {}
    if "mixed" in results and "naive_peft" in results:
        ratios["mixed_over_naive_tokens_per_s"] = (results["mixed"]["tokens_per_s"]
                                                   / results["naive_peft"]["tokens_per_s"])
    if "mixed" in results and "one_adapter" in results:
        ratios["mixed_over_one_adapter_tokens_per_s"] = (results["mixed"]["tokens_per_s"]
                                                         / results["one_adapter"]["tokens_per_s"])
    if "mixed" in results and "swap" in results:
        ratios["mixed_p95_over_swap_p95"] = results["mixed"]["p95_s"] / results["swap"]["p95_s"]
    print(json.dumps({"bench": "serve_load", **vars(args), "results": results, "ratios": ratios,
                      "machine": machine()}))


if __name__ == "__main__":
    main()
