"""Turn settings into a loaded model pair (the embedded demo pair when no ids are given)."""

from __future__ import annotations

import logging

from lda import LDAModelPair, LoadConfig, load_model, load_tokenizer, static
from lda.pair import Side
from lda.source import input_device

from app.demo import DemoPaths, ensure_demo_pair
from app.gpu_probe import check
from app.settings import DEMO, Settings

log = logging.getLogger(__name__)


def load_config(settings: Settings) -> LoadConfig:
    return LoadConfig(
        device=settings.device,
        dtype=settings.dtype,
        device_map=settings.device_map,
        trust_remote_code=settings.trust_remote_code,
    )


def load_pair(settings: Settings) -> tuple[LDAModelPair, DemoPaths | None]:
    """Load both models; `demo` on either side means that side of the embedded demo pair."""
    # Every way the app starts loads here (python -m app, Ray replicas, an ASGI factory): a GPU
    # torch cannot use fails the load with the reason (/health: 503 load_failed) instead of
    # putting the pair on the CPU; otherwise one line says where the pair goes.
    where = check(settings.device)
    if where:
        log.info("device: %s", where)
    after_id, before_id = settings.model_after_id, settings.model_before_id
    paths, demo = {}, None
    if DEMO in (after_id, before_id):
        demo = ensure_demo_pair(settings.data_dir)
        paths = {"after": str(demo.after), "before": str(demo.base)}
    cfg = load_config(settings)
    sides = []
    for name, model_id, tok_cls in (
        ("after", after_id, settings.tokenizer_class_after),
        ("before", before_id, settings.tokenizer_class_before),
    ):
        source = paths[name] if model_id == DEMO else model_id
        label = f"demo/{name}" if model_id == DEMO else model_id
        log.info("loading %s model %s", name, source)
        tokenizer = load_tokenizer(source, tok_cls, settings.trust_remote_code)
        sides.append(Side(label, load_model(source, cfg), tokenizer))
    pair = LDAModelPair(sides[0], sides[1])
    if pair.compatibility.warning:
        log.warning("tokenizer compatibility: %s", pair.compatibility.warning)
    return pair, demo


def compiled_decode(pair: LDAModelPair, settings: Settings) -> None:
    """COMPILE: the process's decode on static caches with a compiled step, warmed up (every row
    bucket of the LDA pair compiled) before the server says it is ready; or eager (`static.use(None)`)."""
    on_cuda = input_device(pair.after.model).type == "cuda"
    if settings.compile == "off" or (settings.compile == "auto" and not on_cuda):
        static.use(None)
        return
    # Trusting: the paired weights are checked after each engine job (`Engine(before_job=...)`),
    # the only code that changes the models, not before every step.
    compiler = static.DecodeCompiler(mode="reduce-overhead" if on_cuda else None, trusting=True)
    static.use(compiler)
    after, before, width = pair.after.model, pair.before.model, pair.compatibility.shared_width
    # Everything that decodes on a static cache, so no request waits on a compile: each model
    # alone (/generate, the OpenAI models; one graph serves both where they share a shape), and
    # with a compatible pair, LDA and the null control (the before model, logits cut to the pair's).
    sets = [((after,), None), ((before,), None)]
    if pair.compatibility.compatible:
        sets = [((after, before), width), *sets, ((before,), width)]
    seconds = compiler.warm_up(sets, settings.max_batch_rows)
    log.info("compiled decode warmed up in %.1f s: %s", seconds, compiler.info())
