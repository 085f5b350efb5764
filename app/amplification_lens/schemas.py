"""Request bodies of the amplification lens."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.api.schemas import PromptFields

ConfigRef = dict | str


class AdapterLoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(
        min_length=1,
        max_length=64,
        description="registry name, [A-Za-z0-9_-]; not a model id, a compiled lora_name or ref_...",
    )
    source: str = Field(
        min_length=1,
        description="local directory under an allowed root, or a hub id (ALLOW_HUB_ADAPTERS); a local "
        ".pt or .safetensors file for the DIT formats",
    )
    replace: bool = False
    format: Literal["peft", "dit_weight_diff", "dit_adapter"] = Field(
        "peft",
        description="peft: a PEFT LoRA directory; dit_weight_diff: item `index` of DIT's weight_diff_*.pt "
        "list (or this service's export_dit file); dit_adapter: DIT's interpreter dit-adapter.pt",
    )
    index: int | None = Field(None, ge=0, description="dit_weight_diff: which diff of the file's list")

    @model_validator(mode="after")
    def _index_only_for_weight_diffs(self) -> AdapterLoadRequest:
        if self.index is not None and self.format != "dit_weight_diff":
            raise ValueError("index: only the dit_weight_diff format takes an index")
        return self


class CompileRequest(BaseModel):
    """The diffing toolkit's compile body."""

    model_config = ConfigDict(extra="forbid")

    config: dict | None = None
    config_path: str | None = None
    organism_name: str | None = None
    variant: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> CompileRequest:
        if (self.config is None) == (self.config_path is None):
            raise ValueError("give exactly one of `config` or `config_path`")
        return self


class AmplificationGenerateRequest(PromptFields):
    configs: list[ConfigRef] = Field(
        default_factory=list, description="config bodies, compiled lora_names or registered adapter names"
    )
    include_base: bool = Field(False, description="add a column for the base model alone")
    include_adapters: bool = Field(False, description="add a column per adapter at weight 1")
    n: int = Field(1, ge=1)
    stream: bool = False

    @model_validator(mode="after")
    def _check(self) -> AmplificationGenerateRequest:
        if not self.configs and not self.include_base:
            raise ValueError("configs: give at least one config (or include_base)")
        return self
