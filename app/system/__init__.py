"""Routes about the process itself: liveness, readiness, info, metrics."""
