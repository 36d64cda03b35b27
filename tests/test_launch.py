"""Launch options and their bad input, fast: SLURM's client commands are stand-in scripts that
record their calls (tests/test_slurm.py runs the real ones). Each refusal is one message naming
the culprit, submits nothing and leaves no MLflow run."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from taxonclip import names
from taxonclip.cli import main
from taxonclip.launch.options import LaunchConfig, slurm_options
from taxonclip.errors import ConfigError
from taxonclip.launch import LAUNCHERS, get_launcher
from taxonclip.launch.base import Job
from taxonclip.launch.submit import tracking_warning
from taxonclip.launch.task import TaskRunner
from tests.helpers import sqlite_tracking

JOB_ID = "4242"


def _fake(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/bin/sh\necho \"$0 $*\" >> {folder}/calls\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One sqlite tracking store for the module (made once: its migrations take seconds)."""
    folder = tmp_path_factory.mktemp("launch-store")
    MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
    return folder


@pytest.fixture
def fake_slurm(tmp_path, store, monkeypatch) -> Path:
    """sbatch, sinfo and scontrol that answer like a one-partition cluster and record their calls
    in `calls`; the test runs in `tmp_path`, logging to the module's store in an experiment of
    its own."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake(bin_dir, "sbatch", f"echo {JOB_ID}")
    _fake(bin_dir, "sinfo", "echo debug")
    _fake(bin_dir, "scontrol", "echo node1; echo node2")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    sqlite_tracking(monkeypatch, store, experiment=tmp_path.name)
    monkeypatch.chdir(tmp_path)  # after sqlite_tracking, which runs a test in the store's folder
    return bin_dir


def _calls(bin_dir: Path, program: str) -> list[str]:
    calls = bin_dir / "calls"
    return [line for line in (calls.read_text().splitlines() if calls.exists() else [])
            if Path(line.split()[0]).name == program]


def _runs(tmp_path: Path) -> list:
    """The runs of the test's experiment (named after its folder)."""
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(tmp_path.name)
    return client.search_runs([experiment.experiment_id]) if experiment else []


def _refused(argv: list[str], capsys, *words: str) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if not line.startswith("warning: ")]
    assert len(errors) == 1 and errors[0].startswith("taxonclip "), err
    for word in words:
        assert word in err, err
    return err


def test_every_launcher_name_is_registered():
    from taxonclip.launch.options import LAUNCHER_NAMES

    assert set(LAUNCHERS) == set(LAUNCHER_NAMES)
    for name in LAUNCHER_NAMES:
        assert hasattr(get_launcher(name), "launch")


@pytest.mark.parametrize("option, culprit", [
    ("gpus=2", "'gpus'"), ("time=2 hours", "'time'"), ("mem=lots", "'mem'"),
    ("nodes=0", "'nodes'"), ("partition", "'partition'")])
def test_a_bad_slurm_option_is_refused_by_name(option, culprit, fake_slurm, tmp_path, capsys):
    _refused(["train", "--launcher", "slurm", "--slurm", option], capsys, culprit)
    assert not _calls(fake_slurm, "sbatch") and not _runs(tmp_path)


def test_a_profile_line_is_named_by_file_and_line(tmp_path):
    profile = tmp_path / "cluster.slurm"
    profile.write_text("# our GPU cluster\npartition=gpu\ntime=1-00:00:00\ngpu_count=4\n")
    with pytest.raises(ConfigError, match=r"cluster.slurm:4: unknown SLURM option 'gpu_count'"):
        slurm_options([], str(profile))
    profile.write_text("partition=gpu\ntime=1-00:00:00  # a day\n")
    options = slurm_options(["time=02:00:00"], str(profile))
    assert (options.partition, options.time) == ("gpu", "02:00:00")


def test_slurm_options_without_the_slurm_launcher_are_refused(fake_slurm, capsys):
    _refused(["eval", "--slurm", "partition=gpu"], capsys, "--launcher slurm")


def test_a_partition_the_cluster_lacks_is_refused(fake_slurm, tmp_path, capsys):
    _refused(["train", "--launcher", "slurm", "--slurm", "partition=gpu"], capsys,
             "'gpu'", "debug")
    assert not _calls(fake_slurm, "sbatch") and not _runs(tmp_path)


def test_the_slurm_launcher_without_sbatch_is_refused(tmp_path, store, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    sqlite_tracking(monkeypatch, store, experiment=tmp_path.name)
    _refused(["eval", "--launcher", "slurm"], capsys, "sbatch", "PATH")
    assert not _runs(tmp_path)


def test_a_sweep_array_on_sqlite_is_refused(fake_slurm, tmp_path, capsys):
    _refused(["sweep", "--launcher", "slurm", "--workers", "2", "--storage",
              f"sqlite:///{tmp_path / 'optuna.db'}"], capsys, "--workers 2", "SQLite",
             "postgresql://")
    _refused(["sweep", "--launcher", "slurm", "--workers", "2"], capsys, "the default", "SQLite")
    assert not _calls(fake_slurm, "sbatch") and not _runs(tmp_path)


def test_workers_need_a_scheduler(fake_slurm, capsys):
    _refused(["sweep", "--workers", "2"], capsys, "--launcher slurm")


def test_a_tracking_store_on_a_node_local_path_is_warned_of(fake_slurm, tmp_path, monkeypatch,
                                                            capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-pw")
    assert main(["eval", "--launcher", "slurm", "--workers", "0"]) == 0
    out, err = capsys.readouterr()
    assert f"warning: the tracking URI {os.environ['MLFLOW_TRACKING_URI']}" in err
    assert "/tmp" in err or "share" in err
    [run] = _runs(tmp_path)
    assert f"submitted SLURM job {JOB_ID}" in out and f"MLflow run {run.info.run_id}" in out
    assert run.data.tags[names.TAG_ENTRY] == "eval"
    # credentials travel in the exported environment only, never in the files a job leaves
    for path in (tmp_path / "slurm-logs").iterdir():
        assert "s3cret-pw" not in path.read_text()


def test_tracking_warnings_name_the_path():
    assert tracking_warning("http://mlflow.example.org:5000") is None
    assert "under /tmp" in tracking_warning("sqlite:////tmp/runs/mlflow.db")
    assert "under /dev/shm" in tracking_warning("file:///dev/shm/mlruns")
    shared = tracking_warning("sqlite:////srv/shared/mlflow.db")
    assert "/srv/shared/mlflow.db" in shared and "filesystem they share" in shared
    # a relative store is named by its absolute path (whichever folder the test runs in)
    assert str(Path("mlflow.db").absolute()) in tracking_warning("sqlite:///mlflow.db")


def test_an_sbatch_refusal_leaves_no_run(fake_slurm, tmp_path, capsys):
    _fake(fake_slurm, "sbatch", "echo 'sbatch: error: Invalid account or account/partition' >&2; "
                                "exit 1")
    _refused(["train", "--launcher", "slurm", "--slurm", "account=nobody"], capsys,
             "Invalid account")
    assert not _runs(tmp_path)


def _script(tmp_path: Path) -> tuple[str, dict]:
    [script] = (tmp_path / "slurm-logs").glob("*.sbatch")
    text = script.read_text()
    spec = json.loads(Path(text.split()[-1]).read_text())
    return text, spec


def test_a_multi_node_train_job_asks_for_nodes_gpus_and_its_warning(fake_slurm, tmp_path, capsys):
    assert main(["train", "--launcher", "slurm", "--slurm",
                 "nodes=2,gpus_per_node=4,time=1-00:00:00,signal_s=600,cpus_per_task=8",
                 "--epochs", "2"]) == 0
    text, spec = _script(tmp_path)
    for line in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=4", "--time=1-00:00:00",
                 "--cpus-per-task=8", "--requeue", "--signal=B:USR1@600"):
        assert f"#SBATCH {line}\n" in text
    assert spec["argv"] == ["train", "--epochs", "2"] and spec["distributed"]
    [run] = _runs(tmp_path)
    assert spec["run_id"] == run.info.run_id


def test_the_job_runs_torchrun_per_node_and_resumes_after_a_requeue(fake_slurm, tmp_path,
                                                                    monkeypatch):
    spec = {"argv": ["train", "--epochs", "2"], "run_id": None, "distributed": True,
            "requeue": True, "nodes": 2, "gpus_per_node": 4, "rdzv_port": 29500, "env": {}}
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("MLFLOW_RUN_ID", "made-by-mlflow-run")
    program, env = TaskRunner(spec).command()
    assert program[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    for word in ("--nnodes=2", "--nproc_per_node=4", "--rdzv_backend=c10d",
                 "--rdzv_endpoint=node1:29500", "--rdzv_id=77"):
        assert word in program
    assert program[-3:] == ["train", "--epochs", "2"] and "MLFLOW_RUN_ID" not in env

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run = client.create_run(client.create_experiment(tmp_path.name),
                            tags={names.TAG_ENTRY: "train"})
    spec = {**spec, "run_id": run.info.run_id, "distributed": False}
    program, env = TaskRunner(spec).command()  # the first start logs into the run made for it
    assert env["MLFLOW_RUN_ID"] == run.info.run_id and "--resume" not in program
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    program, env = TaskRunner(spec).command()  # requeued before it logged anything: start over
    assert env["MLFLOW_RUN_ID"] == run.info.run_id and "--resume" not in program
    client.log_param(run.info.run_id, "epochs", "2")
    program, env = TaskRunner(spec).command()  # requeued after: resume
    assert program[-2:] == ["--resume", run.info.run_id] and "MLFLOW_RUN_ID" not in env


def test_the_local_launcher_runs_the_command_here():
    launch = LaunchConfig()
    job = Job(argv=("eval",), name="eval", launch=launch)
    assert get_launcher("local").launch(job, lambda: 7) == 7


def test_a_caption_array_is_followed_by_its_merge(fake_slurm, tmp_path):
    from taxonclip.launch.options import SlurmOptions
    from taxonclip.launch.slurm import submit

    launch = LaunchConfig(launcher="slurm", workers=3, slurm=SlurmOptions(partition="debug"))
    argv = ("caption", "--data", "/shared/data", "--out", "/shared/captions")
    job = Job(argv=argv, name="taxonclip-caption", launch=launch, then=(*argv, "--merge-only"))
    submitted = submit(job)
    first, merge = _calls(fake_slurm, "sbatch")
    assert "--dependency" not in first and f"--dependency=afterok:{JOB_ID}" in merge
    assert submitted.then_id == JOB_ID and len(submitted.logs) == 3
    scripts = {p.name: p.read_text() for p in (tmp_path / "slurm-logs").glob("*.sbatch")}
    [array] = [text for name, text in scripts.items() if not name.endswith("-then.sbatch")]
    [after] = [text for name, text in scripts.items() if name.endswith("-then.sbatch")]
    assert "#SBATCH --array=0-2\n" in array and "--array" not in after
    assert "# taxonclip caption --data /shared/data --out /shared/captions --merge-only" in after
    assert "#SBATCH --partition=debug\n" in after and "--no-requeue" in after


def test_launch_options_come_off_any_launchable_command_line():
    from taxonclip.launch.submit import split_launch_options

    launch, rest = split_launch_options(["caption", "--data", "x", "--launcher=slurm", "--tasks",
                                         "3", "--slurm", "time=10,partition=gpu", "--wait",
                                         "--workers", "2"])
    # caption's --workers are its DataLoader's, and stay on its command line
    assert rest == ["caption", "--data", "x", "--workers", "2"]
    assert (launch.launcher, launch.workers, launch.wait) == ("slurm", 3, True)
    assert (launch.slurm.time, launch.slurm.partition) == ("10", "gpu")
    # train's --workers are its DataLoader's, and stay on its command line
    launch, rest = split_launch_options(["train", "--workers", "4", "--launcher", "slurm"])
    assert rest == ["train", "--workers", "4"] and launch.workers == 1
    assert split_launch_options(["compare", "--top", "3"]) == (None, ["compare", "--top", "3"])
