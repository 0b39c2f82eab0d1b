"""The engine alone: rows join a running batch and still decode as `lorakit generate` does, finished and cancelled
rows leave at once, timeouts and unloaded adapters end a row with a reason, the queue is bounded, and the
one-adapter-at-a-time mode keeps a batch to one adapter."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from serve_helpers import make_world, offline

from lorakit.models import load_model
from lorakit.serve.adapters import AdapterRegistry, base_names, prepare_model
from lorakit.serve.engine import Engine, Event, Overloaded, Request


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_world(tmp_path_factory.mktemp("engine"))


def make_engine(world: dict[str, Path], **kwargs) -> tuple[Engine, AdapterRegistry]:  # type: ignore[no-untyped-def]
    model, tokenizer = load_model(str(world["base"]))
    prepare_model(model)
    registry = AdapterRegistry(base_names(str(world["base"]), model), world["adapter_dir"], 4)
    engine = Engine(model, tokenizer, registry.adapters, **kwargs)
    registry.in_use = engine.in_use
    registry.add("a1", world["a1"])
    registry.add("a2", world["a2"])
    return engine, registry


class Collect:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.done = threading.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if event.finish_reason is not None:
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)


def request(engine: Engine, prompt: str, adapter: str | None, max_tokens: int, **kwargs) -> tuple[Request, Collect]:  # type: ignore[no-untyped-def]
    collect = Collect()
    return Request(engine.tokenizer(prompt)["input_ids"], adapter, collect, max_tokens=max_tokens, **kwargs), collect


def test_rows_joining_a_running_batch_decode_as_offline_generate(world: dict[str, Path]) -> None:
    engine, _ = make_engine(world, max_batch_size=3)
    jobs = [("the cat sat on", None, 14), ("a dog", "a1", 6), ("hello world, hello there", "a2", 10),
            ("numbers", "a1", 12), ("the mat", "a2", 5)]
    engine.start()
    try:
        sent = []
        for prompt, adapter, n in jobs:  # five rows through three places: later rows join mid-decode
            r, c = request(engine, prompt, adapter, n)
            engine.submit(r)
            sent.append(c)
            time.sleep(0.005)
        assert all(c.done.wait(30) for c in sent)
    finally:
        engine.stop()
    for (prompt, adapter, n), c in zip(jobs, sent, strict=True):
        assert c.text.strip() == offline(world["base"], world[adapter] if adapter else None, [prompt], n,
                                         chat=False)[0]
        assert c.events[-1].finish_reason in ("length", "stop") and c.events[-1].tokens <= n


def test_a_cancelled_row_leaves_and_the_others_finish(world: dict[str, Path]) -> None:
    engine, _ = make_engine(world, max_batch_size=4)
    long, c_long = request(engine, "the cat", "a1", 100_000)
    short, c_short = request(engine, "a dog", "a2", 8)
    engine.start()
    try:
        engine.submit(long)
        engine.submit(short)
        assert c_short.done.wait(30)
        long.cancelled.set()
        deadline = time.monotonic() + 10
        while engine.batch_size() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.batch_size() == 0 and not c_long.done.is_set()  # left without a finish of its own
    finally:
        engine.stop()


def test_a_row_past_its_timeout_ends_with_reason_timeout(world: dict[str, Path]) -> None:
    engine, _ = make_engine(world)
    r, c = request(engine, "the cat", None, 5000, timeout_s=0.2)
    engine.start()
    try:
        engine.submit(r)
        assert c.done.wait(30)
    finally:
        engine.stop()
    assert c.events[-1].finish_reason == "timeout" and c.events[-1].error


def test_unloading_an_adapter_ends_its_running_rows_with_an_error(world: dict[str, Path]) -> None:
    engine, registry = make_engine(world)
    r, c = request(engine, "the cat", "a1", 5000)
    other, c_other = request(engine, "a dog", "a2", 6)
    engine.start()
    try:
        engine.submit(r)
        engine.submit(other)
        assert c_other.done.wait(30)
        registry.remove("a1")
        assert c.done.wait(30)
    finally:
        engine.stop()
    assert c.events[-1].finish_reason == "error" and "unloaded" in str(c.events[-1].error)


def test_the_queue_is_bounded(world: dict[str, Path]) -> None:
    engine, _ = make_engine(world, max_queue=2)  # not started: nothing leaves the queue
    for _ in range(2):
        engine.submit(request(engine, "the", None, 2)[0])
    with pytest.raises(Overloaded, match="retry later"):
        engine.submit(request(engine, "the", None, 2)[0])


def test_single_adapter_mode_never_mixes_adapters_in_a_batch(world: dict[str, Path]) -> None:
    engine, _ = make_engine(world, max_batch_size=8)
    engine.single_adapter = True
    seen: list[set[str | None]] = []
    step = engine._step

    def watched() -> None:
        step()
        seen.append({row.request.adapter for row in engine.rows})

    engine._step = watched  # type: ignore[method-assign]
    jobs = [request(engine, "the cat", a, 6) for a in ("a1", "a2", "a1", None, "a2")]
    for r, _ in jobs:
        engine.submit(r)
    engine.start()
    try:
        assert all(c.done.wait(30) for _, c in jobs)
    finally:
        engine.stop()
    assert seen and all(len(s) <= 1 for s in seen)
