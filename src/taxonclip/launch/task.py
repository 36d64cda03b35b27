"""Inside a SLURM job: `python -m taxonclip.launch.task SPEC` runs the job's `taxonclip` command.

- A distributed train job runs `srun` with one task per node, each a torchrun whose c10d
  rendezvous is on the job's first node: every rank joins one process group, and rank 0 logs
  to the one MLflow run.
- The run made at submission is passed as MLFLOW_RUN_ID. After a requeue (SLURM_RESTART_COUNT
  above 0) a train job that had logged its parameters continues with `--resume <run>`: from the
  last checkpoint, into the same run, each step logged once.
- SIGUSR1, which `--signal=B:USR1@<s>` sends before the time limit, requeues the job (SLURM then
  stops it, and starts it again once resources allow). A checkpoint is written at the end of
  every epoch; the epoch in progress is computed again after the restart.
- SIGTERM without a requeue (scancel, the time limit) ends the run KILLED; a program that exits
  with an error before it ended its run leaves the run FAILED.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

GRACE_S = 10.0  # how long the program may take to stop once the job is being stopped


class TaskRunner:
    """One job's program and what becomes of its run when the job is stopped."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.run_id: str | None = spec.get("run_id")
        self.job_id = os.environ.get("SLURM_JOB_ID", "")
        self.restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        self.requeueing = False
        self.child: subprocess.Popen | None = None

    def command(self) -> tuple[list[str], dict[str, str]]:
        """The program to start and its environment."""
        env = {**os.environ, **self.spec.get("env", {})}
        env.pop("MLFLOW_RUN_ID", None)  # one `mlflow run` made for the submission, not the job
        argv = list(self.spec["argv"])
        if self.run_id and self.spec.get("requeue") and self.restarts and self._started():
            argv += ["--resume", self.run_id]
        elif self.run_id:
            env["MLFLOW_RUN_ID"] = self.run_id
        python = self.spec.get("python") or sys.executable
        if not self.spec.get("distributed"):
            return [python, "-m", "taxonclip", *argv], env
        return self._torchrun(python, argv), env

    def _started(self) -> bool:
        from taxonclip.tracking.jobs import has_params

        return has_params(self.run_id)

    def _torchrun(self, python: str, argv: list[str]) -> list[str]:
        nodes = int(self.spec.get("nodes", 1))
        head = _first_node()
        return ["srun", f"--nodes={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                python, "-m", "torch.distributed.run", f"--nnodes={nodes}",
                f"--nproc_per_node={max(1, int(self.spec.get('gpus_per_node', 0)))}",
                "--rdzv_backend=c10d", f"--rdzv_endpoint={head}:{self.spec.get('rdzv_port', 29400)}",
                f"--rdzv_id={self.job_id or 'taxonclip'}", "-m", "taxonclip", *argv]

    def run(self) -> int:
        """Start the program, wait for it, settle its run; returns its exit status."""
        program, env = self.command()
        if self.run_id:  # imported now: a stopped job has seconds to end its run
            import taxonclip.tracking.jobs  # noqa: F401
        print(f"taxonclip job {self.job_id} (restart {self.restarts}): {shlex.join(program)}",
              flush=True)
        signal.signal(signal.SIGUSR1, self._requeue)
        signal.signal(signal.SIGTERM, self._stopped)
        self.child = subprocess.Popen(program, env=env)
        status = self.child.wait()
        if status != 0 and self.run_id and not self.requeueing:
            self._end_run("FAILED", f"its program exited with status {status} in SLURM job "
                                    f"{self.job_id}")
        return status if status >= 0 else 128 - status

    def _requeue(self, signum, frame) -> None:
        """SLURM's warning before the time limit (or a preemption): requeue this job."""
        self.requeueing = True
        print(f"taxonclip job {self.job_id}: signal {signal.Signals(signum).name}: requeueing; "
              f"the run goes on from its last checkpoint", flush=True)
        subprocess.run(["scontrol", "requeue", self.job_id], check=False)

    def _stopped(self, signum, frame) -> None:
        """SIGTERM: the job is being requeued (by us) or cancelled (scancel, the time limit).
        The run is ended first: SLURM kills what is left after KillWait (30 s by default)."""
        if not self.requeueing and self.run_id:
            self._end_run("KILLED", f"its SLURM job {self.job_id} was stopped (scancel or its "
                                    f"time limit)")
        if self.child is not None and self.child.poll() is None:
            self.child.terminate()
            try:
                self.child.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                self.child.kill()
        raise SystemExit(128 + signum)

    def _end_run(self, status: str, reason: str) -> None:
        from taxonclip.tracking.jobs import end_if_running

        try:
            if end_if_running(self.run_id, status, reason):
                print(f"taxonclip job {self.job_id}: MLflow run {self.run_id} ended {status}: "
                      f"{reason}", flush=True)
        except Exception as error:  # the job's own status still says what happened
            print(f"taxonclip job {self.job_id}: could not end run {self.run_id} {status}: "
                  f"{error}", file=sys.stderr, flush=True)


def _first_node() -> str:
    """The address of the job's first node (SLURM's NodeAddr, which is its host name unless the
    cluster says otherwise): where the c10d rendezvous listens."""
    nodes = os.environ.get("SLURM_JOB_NODELIST", "localhost")
    names = _scontrol("show", "hostnames", nodes).split()
    if not names:
        return nodes
    address = re.search(r"\bNodeAddr=(\S+)", _scontrol("-o", "show", "node", names[0]))
    return address.group(1) if address else names[0]


def _scontrol(*args: str) -> str:
    done = subprocess.run(["scontrol", *args], capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else ""


def main(argv: list[str]) -> int:
    """Run the job described by the spec file `argv[0]`."""
    return TaskRunner(json.loads(Path(argv[0]).read_text())).run()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
