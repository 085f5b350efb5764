"""The web page's files without a browser: `/` and every static file are served with their content
types, without the API key, and nothing in them points at another host (the page must work on an
offline pod). The browser test is tests/test_web_page.py."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from app.web.router import STATIC

FILES = sorted(p.name for p in STATIC.iterdir() if p.is_file())
TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
# Anything that makes a browser fetch: src/href attributes, ES imports, CSS url() and @import.
FETCHES = re.compile(
    r"""(?:\b(?:src|href)\s*=\s*["']?|\bimport\b[^;'"]*?\bfrom\s*["']|\bimport\s*\(\s*["']|url\(\s*["']?|@import\s+["'])"""
    r"""\s*(?P<target>[^"')\s>]+)""",
    re.IGNORECASE,
)


def no_models(settings: Settings) -> None:
    raise RuntimeError("this test loads no models")  # the page's routes need none


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("web-static"))
    with TestClient(create_app(settings, loader=no_models)) as c:
        yield c


def test_the_page_and_its_files_are_served_with_their_types(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="/static/main.js">' in r.text
    assert {"index.html", "main.js", "api.js", "page.css"} <= set(FILES)
    for name in FILES:
        r = client.get(f"/static/{name}")
        assert r.status_code == 200, name
        suffix = name[name.rindex(".") :]
        assert r.headers["content-type"].startswith(TYPES[suffix]), (name, r.headers["content-type"])


def test_unknown_and_traversing_names_are_404_in_the_error_shape(client):
    for path in ("/static/nope.js", "/static/..%2Frouter.py", "/static/%2e%2e%2f__init__.py"):
        r = client.get(path)
        assert r.status_code == 404, path
        assert r.json()["error"]["message"]


def test_the_page_is_not_in_the_api_schema(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and not any(p.startswith("/static") for p in paths)


def test_every_fetch_in_the_static_files_is_same_origin():
    targets = []
    for name in FILES:
        text = (STATIC / name).read_text()
        for match in FETCHES.finditer(text):
            targets.append((name, match["target"]))
    assert any(t == "/static/main.js" for _, t in targets)  # the pattern sees what the page loads
    assert any(t == "./api.js" for _, t in targets)
    outside = [(n, t) for n, t in targets if re.match(r"(?:[a-z]+:)?//", t, re.IGNORECASE)]
    assert not outside, outside
    # No web fonts and no CDN hosts anywhere, not only in attributes.
    for name in FILES:
        text = (STATIC / name).read_text()
        assert "@font-face" not in text, name
        hosts = re.findall(r"https?://([^/\"'\s]+)", text)
        assert set(hosts) <= {"www.w3.org"}, (name, hosts)  # the SVG namespace is a name, not a fetch


def test_the_page_needs_no_api_key(tmp_path):
    settings = Settings(data_dir=tmp_path, api_key="secret")
    with TestClient(create_app(settings, loader=no_models)) as c:
        assert c.get("/").status_code == 200
        assert c.get("/static/main.js").status_code == 200
        assert c.get("/info").status_code == 401  # the API itself still needs the key
