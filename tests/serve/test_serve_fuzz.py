"""Hostile input answers 4xx in OpenAI's error shape and never 5xx: paths out of the adapter directory, pickles,
foreign adapters, huge bodies and numbers, unknown models, wrong keys, malformed JSON; overload answers 429; and a
bounded schemathesis run against the app's own OpenAPI schema finds no server error."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from serve_helpers import make_world, running

from lorakit.serve.app import create_app
from lorakit.serve.limits import ServeSettings

KEY = "fuzz-key"
# examples per operation and mode; a longer run: LORAKIT_SERVE_FUZZ_EXAMPLES=500 pytest tests/serve/test_serve_fuzz.py
EXAMPLES = int(os.environ.get("LORAKIT_SERVE_FUZZ_EXAMPLES", "12"))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz")
    paths = make_world(root)
    outside = root / "a1"  # a valid adapter, but outside the adapter directory
    os.symlink(outside, paths["adapter_dir"] / "link-out")
    pickled = paths["adapter_dir"] / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((outside / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    return paths


@pytest.fixture(scope="module")
def app(world: dict[str, Path]):  # type: ignore[no-untyped-def]
    settings = ServeSettings(model=str(world["base"]), adapters={"a1": world["a1"]},
                             adapter_dir=world["adapter_dir"], api_key=KEY, max_tokens_limit=8,
                             max_prompt_tokens=64)
    app = create_app(settings)
    yield app
    app.app.state.engine.stop()


@pytest.fixture(scope="module")
def url(app):  # type: ignore[no-untyped-def]
    with running(app) as url:
        yield url


def post(url: str, path: str, **kwargs) -> httpx.Response:  # type: ignore[no-untyped-def]
    return httpx.post(f"{url}{path}", headers={"Authorization": f"Bearer {KEY}"} | kwargs.pop("headers", {}),
                      timeout=30, **kwargs)


def assert_openai_error(r: httpx.Response, status: int) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and "type" in error


@pytest.mark.parametrize("lora_path", ["../a1", "/etc", "a3/../../a1", "link-out", "~/a1", "pickled", "foreign",
                                       "missing", ""])
def test_load_refuses_paths_out_of_the_adapter_dir_pickles_and_foreign_bases(url: str, lora_path: str) -> None:
    r = post(url, "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": lora_path})
    assert_openai_error(r, 400)


def test_foreign_adapter_is_refused_naming_its_base(url: str) -> None:
    r = post(url, "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "foreign"})
    assert "other-base" in r.json()["error"]["message"]


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", "", "..", "x" * 65])
def test_load_refuses_adapter_names_that_are_not_plain(url: str, name: str) -> None:
    assert_openai_error(post(url, "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": "a3"}), 400)


def test_a_10_mb_body_is_refused_with_413(url: str) -> None:
    body = b'{"model": "a1", "prompt": "' + b"a" * (10 << 20) + b'"}'
    assert_openai_error(post(url, "/v1/completions", content=body,
                             headers={"Content-Type": "application/json"}), 413)


@pytest.mark.parametrize("max_tokens", [-1, 0, 10**9, "many", 1.5])
def test_max_tokens_out_of_range_is_refused(url: str, max_tokens: object) -> None:
    r = post(url, "/v1/completions", json={"model": "a1", "prompt": "the", "max_tokens": max_tokens})
    assert_openai_error(r, 400)


def test_unknown_model_answers_404(url: str) -> None:
    assert_openai_error(post(url, "/v1/completions", json={"model": "nope", "prompt": "the"}), 404)


def test_wrong_key_answers_401(url: str) -> None:
    assert_openai_error(post(url, "/v1/models", headers={"Authorization": "Bearer wrong"}), 401)


@pytest.mark.parametrize("body", [b"{", b"[]", b'"x"', b'{"model": 3, "prompt": "x"}', b'{"prompt": "x"}',
                                  b'{"model": "a1", "messages": []}', b'{"model": "a1", "prompt": "x", "n": 0}',
                                  b'{"model": "a1", "prompt": "x", "temperature": "hot"}', b"\xff\xfe"])
def test_malformed_bodies_answer_400(url: str, body: bytes) -> None:
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    assert_openai_error(post(url, path, content=body, headers={"Content-Type": "application/json"}), 400)


def test_a_prompt_over_the_token_limit_is_refused(url: str) -> None:
    assert_openai_error(post(url, "/v1/completions", json={"model": "a1", "prompt": "the cat " * 200}), 400)


def test_overload_answers_429_with_retry_after(app, url: str) -> None:  # type: ignore[no-untyped-def]
    engine = app.app.state.engine
    engine.max_queue = 0
    try:
        r = post(url, "/v1/completions", json={"model": "a1", "prompt": "the", "max_tokens": 2})
    finally:
        engine.max_queue = 256
    assert_openai_error(r, 429)
    assert r.headers["Retry-After"] == "1"


def test_schemathesis_finds_no_server_error(app) -> None:  # type: ignore[no-untyped-def]
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers={"Authorization": f"Bearer {KEY}"})
    failures: list[str] = []
    served: list[tuple[str, int]] = []

    def on_adapter(case):  # type: ignore[no-untyped-def]
        if isinstance(case.body, dict) and "model" in case.body and len(served) % 2:  # half reach the engine
            case.body["model"] = "a1"
        return case

    for operation in schema.get_all_operations():
        op = operation.ok()
        modes = [schemathesis.GenerationMode.POSITIVE]
        if op.method.upper() == "POST":  # a GET without parameters has no wrong form
            modes.append(schemathesis.GenerationMode.NEGATIVE)
        for mode in modes:

            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(mode).map(on_adapter))
            def check(case) -> None:  # type: ignore[no-untyped-def]
                response = case.call(headers={"Authorization": f"Bearer {KEY}"})
                served.append((case.path, response.status_code))
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.path}: {response.status_code} {response.text[:200]}")

            check()
    assert not failures, failures
    generated = [path for path, status in served if status == 200 and path.endswith("completions")]
    assert len(generated) >= 2, served  # some generations ran through the engine, not only refusals
