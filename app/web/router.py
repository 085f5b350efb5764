"""`/` and `/static/{name}`: the web page's files, served as they are on disk; `/docs`: the
OpenAPI UI (Swagger UI 5) from the files the `fastapi-offline` package ships, under
`/static/api-ui/{name}`, so it works where the browser cannot reach the internet (FastAPI's default
page loads them from a CDN). There is no `/redoc`: ReDoc's page fetches its logo from its CDN.

Only files present when the process starts are served (no path from the request ever reaches the
filesystem), and the routes stay out of the OpenAPI schema: they are not API.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

STATIC = Path(__file__).parent / "static"
FILES = {p.name: p for p in STATIC.iterdir() if p.is_file()}
# No cache: a page built against one server version must not outlive an upgrade in the browser.
HEADERS = {"Cache-Control": "no-cache"}
API_UI = Path(fastapi_offline.__file__).parent / "static"
API_UI_FILES = {n: API_UI / n for n in ("swagger-ui-bundle.js", "swagger-ui.css", "favicon.png")}
MEDIA = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".svg": "image/svg+xml"}

router = APIRouter(include_in_schema=False)


def _file(path: Path) -> FileResponse:
    media = MEDIA.get(path.suffix)
    return FileResponse(path, media_type=f"{media}; charset=utf-8" if media else None, headers=HEADERS)


@router.api_route("/", methods=["GET", "HEAD"])
async def index() -> FileResponse:
    return _file(FILES["index.html"])


def _named(files: dict[str, Path], name: str) -> FileResponse:
    path = files.get(name)
    if path is None:
        raise FileNotFoundError(f"no static file {name!r}")
    return _file(path)


@router.api_route("/static/{name}", methods=["GET", "HEAD"])
async def static(name: str) -> FileResponse:
    return _named(FILES, name)


def _api_ui(request: Request) -> tuple[str, str, str]:
    """(the schema's URL, the UI files' URL prefix, the page title), behind a proxy's root path too."""
    root = request.scope.get("root_path", "")
    return f"{root}{request.app.openapi_url}", f"{root}/static/api-ui", request.app.title


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    schema, files, title = _api_ui(request)
    return get_swagger_ui_html(
        openapi_url=schema,
        title=f"{title}: Swagger UI",
        swagger_js_url=f"{files}/swagger-ui-bundle.js",
        swagger_css_url=f"{files}/swagger-ui.css",
        swagger_favicon_url=f"{files}/favicon.png",
    )


@router.api_route("/static/api-ui/{name}", methods=["GET", "HEAD"])
async def api_ui_static(name: str) -> FileResponse:
    return _named(API_UI_FILES, name)
