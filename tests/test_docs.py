"""The documentation site (mkdocs.yml, docs/) builds --strict, stays offline and in step with the code.

The site is built once per module into a temporary folder (`mkdocs build --strict -d TMP`, ~10 s on
2 cores). Checked: the build passes with no warning (a broken link or anchor fails --strict); no
page loads anything from another host (a `<script src>`, a `<link href>`, a CSS `@import` or font
URL); the generated configuration page lists every `Settings` field's environment variable; the
generated HTTP reference lists every route of the app's OpenAPI schema; every curl example's JSON
body in the pages and the README is valid for its route's request schema (tests/test_docs_examples.py
runs them against a server); the README's links into docs/ point at pages that exist.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
# An address on another host: a scheme with // (http:, https:, ...) or a protocol-relative //host.
EXTERNAL = re.compile(r"^\s*(?:[a-z][a-z0-9+.-]*:)?//", re.IGNORECASE)
CSS_URLS = re.compile(r"""@import\s+(?:url\()?\s*["']?([^"')\s;]+)|url\(\s*["']?([^"')\s]+)""", re.IGNORECASE)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    assert "WARNING" not in proc.stderr, proc.stderr
    return out


class Resources(HTMLParser):
    """What a page loads: script sources, link hrefs, and inline <style> text."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.styles: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script" and attrs.get("src"):
            self.urls.append(attrs["src"])
        elif tag == "link" and attrs.get("href"):
            self.urls.append(attrs["href"])
        elif tag == "style":
            self._in_style = True
        for name, value in attrs.items():  # inline style="...url(...)"
            if name == "style" and value:
                self.styles.append(value)

    def handle_endtag(self, tag):
        if tag == "style":
            self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.styles.append(data)


def css_urls(text: str) -> list[str]:
    return [a or b for a, b in CSS_URLS.findall(text)]


def test_the_site_builds_strict(site):
    pages = {p.name for p in site.glob("*.html")}
    for name in ("index", "concepts", "configuration", "http-reference", "deploy", "experiments"):
        assert f"{name}.html" in pages
    # The generated pages were generated: no marker left behind.
    for name in ("configuration.html", "http-reference.html", "benchmarks.html"):
        assert "<!--" not in (site / name).read_text().split('<article class="md-content__inner', 1)[1]


def test_no_page_loads_anything_from_another_host(site):
    pages = list(site.rglob("*.html"))
    assert len(pages) >= 15
    offending = []
    for page in pages:
        parser = Resources()
        parser.feed(page.read_text())
        urls = parser.urls + [u for s in parser.styles for u in css_urls(s)]
        offending += [f"{page.relative_to(site)}: {u}" for u in urls if EXTERNAL.match(u)]
    for sheet in site.rglob("*.css"):
        text = sheet.read_text()
        offending += [f"{sheet.relative_to(site)}: {u}" for u in css_urls(text) if EXTERNAL.match(u)]
        if "@font-face" in text:
            offending.append(f"{sheet.relative_to(site)}: @font-face")
    assert not offending, offending
    # Search works offline: the index is inlined as a script, and the file:// shim is the local one.
    assert (site / "search" / "search_index.js").is_file()
    assert 'src="assets/iframe-worker/shim.js"' in (site / "index.html").read_text()


def test_the_benchmarks_page_quotes_the_committed_results(site):
    import json

    from tests.benchmarks.plots import RESULTS

    text = (site / "benchmarks.html").read_text()
    lda = json.loads((RESULTS / "bench_lda.json").read_text())
    rows = sorted(int(k[5:-13]) for k in lda if k.startswith("lda_b") and k.endswith("_tokens_per_s"))
    for r in rows:
        assert f"<td>{lda[f'lda_b{r}_tokens_per_s']}</td>" in text, r
    assert text.count('src="assets/benchmarks/') == 4


def test_the_configuration_page_lists_every_setting(site):
    text = (site / "configuration.html").read_text()
    missing = [n.upper() for n in Settings.model_fields if f"<code>{n.upper()}</code>" not in text]
    assert not missing, missing
    for name, field in Settings.model_fields.items():
        assert field.description, f"Settings.{name} has no description= for the configuration page"


@pytest.fixture(scope="module")
def openapi() -> dict:
    from app.main import create_app

    return create_app(Settings(_env_file=None)).openapi()


def test_the_http_reference_lists_every_route(site, openapi):
    schema = openapi
    text = (site / "http-reference.html").read_text()
    missing = []
    for path, item in schema["paths"].items():
        for method in ("get", "post", "put", "patch", "delete"):
            if method in item and f"<code>{method.upper()} {path}</code>" not in text:
                missing.append(f"{method.upper()} {path}")
    assert len(schema["paths"]) >= 40
    assert not missing, missing


def test_the_readme_links_into_pages_that_exist():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)#]*)", readme)
    assert len(links) >= 15
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, missing
    assert "make docs" in readme


# `curl [-s ...] [scheme://]HOST/ROUTE ... -d '{...}'`, over continuation lines.
CURL = re.compile(
    r"curl (?:-\S+ )*(?:https?://)?[^/\s]+(/[^\s'\"?]*)[^\n]*?(?:\\\n[^\n]*?)*?-d '(\{.*?\})'", re.DOTALL
)


def test_every_curl_example_body_fits_its_route(openapi):
    import jsonschema

    checked, bad = 0, []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for match in CURL.finditer(page.read_text()):
            route, body = match.groups()
            where = f"{page.relative_to(ROOT)}: POST {route}"
            op = openapi["paths"].get(route, {}).get("post")
            if op is None:
                bad.append(f"{where}: no such route")
                continue
            body_schema = op["requestBody"]["content"]["application/json"]["schema"]
            schema = {**body_schema, "components": openapi["components"]}
            try:
                jsonschema.validate(json.loads(body), schema)
            except (ValueError, jsonschema.ValidationError) as exc:
                bad.append(f"{where}: {str(exc).splitlines()[0]}")
            checked += 1
    assert checked >= 30
    assert not bad, bad
