"""`train` through its real entry points against a real MLflow server: metrics, checkpoints,
centroids, the logged model, resume after SIGKILL."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from taxonclip import names
from taxonclip.cli import main
from taxonclip.config import DataConfig, ModelConfig, TrainConfig
from taxonclip.data.manifest import read_manifest
from taxonclip.data.prepare import PrepareSettings, prepare
from taxonclip.data.splits import make_split
from taxonclip.params import TRAIN_PARAMS, from_params
from taxonclip.tracking.models import resolve_model
from taxonclip.training.data import prepare_data
from tests.helpers import REPO, free_port

pytestmark = pytest.mark.integration

TRAIN_ARGS = ["--model", "tiny", "--batch_size", "16", "--lr", "3e-3", "--weight_decay", "0.05",
              "--margin_s", "16", "--margin_m2", "0.2", "--workers", "0"]


def _training_rows(table) -> int:
    """How many rows the default split leaves to training (not test, not val)."""
    return len(make_split(table, DataConfig()).training_rows)


def _only_run(experiment: str):
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def test_mlflow_run_train_logs_everything_and_learns(tracking, specimens, tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    command = [str(Path(sys.executable).parent / "mlflow"), "run", str(REPO), "-e", "train",
               "--env-manager", "local", "--experiment-name", "train-integration",
               "-P", f"data={specimens}", "-P", "model=tiny", "-P", "epochs=4",
               "-P", "batch_size=16", "-P", "lr=3e-3", "-P", "margin_s=16", "-P", "margin_m2=0.2",
               "-P", "weight_decay=0.05", "-P", "workers=0", "-P", "register_as=tiny-integration"]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    run = _only_run("train-integration")
    client = MlflowClient()
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and run.data.params["lr"] == "3e-3"

    losses = client.get_metric_history(run_id, names.TRAIN_LOSS)
    assert [m.step for m in sorted(losses, key=lambda m: m.step)] == list(range(1, len(losses) + 1))
    assert len(client.get_metric_history(run_id, names.TRAIN_LR)) == len(losses)
    # per epoch: the validation table; the test table once, of the selected epoch's weights
    per_epoch = client.get_metric_history(run_id, names.val_metric("All", "species", "top1_cos"))
    assert sorted(m.step for m in per_epoch) == [1, 2, 3, 4]
    assert len(client.get_metric_history(run_id, names.eval_metric("All", "species", "top1_cos"))) == 1
    best = max(per_epoch, key=lambda m: (m.value, -m.step))
    assert run.data.tags[names.TAG_SELECTED_EPOCH] == str(best.step)
    assert run.data.params["select"] == "best"

    checkpoints = {Path(a.path).name for a in client.list_artifacts(run_id, names.CHECKPOINT_DIR)}
    assert {"epoch_003.pt", "epoch_004.pt"} <= checkpoints and len(checkpoints) <= 3

    centroids = np.load(client.download_artifacts(run_id, names.CENTROIDS, str(tmp_path)))
    classes = pd.read_csv(client.download_artifacts(run_id, names.CENTROID_CLASSES, str(tmp_path)))
    assert centroids.shape == (int(run.data.params["num_classes"]), 64)
    assert list(classes["species"]) == sorted(classes["species"])

    [version] = client.search_model_versions("name='tiny-integration'")
    assert version.run_id == run_id
    encoder = resolve_model(ModelConfig(f"runs:/{run_id}/{names.MODEL_ARTIFACT}"))
    images = torch.randn(2, 3, 32, 32)
    assert encoder(images).shape == (2, 64)
    assert encoder.weights == f"runs:/{run_id}/{names.MODEL_ARTIFACT}"

    table = client.load_table(run.info.experiment_id, names.PER_TAXA_TABLE, [run_id])
    trained = table[(table["taxa"] == "All") & (table["level"] == "species")]["top1_cos"].item()
    assert main(["eval", "--model", "tiny", "--data", str(specimens), "--workers", "0"]) == 0
    baseline = client.search_runs(
        [client.get_experiment_by_name("Default").experiment_id],
        order_by=["attributes.start_time DESC"], max_results=1)[0]
    before = baseline.data.metrics[names.eval_metric("All", "species", "top1_cos")]
    assert trained > before

    assert main(["eval", "--model", f"runs:/{run_id}/model", "--data", str(specimens),
                 "--workers", "0"]) == 0


KILL_AT_STEP = textwrap.dedent("""
    import os, signal, sys
    import taxonclip.training.loop as loop
    real_step = loop.train_step
    def step_then_die(state, *args, **kwargs):
        loss = real_step(state, *args, **kwargs)
        if state.step == int(os.environ["KILL_AT_STEP"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return loss
    loop.train_step = step_then_die
    from taxonclip.cli import main
    raise SystemExit(main(sys.argv[1:]))
""")


@pytest.mark.slow  # test_resume.py kills and resumes at every phase in make test
def test_killed_training_resumes_into_the_same_run(tracking, specimens, tmp_path, monkeypatch):
    """SIGKILL mid-epoch 2, resume, and end with the weights of an uninterrupted run."""
    args = ["train", "--data", str(specimens), "--epochs", "3", *TRAIN_ARGS]
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "train-resume")
    table = read_manifest(specimens).table
    steps_per_epoch = _training_rows(table) // 16
    env = {**os.environ, "KILL_AT_STEP": str(steps_per_epoch + 1)}
    killed = subprocess.run([sys.executable, "-c", KILL_AT_STEP, *args], env=env, timeout=300,
                            capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-3000:]
    run = _only_run("train-resume")
    # as under `mlflow run . -e train -P resume=<id>`, which creates a run of its own first
    launched = MlflowClient().create_run(run.info.experiment_id).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", launched)
    assert main([*args, "--resume", run.info.run_id]) == 0
    assert "MLFLOW_RUN_ID" not in os.environ
    launch = MlflowClient().get_run(launched)
    assert launch.data.tags[names.TAG_RESUMED_INTO] == run.info.run_id and not launch.data.metrics
    assert run.info.run_id in launch.data.tags[names.TAG_NOTE]

    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "train-uninterrupted")
    assert main(args) == 0
    straight = _only_run("train-uninterrupted")
    client = MlflowClient()
    resumed = client.get_run(run.info.run_id)
    assert resumed.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, names.TRAIN_LOSS)]
    assert sorted(steps) == list(range(1, 3 * steps_per_epoch + 1)), "steps duplicated or lost"

    weights = [_final_state(client, r.info.run_id, tmp_path / r.info.run_id) for r in (resumed, straight)]
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=1e-4, atol=1e-5)


def _final_state(client, run_id: str, folder: Path) -> dict:
    path = client.download_artifacts(run_id, f"{names.CHECKPOINT_DIR}/epoch_003.pt", str(folder))
    saved = torch.load(path, map_location="cpu", weights_only=False)
    return {**saved["state_dict"], "centres": saved["head_shards"][0]["weight"]}


def _torchrun_two_processes(argv: list[str], experiment: str, cwd: Path) -> None:
    """`torchrun --nproc_per_node 2 -m taxonclip <argv>` into `experiment`; fails on an error."""
    env = {**os.environ, "MLFLOW_EXPERIMENT_NAME": experiment}
    command = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2",
               "-m", "taxonclip", *argv]
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow  # the two-node test below runs the same training in make test
def test_torchrun_two_cpu_processes_log_one_run(tracking, specimens, tmp_path):
    """Data-parallel on 2 gloo processes: centres sharded, only rank 0 talks to MLflow."""
    _torchrun_two_processes(["train", "--data", str(specimens), "--epochs", "1", "--device",
                             "cpu", *TRAIN_ARGS], "train-torchrun", tmp_path)
    _check_one_run_of_two_ranks("train-torchrun", specimens, tmp_path)


def test_two_nodes_meet_through_the_c10d_rendezvous_and_log_one_run(tracking, specimens, tmp_path):
    """Two "nodes" of one process each, started apart as on two machines, join through torchrun's
    c10d rendezvous (`--nnodes 2 --rdzv_backend c10d --rdzv_endpoint host:port`) into one
    training of world size 2 and one MLflow run."""
    port = free_port()
    env = {**os.environ, "MLFLOW_EXPERIMENT_NAME": "train-two-nodes"}
    command = [str(Path(sys.executable).parent / "torchrun"), "--nnodes", "2", "--nproc_per_node",
               "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
               "--rdzv_id", "two-nodes", "-m", "taxonclip", "train", "--data", str(specimens),
               "--epochs", "1", "--device", "cpu", *TRAIN_ARGS]
    logs = [(tmp_path / f"node{n}.out", tmp_path / f"node{n}.err") for n in range(2)]
    nodes = [subprocess.Popen(command, env=env, cwd=tmp_path, stdout=out.open("w"),
                              stderr=err.open("w")) for out, err in logs]
    for node, (_, err) in zip(nodes, logs):
        assert node.wait(timeout=300) == 0, err.read_text()[-3000:]
    reports = [out.read_text() for out, _ in logs]
    assert sum("the model: epoch 1 of 1" in report for report in reports) == 1  # rank 0 alone prints
    _check_one_run_of_two_ranks("train-two-nodes", specimens, tmp_path)


@pytest.mark.slow
def test_torchrun_two_cpu_processes_cluster_what_one_process_clusters(tracking, specimens, tmp_path,
                                                                       monkeypatch):
    """label=cluster under torchrun: both ranks embed their share of the training images, rank 0
    clusters them all, and the images get the clusters that one process gives them."""
    cluster_args = ["--data", str(specimens), "--epochs", "1", "--device", "cpu", "--label",
                    "cluster", "--clusters", "0.5", *TRAIN_ARGS]
    _torchrun_two_processes(["train", *cluster_args], "clusters-torchrun", tmp_path)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "clusters-alone")
    assert main(["train", *cluster_args]) == 0

    client = MlflowClient()
    runs = [_only_run(name) for name in ("clusters-torchrun", "clusters-alone")]
    spread, alone = (pd.read_csv(client.download_artifacts(run.info.run_id, names.CLUSTER_ASSIGNMENT,
                                                           str(tmp_path / run.info.run_id)))
                     for run in runs)
    assert len(alone) == _training_rows(read_manifest(specimens).table)
    pd.testing.assert_frame_equal(spread, alone)
    assert runs[0].data.metrics[names.CLUSTER_COUNT] == runs[1].data.metrics[names.CLUSTER_COUNT] == 6


def _check_one_run_of_two_ranks(experiment: str, specimens: Path, tmp_path: Path) -> None:
    run = _only_run(experiment)
    assert run.info.status == "FINISHED"
    client = MlflowClient()
    steps = [m.step for m in client.get_metric_history(run.info.run_id, names.TRAIN_LOSS)]
    table = read_manifest(specimens).table
    per_step = 16 * 2
    assert sorted(steps) == list(range(1, _training_rows(table) // per_step + 1))
    centroids = np.load(client.download_artifacts(run.info.run_id, names.CENTROIDS, str(tmp_path)))
    assert centroids.shape[0] == int(run.data.params["num_classes"])


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_from_shards(tracking, specimens, tmp_path):
    """From a prepared folder, the two ranks read their own shards and take the planned steps."""
    folder = tmp_path / "prepared"
    prepare(read_manifest(specimens), folder, PrepareSettings(size=32, shard_size=10), workers=1,
            progress=False)
    args = ["train", "--data", str(folder), "--epochs", "1", "--device", "cpu", *TRAIN_ARGS]
    _torchrun_two_processes(args, "train-torchrun-shards", tmp_path)
    run = _only_run("train-torchrun-shards")
    assert run.info.status == "FINISHED"
    given = {name.lstrip("-"): value for name, value in zip(args[1::2], args[2::2])}
    planned = prepare_data(from_params(TrainConfig, given, TRAIN_PARAMS), world_size=2).epoch_steps
    steps = [m.step for m in MlflowClient().get_metric_history(run.info.run_id, names.TRAIN_LOSS)]
    assert sorted(steps) == list(range(1, planned[0] + 1)) and planned[0] > 0
