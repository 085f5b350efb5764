"""KL values of a streaming pass, kept on disk, and the toolkit's `kl` statistics over them.

Per-position values (4 bytes each) and per-sample means are appended to two files instead of
held in memory, so a pass over many samples stays flat in RAM and its median and percentiles are
still exact at the end. The statistics are the toolkit's `compute_statistics`: mean, unbiased
std, the lower median (`torch.median`), min, max and linear-interpolated percentiles 25/50/75.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch


def kl_statistics(values: np.ndarray) -> dict[str, float]:
    """The toolkit's KL summary of a flat array (empty -> all zeros)."""
    if values.size == 0:
        return {k: 0.0 for k in ("mean", "std", "median", "min", "max", "percentile_25", "percentile_50", "percentile_75")}
    flat = values.astype(np.float64)
    lower_median = float(np.partition(values, (values.size - 1) // 2)[(values.size - 1) // 2])
    return {
        "mean": float(flat.mean()),
        "std": float(flat.std(ddof=1)) if values.size > 1 else float("nan"),
        "median": lower_median,
        "min": float(values.min()),
        "max": float(values.max()),
        **{f"percentile_{q}": float(np.percentile(values, q)) for q in (25, 50, 75)},
    }


class KLRecorder:
    """Appends per-position KL values and per-sample means to `{prefix}.tokens.f32` / `.samples.f32`."""

    def __init__(self, prefix: Path, fresh: bool = True) -> None:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        self.tokens_path = prefix.with_name(prefix.name + ".tokens.f32")
        self.samples_path = prefix.with_name(prefix.name + ".samples.f32")
        for path in (self.tokens_path, self.samples_path):
            if fresh or not path.exists():
                path.write_bytes(b"")

    def sizes(self) -> tuple[int, int]:
        """Bytes written so far (a checkpoint's mark)."""
        return self.tokens_path.stat().st_size, self.samples_path.stat().st_size

    def restore(self, sizes: tuple[int, int]) -> None:
        """Continue from a checkpoint: what was appended after it (`sizes`) is cut off."""
        for path, size in zip((self.tokens_path, self.samples_path), sizes, strict=True):
            if path.stat().st_size < size:
                raise ValueError(f"{path.name} is shorter than its checkpoint ({path.stat().st_size} < {size} bytes)")
            os.truncate(path, size)

    def add(self, kl: torch.Tensor, valid: torch.Tensor) -> None:
        """`kl` [B, P]; a sample's mean is over its valid positions (0 when it has none, as the toolkit)."""
        kl, valid = kl.float().cpu(), valid.cpu()
        count = valid.sum(dim=1)
        means = (kl * valid).sum(dim=1) / count.clamp(min=1)
        self.append(kl[valid].numpy(), means.numpy())

    def append(self, tokens: np.ndarray, samples: np.ndarray) -> None:
        """Append per-position values and per-sample means (a batch's, or a later block's `values()`)."""
        with open(self.tokens_path, "ab") as f:
            f.write(tokens.astype(np.float32).tobytes())
        with open(self.samples_path, "ab") as f:
            f.write(samples.astype(np.float32).tobytes())

    def values(self) -> tuple[np.ndarray, np.ndarray]:
        """(per-position values, per-sample means) so far, in memory: a partial carries the values,
        since another process cannot read this work folder."""
        return self.tokens(), self.samples()

    def tokens(self) -> np.ndarray:
        return np.fromfile(self.tokens_path, dtype=np.float32)

    def samples(self) -> np.ndarray:
        return np.fromfile(self.samples_path, dtype=np.float32)

    def summary(self, bins: int = 40) -> dict[str, Any]:
        """The toolkit's `{dataset}.json` fields, plus a histogram of the per-position values."""
        tokens, samples = self.tokens(), self.samples()
        counts, edges = np.histogram(tokens, bins=bins) if tokens.size else (np.zeros(0), np.zeros(0))
        return {
            "per_token_statistics": kl_statistics(tokens),
            "mean_per_sample_statistics": kl_statistics(samples),
            "total_tokens_processed": int(tokens.size),
            "total_sequences_processed": int(samples.size),
            "histogram": {"counts": [int(c) for c in counts], "edges": [float(e) for e in edges]},
        }
