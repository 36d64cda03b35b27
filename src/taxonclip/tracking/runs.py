"""MLflow runs: starting or continuing the run of one entry point, describing it, and ending it
FINISHED, FAILED or KILLED, with what its spool still holds sent or said. What a run logs is
`run_logging.py`'s.

Only rank 0 talks to MLflow: `tracked_run(..., main=False)` yields a `NullRun` whose methods do
nothing, so training code logs unconditionally and stays free of rank checks.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from taxonclip import names
from taxonclip.errors import DiskError, TrackingError
from taxonclip.tracking.connection import connect, redacted_uri, tracking_uri
from taxonclip.tracking.experiments import prepare_experiment
from taxonclip.tracking.run_logging import NullRun, Run
from taxonclip.tracking.spool import Spool


@contextlib.contextmanager
def tracked_run(entry: str, *, main: bool = True, resume_run_id: str | None = None,
                parent_run_id: str | None = None, run_name: str | None = None,
                experiment: str | None = None, tags: Mapping[str, Any] | None = None,
                ) -> Iterator[Run | NullRun]:
    """Start (or continue) the run of one entry point and end it FINISHED, FAILED or KILLED.

    Under `mlflow run` the run it created (`MLFLOW_RUN_ID`) is used; `resume_run_id` continues an
    earlier run instead, and the run `mlflow run` created then says where the work went on;
    `parent_run_id` makes a child run (one per sweep trial).
    """
    if not main:
        yield NullRun()
        return
    import mlflow

    connect()
    if experiment and not os.environ.get("MLFLOW_EXPERIMENT_ID"):
        mlflow.set_experiment(experiment)
    # Taken out of the environment: mlflow.start_run would otherwise resume it as the next run
    # started without a run id, such as a sweep's first trial.
    launched = os.environ.pop("MLFLOW_RUN_ID", None) if parent_run_id is None else None
    run_id = resume_run_id or launched
    try:
        active = mlflow.start_run(run_id=run_id, run_name=run_name, parent_run_id=parent_run_id,
                                  nested=parent_run_id is not None,
                                  tags={k: str(v) for k, v in
                                        {names.TAG_ENTRY: entry, **(tags or {})}.items()})
    except Exception as exc:
        raise TrackingError(f"cannot start or resume the MLflow run {run_id or ''} at "
                            f"{redacted_uri(tracking_uri())}: {exc}") from None
    if launched and launched != active.info.run_id:
        _point_to_resumed(launched, active.info.run_id)
    run = Run(active.info.run_id, info=active.info)
    run.resend()  # what an earlier process of this run left in its spool goes first
    prepare_experiment(run.client, active.info.experiment_id)
    _describe(run, launched_by_mlflow=launched is not None, resumed=resume_run_id is not None)
    if resume_run_id is not None:  # the reason it stopped, once it goes on, is no more
        with contextlib.suppress(Exception):  # MLflow raises where the tag is not set
            run.client.delete_tag(run.run_id, names.TAG_STOPPED_REASON)
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    except (KeyboardInterrupt, RunKilled):
        status = "KILLED"
        raise
    except DiskError as error:
        if entry != "train":
            raise
        status = "RUNNING"  # a training goes on from its last checkpoint once space is freed
        with contextlib.suppress(Exception):  # the store may lie on the full disk too
            run.set_tags({names.TAG_STOPPED_REASON: str(error)})
        raise DiskError(f"{error}; then continue the run with: taxonclip train --resume "
                        f"{run.run_id}") from None
    finally:
        run.end(status)
        _settle_spool(run, raise_error=status == "FINISHED")


def _settle_spool(run: Run, raise_error: bool) -> None:
    """At the end of a run, give an absent server one more chance; if calls still wait, say
    where they are kept and how to send them (an error when the run itself went well)."""
    if not run.queued:
        return
    time.sleep(max(0.0, run.spool.retry_at - time.monotonic()))
    if run.resend():
        return
    message = (f"the tracking server at {redacted_uri(tracking_uri())} is unreachable: "
               f"{run.queued} call(s) of run {run.run_id} (metrics, checkpoints, the model, its "
               f"end) are kept in {run.spool.folder}; once the server is back, send them with: "
               f"taxonclip sync {run.spool.folder}")
    if raise_error:
        raise TrackingError(message)
    print(f"error: {message}", file=sys.stderr)


def sync_spool(folder: Path) -> tuple[str, int]:
    """Send what the spool `folder` (named by its run id) holds; returns the run id and how many
    calls went. TrackingError when there is nothing to send or the server is still away."""
    folder = Path(folder)
    spool = Spool(folder)
    if not spool.pending():
        raise TrackingError(f"{folder} holds no queued calls of a run (a spool folder is named "
                            f"by its run id and holds {spool.queue_file.name})")
    connect()
    run = Run(folder.name, spool)
    count = run.queued
    if not run.resend():
        raise TrackingError(f"the tracking server at {redacted_uri(tracking_uri())} is still "
                            f"unreachable; {run.queued} call(s) wait in {folder}")
    return run.run_id, count


def command_line(argv: list[str] | None = None) -> str:
    """The command that started this process, as a user would type it again (`taxonclip train
    ...` for `python -m taxonclip`), with any password in a URL replaced by `***`."""
    argv = list(sys.argv if argv is None else argv)
    program = Path(argv[0]).name if argv else "taxonclip"
    if program in ("__main__.py", "taxonclip"):
        head = ["taxonclip"]
    elif program.endswith(".py"):
        head = ["python", os.path.relpath(argv[0]) if os.path.isabs(argv[0]) else argv[0]]
    else:
        head = [program]
    return shlex.join(head + [redacted_uri(word) if "@" in word else word for word in argv[1:]])


def _describe(run: Run, launched_by_mlflow: bool, resumed: bool) -> None:
    """Write the command that made the run into its description (the MLflow UI's note); a
    resume adds its own command below the first."""
    how = " (started by `mlflow run`)" if launched_by_mlflow else ""
    line = f"{'Resumed' if resumed else 'Made'} by `{command_line()}`{how} in `{os.getcwd()}`."
    held = run.client.get_run(run.run_id).data.tags.get(names.TAG_NOTE, "") if resumed else ""
    run.set_tags({names.TAG_NOTE: f"{held}\n\n{line}".strip()})


def _point_to_resumed(launched: str, resumed: str) -> None:
    """Tag the run `mlflow run` created for a resume, which stays empty, with the run that goes on."""
    Run(launched).set_tags({names.TAG_RESUMED_INTO: resumed,
                            names.TAG_NOTE: f"This launch resumed run {resumed}: its metrics, "
                                            f"checkpoints and model continue there."})


class RunKilled(Exception):
    """Raised through `tracked_run` to end the run as KILLED (a pruned trial)."""
