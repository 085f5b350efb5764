"""Where a run's store goes: a local (or mounted shared) folder, or an object-storage URI that
fsspec can write (s3://, gs://, ...). A URI is staged in a local folder that is uploaded every
SYNC_SECONDS, when the run stops in any way, and downloaded first to resume."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

SYNC_SECONDS = 30.0


def is_uri(out: str) -> bool:
    return "://" in out and not out.startswith("file://")


class Destination:
    def __init__(self, out: str) -> None:
        self.out = out
        self._synced = time.monotonic()
        if not is_uri(out):
            self.local = Path(out.removeprefix("file://")).expanduser()
            self.fs = None
            return
        import fsspec

        self.fs, self.remote = fsspec.core.url_to_fs(out)
        self._tmp = tempfile.TemporaryDirectory(prefix="app-batch-")
        self.local = Path(self._tmp.name)
        if self.fs.exists(self.remote):
            self.fs.get(self.remote.rstrip("/") + "/", str(self.local), recursive=True)

    def sync(self, force: bool = False) -> None:
        """Upload the staged folder (at most every SYNC_SECONDS unless `force`)."""
        if self.fs is None or (not force and time.monotonic() - self._synced < SYNC_SECONDS):
            return
        self.fs.put(str(self.local) + "/", self.remote, recursive=True)
        self._synced = time.monotonic()
