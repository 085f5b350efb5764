"""Batched weight diffs: one LoRA per task, trained T at a time, exported for PEFT or DIT."""

from weightdiff.data import Task
from weightdiff.export import (
    export_dit,
    export_peft,
    from_dit,
    load_dit,
    load_dit_pt,
    peft_config,
    peft_state_dict,
    to_dit,
)
from weightdiff.lora import (
    LoRAFactors,
    MultiTaskLoRALinear,
    bypassed,
    decoder_linears,
    factors_of,
    scaling,
    set_bypass,
    unwrap,
    wrap,
)
from weightdiff.optim import TaskAdam
from weightdiff.train import StepReport, TrainConfig, Trainer, TrainResult, train

__all__ = [
    "LoRAFactors",
    "MultiTaskLoRALinear",
    "StepReport",
    "Task",
    "TaskAdam",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "bypassed",
    "decoder_linears",
    "export_dit",
    "export_peft",
    "factors_of",
    "from_dit",
    "load_dit",
    "load_dit_pt",
    "peft_config",
    "peft_state_dict",
    "scaling",
    "set_bypass",
    "to_dit",
    "train",
    "unwrap",
    "wrap",
]
