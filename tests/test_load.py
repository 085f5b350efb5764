"""The load script's short version: 16 clients for 10 s on the demo pair, every lens mixed.

No 5xx, no broken stream, and afterwards the weights' SHA-256 and a greedy completion are exactly
what they were before the load (amplified requests merge into the shared weights and restore).
"""

from __future__ import annotations

import shutil

from tests.benchmarks import load


def test_short_load_keeps_weights_and_outputs(demo_data_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_data_dir / "demo", data / "demo")
    report = load.run(16, 10.0, data, queue_size=8)
    assert report["n_5xx"] == 0, report
    assert report["weights_unchanged"] and report["greedy_unchanged"], report
    assert report["ok"] >= 10, report
    # 16 clients against an 8-deep queue: the server must push back with 429s, not stall or fail.
    assert report["n_429"] > 0 and set(report["status_counts"]) <= {"200", "429"}, report
