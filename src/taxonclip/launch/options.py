"""The launch options: where a command runs (`local`, or a SLURM batch job) and what a SLURM
job asks for, read from `--slurm key=value` pairs and profile files."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from taxonclip.config_checks import check_at_least, check_choice, check_positive, check_range
from taxonclip.errors import ConfigError
from taxonclip.params import coerce, described

# Launchers: where a command runs (see taxonclip.launch). local: in this process, as always.
LAUNCHER_NAMES = ("local", "slurm")
# SLURM's time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
_SLURM_TIME = r"\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}"
_SLURM_MEM = r"\d+[KMGT]?"


@dataclass(frozen=True)
class SlurmOptions:
    """What a SLURM job asks for: given as `--slurm key=value` pairs or a profile file (lines of
    the same `key=value`); none leaves a key to the cluster's default."""

    partition: str | None = described(None, "the partition (queue) to run in")
    time: str | None = described(None, "time limit: minutes, HH:MM:SS or D-HH:MM:SS")
    nodes: int = described(1, "nodes of a train job (one torchrun per node); other commands "
                              "run on one")
    gpus_per_node: int = described(0, "GPUs per node; train starts one process per GPU (0: one "
                                      "process per node, on the CPU)")
    cpus_per_task: int | None = described(None, "CPU cores of each task")
    mem: str | None = described(None, "memory per node: 64G, 500M")
    account: str | None = described(None, "the account charged")
    qos: str | None = described(None, "the quality of service")
    constraint: str | None = described(None, "node features the job needs: a100|h100")
    signal_s: int = described(300, "seconds before the time limit at which SLURM signals a "
                                   "train job to requeue itself")
    logs: str = described("slurm-logs", "folder of the job scripts and logs, on a filesystem "
                                        "the nodes share")
    rdzv_port: int = described(29400, "TCP port of the c10d rendezvous on a train job's first node")

    def __post_init__(self) -> None:
        for name in ("partition", "account", "qos", "constraint"):
            value = getattr(self, name)
            if value is not None and (not value.strip() or any(c.isspace() for c in value)):
                raise ConfigError(f"SLURM option {name!r} is {value!r}: give one word")
        if self.time is not None and not re.fullmatch(_SLURM_TIME, self.time):
            raise ConfigError(f"SLURM option 'time' is {self.time!r}; write minutes, HH:MM:SS or "
                              f"D-HH:MM:SS")
        if self.mem is not None and not re.fullmatch(_SLURM_MEM, self.mem):
            raise ConfigError(f"SLURM option 'mem' is {self.mem!r}; write 64G or 500M")
        check_positive("nodes", self.nodes)
        check_at_least("gpus_per_node", self.gpus_per_node, 0)
        if self.cpus_per_task is not None:
            check_positive("cpus_per_task", self.cpus_per_task)
        check_at_least("signal_s", self.signal_s, 0)
        check_range("rdzv_port", self.rdzv_port, 1, 65535)


@dataclass(frozen=True)
class LaunchConfig:
    """Where a command runs, and for SLURM what its job asks for."""

    launcher: str = described("local", "where the command runs: local (here) or slurm (a batch "
                                        "job, submitted with sbatch)", LAUNCHER_NAMES)
    slurm: SlurmOptions = field(default_factory=SlurmOptions)
    wait: bool = described(False, "follow the job to its end and exit with its status")
    workers: int = described(1, "array tasks, each running the command (a sweep's workers, a "
                                "caption job's shares)")

    def __post_init__(self) -> None:
        check_choice("launcher", self.launcher, LAUNCHER_NAMES)
        check_positive("workers", self.workers)


SLURM_OPTION_NAMES = tuple(f.name for f in fields(SlurmOptions))


def slurm_options(pairs: list[str], profile: str | None = None) -> SlurmOptions:
    """SlurmOptions from a profile file (lines of `key=value`, `#` comments) overridden by `--slurm
    key=value` pairs; an unknown key or a malformed pair is refused, naming it and its file."""
    values: dict[str, str] = {}
    lines = [(pair, "--slurm") for pair in pairs]
    if profile:
        lines = [*_profile_lines(Path(profile)), *lines]
    for pair, where in lines:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{where}: {pair!r} is not KEY=VALUE (keys: "
                              f"{', '.join(SLURM_OPTION_NAMES)})")
        key = key.strip().replace("-", "_")
        if key not in SLURM_OPTION_NAMES:
            raise ConfigError(f"{where}: unknown SLURM option {key!r}; known: "
                              f"{', '.join(SLURM_OPTION_NAMES)}")
        values[key] = value.strip()
    return SlurmOptions(**{k: coerce(SlurmOptions, k, v) for k, v in values.items()})


def _profile_lines(path: Path) -> list[tuple[str, str]]:
    """The `key=value` lines of a SLURM profile, each with where it stands (file:line)."""
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"SLURM profile {path}: {err.strerror}") from None
    return [(line.split("#", 1)[0].strip(), f"{path}:{number}")
            for number, line in enumerate(text.splitlines(), 1)
            if line.split("#", 1)[0].strip()]
