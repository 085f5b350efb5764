"""`python -m app.batch experiment` on a local Ray: 2 workers against 1, and the workers' memory as
the experiment grows.

    OMP_WAIT_POLICY=PASSIVE python -m tests.benchmarks.bench_batch [--prompts 64] [--n 16]
        [--max-new-tokens 64] [--block-size 64] [--grow 3]

Prints JSON. Every run is on the demo pair, in one local Ray of 2 CPUs started by this process, one
torch thread per worker. Ratios compare runs made here:
- speedup_2_workers: samples/s of 2 workers over 1 worker on the same experiment, both measured
  from the first committed block to the last (the actors' start, the pair loading once per actor,
  is reported apart as startup_s). Goal: at least 1.6.
- worker_rss_growth_{grow}x: the largest resident memory of an actor process during a run of
  `grow` times the prompts, over the same during the first run (2 workers each). Goal: under 1.1
  (a worker keeps nothing per sample: blocks go back to the driver as they finish).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from app.batch.destination import Destination
from app.batch.experiment import ExperimentKind, ExperimentOutput
from app.batch.pipeline import Options, connect
from app.batch.run import run
from app.demo import ensure_demo_pair
from app.settings import Settings

WORDS = "sun cat river story garden music window train bread winter".split()


def actor_pids() -> list[int]:
    """Local Ray actor processes of the block pool (their command line names the map worker)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"MapWorker" in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Watch:
    """Samples the actors' resident memory and the commits' times while a run goes."""

    def __init__(self) -> None:
        self.peak, self.commits, self._stop = 0, [], threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            for pid in actor_pids():
                try:
                    self.peak = max(self.peak, rss(pid))
                except OSError:
                    continue

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def one_run(settings: Settings, body: dict[str, Any], workers: int, block: int, out: Path) -> dict[str, Any]:
    kind = ExperimentKind.parse(body, settings, block)
    output = ExperimentOutput(out)
    watch = Watch()
    commit = output.commit

    def timed(*args: Any) -> int:
        added = commit(*args)
        watch.commits.append((time.perf_counter(), added))
        return added

    output.commit = timed  # type: ignore[method-assign]
    options = Options(workers=workers, threads_per_worker=1, progress=False)
    began = time.perf_counter()
    with watch, contextlib.redirect_stdout(io.StringIO()):  # the run's summary table: not this JSON
        code = run(kind, None, output, Destination(str(out)), settings, options)
    assert code == 0, code
    first, *rest = watch.commits
    steady = sum(n for _, n in rest) / (rest[-1][0] - first[0]) if rest else None
    return {
        "workers": workers,
        "samples": kind.spec.total,
        "wall_s": round(time.perf_counter() - began, 2),
        "startup_s": round(first[0] - began, 2),
        "samples_per_s": round(steady, 3) if steady else None,
        "actor_peak_rss_mb": round(watch.peak / 2**20, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--grow", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    def body(prompts: int) -> dict[str, Any]:
        texts = [f"Tell me about the {WORDS[i % 10]} and the {WORDS[(i * 3 + 1) % 10]}." for i in range(prompts)]
        return {"prompts": texts, "alphas": [0.0, 2.0], "n": args.n, "seed": 1, "do_sample": True,
                "max_new_tokens": args.max_new_tokens, "detectors": [{"name": "the", "type": "substring", "patterns": ["the"]}]}  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ensure_demo_pair(root / "data")
        settings = Settings(data_dir=root / "data")
        connect(Options(workers=2), settings)
        one = one_run(settings, body(args.prompts), 1, args.block_size, root / "one")
        two = one_run(settings, body(args.prompts), 2, args.block_size, root / "two")
        grown = one_run(settings, body(args.prompts * args.grow), 2, args.block_size, root / "grown")
    print(json.dumps({
        "one_worker": one,
        "two_workers": two,
        "two_workers_grown": grown,
        "speedup_2_workers": round(two["samples_per_s"] / one["samples_per_s"], 3),
        f"worker_rss_growth_{args.grow}x": round(grown["actor_peak_rss_mb"] / two["actor_peak_rss_mb"], 3),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
