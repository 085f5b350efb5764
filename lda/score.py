"""The log-probabilities of a prompt's own tokens under a lens (OpenAI's `echo` with `logprobs`).

Position t's logprob is that of token t under the distribution the lens gives after tokens
0..t-1; position 0 has none. The distributions are the decode loop's (`logit_diff` of the same
logits, before temperature and truncation), so a prompt scored here and a completion decoded
there agree: the loglikelihood of a continuation under `lda@ALPHA` is the amplified model's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lda.decode import TokenLogprobs, left_pad
from lda.sampling import logit_diff


@torch.no_grad()
def prompt_logprobs(
    source: Any, prompt_ids: Sequence[int], alpha: float = 0.0, top: int = 0, pad_id: int = 0
) -> list[TokenLogprobs | None]:
    """One entry per prompt token, the first None. `source` has `score` (a `ModelSource` or an
    `AdapterSource`); one prompt at a time, as its logits are [T, V] in fp32."""
    if not prompt_ids:
        raise ValueError("a prompt needs at least one token")
    ids, mask, positions = left_pad([prompt_ids], pad_id, source.device)
    after, before = source.score(ids, mask, positions)
    after = after[0, :-1]  # [T-1, V]: position t predicts token t + 1
    before = None if before is None else before[0, :-1]
    alphas = torch.full((after.shape[0],), float(alpha), device=after.device)
    amplified = logit_diff(after, before, alphas)
    targets = torch.tensor(list(prompt_ids[1:]), device=after.device).unsqueeze(-1)  # [T-1, 1]

    def gather(logits: torch.Tensor) -> list[float]:
        return logits.log_softmax(-1).gather(-1, targets).squeeze(-1).tolist()

    amp_lp = amplified.log_softmax(-1)
    chosen = amp_lp.gather(-1, targets).squeeze(-1).tolist()
    after_lp = gather(after)
    before_lp = gather(before) if before is not None else [None] * len(chosen)
    tops: list[tuple[tuple[int, float], ...]] = [()] * len(chosen)
    if top > 0:
        values, ids = torch.topk(amp_lp, min(top, amp_lp.shape[-1]), dim=-1)
        tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    out: list[TokenLogprobs | None] = [None]
    for t, token in enumerate(prompt_ids[1:]):
        out.append(TokenLogprobs(token, after_lp[t], before_lp[t], chosen[t], tops[t]))
    return out
