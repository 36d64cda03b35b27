"""Sweeps whose process died: a SIGKILLed `taxonclip sweep` leaves its trial and its MLflow runs
RUNNING; the next invocation of the study fails the trial, ends both runs KILLED saying why, and
runs its own trials. A sweep whose heartbeat is fresh (a live worker elsewhere) is left alone."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from taxonclip import names
from taxonclip.config import SweepConfig
from taxonclip.sweep.run import open_study, run_sweep, trial_tags
from taxonclip.sweep.spec import load_sweep
from taxonclip.sweep.storage import GRACE_BEATS, HEARTBEAT_ENV, PARENT_RUN_ATTR, open_storage

pytestmark = pytest.mark.integration

# The tests' heartbeat, in seconds: a killed sweep is found dead GRACE_BEATS beats later.
TEST_BEAT_S = 1
SWEEP = """\
sampler: {type: tpe, seed: 0}
pruner: none
fixed: {model: tiny, epochs: 2, batch_size: 16, workers: 0}
search:
  lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
"""
STUCK_S = 300  # the longest the first sweep may take to start its first trial's run


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def storage(request, tmp_path) -> str:
    """The study's storage: a SQLite file, or the PostgreSQL fixture where it can run."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'optuna.db'}"
    return request.getfixturevalue("postgres")


def _sweep_command(sweep: Path, storage: str, study_name: str, n_trials: int,
                   specimens: Path) -> list[str]:
    return [sys.executable, "-m", "taxonclip", "sweep", "--sweep", str(sweep),
            "--n_trials", str(n_trials), "--storage", storage, "--study_name", study_name,
            "-P", f"data={specimens}"]


def _runs_of(study_name: str) -> tuple[list, list]:
    """(sweep runs, trial runs) of a study, oldest first."""
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.`{names.TAG_STUDY}` = '{study_name}'",
                              order_by=["attributes.start_time ASC"])
    return ([r for r in runs if r.data.tags[names.TAG_ENTRY] == "sweep"],
            [r for r in runs if r.data.tags[names.TAG_ENTRY] == "train"])


def _wait_for_trial_run(study_name: str, number: int, process: subprocess.Popen, log: Path):
    """The RUNNING MLflow run of trial `number`, once the sweep process has started it."""
    deadline = time.monotonic() + STUCK_S
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the sweep ended early:\n{log.read_text()[-3000:]}"
        running = [c for c in _runs_of(study_name)[1] if c.info.status == "RUNNING"
                   and c.data.tags[names.TAG_TRIAL] == str(number)]
        if running:
            return running[0]
        time.sleep(0.2)
    raise AssertionError(f"trial {number} started no run in {STUCK_S} s:\n"
                         f"{log.read_text()[-3000:]}")


def test_rerun_reconciles_a_sigkilled_sweep(tracking, specimens, storage, tmp_path, monkeypatch):
    monkeypatch.setenv(HEARTBEAT_ENV, str(TEST_BEAT_S))
    sweep = tmp_path / "killed.yaml"
    sweep.write_text(textwrap.dedent(SWEEP))
    study_name = f"killed-{storage.partition(':')[0]}"
    log = tmp_path / "killed.log"
    with log.open("w") as out:
        killed = subprocess.Popen(_sweep_command(sweep, storage, study_name, 2, specimens),
                                  cwd=tmp_path, env=os.environ.copy(), stdout=out,
                                  stderr=subprocess.STDOUT)
        try:
            _wait_for_trial_run(study_name, 0, killed, log)
        finally:
            killed.kill()  # SIGKILL: no handler, no `finally` runs in the sweep
            killed.wait(timeout=60)

    study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    assert [(t.number, t.state) for t in study.trials] == [(0, TrialState.RUNNING)]
    time.sleep(GRACE_BEATS * TEST_BEAT_S + 1)  # until its heartbeats are older than the grace
    rerun = subprocess.run(_sweep_command(sweep, storage, study_name, 1, specimens), cwd=tmp_path,
                           env=os.environ.copy(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-4000:]

    study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    assert [(t.number, t.state) for t in study.trials] == [(0, TrialState.FAIL),
                                                           (1, TrialState.COMPLETE)]
    (old, new), children = _runs_of(study_name)
    by_trial = {c.data.tags[names.TAG_TRIAL]: c for c in children}
    for killed_run in (old, by_trial["0"]):
        assert killed_run.info.status == "KILLED"
        reason = killed_run.data.tags[names.TAG_KILLED_REASON]
        assert "stopped sending heartbeats" in reason and new.info.run_id in reason
    assert by_trial["0"].data.tags["mlflow.parentRunId"] == old.info.run_id
    assert new.info.status == "FINISHED" and by_trial["1"].info.status == "FINISHED"
    assert by_trial["1"].data.tags["mlflow.parentRunId"] == new.info.run_id
    assert "trial 0 had lost its process" in rerun.stdout
    assert f"sweep run {old.info.run_id} had sent no heartbeat" in rerun.stdout


def _hours_ago(hours: float) -> str:
    return (datetime.now(timezone.utc) - timedelta(hours=hours)).isoformat(timespec="seconds")


def test_journal_study_fails_the_trials_of_dead_sweeps_only(tracking, specimens, tmp_path):
    # A journal file keeps no heartbeat of trials: a RUNNING trial is dead when its sweep is.
    sweep = tmp_path / "journal.yaml"
    sweep.write_text(textwrap.dedent(SWEEP))
    storage, study_name = f"journal:{tmp_path / 'study.log'}", "journal-dead"
    client = MlflowClient()
    experiment = client.get_experiment_by_name("Default").experiment_id

    def sweep_run(last_beat: str) -> str:
        return client.create_run(experiment, tags={
            names.TAG_ENTRY: "sweep", names.TAG_STUDY: study_name,
            names.TAG_HEARTBEAT: last_beat}).info.run_id

    dead, alive = sweep_run(_hours_ago(1)), sweep_run(_hours_ago(0))
    study = open_study(load_sweep(sweep), study_name, storage)
    trial_runs = {}
    for number, parent in enumerate((dead, alive)):
        trial = study.ask()
        trial.set_user_attr(PARENT_RUN_ATTR, parent)
        trial_runs[number] = client.create_run(experiment, tags={
            "mlflow.parentRunId": parent, **trial_tags(study_name, number)}).info.run_id

    config = SweepConfig(sweep=str(sweep), n_trials=1, study_name=study_name, storage=storage,
                         overrides={"data": str(specimens)})
    study = run_sweep(config)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.RUNNING,
                                               TrialState.COMPLETE]
    for run_id in (dead, trial_runs[0]):
        run = client.get_run(run_id)
        assert run.info.status == "KILLED"
        assert "stopped sending heartbeats" in run.data.tags[names.TAG_KILLED_REASON]
    for run_id in (alive, trial_runs[1]):  # a live worker on another machine
        run = client.get_run(run_id)
        assert run.info.status == "RUNNING" and names.TAG_KILLED_REASON not in run.data.tags
        client.set_terminated(run_id, "FINISHED")
