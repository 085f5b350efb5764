"""Steering references (`"steer": {"adl": JOB, "layer", "position", "strength"}`) resolved into a
vector, and the decode targets that add it to the after model."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lda.diffing.adl import normalised
from lda.diffing.adl_files import VECTORS_FILE, load_vectors, steering_vector
from lda.diffing.inputs import resolve_layer
from lda.steering import SteeredSource

from app.api.generation import BatchTarget
from app.api.schemas import SteerBody
from app.diffing_lens.names import RUN_DIR
from app.lda_lens.jobs import Decoder


@dataclass(frozen=True)
class Steering:
    job: str
    layer: int
    position: int
    strength: float
    random_seed: int | None
    vector: torch.Tensor  # strength x the normalised direction, [d] fp32

    @property
    def key(self) -> tuple[Any, ...]:
        return ("steer", self.job, self.layer, self.position, self.strength, self.random_seed)

    def describe(self) -> dict[str, Any]:
        body = {"adl": self.job, "layer": self.layer, "position": self.position, "strength": self.strength}
        return body | ({"random_seed": self.random_seed} if self.random_seed is not None else {})


def resolve_steer(app: Any, body: SteerBody | dict[str, Any], where: str = "steer") -> Steering:
    """The vector a steer reference names; a ValueError naming the field when it names nothing.

    Reads the job's vectors file: call it off the event loop."""
    if isinstance(body, dict):
        body = SteerBody.model_validate(body)
    store = app.state.diffing_jobs
    record = store.get(body.adl)
    if record is None or record.spec.get("method") != "adl":
        raise ValueError(f"{where}.adl: no ADL job {body.adl!r}")
    if record.status != "done":
        raise ValueError(f"{where}.adl: job {body.adl!r} is {record.status}; steering needs a finished job")
    model = app.state.pair.after.model
    layer = resolve_layer(body.layer, model.config.num_hidden_layers, f"{where}.layer")
    tensors = _vectors(str(store.dir(body.adl) / RUN_DIR / VECTORS_FILE), record.finished)
    try:
        delta, norm = steering_vector(tensors, layer, body.position)
    except KeyError as missing:
        if missing.args[0] == "layer":
            read = [entry["layer"] for entry in record.result.get("layers", [])]
            raise ValueError(f"{where}.layer: the job read no block {layer} (it read blocks {read})") from None
        labels = record.result.get("labels") or [0]
        raise ValueError(
            f"{where}.position: the job analysed no position {body.position} (it has {labels[0]}..{labels[-1]})"
        ) from None
    if body.random_seed is not None:
        delta = torch.randn(delta.shape, generator=torch.Generator().manual_seed(body.random_seed))
    try:
        direction = normalised(delta.float(), norm)
    except ValueError:
        raise ValueError(f"{where}.position: the mean difference there is zero (nothing to steer with)") from None
    return Steering(body.adl, layer, body.position, float(body.strength), body.random_seed, direction * body.strength)


@functools.lru_cache(maxsize=8)
def _vectors(path: str, finished: float | None) -> dict[str, torch.Tensor]:
    """A finished job's vectors, read once: an experiment resolves its steering at every chunk.
    `finished` is part of the key, so a job deleted and made again under the same id is read anew."""
    return load_vectors(Path(path).parent)


def steer_target(pair: Any, steering: Steering, alone: bool = False) -> BatchTarget:
    """Rows steered by one vector share a running batch (the vector is the source's)."""
    after, before, width = pair.after.model, None if alone else pair.before.model, pair.compatibility.shared_width
    key = (*steering.key, id(after), id(before), width)
    return BatchTarget(key, lambda: SteeredSource(after, before, width, steering.layer, steering.vector), pair.after.tokenizer)


def steer_decoder(pair: Any, steering: Steering) -> Callable[[], Decoder]:
    """LDA between the steered after model and the before model (alpha 0: the steered after alone)."""

    def make() -> Decoder:
        models = (pair.after.model, pair.before.model)
        name = f"{pair.after.model_id}+steer({steering.job}@{steering.layer}:{steering.position}x{steering.strength:g})"
        return Decoder(pair.after, steer_target(pair, steering), name, pair.before.model_id, models)

    return make
