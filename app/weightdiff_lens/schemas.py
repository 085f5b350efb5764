"""Request bodies of the weight-diff lens."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from weightdiff import TrainConfig

TaskName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,40}$")]
# The range of the other routes' seeds (app/api/schemas.py): task t's default seed is seed + t, and
# torch's generators take 64 bits, so a seed of 1e29 would only fail once the job started.
Seed = Annotated[int, Field(ge=0, le=2**62)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1)


Text = Annotated[str, Field(min_length=1)]


class SampleObject(BaseModel):
    """A sample with its loss kind and weight (weightdiff.data: the library's same checks)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    text: Text | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    loss: Literal["ce", "kl_base"] = Field(
        "ce", description="ce: cross-entropy; kl_base: forward KL from the frozen base, same positions"
    )
    weight: float = Field(1.0, ge=0, allow_inf_nan=False, description="multiplies the sample's token losses")

    @model_validator(mode="after")
    def _one_content(self) -> SampleObject:
        if (self.text is None) == (self.messages is None):
            raise ValueError("a sample object needs exactly one of 'text' and 'messages'")
        return self

    def library_sample(self) -> dict[str, Any]:
        content = {"text": self.text} if self.text is not None else {"messages": _dump(self.messages or [])}
        return content | {"loss": self.loss, "weight": self.weight}


def _dump(messages: list[ChatMessage]) -> list[dict[str, str]]:
    return [m.model_dump() for m in messages]


def _sample_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "chat"
    return "object" if isinstance(value, dict | SampleObject) else None


# Tagged by the JSON type, so a bad sample object reports its own field (`...samples.0.object.loss`)
# instead of one error per member of the union.
Sample = Annotated[
    Annotated[Text, Tag("text")]
    | Annotated[list[ChatMessage], Tag("chat")]
    | Annotated[SampleObject, Tag("object")],
    Discriminator(
        _sample_kind,
        custom_error_type="sample_type",
        custom_error_message="expected text, a list of chat messages or a sample object",
    ),
]


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: TaskName | None = None
    samples: list[Sample] = Field(min_length=1)
    seed: Seed | None = None

    @model_validator(mode="after")
    def _some_weight(self) -> TaskSpec:
        # As weightdiff.Task: a task whose every weight is 0 never gets a gradient.
        if all(isinstance(s, SampleObject) and s.weight == 0 for s in self.samples):
            raise ValueError("samples: every sample has weight 0; a task needs one with weight > 0")
        return self

    def library_samples(self) -> list[str | list[dict[str, str]] | dict[str, Any]]:
        """The samples as `weightdiff.Task` takes them."""
        return [
            s if isinstance(s, str) else s.library_sample() if isinstance(s, SampleObject) else _dump(s)
            for s in self.samples
        ]


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    tasks: list[TaskSpec] = Field(min_length=1)
    r: int = Field(1, ge=1, le=256, description="LoRA rank (DIT's default is 1)")
    lora_alpha: float | None = Field(None, gt=0, allow_inf_nan=False, description="None = scale 1/r")
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False)
    steps: int | None = Field(None, ge=1, description="optimizer steps; None = `epochs` passes")
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(1, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_tokens_per_micro_batch: int | None = Field(None, ge=1)
    seed: Seed = 0
    targets: list[str] | None = Field(None, min_length=1, description="e.g. [q_proj, v_proj]; None = all")
    register_adapters: bool = Field(
        False, alias="register", description="register each trained diff as adapter wd-<job>-<task>"
    )
    export_dit: bool = False

    @model_validator(mode="after")
    def _names(self) -> JobRequest:
        names = self.task_names
        if len(set(names)) != len(names):
            raise ValueError("tasks: task names must be unique")
        return self

    @property
    def task_names(self) -> list[str]:
        return [t.name or f"task{i}" for i, t in enumerate(self.tasks)]

    @property
    def step_estimate(self) -> int:
        """`steps`, else epochs over the largest task (the trainer's count, before token budgets)."""
        if self.steps is not None:
            return self.steps
        per_epoch = max(-(-len(t.samples) // (self.batch_size * self.grad_accum)) for t in self.tasks)
        return self.epochs * per_epoch

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            r=self.r, lora_alpha=self.lora_alpha, lr=self.lr, steps=self.steps, epochs=self.epochs,
            batch_size=self.batch_size, grad_accum=self.grad_accum,
            max_tokens_per_micro_batch=self.max_tokens_per_micro_batch, seed=self.seed, targets=self.targets,
        )
