"""Load test on the demo pair: many concurrent clients mixing every generation lens.

    python -m tests.benchmarks.load [--clients 64] [--seconds 60] [--data-dir data]

Starts the real server (uvicorn, the app of `python -m app`) in this process on a free port, so it
can hash the weights itself, then runs `--clients` asyncio clients for `--seconds`, each looping
over a mix of `/generate_lda` (plain and streaming), `/generate`, `/amplification/generate` (merges
the demo adapter into the weights) and adapter-mode `/generate_lda`. Prints JSON: requests/s,
p50/p99 latency, 429 and 5xx counts (5xx must be 0), and whether the weights' SHA-256 and a greedy
request's text are the same after the load as before it. Exit status 1 when either check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import socket
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import torch  # noqa: E402
import uvicorn  # noqa: E402

from app.main import create_app  # noqa: E402
from app.settings import Settings  # noqa: E402
from tests.test_amplification_merge import digests  # noqa: E402

GREEDY = {"prompt": "What is the sun?", "max_new_tokens": 16, "temperature": 0.0, "alpha": 1.0, "seed": 0}
AMPLIFY = {
    "name": "load_x2",
    "adapters": [
        {
            "organism_name": "custom",
            "variant": "demo",
            "layer_amplifications": [{"layers": "all", "module_amplifications": [{"modules": "all", "weight": 2.0}]}],
        }
    ],
}


def mix(i: int) -> tuple[str, dict[str, Any], bool]:
    """The i-th request of a client: (route, body, stream). Small bodies; the point is concurrency."""
    sampling = {"max_new_tokens": 8, "temperature": 1.0, "seed": i}
    kind = i % 5
    if kind == 0:
        return "/generate_lda", {"prompt": f"Tell me about {i}", "alphas": [0.0, 2.0], **sampling}, False
    if kind == 1:
        return "/generate_lda", {"prompt": "Once upon a time", "alpha": 1.0, **sampling}, True
    if kind == 2:
        return "/generate", {"prompt": "Hello there", **sampling}, False
    if kind == 3:
        return "/amplification/generate", {"prompt": "What is the sun?", "configs": [AMPLIFY], **sampling}, False
    return "/generate_lda", {"prompt": "What is the sun?", "adapter": "demo", "alpha": 1.0, **sampling}, False


def weights_sha256(app: Any) -> str:
    """One SHA-256 over the per-parameter digests of both models."""
    pair = app.state.pair
    both = [digests(pair.after.model), digests(pair.before.model)]
    return hashlib.sha256(json.dumps(both, sort_keys=True).encode()).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn on a thread of this process (signal handlers stay off the main thread)."""

    def __init__(self, settings: Settings) -> None:
        self.app = create_app(settings)
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=settings.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{settings.port}"

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the server did not become ready")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(60)


async def client(n: int, url: str, stop_at: float, latencies: list[float], codes: Counter) -> None:
    i = n
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        while time.monotonic() < stop_at:
            route, body, stream = mix(i)
            t0 = time.perf_counter()
            try:
                if stream:
                    async with http.stream("POST", route, json={**body, "stream": True}) as r:
                        events = [line async for line in r.aiter_lines() if line.startswith("event: ")]
                        code = r.status_code
                        if code == 200 and (not events or events[-1] != "event: result"):
                            code = 599  # a stream that ended without its result counts as a failure
                else:
                    code = (await http.post(route, json=body)).status_code
            except httpx.HTTPError:
                code = 598
            codes[code] += 1
            if code == 200:
                latencies.append(time.perf_counter() - t0)
            elif code == 429:
                await asyncio.sleep(0.05)  # back off as a client told to retry later would
            i += 7


async def run_load(url: str, clients: int, seconds: float) -> tuple[list[float], Counter, float]:
    latencies: list[float] = []
    codes: Counter = Counter()
    t0 = time.monotonic()
    await asyncio.gather(*(client(n, url, t0 + seconds, latencies, codes) for n in range(clients)))
    return latencies, codes, time.monotonic() - t0


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1] if len(values) > 1 else values[0]


def run(clients: int, seconds: float, data_dir: Path, **settings: Any) -> dict[str, Any]:
    port = free_port()
    with Server(Settings(data_dir=data_dir, port=port, log_level="warning", **settings)) as server:
        sha_before = weights_sha256(server.app)
        text_before = httpx.post(f"{server.url}/generate_lda", json=GREEDY, timeout=120).json()
        latencies, codes, elapsed = asyncio.run(run_load(server.url, clients, seconds))
        text_after = httpx.post(f"{server.url}/generate_lda", json=GREEDY, timeout=120).json()
        sha_after = weights_sha256(server.app)
    ok = sum(n for c, n in codes.items() if c == 200)
    return {
        "clients": clients,
        "seconds": round(elapsed, 1),
        "requests": sum(codes.values()),
        "ok": ok,
        "requests_per_s": round(ok / elapsed, 2),
        "p50_s": quantile(latencies, 0.50),
        "p99_s": quantile(latencies, 0.99),
        "status_counts": {str(c): n for c, n in sorted(codes.items())},
        "n_429": codes.get(429, 0),
        "n_5xx": sum(n for c, n in codes.items() if c >= 500),
        "weights_unchanged": sha_before == sha_after,
        "greedy_unchanged": text_before["results"] == text_after["results"],
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="where the demo pair is (built if missing)")
    args = parser.parse_args(argv)
    report = run(args.clients, args.seconds, args.data_dir)
    print(json.dumps(report, indent=2))
    good = report["n_5xx"] == 0 and report["weights_unchanged"] and report["greedy_unchanged"]
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
