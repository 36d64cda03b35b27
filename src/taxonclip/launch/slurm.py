"""The SLURM launcher: a job is a batch script written beside its log, submitted with `sbatch`,
followed with `scontrol show job` (which needs no accounting database, unlike `sacct`).

The script only starts `python -m taxonclip.launch.task <spec>`, which runs the command (one
torchrun per node for a distributed train job), requeues the job on SLURM's warning signal and
ends the MLflow run of a job whose program died. The spec (a JSON file, readable by its owner
only) holds the command line; credentials travel only in the environment sbatch exports.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from taxonclip.errors import ConfigError, TaxonclipError
from taxonclip.launch.base import Job

# JobStates after which a job does not run again (a requeued job goes back to PENDING)
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
         "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT")
POLL_S = 1.0
LOG_TAIL_LINES = 20
# how long `sbatch`, `sinfo` and `scontrol` may take to answer
COMMAND_TIMEOUT_S = 60


class SlurmLauncher:
    """Submits a Job with sbatch; see the module's description."""

    def check(self, job: Job) -> None:
        """sbatch on PATH, and the partition asked for known to the cluster."""
        if shutil.which("sbatch") is None:
            raise ConfigError("--launcher slurm submits with SLURM's `sbatch`, which is not on "
                              "PATH here; run on a login node of the cluster (or --launcher local)")
        partition = job.launch.slurm.partition
        if partition is not None and partition not in partitions():
            raise ConfigError(f"SLURM option 'partition' is {partition!r}, which the cluster "
                              f"does not have; its partitions: {', '.join(partitions()) or 'none'}")

    def launch(self, job: Job, here: Callable[[], int]) -> int:
        submitted = submit(job)
        print(submitted.describe())
        if not job.launch.wait:
            return 0
        return follow(submitted)


def partitions() -> list[str]:
    """The cluster's partition names (sinfo)."""
    listed = _run(["sinfo", "-h", "-o", "%R"])
    return sorted(set(listed.split()))


@dataclass(frozen=True)
class Submitted:
    """A submitted job: its id, where it logs, the run it logs to, and what follows it."""

    job: Job
    job_id: str
    logs: tuple[Path, ...]
    then_id: str | None = None

    def describe(self) -> str:
        """What the command prints once the job is in the queue."""
        tasks = f"{self.job.launch.workers} tasks, " if self.job.launch.workers > 1 else ""
        kind = "array job" if tasks else "job"
        lines = [f"submitted SLURM {kind} {self.job_id} ({tasks}{self.job.name})",
                 f"its log: {self.logs[0] if len(self.logs) == 1 else _log_pattern(self)}"]
        if self.then_id:
            lines.append(f"then job {self.then_id}: {' '.join(self.job.then or ())}")
        if self.job.run_id:
            experiment = f" (experiment {self.job.experiment_id})" if self.job.experiment_id else ""
            lines.append(f"it logs to MLflow run {self.job.run_id}{experiment}")
        lines.append(f"follow it with: squeue -j {self.job_id}; cancel it with: scancel "
                     f"{self.job_id}")
        return "\n".join(lines)


def _log_pattern(submitted: Submitted) -> str:
    return str(submitted.logs[0]).replace("_0.out", "_<task>.out")


def submit(job: Job) -> Submitted:
    """Write the job's script and spec into the logs folder and sbatch it; a refusal by sbatch
    (a wrong account, a time above the partition's limit) is a ConfigError with sbatch's words."""
    folder = Path(job.launch.slurm.logs).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{job.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    spec = folder / f"{stem}.json"
    _write_private(spec, json.dumps(_spec(job)))
    script = folder / f"{stem}.sbatch"
    array = job.launch.workers > 1
    out = folder / (f"{job.name}-%A_%a.out" if array else f"{job.name}-%j.out")
    script.write_text(batch_script(job, spec, out))
    job_id = _run(["sbatch", "--parsable", str(script)]).strip().split(";")[0]
    logs = tuple(Path(str(out).replace("%A", job_id).replace("%a", str(task))
                      .replace("%j", job_id)) for task in range(job.launch.workers))
    then_id = None
    if job.then:
        then_id = _submit_then(job, folder, stem, job_id)
    return Submitted(job, job_id, logs, then_id)


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner reads: the command line may hold a storage URL."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)


def _spec(job: Job) -> dict:
    return {"argv": list(job.argv), "python": sys.executable, "run_id": job.run_id,
            "distributed": job.distributed, "requeue": job.requeue,
            "nodes": job.launch.slurm.nodes, "gpus_per_node": job.launch.slurm.gpus_per_node,
            "rdzv_port": job.launch.slurm.rdzv_port, "env": job.env}


def sbatch_options(job: Job, out: Path) -> list[str]:
    """The `#SBATCH` options of a job: what it asks for, its log, its signal and requeue."""
    options = job.launch.slurm
    lines = [f"--job-name={job.name}", f"--output={out}", "--open-mode=append",
             f"--nodes={options.nodes if job.distributed else 1}", "--ntasks-per-node=1"]
    for name in ("partition", "time", "account", "qos", "constraint", "mem"):
        value = getattr(options, name)
        if value is not None:
            lines.append(f"--{name}={value}")
    if options.cpus_per_task is not None:
        lines.append(f"--cpus-per-task={options.cpus_per_task}")
    if options.gpus_per_node:
        lines.append(f"--gpus-per-node={options.gpus_per_node}")
    if job.launch.workers > 1:
        lines.append(f"--array=0-{job.launch.workers - 1}")
    if job.requeue:
        # B: the batch shell (the task runner) alone gets the warning; it requeues the job
        lines += ["--requeue", f"--signal=B:USR1@{options.signal_s}"]
    else:
        lines.append("--no-requeue")
    return lines


def batch_script(job: Job, spec: Path, out: Path) -> str:
    """The batch script: its options, then the task runner in place of the shell."""
    head = "\n".join(f"#SBATCH {line}" for line in sbatch_options(job, out))
    runner = shlex.join([sys.executable, "-m", "taxonclip.launch.task", str(spec)])
    return f"#!/bin/bash\n{head}\n# taxonclip {shlex.join(job.argv)}\nexec {runner}\n"


def _submit_then(job: Job, folder: Path, stem: str, after: str) -> str:
    follow_up = Job(argv=job.then or (), name=f"{job.name}-then",
                    launch=_single(job.launch), env=job.env)
    spec = folder / f"{stem}-then.json"
    _write_private(spec, json.dumps(_spec(follow_up)))
    script = folder / f"{stem}-then.sbatch"
    script.write_text(batch_script(follow_up, spec, folder / f"{follow_up.name}-%j.out"))
    return _run(["sbatch", "--parsable", f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes",
                 str(script)]).strip().split(";")[0]


def _single(launch):
    from dataclasses import replace

    return replace(launch, workers=1, wait=False)


def _run(command: list[str]) -> str:
    """A SLURM command's output; its refusal becomes a ConfigError with its own words."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except FileNotFoundError:
        raise ConfigError(f"SLURM's `{command[0]}` is not on PATH here") from None
    except subprocess.TimeoutExpired:
        raise TaxonclipError(f"`{shlex.join(command)}` did not answer within "
                             f"{COMMAND_TIMEOUT_S} s: is slurmctld up?") from None
    if done.returncode != 0:
        raise ConfigError(f"`{shlex.join(command)}` refused: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def job_states(job_id: str) -> dict[str, tuple[str, str]] | None:
    """Each task's (JobState, ExitCode) of job `job_id` from `scontrol show job`; None once
    slurmctld has forgotten the job (MinJobAge after its end)."""
    done = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True,
                          text=True, timeout=COMMAND_TIMEOUT_S)
    if done.returncode != 0:
        return None
    states = {}
    for line in done.stdout.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        task = fields.get("ArrayTaskId") or ""
        if re.fullmatch(r"\d+", task) or not task:  # "0-1" is the not yet started rest
            states[f"{job_id}_{task}" if task else job_id] = (fields.get("JobState", "UNKNOWN"),
                                                               fields.get("ExitCode", "0:0"))
        else:
            states[f"{job_id}_{task}"] = ("PENDING", "0:0")
    return states


def follow(submitted: Submitted) -> int:
    """Wait for the job (and its follow-up) to end; print how each ended and, for a failure,
    its log's path and last lines. Returns 0 if all succeeded, else the first failure's exit
    status (1 when SLURM gives none)."""
    try:
        status = _follow_one(submitted.job_id, submitted)
        if status == 0 and submitted.then_id:
            status = _follow_one(submitted.then_id, submitted)
    except KeyboardInterrupt:  # the job goes on without us
        print(f"\nstopped following job {submitted.job_id}, which goes on; stop it with: "
              f"scancel {submitted.job_id}", file=sys.stderr)
        return 130
    return status


def _follow_one(job_id: str, submitted: Submitted) -> int:
    last = None
    while True:
        states = job_states(job_id)
        if states is None:
            print(f"job {job_id}: slurmctld no longer knows it; see its log", file=sys.stderr)
            return 1
        shown = sorted({state for state, _ in states.values()})
        if shown != last:
            print(f"job {job_id}: {', '.join(shown)}", flush=True)
            last = shown
        if states and all(state in ENDED for state, _ in states.values()):
            return _report(job_id, states, submitted)
        time.sleep(POLL_S)


def _report(job_id: str, states: dict[str, tuple[str, str]], submitted: Submitted) -> int:
    failed = {task: st for task, st in states.items() if st[0] != "COMPLETED"}
    if not failed:
        print(f"job {job_id} COMPLETED")
        return 0
    if submitted.job.run_id and job_id == submitted.job_id:
        _end_run(submitted.job.run_id, failed)
    codes = []
    for task, (state, code) in sorted(failed.items()):
        log = _log_of(task, submitted)
        print(f"job {task} {state} (exit code {code}); its log: {log}", file=sys.stderr)
        print(_tail(log), file=sys.stderr)
        status = code.split(":")[0]
        codes += [int(status)] if status.isdigit() and int(status) else []
    return codes[0] if codes else 1


def _end_run(run_id: str, failed: dict[str, tuple[str, str]]) -> None:
    """A job cancelled before it started, or killed past its grace, leaves its run RUNNING."""
    from taxonclip.tracking.jobs import end_if_running

    state = next(iter(failed.values()))[0]
    end_if_running(run_id, "KILLED" if state in ("CANCELLED", "TIMEOUT", "PREEMPTED") else "FAILED",
                   f"its SLURM job ended {state}")


def _log_of(task: str, submitted: Submitted) -> Path:
    if "_" in task:
        index = int(task.rsplit("_", 1)[1])
        if index < len(submitted.logs):
            return submitted.logs[index]
    folder = submitted.logs[0].parent
    then = folder / f"{submitted.job.name}-then-{task}.out"
    return then if then.exists() else submitted.logs[0]


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"  ({path} cannot be read here)"
    return "\n".join(f"  | {line}" for line in lines[-LOG_TAIL_LINES:])
