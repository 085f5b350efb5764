"""After an ADL pass, with a grader: each patchscope's best scale, and per position the strongest
coherent steering strength with samples at it; written into the result and the toolkit's files
(`auto_patch_scope_pos_{p}.pt`, `steering/position_{p}/threshold.json`, `generations.jsonl`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lda.diffing.adl import normalised
from lda.diffing.adl_files import PREFIX, load_vectors, steering_vector

from app.diffing_lens.grading import (
    Grader,
    GraderConfig,
    SteeringSearch,
    find_threshold,
    scaled,
    steered_texts,
)
from app.diffing_lens.steering import Steering


async def grade_adl(
    app: Any, job_id: str, req: Any, run_dir: Path, result: dict[str, Any], transport: Any = None
) -> dict[str, Any]:
    """Grade the result in place (and on disk); returns it."""
    body = req.grader
    grader = Grader(GraderConfig(body.base_url, body.model, body.api_key), transport=transport)
    try:
        await _patchscopes(grader, run_dir, req.dataset_name, result)
        await _steering(app, grader, job_id, req, run_dir, result)
    finally:
        await grader.close()
    result["grader"] = {"base_url": body.base_url, "model": body.model, "calls": grader.calls}
    return result


async def _patchscopes(grader: Grader, run_dir: Path, dataset: str, result: dict[str, Any]) -> None:
    for layer in result["layers"]:
        folder = run_dir / f"layer_{layer['layer']}" / dataset
        for entry in layer["positions"]:
            for name, scales in entry.get("patchscope", {}).items():
                if not scales:
                    continue
                best = await grader.best_scale(scales)
                entry.setdefault("patchscope_best", {})[name] = best
                if best is not None:  # the toolkit's record of the auto patchscope
                    torch.save(best | {"normalized": True}, folder / f"{PREFIX[name]}auto_patch_scope_pos_{entry['position']}.pt")


async def _steering(app: Any, grader: Grader, job_id: str, req: Any, run_dir: Path, result: dict[str, Any]) -> None:
    search = SteeringSearch(
        prompts=tuple(req.steering_prompts) if req.steering_prompts else SteeringSearch.prompts,
        samples=req.steering_samples,
        max_strength=req.steering_max_strength,
        max_new_tokens=req.steering_max_new_tokens,
    )
    tensors = load_vectors(run_dir)
    for layer in result["layers"]:
        block = layer["layer"]
        for position in req.steering_positions:
            try:
                delta, norm = steering_vector(tensors, block, position)
                unit = Steering(job_id, block, position, 1.0, None, normalised(delta.float(), norm))
            except (KeyError, ValueError):
                continue  # a position the job did not analyse, or a zero difference: nothing to steer
            found = await find_threshold(app, grader, unit, search)
            strength = found["avg_threshold"]
            generations = []
            if req.steering_final_samples:
                for prompt in search.prompts:
                    steered, unsteered = await steered_texts(
                        app, [scaled(unit, strength), scaled(unit, 0.0)], prompt, req.steering_final_samples, search
                    )
                    generations.append({"prompt": prompt, "strength": strength, "layer": block, "position": position,
                                        "steered_samples": steered, "unsteered_samples": unsteered})  # fmt: skip
            folder = run_dir / f"layer_{block}" / req.dataset_name / "steering" / f"position_{position}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "threshold.json").write_text(json.dumps(found, indent=2))
            (folder / "generations.jsonl").write_text("".join(json.dumps(g) + "\n" for g in generations))
            layer.setdefault("steering", []).append({"position": position, **found, "generations": generations})
