"""`python -m app`: start the server with settings from the environment."""

from __future__ import annotations

import logging
import signal
import sys

import uvicorn
from pydantic import ValidationError

from app.gpu_probe import EXIT_CODE, GpuUnusable, check
from app.settings import Settings, describe_error


def main() -> None:
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"error: {describe_error(exc)}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Before anything loads: a GPU torch cannot use must stop the container with the reason, not
    # quietly put a 7B pair on the CPU.
    try:
        check(settings.device)
    except GpuUnusable as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_CODE)
    from app.main import create_app

    # uvicorn drains on SIGTERM, then re-raises the signal to the handler that was there before it;
    # this one makes that a clean exit 0 (what container runtimes and supervisors expect).
    signal.signal(signal.SIGTERM, lambda signum, frame: logging.getLogger("app").info("SIGTERM: drained, exiting"))

    app = create_app(settings)
    if settings.port_health and settings.port_health != settings.port:
        from app.health_port import serve_in_thread

        serve_in_thread(app, settings.host, settings.port_health, settings.log_level)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=settings.shutdown_timeout,
    )


if __name__ == "__main__":
    main()
