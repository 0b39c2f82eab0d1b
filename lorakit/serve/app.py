"""The HTTP app: OpenAI's routes and shapes over the engine, runtime adapter loading, /health and /metrics.

    app = create_app(ServeSettings(model="smollm2", adapters={"math": Path("adapters/math")}))
    # POST /v1/completions {"model": "math", "prompt": "2 + 2 =", "max_tokens": 8}

The `model` field of a request picks the adapter; the base answers to its own name. Every request becomes one
engine row per prompt and per `n`; the handler waits on an asyncio queue the engine feeds through
`loop.call_soon_threadsafe`, so the event loop never blocks the engine, and a client that goes away cancels its
rows at the next step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from lorakit.errors import LorakitError
from lorakit.generation import chat_prompt
from lorakit.inference import load_for_inference
from lorakit.serve import engine as eng
from lorakit.serve.adapters import AdapterRegistry, base_names, prepare_model
from lorakit.serve.limits import Guard, ServeSettings, error_body
from lorakit.serve.metrics import Metrics

Stop = str | list[str] | None


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1)
    stop: Stop = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    ignore_eos: bool = False  # vLLM's extension


class CompletionRequest(_Sampling):
    prompt: str | list[str]


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class LoadAdapter(BaseModel):
    lora_name: str
    lora_path: str


class UnloadAdapter(BaseModel):
    lora_name: str


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers


def create_app(settings: ServeSettings, loaded: tuple[Any, Any] | None = None) -> Any:
    """The server's ASGI app (FastAPI inside `Guard`); loads the base (or takes `loaded` = (model, tokenizer)),
    reads the adapters and starts the engine thread. The FastAPI app is `app.app`, the engine
    `app.app.state.engine`."""
    if loaded is None:
        base = load_for_inference(settings.model)
        model, tokenizer = cast(Any, base.model), base.tokenizer
    else:
        model, tokenizer = loaded
    if not callable(getattr(model, "can_generate", None)) or not model.can_generate():
        raise LorakitError(f"model {settings.model!r} cannot generate text; serve a causal LM such as smollm2")
    prepare_model(model)
    metrics = Metrics()
    engine = eng.Engine(model, tokenizer, eng.AdapterSet(), max_batch_size=settings.max_batch_size,
                        max_queue=settings.max_queue, on_step=metrics.on_step)
    registry = AdapterRegistry(base_names(settings.model, model), settings.adapter_dir,
                               settings.max_loaded_adapters, engine.in_use)
    engine.adapters = registry.adapters
    for name, path in settings.adapters.items():
        registry.add(name, Path(path))
    app = FastAPI(title="lorakit serve", version="1", docs_url=None, redoc_url=None)
    app.state.engine, app.state.registry, app.state.metrics = engine, registry, metrics
    _routes(app, settings, engine, registry, metrics, tokenizer)
    _errors(app)
    engine.start()
    app.router.on_shutdown.append(engine.stop)
    known = {"/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter",
             "/v1/unload_lora_adapter", "/openapi.json"}

    def count(path: str, status: int) -> None:
        metrics.requests.labels(path if path in known else "other", str(status)).inc()

    return Guard(app, settings, on_response=count)


def _errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(error_body(e.message, e.status, e.code), e.status, headers=e.headers)

    @app.exception_handler(LorakitError)
    async def lorakit_error(_: Request, e: LorakitError) -> JSONResponse:
        return JSONResponse(error_body(str(e), 400), 400)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in err.get('loc', ())[1:]) or 'body'}: {err.get('msg')}"
                    for err in e.errors()[:5]]
        return JSONResponse(error_body("; ".join(problems) or "invalid request", 400), 400)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(e.detail), e.status_code), e.status_code, headers=e.headers)


def _routes(app: FastAPI, settings: ServeSettings, engine: eng.Engine, registry: AdapterRegistry,
            metrics: Metrics, tokenizer: Any) -> None:
    created = int(time.time())

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        def card(name: str, parent: str | None) -> dict[str, Any]:
            return {"id": name, "object": "model", "created": created, "owned_by": "lorakit", "root": name,
                    "parent": parent}
        return {"object": "list", "data": [card(settings.model, None)]
                + [card(n, settings.model) for n in registry.names()]}

    @app.post("/v1/load_lora_adapter")
    def load_adapter(body: LoadAdapter) -> dict[str, str]:
        registry.load_runtime(body.lora_name, body.lora_path)
        return {"status": "ok", "lora_name": body.lora_name}

    @app.post("/v1/unload_lora_adapter")
    def unload_adapter(body: UnloadAdapter) -> dict[str, str]:
        try:
            registry.remove(body.lora_name)
        except LorakitError as e:
            raise ApiError(404, str(e), "model_not_found") from None
        return {"status": "ok", "lora_name": body.lora_name}

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, http: Request) -> Response | dict[str, Any]:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise ApiError(400, "prompt: give a string or a non-empty list of strings")
        ids = [tokenizer(p)["input_ids"] for p in prompts]
        return await _complete(http, body, ids, body.max_tokens, chat=False)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatRequest, http: Request) -> Response | dict[str, Any]:
        messages = [{"role": m.role, "content": m.content if isinstance(m.content, str) else
                     "".join(p.text for p in m.content or [])} for m in body.messages]
        text = chat_prompt(tokenizer, messages)
        ids = [tokenizer(text, add_special_tokens=False)["input_ids"]]
        return await _complete(http, body, ids, body.max_completion_tokens or body.max_tokens, chat=True)

    async def _complete(http: Request, body: _Sampling, ids: list[list[int]], max_tokens: int | None,
                        chat: bool) -> Response | dict[str, Any]:
        started = time.monotonic()
        adapter = _adapter(body.model)
        max_tokens = max_tokens or min(256 if chat else 16, settings.max_tokens_limit)
        if max_tokens > settings.max_tokens_limit:
            raise ApiError(400, f"max_tokens is {max_tokens}; this server allows at most {settings.max_tokens_limit}",
                           "max_tokens_too_large")
        if body.n * len(ids) > settings.max_n:
            raise ApiError(400, f"n x prompts is {body.n * len(ids)}; this server allows at most {settings.max_n}")
        longest = max(len(i) for i in ids)
        if longest > settings.max_prompt_tokens or min(len(i) for i in ids) == 0:
            raise ApiError(400, f"the prompt has {longest} tokens; give 1 to {settings.max_prompt_tokens}",
                           "context_length_exceeded")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4 or any(len(s) > 256 for s in stops):
            raise ApiError(400, "stop: at most 4 strings of at most 256 characters")
        loop, queue = asyncio.get_running_loop(), asyncio.Queue[tuple[int, eng.Event]]()
        rows: list[eng.Request] = []
        for i in range(body.n * len(ids)):
            def emit(event: eng.Event, i: int = i) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, (i, event))
            rows.append(eng.Request(ids[i // body.n], adapter, emit, max_tokens=max_tokens,
                                    temperature=body.temperature, top_p=body.top_p, stop=stops,
                                    seed=None if body.seed is None else body.seed + i,
                                    timeout_s=settings.request_timeout_s, ignore_eos=body.ignore_eos))
        try:
            for row in rows:
                engine.submit(row)
        except eng.Overloaded as e:
            for row in rows:
                row.cancelled.set()
            raise ApiError(429, str(e), "overloaded", headers={"Retry-After": "1"}) from None
        prompt_tokens = sum(len(ids[i // body.n]) for i in range(len(rows)))
        metrics.prompt_tokens.inc(prompt_tokens)
        shape = _Shape(body.model, chat, prompt_tokens)
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_stream(http, queue, rows, shape, started, usage),
                                     media_type="text/event-stream")
        return await _gather(http, queue, rows, shape, started)

    def _adapter(model: str) -> str | None:
        if model == settings.model:
            return None
        if not registry.touch(model):
            known = ", ".join([settings.model, *registry.names()])
            raise ApiError(404, f"the model {model!r} does not exist; this server has {known}", "model_not_found")
        return model

    async def _events(http: Request, queue: asyncio.Queue[tuple[int, eng.Event]], rows: list[eng.Request],
                      started: float) -> AsyncIterator[tuple[int, eng.Event]]:
        left, first = len(rows), True
        while left:
            try:
                i, event = await asyncio.wait_for(queue.get(), timeout=0.5)
            except TimeoutError:
                if await http.is_disconnected():
                    raise asyncio.CancelledError from None
                continue
            if first:
                metrics.first_token.observe(time.monotonic() - started)
                first = False
            if event.finish_reason is not None:
                left -= 1
            yield i, event

    async def _gather(http: Request, queue: asyncio.Queue[tuple[int, eng.Event]], rows: list[eng.Request],
                      shape: _Shape, started: float) -> dict[str, Any]:
        texts, reasons, tokens = [""] * len(rows), [""] * len(rows), [0] * len(rows)
        try:
            async for i, event in _events(http, queue, rows, started):
                texts[i] += event.text
                tokens[i] = event.tokens
                if event.finish_reason is not None:
                    _check_failed(event)
                    reasons[i] = event.finish_reason
        finally:
            for row in rows:
                row.cancelled.set()
        _count(started, sum(tokens))
        return shape.whole(texts, reasons, sum(tokens))

    async def _stream(http: Request, queue: asyncio.Queue[tuple[int, eng.Event]], rows: list[eng.Request],
                      shape: _Shape, started: float, usage: bool) -> AsyncIterator[str]:
        tokens = [0] * len(rows)
        try:
            if shape.chat:
                for i in range(len(rows)):
                    yield _sse(shape.chunk(i, None, None, role=True))
            async for i, event in _events(http, queue, rows, started):
                tokens[i] = event.tokens
                if event.error is not None:
                    yield _sse(error_body(event.error, 408 if event.finish_reason == "timeout" else 409))
                    return
                if event.text or event.finish_reason:
                    yield _sse(shape.chunk(i, event.text, event.finish_reason))
            if usage:
                yield _sse(shape.usage_chunk(sum(tokens)))
            yield "data: [DONE]\n\n"
            _count(started, sum(tokens))
        finally:
            for row in rows:
                row.cancelled.set()

    def _count(started: float, tokens: int) -> None:
        metrics.generation_tokens.inc(tokens)
        metrics.latency.observe(time.monotonic() - started)



def _check_failed(event: eng.Event) -> None:
    if event.error is not None:
        raise ApiError(408 if event.finish_reason == "timeout" else 409, event.error, event.finish_reason)


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


class _Shape:
    """OpenAI's response objects for one request (text completion or chat completion)."""

    def __init__(self, model: str, chat: bool, prompt_tokens: int):
        self.model, self.chat, self.prompt_tokens = model, chat, prompt_tokens
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _head(self, object_: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model}

    def _usage(self, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def whole(self, texts: list[str], reasons: list[str], completion_tokens: int) -> dict[str, Any]:
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r,
                        "logprobs": None} for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]
        else:
            choices = [{"index": i, "text": t, "finish_reason": r, "logprobs": None}
                       for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]
        return self._head(self.object) | {"choices": choices, "usage": self._usage(completion_tokens)}

    def chunk(self, i: int, text: str | None, reason: str | None, role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else (
                {"content": text} if text else {})
            choice: dict[str, Any] = {"index": i, "delta": delta, "finish_reason": reason, "logprobs": None}
            return self._head("chat.completion.chunk") | {"choices": [choice]}
        return self._head("text_completion") | {"choices": [{"index": i, "text": text or "",
                                                              "finish_reason": reason, "logprobs": None}]}

    def usage_chunk(self, completion_tokens: int) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return self._head(kind) | {"choices": [], "usage": self._usage(completion_tokens)}
