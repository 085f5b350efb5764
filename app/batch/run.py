"""One run from its parsed job to its report: connect, check on a worker, create (or reopen) the
store record, map the blocks over the actor pool, commit each once in order, finish."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

from app.batch.destination import Destination
from app.batch.experiment import ExperimentKind, ExperimentOutput
from app.batch.pipeline import Options, connect, on_worker, progress_bar, reason, run_blocks
from app.batch.scan import ScanKind, ScanOutput
from app.batch.weightdiff import WeightDiffKind, WeightDiffOutput
from app.settings import Settings

KINDS: dict[str, tuple[Any, Any]] = {
    "experiment": (ExperimentKind, ExperimentOutput),
    "weightdiff": (WeightDiffKind, WeightDiffOutput),
    "scan": (ScanKind, ScanOutput),
}

Remote = Callable[..., Any]  # remote(fn, *args): fn(loaded, *args) on a worker


class Output(Protocol):
    """A kind's side on the driver: its record in the store under --out."""

    def create(self, kind: Any, plan: Any) -> str: ...
    def reopen(self, run_id: str) -> tuple[Any, Any]: ...
    def blocks(self, kind: Any) -> list[dict[str, Any]]: ...
    def progress(self, kind: Any) -> tuple[int, int]: ...
    def commit(self, kind: Any, block: dict[str, Any], output: Any, seconds: float) -> int: ...
    def fail(self, kind: Any, message: str) -> None: ...
    def finish(self, kind: Any, remote: Remote) -> None: ...
    def describe(self, kind: Any) -> str: ...


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(
    kind: Any, resume_id: str | None, output: Output, destination: Destination, settings: Settings, options: Options
) -> int:
    """Returns the exit code (see app.batch.cli)."""
    if resume_id is not None:
        try:
            kind, plan = output.reopen(resume_id)
        except ValueError as exc:
            say(f"error: {exc}")
            return 2
    if settings.demo and options.address is None:
        from app.demo import ensure_demo_pair

        ensure_demo_pair(settings.data_dir)  # built once here, not by two actors at once
    connect(options, settings)
    remote: Remote = partial(_remote, settings=settings, options=options)
    if resume_id is None:
        try:
            plan = remote(kind.prepare)
        except Exception as exc:  # noqa: BLE001  (the server's 4xx checks: a spec error)
            say(f"error: {reason(exc)}")
            return 2
        kind.job_id = output.create(kind, plan)
    where = f"{kind.name} {kind.job_id}"
    hint = f"continue with: python -m app.batch {kind.name} --resume {kind.job_id} --out {destination.out}"
    done, total = output.progress(kind)
    say(f"{where}: {total - done} of {total} {kind.units} to run on {options.workers} worker(s); store: {destination.out}")
    bar = progress_bar(options, total, done, kind.units, where)
    try:
        for block, result, seconds in run_blocks(kind, settings, plan, output.blocks(kind), options):
            bar.update(output.commit(kind, block, result, seconds))
            destination.sync()
        bar.close()
        output.finish(kind, remote)
    except KeyboardInterrupt:
        bar.close()
        output.fail(kind, f"interrupted; {hint}")
        say(f"\n{where} interrupted; {hint}")
        return 130
    except Exception as exc:  # noqa: BLE001  (recorded in the store, reported, exit code 3)
        bar.close()
        message = reason(exc)
        output.fail(kind, message)
        say(f"{where} failed: {message}\n{hint}")
        return 3
    finally:
        destination.sync(force=True)
    say(f"{where} done; store: {destination.out}")
    print(output.describe(kind))
    return 0


def _remote(fn: Callable[..., Any], *args: Any, settings: Settings, options: Options) -> Any:
    return on_worker(fn, settings, options, *args)
