"""The weight-diff lens: `/weightdiff/jobs`, batched multi-task LoRA training as background jobs."""
