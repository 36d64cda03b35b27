"""The MLflow side of a launched job: the run a batch job will log to is created when the job is
submitted (so that its id can be printed and the job, even requeued, logs into it), and ended
FAILED or KILLED when the job's program died before it could end the run itself."""

from __future__ import annotations

import os

from taxonclip import names
from taxonclip.tracking.connection import connect

UNFINISHED = "RUNNING"


def _client():
    from mlflow.tracking import MlflowClient

    connect()
    return MlflowClient()


def _experiment_id(client) -> str:
    """The experiment `mlflow.start_run` would pick: MLFLOW_EXPERIMENT_ID, MLFLOW_EXPERIMENT_NAME
    (created if new), else the default experiment."""
    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return os.environ["MLFLOW_EXPERIMENT_ID"]
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if not name:
        return "0"
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found is not None else client.create_experiment(name)


def ensure_experiment() -> str:
    """Make and tag the experiment the jobs will log to, if new, and return its id: array tasks
    starting together would otherwise race to create and tag it, and all but one fail."""
    from taxonclip.tracking.experiments import prepare_experiment

    client = _client()
    experiment_id = _experiment_id(client)
    prepare_experiment(client, experiment_id)
    return experiment_id


def create_run(entry: str, run_name: str) -> tuple[str, str]:
    """A new RUNNING run of entry point `entry`; returns (run id, experiment id)."""
    client = _client()
    run = client.create_run(_experiment_id(client), run_name=run_name,
                            tags={names.TAG_ENTRY: entry})
    return run.info.run_id, run.info.experiment_id


def delete_run(run_id: str) -> None:
    """Remove a run made for a job that was never submitted."""
    _client().delete_run(run_id)


def run_status(run_id: str) -> str:
    """The run's status: RUNNING, FINISHED, FAILED or KILLED."""
    return _client().get_run(run_id).info.status


def has_params(run_id: str) -> bool:
    """Whether the run logged its parameters (a train run does so before its first step)."""
    return bool(_client().get_run(run_id).data.params)


def end_if_running(run_id: str, status: str, reason: str) -> bool:
    """End the run `status` (FAILED, KILLED) with `reason` in its note, unless it already ended;
    returns whether it was ended here."""
    client = _client()
    if client.get_run(run_id).info.status != UNFINISHED:
        return False
    client.set_tag(run_id, names.TAG_KILLED_REASON if status == "KILLED" else names.TAG_ERROR,
                   reason)
    client.set_terminated(run_id, status)
    return True
