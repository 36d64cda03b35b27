"""Resume keeps the record of a run whole: SIGKILL at ten points of a tiny training, then resume
into the same run, and find every step logged once, the final weights of an uninterrupted run,
one model, one table and no stale checkpoint. Only an unfinished train run can be resumed, with
its own parameters; a corrupt last checkpoint falls back to the one before."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
from collections import Counter
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from taxonclip import names
from taxonclip.cli import main
from taxonclip.config import TRAIN_PARAMS, DataConfig, TrainConfig, from_params
from taxonclip.data.manifest import read_manifest
from taxonclip.data.prepare import PrepareSettings, prepare
from taxonclip.data.splits import make_split
from taxonclip.train import prepare_data

pytestmark = pytest.mark.integration

EPOCHS = 3
BATCH = 15  # 60 training images (96 less 24 test and 12 val): 4 steps an epoch
ARGS = ["--model", "tiny", "--batch_size", str(BATCH), "--lr", "3e-3", "--margin_s", "16",
        "--margin_m2", "0.2", "--workers", "0", "--epochs", str(EPOCHS), "--keep_checkpoints", "1"]


def _steps_per_epoch(specimens) -> int:
    return len(make_split(read_manifest(specimens).table, DataConfig()).training_rows) // BATCH


def _kill_points(steps: int) -> dict[str, tuple[str, str, int]]:
    """Where to die: (module, attribute, on which call), at least one inside each phase."""
    return {
        "before the first checkpoint": ("taxonclip.train", "train_step", 2),
        "mid-way through epoch 2": ("taxonclip.train", "train_step", steps + 2),
        "during evaluation": ("taxonclip.knn", "knn_metrics", 3),
        "while logging metrics": ("taxonclip.tracking.run_logging", "Run.log_metric_history", 3),
        "between eval logging and checkpoint": ("taxonclip.train", "_save_checkpoint", 2),
        "during the checkpoint upload": ("taxonclip.tracking.run_logging", "Run.log_artifact", 2),
        "after the upload, before pruning": ("taxonclip.train", "_prune_checkpoints", 2),
        "during the final table": ("taxonclip.tracking.run_logging", "Run.log_eval_table", 1),
        "during the model logging": ("taxonclip.tracking.run_logging", "Run.log_model", 1),
        "after the model, before the run ends": ("mlflow", "end_run", 1),
    }


def _die_at(module: str, attribute: str, call: int, argv: list[str], env: dict) -> None:
    """In a child process: SIGKILL this process on the `call`-th call of `module.attribute`,
    then run `taxonclip` with `argv`."""
    import importlib

    os.environ.clear()
    os.environ.update(env)
    owner = importlib.import_module(module)
    *path, name = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    real, calls = getattr(owner, name), []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    setattr(owner, name, dying)
    main(argv)


@pytest.fixture(scope="module")
def killer():
    """Child processes forked from a server that has imported the project once already, so each
    killed training starts in a fraction of a second."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["taxonclip.cli", "taxonclip.train", "taxonclip.tracking.runs",
                                    "mlflow"])
    return context


def _killed_run(killer, point: tuple[str, str, int], argv: list[str]) -> None:
    child = killer.Process(target=_die_at, args=(*point, argv, dict(os.environ)))
    child.start()
    child.join(timeout=300)
    assert child.exitcode == -signal.SIGKILL, f"not killed at {point} (exit {child.exitcode})"


def _the_run(experiment: str):
    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


def _final_weights(run_id: str, folder: Path) -> dict:
    path = MlflowClient().download_artifacts(run_id, f"{names.CHECKPOINT_DIR}/epoch_{EPOCHS:03d}.pt",
                                             str(folder))
    saved = torch.load(path, map_location="cpu", weights_only=True)
    return {**saved["state_dict"], "centres": saved["head_shards"][0]["weight"]}


@pytest.fixture(scope="module")
def uninterrupted(mlflow_server, specimens, tmp_path_factory):
    """The final weights of the same training run straight through."""
    patch = pytest.MonkeyPatch()
    patch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    patch.setenv("MLFLOW_EXPERIMENT_NAME", "resume-straight")
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        patch.delenv(name, raising=False)
    assert main(["train", "--data", str(specimens), *ARGS]) == 0
    weights = _final_weights(_the_run("resume-straight").info.run_id, tmp_path_factory.mktemp("w"))
    patch.undo()
    return weights


def _assert_record_whole(run_id: str, total_steps: int, folder: Path, expected: dict) -> None:
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key, wanted in ((names.TRAIN_LOSS, range(1, total_steps + 1)),
                        (names.val_metric("All", "species", "top1_cos"), range(1, EPOCHS + 1)),
                        (names.eval_metric("All", "species", "top1_cos"), [0])):
        logged = Counter(m.step for m in client.get_metric_history(run_id, key))
        assert logged == Counter(wanted), f"{key}: steps duplicated or lost: {sorted(logged.items())}"
    table = client.load_table(run.info.experiment_id, names.PER_TAXA_TABLE, run_ids=[run_id])
    assert not table.duplicated(["taxa", "level"]).any(), "the final table was logged twice"
    models = client.search_logged_models([run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run_id}'")
    assert len(models) == 1, f"{len(models)} logged models"
    checkpoints = {Path(a.path).name for a in client.list_artifacts(run_id, names.CHECKPOINT_DIR)}
    best = torch.load(client.download_artifacts(run_id, f"{names.CHECKPOINT_DIR}/epoch_{EPOCHS:03d}.pt",
                                                str(folder / "last")),
                      map_location="cpu", weights_only=True)["best_epoch"]
    assert checkpoints == {f"epoch_{EPOCHS:03d}.pt", f"epoch_{best:03d}.pt"}, "stale checkpoints"
    final = _final_weights(run_id, folder)
    assert final.keys() == expected.keys()
    for key in expected:
        assert torch.equal(final[key], expected[key]), key


# Five points run with the slow tests only, to keep `make test` short; one or more of those that
# run in it lies inside each phase.
SLOW_POINTS = ("mid-way through epoch 2", "while logging metrics", "after the upload, before pruning",
               "during the model logging", "between eval logging and checkpoint")


@pytest.mark.parametrize("where", [
    pytest.param(where, marks=pytest.mark.slow if where in SLOW_POINTS else ())
    for where in _kill_points(4)])
def test_sigkill_then_resume_gives_the_uninterrupted_run(where, killer, uninterrupted, specimens,
                                                         tracking, monkeypatch, tmp_path):
    steps = _steps_per_epoch(specimens)
    assert steps == 4  # the kill points above are placed for 4 steps an epoch
    experiment = f"resume-{where.replace(' ', '-').replace(',', '')}"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment)
    argv = ["train", "--data", str(specimens), *ARGS]
    _killed_run(killer, _kill_points(steps)[where], argv)
    killed = _the_run(experiment)
    assert killed.info.status == "RUNNING"
    assert main(["train", "--resume", killed.info.run_id, "--workers", "0"]) == 0
    _assert_record_whole(killed.info.run_id, EPOCHS * steps, tmp_path, uninterrupted)


def test_a_corrupt_last_checkpoint_falls_back_to_the_one_before(killer, uninterrupted, specimens,
                                                                tracking, monkeypatch, tmp_path,
                                                                capsys):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "resume-corrupt")
    argv = ["train", "--data", str(specimens), *ARGS[:-1], "3"]  # keep 3 checkpoints
    _killed_run(killer, ("taxonclip.train", "_save_checkpoint", 3), argv)
    run_id = _the_run("resume-corrupt").info.run_id
    client = MlflowClient()
    good = Path(client.download_artifacts(run_id, f"{names.CHECKPOINT_DIR}/epoch_002.pt",
                                          str(tmp_path)))
    truncated = tmp_path / "cut" / "epoch_002.pt"
    truncated.parent.mkdir()
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    client.log_artifact(run_id, str(truncated), names.CHECKPOINT_DIR)
    assert main(["train", "--resume", run_id, "--workers", "0"]) == 0
    printed = capsys.readouterr()
    assert "checkpoint epoch_002.pt" in printed.err
    # the run's own epochs, not the default of a resume that names none
    assert re.search(rf"the model: epoch \d+ of {EPOCHS} ", printed.out), printed.out
    final = _final_weights(run_id, tmp_path / "final")
    assert all(torch.equal(final[key], uninterrupted[key]) for key in uninterrupted)


def _refused(capsys, argv: list[str], phrase: str) -> None:
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert phrase in error and "Traceback" not in error, error


def test_only_an_unfinished_train_run_can_be_resumed(uninterrupted, specimens, tracking,
                                                     monkeypatch, capsys):
    finished = _the_run("resume-straight")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "resume-refused")
    assert main(["eval", "--data", str(specimens), "--workers", "0"]) == 0
    evaluation = _the_run("resume-refused")
    before = {run.info.run_id: (run.info.status, dict(run.data.metrics))
              for run in (finished, evaluation)}
    _refused(capsys, ["train", "--resume", finished.info.run_id],
             f"run {finished.info.run_id} is a FINISHED train run; only an unfinished train run")
    _refused(capsys, ["train", "--resume", evaluation.info.run_id],
             "is a FINISHED eval run; only an unfinished train run can be resumed")
    # an eval run has no model to train further from: the hint names none
    assert main(["train", "--resume", evaluation.info.run_id]) == 1
    hint = capsys.readouterr().err
    assert "logs no model" in hint and "runs:/" not in hint, hint
    _refused(capsys, ["train", "--resume", "0" * 32], "no MLflow run")
    client = MlflowClient()
    for run_id, (status, metrics) in before.items():
        after = client.get_run(run_id)
        assert (after.info.status, dict(after.data.metrics)) == (status, metrics)


def test_a_finished_model_trains_further_from_its_weights(uninterrupted, specimens, tracking,
                                                          monkeypatch, capsys):
    finished = _the_run("resume-straight").info.run_id
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "resume-further")
    weights = f"runs:/{finished}/model"
    assert main(["train", "--data", str(specimens), *ARGS[:-4], "--epochs", "1",
                 "--weights", weights]) == 0
    further = _the_run("resume-further")
    assert further.info.run_id != finished and further.data.params["weights"] == weights
    _refused(capsys, ["train", "--model", "ViT-B/32", "--weights", weights,
                      "--data", str(specimens), "--batch_size", "16"], "are a tiny model")


def test_a_resume_keeps_the_runs_own_parameters(killer, specimens, tracking, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "resume-params")
    argv = ["train", "--data", str(specimens), *ARGS]
    _killed_run(killer, ("taxonclip.train", "train_step", 2), argv)
    run_id = _the_run("resume-params").info.run_id
    _refused(capsys, ["train", "--resume", run_id, "--lr", "0.5"],
             "parameter 'lr' is 0.5, but run")
    _refused(capsys, ["train", "--resume", run_id, "--epochs", "7"], "parameter 'epochs'")
    assert MlflowClient().get_run(run_id).info.status == "RUNNING"
    # the same values, defaults (as `mlflow run` passes every one) and the parameters a resume
    # may change are accepted
    assert main(["train", "--resume", run_id, "--lr", "3e-3", "--epochs", "32", "--batch_size",
                 "128", "--workers", "0", "--device", "cpu"]) == 0
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["epochs"] == str(EPOCHS)


@pytest.mark.slow
def test_sigkill_then_resume_from_shards_gives_the_uninterrupted_run(killer, specimens, tracking,
                                                                     monkeypatch, tmp_path, capsys):
    folder = tmp_path / "prepared"
    prepare(read_manifest(specimens), folder, PrepareSettings(size=32, shard_size=12), workers=1,
            progress=False)
    args = [*ARGS[:ARGS.index("--workers")], "--workers", "2", *ARGS[ARGS.index("--workers") + 2:]]
    argv = ["train", "--data", str(folder), *args]
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "shards-straight")
    assert main(argv) == 0
    expected = _final_weights(_the_run("shards-straight").info.run_id, tmp_path / "straight")
    given = {name.lstrip("-"): value for name, value in zip(argv[1::2], argv[2::2])}
    epoch_steps = prepare_data(from_params(TrainConfig, given,
                                           TRAIN_PARAMS)).epoch_steps
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "shards-resumed")
    _killed_run(killer, ("taxonclip.train", "train_step", epoch_steps[0] + 2), argv)
    run_id = _the_run("shards-resumed").info.run_id
    _refused(capsys, ["train", "--resume", run_id, "--workers", "1"],
             "parameter 'workers' is 1, but run")
    assert main(["train", "--resume", run_id]) == 0
    _assert_record_whole(run_id, sum(epoch_steps), tmp_path, expected)


def test_a_run_killed_before_its_parameters_is_refused_and_ended(killer, specimens, tracking,
                                                                 monkeypatch, capsys):
    """Killed between the run's creation and its first call (all its parameters at once): a
    resume cannot know what it was to train, so it trains nothing into it, with or without the
    original arguments, and ends it KILLED saying why."""
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "resume-no-params")
    argv = ["train", "--data", str(specimens), *ARGS]
    _killed_run(killer, ("taxonclip.tracking.run_logging", "Run.log_params", 1), argv)
    killed = _the_run("resume-no-params")
    assert killed.info.status == "RUNNING" and not killed.data.params
    _refused(capsys, ["train", "--resume", killed.info.run_id, "--workers", "0"],
             "holds no parameters")
    run = MlflowClient().get_run(killed.info.run_id)
    assert run.info.status == "KILLED" and names.TAG_KILLED_REASON in run.data.tags
    assert not run.data.params and not run.data.metrics
    _refused(capsys, ["train", "--resume", killed.info.run_id, "--data", str(specimens)],
             "holds no parameters")
    assert MlflowClient().get_run(killed.info.run_id).data.metrics == {}


def test_the_parameters_are_the_first_thing_a_run_holds(killer, specimens, tracking, monkeypatch):
    """Killed at its first logged artifact (the data summary), a run holds every parameter."""
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "resume-params-first")
    argv = ["train", "--data", str(specimens), *ARGS]
    _killed_run(killer, ("taxonclip.tracking.run_logging", "Run.log_text", 1), argv)
    params = _the_run("resume-params-first").data.params
    assert set(TRAIN_PARAMS) <= set(params) and params["epochs"] == str(EPOCHS)
