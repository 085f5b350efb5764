"""The FastAPI application: lifespan (engine + model loading), middleware, routes."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from lda import paired
from lda.experiments import ExperimentStore
from lda.jobs import JobStore

from app.amplification_lens.amplifier import Amplifier
from app.amplification_lens.router import router as amplification_router
from app.api.background import interrupt_active
from app.api.errors import install_error_handlers
from app.api.metrics import Metrics
from app.api.middleware import CountRequests, Guard
from app.diffing_lens.router import router as diffing_router
from app.dit_lens.router import router as dit_router
from app.engine import Engine
from app.experiments_lens.jobs import Runner
from app.experiments_lens.router import router as experiments_router
from app.lda_lens.router import router as lda_router
from app.loader import compiled_decode, load_pair
from app.openai_lens.router import router as openai_router
from app.openai_lens.vllm_routes import router as vllm_router
from app.settings import Settings, get_settings
from app.system.info import model_summaries
from app.system.router import router as system_router
from app.web.router import router as web_router
from app.weightdiff_lens.router import router as weightdiff_router

log = logging.getLogger("app")

Loader = Callable[[Settings], Any]


async def _load(app: FastAPI, loader: Loader) -> None:
    """Load on the engine thread so the event loop keeps answering /health and /ready."""

    def load(job: Any) -> tuple[Any, Any, Amplifier, dict[str, Any]]:
        pair, demo = loader(app.state.settings)
        amplifier = setup_amplifier(pair, demo, app.state.settings)
        summaries = model_summaries(pair)
        compiled_decode(pair, app.state.settings)
        return pair, demo, amplifier, summaries

    try:
        pair, demo, amplifier, summaries = await app.state.engine.run(load)
    except Exception as exc:
        log.exception("model loading failed")
        app.state.load_error = f"{type(exc).__name__}: {exc}"
        return
    app.state.demo = demo
    app.state.model_summaries = summaries
    app.state.amplifier = amplifier
    app.state.pair = pair
    log.info("ready: after=%s before=%s", pair.after.model_id, pair.before.model_id)


def setup_amplifier(pair: Any, demo: Any, settings: Settings) -> Amplifier:
    """The adapter registry on the pair's base, with the demo adapter and start-up adapters loaded."""
    amp = Amplifier(pair, settings)
    if demo is not None and settings.demo:
        amp.load_adapter("demo", str(demo.adapter))
    for name, source in settings.startup_adapters:
        amp.load_adapter(name, source)
    return amp


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def warn_if_exposed(settings: Settings) -> None:
    """One warning at start when the API listens beyond this machine with no API_KEY.

    The image binds 0.0.0.0 and RunPod/Vast publish the port: without a key anyone who finds the
    URL can generate, load adapters, start training jobs and send bodies up to MAX_BODY_BYTES.
    """
    if settings.api_keys or _loopback(settings.host):
        return
    log.warning(
        "serving on %s:%d without API_KEY: every route is open to anyone who can reach this port "
        "(generation, adapters, weight-diff and experiment jobs); set API_KEY on any public host",
        settings.host,
        settings.port,
    )


def create_app(settings: Settings | None = None, loader: Loader = load_pair) -> FastAPI:
    """Build the app. Tests pass their own settings and a loader for tiny local models."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        warn_if_exposed(settings)
        app.state.jobs = JobStore(settings.data_dir / "jobs")
        lost = app.state.jobs.recover()
        if lost:
            log.warning("weight-diff jobs interrupted by the last shutdown: %s", ", ".join(lost))
        app.state.dit_jobs = JobStore(settings.data_dir / "dit_jobs")
        lost = app.state.dit_jobs.recover()
        if lost:
            log.warning("interpreter jobs interrupted by the last shutdown: %s", ", ".join(lost))
        app.state.diffing_jobs = JobStore(settings.data_dir / "diffing_jobs")
        lost = app.state.diffing_jobs.recover()
        if lost:
            log.warning("diffing jobs interrupted by the last shutdown: %s", ", ".join(lost))
        app.state.experiments = ExperimentStore(settings.data_dir / "experiments")
        app.state.experiment_runner = runner = Runner(app)
        resume = app.state.experiments.recover()
        app.state.engine.start()
        task = asyncio.create_task(_load(app, loader))
        resuming = asyncio.create_task(runner.resume(task, resume))
        try:
            yield
        finally:
            task.cancel()
            resuming.cancel()
            runner.stop()
            for job_task in list(app.state.job_tasks):
                job_task.cancel()
            # After the engine stops: a step still running there saves its (live, "running") record
            # when it ends, which would overwrite an earlier "interrupted".
            await asyncio.to_thread(app.state.engine.stop)
            interrupt_active(app.state.jobs)
            interrupt_active(app.state.dit_jobs)
            interrupt_active(app.state.diffing_jobs)
            app.state.experiments.recover()  # experiments left running are reported interrupted

    app = FastAPI(
        title="Model diffing service",
        description="Logit diff amplification, amplified LoRA merges and batched weight diffs over HTTP.",
        version="0.1.0",
        lifespan=lifespan,
        # /docs is app/web's, with local files (FastAPI's loads them from a CDN); no ReDoc (see there).
        docs_url=None,
        redoc_url=None,
    )
    metrics = Metrics()
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.engine = Engine(
        settings.queue_size,
        metrics.engine_changed,
        settings.max_batch_rows,
        settings.max_batch_tokens,
        settings.max_prefill_tokens,
        before_job=paired.may_change,
    )
    app.state.pair = None
    app.state.amplifier = None
    app.state.demo = None
    app.state.load_error = None
    app.state.job_tasks = set()
    app.state.open_streams = 0
    app.state.started_at = time.time()  # /v1/models' `created`
    app.state.job_cancels = {}
    app.state.dit_cancels = {}
    app.state.diffing_cancels = {}
    install_error_handlers(app)
    app.include_router(system_router)
    app.include_router(lda_router)
    app.include_router(amplification_router)
    app.include_router(weightdiff_router)
    app.include_router(dit_router)
    app.include_router(diffing_router)
    app.include_router(experiments_router)
    app.include_router(openai_router)
    app.include_router(vllm_router)
    app.include_router(web_router)

    if settings.cors_origin_list:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origin_list, allow_methods=["*"], allow_headers=["*"]
        )
    # Added last = outermost: every request is counted, refusals (401, 413) included.
    app.add_middleware(
        Guard,
        max_body_bytes=settings.max_body_bytes,
        keys=settings.api_keys,
        metrics_public=settings.metrics_public,
    )
    app.add_middleware(CountRequests, metrics=metrics)
    return app
