"""Interpreter (DIT) work on the engine: training jobs step by step, describe, evaluate.

A job's every optimizer step is its own background engine job with the trainer's wrappers
attached only inside it, so generation runs between steps on the plain model. Describe and
evaluate wrap the model inside one engine job and unwrap it before the job ends.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from amplification import AdapterNotFound, LoadedAdapter
from lda.experiments.stats import wilson
from lda.jobs import JobRecord, JobStore
from weightdiff import Diff, Evaluated, Evaluation, InterpreterTrainer, Pair, evaluate, normalise, pairs_loss
from weightdiff.interpret_export import export_interpreter
from weightdiff.interpreter import unwrap_interpreter

from app.amplification_lens.jobs import text_side
from app.api.background import drive_steps, on_engine
from app.dit_lens.schemas import MAX_CANDIDATES, JobRequest, PairSpec

log = logging.getLogger(__name__)
RESULT = "interpreter"  # the key of L's folder in a record's outputs and registered names


def diff_of(adapter: LoadedAdapter) -> Diff:
    """The registry's `(A [r, in], B [out, r])` and scaling as the library's per-row factors."""
    return Diff.from_lora(adapter.factors, adapter.scaling)


def resolve(amp: Any, names: Sequence[str | None], where: str) -> list[Diff | None]:
    """Registered adapters by name (None stays None); one `Diff` object per distinct name.

    Raises:
        ValueError: naming the field, e.g. `pairs[3].diff` (a 422, as the other routes answer an
            unknown adapter named in a body; a 404 is for a resource named in the path).
    """
    seen: dict[str, Diff] = {}
    out: list[Diff | None] = []
    for i, name in enumerate(names):
        if name is not None and name not in seen:
            try:
                seen[name] = diff_of(amp.registry.get(name))
            except AdapterNotFound as exc:
                raise ValueError(f"{where.format(i)}: {exc}") from None
        out.append(None if name is None else seen[name])
    return out


def default_candidates(descriptions: Sequence[str]) -> list[str] | None:
    """The distinct descriptions (a closed set, as DIT's miniature), when 2 to MAX_CANDIDATES."""
    distinct: dict[str, str] = {}
    for d in descriptions:
        distinct.setdefault(normalise(d), d)
    return list(distinct.values()) if 2 <= len(distinct) <= MAX_CANDIDATES else None


def rates(result: Evaluation) -> dict[str, Any]:
    """Exact and candidate accuracy with Wilson 95% intervals (as the experiments report rates)."""
    n, hits, chosen = result.n, result.exact_hits, result.candidate_hits
    return {
        "exact": hits / n,
        "exact_hits": hits,
        "exact_ci": list(wilson(hits, n)),
        "candidate_accuracy": None if chosen is None else chosen / n,
        "candidate_hits": chosen,
        "candidate_accuracy_ci": None if chosen is None else list(wilson(chosen, n)),
    }


def _item(e: Evaluated) -> dict[str, Any]:
    return {"text": e.text, "exact": e.exact, "candidate": e.candidate, "correct": e.correct}


async def evaluate_all(
    engine: Any,
    amp: Any,
    names: Sequence[str | None],
    descriptions: Sequence[str],
    interpreter: Diff,
    diffs: Sequence[Diff | None],
    *,
    candidates: list[str] | None,
    question: str,
    max_new_tokens: int,
    chunk: int,
    background: bool = False,
) -> dict[str, Any]:
    """L (M + W + L) and the baselines no_dit (M + W) and no_diff (M + L) on the same pairs.

    Each condition runs in engine jobs of `chunk` diffs, so other requests go between them; the
    no_diff rows are all alike, so that baseline is one row.
    """
    model, tokenizer = amp.model, text_side(amp.pair).tokenizer
    conditions = {
        "dit": (interpreter, list(diffs)),
        "no_dit": (None, list(diffs)),
        "no_diff": (interpreter, [None] * len(diffs)),
    }
    results: dict[str, Evaluation] = {}
    for key, (interp, rows) in conditions.items():
        items: list[Evaluated] = []
        step = len(rows) if key == "no_diff" else chunk
        for lo in range(0, len(rows), step):
            pairs = list(zip(rows[lo : lo + step], descriptions[lo : lo + step]))

            def run(job: Any, pairs: list[Any] = pairs, interp: Diff | None = interp) -> Evaluation:
                return evaluate(
                    model,
                    tokenizer,
                    pairs,
                    interp,
                    candidates=candidates,
                    question=question,
                    max_new_tokens=max_new_tokens,
                    max_rows=chunk,
                )

            items += (await on_engine(engine, run, background)).items
        results[key] = Evaluation(items, None if not candidates else 1 / len(candidates))
    return {
        "n": len(descriptions),
        "chance": results["dit"].chance,
        "candidates": candidates,
        **rates(results["dit"]),
        "no_dit": rates(results["no_dit"]),
        "no_diff": rates(results["no_diff"]),
        "items": [
            {"diff": name, "description": desc, **_item(d), "no_dit": _item(w), "no_diff": _item(l)}
            for name, desc, d, w, l in zip(
                names, descriptions, results["dit"].items, results["no_dit"].items, results["no_diff"].items
            )
        ],
    }


async def drive(app: Any, record: JobRecord, req: JobRequest, cancel: threading.Event) -> None:
    """Train L step by step (`drive_steps`), then export it, evaluate it on the held-out pairs and
    register it if asked."""
    store: JobStore = app.state.dit_jobs
    engine, amp, settings = app.state.engine, app.state.amplifier, app.state.settings
    model, tokenizer = amp.model, text_side(amp.pair).tokenizer
    train_specs, test_specs = req.split()
    trainer: InterpreterTrainer | None = None
    test: list[Diff | None] = []

    def start(job: Any) -> int:
        nonlocal trainer, test
        diffs = resolve(amp, [p.diff for p in train_specs], "pairs[{}].diff")
        test = resolve(amp, [p.diff for p in test_specs], "test_pairs[{}].diff")
        pairs = [Pair(d, p.description) for d, p in zip(diffs, train_specs)]  # type: ignore[arg-type]
        # Held here the moment it exists: `end` closes it whatever happens next.
        trainer = InterpreterTrainer(model, tokenizer, pairs, req.config())
        trainer.detach()
        record.result = {"train_pairs": len(train_specs), "test_pairs": len(test_specs), "test": None}
        return trainer.total_steps

    def step(job: Any) -> None:
        assert trainer is not None
        trainer.attach()
        try:
            trainer.step()
        finally:
            trainer.detach()
        record.step, record.losses = trainer.steps_done, [trainer.losses]
        record.train_seconds = trainer.seconds

    def done() -> bool:
        assert trainer is not None
        return trainer.done

    async def finish() -> None:  # several engine jobs: the held-out evaluation runs in chunks
        assert trainer is not None
        interpreter = await on_engine(engine, lambda job: trainer.interpreter())
        # Written before the held-out evaluation, so an evaluation that fails never loses L.
        await on_engine(engine, lambda job: export(amp, store, record, req, interpreter))
        if test_specs:
            record.result["test"] = await held_out(engine, amp, req, test_specs, test, interpreter, settings)
        if req.register_adapter:
            await on_engine(engine, lambda job: register(amp, record))

    await drive_steps(
        engine, store, record, cancel,
        start=start, step=step, done=done, finish=finish, end=lambda job: end(trainer, model, record.id),
        kind="interpreter",
    )


async def held_out(
    engine: Any,
    amp: Any,
    req: JobRequest,
    specs: list[PairSpec],
    diffs: list[Diff | None],
    interpreter: Diff,
    settings: Any,
) -> dict[str, Any]:
    """The held-out metrics (L against both baselines) and the held-out loss."""
    descriptions = [p.description for p in specs]
    candidates = req.candidates or default_candidates(descriptions)
    body = await evaluate_all(
        engine,
        amp,
        [p.diff for p in specs],
        descriptions,
        interpreter,
        diffs,
        candidates=candidates,
        question=req.question,
        max_new_tokens=req.max_new_tokens,
        chunk=settings.max_describe_diffs,
        background=True,
    )
    tokenizer = text_side(amp.pair).tokenizer
    pairs = list(zip(diffs, descriptions))

    def loss(job: Any) -> float:
        batch = req.batch_size
        return pairs_loss(amp.model, tokenizer, pairs, interpreter, question=req.question, batch_size=batch)

    body["loss"] = await on_engine(engine, loss)
    return body


def export(amp: Any, store: JobStore, record: JobRecord, req: JobRequest, interpreter: Diff) -> None:
    """Write L: a PEFT dir plus dit.json (and DIT's dit-adapter.pt when asked)."""
    out = export_interpreter(
        interpreter,
        amp.model,
        store.dir(record.id) / "adapter",
        question=req.question,
        dit_adapter=req.export_dit,
        extra={"job": record.id, "steps": record.step},
    )
    record.outputs[RESULT] = str(out)
    store.save(record)


def register(amp: Any, record: JobRecord) -> None:
    """Register L under the job's name (the record is saved when the job is marked done)."""
    name = f"dit-{record.id}"
    amp.load_adapter(name, record.outputs[RESULT], replace=True)
    record.registered[RESULT] = name


def end(trainer: InterpreterTrainer | None, model: Any, job_id: str) -> None:
    """After a job ends, in any way: the model is its plain self again."""
    if trainer is not None:
        trainer.close()
    left = unwrap_interpreter(model)
    if left:  # no step leaves its wrappers attached: this is a bug, but never a broken model
        message = "interpreter job %s left %d wrappers in the model (%s, ...); unwrapped them"
        log.error(message, job_id, len(left), left[0])


def public(record: JobRecord) -> dict[str, Any]:
    """The record as GET shows it: the spec without the pair lists, one loss history, L's links."""
    body = record.public()
    spec = record.spec
    body["spec"] = {k: v for k, v in spec.items() if k not in ("pairs", "test_pairs")} | {
        "num_pairs": len(spec.get("pairs") or []),
        "num_test_pairs": len(spec.get("test_pairs") or []),
    }
    for key in ("task_names", "outputs"):
        body.pop(key, None)
    body["losses"] = record.losses[0] if record.losses else []
    body["adapter"] = f"/dit/jobs/{record.id}/adapter" if RESULT in record.outputs else None
    body["registered"] = record.registered.get(RESULT)
    return body

