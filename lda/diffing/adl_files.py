"""ADL's results on disk: the toolkit's layout (its dashboard and ADLAgent read it) and one
safetensors file of every vector, which steering loads.

Layout under the run folder, as the toolkit's `activation_difference_lens/` writes it:
`model_norms_{ds}.pt`, and per layer `layer_{L}/{ds}/`: `mean_pos_{p}.pt` (+ `.meta`),
`base_mean_pos_{p}.pt`, `ft_mean_pos_{p}.pt`, `logit_lens_pos_{p}.pt` (top-k probs, ids, inverse
probs, ids; `base_`/`ft_` variants) and `auto_patch_scope_pos_{p}.pt` where the patchscope ran
(without the grader suffix its agent tools fail to find).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lda.diffing.adl import VECTORS, ADLPass

VECTORS_FILE = "vectors.safetensors"
PREFIX = {"delta": "", "mean_before": "base_", "mean_after": "ft_"}


def vector_key(layer: int, name: str) -> str:
    return f"layer_{layer}.{name}"


def write_adl(adl: ADLPass, run_dir: Path, dataset: str, metadata: dict[str, Any]) -> dict[str, Any]:
    """Write every file; return the result (per layer: norms and per-position readings)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run_metadata.json").write_text(json.dumps(metadata, indent=2))
    tensors: dict[str, torch.Tensor] = {}
    # The toolkit's loader reads norms["ft_model_norms"][layer] as a tensor.
    norms: dict[str, dict[int, torch.Tensor]] = {"base_model_norms": {}, "ft_model_norms": {}}
    layers = []
    for layer in adl.config.layers:
        vec = adl.vectors(layer)
        norms["base_model_norms"][layer] = torch.tensor(vec["norm_before"])
        norms["ft_model_norms"][layer] = torch.tensor(vec["norm_after"])
        for name in VECTORS:
            tensors[vector_key(layer, name)] = vec[name].contiguous().cpu()
        tensors[f"layer_{layer}.norms"] = torch.tensor([vec["norm_before"], vec["norm_after"]])
        readings = adl.readings(layer)
        _write_layer(run_dir / f"layer_{layer}" / dataset, adl, vec, readings)
        layers.append(
            {"layer": layer, "norm_before": vec["norm_before"], "norm_after": vec["norm_after"], "positions": readings}
        )
    tensors["labels"] = torch.tensor(adl.config.labels)
    tensors["counts"] = adl.means.counts.cpu()
    save_file(tensors, str(run_dir / VECTORS_FILE))
    torch.save(norms, run_dir / f"model_norms_{dataset}.pt")
    return {"dataset_name": dataset, "num_samples": adl.samples, "labels": list(adl.config.labels), "layers": layers}


def _write_layer(folder: Path, adl: ADLPass, vec: dict[str, Any], readings: list[dict[str, Any]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index, entry in enumerate(readings):
        p = entry["position"]
        for name in VECTORS:
            prefix = PREFIX[name]
            torch.save(vec[name][index].clone(), folder / f"{prefix}mean_pos_{p}.pt")
            lens = entry["logit_lens"][name]
            torch.save(
                (
                    torch.tensor([t["prob"] for t in lens["pos"]]),
                    torch.tensor([t["token_id"] for t in lens["pos"]]),
                    torch.tensor([t["prob"] for t in lens["neg"]]),
                    torch.tensor([t["token_id"] for t in lens["neg"]]),
                ),
                folder / f"{prefix}logit_lens_pos_{p}.pt",
            )
            if "patchscope" in entry:
                torch.save(
                    {"scales": entry["patchscope"][name], "normalized": True},
                    folder / f"{prefix}auto_patch_scope_pos_{p}.pt",
                )
        meta = {"count": entry["count"], "activation_dim": int(vec["delta"].shape[-1]), "position": p}
        (folder / f"mean_pos_{p}.meta").write_text(json.dumps(meta))


def load_vectors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / VECTORS_FILE))


def steering_vector(
    tensors: dict[str, torch.Tensor], layer: int, position: int, kind: str = "delta"
) -> tuple[torch.Tensor, float]:
    """The vector at (layer, position label) and the after model's mean norm there.

    Raises:
        KeyError: the job has no such layer ("layer") or position ("position").
    """
    key = vector_key(layer, kind)
    if key not in tensors:
        raise KeyError("layer")
    labels = tensors["labels"].tolist()
    if position not in labels:
        raise KeyError("position")
    return tensors[key][labels.index(position)], float(tensors[f"layer_{layer}.norms"][1])
