"""diff_mining's orderings, NMF topics and run folder against the toolkit's own code.

The oracles below are the toolkit's loops (`token_ordering.py`) written out literally, so a
reordering, an off-by-one in k or a different column order shows up as a mismatch.
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchnmf.nmf import NMF

from lda.diffing.layout import nmf_dir_name, write_run, zip_dir
from lda.diffing.nmf import NmfTriples, cosine_similarity, fit_topics, topic_metrics
from lda.diffing.orderings import fraction_positive_diff, top_k_occurring
from lda.diffing.stats import TokenStats
from tests.tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def random_stats(vocab: int, positions: int = 64, seed: int = 0) -> TokenStats:
    g = torch.Generator().manual_seed(seed)

    def counts() -> torch.Tensor:  # a small range, so ties are common and their order is tested too
        return torch.randint(0, 12, (vocab,), generator=g)

    return TokenStats(vocab, positions, 8, torch.randn(vocab, generator=g), counts(), counts(), counts())


def toolkit_ordering(stats, tokenizer, num_tokens, excluded, kind):
    """`TopKOccurringOrderingType` / `FractionPositiveDiffOrderingType.compute_orderings`, literally."""
    if kind == "top_k_occurring":
        values = (stats.topk_pos_counts.float() / stats.total_positions) * 100
    else:
        values = stats.count_positive.float() / stats.total_positions
    if excluded:
        excluded_idx = torch.tensor(sorted(excluded), dtype=torch.long)
        values[excluded_idx] = float("-inf")
    effective_k = min(num_tokens, stats.vocab_size - len(excluded))
    effective_k = max(effective_k, 0)
    top_values, top_indices = torch.topk(values, k=effective_k, largest=True)
    avg_logit_diff = stats.sum_logit_diff / stats.total_positions
    out = []
    for idx, value in zip(top_indices.tolist(), top_values.tolist()):
        if kind == "top_k_occurring":
            pos, neg = int(stats.topk_pos_counts[idx]), int(stats.topk_neg_counts[idx])
        else:
            pos, neg = int(stats.count_positive[idx]), int(stats.total_positions - stats.count_positive[idx])
        out.append((idx, tokenizer.decode([idx]), value, float(avg_logit_diff[idx]), pos, neg))
    return out


ORDERINGS = {"top_k_occurring": top_k_occurring, "fraction_positive_diff": fraction_positive_diff}


@pytest.mark.parametrize("kind", list(ORDERINGS))
@pytest.mark.parametrize("num_tokens", [0, 7, 100, 10_000])
@pytest.mark.parametrize("excluded", [set(), {3, 17, 40}])
def test_ordering_equals_toolkit(tok, kind, num_tokens, excluded):
    stats = random_stats(len(tok))
    result = ORDERINGS[kind](stats, tok, num_tokens, excluded_token_ids=excluded)
    assert result.ordering_type_id == kind and len(result.orderings) == 1
    (ordering,) = result.orderings
    assert ordering.ordering_id == "global"
    got = [
        (t.token_id, t.token_str, t.ordering_value, t.avg_logit_diff, t.count_positive, t.count_negative)
        for t in ordering.tokens
    ]
    assert got == toolkit_ordering(stats, tok, num_tokens, excluded, kind)
    assert len(got) == min(num_tokens, len(tok) - len(excluded))
    assert not excluded & {t.token_id for t in ordering.tokens}


def test_labels_are_the_toolkits(tok):
    stats = random_stats(len(tok))
    top, frac = top_k_occurring(stats, tok, 5), fraction_positive_diff(stats, tok, 5)
    assert (top.display_name, top.x_axis_label, top.y_axis_label) == (
        "Top-K Occurring",
        "Occurrence Rate in Top-K (%)",
        "Avg Logit Diff",
    )
    assert top.orderings[0].display_label == "Global (by occurrence rate)"
    assert (frac.display_name, frac.x_axis_label) == ("Fraction Positive Diff", "Fraction of Positive Shifts")
    assert frac.orderings[0].display_label == "Global (by fraction positive)"


def test_stats_are_not_modified(tok):
    stats = random_stats(len(tok))
    before = [t.clone() for t in (stats.sum_logit_diff, stats.count_positive, stats.topk_pos_counts)]
    top_k_occurring(stats, tok, 10, excluded_token_ids=[1, 2])
    fraction_positive_diff(stats, tok, 10, excluded_token_ids=[1, 2])
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            before, (stats.sum_logit_diff, stats.count_positive, stats.topk_pos_counts), strict=True
        )
    )


def test_zero_positions_is_an_error(tok):
    stats = TokenStats.zeros(len(tok))
    for fn in ORDERINGS.values():
        with pytest.raises(ValueError, match="total_positions=0"):
            fn(stats, tok, 5)
    with pytest.raises(ValueError, match="total_positions=0"):
        fit_topics(NmfTriples(), stats, tok)


def test_excluded_ids_out_of_vocab_are_an_error(tok):
    with pytest.raises(ValueError, match="excluded_token_ids"):
        top_k_occurring(random_stats(len(tok)), tok, 5, excluded_token_ids=[len(tok)])


class ToolkitCollector:
    """`NmfOrderingType.begin_collection` + `collect_batch` (ignore_padding=True), literally."""

    def __init__(self, mode, excluded):
        self.mode, self.excluded = mode, excluded
        self.nmf_data = {
            "rows": [],
            "cols": [],
            "values": [],
            "valid_row_idx_counter": 0,
            "token_id_to_col_idx": {},
            "col_idx_to_token_id": [],
            "next_col_idx": 0,
        }

    def collect_batch(self, top_k_pos_indices, top_k_pos_values, attention_mask):
        top_k = int(top_k_pos_indices.shape[-1])
        valid_flat = attention_mask.bool().flatten()
        num_valid = int(valid_flat.sum().item())
        if num_valid == 0:
            return
        row_start = int(self.nmf_data["valid_row_idx_counter"])
        self.nmf_data["valid_row_idx_counter"] = row_start + num_valid
        flat_indices = top_k_pos_indices.reshape(-1, top_k)[valid_flat].cpu()
        flat_values = None
        if self.mode != "binary_occurrence":
            flat_values = top_k_pos_values.reshape(-1, top_k)[valid_flat].cpu()
        for k_idx in range(top_k):
            token_ids_k = flat_indices[:, k_idx].tolist()
            for row_idx_local, token_id_item in enumerate(token_ids_k):
                row_idx_global = row_start + row_idx_local
                if self.mode == "binary_occurrence":
                    val = 1.0
                else:
                    val = float(flat_values[row_idx_local, k_idx].item())
                token_id_item = int(token_id_item)
                if token_id_item in self.excluded:
                    continue
                token_id_to_col_idx = self.nmf_data["token_id_to_col_idx"]
                if token_id_item not in token_id_to_col_idx:
                    token_id_to_col_idx[token_id_item] = int(self.nmf_data["next_col_idx"])
                    self.nmf_data["col_idx_to_token_id"].append(token_id_item)
                    self.nmf_data["next_col_idx"] += 1
                col_idx = int(token_id_to_col_idx[token_id_item])
                self.nmf_data["rows"].append(row_idx_global)
                self.nmf_data["cols"].append(col_idx)
                self.nmf_data["values"].append(val)

    def matrix(self):
        """`_run_nmf`'s V, dense."""
        size = (self.nmf_data["valid_row_idx_counter"], self.nmf_data["next_col_idx"])
        indices = torch.stack(
            [torch.as_tensor(self.nmf_data["rows"]), torch.as_tensor(self.nmf_data["cols"])]
        )
        values = torch.as_tensor(self.nmf_data["values"], dtype=torch.float32)
        V_raw = torch.sparse_coo_tensor(indices, values, size, check_invariants=False).coalesce()
        V_vals = torch.relu(V_raw.values())
        V_keep = V_vals > 0
        V = torch.sparse_coo_tensor(V_raw.indices()[:, V_keep], V_vals[V_keep], size, check_invariants=False)
        return V.coalesce().to_dense()


HAND_BATCHES = [
    (  # [B=2, T=3, k=3]; row (0, 2) is padding and must not count
        torch.tensor([[[5, 7, 9], [8, 5, 3], [1, 1, 1]], [[7, 2, 6], [4, 4, 4], [3, 9, 11]]]),
        torch.tensor(
            [[[3.0, 2.0, 1.0], [2.5, 2.0, -0.5], [9, 9, 9]], [[4.0, 1.0, 0.5], [0, 0, 0], [1.5, 1.2, 1.1]]]
        ),
        torch.tensor([[True, True, False], [True, False, True]]),
    ),
    (  # a second batch: rows continue, known tokens keep their columns
        torch.tensor([[[12, 5, 2]], [[6, 13, 8]]]),
        torch.tensor([[[2.0, 1.0, 0.25]], [[1.0, 0.75, 0.5]]]),
        torch.tensor([[True], [True]]),
    ),
]


def random_batches(seed: int, n: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randint(0, 30, (3, 5, 4), generator=g),
            torch.randn(3, 5, 4, generator=g),
            torch.rand(3, 5, generator=g) > 0.3,
        )
        for _ in range(n)
    ]


@pytest.mark.parametrize(
    "batches", [HAND_BATCHES, random_batches(1), random_batches(2)], ids=["hand", "r1", "r2"]
)
@pytest.mark.parametrize("mode", ["logit_diff_magnitude", "binary_occurrence"])
@pytest.mark.parametrize("excluded", [set(), {9, 4}])
def test_nmf_matrix_equals_toolkit(batches, mode, excluded):
    ours, theirs = NmfTriples(mode, excluded), ToolkitCollector(mode, excluded)
    for indices, values, valid in batches:
        ours.add(indices, values, valid)
        theirs.collect_batch(indices, values, valid)
    assert ours.col_to_token().tolist() == theirs.nmf_data["col_idx_to_token_id"]
    assert ours.num_rows == theirs.nmf_data["valid_row_idx_counter"]
    assert torch.equal(ours.matrix().to_dense(), theirs.matrix())


def test_hand_batch_columns_are_k_major():
    """The toolkit meets tokens column by column of the top-k lists, not row by row."""
    triples = NmfTriples()
    triples.add(*HAND_BATCHES[0])
    # valid rows: [5,7,9], [8,5,3], [7,2,6], [3,9,11]; k_idx 0 first: 5 8 7 3, then 2, then 9 6 11
    assert triples.col_to_token().tolist() == [5, 8, 7, 3, 2, 9, 6, 11]
    assert triples.num_rows == 4


def test_binary_mode_values_are_one():
    triples = NmfTriples("binary_occurrence")
    for batch in HAND_BATCHES:
        triples.add(*batch)
    values = triples.matrix().values()
    assert values.numel() == triples.num_entries and torch.equal(values, torch.ones_like(values))


def test_unknown_mode_and_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="mode"):
        NmfTriples("counts")
    with pytest.raises(ValueError, match=r"\[B, T, k\]"):
        NmfTriples().add(
            torch.zeros(2, 3, 4, dtype=torch.long), torch.zeros(2, 3, 4), torch.ones(2, 4, dtype=torch.bool)
        )


def toolkit_topic_metrics(W_nmf, H_nmf, num_rows, num_cols, num_topics):
    """`NmfOrderingType._compute_topic_metrics` and `_run_nmf`'s cosine similarity, literally."""
    colsum_w = W_nmf.sum(dim=0)
    mass = H_nmf.sum(dim=0) * colsum_w
    contributions = H_nmf * colsum_w[None, :]
    dominant = torch.argmax(contributions, dim=1)
    counts = torch.bincount(dominant, minlength=int(num_topics)).float()
    prevalence = counts / float(num_rows)
    if num_cols == 1:
        concentration = torch.ones((num_topics,), dtype=torch.float32)
    else:
        W_norm = W_nmf / colsum_w[None, :]
        p = W_norm.clamp(min=1e-12)
        entropy = -(p * torch.log(p)).sum(dim=0)
        entropy_norm = entropy / float(math.log(num_cols))
        concentration = 1.0 - entropy_norm
    metrics = [
        {
            "nmf_topic_idx": int(t),
            "nmf_topic_mass": float(mass[t].item()),
            "nmf_topic_prevalence": float(prevalence[t].item()),
            "nmf_topic_concentration": float(concentration[t].item()),
        }
        for t in range(num_topics)
    ]
    topic_token_matrix = W_nmf.T
    token_mass_l2 = torch.linalg.norm(topic_token_matrix, ord=2, dim=1)
    normed_topics = topic_token_matrix / token_mass_l2[:, None]
    return metrics, (normed_topics @ normed_topics.T).tolist()


@pytest.mark.parametrize("num_cols", [1, 2, 9])
def test_topic_metrics_equal_toolkit(num_cols):
    g = torch.Generator().manual_seed(num_cols)
    # Columns of W scaled unevenly, so weighting H by ΣW changes which topic dominates a row.
    W = torch.rand(num_cols, 3, generator=g) * torch.tensor([0.1, 1.0, 10.0])
    H = torch.rand(12, 3, generator=g)
    metrics, cosine = toolkit_topic_metrics(W, H, 12, num_cols, 3)
    assert topic_metrics(W, H) == metrics
    assert cosine_similarity(W).tolist() == cosine


def planted(seed: int = 0) -> tuple[NmfTriples, set[int], set[int]]:
    """Rows whose top-k lists come from one of two disjoint token groups."""
    g = torch.Generator().manual_seed(seed)
    group_a, group_b = list(range(10, 18)), list(range(20, 28))
    rows, values = [], []
    for r in range(60):
        group = torch.tensor(group_a if r % 2 else group_b)
        rows.append(group[torch.randperm(8, generator=g)[:4]])
        values.append(1 + torch.rand(4, generator=g))
    triples = NmfTriples()
    triples.add(torch.stack(rows)[:, None], torch.stack(values)[:, None], torch.ones(60, 1, dtype=torch.bool))
    return triples, set(group_a), set(group_b)


def test_nmf_separates_planted_groups(tok):
    triples, group_a, group_b = planted()
    result = fit_topics(triples, random_stats(len(tok)), tok, num_topics=2, num_tokens=8)
    tops = [{t.token_id for t in o.tokens[:8]} for o in result.orderings]
    assert sorted(tops, key=min) == [group_a, group_b]
    prevalence = [m["nmf_topic_prevalence"] for m in result.type_metadata["topic_metrics"]]
    assert prevalence == pytest.approx([0.5, 0.5])
    cosine = torch.tensor(result.type_metadata["pairwise"]["cosine_similarity"])
    assert cosine.diagonal().tolist() == pytest.approx([1.0, 1.0]) and abs(float(cosine[0, 1])) < 0.05


def test_nmf_result_fields(tok):
    triples, _, _ = planted()
    stats = random_stats(len(tok))
    result = fit_topics(triples, stats, tok, num_topics=3, beta=1.0, num_tokens=5)
    assert (result.ordering_type_id, result.display_name, result.x_axis_label) == (
        "nmf",
        "NMF Topics (3 topics)",
        "NMF Topic Weight",
    )
    assert [o.ordering_id for o in result.orderings] == ["topic_0", "topic_1", "topic_2"]
    assert [o.display_label for o in result.orderings] == ["Topic 0", "Topic 1", "Topic 2"]
    meta = result.type_metadata
    assert set(meta) == {"num_topics", "beta", "mode", "pairwise", "topic_metrics"} and meta["beta"] == 1.0
    assert sum(m["nmf_topic_prevalence"] for m in meta["topic_metrics"]) == pytest.approx(1.0)
    token_of = triples.col_to_token().tolist()
    for t, ordering in enumerate(result.orderings):
        assert ordering.metadata == meta["topic_metrics"][t] and ordering.metadata["nmf_topic_idx"] == t
        assert 0.0 <= ordering.metadata["nmf_topic_concentration"] <= 1.0
        assert len(ordering.tokens) <= 5
        values = [e.ordering_value for e in ordering.tokens]
        assert values == sorted(values, reverse=True) and all(v >= 1e-6 for v in values)
        for e in ordering.tokens:
            assert token_of[e.extra["nmf_col_idx"]] == e.token_id
            assert (e.count_positive, e.count_negative) == (
                int(stats.topk_pos_counts[e.token_id]),
                int(stats.topk_neg_counts[e.token_id]),
            )
            assert e.avg_logit_diff == float(stats.sum_logit_diff[e.token_id] / stats.total_positions)


def test_nmf_is_deterministic_under_seed(tok):
    stats = random_stats(len(tok))
    triples = NmfTriples()
    for batch in random_batches(5):
        triples.add(*batch)

    def fit(seed):
        result = fit_topics(triples, stats, tok, num_topics=3, seed=seed, num_tokens=30)
        return [[(e.token_id, e.ordering_value) for e in o.tokens] for o in result.orderings]

    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    first = fit(7)
    assert torch.equal(torch.rand(3), expected_draw), "fitting must not advance the caller's RNG"
    assert fit(7) == first
    assert fit(8) != first


def test_nmf_equals_toolkits_seeded_fit(tok):
    """Our private-generator start gives what `torch.manual_seed(seed)` + torchnmf's own init give."""
    stats = random_stats(len(tok))
    triples = NmfTriples()
    for batch in random_batches(9):
        triples.add(*batch)
    V = triples.matrix()
    torch.manual_seed(11)
    model = NMF(V.shape, rank=3)
    with torch.enable_grad():
        model.fit(V, beta=2.0, max_iter=50)
    weights, cols = torch.topk(model.W.detach()[:, 1], k=10)
    token_of = triples.col_to_token().tolist()
    expected = [(token_of[c], w) for c, w in zip(cols.tolist(), weights.tolist(), strict=True) if w >= 1e-6]
    result = fit_topics(triples, stats, tok, num_topics=3, max_iter=50, seed=11, num_tokens=10)
    assert [(e.token_id, e.ordering_value) for e in result.orderings[1].tokens] == expected


def test_nmf_without_data(tok):
    stats = random_stats(len(tok))
    empty = NmfTriples()
    empty.add(
        torch.zeros(2, 3, 4, dtype=torch.long), torch.ones(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool)
    )
    excluded = NmfTriples(excluded_token_ids={0})
    excluded.add(
        torch.zeros(2, 3, 4, dtype=torch.long), torch.ones(2, 3, 4), torch.ones(2, 3, dtype=torch.bool)
    )
    for triples in (NmfTriples(), empty, excluded):
        result = fit_topics(triples, stats, tok)
        assert result.orderings == [] and result.type_metadata == {"error": "No NMF data collected"}
    negative = NmfTriples()
    negative.add(
        torch.ones(1, 2, 3, dtype=torch.long), -torch.ones(1, 2, 3), torch.ones(1, 2, dtype=torch.bool)
    )
    assert fit_topics(negative, stats, tok).type_metadata == {"error": "NMF fitting failed"}


def test_nmf_dir_name_is_the_toolkits():
    # The toolkit's default config: 3 topics, top 200, magnitude, beta 2, not orthogonal, weight 1000.0.
    assert (
        nmf_dir_name(3, 200, "logit_diff_magnitude", 2)
        == "nmf_topics3_topn200_mode_logit_diff_magnitude_beta2p0_orthfalse_w1000p0"
    )


TOKEN_KEYS = {"token_id", "token_str", "ordering_value", "avg_logit_diff", "count_positive", "count_negative"}


@pytest.fixture(scope="module")
def run(tok, tmp_path_factory):
    stats = random_stats(len(tok))
    triples, _, _ = planted()
    results = [
        top_k_occurring(stats, tok, 40),
        fraction_positive_diff(stats, tok, 40),
        fit_topics(triples, stats, tok, num_topics=2, num_tokens=8),
    ]
    nmf_dir = nmf_dir_name(2, 8, "logit_diff_magnitude", 2.0)
    metadata = {"seed": 42, "top_k": 4, "base_model": "base"}
    llr = {"metadata": {"dataset_name": "ds"}, "chunks": [{"rank": 1, "text": "héllo"}]}
    run_dir = write_run(
        tmp_path_factory.mktemp("run") / "seed42_top4",
        "ds",
        stats,
        tok,
        results,
        metadata,
        nmf_dir,
        llr,
        dpi=30,
    )
    return run_dir, stats, results, nmf_dir, metadata, llr


def load(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_run_top_level_files(tok, run):
    run_dir, stats, _, _, metadata, llr = run
    assert load(run_dir / "run_metadata.json") == metadata
    assert load(run_dir / "ds_sequence_likelihood_ratios.json") == llr
    raw = (run_dir / "ds_global_token_stats.json").read_text(encoding="utf-8")
    assert "Ġ" in raw and "\\u0120" not in raw  # ensure_ascii=False, as the toolkit writes it
    data = json.loads(raw)
    assert set(data) == {
        "dataset_name",
        "num_samples",
        "total_positions_analyzed",
        "num_unique_tokens",
        "global_token_stats",
    }
    assert (
        data["dataset_name"],
        data["num_samples"],
        data["total_positions_analyzed"],
        data["num_unique_tokens"],
    ) == (
        "ds",
        stats.num_samples,
        stats.total_positions,
        len(tok),
    )
    entries = data["global_token_stats"]
    assert [e["token_id"] for e in entries] == list(range(len(tok)))
    assert all(set(e) == {"token", "token_id", "sum_logit_diff", "count_positive"} for e in entries)
    assert [e["token"] for e in entries] == tok.convert_ids_to_tokens(list(range(len(tok))))
    assert [e["sum_logit_diff"] for e in entries] == [float(v) for v in stats.sum_logit_diff]
    assert [e["count_positive"] for e in entries] == stats.count_positive.tolist()


def test_run_ordering_folders(run):
    run_dir, _, results, nmf_dir, _, _ = run
    folders = {
        "top_k_occurring": "top_k_occurring",
        "fraction_positive_diff": "fraction_positive_diff",
        "nmf": nmf_dir,
    }
    assert {p.name for p in run_dir.iterdir() if p.is_dir()} == set(folders.values())
    for result in results:
        type_dir = run_dir / folders[result.ordering_type_id]
        meta = load(type_dir / "metadata.json")
        assert meta == json.loads(
            json.dumps(
                {
                    "ordering_type_id": result.ordering_type_id,
                    "display_name": result.display_name,
                    "x_axis_label": result.x_axis_label,
                    "y_axis_label": result.y_axis_label,
                    **result.type_metadata,
                }
            )
        )
        index = load(type_dir / "ds" / "orderings.json")
        assert set(index) == {"dataset_name", "orderings"} and index["dataset_name"] == "ds"
        assert [o["ordering_id"] for o in index["orderings"]] == [o.ordering_id for o in result.orderings]
        for entry, ordering in zip(index["orderings"], result.orderings, strict=True):
            assert set(entry) == {"ordering_id", "display_label", "path", "num_tokens"}
            assert entry["num_tokens"] == len(ordering.tokens)
            data = load(type_dir / "ds" / entry["path"])
            assert set(data) == {"ordering_id", "display_label", "tokens", *ordering.metadata}
            assert [t["token_id"] for t in data["tokens"]] == [t.token_id for t in ordering.tokens]
            assert [t["ordering_value"] for t in data["tokens"]] == [
                t.ordering_value for t in ordering.tokens
            ]
            extra = {"nmf_col_idx"} if result.ordering_type_id == "nmf" else set()
            assert all(set(t) == TOKEN_KEYS | extra for t in data["tokens"])
            for kind in ("scatter", "bar"):
                png = type_dir / "ds" / f"{ordering.ordering_id}_{kind}.png"
                with Image.open(png) as image:
                    image.verify()
                    assert image.format == "PNG" and min(image.size) > 50


def test_empty_results_are_skipped(tok, tmp_path):
    stats = random_stats(len(tok))
    empty = fit_topics(NmfTriples(), stats, tok)
    write_run(tmp_path, "ds", stats, tok, [empty], {}, dpi=30)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds_global_token_stats.json", "run_metadata.json"]


def test_dataset_names_stay_inside_the_run(tok, tmp_path):
    with pytest.raises(ValueError, match="dataset"):
        write_run(tmp_path, "../ds", random_stats(len(tok)), tok, [], {})


def test_zip_holds_every_file(run, tmp_path):
    run_dir = run[0]
    files = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file())
    first = zip_dir(run_dir, tmp_path / "a.zip")
    with zipfile.ZipFile(first) as zf:
        assert zf.namelist() == files
        assert all(zf.read(name) == (run_dir / name).read_bytes() for name in files)
    assert zip_dir(run_dir, tmp_path / "b.zip").read_bytes() == first.read_bytes()
    with pytest.raises(ValueError, match="outside"):
        zip_dir(run_dir, run_dir / "run.zip")
