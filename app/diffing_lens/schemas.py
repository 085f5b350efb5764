"""Bodies of `/diffing/jobs`: the diffing toolkit's methods as jobs on the pair.

Defaults are the toolkit's (`diff_mining`: n 64, 8,192 samples, top-k 100; `kl`: temperature 1;
`sequence_likelihood_ratio`: window 20, step 5); every one is a field, since what its users sweep
is samples, positions and top-k.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.api.errors import UNION_TAGS
from app.api.schemas import LayerRef
from app.experiments_lens.schemas import DatasetSource, Message


class TextDataset(DatasetSource):
    column: str = Field("text", min_length=1, description="a column of strings or chat message lists")


class NmfBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    num_topics: int = Field(3, ge=1, le=50)
    beta: float = Field(2.0, description="2 = Frobenius, 1 = KL divergence (torchnmf's beta)")
    max_iter: int = Field(200, ge=1, le=5000)
    seed: int = Field(42, ge=0, le=2**62, description="NMF's random initialisation")
    mode: Literal["logit_diff_magnitude", "binary_occurrence"] = "logit_diff_magnitude"


class GraderBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    base_url: str = Field(min_length=1, pattern=r"^https?://", description="an OpenAI-compatible base URL ending in /v1, e.g. http://127.0.0.1:8000/v1")
    model: str = Field(min_length=1)
    api_key: str | None = Field(None, description="sent as a Bearer token; never stored with the job")


class JobInputs(BaseModel):
    """What both methods read: texts or chat rows, tokenized as the toolkit does."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field("diffing", min_length=1, max_length=200)
    dataset_name: str = Field(
        "texts", min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._-]+$",
        description="the dataset's name in the toolkit's file layout (`{dataset_name}_global_token_stats.json`)",
    )  # fmt: skip
    texts: list[str | list[Message]] | None = Field(
        None, min_length=1, description="texts, or [user, assistant] chat message lists"
    )
    prompts_file: str | None = Field(
        None, min_length=1, description=".jsonl (prompt or messages) / .csv / .txt under DATA_DIR or CONFIG_ROOTS"
    )
    dataset: TextDataset | None = None
    pre_assistant_k: int = Field(3, ge=0, le=64, description="chat rows: template positions before the answer")

    def source(self) -> dict[str, Any]:
        """`texts` / `prompts_file` / `dataset` as plain JSON for `resolve_prompts`."""
        texts = None
        if self.texts is not None:
            texts = [t if isinstance(t, str) else [m.model_dump() for m in t] for t in self.texts]
        dataset = self.dataset.model_dump(exclude_none=True) if self.dataset is not None else None
        return {"prompts": texts, "prompts_file": self.prompts_file, "dataset": dataset}


class LogitDiffRequest(JobInputs):
    """Logit-diff mining, KL and windowed log-likelihood ratios in one teacher-forced pass."""

    method: Literal["logit_diff"] = Field(description="`logit_diff`: the toolkit's diff_mining + kl")
    max_samples: int = Field(8192, ge=1, description="samples kept at most (after dropping short ones)")
    max_tokens_per_sample: int = Field(
        64, ge=2, le=4096, description="n: exactly the first n tokens of a text (shorter texts are dropped)"
    )
    top_k: int = Field(100, ge=1, description="top-k positive and negative tokens counted per position")
    num_tokens: int | None = Field(
        None, ge=1, le=5000, description="tokens per ordering; default max(100, top_k), as the toolkit"
    )
    batch_size: int = Field(16, ge=1, le=512, description="samples per forward (and per engine step)")
    temperature: float = Field(1.0, gt=0.0, allow_inf_nan=False, description="KL's temperature")
    kl_reverse: bool = Field(False, description="also KL(before ‖ after)")
    examples: int = Field(100, ge=1, le=1000, description="highest-KL samples kept, by max and by mean")
    llr_window: int = Field(20, ge=1, le=4096, description="sequence likelihood ratio window (tokens)")
    llr_step: int = Field(5, ge=1, le=4096)
    llr_top: int = Field(100, ge=0, le=10000, description="highest-ratio windows kept")
    nmf: NmfBody | None = Field(None, description="NMF topics over the top-k positive occurrences (off if null)")
    drop_new_tokens: bool = Field(
        True, description="unequal vocabularies: compare the shared ids (else such a pair is refused)"
    )




class ADLRequest(JobInputs):
    """The activation difference lens: per-position mean differences at a layer, read by the
    logit lens and the patchscope; its vectors steer generation."""

    method: Literal["adl"] = Field(description="`adl`: the toolkit's activation_difference_lens")
    max_samples: int = Field(10000, ge=1, description="samples kept at most (after dropping short ones)")
    max_tokens_per_sample: int = Field(128, ge=1, le=4096, description="n: positions 0..n-1 (chats: -k..n-1)")
    layers: list[LayerRef] = Field([0.5], min_length=1, max_length=64, description="blocks whose output is read")
    batch_size: int = Field(32, ge=1, le=512, description="samples per forward (and per engine step)")
    lens_k: int = Field(100, ge=1, le=5000, description="logit-lens tokens kept per vector and sign")
    patchscope_positions: list[int] = Field(
        [0, 1, 2, 3, 4, 5], max_length=256, description="position labels the patchscope reads (empty: none)"
    )
    intersection_top_k: int = Field(16384, ge=1, description="a token must be in every identity prompt's top-k")
    tokens_k: int = Field(20, ge=1, le=1000, description="patchscope tokens kept per scale")
    grader: GraderBody | None = Field(
        None, description="an OpenAI-compatible chat model that picks the patchscope's scale and grades "
        "steered samples for the steering threshold; without one every scale is returned",
    )  # fmt: skip
    steering_positions: list[int] = Field(
        [0, 1, 2, 3, 4], max_length=64, description="with a grader: positions whose steering threshold is searched"
    )
    steering_prompts: list[str] | None = Field(
        None, min_length=1, max_length=50, description="prompts of the threshold search (default: the toolkit's 3)"
    )
    steering_samples: int = Field(10, ge=1, le=100, description="samples graded per strength")
    steering_max_strength: float = Field(100.0, gt=0, le=10000, allow_inf_nan=False)
    steering_final_samples: int = Field(
        5, ge=0, le=100, description="steered and unsteered samples per prompt at the threshold"
    )
    steering_max_new_tokens: int = Field(128, ge=1, le=4096, description="tokens per graded sample")


DiffingRequest = Annotated[LogitDiffRequest | ADLRequest, Field(discriminator="method")]
UNION_TAGS.update(("logit_diff", "adl"))
