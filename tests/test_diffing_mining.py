"""Logit-diff mining and KL against the diffing toolkit's own formulas.

Each oracle below is the toolkit's computation written out on whole tensors, the way it runs after
holding every logit in memory (`core_analysis.compute_stats_from_logits`, `kl/method.py`,
`compute_sequence_likelihood_ratios`); ours streams batch by batch and must give the same counts
exactly and the same sums to a tolerance derived from fp32 rounding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lda.diffing.inputs import Sample, chat_positions, resolve_layer, tokenize_chats, tokenize_texts
from lda.diffing.klstats import KLRecorder, kl_statistics
from lda.diffing.mining import Miner, MiningConfig, diff_stats, kl_divergence

EPS32 = torch.finfo(torch.float32).eps


def toolkit_stats(diff: torch.Tensor, mask: torch.Tensor, top_k: int) -> dict[str, torch.Tensor | int]:
    """`compute_stats_from_logits` on the whole [N, T, V] tensor (one batch of everything)."""
    vocab = diff.shape[-1]
    diff = diff * mask.unsqueeze(-1).to(diff.dtype)
    pos = torch.topk(diff, k=top_k, dim=-1, largest=True).indices
    neg = torch.topk(diff, k=top_k, dim=-1, largest=False).indices

    def bincount(indices: torch.Tensor) -> torch.Tensor:
        keep = mask.unsqueeze(-1).expand(-1, -1, top_k).bool().flatten()
        return torch.bincount(indices.flatten()[keep], minlength=vocab).to(torch.int64)

    return {
        "total_positions": int(mask.sum()),
        "sum_logit_diff": diff.sum(dim=(0, 1)).to(torch.float32),
        "count_positive": (diff > 0).sum(dim=(0, 1), dtype=torch.int32).to(torch.int64),
        "topk_pos_counts": bincount(pos),
        "topk_neg_counts": bincount(neg),
    }


def _logits(n: int, t: int, v: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Continuous values: ties in the diffs have probability 0, so top-k sets are unique.
    return torch.randn(n, t, v, generator=g) * 3, torch.randn(n, t, v, generator=g) * 3


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_streamed_statistics_equal_the_toolkit_on_the_whole_tensor(batch: int, tmp_path: Path) -> None:
    n, t, v, k = 7, 6, 50, 5
    after, before = _logits(n, t, v, seed=batch)
    lengths = [6, 4, 6, 2, 5, 6, 3]  # padded rows: positions past a row's length are not analysed
    samples = [Sample(i, tuple(range(t)), tuple(range(lengths[i]))) for i in range(n)]
    mask = torch.tensor([[p < lengths[i] for p in range(t)] for i in range(n)])
    miner = Miner(v, MiningConfig(top_k=k, llr_window=2), tmp_path)
    for start in range(0, n, batch):
        miner.add(samples[start : start + batch], after[start : start + batch], before[start : start + batch])
    ours, ref = miner.token_stats(), toolkit_stats(after - before, mask, k)
    assert ours.total_positions == ref["total_positions"] == sum(lengths)
    assert ours.num_samples == n
    for name in ("count_positive", "topk_pos_counts", "topk_neg_counts"):
        assert torch.equal(getattr(ours, name), ref[name]), name
    # fp32 sums of sum(lengths) terms in a different order: each partial sum rounds by at most
    # eps/2 of its magnitude, bounded by the sum of |terms|.
    bound = sum(lengths) * EPS32 * (after - before).abs().amax(dim=(0, 1))
    assert ((ours.sum_logit_diff - ref["sum_logit_diff"]).abs() <= bound).all()


def test_top_k_counts_are_exactly_the_positions_where_a_token_ranks(tmp_path: Path) -> None:
    diff = torch.zeros(1, 2, 6)
    diff[0, 0] = torch.tensor([5.0, 4.0, -1.0, -2.0, 0.5, -3.0])
    diff[0, 1] = torch.tensor([-4.0, 3.0, 2.0, -2.5, 1.0, 0.25])
    stats, _, _ = diff_stats(diff, torch.ones(1, 2, dtype=torch.bool), top_k=2)
    assert stats.topk_pos_counts.tolist() == [1, 2, 1, 0, 0, 0]
    assert stats.topk_neg_counts.tolist() == [1, 0, 0, 2, 0, 1]
    assert stats.count_positive.tolist() == [1, 2, 1, 0, 2, 1]


def test_kl_is_the_toolkit_formula_and_zero_for_equal_models() -> None:
    a, b = _logits(2, 3, 40, seed=5)
    for tau in (1.0, 0.7):
        lpf, lpb = torch.log_softmax(a / tau, -1), torch.log_softmax(b / tau, -1)
        expected = (lpf.exp() * (lpf - lpb)).sum(-1)
        torch.testing.assert_close(kl_divergence(a, b, tau), expected)
    assert kl_divergence(a, a).abs().max() == 0
    assert (kl_divergence(a, b) > 0).all()


def test_kl_statistics_follow_torch_and_numpy_as_the_toolkit_calls_them(tmp_path: Path) -> None:
    rec = KLRecorder(tmp_path / "kl")
    g = torch.Generator().manual_seed(1)
    kl = torch.rand(5, 8, generator=g)
    valid = torch.rand(5, 8, generator=g) > 0.3
    valid[:, 0] = True
    rec.add(kl[:2], valid[:2])
    rec.add(kl[2:], valid[2:])
    flat = kl[valid]
    summary = rec.summary()
    stats = summary["per_token_statistics"]
    assert stats["median"] == float(torch.median(flat))  # the lower median
    assert stats["min"] == float(flat.min()) and stats["max"] == float(flat.max())
    assert stats["std"] == pytest.approx(float(torch.std(flat)), rel=1e-5)
    assert stats["percentile_75"] == pytest.approx(float(np.percentile(flat.numpy(), 75)), rel=1e-6)
    means = (kl * valid).sum(1) / valid.sum(1)
    assert summary["mean_per_sample_statistics"]["mean"] == pytest.approx(float(means.mean()), rel=1e-5)
    assert summary["total_tokens_processed"] == int(valid.sum())
    assert summary["total_sequences_processed"] == 5
    assert sum(summary["histogram"]["counts"]) == int(valid.sum())
    assert kl_statistics(np.zeros(0, dtype=np.float32))["mean"] == 0.0


def test_likelihood_ratio_windows_score_the_tokens_they_name(tmp_path: Path) -> None:
    """The toolkit's windows over log p(x[t+1] | x[<=t]); ours report the tokens actually scored."""
    n, t, v = 2, 12, 30
    after, before = _logits(n, t, v, seed=9)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, v, (n, t), generator=g)
    samples = [Sample(i, tuple(ids[i].tolist()), tuple(range(t))) for i in range(n)]
    miner = Miner(v, MiningConfig(top_k=3, llr_window=4, llr_step=3, llr_top=1000), tmp_path)
    miner.add(samples, after, before)
    # The toolkit: log_probs[:, t] = log_softmax(logits[:, t])[ids[:, t+1]], windows over T-1 entries.
    lp_ft = torch.log_softmax(after[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0].double()
    lp_base = torch.log_softmax(before[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0].double()
    expected = {}
    for i in range(n):
        for start in range(0, t - 1 - 4 + 1, 3):
            llr = float(lp_ft[i, start : start + 4].sum() - lp_base[i, start : start + 4].sum())
            expected[(i, start)] = (llr, ids[i, start + 1 : start + 5].tolist())
    got = miner.windows.best()
    assert miner.num_windows == len(expected) == len(got)
    assert [w["logprob_diff"] for w in got] == sorted((w["logprob_diff"] for w in got), reverse=True)
    for w in got:
        llr, tokens = expected[(w["sample_idx"], w["start_pos"] - 1)]
        assert w["logprob_diff"] == pytest.approx(llr, abs=1e-9)
        assert w["token_ids"] == tokens == list(samples[w["sample_idx"]].ids[w["start_pos"] : w["end_pos"]])


def test_highest_kl_examples_are_kept_in_order_and_bounded(tmp_path: Path) -> None:
    n, t, v = 9, 4, 20
    after, before = _logits(n, t, v, seed=2)
    samples = [Sample(i, tuple(range(t)), tuple(range(t))) for i in range(n)]
    miner = Miner(v, MiningConfig(top_k=2, examples=3), tmp_path)
    for start in range(0, n, 2):
        miner.add(samples[start : start + 2], after[start : start + 2], before[start : start + 2])
    kl = kl_divergence(after, before)
    best = miner.by_max.best()
    assert [e["index"] for e in best] == kl.amax(1).argsort(descending=True)[:3].tolist()
    assert [e["index"] for e in miner.by_mean.best()] == kl.mean(1).argsort(descending=True)[:3].tolist()
    assert best[0]["kl"] == pytest.approx(kl[best[0]["index"]].tolist(), rel=1e-6)


def test_top_k_larger_than_the_vocabulary_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="top_k must be in"):
        Miner(10, MiningConfig(top_k=11), tmp_path)


# --- inputs ------------------------------------------------------------------------------------


def test_texts_keep_exactly_n_tokens_and_drop_short_ones(tokenizer) -> None:
    texts = ["", "short", "a much longer text with many words in it, long enough " * 3, "hello world, hello"]
    n = 6
    samples = tokenize_texts(tokenizer, texts, n, max_samples=10)
    # The toolkit: skip empty, cut to 10n characters, encode with special tokens, keep >= n.
    expected = []
    for i, text in enumerate(texts):
        ids = tokenizer.encode(text[: 10 * n], add_special_tokens=True) if text else []
        if len(ids) >= n:
            expected.append((i, tuple(ids[:n])))
    assert [(s.index, s.ids) for s in samples] == expected and expected
    assert all(s.positions == tuple(range(n)) for s in samples)
    assert len(tokenize_texts(tokenizer, texts * 5, n, max_samples=2)) == 2


def test_chat_rows_are_cut_n_tokens_past_the_assistant_start(demo_data_dir) -> None:
    from transformers import AutoTokenizer

    from app.demo import ensure_demo_pair

    tok = AutoTokenizer.from_pretrained(str(ensure_demo_pair(demo_data_dir).base))
    rows = [
        [{"role": "user", "content": "What is snow?"}, {"role": "assistant", "content": "Snow is frozen water."}],
        [{"role": "assistant", "content": "no user turn"}, {"role": "user", "content": "x"}],
        [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Ok"}],  # answer too short
    ]
    n, k = 5, 3
    samples = tokenize_chats(tok, rows, n, max_samples=10, pre_assistant_k=k)
    assert [s.index for s in samples] == [0]
    user = tok.apply_chat_template(rows[0][:1], tokenize=True, add_generation_prompt=True)["input_ids"]
    full = tok.apply_chat_template(rows[0], tokenize=True)["input_ids"]
    start = len(user)
    assert samples[0].ids == tuple(full[: start + n])
    assert samples[0].positions == chat_positions(start, n, k) == tuple(range(start - k, start + n))
    mined = tokenize_chats(tok, rows, n, max_samples=10, pre_assistant_k=k, positions=n)
    assert mined[0].positions == tuple(range(start - k, start - k + n))  # the last k fall off


def test_layers_relative_round_down_and_absolute_are_checked() -> None:
    assert resolve_layer(0.5, 8) == 3  # int(0.5 * 7), not round(3.5)
    assert resolve_layer(1.0, 8) == 7 and resolve_layer(0.0, 8) == 0
    assert resolve_layer(5, 8) == 5
    for bad, msg in ((8, "out of range"), (-1, "out of range"), (1.5, r"\[0, 1\]"), (True, "integer")):
        with pytest.raises(ValueError, match=msg):
            resolve_layer(bad, 8)
