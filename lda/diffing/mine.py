"""One logit-diff pass over a pair: stream batches in, then orderings, NMF topics and the
toolkit's file layout out. The server's jobs and offline runs call the same class."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lda.diffing.forward import pair_logits
from lda.diffing.inputs import Sample
from lda.diffing.layout import nmf_dir_name, ordering_json, write_run, zip_dir
from lda.diffing.mining import Miner, MiningConfig
from lda.diffing.nmf import NmfTriples, fit_topics
from lda.diffing.orderings import fraction_positive_diff, top_k_occurring
from lda.diffing.stats import TokenStats, require_same
from lda.source import input_device

__all__ = ["LogitDiffPass", "PassConfig", "mining_width", "zip_dir"]


@dataclass(frozen=True)
class PassConfig(MiningConfig):
    num_tokens: int = 100  # tokens per ordering
    nmf: dict[str, Any] | None = field(default=None)  # {num_topics, beta, max_iter, seed, mode}


def mining_width(pair: Any, drop_new_tokens: bool = True) -> int:
    """The vocabulary ids both models' logits are compared over.

    Equal vocabularies: the shared logits width. A fine-tune that only added tokens (every token
    of the smaller vocabulary at the same id in the larger): the smaller vocabulary, when
    `drop_new_tokens` (the toolkit's rule); refused otherwise, as is any other mismatch.
    """
    compat = pair.compatibility
    if compat.compatible:
        return compat.shared_width
    small, large = sorted((pair.after.tokenizer.get_vocab(), pair.before.tokenizer.get_vocab()), key=len)
    added_only = all(large.get(tok) == i for tok, i in small.items()) and max(small.values()) < len(small)
    if not added_only:
        raise ValueError(f"the pair's vocabularies differ beyond added tokens: {compat.warning}")
    if not drop_new_tokens:
        raise ValueError(
            f"drop_new_tokens: the vocabularies differ ({compat.vocab_size_after} vs {compat.vocab_size_before} "
            "tokens); set it true to compare the shared ids"
        )
    return min(len(small), compat.shared_width)


class LogitDiffPass:
    """Streaming logit-diff mining + KL + likelihood ratios over one dataset."""

    def __init__(
        self, pair: Any, config: PassConfig, work_dir: Path, width: int | None = None, resume: bool = False
    ) -> None:
        self.pair, self.config = pair, config
        self.width = width or mining_width(pair)
        self.tokenizer = pair.after.tokenizer
        self.miner = Miner(self.width, config, work_dir, device=input_device(pair.after.model), resume=resume)
        self.triples: NmfTriples | None = None
        if config.nmf is not None:
            triples = self.triples = NmfTriples(config.nmf.get("mode", "logit_diff_magnitude"))
            self.miner.nmf_hook = lambda values, indices, valid: triples.add(indices, values, valid)

    def add(self, samples: Sequence[Sample]) -> None:
        after, before = pair_logits(
            self.pair.after.model, self.pair.before.model, self.width, samples, self.pair.after.pad_id
        )
        self.miner.add(samples, after, before)

    def token_stats(self) -> TokenStats:
        return self.miner.token_stats()

    def state(self) -> dict[str, Any]:
        """A checkpoint of everything streamed so far (`restore` continues from it)."""
        return {"miner": self.miner.state(), "nmf": vars(self.triples).copy() if self.triples is not None else None}

    def restore(self, state: dict[str, Any]) -> None:
        self.miner.restore(state["miner"])
        if self.triples is not None and state["nmf"] is not None:
            vars(self.triples).update(state["nmf"])

    def partial(self) -> dict[str, Any]:
        """Everything `add` has accumulated, picklable and self-contained (the KL values travel,
        not this pass's work folder): one block's reduction for a driver's `merge`.

        Examples and windows name samples by `Sample.index`, the dataset row, so a block handed its
        slice of the job's samples already reports global rows; only NMF rows and the top lists'
        offer order count from 0 per block, and `merge` renumbers those.
        """
        return {
            "settings": self._settings(),
            "miner": self.miner.partial(),
            "nmf": self.triples.partial() if self.triples is not None else None,
        }

    def merge(self, partial: dict[str, Any]) -> None:
        """Fold in the `partial()` of a pass over the batches after all of this one's.

        Merging blocks in order and finishing gives what one pass over every batch gives: the same
        counts, top lists (ties included), KL files and NMF topics; float sums differ only by the
        rounding of another summation order. A partial from another config raises ValueError
        naming each difference, before anything changes.
        """
        require_same(self._settings(), partial["settings"])
        self.miner.check(partial["miner"])
        if self.triples is not None:
            self.triples.check(partial["nmf"])
        self.miner.merge(partial["miner"])
        if self.triples is not None:
            self.triples.merge(partial["nmf"])

    def _settings(self) -> dict[str, Any]:
        return {"method": "logit_diff", "width": self.width}

    def finish(self, run_dir: Path, dataset: str, metadata: dict[str, Any]) -> dict[str, Any]:
        """Write the toolkit's layout under `run_dir`; return the result (orderings, KL, examples)."""
        stats, tok, k = self.token_stats(), self.tokenizer, self.config.num_tokens
        results = [top_k_occurring(stats, tok, k), fraction_positive_diff(stats, tok, k)]
        nmf_dir = None
        if self.triples is not None and self.config.nmf is not None:
            nmf = self.config.nmf
            results.append(
                fit_topics(
                    self.triples, stats, tok, num_topics=nmf["num_topics"], beta=nmf["beta"],
                    max_iter=nmf["max_iter"], seed=nmf["seed"], num_tokens=k,
                )
            )  # fmt: skip
            nmf_dir = nmf_dir_name(nmf["num_topics"], k, nmf["mode"], nmf["beta"])
        llr = self._llr(dataset, metadata)
        write_run(run_dir, dataset, stats, tok, results, metadata, nmf_dirname=nmf_dir, llr=llr)
        return {
            "dataset_name": dataset,
            "num_samples": stats.num_samples,
            "total_positions": stats.total_positions,
            "orderings": {r.ordering_type_id: _ordering_json(r) for r in results},
            "kl": self.miner.kl.summary(),
            "kl_reverse": self.miner.kl_rev.summary() if self.miner.kl_rev is not None else None,
            "kl_examples_by_max": self._examples(self.miner.by_max.best()),
            "kl_examples_by_mean": self._examples(self.miner.by_mean.best()),
            "llr_windows": llr["chunks"],
            "llr_num_windows": self.miner.num_windows,
        }

    def _examples(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Each text as tokens, with the KL of the next-token distributions after each analysed one."""
        out = []
        for item in items:
            ids = item["ids"]
            out.append(
                {
                    "sample_idx": item["index"],
                    "score": item["score"],
                    "tokens": [self.tokenizer.decode([i]) for i in ids],
                    "token_ids": ids,
                    "positions": item["positions"],
                    "kl": item["kl"],
                }
            )
        return out

    def _llr(self, dataset: str, metadata: dict[str, Any]) -> dict[str, Any]:
        """The toolkit's `{dataset}_sequence_likelihood_ratios.json`, its text taken from the scored tokens."""
        chunks = []
        for rank, window in enumerate(self.miner.windows.best(), start=1):
            chunks.append(window | {"text": self.tokenizer.decode(window["token_ids"]), "rank": rank})
        return {
            "metadata": {
                "dataset_name": dataset,
                "window_size": self.config.llr_window,
                "step": self.config.llr_step,
                "base_model": metadata.get("base_model"),
                "ft_model": metadata.get("finetuned_model"),
                "num_chunks": self.miner.num_windows,
                "num_samples": self.miner.stats.num_samples,
            },
            "chunks": chunks,
        }


def _ordering_json(result: Any) -> dict[str, Any]:
    """An ordering type's orderings, each as the toolkit's `{ordering_id}.json` holds it."""
    return {
        "display_name": result.display_name,
        "x_axis_label": result.x_axis_label,
        "orderings": [ordering_json(o) for o in result.orderings],
        "type_metadata": result.type_metadata,
    }
