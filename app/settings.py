"""Process settings, read once from the environment (and `.env` when present)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEMO = "demo"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    model_after_id: str = Field(DEMO, description="post-trained model: local dir, hub id, or 'demo'")
    model_before_id: str = Field(DEMO, description="base model: local dir, hub id, or 'demo'")
    tokenizer_class_after: str | None = Field(
        None, description="tokenizer class override, e.g. LlamaTokenizer"
    )
    tokenizer_class_before: str | None = Field(None, description="tokenizer class override for the base")
    device: str = Field("auto", description="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "fp32", "float16", "fp16", "bfloat16", "bf16"] = Field(
        "auto", description="auto: bf16 where the GPU supports it, else fp16 on a GPU, fp32 on the CPU"
    )
    device_map: str | None = Field(None, description="accelerate device_map (e.g. auto) for large models")
    compile: Literal["auto", "on", "off"] = Field(
        "auto",
        description="decode steps on a static KV cache with one torch.compile'd step (CUDA graphs on a GPU), "
        "compiled before /ready; auto: on when the models are on CUDA, off on the CPU (where the compile "
        "costs more than it saves for short runs)",
    )
    trust_remote_code: bool = Field(False, description="run code shipped with a checkpoint")

    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=1, le=65535, description="port")
    port_health: int | None = Field(
        None, ge=1, le=65535, description="extra port answering /ping and /health (RunPod serverless)"
    )
    data_dir: Path = Field(Path("data"), description="demo pair cache, jobs, compiled adapters")
    shutdown_timeout: int = Field(
        30, ge=0, description="seconds SIGTERM waits for in-flight requests before closing them"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")

    adapter_roots: str = Field(
        "", description="comma-separated dirs adapters may load from (DATA_DIR always)"
    )
    adapters: str = Field("", description="adapters to load at start: name=source,name2=source2")
    allow_hub_adapters: bool = Field(
        False, description="let requests load adapters by hub id (downloads with the server's HF_TOKEN)"
    )
    max_adapter_bytes: int = Field(
        2 * 1024**3, ge=1, description="largest adapter weights file read from disk or downloaded, in bytes"
    )
    max_adapters: int = Field(64, ge=1, description="adapters registered by name (ref_* adapters not counted)")
    organisms_dir: Path | None = Field(None, description="toolkit configs folder with organism/ and model/")
    config_roots: str = Field("", description="comma-separated dirs config_path may read (DATA_DIR always)")

    api_key: str = Field("", description="comma-separated keys; when set, routes need a Bearer key")
    metrics_public: bool = Field(False, description="serve /metrics without a key")
    cors_origins: str = Field("", description="comma-separated allowed CORS origins (none = CORS off)")

    max_new_tokens_limit: int = Field(1024, ge=1, description="largest max_new_tokens a request may ask")
    max_rows_per_request: int = Field(1024, ge=1, description="prompts x alphas x n per request")
    max_batch_rows: int = Field(
        256, ge=1, description="rows decoding together in a running batch (requests join at step boundaries)"
    )
    max_batch_tokens: int = Field(
        64 * 2048,
        ge=1,
        description="tokens one decode batch may hold, rows x (longest prompt + max_new_tokens), "
        "the running batch as a whole and each request; larger requests run in chunks of this size",
    )
    max_prefill_tokens: int = Field(
        4096,
        ge=1,
        description="prompt tokens prefilled between two decode steps while rows decode (at least one "
        "request joins per step), so a flood of new requests cannot stall the running batch",
    )
    max_stop_strings: int = Field(16, ge=0, description="stop strings per request")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="largest request body (413 above)")
    max_concurrent_streams: int = Field(16, ge=1, description="open SSE streams at once (429 above)")
    max_weightdiff_tasks: int = Field(64, ge=1, description="tasks per weight-diff job")
    max_weightdiff_samples: int = Field(4096, ge=1, description="text samples per weight-diff job, all tasks")
    max_weightdiff_steps: int = Field(
        100_000, ge=1, description="optimizer steps per weight-diff job (`steps`, or epochs x batches)"
    )
    max_weightdiff_jobs: int = Field(
        256, ge=1, description="weight-diff jobs kept on disk; a new job beyond it is refused (409)"
    )
    max_dit_pairs: int = Field(
        4096,
        ge=1,
        description="(diff, description) pairs per interpreter job (test pairs included) or /dit/evaluate",
    )
    max_describe_diffs: int = Field(
        256,
        ge=1,
        description="diffs per /dit/describe; also the rows of one interpreter forward (a job's batch_size, "
        "evaluate's chunks, diffs x candidates when scoring)",
    )
    max_config_bytes: int = Field(
        256 * 1024, ge=1024, description="largest amplification config (inline or file), in bytes"
    )
    max_compiled_configs: int = Field(
        256, ge=1, description="compiled amplification configs kept in memory (least recently used dropped)"
    )
    max_reference_adapters: int = Field(
        8, ge=1, description="adapters configs name by path or hub id (ref_*), least recently used unloaded"
    )
    queue_size: int = Field(32, ge=1, description="requests waiting for the engine before 429")
    max_experiment_samples: int = Field(
        100_000, ge=1, description="samples per experiment: conditions x prompts x n"
    )
    max_diffing_rows: int = Field(
        100_000, ge=1, description="texts a diffing job may read (and samples it may keep)"
    )
    experiment_chunk_size: int = Field(
        64, ge=1, description="experiment samples per engine job; interactive requests run between chunks"
    )
    experiment_isolation: bool = Field(
        False,
        description="decode each experiment chunk in batches of its own, never beside interactive rows, "
        "so its samples do not depend on traffic (needed for exact reproduction in bf16 or on GPUs)",
    )
    allow_hub_datasets: bool = Field(
        False,
        description="let an experiment's `dataset` name a hub id (downloaded); off: local folders "
        "under DATA_DIR or CONFIG_ROOTS only, and no request reaches the network",
    )

    @field_validator("model_after_id", "model_before_id")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        return v.strip() or DEMO

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if (
            v == "auto"
            or v == "cpu"
            or v == "mps"
            or v == "cuda"
            or (v.startswith("cuda:") and v[5:].isdigit())
        ):
            return v
        raise ValueError(f"must be auto, cpu, mps, cuda or cuda:N, got {v!r}")

    @field_validator("adapters")
    @classmethod
    def _adapters(cls, v: str) -> str:
        for item in filter(None, (i.strip() for i in v.split(","))):
            name, sep, source = item.partition("=")
            if not sep or not name.strip() or not source.strip():
                raise ValueError(f"expected name=source pairs separated by commas, got {item!r}")
        return v

    @property
    def startup_adapters(self) -> list[tuple[str, str]]:
        items = filter(None, (i.strip() for i in self.adapters.split(",")))
        return [(n.strip(), s.strip()) for n, _, s in (i.partition("=") for i in items)]

    @property
    def api_keys(self) -> list[str]:
        return [k.strip() for k in self.api_key.split(",") if k.strip()]

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    @property
    def adapter_root_paths(self) -> list[Path]:
        return [self.data_dir, *(Path(p.strip()) for p in self.adapter_roots.split(",") if p.strip())]

    @property
    def config_root_paths(self) -> list[Path]:
        return [self.data_dir, *(Path(p.strip()) for p in self.config_roots.split(",") if p.strip())]

    @property
    def demo(self) -> bool:
        return self.model_after_id == DEMO and self.model_before_id == DEMO


@lru_cache
def get_settings() -> Settings:
    return Settings()


def describe_error(exc: ValidationError) -> str:
    """One line naming each bad variable, for the start-up message."""
    parts = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"]).upper() or "settings"
        parts.append(f"{name}={err.get('input')!r}: {err['msg']}")
    return "invalid settings: " + "; ".join(parts)
