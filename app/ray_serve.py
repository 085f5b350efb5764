"""The same FastAPI app as a Ray Serve deployment: one replica per GPU, each with its own engine.

    serve run app.ray_serve:build_app                     # settings and scaling from the environment
    serve run app.ray_serve:build_app num_replicas=2 data_dir=/shared/data
    python -m app.ray_serve                               # local Ray, Serve's proxy on HOST:PORT

Ray is imported here only (`pip install .[ray]`); the rest of the service never needs it. Each
replica runs `create_app(settings)` unchanged: its own engine thread, its own bounded queue, its
own copy of the model pair. Serve's proxy balances between replicas and scales their number.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve import Application
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.gpu_probe import check
from app.settings import Settings

# Scaling options: a `serve run` argument wins over the environment variable.
SCALING_ENV = {
    "num_replicas": "RAY_NUM_REPLICAS",
    "min_replicas": "RAY_MIN_REPLICAS",
    "max_replicas": "RAY_MAX_REPLICAS",
    "target_ongoing_requests": "RAY_TARGET_ONGOING_REQUESTS",
    "num_gpus": "RAY_NUM_GPUS_PER_REPLICA",
    "num_cpus": "RAY_NUM_CPUS_PER_REPLICA",
}
REPLICA_HEADER = "x-replica"


class ReplicaHeader:
    """Names the replica that answered, so a client can tell replicas apart (logs, bug reports)."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app = app
        self.replica = replica.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_named(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (REPLICA_HEADER.encode(), self.replica)]
            await send(message)

        await self.app(scope, receive, send_named if scope["type"] == "http" else send)


def wait_for_models(app: FastAPI) -> None:
    """Make start-up last until the pair is loaded.

    Serve runs the app's lifespan in each replica (uvicorn's LifespanOn) and routes to a replica as
    soon as start-up returns. The app's own lifespan returns at once and loads in the background
    (a single server answers /ready meanwhile), so a fresh replica would answer 503 to the
    requests Serve sends it. Waiting here keeps it out of rotation until it can serve, and a load
    error fails the replica, which Serve reports and retries.
    """
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with inner(app):
            while app.state.pair is None and app.state.load_error is None:
                await asyncio.sleep(0.1)
            if app.state.load_error is not None:
                raise RuntimeError(f"model loading failed: {app.state.load_error}")
            yield

    app.router.lifespan_context = lifespan


@serve.ingress()
class ModelDiffService:
    """One replica. The app is built inside the replica (`__serve_build_asgi_app__`), not pickled
    from the driver: it holds threads, locks and a Prometheus registry."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def __serve_build_asgi_app__(self) -> FastAPI:
        from app.main import create_app

        app = create_app(self.settings)
        app.add_middleware(ReplicaHeader, replica=serve.get_replica_context().replica_id.unique_id)
        wait_for_models(app)
        return app


def deployment_options(
    settings: Settings,
    num_replicas: float | None = None,
    min_replicas: float | None = None,
    max_replicas: float | None = None,
    target_ongoing_requests: float | None = None,
    num_gpus: float | None = None,
    num_cpus: float | None = None,
) -> dict[str, Any]:
    """Serve options for one replica per GPU.

    Args:
        settings: the app's settings; `queue_size` sets how much work a replica takes.
        num_replicas: a fixed replica count; leave it out to autoscale.
        min_replicas, max_replicas: autoscaling bounds (default 1 and the GPUs this machine sees).
        target_ongoing_requests: autoscaling target per replica (default 2: one running, one waiting).
        num_gpus: GPUs per replica (default 1 when CUDA is visible and DEVICE is not cpu, else 0).
        num_cpus: CPUs per replica (default 1).
    """
    gpus = _local_gpus(settings)
    options: dict[str, Any] = {
        "ray_actor_options": {
            "num_gpus": float(num_gpus) if num_gpus is not None else float(min(gpus, 1)),
            "num_cpus": float(num_cpus) if num_cpus is not None else 1.0,
        },
        # A replica's engine runs one job and holds QUEUE_SIZE waiting; one more and it answers 429.
        # Serve sends a replica no more than that, so no replica refuses work another could take...
        "max_ongoing_requests": settings.queue_size + 1,
        # ...and past QUEUE_SIZE more waiting at the proxy, overload is a 429 at once, as on a
        # single server, rather than an unbounded queue of growing latency.
        "max_queued_requests": settings.queue_size,
        "backpressure_config": {"status_code": 429, "retry_after_s": 1},
        # A pair that failed to load rarely loads on a retry; Serve's default is 20 tries.
        "max_constructor_retry_count": 3,
        # A stopping replica drains as long as a single server does on SIGTERM (SHUTDOWN_TIMEOUT).
        "graceful_shutdown_timeout_s": settings.shutdown_timeout,
    }
    if num_replicas is not None:
        options["num_replicas"] = int(num_replicas)
    else:
        low = int(min_replicas) if min_replicas is not None else 1
        options["autoscaling_config"] = {
            "min_replicas": low,
            "max_replicas": int(max_replicas) if max_replicas is not None else max(low, gpus),
            "target_ongoing_requests": float(target_ongoing_requests or 2),
        }
    return options


def _local_gpus(settings: Settings) -> int:
    """CUDA devices this process sees, 0 when the app is told to run on the CPU."""
    if settings.device == "cpu":
        return 0
    import torch

    return torch.cuda.device_count()


def build_app(args: Mapping[str, str] | None = None) -> Application:
    """The application builder `serve run app.ray_serve:build_app [key=value ...]` calls.

    Keys are scaling options (`SCALING_ENV`) or app settings (`data_dir=...`, `queue_size=...`);
    settings not given come from the environment of the `serve run` process, not of each node.
    """
    args = {k.lower(): v for k, v in (args or {}).items()}
    scaling: dict[str, float] = {}
    for key, env in SCALING_ENV.items():
        value = args.pop(key, None) or os.environ.get(env)
        if value:
            try:
                scaling[key] = float(value)
            except ValueError:
                raise ValueError(f"{key} ({env}) must be a number, got {value!r}") from None
    unknown = sorted(set(args) - set(Settings.model_fields))
    if unknown:
        raise ValueError(f"unknown arguments {unknown}: use settings fields or {sorted(SCALING_ENV)}")
    settings = Settings(**args)
    # Here, not only in each replica: with a GPU torch cannot use, the replicas would be given no
    # GPU (Ray then hides them) and load on the CPU.
    check(settings.device)
    # Replicas may start in another working directory: pin DATA_DIR (a shared path on a cluster,
    # so the demo pair is built once, under its file lock) before it travels to them.
    settings = settings.model_copy(update={"data_dir": settings.data_dir.resolve()})
    options = deployment_options(settings, **scaling)
    return serve.deployment(ModelDiffService, name="model-diff", **options).bind(settings)


def main() -> None:
    """Start a local Ray, put Serve's proxy on HOST:PORT and serve until interrupted."""
    import ray

    settings = Settings()
    ray.init()
    serve.start(http_options={"host": settings.host, "port": settings.port})
    try:
        serve.run(build_app(), name="model-diff", route_prefix="/", blocking=True)
    except KeyboardInterrupt:  # how blocking=True ends: stop the replicas (engines drain), exit 0
        serve.shutdown()


if __name__ == "__main__":
    main()
