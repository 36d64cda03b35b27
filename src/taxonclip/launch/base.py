"""What every launcher is given (a Job) and what it does with it (the Launcher interface)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from taxonclip.launch.options import LaunchConfig


@dataclass(frozen=True)
class Job:
    """One `taxonclip` command to run somewhere.

    `argv` is the command line after `taxonclip` (`train --epochs 2 ...`), without the launch
    options; `run_id` the MLflow run it logs to, made before submitting (None for commands that
    make their own runs, as a sweep does per worker); `distributed`: one torchrun per node;
    `requeue`: the job requeues itself on SLURM's warning signal and resumes into `run_id`;
    `then`: a command run once every task of the job has succeeded (merging a caption array's
    parts); `env`: variables the job needs besides the submitting environment (never secrets)."""

    argv: tuple[str, ...]
    name: str
    launch: LaunchConfig
    run_id: str | None = None
    experiment_id: str | None = None
    distributed: bool = False
    requeue: bool = False
    then: tuple[str, ...] | None = None
    env: dict[str, str] = field(default_factory=dict)


class Launcher(Protocol):
    """Runs a Job: `check` refuses what cannot run before any MLflow run is made; `launch` runs
    it (or submits it) and returns the command's exit status."""

    def check(self, job: Job) -> None:
        """Raise ConfigError naming what makes `job` impossible to start."""

    def launch(self, job: Job, here: Callable[[], int]) -> int:
        """Run `job`; `here` runs it in this process, as the local launcher does."""
