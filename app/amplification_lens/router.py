"""Routes of the amplification lens: /adapters, /amplification/*, the toolkit's compile route."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from amplification import AmplificationConfig

from app.amplification_lens.amplifier import Amplifier
from app.amplification_lens.dit_import import import_dit
from app.amplification_lens.jobs import amplification_job
from app.amplification_lens.schemas import AdapterLoadRequest, AmplificationGenerateRequest, CompileRequest
from app.api.deps import AmplifierDep, EngineDep, SettingsDep, check_limits, observe
from app.api.generation import Usage
from app.api.schemas import ERRORS, STREAMING, not_found
from app.api.streaming import run_job, stream_response

router = APIRouter()
MAX_COLUMNS = 16


@router.get("/adapters", responses=ERRORS)
async def list_adapters(amp: AmplifierDep) -> Any:
    return {"adapters": [a.info() for a in amp.registry.list()]}


@router.post("/adapters", status_code=201, responses=ERRORS)
async def load_adapter(req: AdapterLoadRequest, amp: AmplifierDep, engine: EngineDep) -> Any:
    """Load a PEFT LoRA adapter (local directory under an allowed root, or a hub id when allowed), or
    import one of DIT's files (`format`)."""
    if req.format == "peft":
        adapter = await engine.run(lambda job: amp.load_adapter(req.name, req.source, req.replace))
    else:
        adapter = await engine.run(
            lambda job: import_dit(amp, req.name, req.source, req.format, req.index, req.replace)
        )
    return adapter.info()


@router.get("/adapters/{name}", responses=not_found("adapter"))
async def get_adapter(name: str, amp: AmplifierDep) -> Any:
    return amp.registry.get(name).info()


@router.delete("/adapters/{name}", responses=not_found("adapter"))
async def delete_adapter(name: str, amp: AmplifierDep, engine: EngineDep) -> Any:
    adapter = await engine.run(lambda job: amp.delete_adapter(name))
    return {"deleted": adapter.name}


def _config(amp: Amplifier, req: CompileRequest) -> AmplificationConfig:
    config = (
        amp.config_from_dict(req.config)
        if req.config is not None
        else amp.read_config_file(req.config_path or "")
    )
    if req.organism_name is not None or req.variant is not None:
        config = config.substitute(req.organism_name, req.variant)
    return config


@router.post("/amplification/compile", responses=ERRORS)
async def compile_config(req: CompileRequest, amp: AmplifierDep, engine: EngineDep) -> Any:
    """Validate and resolve a config: per-layer, per-module weights, content hash, lora_name."""
    return await engine.run(lambda job: amp.describe(amp.compile(_config(amp, req))))


@router.post("/v1/compile_and_load_amplification", responses=ERRORS)
async def compile_and_load(req: CompileRequest, amp: AmplifierDep, engine: EngineDep) -> Any:
    """The diffing toolkit's route: `{lora_name, lora_path}`; the name then works as a config."""

    def run(job: Any) -> dict[str, str]:
        compiled = amp.compile(_config(amp, req))
        return {"lora_name": compiled.lora_name, "lora_path": str(amp.write_compiled(compiled))}

    return await engine.run(run)


@router.post("/amplification/generate", responses=STREAMING)
async def amplification_generate(
    req: AmplificationGenerateRequest, request: Request, amp: AmplifierDep, settings: SettingsDep
) -> Any:
    """Prompts x columns (base, plain adapters, each config) side by side, same seeds per column."""
    t0 = time.perf_counter()
    columns = len(req.configs) + int(req.include_base)
    if columns > MAX_COLUMNS:
        raise ValueError(f"too many columns: {columns}, the limit is {MAX_COLUMNS}")
    check_limits(settings, req, len(req.prompt_list) * req.n * max(columns, 1), what="prompts x n x columns")
    usage = Usage()
    job_fn = amplification_job(amp, req, usage, settings.max_batch_tokens)
    if req.stream:
        return stream_response(request, job_fn, t0, usage, "/amplification/generate")
    body = await run_job(request, job_fn)
    observe(request, "/amplification/generate", t0, usage)
    return body
