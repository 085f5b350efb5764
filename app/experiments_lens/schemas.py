"""Bodies of the experiments lens. The library (`lda.experiments`) validates the grid itself and
names the bad field; these models give the OpenAPI page its shape and refuse wrong types early."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.api.schemas import FiniteFloat, Prompt, SamplingFields, SteerBody
from app.lda_lens.schemas import Alpha

# What the spec keeps of the sampling fields (the seed is the spec's own field).
SAMPLING_KEYS = tuple(k for k in SamplingFields.model_fields if k != "seed")


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str


class ConditionBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    alpha: Alpha = Field(1.0, description="LDA alpha; 0 = the after model alone")
    adapter: str | None = Field(
        None, min_length=1, description="adapter-mode LDA: after = base + this registered adapter"
    )
    amplification: dict[str, Any] | str | None = Field(
        None, description="adapter-mode LDA with an amplification config (body or compiled lora_name)"
    )
    steer: SteerBody | None = Field(None, description="the after model steered by an ADL job's vector")
    strength: FiniteFloat | None = Field(None, description="the steering strength (overrides steer.strength)")


class DatasetSource(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    path: str = Field(
        min_length=1,
        description="a local dataset folder under DATA_DIR or CONFIG_ROOTS (data files, or a save_to_disk "
        "folder), or a hub id when the server sets ALLOW_HUB_DATASETS",
    )
    split: str = Field("train", min_length=1)
    column: str = Field("prompt", min_length=1, description="a column of strings or chat message lists")
    limit: int | None = Field(None, ge=1, description="the first `limit` rows (the rest is never read)")
    name: str | None = None


class ExperimentRequest(SamplingFields):
    """Prompts x conditions x n samples, scored by detectors; sample i decodes with `seed + i`."""

    name: str = Field("experiment", min_length=1)
    prompts: list[Prompt | list[Message]] | None = Field(
        None, min_length=1, description="prompt strings or chat message lists"
    )
    prompts_file: str | None = Field(
        None, min_length=1, description=".jsonl / .csv / .txt under DATA_DIR or CONFIG_ROOTS"
    )
    dataset: DatasetSource | None = None
    alphas: list[Alpha] | None = Field(None, min_length=1, description="plain LDA conditions (a shortcut)")
    conditions: list[ConditionBody] | None = Field(None, min_length=1)
    control: bool = Field(
        False, description="add a null control (before vs before) at each alpha: rates must not move"
    )
    n: int = Field(1, ge=1, description="samples per prompt and condition")
    detectors: list[dict[str, Any]] = Field(
        min_length=1,
        description='{"name", "type": "substring", "patterns": [...], "case_sensitive"?} or '
        '{"name", "type": "regex", "pattern", "flags"?: "ims"}',
    )
    store: Literal["all", "hits"] = Field("all", description="keep every sample, or only those with a hit")

    @model_validator(mode="after")
    def _one_condition_field(self) -> ExperimentRequest:
        if (self.alphas is None) == (self.conditions is None):
            raise ValueError("give exactly one of `alphas` or `conditions`")
        return self

    def condition_list(self) -> list[dict[str, Any]]:
        """Conditions as the library reads them; controls follow at each distinct alpha."""
        if self.alphas is not None:
            conditions: list[dict[str, Any]] = [{"alpha": a} for a in self.alphas]
        else:
            conditions = [c.model_dump(exclude_none=True) for c in self.conditions or []]
        if self.control:
            alphas = dict.fromkeys(c["alpha"] for c in conditions)
            conditions += [{"alpha": a, "control": True} for a in alphas]
        return conditions

    def prompt_source(self) -> dict[str, Any]:
        """`prompts` / `prompts_file` / `dataset` as plain JSON for `resolve_prompts`."""
        prompts = None
        if self.prompts is not None:
            prompts = [p if isinstance(p, str) else [m.model_dump() for m in p] for p in self.prompts]
        dataset = self.dataset.model_dump(exclude_none=True) if self.dataset is not None else None
        return {"prompts": prompts, "prompts_file": self.prompts_file, "dataset": dataset}

    def sampling(self) -> dict[str, Any]:
        return self.model_dump(include=set(SAMPLING_KEYS))
