"""The Ray Data side: a dataset of block descriptors, `map_batches` over an actor pool whose actors
load the pair once and run one kind's block code, and the driver committing outputs in order.

Faults: Ray restarts a killed actor and runs its block again (Ray Data retries a lost task), and
the driver commits a block only once (`Kind.commit` skips a block already committed); a whole run
cut short resumes from the store with `--resume`, whose committed blocks are not sent again.
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from app.batch.loaded import Loaded, load
from app.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Options:
    """How to run: where Ray is, how many actors and what each holds."""

    address: str | None = None  # None: start a local Ray (or use the one this process started)
    workers: int = 1
    gpus_per_worker: float = 0.0
    threads_per_worker: int = 1  # CPUs an actor reserves; torch uses as many threads
    block_size: int | None = None  # per kind: samples, tasks or batches per block
    progress: bool = True


class Kind(Protocol):
    """One kind of job (experiment, weight-diff, scan) as blocks."""

    name: str
    unit: str  # what a block holds and the progress bar counts
    units: str

    def prepare(self, loaded: Loaded) -> Any:
        """On a worker with the pair: the checks that need the models; returns the `plan` every
        block is run with (pins, tokenized samples)."""

    def run_block(self, loaded: Loaded, plan: Any, block: dict[str, Any]) -> Any:
        """On an actor: one block's output (picklable)."""


def connect(options: Options, settings: Settings) -> None:
    """Join the cluster at `options.address`, or start a local Ray sized for the workers."""
    import ray

    if ray.is_initialized():
        return
    env = {"env_vars": {"OMP_NUM_THREADS": str(options.threads_per_worker)}}
    if options.address:
        ray.init(address=options.address, runtime_env=env, log_to_driver=False, logging_level=logging.WARNING)
        return
    # Locally: the actors' CPUs plus one for the preparing task, which ends before they start.
    cpus = max(options.workers * options.threads_per_worker, 1)
    ray.init(
        num_cpus=cpus, include_dashboard=False, runtime_env=env, log_to_driver=False, logging_level=logging.WARNING
    )


def on_worker(fn: Callable[..., Any], settings: Settings, options: Options, *args: Any) -> Any:
    """`fn(loaded, *args)` as one Ray task with a worker's resources (the driver may hold no GPU):
    the checks that need the models before a run, and a scan's last step after it."""
    import ray

    @ray.remote(num_cpus=options.threads_per_worker, num_gpus=options.gpus_per_worker, max_retries=1)
    def task(settings: Settings, threads: int, *args: Any) -> Any:
        return fn(load(settings, threads), *args)

    return ray.get(task.remote(settings, options.threads_per_worker, *args))


def reason(exc: BaseException) -> str:
    """What failed, without Ray's wrappers (a task error's cause, a user-code error's cause)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    text = str(exc).strip().splitlines()
    message = text[0] if text else ""
    return message if isinstance(exc, ValueError) else f"{type(exc).__name__}: {message}"


class BlockWorker:
    """An actor of the pool: loads the pair once, then runs one block per call."""

    def __init__(self, kind: Kind, settings: Settings, plan: Any, threads: int) -> None:
        self.kind, self.plan = kind, plan
        self.loaded = load(settings, threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = []
        for raw in batch["block"]:
            block = pickle.loads(raw)
            began = time.perf_counter()
            output = self.kind.run_block(self.loaded, self.plan, block)
            outputs.append(pickle.dumps((block, output, time.perf_counter() - began)))
        return {"block": np.array(outputs, dtype=object)}


def run_blocks(
    kind: Kind, settings: Settings, plan: Any, blocks: Sequence[dict[str, Any]], options: Options
) -> Iterator[tuple[dict[str, Any], Any, float]]:
    """(block, output, seconds) for every block, in block order, as the pool finishes them."""
    import ray.data

    if not blocks:
        return
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its notes on progress bars and each run's end
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the store commits in order
    ctx.enable_progress_bars = False  # one bar: the caller's, in samples (tasks, batches)
    ctx.print_on_execution_start = False
    items = [{"block": pickle.dumps(b)} for b in blocks]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        BlockWorker,
        fn_constructor_kwargs={"kind": kind, "settings": settings, "plan": plan, "threads": options.threads_per_worker},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=options.workers),
        num_cpus=options.threads_per_worker,
        num_gpus=options.gpus_per_worker or None,
    )  # Ray Data's actor pools restart a dead actor and retry its block (max_restarts=-1, max_task_retries=-1)
    for row in ds.iter_rows():
        yield pickle.loads(row["block"])


def progress_bar(options: Options, total: int, done: int, unit: str, desc: str) -> tqdm:
    """The run's one bar: committed units, their rate and the eta."""
    return tqdm(total=total, initial=done, unit=unit, desc=desc, disable=not options.progress, smoothing=0.1)


