"""A corpus of bad inputs, each through the `taxonclip` command against a real MLflow server: one
message on stderr, exit status 1, no traceback, and no MLflow run left RUNNING; where the input
can be checked before a run starts, no run at all. Also the runs that used to crash on good
input: exactly 10 optimiser steps, and a loss that turns non-finite mid-run."""

from __future__ import annotations

import uuid
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from taxonclip import names
from taxonclip.cli import main
from taxonclip.config import TrainConfig
from taxonclip.data.manifest import read_manifest
from taxonclip.models import create_model, get_spec
from taxonclip.training.loop import build_state
from tests.helpers import free_port

NO_SUCH_RUN = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def bad(specimens, tmp_path_factory) -> dict[str, str]:
    """The files the cases name, by the field their command lines use: `{specimens}` and every
    broken manifest, sweep file and weights file."""
    root = tmp_path_factory.mktemp("bad-input")
    table = read_manifest(specimens).table
    image = table["image_path"].iloc[0]
    (root / "broken.png").write_bytes(b"not a picture")
    (root / "a_file").write_text("a file, not a folder")
    texts = {
        "wrong_column.csv": f"file,name\n{image},Aus bus\n",
        "missing_image.csv": "fileNameAsDelivered,scientificName\nnowhere.png,Aus bus\n",
        "undecodable.csv": "fileNameAsDelivered,scientificName\nbroken.png,Aus bus\n",
        "header_only.csv": "fileNameAsDelivered,scientificName\n",
        "blank_names.csv": f"fileNameAsDelivered,scientificName\n{image},\n{image},  \n",
        "notes.txt": "not a manifest",
        "malformed.yaml": "name: x\nsearch: [\n",
        "unknown_key.yaml": "bogus: 1\nsearch:\n  lr: {type: float, low: 0.001, high: 0.1}\n",
        "bad_distribution.yaml": "search:\n  lr: {type: gauss, low: 0.001, high: 0.1}\n",
        "unknown_metric.yaml": ("metric: eval/All/tribe/top1_cos\n"
                                "search:\n  lr: {type: float, low: 0.001, high: 0.1}\n"),
        "searched_resume.yaml": "search:\n  resume: {type: categorical, choices: [a, b]}\n",
        "scale_too_big.yaml": "search:\n  margin_s: {type: float, low: 16, high: 1000}\n",
        "fractional_batch.yaml": "search:\n  batch_size: {type: categorical, choices: [16, 16.5]}\n",
    }
    for name, text in texts.items():
        (root / name).write_text(text)
    columns = {"fileNameAsDelivered": table["image_path"], "scientificName": table["scientific_name"]}
    table.assign(**columns, taxa="All")[[*columns, "taxa"]].to_csv(root / "taxa_all.csv", index=False)
    other = get_spec("ViT-B/32")
    torch.save({"model": {"spec": asdict(other), "weights": "x"}, "state_dict": {}},
               root / "other_model.pt")
    torch.save({"visual.proj": torch.zeros(3)}, root / "wrong_shapes.pt")
    paths = {Path(name).stem: str(root / name) for name in [*texts, "broken.png", "a_file",
                                                             "taxa_all.csv", "other_model.pt",
                                                             "wrong_shapes.pt"]}
    return {**paths, **_faulty_files(root, table, specimens), "specimens": str(specimens),
            "root": str(root)}


def _faulty_files(root: Path, table, specimens: Path) -> dict[str, str]:
    """The files of the second round of faults: a damaged spool queue, a corrupt .safetensors,
    a pickled weights file, a truncated JPEG, BIOSCAN metadata naming a path outside its folder
    or a partition typo, genus-only names, and a sweep over a taxa the data lacks."""
    import pickle

    import pandas as pd
    from PIL import Image

    from taxonclip.data.bioscan import METADATA_FILES, write_fixture

    spool = root / "damaged-spool"
    spool.mkdir()
    (spool / "queue.jsonl").write_text('{"call": "params", "params": {}}\n{"call": "par\n')
    (root / "corrupt.safetensors").write_bytes(b"\xff" * 8 + b"not a header")
    with open(root / "pickled.pt", "wb") as file:
        pickle.dump({"weights": pd.Timestamp(0)}, file)  # a pickled object, not tensors
    jpegs = []
    for i, path in enumerate(table["image_path"]):
        jpegs.append(root / "jpeg" / f"{i}.jpg")
        jpegs[-1].parent.mkdir(exist_ok=True)
        Image.open(path).convert("RGB").save(jpegs[-1], quality=90)
    whole = jpegs[0].read_bytes()
    jpegs[0].write_bytes(whole[: len(whole) // 2])
    pd.DataFrame({"fileNameAsDelivered": jpegs, "scientificName": table["scientific_name"],
                  "taxa": table["taxa"]}).to_csv(root / "truncated.csv", index=False)
    files = {}
    for name, column, value in (("escape", "chunk", "../../.."), ("tset", "split", "tset")):
        folder = write_fixture(root / f"bioscan-{name}", size=16)
        metadata = next(folder.rglob(METADATA_FILES[0]))
        rows = pd.read_csv(metadata, dtype=str)
        rows.loc[rows["split"] == "test", column] = value
        rows.to_csv(metadata, index=False)
        files[f"bioscan_{name}"] = str(folder)
    (root / "unknown_taxa.yaml").write_text(
        f"metric: val/Insect/species/top1_cos\nfixed: {{model: tiny, data: {specimens}}}\n"
        f"search:\n  lr: {{type: float, low: 0.001, high: 0.1}}\n")
    return {**files, "damaged_spool": str(spool), "truncated": str(root / "truncated.csv"),
            **{stem: str(root / name) for stem, name in (
                ("corrupt_safetensors", "corrupt.safetensors"), ("pickled", "pickled.pt"),
                ("unknown_taxa", "unknown_taxa.yaml"))}}


TRAIN = ("train", "--model", "tiny", "--data", "{specimens}", "--workers", "0", "--batch_size", "16",
         "--epochs", "1")
EVAL = ("eval", "--model", "tiny", "--data", "{specimens}", "--workers", "0")
CHECK = ("data", "check")
SWEEP = ("sweep", "--n_trials", "1", "--sweep")


def case(id: str, argv: tuple[str, ...], phrase: str, **env: str):
    """One bad input: the command line (`{field}`s filled from `bad`), a phrase of its message,
    and environment variables to set (`{port}` is a port nothing listens on)."""
    return pytest.param(argv, phrase, env, id=id)


CASES = [
    # data
    case("wrong-column", (*CHECK, "{wrong_column}"), "no image column"),
    case("image-column-naming-no-column", (*EVAL, "--image_column", "picture"), "no column 'picture'"),
    case("missing-image", (*EVAL, "--data", "{missing_image}"), "nowhere.png: no such file"),
    case("undecodable-image", (*TRAIN, "--data", "{undecodable}"), "cannot identify image file"),
    case("header-only-check", (*CHECK, "{header_only}"), "no rows in"),
    case("header-only-train", (*TRAIN, "--data", "{header_only}"), "header_only.csv: a header and no"),
    case("blank-names-only", (*EVAL, "--data", "{blank_names}"), "2 with a blank name"),
    case("taxa-named-All", (*EVAL, "--data", "{taxa_all}"), "taxa 'All' takes the name"),
    case("missing-captions-file", (*EVAL, "--embedding", "gallery_avg", "--captions", "{root}/no.csv"),
         "captions file"),
    case("unknown-missing-policy", (*CHECK, "{specimens}", "--missing", "maybe"),
         "parameter 'missing' is 'maybe'"),
    case("group-column-naming-no-column", (*TRAIN, "--group_column", "clip"), "no column 'clip'"),
    case("data-path-missing", (*EVAL, "--data", "{root}/nowhere"), "does not exist"),
    case("not-a-manifest", (*CHECK, "{notes}"), "is not a manifest"),
    case("synth-into-a-file", ("data", "synth", "--out", "{a_file}/set"),
         "a_file is a file, not a folder"),
    case("synth-no-taxa", ("data", "synth", "--out", "{root}/never", "--taxa", "0"),
         "parameter 'taxa' must be"),
    case("no-optimiser-step", (*TRAIN, "--batch_size", "1000"), "make no optimiser step"),
    # parameters
    case("lr-zero", (*TRAIN, "--lr", "0"), "parameter 'lr' must be a finite number above 0"),
    case("lr-negative", (*TRAIN, "--lr=-1e-5"), "parameter 'lr'"),
    case("lr-nan", (*TRAIN, "--lr", "nan"), "parameter 'lr'"),
    case("lr-inf", (*TRAIN, "--lr", "inf"), "parameter 'lr'"),
    case("lr-pfc-weight-zero", (*TRAIN, "--lr_pfc_weight", "0"), "parameter 'lr_pfc_weight'"),
    case("weight-decay-negative", (*TRAIN, "--weight_decay=-0.1"), "parameter 'weight_decay'"),
    case("weight-decay-inf", (*TRAIN, "--weight_decay", "inf"), "parameter 'weight_decay'"),
    case("grad-clip-negative", (*TRAIN, "--grad_clip", "-1"), "parameter 'grad_clip'"),
    case("grad-clip-nan", (*TRAIN, "--grad_clip", "nan"), "parameter 'grad_clip'"),
    case("margin-s-too-big", (*TRAIN, "--margin_s", "200"), "'margin_s' (the loss's scale 's') must "
         "be in (0, 128]"),
    case("margin-s-inf", (*TRAIN, "--margin_s", "inf"), "'margin_s'"),
    case("margin-m3-inf", (*TRAIN, "--margin_m2", "0", "--margin_m3", "inf"), "'margin_m3'"),
    case("sample-rate-nan", (*TRAIN, "--sample_rate", "nan"), "parameter 'sample_rate'"),
    case("test-size-nan", (*EVAL, "--test_size", "nan"), "parameter 'test_size'"),
    case("class-fraction-nan", (*TRAIN, "--class_fraction", "nan"), "parameter 'class_fraction'"),
    case("workers-negative-train", (*TRAIN, "--workers", "-1"), "'workers' must be at least 0"),
    case("workers-negative-eval", (*EVAL, "--workers", "-1"), "'workers' must be at least 0"),
    case("seed-too-big", (*TRAIN, "--seed", str(2**32)), "parameter 'seed'"),
    case("register-as-slash", (*TRAIN, "--register_as", "birds/b16"), "holds /"),
    case("register-as-colon", (*TRAIN, "--register_as", "team:birds"), "holds :"),
    case("register-as-dots", (*TRAIN, "--register_as", "..."), "only dots"),
    case("register-as-quote", (*TRAIN, "--register_as", "bird's"), "holds '"),
    case("register-as-at", (*TRAIN, "--register_as", "birds@champion"), "holds @"),
    case("unknown-parameter", (*TRAIN, "--bogus", "1"), "unknown parameter(s) --bogus 1"),
    case("parameter-of-another-command", (*EVAL, "--label", "genus"), "unknown parameter(s) --label"),
    case("malformed-integer", (*TRAIN, "--epochs", "two"), "'epochs': 'two' is not an integer"),
    case("fractional-integer", (*TRAIN, "--batch_size", "1.5"), "'1.5' is not an integer"),
    case("malformed-number", (*TRAIN, "--lr", "fast"), "'lr': 'fast' is not a number"),
    case("negative-value-as-a-flag", (*TRAIN, "--lr", "-inf"), "--name=VALUE"),
    case("embedding-pixels", (*EVAL, "--embedding", "pixels"), "parameter 'embedding' is 'pixels'"),
    case("label-order", (*TRAIN, "--label", "order"), "parameter 'label' is 'order'"),
    case("metric-tribe", (*TRAIN, "--metric", "All/tribe/top1_cos"), "parameter 'metric'"),
    case("device-gpu", (*EVAL, "--device", "gpu"), "parameter 'device' is 'gpu'"),
    case("unknown-model", (*EVAL, "--model", "ViT-Z/99"), "unknown model 'ViT-Z/99'"),
    case("unknown-command", ("trian",), "invalid choice: 'trian'"),
    case("compare-metric-tribe", ("compare", "--metric", "All/tribe/top1_cos"),
         "parameter 'metric'"),
    case("compare-top-zero", ("compare", "--top", "0"), "parameter 'top' must be at least 1"),
    case("sweep-no-trials", ("sweep", "--n_trials", "0"), "parameter 'n_trials' must be at least 1"),
    # sweep files
    case("sweep-malformed-yaml", (*SWEEP, "{malformed}"), "not valid YAML"),
    case("sweep-unknown-key", (*SWEEP, "{unknown_key}"), "bogus: unknown key"),
    case("sweep-bad-distribution", (*SWEEP, "{bad_distribution}"), "search.lr.type: 'gauss'"),
    case("sweep-unknown-metric", (*SWEEP, "{unknown_metric}"), "metric: 'eval/All/tribe/top1_cos'"),
    case("sweep-searched-resume", (*SWEEP, "{searched_resume}"), "search.resume: every trial"),
    case("sweep-range-beyond-margin-s", (*SWEEP, "{scale_too_big}"),
         "search.margin_s: parameter 'margin_s'"),
    case("sweep-fractional-batch", (*SWEEP, "{fractional_batch}"), "'16.5' is not an integer"),
    case("sweep-file-missing", (*SWEEP, "{root}/nowhere.yaml"), "no such sweep file"),
    # weights
    case("weights-file-missing", (*EVAL, "--weights", "{root}/nowhere.pt"), "not a file"),
    case("weights-not-a-checkpoint", (*EVAL, "--weights", "{broken}"),
         "not a file of tensors written by torch.save"),
    case("checkpoint-of-another-model", (*EVAL, "--weights", "{other_model}"),
         "is a checkpoint of model ViT-B/32, not tiny"),
    case("weights-of-another-shape", (*TRAIN, "--weights", "{wrong_shapes}"),
         "does not fit model tiny"),
    # URIs
    case("tracking-server-unreachable", EVAL, "cannot reach the MLflow tracking server",
         MLFLOW_TRACKING_URI="http://127.0.0.1:{port}"),
    case("model-of-a-nonexistent-run", (*EVAL, "--model", f"runs:/{NO_SUCH_RUN}/model"),
         f"the logged model runs:/{NO_SUCH_RUN}/model"),
    # second round: each once a traceback or a run created for bad input
    case("prepare-into-dev-null", ("data", "prepare", "{specimens}", "--out", "/dev/null/x"),
         "/dev/null is a file, not a folder"),
    case("bioscan-path-outside-its-folder", (*CHECK, "{bioscan_escape}"),
         "not a plain folder or file name: an image path may not leave its package"),
    case("bioscan-partition-typo", (*EVAL, "--data", "{bioscan_tset}", "--split", "official"),
         "column 'split' is 'tset'; BIOSCAN-5M's partitions are"),
    case("sync-damaged-queue", ("sync", "{damaged_spool}"), "queue.jsonl line 2 is not a queued call"),
    case("weights-corrupt-safetensors", (*EVAL, "--weights", "{corrupt_safetensors}"),
         "cannot read weights file"),
    case("truncated-jpeg-check", (*CHECK, "{truncated}", "--workers", "2"), "jpeg/0.jpg: "),
    case("truncated-jpeg-eval", (*EVAL, "--data", "{truncated}"), "jpeg/0.jpg: "),
    case("sweep-metric-of-no-taxa", (*SWEEP, "{unknown_taxa}"),
         "metric: metric 'Insect/species/top1_cos': the evaluation table has no such row"),
    case("clusters-above-the-species", (*TRAIN, "--label", "cluster", "--clusters", "1000"),
         "parameter 'clusters' is 1000, more than the 12 species"),
]


def _runs(tracking: str, experiment: str) -> list:
    client = MlflowClient(tracking_uri=tracking)
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id])


def _refused(capsys, argv: list[str], phrase: str) -> str:
    """Run the command; it exits 1 with one message holding `phrase` and no traceback."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 1, err
    assert phrase in err, err
    assert "Traceback" not in out + err, err
    assert sum(": error: " in line for line in err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("argv, phrase, env", CASES)
def test_bad_input_is_one_message_and_no_run(bad, tracking, monkeypatch, capsys, argv, phrase, env):
    experiment = f"bad-input-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment)
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(port=free_port()))
    monkeypatch.chdir(bad["root"])  # where a default sqlite store or optuna.db would land
    _refused(capsys, [part.format(**bad) for part in argv], phrase)
    assert _runs(tracking, experiment) == []
    assert not (Path(bad["root"]) / "mlflow.db").exists()


def test_a_diverging_loss_fails_the_run_naming_the_step(bad, tracking, monkeypatch, capsys):
    experiment = f"bad-input-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment)
    argv = [part.format(**bad) for part in (*TRAIN, "--lr", "1e30")]
    error = _refused(capsys, argv, "training diverged")
    assert "at step " in error and "lower lr" in error and "grad_clip" in error
    [run] = _runs(tracking, experiment)
    assert run.info.status == "FAILED"


@pytest.mark.parametrize("total_steps", range(1, 31))
def test_every_short_schedule_steps_through(total_steps):
    """OneCycleLR divides by the length of its warm-up phase, zero for 0.1 of 10 steps."""
    config = TrainConfig(epochs=1)
    state = build_state(create_model("tiny", "none"), 4, config, total_steps, torch.device("cpu"))
    rates = []
    for _ in range(total_steps):
        state.optimizer.step()
        state.scheduler.step()
        rates.append(state.scheduler.get_last_lr()[0])
    assert all(0 < rate <= config.lr for rate in rates), rates


def test_a_run_of_exactly_ten_steps_trains(bad, tracking, monkeypatch, capsys):
    experiment = f"ten-steps-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment)
    argv = [part.format(**bad) for part in TRAIN]
    images = 60  # the specimens' training rows (not test, not val): 6 per step make 10 steps
    assert main([*argv, "--batch_size", "6"]) == 0, capsys.readouterr().err
    [run] = _runs(tracking, experiment)
    assert run.info.status == "FINISHED" and run.data.params["train_images"] == str(images)
    client = MlflowClient(tracking_uri=tracking)
    history = client.get_metric_history(run.info.run_id, names.TRAIN_LOSS)
    assert sorted(m.step for m in history) == list(range(1, images // 6 + 1))


def test_a_pickled_weights_file_is_refused_without_torchs_warning(bad, tracking, monkeypatch,
                                                                  capsys):
    """torch warns of the pickle protocol before refusing the file: only our message shows."""
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"bad-input-{uuid.uuid4().hex[:8]}")
    argv = [part.format(**bad) for part in (*EVAL, "--weights", "{pickled}")]
    error = _refused(capsys, argv, "pickled.pt")
    assert "Warning" not in error and len(error.strip().splitlines()) == 1, error


def test_genus_only_names_train_at_genus(bad, tmp_path, monkeypatch, capsys):
    """Rows named to genus only have no species: label=genus trains and scores them (the species
    rows of the table are empty, not an "empty gallery" refusal)."""
    import pandas as pd

    from tests.helpers import sqlite_tracking

    sqlite_tracking(monkeypatch, tmp_path, "genus-only")
    monkeypatch.chdir(tmp_path)  # the sqlite store's artifacts land in ./mlruns
    table = read_manifest(bad["specimens"]).table
    manifest = tmp_path / "genus_only.csv"
    pd.DataFrame({"fileNameAsDelivered": table["image_path"], "scientificName": table["genus"],
                  "taxa": table["taxa"]}).to_csv(manifest, index=False)
    argv = [part.format(**bad) for part in TRAIN]
    assert main([*argv, "--data", str(manifest), "--label", "genus", "--metric",
                 "All/genus/top1_cos"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "All   genus" in out and "the model: epoch 1 of 1" in out, out
