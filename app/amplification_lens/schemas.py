"""Request bodies of the amplification lens."""

from __future__ import annotations

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
        min_length=1, description="local directory under an allowed root, or a hub id (ALLOW_HUB_ADAPTERS)"
    )
    replace: bool = False


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
