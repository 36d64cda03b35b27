"""The local launcher: the command runs in this process, as it always has."""

from __future__ import annotations

from collections.abc import Callable

from taxonclip.errors import ConfigError
from taxonclip.launch.base import Job


class LocalLauncher:
    """Runs the command here; array tasks and SLURM options need a scheduler."""

    def check(self, job: Job) -> None:
        if job.launch.workers > 1:
            raise ConfigError(f"--workers {job.launch.workers} starts array tasks, which need "
                              f"--launcher slurm; here, start one `taxonclip sweep` per worker "
                              f"on a shared storage")

    def launch(self, job: Job, here: Callable[[], int]) -> int:
        return here()
