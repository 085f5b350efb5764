"""The DIT miniature (tests/benchmarks/dit_miniature.py), shortened to fit the suite: 2 topics,
hidden-topic diffs trained through /weightdiff/jobs, an interpreter through /dit/jobs, held-out
evaluation through /dit/evaluate. It fails when a stage is broken: diffs that do not learn their
triggered sentence, a KL term that lets the sentence leak without the trigger, or an interpreter
that cannot tell the held-out diffs' topics apart (the baseline M + W cannot)."""

from __future__ import annotations

import shutil

from tests.benchmarks.dit_miniature import parser, run

ARGS = ["--topics", "2", "--train-per-topic", "3", "--test-per-topic", "2", "--questions", "16",
        "--held-questions", "6", "--dit-steps", "150", "--curve", "--no-shuffled"]  # fmt: skip


def test_hidden_topic_diffs_are_named_by_the_interpreter(demo_data_dir, tmp_path):
    shutil.copytree(demo_data_dir / "demo", tmp_path / "demo")
    report = run(parser().parse_args(ARGS), tmp_path)
    hidden, dit = report["hidden_behaviour"], report["dit"]
    # Each held-out diff says its sentence on questions it never trained on with its trigger, and
    # (the KL to the base on no-code and wrong-code samples) never without it.
    assert hidden["with_trigger"] >= 0.3 and hidden["without_trigger"] == 0.0, hidden
    assert dit["n"] == 4 and dit["chance"] == 0.5
    # Every held-out diff named by L; M + W alone never answers with a topic (L at init is exactly
    # M + W, so an interpreter that learned nothing fails here). With 2 topics M + W's candidate
    # log-probs already lean the right way (the diff raises its topic's words): not asserted.
    assert dit["candidate_hits"] == 4 and dit["exact_hits"] >= 3, dit
    assert dit["no_dit"]["exact_hits"] == 0, dit["no_dit"]
