"""Results that mean what they say: no label reaches a query, every random draw is seeded, every
row with a label is used, taxa names cannot merge rows, nothing empty passes, groups stay on one
side of the split. Each case that a user can cause ends in one message and no MLflow run."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys

import mlflow
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from taxonclip import names
from taxonclip.cli import main
from taxonclip.config import DataConfig, EvalConfig, ModelConfig, TrainConfig
from taxonclip.data.manifest import read_manifest
from taxonclip.errors import DataError
from taxonclip.checks import label_revealing_captions
from taxonclip.embed import embed_images, fuse
from taxonclip.evaluation import evaluate
from taxonclip.table import evaluation_table, split_csv
from taxonclip.models import create_model
from taxonclip.training.data import prepare_data

LEAKING_MODES = ("text", "avg", "concat")
# With random weights the gallery-side fusion may shift scores a little either way; a leak puts
# them near 100%, far beyond this.
NO_LEAK_MARGIN = 0.10


def _species_top1(table: pd.DataFrame) -> float:
    row = table[(table["taxa"] == names.ALL_TAXA) & (table["level"] == "species")]
    return float(row["top1_cos"].item())


def _leeds_config(leeds, embedding: str, **data) -> EvalConfig:
    return EvalConfig(data=DataConfig(data=str(leeds), **data), model=ModelConfig("tiny", "none"),
                      embedding=embedding, workers=0, batch_size=128, cache_embeddings=False,
                      device="cpu")


@pytest.fixture(scope="module")
def random_tiny():
    return create_model("tiny", "none", seed=0)


@pytest.mark.parametrize("source", ["captions file", "caption column"])
def test_per_species_text_never_reaches_a_query_on_the_butterflies(leeds, random_tiny, source):
    """Random weights: every mode that would fuse a per-species text into a query is refused,
    and the sound one (text on the gallery side) scores near the visual-only figure."""
    text = ({"captions": str(leeds / "descriptions.csv")} if source == "captions file"
            else {"caption_column": "commonName"})
    visual = _species_top1(evaluate(_leeds_config(leeds, "visual"), random_tiny).table)
    for mode in LEAKING_MODES:
        with pytest.raises(DataError, match="reveal the label"):
            evaluate(_leeds_config(leeds, mode, **text), random_tiny)
    gallery = _species_top1(evaluate(_leeds_config(leeds, "gallery_avg", **text), random_tiny).table)
    assert gallery <= visual + NO_LEAK_MARGIN, (gallery, visual)


def test_the_refused_fusion_would_have_leaked(leeds, random_tiny):
    """The refusal guards a real leak: computed anyway, avg with field-guide texts scores far
    above visual-only with random weights."""
    result = evaluate(_leeds_config(leeds, "visual", captions=str(leeds / "descriptions.csv")),
                      random_tiny)
    table = result.manifest.table
    visual, _ = embed_images(random_tiny, table["image_path"].tolist(), batch_size=128, workers=0,
                             device=torch.device("cpu"))
    text = random_tiny.encode_text(table["caption"].tolist()).float()
    leaked = evaluation_table(fuse(visual, text, "avg"), table, result.split,
                              chunk_size=EvalConfig().chunk_size)
    assert _species_top1(leaked) > _species_top1(result.table) + 0.3


def test_captions_that_name_their_species_or_are_one_per_species_are_detected():
    table = pd.DataFrame({"scientific_name": ["A b", "A b", "C d", "C d"],
                          "caption": ["on a leaf", "in flight", "on a leaf", "at rest"]})
    assert label_revealing_captions(table) is None
    shared = table.assign(caption=["on a leaf", "on a leaf", "on a leaf", "on a leaf"])
    assert label_revealing_captions(shared) is None  # one text for everything names nothing
    per_name = table.assign(caption=["orange", "orange", "blue", "blue"])
    assert "one text per species" in label_revealing_captions(per_name)
    naming = table.assign(caption=["a photo of A b", "in flight", "on a leaf", "at rest"])
    assert "names the image's own label" in label_revealing_captions(naming)


def _runs_in(experiment: str) -> list:
    found = MlflowClient().get_experiment_by_name(experiment)
    return [] if found is None else MlflowClient().search_runs([found.experiment_id])


def _refused(capsys, argv: list[str], phrase: str) -> None:
    """The command exits 1 with `phrase` in one message and no traceback."""
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert phrase in error and "Traceback" not in error, error


def test_leaking_eval_and_train_stop_before_any_run(leeds, tracking, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "refused-leak")
    captions = ["--captions", str(leeds / "descriptions.csv"), "--workers", "0"]
    _refused(capsys, ["eval", "--model", "tiny", "--weights", "none", "--data", str(leeds),
                      "--embedding", "avg", *captions], "reveal the label")
    _refused(capsys, ["train", "--model", "tiny", "--data", str(leeds), "--embedding", "concat",
                      "--batch_size", "16", *captions], "reveal the label")
    assert _runs_in("refused-leak") == []


def _digest(encoder) -> str:
    digest = hashlib.sha256()
    for value in encoder.state_dict().values():
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()


def _digest_in_another_process(seed: int) -> str:
    """The digest of tiny's `weights=none` init for `seed`, built in a process of its own after
    drawing other numbers first."""
    code = ("import hashlib, sys, torch; from taxonclip.models import create_model\n"
            "torch.randn(123)\n"
            "m = create_model('tiny', 'none', seed=int(sys.argv[1]))\n"
            "h = hashlib.sha256()\n"
            "[h.update(v.numpy().tobytes()) for v in m.state_dict().values()]\n"
            "print(h.hexdigest())")
    return subprocess.run([sys.executable, "-c", code, str(seed)], check=True,
                          capture_output=True, text=True).stdout.strip()


def test_weights_none_is_one_init_per_seed_in_every_process():
    here = _digest(create_model("tiny", "none", seed=3))
    assert _digest_in_another_process(3) == here
    assert _digest(create_model("tiny", "none", seed=4)) != here


def test_weights_none_does_not_depend_on_what_was_drawn_before():
    torch.manual_seed(11)
    first = create_model("tiny", "none", seed=3)
    torch.randn(1000)
    second = create_model("tiny", "none", seed=3)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)


def test_two_identical_random_init_trainings_log_identical_losses(specimens, tracking, monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "seeded-init")
    argv = ["train", "--model", "tiny", "--weights", "none", "--seed", "3", "--epochs", "1",
            "--data", str(specimens), "--batch_size", "16", "--workers", "0"]
    assert main(argv) == 0 and main(argv) == 0
    client = MlflowClient()
    losses = [[(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id,
                                                                           names.TRAIN_LOSS),
                                                  key=lambda m: m.step)]
              for run in _runs_in("seeded-init")]
    assert len(losses) == 2 and losses[0] == losses[1] and len(losses[0]) > 0


def _genus_only_manifest(specimens, tmp_path):
    """The specimens with a quarter of the rows named to genus only ('Genus sp.' or 'Genus')
    and one row named by a family."""
    table = read_manifest(specimens).table
    genus_only = table.index % 4 == 0
    table.loc[genus_only, "scientific_name"] = [
        f"{genus} sp." if i % 8 == 0 else genus
        for i, genus in zip(table.index[genus_only], table.loc[genus_only, "genus"])]
    table.loc[1, "scientific_name"] = "Scaridae"
    csv = tmp_path / "genus_only.csv"
    table.assign(fileNameAsDelivered=table["image_path"], scientificName=table["scientific_name"])[
        ["fileNameAsDelivered", "scientificName", "taxa"]].to_csv(csv, index=False)
    return csv


def test_genus_labels_train_on_every_row_with_a_genus(specimens, tmp_path):
    csv = _genus_only_manifest(specimens, tmp_path)
    data = prepare_data(TrainConfig(data=DataConfig(data=str(csv)), label="genus", batch_size=8))
    table = data.manifest.table
    with_genus = [row for row in data.split.training_rows if pd.notna(table.at[row, "genus"])]
    assert sorted(data.rows) == with_genus
    assert table["species"].iloc[data.rows].isna().sum() > 0  # genus-only rows are in
    assert data.classes == sorted(table["genus"].dropna().unique())
    species = prepare_data(TrainConfig(data=DataConfig(data=str(csv)), label="species", batch_size=8))
    assert table["species"].iloc[species.rows].notna().all()


def test_genus_fraction_selects_genera_and_splits_seen_by_genus(specimens, tmp_path):
    csv = _genus_only_manifest(specimens, tmp_path)
    config = TrainConfig(data=DataConfig(data=str(csv), class_fraction=0.5), label="genus",
                         batch_size=8)
    data = prepare_data(config)
    assert data.seen.level == "genus" and len(data.seen.classes) == 2
    assert set(data.manifest.table["genus"].iloc[data.rows]) == set(data.seen.classes)


def test_data_check_says_what_each_level_scores_and_trains_on(specimens, tmp_path, capsys):
    csv = _genus_only_manifest(specimens, tmp_path)
    assert main(["data", "check", str(csv)]) == 0
    printed = capsys.readouterr().out
    table = read_manifest(csv).table
    assert "named above genus (e.g. a family): 1: scored at taxa level only, never trained on" in printed
    for level in names.LEVELS:
        assert f"  {level}: {table[level].nunique()} classes, {table[level].notna().sum()} rows" in printed


def _with_taxa(specimens, tmp_path, taxa: list[str]):
    table = read_manifest(specimens).table
    csv = tmp_path / "taxa.csv"
    table.assign(fileNameAsDelivered=table["image_path"], scientificName=table["scientific_name"],
                 taxa=[taxa[i % len(taxa)] for i in range(len(table))])[
        ["fileNameAsDelivered", "scientificName", "taxa"]].to_csv(csv, index=False)
    return csv


@pytest.mark.parametrize("taxa, phrase", [
    (["All", "Fish"], "taxa 'All' takes the name of the table's overall row"),
    (["All:seen", "Fish"], "taxa 'All:seen' takes the name"),
    (["a/b", "a_b"], "taxa 'a/b' and 'a_b' would share the metric key eval/a_b/"),
])
def test_taxa_that_would_merge_rows_are_refused_by_every_command(specimens, tmp_path, capsys,
                                                                 taxa, phrase):
    csv = str(_with_taxa(specimens, tmp_path, taxa))
    _refused(capsys, ["data", "check", csv], phrase)
    _refused(capsys, ["eval", "--data", csv, "--workers", "0"], phrase)
    _refused(capsys, ["train", "--data", csv, "--workers", "0", "--batch_size", "8"], phrase)


def test_invisible_marks_do_not_split_a_name(specimens, tmp_path):
    table = read_manifest(specimens).table
    first = table["scientific_name"].iloc[0]
    marked = table["scientific_name"].where(table.index % 2 == 1, first[:3] + "\u200b" + first[3:])
    csv = tmp_path / "marked.csv"
    table.assign(fileNameAsDelivered=table["image_path"], scientificName="\u202a" + marked)[
        ["fileNameAsDelivered", "scientificName", "taxa"]].to_csv(csv, index=False)
    assert set(read_manifest(csv).table["scientific_name"]) == set(table["scientific_name"])


def test_nothing_empty_passes_and_no_run_is_left(specimens, tmp_path, tracking, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "refused-empty")
    table = read_manifest(specimens).table.drop_duplicates("scientific_name")
    csv = tmp_path / "singletons.csv"
    table.assign(fileNameAsDelivered=table["image_path"], scientificName=table["scientific_name"])[
        ["fileNameAsDelivered", "scientificName", "taxa"]].to_csv(csv, index=False)
    _refused(capsys, ["data", "check", str(csv)], "the split has no test image to score")
    _refused(capsys, ["eval", "--data", str(csv), "--workers", "0"], "no test image to score")
    _refused(capsys, ["train", "--data", str(csv), "--workers", "0"], "no test image to score")
    _refused(capsys, ["train", "--data", str(specimens), "--workers", "0", "--batch_size", "16",
                      "--grad_accum", "64"], "make no optimiser step")
    assert _runs_in("refused-empty") == []


def _grouped_manifest(specimens, tmp_path, plant_copy: bool = False):
    """The specimens in clips of 2 or 3 consecutive images of one species, optionally with a byte
    copy of one image added as a row of its own."""
    table = read_manifest(specimens).table
    clip = table.groupby("scientific_name").cumcount() // (2 + table.index % 2)
    table = table.assign(clip=table["scientific_name"] + "#" + clip.astype(str))
    if plant_copy:
        copy = tmp_path / "copy_of_first.png"
        shutil.copy(table["image_path"].iloc[0], copy)
        table = pd.concat([table, table.iloc[[0]].assign(image_path=str(copy), clip="lone")])
    csv = tmp_path / "grouped.csv"
    table.assign(fileNameAsDelivered=table["image_path"], scientificName=table["scientific_name"])[
        ["fileNameAsDelivered", "scientificName", "taxa", "clip"]].to_csv(csv, index=False)
    return csv


def test_group_column_keeps_every_clip_on_one_side_and_the_split_records_it(specimens, tmp_path, tiny_pretrained):
    csv = _grouped_manifest(specimens, tmp_path)
    config = EvalConfig(data=DataConfig(data=str(csv), group_column="clip"), workers=0,
                        cache_embeddings=False, device="cpu")
    result = evaluate(config, tiny_pretrained)
    assert result.split.grouped
    table = result.manifest.table
    sides = pd.Series("train", index=table.index)
    sides.iloc[result.split.test] = "test"
    assert (table.assign(side=sides).groupby("group")["side"].nunique() == 1).all()
    assert len(result.split.test) > 0
    artifact = pd.read_csv(pd.io.common.StringIO(split_csv(result)))
    assert list(artifact.columns) == ["image_id", "split", "group"]
    assert artifact.groupby("group")["split"].nunique().max() == 1


@pytest.fixture(scope="module")
def tiny_pretrained():
    return create_model("tiny", "pretrained")


def _seed_splitting_the_copy(csv, capsys) -> tuple[int, str]:
    """A seed whose split puts the planted copy and its original on two sides, and what
    `data check` printed for it."""
    for seed in range(20):
        assert main(["data", "check", str(csv), "--seed", str(seed)]) == 0
        printed = capsys.readouterr().out
        if "of them with a copy in train and one in test: 1" in printed:
            return seed, printed
    pytest.fail("no seed put the copy and its original on two sides")


def test_data_check_reports_a_planted_cross_split_duplicate(specimens, tmp_path, capsys):
    csv = _grouped_manifest(specimens, tmp_path, plant_copy=True)
    seed, printed = _seed_splitting_the_copy(csv, capsys)
    assert "copy_of_first.png" in printed and "accuracy is inflated" in printed
    assert "group_column" in printed
    assert main(["data", "check", str(csv), "--seed", str(seed), "--group_column", "clip"]) == 0
    assert "groups with images in train and in test: 0" in capsys.readouterr().out


def test_a_run_on_a_leaking_split_warns_and_logs_the_audit(specimens, tmp_path, tracking,
                                                           monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "leaking-split")
    csv = _grouped_manifest(specimens, tmp_path, plant_copy=True)
    seed, _ = _seed_splitting_the_copy(csv, capsys)
    assert main(["eval", "--data", str(csv), "--seed", str(seed), "--workers", "0"]) == 0
    assert "inflates accuracy; `taxonclip data check` lists them" in capsys.readouterr().err
    [run] = _runs_in("leaking-split")
    summary = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/{names.DATA_SUMMARY}")
    assert "of them with a copy in train and one in test: 1" in summary


def test_data_check_says_which_embeddings_the_captions_serve(leeds, specimens, tmp_path, capsys):
    assert main(["data", "check", str(leeds), "--captions", str(leeds / "descriptions.csv")]) == 0
    assert "captions: reveal the label" in capsys.readouterr().out
    assert main(["data", "check", str(_per_image_notes(specimens, tmp_path))]) == 0
    assert "captions: written per image" in capsys.readouterr().out


def _per_image_notes(specimens, tmp_path):
    table = read_manifest(specimens).table
    csv = tmp_path / "notes.csv"
    table.assign(fileNameAsDelivered=table["image_path"], scientificName=table["scientific_name"],
                 caption=[f"frame {i}" for i in range(len(table))])[
        ["fileNameAsDelivered", "scientificName", "taxa", "caption"]].to_csv(csv, index=False)
    return csv


def test_best_checkpoint_follows_the_configured_metric(specimens, tracking, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "selection-metric")
    metric = "All/genus/mean_cos"
    assert main(["train", "--model", "tiny", "--data", str(specimens), "--epochs", "3",
                 "--batch_size", "16", "--workers", "0", "--lr", "3e-3", "--metric", metric]) == 0
    [run] = _runs_in("selection-metric")
    client = MlflowClient()
    history = client.get_metric_history(run.info.run_id, names.val_metric(*metric.split("/")))
    best = max(history, key=lambda m: (m.value, -m.step))  # the first epoch of the best value
    last = client.download_artifacts(run.info.run_id, f"{names.CHECKPOINT_DIR}/epoch_003.pt",
                                     str(tmp_path))
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert (saved["best_epoch"], saved["best_metric"]) == (best.step, pytest.approx(best.value))
    assert run.data.params["metric"] == metric


def test_a_metric_the_table_lacks_is_refused_before_training(specimens, capsys):
    _refused(capsys, ["train", "--data", str(specimens), "--workers", "0", "--batch_size", "16",
                      "--metric", "Unicorn/species/top1_cos"], "has no such row")
    _refused(capsys, ["train", "--metric", "All/tribe/top1_cos"], "parameter 'metric'")
    # order is a level of BIOSCAN-5M tables, not of this VLM4Bio one
    _refused(capsys, ["train", "--data", str(specimens), "--workers", "0", "--batch_size", "16",
                      "--metric", "All/order/top1_cos"], "has no such row")
