"""The server over loopback with the official openai client: completions and chat, streamed and not, the base and
two adapters at once, greedy outputs equal to `lorakit generate`, runtime adapters, the API key and metrics."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from serve_helpers import make_world, offline, running

from lorakit.serve.app import create_app
from lorakit.serve.limits import ServeSettings

PROMPTS = {None: "the cat sat", "a1": "hello world, hello there and a dog", "a2": "numbers 12"}
KEY = "s3cret-key"
APPS: dict[str, object] = {}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_world(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(world: dict[str, Path]):  # type: ignore[no-untyped-def]
    settings = ServeSettings(model=str(world["base"]), adapters={"a1": world["a1"], "a2": world["a2"]},
                             adapter_dir=world["adapter_dir"], max_batch_size=8, max_loaded_adapters=3)
    app = create_app(settings)
    APPS["main"] = app
    with running(app) as url:
        yield url, settings.model
    app.app.state.engine.stop()


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def test_models_lists_the_base_and_every_adapter(server) -> None:  # type: ignore[no-untyped-def]
    url, base = server
    ids = [m.id for m in client(url).models.list().data]
    assert ids[0] == base and {"a1", "a2"} <= set(ids)


def test_greedy_completions_of_a_mixed_batch_equal_offline_generate(server, world) -> None:  # type: ignore[no-untyped-def]
    url, base = server
    c = client(url)

    def ask(adapter: str | None) -> str:
        out = c.completions.create(model=adapter or base, prompt=PROMPTS[adapter], max_tokens=10, temperature=0)
        return out.choices[0].text

    with ThreadPoolExecutor(6) as pool:  # twice each, at once: the rows of one batch on different adapters
        got = list(pool.map(ask, [None, "a1", "a2"] * 2))
    for adapter, text in zip([None, "a1", "a2"] * 2, got, strict=True):
        expected = offline(world["base"], world[adapter] if adapter else None, [PROMPTS[adapter]], 10, chat=False)
        assert text.strip() == expected[0], adapter


def test_greedy_chat_equals_offline_chat_generate(server, world) -> None:  # type: ignore[no-untyped-def]
    url, _ = server
    out = client(url).chat.completions.create(model="a2", messages=[{"role": "user", "content": "a dog"}],
                                              max_tokens=8, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert (out.choices[0].message.content or "").strip() == offline(world["base"], world["a2"], ["a dog"], 8,
                                                                    chat=True)[0]


def test_streamed_completion_and_chat_join_to_the_unstreamed_text(server) -> None:  # type: ignore[no-untyped-def]
    url, _ = server
    c = client(url)
    whole = c.completions.create(model="a1", prompt="the mat", max_tokens=9, temperature=0).choices[0].text
    parts = [ch.choices[0].text for ch in c.completions.create(model="a1", prompt="the mat", max_tokens=9,
                                                                temperature=0, stream=True) if ch.choices]
    assert "".join(parts) == whole
    messages = [{"role": "user", "content": "hello"}]
    chat_whole = c.chat.completions.create(model="a1", messages=messages, max_tokens=9,  # type: ignore[arg-type]
                                           temperature=0).choices[0].message.content
    chunks = list(c.chat.completions.create(model="a1", messages=messages, max_tokens=9,  # type: ignore[arg-type]
                                            temperature=0, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == chat_whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_usage_counts_prompt_and_completion_tokens(server) -> None:  # type: ignore[no-untyped-def]
    url, base = server
    out = client(url).completions.create(model=base, prompt="the cat sat", max_tokens=5, temperature=0)
    assert out.usage is not None and out.usage.completion_tokens <= 5
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.usage.prompt_tokens > 0


def test_stop_string_cuts_the_text_before_it(server) -> None:  # type: ignore[no-untyped-def]
    url, base = server
    c = client(url)
    full = c.completions.create(model=base, prompt="the cat", max_tokens=12, temperature=0).choices[0].text
    stop = full[3:5]
    cut = c.completions.create(model=base, prompt="the cat", max_tokens=12, temperature=0, stop=[stop]).choices[0]
    assert cut.text == full[:full.find(stop)] and cut.finish_reason == "stop"


def test_n_with_a_seed_gives_repeatable_samples(server) -> None:  # type: ignore[no-untyped-def]
    url, _ = server
    c = client(url)

    def sample() -> list[str]:
        out = c.completions.create(model="a1", prompt="a dog", max_tokens=8, temperature=1.0, n=3, seed=7)
        return [ch.text for ch in sorted(out.choices, key=lambda ch: ch.index)]

    first = sample()
    assert len(first) == 3 and sample() == first


def test_adapter_loads_serves_and_unloads_at_runtime(server, world) -> None:  # type: ignore[no-untyped-def]
    url, _ = server
    c = client(url)
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "a3", "lora_path": "a3"})
    assert r.status_code == 200, r.text
    assert "a3" in [m.id for m in c.models.list().data]
    text = c.completions.create(model="a3", prompt="the cat", max_tokens=6, temperature=0).choices[0].text
    assert text.strip() == offline(world["base"], world["a3"], ["the cat"], 6, chat=False)[0]
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "a3"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="a3", prompt="the cat", max_tokens=2)


def test_metrics_count_requests_and_tokens(server) -> None:  # type: ignore[no-untyped-def]
    url, base = server
    client(url).completions.create(model=base, prompt="the cat", max_tokens=3, temperature=0)
    text = httpx.get(f"{url}/metrics").text
    assert 'lorakit_requests_total{route="/v1/completions",status="200"}' in text
    assert "lorakit_generation_tokens_total" in text and "lorakit_request_latency_seconds_bucket" in text
    assert "lorakit_queue_depth" in text and "lorakit_batch_size" in text
    first_token = [line for line in text.splitlines() if line.startswith("lorakit_time_to_first_token_seconds_count")]
    assert first_token and float(first_token[0].split()[-1]) >= 1


@pytest.fixture(scope="module")
def keyed(world: dict[str, Path]):  # type: ignore[no-untyped-def]
    app = create_app(ServeSettings(model=str(world["base"]), adapters={"a1": world["a1"]}, api_key=KEY))
    with running(app) as url:
        yield url
    app.app.state.engine.stop()


def test_with_a_key_every_route_but_health_needs_it(keyed: str) -> None:
    assert httpx.get(f"{keyed}/health").status_code == 200
    for path in ("/v1/models", "/metrics", "/openapi.json"):
        assert httpx.get(f"{keyed}{path}").status_code == 401, path
    with pytest.raises(openai.AuthenticationError):
        client(keyed, "wrong-key").completions.create(model="a1", prompt="the", max_tokens=2)
    out = client(keyed, KEY).completions.create(model="a1", prompt="the", max_tokens=2, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length")


def test_without_a_key_any_bearer_is_accepted(server) -> None:  # type: ignore[no-untyped-def]
    url, _ = server
    assert httpx.get(f"{url}/v1/models").status_code == 200
    assert len(client(url, "anything").models.list().data) >= 3


def test_a_client_that_disconnects_mid_stream_leaves_the_batch(server) -> None:  # type: ignore[no-untyped-def]
    url, _ = server
    engine = APPS["main"].app.state.engine  # type: ignore[attr-defined]
    with httpx.stream("POST", f"{url}/v1/completions", json={"model": "a1", "prompt": "the cat", "max_tokens": 2000,
                                                             "ignore_eos": True, "stream": True}) as r:
        next(r.iter_lines())
        row = engine.rows[0]
    deadline = time.monotonic() + 10
    while engine.batch_size() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.batch_size() == 0
    assert row.request.cancelled.is_set() and len(row.generated) < 2000  # it left, it did not finish
