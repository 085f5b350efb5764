"""Schemathesis over the app's own OpenAPI: every route, valid and invalid generated requests.

No response may be a 5xx, and each must match the status codes and schemas the route documents.
The limits are set small so that the valid requests it makes (generations, weight-diff jobs) stay
cheap; FUZZ_EXAMPLES sets the examples per route and mode (default 150, what CI runs: 300 per route
with inputs, valid and invalid).
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi import checks

from app.main import create_app
from app.settings import Settings
from tests.test_api import make_settings, wait_ready

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
# Not `positive_data_acceptance`: a schema-valid body may still be a 422 by design (an adapter
# directory that does not exist, `prompt` and `prompts` both missing).
CHECKS = [
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.negative_data_rejection,
]


def _operations() -> list[tuple[str, str, GenerationMode]]:
    """From the schema itself (building the app loads no model), so a new route is fuzzed too.
    Invalid requests only where there is an input to make invalid."""
    found = []
    for path, item in create_app(Settings()).openapi()["paths"].items():
        for method, op in item.items():
            found.append((method.upper(), path, GenerationMode.POSITIVE))
            # Any string is a valid path segment: a route whose only input is one cannot be sent
            # invalid data.
            inputs = [p for p in op.get("parameters", []) if p["in"] != "path" or p["schema"].get("type") != "string"]
            if inputs or op.get("requestBody"):
                found.append((method.upper(), path, GenerationMode.NEGATIVE))
    return found


OPERATIONS = _operations()


@pytest.fixture(scope="module")
def fuzz_app(tiny_dirs, tmp_path_factory):
    app = create_app(
        make_settings(
            tiny_dirs, tmp_path_factory.mktemp("fuzz"), max_new_tokens_limit=4, max_rows_per_request=4,
            max_weightdiff_tasks=2, max_weightdiff_samples=4, max_weightdiff_steps=2, queue_size=64,
            max_experiment_samples=4,
        )
    )
    with TestClient(app) as client:  # runs the lifespan: models load once for the whole module
        wait_ready(client)
        yield app


def without_lifespan(app):
    """The app for schemathesis's calls: it opens a TestClient per call, which would run the
    lifespan (a new engine, the models loaded again) every time. The module's client already ran it."""

    async def wrapped(scope, receive, send):
        if scope["type"] != "lifespan":
            return await app(scope, receive, send)
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})

    return wrapped


@pytest.fixture(scope="module")
def api_schema(fuzz_app):
    return schemathesis.openapi.from_asgi("/openapi.json", without_lifespan(fuzz_app))


@pytest.mark.parametrize("method, path, mode", OPERATIONS, ids=[f"{m} {p} {g.value}" for m, p, g in OPERATIONS])
def test_no_server_errors_and_responses_match_schemas(api_schema, method, path, mode):
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def fuzz(case):
        case.call_and_validate(checks=CHECKS)  # not_a_server_error always runs

    fuzz()
