"""The activation difference lens (ADL) as one streaming pass, then its readings.

Capture block L's output on both models at the analysed positions and keep per-position sums, so
the mean difference δ_p = mean_i(h_after[i,p] − h_before[i,p]), both means and the mean norms come
out at the end without the toolkit's [N, n, d] activation cache. Then the toolkit's readings of
each vector: the logit lens through the after model's final norm and head (±direction), and the
patchscope on its three identity prompts at its 30 scales.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from lda.blocks import block_hook, capture, final_norm
from lda.diffing.forward import pad_right
from lda.diffing.inputs import Sample, analysed
from lda.diffing.stats import require_same
from lda.source import input_device

# The toolkit's auto-patchscope scales: 0.5..2.0 by 0.1, then 3, 4, 5, 10, 20, then 40..200 by 20.
SCALES: tuple[float, ...] = (
    *(round(0.5 + 0.1 * i, 1) for i in range(16)), 3.0, 4.0, 5.0, 10.0, 20.0, *(float(s) for s in range(40, 201, 20))
)  # fmt: skip
ID_PROMPTS = (
    "man -> man\n1135 -> 1135\nhello -> hello\n?",
    "bear -> bear\n42 -> 42\nblue -> blue\n?",
    "921 -> 921\ntarget -> target\nanna -> anna\n?",
)
# The first positions carry BOS effects; the toolkit's mean norms skip them.
NORM_SKIP = 5
VECTORS = ("delta", "mean_before", "mean_after")


@dataclass(frozen=True)
class ADLConfig:
    layers: tuple[int, ...]
    labels: tuple[int, ...]  # the position label of each analysed position (0..n-1, or -k..n-1 for chats)
    lens_k: int = 100
    patchscope_labels: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
    intersection_top_k: int = 16384
    tokens_k: int = 20


class ActivationMeans:
    """Per-position sums of block outputs for both models (fp64), and the norm sums past NORM_SKIP."""

    def __init__(self, layers: Sequence[int], positions: int, dim: int, device: torch.device) -> None:
        def zeros() -> torch.Tensor:
            return torch.zeros(positions, dim, dtype=torch.float64, device=device)

        self.sums = {layer: {"after": zeros(), "before": zeros()} for layer in layers}
        self.norms = {layer: {"after": 0.0, "before": 0.0} for layer in layers}
        self.counts = torch.zeros(positions, dtype=torch.int64, device=device)
        self.norm_count = 0

    def add(self, layer: int, side: str, hidden: torch.Tensor, valid: torch.Tensor) -> None:
        """`hidden` [B, P, d] at the analysed positions; `valid` [B, P] (rows may analyse fewer)."""
        h = hidden.double() * valid.unsqueeze(-1)
        self.sums[layer][side] += h.sum(dim=0)
        norms = hidden.float().norm(dim=-1) * valid  # fp32 norms, as the toolkit's
        self.norms[layer][side] += float(norms[:, NORM_SKIP:].double().sum())

    def count(self, valid: torch.Tensor) -> None:
        self.counts += valid.sum(dim=0)
        self.norm_count += int(valid[:, NORM_SKIP:].sum())

    def merge(
        self, sums: dict[int, dict[str, torch.Tensor]], norms: dict[int, dict[str, float]], counts: torch.Tensor,
        norm_count: int,
    ) -> None:  # fmt: skip
        """Add a later block's sums: fp64 sums of the same batch sums, only in another order."""
        for layer, sides in self.sums.items():
            for side, total in sides.items():
                total += sums[layer][side].to(total.device)
                self.norms[layer][side] += norms[layer][side]
        self.counts += counts.to(self.counts.device)
        self.norm_count += norm_count

    def means(self, layer: int) -> dict[str, torch.Tensor]:
        """{delta, mean_before, mean_after}: [P, d] fp32 (positions never seen stay zero)."""
        n = self.counts.clamp(min=1).unsqueeze(-1).double()
        after, before = self.sums[layer]["after"] / n, self.sums[layer]["before"] / n
        return {"delta": (after - before).float(), "mean_before": before.float(), "mean_after": after.float()}

    def mean_norm(self, layer: int, side: str) -> float:
        return self.norms[layer][side] / self.norm_count if self.norm_count else float("nan")


def gather(hidden: torch.Tensor, samples: Sequence[Sample], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L, d] -> ([B, width, d] at each sample's analysed positions, valid [B, width])."""
    index, valid = analysed(samples, width)
    index, valid = index.to(hidden.device), valid.to(hidden.device)
    return hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])), valid


@torch.no_grad()
def logit_lens(latent: torch.Tensor, model: Any, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(head(norm(x))) and softmax(head(−norm(x))), [..., V] fp32: the toolkit's logit lens."""
    norm, head = final_norm(model), model.get_output_embeddings()
    normed = norm(latent.to(device=head.weight.device, dtype=head.weight.dtype))
    plus, minus = head(normed).float(), head(-normed).float()
    if width is not None:
        plus, minus = plus[..., :width], minus[..., :width]
    return plus.softmax(dim=-1), minus.softmax(dim=-1)


@torch.no_grad()
def patchscope(
    latent: torch.Tensor,
    model: Any,
    tokenizer: Any,
    layer: int,
    scales: Sequence[float] = SCALES,
    prompts: Sequence[str] = ID_PROMPTS,
    top_k: int = 16384,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token probabilities with block `layer`'s output at each prompt's last token replaced by
    ±s·latent, averaged over the prompts and kept only where a token is in every prompt's top_k.

    Returns (pos, neg), each [len(scales), V] fp32: the toolkit's `patchscope_lens`.
    """
    device = input_device(model)
    signed = torch.tensor([*scales, *(-s for s in scales)], dtype=torch.float32, device=device)
    latents = signed.unsqueeze(1) * latent.to(device=device, dtype=torch.float32).unsqueeze(0)  # [2S, d]
    vocab = model.get_output_embeddings().weight.shape[0]
    top_k = min(top_k, vocab)
    total = torch.zeros(len(signed), vocab, dtype=torch.float32, device=device)
    hits = torch.zeros(len(signed), vocab, dtype=torch.int32, device=device)

    def patch(hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.clone()
        hidden[:, -1] = latents.to(hidden.dtype)
        return hidden

    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=device).expand(len(signed), -1)
        with block_hook(model, layer, patch):
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1].float()
        values, indices = torch.topk(logits.softmax(dim=-1), k=top_k, dim=-1)
        total.scatter_add_(1, indices, values)
        hits.scatter_add_(1, indices, torch.ones_like(indices, dtype=torch.int32))
    if len(prompts) > 1:
        total[hits != len(prompts)] = 0
    total /= len(prompts)
    return total[: len(scales)].cpu(), total[len(scales) :].cpu()


def top_tokens(probs: torch.Tensor, tokenizer: Any, k: int, nonzero: bool = False) -> list[dict[str, Any]]:
    """The k most probable tokens of a [V] distribution as {token, token_id, prob}."""
    if nonzero:
        ids = torch.nonzero(probs > 0).flatten()
        values, order = torch.topk(probs[ids], k=min(k, len(ids)))
        ids = ids[order]
    else:
        values, ids = torch.topk(probs, k=min(k, probs.numel()))
    return [
        {"token": tokenizer.decode([int(i)]), "token_id": int(i), "prob": float(v)}
        for v, i in zip(values.tolist(), ids.tolist())
    ]


def normalised(x: torch.Tensor, target_norm: float) -> torch.Tensor:
    """x scaled to `target_norm` (the after model's mean norm at the layer), as the toolkit steers."""
    n = float(x.norm())
    if n == 0.0:
        raise ValueError("the vector is zero: no direction to scale")
    return x / n * target_norm


class ADLPass:
    """Streaming ADL over one dataset: `add` batches, then `readings` per layer."""

    def __init__(self, pair: Any, config: ADLConfig, width: int) -> None:
        self.pair, self.config, self.width = pair, config, width
        dim = pair.after.model.config.hidden_size
        self.means = ActivationMeans(config.layers, len(config.labels), dim, input_device(pair.after.model))
        self.samples = 0

    @torch.no_grad()
    def add(self, samples: Sequence[Sample]) -> None:
        ids, mask, positions = pad_right(samples, self.pair.after.pad_id)
        width = len(self.config.labels)
        for side, model in (("after", self.pair.after.model), ("before", self.pair.before.model)):
            dev = input_device(model)
            with capture(model, list(self.config.layers)) as seen:
                model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=positions.to(dev),
                      use_cache=False, logits_to_keep=1)  # fmt: skip
            for layer in self.config.layers:
                hidden, valid = gather(seen[layer], samples, width)
                self.means.add(layer, side, hidden.to(self.means.counts.device), valid.to(self.means.counts.device))
        self.means.count(analysed(samples, width)[1].to(self.means.counts.device))
        self.samples += len(samples)

    def state(self) -> dict[str, Any]:
        """A checkpoint of the sums so far (`restore` continues from it)."""
        m = self.means
        return {"sums": m.sums, "norms": m.norms, "counts": m.counts, "norm_count": m.norm_count, "samples": self.samples}

    def restore(self, state: dict[str, Any]) -> None:
        m, device = self.means, self.means.counts.device
        m.sums = {layer: {side: t.to(device) for side, t in sides.items()} for layer, sides in state["sums"].items()}
        m.norms, m.counts, m.norm_count = state["norms"], state["counts"].to(device), state["norm_count"]
        self.samples = state["samples"]

    def partial(self) -> dict[str, Any]:
        """The sums so far as CPU copies, picklable, for a driver's `merge` (one block's reduction)."""
        m = self.means
        return {
            "settings": self._settings(),
            "sums": {layer: {side: t.cpu().clone() for side, t in sides.items()} for layer, sides in m.sums.items()},
            "norms": {layer: dict(sides) for layer, sides in m.norms.items()},
            "counts": m.counts.cpu().clone(),
            "norm_count": m.norm_count,
            "samples": self.samples,
        }

    def merge(self, partial: dict[str, Any]) -> None:
        """Fold in the `partial()` of a pass over the batches after all of this one's: counts add
        exactly, fp64 sums up to another summation order. Another config raises ValueError."""
        require_same(self._settings(), partial["settings"])
        self.means.merge(partial["sums"], partial["norms"], partial["counts"], partial["norm_count"])
        self.samples += partial["samples"]

    def _settings(self) -> dict[str, Any]:
        dim = self.pair.after.model.config.hidden_size
        return {"method": "adl", "width": self.width, "dim": dim, **asdict(self.config)}

    def vectors(self, layer: int) -> dict[str, Any]:
        """The means at `layer`, [P, d] each, and the mean norms."""
        return {
            **self.means.means(layer),
            "norm_before": self.means.mean_norm(layer, "before"),
            "norm_after": self.means.mean_norm(layer, "after"),
            "counts": self.means.counts.cpu(),
        }

    def readings(self, layer: int) -> list[dict[str, Any]]:
        """Per position: counts, norms of δ, the logit lens of each vector, and the patchscope at
        the configured positions (δ and μ_after on the after model, μ_before on the before model)."""
        cfg, tok = self.config, self.pair.after.tokenizer
        vec = self.vectors(layer)
        after, before = self.pair.after.model, self.pair.before.model
        out = []
        for index, label in enumerate(cfg.labels):
            entry: dict[str, Any] = {
                "position": label,
                "count": int(vec["counts"][index]),
                "delta_norm": float(vec["delta"][index].norm()),
                "logit_lens": {},
            }
            for name in VECTORS:
                plus, minus = logit_lens(vec[name][index], after, self.width)
                entry["logit_lens"][name] = {
                    "pos": top_tokens(plus, tok, cfg.lens_k),
                    "neg": top_tokens(minus, tok, cfg.lens_k),
                }
            if label in cfg.patchscope_labels:
                entry["patchscope"] = {
                    name: self._patchscope(vec[name][index], before if name == "mean_before" else after, layer,
                                           vec["norm_after"])
                    for name in VECTORS
                }  # fmt: skip
            out.append(entry)
        return out

    def _patchscope(self, x: torch.Tensor, model: Any, layer: int, norm: float) -> list[dict[str, Any]]:
        tok = self.pair.after.tokenizer
        if float(x.norm()) == 0.0:
            return []
        pos, neg = patchscope(normalised(x, norm), model, tok, layer, top_k=self.config.intersection_top_k)
        return [
            {
                "scale": scale,
                "tokens": top_tokens(pos[i], tok, self.config.tokens_k, nonzero=True),
                "neg_tokens": top_tokens(neg[i], tok, self.config.tokens_k, nonzero=True),
            }
            for i, scale in enumerate(SCALES)
        ]
