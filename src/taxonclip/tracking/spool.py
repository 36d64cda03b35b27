"""A run's local spool: what could not reach the tracking server waits on the local disk, in
order, until it can be sent, so that an outage of any length loses nothing.

One folder per run (`$TAXONCLIP_SPOOL/<run_id>`, by default `<cache>/spool/<run_id>`): the queued
calls in `queue.jsonl`, one JSON object a line, and the files they upload under `files/`.
Checkpoints are written into `files/` first and uploaded from there, so a failed upload leaves
its only copy in the spool. The queue lives on disk, not in memory: its size is bounded by the
disk alone. `taxonclip sync <folder>` sends what a spool holds once the server is back.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

from taxonclip.config import cache_dir
from taxonclip.diskio import atomic_path, disk_errors
from taxonclip.errors import TrackingError

SPOOL_ENV = "TAXONCLIP_SPOOL"
RETRY_ENV = "TAXONCLIP_TRACKING_RETRY_S"
RETRY_SECONDS = 15.0  # while the server is away, how long to wait before asking it again
QUEUE_FILE = "queue.jsonl"
FILES = "files"


def spool_root() -> Path:
    """Where the spools of runs live: `$TAXONCLIP_SPOOL`, else `<cache>/spool`."""
    return Path(os.environ.get(SPOOL_ENV) or cache_dir() / "spool")


def retry_seconds() -> float:
    """The wait between two attempts to reach an absent server (`$TAXONCLIP_TRACKING_RETRY_S`)."""
    return float(os.environ.get(RETRY_ENV) or RETRY_SECONDS)


class Spool:
    """The queue of one run's calls that wait for the tracking server."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.retry_at = 0.0  # time.monotonic() before which the server is not asked again

    @classmethod
    def of_run(cls, run_id: str) -> Spool:
        """The spool of run `run_id` under `spool_root()`."""
        return cls(spool_root() / run_id)

    @property
    def queue_file(self) -> Path:
        """The file of the queued calls."""
        return self.folder / QUEUE_FILE

    def pending(self) -> list[dict]:
        """The queued calls, oldest first."""
        if not self.queue_file.exists():
            return []
        lines = self.queue_file.read_text(encoding="utf-8").splitlines()
        calls = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                call = json.loads(line)
            except ValueError as error:
                call = error
            if not isinstance(call, dict) or "call" not in call:
                raise TrackingError(f"{self.queue_file} line {number} is not a queued call (a JSON "
                                    f"object with a 'call'): the spool was damaged or is not a "
                                    f"spool; its calls before that line are intact")
            calls.append(call)
        return calls

    def add(self, call: dict) -> None:
        """Queue one call, on disk before this returns."""
        line = (json.dumps(call) + "\n").encode()
        with disk_errors(self.folder, len(line), "a queued call"):
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(self.queue_file, "ab") as queue:
                held = queue.tell()
                try:
                    queue.write(line)
                    queue.flush()
                    os.fsync(queue.fileno())
                except OSError:
                    queue.truncate(held)  # no half line: the calls before it stay readable
                    raise

    def drop_first(self) -> None:
        """Remove the oldest call (it has been sent), atomically."""
        rest = self.pending()[1:]
        with atomic_path(self.queue_file) as partial:
            partial.write_text("".join(json.dumps(call) + "\n" for call in rest), encoding="utf-8")

    def staging(self, name: str) -> Path:
        """A new path under `files/` for a file that is to be uploaded (a checkpoint)."""
        folder = self.folder / FILES / uuid.uuid4().hex[:12]
        with disk_errors(self.folder, what=name):
            folder.mkdir(parents=True)
        return folder / name

    def write(self, name: str, writer, needed: int | None = None) -> Path:
        """A new file `name` under `files/`, which `writer(path)` writes; whole or not at all: a
        full disk leaves nothing behind and raises a DiskError naming the spool."""
        path = self.staging(name)
        try:
            with atomic_path(path, needed, what=name, where=self.folder) as partial:
                writer(partial)
        except BaseException:
            shutil.rmtree(path.parent, ignore_errors=True)
            raise
        return path
    def kept(self, name: str) -> Path | None:
        """The newest file named `name` still under `files/` (its upload not yet done), if any."""
        found = sorted((self.folder / FILES).glob(f"*/{name}"), key=lambda p: p.stat().st_mtime)
        return found[-1] if found else None

    def keep(self, path: str | Path) -> Path:
        """A copy of `path` under `files/` (the path itself when it is there already), so that a
        queued upload outlives the caller's temporary folder."""
        path = Path(path)
        if self.holds(path):
            return path
        return self.write(path.name, lambda kept: (shutil.copytree if path.is_dir()
                                                   else shutil.copy2)(path, kept),
                          _size_of(path))

    def holds(self, path: str | Path) -> bool:
        """Whether `path` lies under this spool's `files/`."""
        return Path(path).resolve().is_relative_to((self.folder / FILES).resolve())

    def release(self, path: str | Path) -> None:
        """Delete a spooled file once it has been uploaded."""
        path = Path(path)
        if self.holds(path):
            shutil.rmtree(path.parent, ignore_errors=True)

    def waiting(self) -> bool:
        """Whether the server was found away too recently to be asked again."""
        return time.monotonic() < self.retry_at

    def wait_before_retry(self) -> None:
        """Remember that the server is away: ask again after `retry_seconds()`."""
        self.retry_at = time.monotonic() + retry_seconds()

    def remove_if_empty(self) -> None:
        """Delete the spool folder once everything in it has been sent."""
        if not self.pending():
            shutil.rmtree(self.folder, ignore_errors=True)


def _size_of(path: Path) -> int:
    """The bytes of a file, or of the files in a folder."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size
