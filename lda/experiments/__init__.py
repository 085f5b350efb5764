"""Rare-behaviour hunts: prompts x conditions x n samples, detectors, rates with intervals.

Engine-agnostic: the server supplies a `generate` callback (see `runner.Generate`) and calls
`step` per chunk. No FastAPI import and no torch use here; `report` imports matplotlib only when drawing.
"""

from lda.experiments.detectors import Detectors
from lda.experiments.extrapolate import extrapolate_alpha0
from lda.experiments.prompts import load_dataset_prompts, load_prompts_file, resolve_prompts
from lda.experiments.report import plot_series, report_csv, report_figure, report_png
from lda.experiments.runner import Generate, run, run_chunk, step
from lda.experiments.spec import (
    Condition,
    DetectorSpec,
    ExperimentSpec,
    SampleRef,
    chunks,
    sample_ref,
    samples,
)
from lda.experiments.stats import (
    chi2_sf,
    control_flag,
    rate_ratio,
    summarize,
    tally,
    two_proportion_p,
    wilson,
)
from lda.experiments.store import ExperimentRecord, ExperimentStore, ExperimentStoreError

__all__ = [
    "Condition",
    "DetectorSpec",
    "Detectors",
    "ExperimentRecord",
    "ExperimentSpec",
    "ExperimentStore",
    "ExperimentStoreError",
    "Generate",
    "SampleRef",
    "chi2_sf",
    "chunks",
    "control_flag",
    "extrapolate_alpha0",
    "load_dataset_prompts",
    "load_prompts_file",
    "plot_series",
    "rate_ratio",
    "report_csv",
    "report_figure",
    "report_png",
    "resolve_prompts",
    "run",
    "run_chunk",
    "sample_ref",
    "samples",
    "step",
    "summarize",
    "tally",
    "two_proportion_p",
    "wilson",
]
