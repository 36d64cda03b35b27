"""`--launcher slurm` against a real SLURM cluster (tests/slurm_cluster.py): jobs go through the
real sbatch, scontrol, squeue and scancel, and log to a real MLflow server.

A train job that finishes logs one run; one requeued mid-run by SLURM's warning signal resumes
into the same run with the weights of the uninterrupted one; a 2-task sweep array completes its
trials, none lost or duplicated; an eval job; a failing job tells its log; a cancelled job's run
ends KILLED. These take a minute each on two cores: `pytest -m slurm` (.ci/run) runs them."""

from __future__ import annotations

import re
import subprocess
import textwrap
import time
from collections import Counter

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from taxonclip import names
from taxonclip.cli import main
from taxonclip.config import TrainConfig
from taxonclip.launch.slurm import job_states
from taxonclip.params import TRAIN_PARAMS, from_params
from taxonclip.training.data import steps_per_epoch
from tests.helpers import free_port
from tests.slurm_cluster import PARTITION, slurm_cluster  # noqa: F401 (the fixture)
from tests.test_resume import ARGS, EPOCHS, _assert_record_whole, _final_weights, _steps_per_epoch

pytestmark = [pytest.mark.slurm, pytest.mark.integration]

JOB_TIMEOUT_S = 420


def _submitted(text: str) -> tuple[str, str | None]:
    """The job id and the MLflow run id that a submission printed."""
    job = re.search(r"submitted SLURM (?:array )?job (\d+)", text)
    run = re.search(r"it logs to MLflow run (\w+)", text)
    assert job, text
    return job.group(1), run.group(1) if run else None


def _wait_for(predicate, what: str, seconds: float = JOB_TIMEOUT_S):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"not within {seconds} s: {what}")


def _ended(job_id: str) -> dict:
    states = job_states(job_id)
    return states if states and all(s in ("COMPLETED", "FAILED", "CANCELLED") for s, _ in
                                    states.values()) else None


def _train_argv(specimens) -> list[str]:
    # a rendezvous port of its own: another test's job may still hold the last one
    return ["train", "--launcher", "slurm", "--data", str(specimens), *ARGS,
            "--slurm", f"rdzv_port={free_port()},time=20"]


@pytest.fixture
def at_cluster(slurm_cluster, tracking, tmp_path, monkeypatch):  # noqa: F811
    """A test at the cluster, in its own folder (the jobs' logs land there), logging to the
    session's MLflow server in its own experiment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"slurm-{tmp_path.name}")
    return tmp_path


@pytest.fixture(scope="module")
def uninterrupted_job(slurm_cluster, mlflow_server, specimens, tmp_path_factory):  # noqa: F811
    """A train job run straight through (`--wait`): its exit status, output, run id, weights."""
    folder = tmp_path_factory.mktemp("slurm-train")
    patch = pytest.MonkeyPatch()
    patch.chdir(folder)
    patch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    patch.setenv("MLFLOW_EXPERIMENT_NAME", "slurm-straight")
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        patch.delenv(name, raising=False)
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main([*_train_argv(specimens), "--wait"])
    job_id, run_id = _submitted(out.getvalue())
    weights = _final_weights(run_id, folder / "weights")
    patch.undo()
    return status, out.getvalue(), job_id, run_id, weights


def test_a_train_job_finishes_logging_one_run(uninterrupted_job, mlflow_server, monkeypatch):
    status, output, job_id, run_id, _ = uninterrupted_job
    assert status == 0, output
    assert f"job {job_id} COMPLETED" in output
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("slurm-straight")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert run.data.tags[names.TAG_ENTRY] == "train"
    assert run.data.params["epochs"] == str(EPOCHS)


def test_a_requeued_train_job_resumes_into_its_run(uninterrupted_job, at_cluster, specimens,
                                                   capsys):
    assert main(_train_argv(specimens)) == 0
    job_id, run_id = _submitted(capsys.readouterr().out)
    client = MlflowClient()

    def first_checkpoint():
        return client.list_artifacts(run_id, names.CHECKPOINT_DIR)

    _wait_for(first_checkpoint, "the first epoch's checkpoint")
    # what SLURM sends the batch shell `signal_s` seconds before the time limit
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
    states = _wait_for(lambda: _ended(job_id), f"job {job_id} to end")
    assert set(states.values()) == {("COMPLETED", "0:0")}
    log = (at_cluster / "slurm-logs" / f"taxonclip-train-{job_id}.out").read_text()
    assert "requeueing" in log and "(restart 1)" in log and f"--resume {run_id}" in log, log

    total_steps = EPOCHS * _steps_per_epoch(specimens)
    _assert_record_whole(run_id, total_steps, at_cluster, uninterrupted_job[4])


def test_a_two_node_train_job_is_one_process_group_logging_one_run(at_cluster, specimens,
                                                                    capsys):
    status = main([*_train_argv(specimens), "--epochs", "1", "--slurm", "nodes=2", "--wait"])
    output = capsys.readouterr()
    assert status == 0, output.out + output.err
    job_id, run_id = _submitted(output.out)
    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name(f"slurm-{at_cluster.name}")
                                .experiment_id])
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    # the steps of two processes, each with half of the images: one group of world size 2
    config = from_params(TrainConfig, {"batch_size": run.data.params["batch_size"]}, TRAIN_PARAMS)
    steps = steps_per_epoch(int(run.data.params["train_images"]), config, world_size=2)
    assert steps != steps_per_epoch(int(run.data.params["train_images"]), config, world_size=1)
    logged = [m.step for m in client.get_metric_history(run_id, names.TRAIN_LOSS)]
    assert logged == list(range(1, steps + 1))
    log = (at_cluster / "slurm-logs" / f"taxonclip-train-{job_id}.out").read_text()
    assert "srun --nodes=2" in log and "--nnodes=2" in log and "--rdzv_endpoint=127.0.0.1:" in log


SWEEP = """\
name: array
sampler: {type: tpe, seed: 0}
pruner: none
fixed: {model: tiny, epochs: 1, batch_size: 16, workers: 0}
search:
  lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
"""


def test_a_two_task_sweep_array_completes_its_trials(at_cluster, postgres, specimens, capsys):
    sweep = at_cluster / "array.yaml"
    sweep.write_text(textwrap.dedent(SWEEP))
    status = main(["sweep", "--launcher", "slurm", "--workers", "2", "--wait", "--sweep",
                   str(sweep), "--n_trials", "1", "--storage", postgres,
                   "-P", f"data={specimens}"])
    output = capsys.readouterr()
    assert status == 0, output.out + output.err
    job_id, _ = _submitted(output.out)
    from taxonclip.sweep.storage import open_storage

    study = optuna.load_study(study_name="array", storage=open_storage(postgres))
    assert sorted(t.number for t in study.trials) == [0, 1]
    assert {t.state for t in study.trials} == {TrialState.COMPLETE}
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.`{names.TAG_STUDY}` = 'array'")
    trials = Counter(r.data.tags[names.TAG_TRIAL] for r in runs
                     if r.data.tags[names.TAG_ENTRY] == "train")
    assert trials == Counter({"0": 1, "1": 1}), "a trial's run lost or duplicated"
    for task in (0, 1):
        assert (at_cluster / "slurm-logs" / f"taxonclip-sweep-{job_id}_{task}.out").exists()


def test_a_dead_array_task_has_its_trial_failed_by_the_others(at_cluster, postgres, specimens,
                                                              monkeypatch, capsys):
    from taxonclip.sweep.storage import HEARTBEAT_ENV, open_storage

    monkeypatch.setenv(HEARTBEAT_ENV, "1")  # a trial silent for 5 s has lost its process
    sweep = at_cluster / "dead.yaml"
    sweep.write_text(textwrap.dedent(SWEEP).replace("name: array", "name: dead"))
    assert main(["sweep", "--launcher", "slurm", "--workers", "2", "--sweep", str(sweep),
                 "--n_trials", "3", "--storage", postgres, "-P", f"data={specimens}"]) == 0
    job_id, _ = _submitted(capsys.readouterr().out)

    def both_running():
        assert not _ended(job_id), "the array ended before both tasks ran a trial"
        try:
            study = optuna.load_study(study_name="dead", storage=open_storage(postgres))
        except KeyError:  # not made yet
            return None
        return [t for t in study.trials if t.state == TrialState.RUNNING][1:]

    _wait_for(both_running, "a trial of each task")
    # task 0 dies at once, as on a lost node: no handler runs, its trial stays RUNNING
    subprocess.run(["scancel", "--signal=KILL", "--full", f"{job_id}_0"], check=True)
    _wait_for(lambda: _ended(job_id), f"array job {job_id} to end")

    study = optuna.load_study(study_name="dead", storage=open_storage(postgres))
    states = Counter(t.state for t in study.trials)
    # task 1 ran its 3 trials, and failed task 0's at the start of a later one
    assert states == Counter({TrialState.COMPLETE: 3, TrialState.FAIL: 1}), states
    [dead] = [t for t in study.trials if t.state == TrialState.FAIL]
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.`{names.TAG_STUDY}` = 'dead'")
    sweeps = {r.info.status: r for r in runs if r.data.tags[names.TAG_ENTRY] == "sweep"}
    assert set(sweeps) == {"FINISHED", "KILLED"}, "the dead task's sweep run not ended KILLED"
    assert "stopped sending heartbeats" in sweeps["KILLED"].data.tags[names.TAG_KILLED_REASON]
    # the dead trial's run, if it had started one, ended KILLED too
    for run in runs:
        if run.data.tags.get(names.TAG_TRIAL) == str(dead.number):
            assert run.info.status == "KILLED"


def test_an_eval_job_logs_its_run(at_cluster, specimens, capsys):
    status = main(["eval", "--launcher", "slurm", "--wait", "--data", str(specimens),
                   "--model", "tiny", "--workers", "0"])
    output = capsys.readouterr()
    assert status == 0, output.out + output.err
    _, run_id = _submitted(output.out)
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics[names.eval_metric("All", "species", "top1_cos")] >= 0


def test_a_two_task_caption_array_captions_every_row_once(at_cluster, specimens, capsys):
    """Each array task captions its share on its own node; the merge job joins the parts."""
    import pandas as pd

    from taxonclip.data.manifest import read_manifest

    out = at_cluster / "captions"
    status = main(["caption", "--launcher", "slurm", "--tasks", "2", "--wait", "--data",
                   str(specimens), "--out", str(out), "--workers", "0", "--batch_size", "8",
                   "--max_new_tokens", "4"])
    output = capsys.readouterr()
    assert status == 0, output.out + output.err
    merged = pd.read_parquet(out / "captions.parquet")
    images = read_manifest(specimens).table["image_id"]
    assert sorted(merged["image_id"]) == sorted(images), "a row lost or captioned twice"
    shares = {int(p.name.split("-")[1]) for p in (out / "parts").glob("part-*.parquet")}
    assert shares == {0, 1}, "both tasks wrote their share"


def test_a_failing_job_reaches_the_user_with_its_log(at_cluster, capsys):
    status = main(["eval", "--launcher", "slurm", "--wait", "--data",
                   str(at_cluster / "no-such-folder"), "--workers", "0"])
    output = capsys.readouterr()
    assert status == 1
    job_id, run_id = _submitted(output.out)
    log = at_cluster / "slurm-logs" / f"taxonclip-eval-{job_id}.out"
    assert f"job {job_id} FAILED (exit code 1:0); its log: {log}" in output.err
    assert "no-such-folder" in output.err, output.err  # the program's own message, from the log
    assert MlflowClient().get_run(run_id).info.status == "FAILED"


def test_a_cancelled_job_ends_its_run_killed(at_cluster, specimens, capsys):
    assert main(_train_argv(specimens)) == 0
    job_id, run_id = _submitted(capsys.readouterr().out)
    client = MlflowClient()
    _wait_for(lambda: client.get_run(run_id).data.params, "the job's run to start")
    subprocess.run(["scancel", job_id], check=True)
    _wait_for(lambda: _ended(job_id), f"job {job_id} to end")
    _wait_for(lambda: client.get_run(run_id).info.status == "KILLED", "the run to end KILLED",
              seconds=30)
    assert "scancel" in client.get_run(run_id).data.tags[names.TAG_KILLED_REASON]


def test_a_partition_the_cluster_lacks_is_refused(at_cluster, specimens, capsys):
    status = main(["train", "--launcher", "slurm", "--data", str(specimens), "--slurm",
                   "partition=gpu-h100"])
    err = capsys.readouterr().err
    assert status == 1
    assert "'gpu-h100'" in err and PARTITION in err, err
    assert not (at_cluster / "slurm-logs").exists()
    experiment = MlflowClient().get_experiment_by_name(f"slurm-{at_cluster.name}")
    assert experiment is None or not MlflowClient().search_runs([experiment.experiment_id])


AUTH_INI = """\
[mlflow]
default_permission = READ
database_uri = {database}
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
"""
ADMIN_PASSWORD = "admin-Pw-7d1"
USER_PASSWORD = "alice-Pw-93f"


@pytest.fixture(scope="module")
def group_server(postgres, tmp_path_factory):
    """README's "A tracking server for a group": `mlflow server` on PostgreSQL, artifacts in a
    folder the nodes share, the basic-auth app; its URL, once user alice is made."""
    import os
    import sys
    from pathlib import Path
    from urllib.parse import urlsplit

    import psycopg2

    from tests.helpers import wait_for_http

    url = urlsplit(postgres)
    connection = psycopg2.connect(host=url.hostname, port=url.port, user="taxonclip",
                                  dbname="postgres")
    connection.autocommit = True
    connection.cursor().execute("CREATE DATABASE mlflow")
    connection.cursor().execute("CREATE DATABASE mlflow_auth")
    connection.close()
    root = tmp_path_factory.mktemp("group-server")
    database = f"postgresql+psycopg2://taxonclip@{url.hostname}:{url.port}"
    (root / "auth.ini").write_text(AUTH_INI.format(database=f"{database}/mlflow_auth"))
    port = free_port()
    log = open(root / "server.log", "w")
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"),
           "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "a-key-shared-by-the-servers"}
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--app-name", "basic-auth",
         "--backend-store-uri", f"{database}/mlflow", "--artifacts-destination",
         str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{uri}/health", server)
        admin = {**os.environ, "MLFLOW_TRACKING_USERNAME": "admin",
                 "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD}
        subprocess.run([sys.executable, "-c", "import mlflow.server as s, sys; s.get_app_client("
                        "'basic-auth', tracking_uri=sys.argv[1]).create_user('alice', sys.argv[2])",
                        uri, USER_PASSWORD], env=admin, check=True, timeout=120)
        yield uri, root
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_a_job_logs_to_the_group_server_with_credentials_from_the_environment(
        group_server, slurm_cluster, specimens, tmp_path, monkeypatch, capsys):  # noqa: F811
    uri, root = group_server
    monkeypatch.chdir(tmp_path)
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", USER_PASSWORD)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "alice-evals")
    status = main(["eval", "--launcher", "slurm", "--wait", "--data", str(specimens),
                   "--workers", "0"])
    output = capsys.readouterr()
    assert status == 0, output.out + output.err
    assert "warning" not in output.err
    _, run_id = _submitted(output.out)
    mlflow.set_tracking_uri(uri)
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert any((root / "artifacts").rglob(names.SPLIT_ARTIFACT.rsplit("/", 1)[-1]))
    # the credentials reach the job through its environment only
    shown = [output.out, output.err, str(run.data.params), str(run.data.tags)]
    shown += [p.read_text() for p in (tmp_path / "slurm-logs").iterdir()]
    assert not [text for text in shown if USER_PASSWORD in text]
