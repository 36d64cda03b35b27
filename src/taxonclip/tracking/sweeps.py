"""The MLflow side of a sweep: finding a trial's child run under the sweep's parent run, and
recording a trial that failed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from taxonclip import names
from taxonclip.tracking.runs import Run


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
