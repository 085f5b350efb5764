"""The benchmarks page's figures (tests/benchmarks/plots.py): drawn from the results' numbers, and
every committed result file draws."""

from __future__ import annotations

import json

from tests.benchmarks.plots import FIGURES, RESULTS, batch_workers, clients, lda_rows, render

LDA = {"size": "bench", "device": "cpu", "dtype": "float32",
       "lda_b1_tokens_per_s": 36.6, "lda_b8_tokens_per_s": 145.6, "lda_b1_over_generate_b1": 0.58,
       "generate_b1_tokens_per_s": 62.7, "generate_b8_tokens_per_s": 301.0,
       "seed_loop_b1_tokens_per_s": 35.0, "seed_loop_b8_tokens_per_s": 34.1}  # fmt: skip


def lines(fig):
    ax = fig.axes[0]
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_decode_speed_is_plotted_against_rows_from_the_json():
    drawn = lines(lda_rows(LDA))
    assert drawn["LDA (this service)"] == ([1, 8], [36.6, 145.6])
    assert drawn["seed server's loop"] == ([1, 8], [35.0, 34.1])
    assert drawn["after model's generate (one model)"] == ([1, 8], [62.7, 301.0])


def test_clients_are_plotted_in_client_order():
    rates = {c: {"concurrent": 10.0 * c, "one_request": 11.0 * c, "sequential": 9.0} for c in (8, 1, 2)}
    runs = [{"clients": c, "tokens_per_s": r} for c, r in rates.items()]
    drawn = lines(clients(runs))
    assert drawn["concurrent clients (continuous batching)"] == ([1, 2, 8], [10.0, 20.0, 80.0])
    assert drawn["one request at a time"] == ([1, 2, 8], [9.0, 9.0, 9.0])


def test_committed_results_draw_and_missing_ones_say_how_to_make_them(tmp_path):
    paths = render(RESULTS, tmp_path / "all")
    assert sorted(p.name for p in paths) == sorted(FIGURES)
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    result = json.loads((RESULTS / "bench_batch.json").read_text())
    heights = [bar.get_height() for bar in batch_workers(result).axes[0].patches]
    assert heights == [result["one_worker"]["samples_per_s"], result["two_workers"]["samples_per_s"]]
    empty = render(tmp_path / "none", tmp_path / "empty")
    assert len(empty) == len(FIGURES)  # a note in place of each figure, so the page's links hold
