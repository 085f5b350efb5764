"""The benchmarks page's figures (tests/benchmarks/plots.py): drawn from the results' numbers, and
every committed result file draws."""

from __future__ import annotations

import json

from tests.benchmarks.plots import FIGURES, RESULTS, TABLES, batch_workers, clients, lda_rows, render, table

LDA = {"size": "bench", "device": "cpu", "dtype": "float32",
       "lda_b1_tokens_per_s": 36.6, "lda_b8_tokens_per_s": 145.6, "lda_b1_over_generate_b1": 0.58,
       "generate_b1_tokens_per_s": 62.7, "generate_b8_tokens_per_s": 301.0,
       "seed_loop_b1_tokens_per_s": 35.0, "seed_loop_b8_tokens_per_s": 34.1,
       "lda_b8_over_seed_loop_b8": 4.27}  # fmt: skip


def lines(fig):
    ax = fig.axes[0]
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_decode_speed_is_plotted_against_rows_from_the_json():
    drawn = lines(lda_rows(LDA | {"lda_compiled_b1_tokens_per_s": 50.5}))
    assert drawn["LDA (this service, eager)"] == ([1, 8], [36.6, 145.6])
    assert drawn["LDA, static cache + compiled step (COMPILE=on)"] == ([1], [50.5])
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


def cells(markdown: str) -> list[list[str]]:
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows[1:]]


def test_tables_quote_the_same_numbers_as_the_figures(tmp_path):
    (tmp_path / "bench_lda.json").write_text(json.dumps(LDA))
    rows = cells(table("lda_rows", tmp_path))
    assert rows[0][:5] == ["1", "36.6", "", "35.0", "62.7"]  # no compiled run in this result
    assert rows[1][:5] == ["8", "145.6", "", "34.1", "301.0"]
    assert rows[1][7] == "4.27x" and rows[0][7] == ""  # a ratio the run did not print stays empty
    for c in (8, 1):
        (tmp_path / f"bench_batching_c{c}.json").write_text(json.dumps({
            "clients": c, "tokens_per_s": {"concurrent": 10.0 * c, "one_request": 11.0 * c, "sequential": 9.0},
            "concurrent_over_one_request": 0.91, "concurrent_over_sequential": round(10 * c / 9, 3),
            "peak_batch_rows": {"concurrent": c}, "same_completions": c == 1}))  # fmt: skip
    assert [r[:4] + r[-1:] for r in cells(table("clients", tmp_path))] == [
        ["1", "10.0", "11.0", "9.0", "yes"], ["8", "80.0", "88.0", "9.0", "no"]]  # fmt: skip
    assert "No committed results" in table("experiments", tmp_path)


def test_every_committed_result_has_a_table():
    for name, (pattern, _) in TABLES.items():
        if any(RESULTS.glob(pattern)):
            assert "| ---" not in table(name) and "|---|" in table(name), name
