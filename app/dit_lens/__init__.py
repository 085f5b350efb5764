"""The interpreter (DIT) lens: `/dit/jobs`, `/dit/describe`, `/dit/evaluate`."""
