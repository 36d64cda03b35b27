"""The MLflow side of a sweep: finding a trial's child run under the sweep's parent run,
recording a trial that failed, the parent's heartbeat, and ending the runs of dead sweeps."""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

from taxonclip import names
from taxonclip.tracking.run_logging import Run


def child_run_id(parent_run_id: str, tags: Mapping[str, str]) -> str | None:
    """The run started under `parent_run_id` that carries every tag of `tags` (one sweep
    trial's), or None. Tag values are matched literally and may not contain quotes."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    clauses = [f"tags.`mlflow.parentRunId` = '{parent_run_id}'"]
    clauses += [f"tags.`{key}` = '{value}'" for key, value in tags.items()]
    runs = client.search_runs([experiment_id], " and ".join(clauses), max_results=1)
    return runs[0].info.run_id if runs else None


def record_failure(parent_run_id: str, tags: Mapping[str, str], params: Mapping[str, Any],
                   error: BaseException) -> str:
    """Record `error` in the run under `parent_run_id` carrying `tags`: `params`, a tag with the
    message (`taxonclip.error`) and the traceback (`error.txt`). When the error came before that
    run started, the run is created, ended FAILED. Returns its id."""
    import traceback

    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    run_id = child_run_id(parent_run_id, tags)
    if run_id is None:
        client = MlflowClient()
        experiment_id = client.get_run(parent_run_id).info.experiment_id
        created = client.create_run(experiment_id, tags={MLFLOW_PARENT_RUN_ID: parent_run_id, **tags})
        run_id = created.info.run_id
        client.set_terminated(run_id, "FAILED")
    run = Run(run_id)
    run.log_params(params)
    run.set_tags({names.TAG_ERROR: f"{type(error).__name__}: {error}"[:5000]})
    run.log_text("".join(traceback.format_exception(error)), names.ERROR_ARTIFACT)
    return run_id


def utc_now() -> str:
    """The time now, as the heartbeat tag holds it (UTC, ISO 8601, whole seconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def heartbeat(run_id: str, interval_s: float) -> Iterator[None]:
    """Set the run's `taxonclip.heartbeat` tag to the time now, then again every `interval_s`
    from a background thread until the block ends: other sweeps of the study take a run whose
    tag went stale for a dead one (see `dead_sweep_runs`)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    client.set_tag(run_id, names.TAG_HEARTBEAT, utc_now())
    stopped = threading.Event()

    def keep_beating() -> None:
        while not stopped.wait(interval_s):
            try:
                client.set_tag(run_id, names.TAG_HEARTBEAT, utc_now())
            except Exception as exc:  # the next beat may get through: other sweeps take this run
                # for dead only after a whole grace period without one
                print(f"warning: the sweep's heartbeat did not reach MLflow: {exc}",
                      file=sys.stderr)

    # A daemon, not joined: a beat stuck on an unreachable server must not hold up the exit, and
    # a late one only tags a run that has ended.
    threading.Thread(target=keep_beating, name="sweep-heartbeat", daemon=True).start()
    try:
        yield
    finally:
        stopped.set()


def dead_sweep_runs(study_name: str, grace_s: float, own_run_id: str | None) -> dict[str, str]:
    """The sweep runs of a study still RUNNING, other than `own_run_id`, whose heartbeat tag is
    older than `grace_s` seconds: {run id: its last heartbeat}. A run without the tag (from before
    heartbeats) is left alone, since nothing tells whether its process lives."""
    import mlflow

    runs = mlflow.search_runs(
        search_all_experiments=True, output_format="list",
        filter_string=f"tags.`{names.TAG_STUDY}` = '{study_name}' and "
                      f"tags.`{names.TAG_ENTRY}` = 'sweep' and attributes.status = 'RUNNING'")
    now = datetime.now(timezone.utc)
    dead = {}
    for run in runs:
        beat = _heartbeat_time(run.data.tags.get(names.TAG_HEARTBEAT))
        if run.info.run_id != own_run_id and beat is not None and \
                now - beat > timedelta(seconds=grace_s):
            dead[run.info.run_id] = run.data.tags[names.TAG_HEARTBEAT]
    return dead


def _heartbeat_time(tag: str | None) -> datetime | None:
    """The time a heartbeat tag holds (UTC unless it names a zone), or None where it holds none."""
    try:
        beat = datetime.fromisoformat(tag) if tag else None
    except ValueError:  # edited by hand: unknown, like a missing tag
        return None
    return beat.replace(tzinfo=beat.tzinfo or timezone.utc) if beat else None


def end_killed(run_id: str, reason: str) -> bool:
    """End a run that a dead process left RUNNING: KILLED, `reason` in its
    `taxonclip.killed_reason` tag. Returns False, changing nothing, where it had ended."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    if client.get_run(run_id).info.status != "RUNNING":
        return False
    client.set_tag(run_id, names.TAG_KILLED_REASON, reason)
    client.set_terminated(run_id, "KILLED")
    return True
