"""`/` and `/static/{name}`: the web page's files, served as they are on disk.

Only files present in `static/` when the process starts are served (no path from the request ever
reaches the filesystem), and the routes stay out of the OpenAPI schema: they are not API.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC = Path(__file__).parent / "static"
FILES = {p.name: p for p in STATIC.iterdir() if p.is_file()}
# No cache: a page built against one server version must not outlive an upgrade in the browser.
HEADERS = {"Cache-Control": "no-cache"}
MEDIA = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".svg": "image/svg+xml"}

router = APIRouter(include_in_schema=False)


def _file(path: Path) -> FileResponse:
    media = MEDIA.get(path.suffix)
    return FileResponse(path, media_type=f"{media}; charset=utf-8" if media else None, headers=HEADERS)


@router.api_route("/", methods=["GET", "HEAD"])
async def index() -> FileResponse:
    return _file(FILES["index.html"])


@router.api_route("/static/{name}", methods=["GET", "HEAD"])
async def static(name: str) -> FileResponse:
    path = FILES.get(name)
    if path is None:
        raise FileNotFoundError(f"no static file {name!r}")
    return _file(path)
