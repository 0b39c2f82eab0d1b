"""`lorakit ui`: one page, served by lorakit itself, to start, watch, compare and try training runs.

`create_app(settings)` builds the FastAPI application; `serve(settings)` runs it with uvicorn. The page is plain
HTML/JS/CSS in `static/` (no build step, no asset from the network). FastAPI and uvicorn are the `ui` extra.
"""

from __future__ import annotations

from lorakit.ui.security import UiSettings

__all__ = ["UiSettings", "create_app", "serve"]


def create_app(settings: UiSettings):  # type: ignore[no-untyped-def]
    """The FastAPI application of the page (imports FastAPI, the `ui` extra)."""
    from lorakit.ui.app import create_app as _create

    return _create(settings)


def serve(settings: UiSettings) -> None:
    """Serve the page until interrupted (imports uvicorn, the `ui` extra)."""
    from lorakit.ui.app import serve as _serve

    _serve(settings)
