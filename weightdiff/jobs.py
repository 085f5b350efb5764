"""Job records now live in `lda.jobs` (one job lifecycle for every kind of long-running work, in
the lowest library). This module stays for importers outside the libraries that still name it."""

from lda.jobs import ACTIVE, FINAL, JobRecord, JobStore, write_json_atomic  # noqa: F401
