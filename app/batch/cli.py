"""The command line: parse and validate the job file (no Ray yet), connect, run, report.

Exit codes: 0 done; 2 the command or the job is wrong (nothing ran, or the model-dependent checks
refused it before any block); 3 the run failed (the store says why; `--resume` continues it);
130 interrupted (the store keeps every committed block; `--resume` continues it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from app.api.errors import validation_message
from app.batch.destination import Destination
from app.batch.pipeline import Options
from app.batch.run import KINDS, run
from app.settings import Settings

USAGE_ERROR, RUN_FAILED, INTERRUPTED = 2, 3, 130


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m app.batch",
        description="Run an experiment, a weight-diff job or a diffing scan as a Ray Data pipeline. "
        "JOB is the HTTP route's request body as YAML or JSON; the models and every other setting "
        "come from the environment, as for the server.",
    )
    p.add_argument("kind", choices=sorted(KINDS), help="experiment: POST /experiments; weightdiff: "
                   "POST /weightdiff/jobs; scan: POST /diffing/jobs")  # fmt: skip
    p.add_argument("job", nargs="?", type=Path, help="the job file (leave out with --resume)")
    p.add_argument("--address", help="a Ray cluster (ray://host:10001 or auto); default: start a local Ray")
    p.add_argument("--workers", type=int, default=1, help="actors, each holding the pair once (default 1)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per actor (default 0: CPU)")
    p.add_argument("--threads-per-worker", type=int, default=1, help="CPUs per actor, its torch threads (default 1)")
    p.add_argument("--block-size", type=int, help="samples, tasks or batches per block (default: "
                   "EXPERIMENT_CHUNK_SIZE; 8 tasks; 1 batch)")  # fmt: skip
    p.add_argument("--out", help="where the store goes: a folder or an fsspec URI (default: DATA_DIR)")
    p.add_argument("--resume", metavar="ID", help="continue run ID under --out after its last committed block")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def read_job(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not YAML or JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a job file is one mapping (the request body), not {type(raw).__name__}")
    return raw


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def error(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return USAGE_ERROR

    if (args.job is None) == (args.resume is None):
        return error("give a job file, or --resume ID (not both)")
    for name in ("workers", "threads_per_worker", "block_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return error(f"--{name.replace('_', '-')} must be at least 1, not {value}")
    if args.gpus_per_worker < 0:
        return error(f"--gpus-per-worker must be 0 or more, not {args.gpus_per_worker}")
    settings = Settings()
    kind_cls, output_cls = KINDS[args.kind]
    kind = None
    if args.job is not None:  # every check that needs no model, before Ray starts
        try:
            kind = kind_cls.parse(read_job(args.job), settings, args.block_size)
        except ValidationError as exc:
            message, _ = validation_message(exc.errors())
            return error(f"{args.job}: {message}")
        except ValueError as exc:
            return error(str(exc) if str(exc).startswith(str(args.job)) else f"{args.job}: {exc}")
    try:
        destination = Destination(args.out or str(settings.data_dir))
    except (OSError, ValueError, ImportError) as exc:
        return error(f"--out {args.out}: {exc}")
    options = Options(
        address=args.address,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        threads_per_worker=args.threads_per_worker,
        block_size=args.block_size,
        progress=not args.no_progress,
    )
    return run(kind, args.resume, output_cls(destination.local), destination, settings, options)
