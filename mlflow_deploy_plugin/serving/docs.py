"""``/docs``: Swagger UI over ``/openapi.json``, with its files served by the worker itself.

FastAPI's own docs page loads Swagger UI from a CDN, which a deployment on a closed network cannot
reach (the page stays blank). The package ``fastapi-offline`` ships Swagger UI's built files; they
are served here under ``/docs/`` so the page needs no host but the deployment's own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

DOCS_URL = "/docs"
# The files of Swagger UI's dist that the page loads, and their media types.
ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon.png": "image/png"}


def _static_dir() -> Path:
    return Path(str(files("fastapi_offline") / "static"))


def add_docs(app: FastAPI) -> None:
    """Serve ``/docs`` and its assets (not in the schema: they are no API). ``app`` must have been made
    with ``docs_url=None`` so FastAPI does not add its CDN page."""
    static = _static_dir()
    assert app.openapi_url is not None

    async def page(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{DOCS_URL}/swagger-ui-bundle.js", swagger_css_url=f"{root}{DOCS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_URL}/favicon.png",
            # No validator badge: Swagger UI would send the schema to an online validator.
            swagger_ui_parameters={"validatorUrl": None})

    app.add_api_route(DOCS_URL, page, methods=["GET"], include_in_schema=False)
    for name, media_type in ASSETS.items():
        app.add_api_route(f"{DOCS_URL}/{name}", _serve_file(static / name, media_type), methods=["GET"],
                          include_in_schema=False)


def _serve_file(path: Path, media_type: str) -> Callable[[], Awaitable[FileResponse]]:
    async def asset() -> FileResponse:
        return FileResponse(path, media_type=media_type, headers={"Cache-Control": "public, max-age=86400"})

    return asset
