"""ADL's LLM-graded steps: the patchscope's best scale, and the steering-threshold search.

The grader is any OpenAI-compatible chat endpoint (`{base_url, model, api_key?}`; this server's
own `/v1` works too). Grader calls run on the event loop (they are network waits, never engine
work); the steered samples they judge are generated on the engine as background jobs, so
interactive requests keep their place.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import httpx

from lda import Row
from lda.diffing.threshold import SearchTrace, search_threshold
from lda.sampling import SamplingParams

from app.api.background import on_engine
from app.api.generation import Usage, in_batches
from app.diffing_lens.steering import Steering, steer_target

# What the toolkit steers with when it looks for the strongest coherent strength.
THRESHOLD_PROMPTS = (
    "Tell me a story?",
    "Give me some ideas for some fun weekend activities.",
    "Why don't you choose a topic of conversation for us?",
)
_COHERENCE = (
    "You judge whether a piece of text written by a language model is coherent: grammatical, "
    "on-topic, and not repeating or degenerating into noise. Its content does not matter, only "
    "whether it reads as coherent language.\n\nText:\n<<<\n{text}\n>>>\n\n"
    "Answer with one word: COHERENT or INCOHERENT."
)
_SCALES = (
    "A vector was decoded at several scales; at each scale these are the tokens it most promotes:\n"
    "{table}\n\nPick the scale whose tokens are the most semantically coherent (sharing a theme, "
    "not noise), and the tokens at that scale that form the theme. Answer with JSON only: "
    '{{"best_scale": <one of the scales>, "tokens": [<tokens from that scale>]}}'
)


@dataclass(frozen=True)
class GraderConfig:
    base_url: str
    model: str
    api_key: str | None = None
    concurrency: int = 8


class Grader:
    """A small client for the chat-completions route of an OpenAI-compatible server."""

    def __init__(self, config: GraderConfig, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self.client = httpx.AsyncClient(
            base_url=config.base_url.rstrip("/"), headers=headers, transport=transport, timeout=120.0
        )
        self.limit = asyncio.Semaphore(config.concurrency)
        self.calls = 0

    async def close(self) -> None:
        await self.client.aclose()

    async def ask(self, prompt: str, max_tokens: int = 200) -> str:
        """The grader's answer; an unreachable or broken grader raises (the job reports it)."""
        body = {"model": self.config.model, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens, "temperature": 0.0}  # fmt: skip
        async with self.limit:
            self.calls += 1
            r = await self.client.post("/chat/completions", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"grader {self.config.base_url}: HTTP {r.status_code}: {r.text[:200]}")
        return str(r.json()["choices"][0]["message"]["content"] or "")

    async def coherent(self, samples: Sequence[str]) -> list[bool | None]:
        """COHERENT -> True, INCOHERENT -> False, anything else -> None (not graded)."""

        async def one(text: str) -> bool | None:
            answer = (await self.ask(_COHERENCE.format(text=text), max_tokens=5)).strip().upper()
            if answer.startswith("INCOHERENT"):
                return False
            return True if answer.startswith("COHERENT") else None

        return list(await asyncio.gather(*(one(s) for s in samples)))

    async def best_scale(self, scales: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
        """{best_scale, tokens} from the grader, or None when its answer names no graded scale."""
        table = "\n".join(f"{s['scale']:g}: {[t['token'] for t in s['tokens']]}" for s in scales)
        answer = await self.ask(_SCALES.format(table=table), max_tokens=300)
        match = re.search(r"\{.*\}", answer, re.S)
        try:
            data = json.loads(match.group(0)) if match else None
            best = float(data["best_scale"])  # type: ignore[index]
        except (ValueError, TypeError, KeyError):
            return None
        at = next((s for s in scales if abs(s["scale"] - best) < 1e-9), None)
        if at is None:
            return None
        tokens = [str(t) for t in data.get("tokens", []) if isinstance(t, str)]
        return {"best_scale": best, "tokens_at_best_scale": [t["token"] for t in at["tokens"]],
                "token_probs": [t["prob"] for t in at["tokens"]], "selected_tokens": tokens}  # fmt: skip


@dataclass(frozen=True)
class SteeringSearch:
    prompts: tuple[str, ...] = THRESHOLD_PROMPTS
    samples: int = 10
    max_strength: float = 100.0
    first_steps: int = 12
    later_steps: int = 6
    batch_steps: int = 3
    pass_percent: float = 75.0
    max_new_tokens: int = 128
    temperature: float = 1.2
    seed: int = 0


async def steered_texts(app: Any, steerings: Sequence[Steering], prompt: str, n: int, search: SteeringSearch) -> list[list[str]]:
    """`n` samples of the steered after model (alpha 0) per steering, on the engine."""
    pair, engine = app.state.pair, app.state.engine
    formatted, ids = pair.prompt_ids(prompt)
    config = pair.decode_config(search.max_new_tokens, SamplingParams(search.temperature, 0, 1.0))

    def run(job: Any) -> Any:
        texts = []
        for steering in steerings:
            rows = [Row(ids, 0.0, search.seed + i) for i in range(n)]
            outputs = yield from in_batches(steer_target(pair, steering, alone=True), rows, config, Usage(), lambda e: None)
            if outputs is None:
                raise RuntimeError("the engine dropped the steered samples (shutting down)")
            texts.append([o.text for o in outputs])
        return texts

    return await on_engine(engine, run)


async def find_threshold(app: Any, grader: Grader, unit: Steering, search: SteeringSearch) -> dict[str, Any]:
    """The toolkit's search: the first prompt in [0, max], the others in [0, 2x the first's result];
    the strength used is the mean of the prompts' thresholds."""
    per_prompt: list[dict[str, Any]] = []
    for i, prompt in enumerate(search.prompts):
        high = search.max_strength if i == 0 else 2.0 * per_prompt[0]["threshold"]
        if high <= 0:
            per_prompt.append({"prompt": prompt, "threshold": 0.0, "steps": []})
            continue

        async def grade(strengths: list[float], prompt: str = prompt) -> list[list[bool | None]]:
            steerings = [scaled(unit, s) for s in strengths]
            texts = await steered_texts(app, steerings, prompt, search.samples, search)
            return list(await asyncio.gather(*(grader.coherent(t) for t in texts)))

        steps = search.first_steps if i == 0 else search.later_steps
        trace: SearchTrace = await search_threshold(grade, 0.0, high, steps, search.batch_steps, search.pass_percent)
        per_prompt.append({"prompt": prompt, "threshold": trace.threshold, "steps": trace.steps})
    mean = sum(p["threshold"] for p in per_prompt) / len(per_prompt)
    return {"thresholds": per_prompt, "avg_threshold": mean}


def scaled(unit: Steering, strength: float) -> Steering:
    """The same direction at another strength (`unit` has strength 1)."""
    return replace(unit, strength=float(strength), vector=unit.vector * float(strength))
