"""Block passes merged in order finish as one pass over every batch.

The offline pipeline runs one pass per contiguous block of batches (each in its own work folder,
possibly on another machine), pickles each pass's `partial()` and folds them into one pass in block
order. Against a single pass over the same batches: counts, top lists (ties included), KL files and
NMF topics are equal exactly; the float sums are equal up to the rounding of another summation
order, bounded below from the arithmetic. Blocks of one batch regroup nothing, so there the whole
run folder must be byte-identical.
"""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from lda.diffing.adl import ADLConfig, ADLPass
from lda.diffing.adl_files import write_adl
from lda.diffing.inputs import Sample
from lda.diffing.mine import LogitDiffPass, PassConfig, mining_width
from lda.diffing.mining import _TopList
from lda.diffing.nmf import NmfTriples
from tests.test_diffing_orderings import random_batches

LENGTH, BATCH = 12, 2
# Batch 4 repeats batch 1 under other indices: its samples and windows tie with earlier ones, and
# being first in its block they get lower offer numbers there than the originals got in theirs.
DUPLICATE = {8: 2, 9: 3}
LENGTHS = [12, 12, 12, 7, 12, 12, 9, 12, 12, 12, 5, 12, 12, 8, 12, 12]  # rows analysing fewer positions
NMF = {"num_topics": 2, "beta": 2.0, "max_iter": 20, "seed": 0, "mode": "logit_diff_magnitude"}
CONFIG = PassConfig(
    top_k=5, kl_reverse=True, examples=6, llr_window=4, llr_step=3, llr_top=12, num_tokens=20, nmf=NMF
)
BLOCKS = [[1] * 8, [2] * 4, [3, 1, 4]]
KL_FILES = [f"{side}.{kind}.f32" for side in ("kl_forward", "kl_reverse") for kind in ("tokens", "samples")]
U32, U64 = 2.0**-24, 2.0**-53  # unit roundoff of fp32 / fp64


def regrouping_bound(batch_sums: Sequence[torch.Tensor], u: float) -> torch.Tensor:
    """How far two groupings of the same n summands can differ, per element.

    The single pass and the merged blocks add the same n batch sums x_i (each batch is reduced
    alike whichever pass runs it), only grouped differently. Any grouping of n terms is within
    γ_{n-1}·Σ|x_i| of the exact sum, γ_m = m·u / (1 − m·u) (Higham, Accuracy and Stability of
    Numerical Algorithms, §4.2), so the two results are within twice that.
    """
    m = len(batch_sums) - 1
    return 2 * (m * u / (1 - m * u)) * torch.stack([x.abs().double() for x in batch_sums]).sum(dim=0)


@pytest.fixture(scope="module")
def batches(pair) -> list[list[Sample]]:
    vocab = pair.after.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    samples = []
    for i, n in enumerate(LENGTHS):
        ids = tuple(torch.randint(3, vocab, (LENGTH,), generator=g).tolist())
        samples.append(Sample(i, ids, tuple(range(n))))
    for i, j in DUPLICATE.items():
        samples[i] = Sample(i, samples[j].ids, samples[j].positions)
    return [samples[s : s + BATCH] for s in range(0, len(samples), BATCH)]


def split(batches: list[Any], sizes: list[int]) -> list[list[Any]]:
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [batches[s : s + n] for s, n in zip(starts, sizes, strict=True)]


def worker_partial(make: Any, block: list[list[Sample]], work: Path) -> dict[str, Any]:
    """One worker: a pass over its block in its own folder, its partial through pickle; the folder
    is then deleted, since the driver cannot see it."""
    p = make(work)
    for batch in block:
        p.add(batch)
    partial = pickle.loads(pickle.dumps(p.partial()))
    shutil.rmtree(work, ignore_errors=True)
    return partial


def logit_pass(pair: Any, config: PassConfig = CONFIG, **kw: Any) -> Any:
    return lambda work: LogitDiffPass(pair, config, work, **kw)


def finish(p: LogitDiffPass, root: Path) -> dict[str, Any]:
    return p.finish(root / "run", "ds", {"base_model": "b", "finetuned_model": "a"})


@pytest.fixture(scope="module")
def reference(pair, batches, tmp_path_factory) -> dict[str, Any]:
    """One pass over every batch, and each batch's fp32 sums (for the regrouping bound)."""
    root = tmp_path_factory.mktemp("whole")
    p = LogitDiffPass(pair, CONFIG, root / "work")
    for batch in batches:
        p.add(batch)
    result = finish(p, root)
    singles = [worker_partial(logit_pass(pair), [b], root / f"single{i}") for i, b in enumerate(batches)]
    bound = regrouping_bound([s["miner"]["stats"].sum_logit_diff for s in singles], U32)
    return {"pass": p, "result": result, "root": root, "bound": bound}


def assert_json(ref: Any, got: Any, bound: torch.Tensor, positions: int, where: str = "") -> None:
    """Equal, but for each token's fp32 sum of diffs (and its average) within `bound`."""
    if isinstance(ref, dict):
        assert ref.keys() == got.keys(), where
        for key, value in ref.items():
            if key in ("sum_logit_diff", "avg_logit_diff"):
                tol = float(bound[ref["token_id"]])
                if key == "avg_logit_diff":  # sum / positions, rounded once more on each side
                    tol = tol / positions + 2 * U32 * (abs(value) + abs(got[key]))
                assert abs(value - got[key]) <= tol, f"{where}/{key}"
            else:
                assert_json(value, got[key], bound, positions, f"{where}/{key}")
    elif isinstance(ref, list):
        assert len(ref) == len(got), where
        for i, (a, b) in enumerate(zip(ref, got, strict=True)):
            assert_json(a, b, bound, positions, f"{where}[{i}]")
    else:
        assert ref == got, where


def files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_run(reference: dict[str, Any], p: LogitDiffPass, result: dict[str, Any], root: Path, exact: bool):
    ref_pass, bound, positions = reference["pass"], reference["bound"], reference["result"]["total_positions"]
    ours, theirs = ref_pass.token_stats(), p.token_stats()
    for name in ("count_positive", "topk_pos_counts", "topk_neg_counts"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    diff = (ours.sum_logit_diff.double() - theirs.sum_logit_diff.double()).abs()
    assert (diff == 0).all() if exact else (diff <= bound).all()
    ref_matrix, matrix = ref_pass.triples.matrix(), p.triples.matrix()
    assert torch.equal(ref_matrix.indices(), matrix.indices()) and torch.equal(ref_matrix.values(), matrix.values())
    assert torch.equal(ref_pass.triples.col_to_token(), p.triples.col_to_token())
    for name in KL_FILES:  # the KL values themselves, appended block after block
        assert (reference["root"] / "work" / name).read_bytes() == (root / "work" / name).read_bytes(), name
    assert_json(reference["result"], result, bound, positions)
    ref_files, got_files = files(reference["root"] / "run"), files(root / "run")
    assert ref_files.keys() == got_files.keys()
    for name, path in ref_files.items():
        if exact:
            assert path.read_bytes() == got_files[name].read_bytes(), name
        elif name.endswith(".json"):
            assert_json(json.loads(path.read_text()), json.loads(got_files[name].read_text()), bound, positions, name)
        # Regrouped sums may move a plotted point by an ulp: the plots are checked through the JSON they draw.


@pytest.mark.parametrize("sizes", BLOCKS, ids=["ones", "twos", "uneven"])
def test_merged_blocks_finish_as_one_pass(pair, batches, reference, sizes, tmp_path):
    first, *rest = split(batches, sizes)
    partials = [worker_partial(logit_pass(pair), block, tmp_path / f"block{i}") for i, block in enumerate(rest)]
    p = LogitDiffPass(pair, CONFIG, tmp_path / "work")  # the driver: a pass over the first block
    for batch in first:
        p.add(batch)
    for partial in partials:
        p.merge(partial)
    result = finish(p, tmp_path)
    # The data is as meant: the repeated batch ties with its original across blocks.
    by_max = [e["sample_idx"] for e in result["kl_examples_by_max"]]
    assert by_max.index(2) + 1 == by_max.index(8), by_max
    assert_same_run(reference, p, result, tmp_path, exact=sizes == [1] * len(sizes))


def test_a_driver_resumed_from_a_checkpoint_merges_on(pair, batches, reference, tmp_path):
    """Checkpoints between merges (saved as the jobs save them); a merge after the last checkpoint
    is cut off by `restore` and merged again, and the result is still the single pass's."""
    blocks = split(batches, [3, 2, 3])
    partials = [worker_partial(logit_pass(pair), b, tmp_path / f"block{i}") for i, b in enumerate(blocks)]
    work = tmp_path / "work"
    p = LogitDiffPass(pair, CONFIG, work)  # a driver that adds nothing itself
    p.merge(partials[0])
    torch.save(p.state(), tmp_path / "checkpoint.pt")
    p.merge(partials[1])  # then the driver stops before its next checkpoint
    p = LogitDiffPass(pair, CONFIG, work, resume=True)
    p.restore(torch.load(tmp_path / "checkpoint.pt", weights_only=False))
    for partial in partials[1:]:
        p.merge(partial)
    assert_same_run(reference, p, finish(p, tmp_path), tmp_path, exact=False)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"top_k": 6}, "top_k"),
        ({"kl_reverse": False}, "kl_reverse"),
        ({"examples": 5}, "examples"),
        ({"llr_window": 5}, "llr_window"),
        ({"temperature": 0.5}, "temperature"),
        ({"nmf": NMF | {"mode": "binary_occurrence"}}, "nmf"),
        ({"nmf": None}, "nmf"),
    ],
)
def test_a_partial_from_another_config_is_refused(pair, batches, tmp_path, change, named):
    other = PassConfig(**{**vars(CONFIG), **change})
    partial = worker_partial(logit_pass(pair, other), batches[:1], tmp_path / "other")
    p = LogitDiffPass(pair, CONFIG, tmp_path / "work")
    p.add(batches[0])
    before = p.partial()
    with pytest.raises(ValueError, match=rf"\b{named}="):
        p.merge(partial)
    after = p.partial()  # refused before anything changed
    assert after["miner"]["num_windows"] == before["miner"]["num_windows"]
    assert after["miner"]["kl"][0].tobytes() == before["miner"]["kl"][0].tobytes()
    assert after["nmf"]["num_rows"] == before["nmf"]["num_rows"]


def test_a_partial_of_another_width_or_method_is_refused(pair, batches, tmp_path):
    width = mining_width(pair)
    p = LogitDiffPass(pair, CONFIG, tmp_path / "work")
    narrow = worker_partial(logit_pass(pair, width=width - 1), batches[:1], tmp_path / "narrow")
    with pytest.raises(ValueError, match=r"\bwidth="):
        p.merge(narrow)
    adl = ADLPass(pair, ADLConfig(layers=(0,), labels=tuple(range(LENGTH))), width)
    with pytest.raises(ValueError, match=r"\bmethod='adl'"):
        p.merge(adl.partial())


def test_top_lists_merged_keep_the_earlier_of_tied_items_at_the_cut():
    """Ties at the list's cut and inside it resolve as one list offered every item resolves them."""
    scores = [5.0, 3.0, 3.0, 1.0, 3.0, 4.0, 3.0, 5.0, 0.5]
    whole = _TopList(4)
    for i, s in enumerate(scores):
        whole.offer(s, {"i": i})
    for cut in range(len(scores) + 1):
        for later in ([scores[cut:]], [scores[cut : cut + 2], scores[cut + 2 :]]):
            merged, start = _TopList(4), cut
            for i, s in enumerate(scores[:cut]):
                merged.offer(s, {"i": i})
            for chunk in later:
                block = _TopList(4)
                for i, s in enumerate(chunk, start=start):
                    block.offer(s, {"i": i})
                merged.merge(list(block._heap), block._seen)
                start += len(chunk)
            assert merged.best() == whole.best(), cut


@pytest.mark.parametrize("mode", ["logit_diff_magnitude", "binary_occurrence"])
def test_nmf_triples_merged_are_one_collections(mode):
    """Rows continue, and tokens first met in a later block take the next columns in their order."""
    batches = random_batches(3, n=5)
    whole = NmfTriples(mode, {4, 9})
    for batch in batches:
        whole.add(*batch)
    for sizes in ([1] * 5, [2, 3], [4, 1]):
        first, *rest = split(batches, sizes)
        merged = NmfTriples(mode, {4, 9})
        for batch in first:
            merged.add(*batch)
        for block in rest:
            worker = NmfTriples(mode, {4, 9})
            for batch in block:
                worker.add(*batch)
            merged.merge(pickle.loads(pickle.dumps(worker.partial())))
        assert merged.num_rows == whole.num_rows
        assert torch.equal(merged.col_to_token(), whole.col_to_token())
        assert torch.equal(merged.matrix().to_dense(), whole.matrix().to_dense())
    with pytest.raises(ValueError, match=r"\bexcluded="):
        NmfTriples(mode).merge(NmfTriples(mode, {4}).partial())


# --- ADL ---------------------------------------------------------------------------------------

ADL_CONFIG = ADLConfig(layers=(0, 1), labels=tuple(range(LENGTH)), lens_k=10, patchscope_labels=())
ADL_META = {"base_model": "b", "finetuned_model": "a"}


def adl_pass(pair: Any, config: ADLConfig = ADL_CONFIG) -> Any:
    return lambda work: ADLPass(pair, config, mining_width(pair))


@pytest.fixture(scope="module")
def adl_reference(pair, batches, tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("adl")
    p = adl_pass(pair)(None)
    for batch in batches:
        p.add(batch)
    singles = [worker_partial(adl_pass(pair), [b], root / f"single{i}") for i, b in enumerate(batches)]
    bounds = {
        (layer, side): regrouping_bound([s["sums"][layer][side] for s in singles], U64)
        for layer in ADL_CONFIG.layers
        for side in ("after", "before")
    }
    norm_bounds = {
        (layer, side): float(regrouping_bound([torch.tensor(s["norms"][layer][side]) for s in singles], U64))
        for layer, side in bounds
    }
    result = write_adl(p, root / "run", "ds", ADL_META)
    return {"pass": p, "root": root, "bounds": bounds, "norm_bounds": norm_bounds, "result": result}


@pytest.mark.parametrize("sizes", BLOCKS, ids=["ones", "twos", "uneven"])
def test_adl_blocks_merged_sum_as_one_pass(pair, batches, adl_reference, sizes, tmp_path):
    first, *rest = split(batches, sizes)
    p = adl_pass(pair)(None)
    for batch in first:
        p.add(batch)
    for i, block in enumerate(rest):
        p.merge(worker_partial(adl_pass(pair), block, tmp_path / f"block{i}"))
    ref = adl_reference["pass"]
    exact = sizes == [1] * len(sizes)
    assert p.samples == ref.samples and p.means.norm_count == ref.means.norm_count
    assert torch.equal(p.means.counts, ref.means.counts)
    for (layer, side), bound in adl_reference["bounds"].items():
        diff = (p.means.sums[layer][side] - ref.means.sums[layer][side]).abs()
        assert (diff == 0).all() if exact else (diff <= bound).all(), (layer, side)
        norm_diff = abs(p.means.norms[layer][side] - ref.means.norms[layer][side])
        assert norm_diff <= (0 if exact else adl_reference["norm_bounds"][(layer, side)]), (layer, side)
    if exact:  # the same sums bit for bit: the written run too
        assert write_adl(p, tmp_path / "run", "ds", ADL_META) == adl_reference["result"]
        ref_files, got_files = files(adl_reference["root"] / "run"), files(tmp_path / "run")
        assert ref_files.keys() == got_files.keys()
        for name, path in ref_files.items():
            assert path.read_bytes() == got_files[name].read_bytes(), name


@pytest.mark.parametrize(
    ("config", "named"),
    [(ADLConfig(layers=(1,), labels=ADL_CONFIG.labels), "layers"), (ADLConfig(layers=(0, 1), labels=(0, 1)), "labels")],
)
def test_adl_partial_from_another_config_is_refused(pair, batches, config, named):
    other = adl_pass(pair, config)(None)
    p = adl_pass(pair)(None)
    p.add(batches[0])
    with pytest.raises(ValueError, match=rf"\b{named}="):
        p.merge(pickle.loads(pickle.dumps(other.partial())))
    assert p.samples == len(batches[0]) and torch.equal(p.means.counts, torch.tensor([len(batches[0])] * LENGTH))
