"""The page's HTTP routes (FastAPI): the static page, and a JSON API the page polls. Library errors become
`{"errors": [...]}` with status 400 (422 for a launch request's problems, 413 for a body over the size cap), so
the page shows them inline and the server carries on."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import yaml
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from lorakit.errors import LorakitError
from lorakit.ui import runs, tryout
from lorakit.ui.launcher import Launcher
from lorakit.ui.security import UiSettings, check_run_name, confined, host_ok, token_ok
from lorakit.ui.validation import FORM_KEYS, LaunchProblems, check_launch, form_fields, read_request_yaml, recipe_names

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


class BodyTooLarge(Exception):
    def __init__(self, size: int | None, limit: int):
        shown = f"{size:,} bytes" if size is not None else f"over {limit:,} bytes"
        super().__init__(f"the request is {shown}; the page accepts at most {limit:,} bytes (a training YAML is a "
                         "few kB): upload the config file, not the data")


def _errors(status: int, problems: list[str]) -> JSONResponse:
    return JSONResponse({"errors": problems}, status_code=status)


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The request's JSON object, refused by size before it is read (Content-Length) or while it is read."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(int(declared), limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge(None, limit)
    try:
        value = json.loads(body or b"{}")
    except ValueError:
        raise LorakitError("the request body is not JSON") from None
    if not isinstance(value, dict):
        raise LorakitError("the request body must be a JSON object")
    return value


def create_app(settings: UiSettings) -> FastAPI:
    """The application serving the page for `settings` (the working directory, runs directory, token, caps)."""
    app = FastAPI(title="lorakit ui", docs_url=None, redoc_url=None, openapi_url=None)
    launcher = Launcher(settings)
    cache = tryout.ModelCache()
    launch_lock = threading.Lock()
    app.state.settings, app.state.launcher, app.state.cache = settings, launcher, cache

    @app.middleware("http")
    async def check_token(request: Request, call_next: Any) -> Response:
        if not host_ok(settings, request.headers.get("host", "")):
            return _errors(421, [f"this page answers as {settings.host}:{settings.port} only (Host header "
                                 f"{request.headers.get('host')!r}); open it at that address"])
        if request.method == "POST" and not request.headers.get("content-type", "").startswith("application/json"):
            return _errors(415, ["the API takes JSON bodies (Content-Type: application/json)"])
        if request.url.path.startswith("/api/"):
            auth = request.headers.get("authorization", "")
            given = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else None
            if not token_ok(settings.token, given or request.query_params.get("token")):
                return _errors(401, ["this page needs its token: open it as http://HOST:PORT/?token=TOKEN"])
        return await call_next(request)

    @app.exception_handler(BodyTooLarge)
    async def too_large(_: Request, e: BodyTooLarge) -> JSONResponse:
        return _errors(413, [str(e)])

    @app.exception_handler(LaunchProblems)
    async def launch_problems(_: Request, e: LaunchProblems) -> JSONResponse:
        return _errors(422, e.problems)

    @app.exception_handler(LorakitError)
    async def lorakit_error(_: Request, e: LorakitError) -> JSONResponse:
        return _errors(400, [str(e)])

    @app.get("/")
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return {"recipes": recipe_names(settings), "runs_dir": settings.shown(settings.runs_dir),
                "root": str(settings.root), "max_upload_bytes": settings.max_upload_bytes, "form_keys": FORM_KEYS}

    @app.get("/api/recipe")
    def recipe(name: str) -> dict[str, Any]:
        text, _, _ = read_request_yaml(settings, {"recipe": name})
        return {"yaml": text, "fields": form_fields(yaml.safe_load(text))}

    @app.post("/api/parse")
    async def parse(request: Request) -> dict[str, Any]:
        body = await read_json(request, settings.max_upload_bytes)
        text, shown, _ = read_request_yaml(settings, body)
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise LorakitError(f"{shown} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
        return {"fields": form_fields(raw)}

    @app.post("/api/check")
    async def check(request: Request) -> dict[str, Any]:
        body = await read_json(request, settings.max_upload_bytes)
        plan = await run_in_threadpool(check_launch, settings, body, launcher.running())
        return {"ok": True, "out_dir": settings.shown(plan.out_dir)}

    @app.post("/api/runs")
    async def launch(request: Request) -> dict[str, Any]:
        body = await read_json(request, settings.max_upload_bytes)
        return await run_in_threadpool(_launch, body)

    def _launch(body: dict[str, Any]) -> dict[str, Any]:
        with launch_lock:  # two requests for one name: the second sees the first's run
            return launcher.start(check_launch(settings, body, launcher.running()))

    @app.get("/api/runs")
    def list_runs() -> dict[str, Any]:
        return {"runs": [runs.run_row(settings, launcher, n) for n in runs.run_names(settings)],
                "sweeps": runs.sweeps(settings)}

    @app.get("/api/runs/{name}")
    def run(name: str) -> dict[str, Any]:
        _known(name)
        return runs.run_detail(settings, launcher, name)

    @app.post("/api/runs/{name}/stop")
    def stop(name: str) -> dict[str, Any]:
        _known(name)
        launcher.stop(name)
        return {"stopped": name}

    @app.post("/api/runs/{name}/resume")
    def resume(name: str) -> dict[str, Any]:
        _known(name)
        return launcher.resume(name)

    @app.get("/api/adapters")
    def adapters() -> dict[str, Any]:
        return {"adapters": tryout.adapter_runs(settings)}

    @app.post("/api/generate")
    async def generate(request: Request) -> dict[str, Any]:
        body = await read_json(request, settings.max_upload_bytes)
        return {"answers": await run_in_threadpool(tryout.answer, settings, cache, body)}

    @app.get("/api/file")
    def file(path: str) -> FileResponse:
        target = settings.resolve(path)
        if not confined(settings, target) or settings.runs_dir not in target.parents \
                or target.suffix not in runs.FIGURES or not target.is_file():
            raise LorakitError(f"{path!r} is not a figure under {settings.shown(settings.runs_dir)}")
        return FileResponse(target)

    def _known(name: str) -> None:
        if (bad := check_run_name(name)) is not None:
            raise LorakitError(bad)
        if name not in runs.run_names(settings):
            raise LorakitError(f"no run {name!r} in {settings.shown(settings.runs_dir)}")

    return app


def serve(settings: UiSettings) -> None:
    """Serve the page with uvicorn until interrupted."""
    import uvicorn

    log.info("lorakit ui on http://%s:%d/ (runs in %s)", settings.host, settings.port, settings.runs_dir)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning")
