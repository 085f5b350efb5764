"""Request bodies of the interpreter (DIT) lens."""

from __future__ import annotations

import random
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from weightdiff import DEFAULT_QUESTION, InterpreterConfig

from app.api.schemas import FiniteFloat

# A registered adapter's name; an unknown one is a 422 naming the field.
AdapterName = Annotated[str, Field(min_length=1, max_length=128)]
Text = Annotated[str, Field(min_length=1, max_length=4096, pattern=r"\S")]
Seed = Annotated[int, Field(ge=0, le=2**62)]
MAX_CANDIDATES = 64


class PairSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    diff: AdapterName = Field(description="a registered adapter: a weight-diff output, a PEFT dir, an import")
    description: Text = Field(description="what the diff encodes: the answer L should give")


class EvalPairSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    diff: AdapterName | None = Field(description="a registered adapter; null asks with no diff")
    description: Text


class AskFields(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    question: Text = DEFAULT_QUESTION
    max_new_tokens: int = Field(20, ge=0, description="greedy answer length (DIT's evaluation: 20)")
    candidates: list[Text] | None = Field(
        None, min_length=1, max_length=MAX_CANDIDATES, description="answers scored by their log-probability"
    )


class JobRequest(AskFields):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    pairs: list[PairSpec] = Field(min_length=1)
    r: int = Field(16, ge=1, le=256, description="L's rank (DIT's published adapters: 16)")
    lora_alpha: float | None = Field(None, gt=0, allow_inf_nan=False, description="None = scale 1/r")
    lr: float = Field(1e-4, gt=0, allow_inf_nan=False)
    weight_decay: float = Field(0.01, ge=0, allow_inf_nan=False)
    batch_size: int = Field(8, ge=1, description="diffs per step")
    steps: int | None = Field(None, ge=1, description="optimizer steps; None = `epochs` passes")
    epochs: int = Field(1, ge=1)
    seed: Seed = 0
    test_pairs: list[PairSpec] | None = Field(None, min_length=1, description="held-out pairs")
    test_fraction: float | None = Field(None, gt=0, lt=1, description="hold out this share of `pairs`")
    register_adapter: bool = Field(False, alias="register", description="register L as adapter dit-<job>")
    export_dit: bool = Field(False, description="also write DIT's dit-adapter.pt beside the PEFT files")

    @model_validator(mode="after")
    def _one_split(self) -> JobRequest:
        if self.test_pairs is not None and self.test_fraction is not None:
            raise ValueError("test_pairs: give test_pairs or test_fraction, not both")
        if self.test_fraction is not None and self.split()[0] == []:
            raise ValueError("test_fraction: it leaves no pair to train on")
        return self

    def split(self) -> tuple[list[PairSpec], list[PairSpec]]:
        """(train, test): `test_pairs` as given, or a seeded `test_fraction` of `pairs` (at least 1)."""
        if self.test_fraction is None:
            return list(self.pairs), list(self.test_pairs or [])
        order = list(range(len(self.pairs)))
        random.Random(self.seed).shuffle(order)
        held = set(order[: max(1, round(self.test_fraction * len(self.pairs)))])
        return [p for i, p in enumerate(self.pairs) if i not in held], [self.pairs[i] for i in sorted(held)]

    @property
    def step_estimate(self) -> int:
        if self.steps is not None:
            return self.steps
        return self.epochs * -(-len(self.split()[0]) // self.batch_size)

    def config(self) -> InterpreterConfig:
        return InterpreterConfig(
            r=self.r, lora_alpha=self.lora_alpha, lr=self.lr, weight_decay=self.weight_decay,
            batch_size=self.batch_size, epochs=self.epochs, steps=self.steps, seed=self.seed,
            question=self.question,
        )


class DescribeRequest(AskFields):
    dit: AdapterName | None = Field(description="the interpreter L (a registered adapter); null: M + W alone")
    diffs: list[AdapterName | None] = Field(min_length=1, description="one row each; null: no diff (M + L)")
    temperature: FiniteFloat = Field(0.0, ge=0.0, le=100.0, description="0 = greedy")
    seed: Seed | None = Field(None, description="row i samples with seed + i; omitted = random")


class EvaluateRequest(AskFields):
    dit: AdapterName = Field(description="the interpreter L (a registered adapter)")
    pairs: list[EvalPairSpec] = Field(min_length=1)
