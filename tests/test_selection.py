"""No decision on the test set: the validation rows are carved once from the train side; every
choice of a training (the best epoch, pruning, a sweep's objective) reads them alone; the
selected model is scored once on the test split, and no test image is read before."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

import taxonclip.train as train_module
import taxonclip.training.selection as selection_module
from taxonclip import names
from taxonclip.cli import main
from taxonclip.config import DataConfig, EvalConfig, TrainConfig
from taxonclip.data.bioscan import write_fixture
from taxonclip.data.images import ImageDataset
from taxonclip.data.manifest import read_manifest
from taxonclip.data.splits import make_split, split_fingerprint, split_roles, validation_split
from taxonclip.errors import ConfigError
from taxonclip.table import evaluation_table

FAST = ["--model", "tiny", "--batch_size", "16", "--workers", "0", "--lr", "3e-3",
        "--margin_s", "16", "--margin_m2", "0.2"]


def _clips(table: pd.DataFrame) -> pd.DataFrame:
    """The table with a `group` column: every two images of a species one clip."""
    return table.assign(group=[f"{s}-{i // 2}" for s, i in
                               zip(table["species"], table.groupby("species").cumcount())])


@pytest.mark.parametrize("grouped", [False, True])
def test_val_rows_are_carved_from_train_and_leave_the_test_rows_as_they_were(specimens, grouped):
    table = read_manifest(specimens).table
    table = _clips(table) if grouped else table
    data = DataConfig(group_column="group" if grouped else None)
    split = make_split(table, data)
    without = make_split(table, DataConfig(val_size=0.0))
    assert np.array_equal(split.test, without.test) and np.array_equal(split.train, without.train)
    assert len(split.val) > 0 and set(split.val) <= set(split.train)
    assert not set(split.training_rows) & (set(split.val) | set(split.test))
    assert len(split.training_rows) + len(split.val) == len(split.train)
    # every species keeps training images, and one of its images at least validates
    assert set(table["species"].iloc[split.val]) == set(table["species"])
    assert set(table["species"].iloc[split.training_rows]) == set(table["species"])
    if grouped:
        groups = table["group"]
        assert not set(groups.iloc[split.val]) & set(groups.iloc[split.training_rows])
    # the same draw whatever the rows' order
    shuffled = table.sample(frac=1, random_state=3).reset_index(drop=True)
    again = make_split(shuffled, data)
    assert set(shuffled["image_id"].iloc[again.val]) == set(table["image_id"].iloc[split.val])


def test_validation_scores_val_queries_against_the_rest_and_eval_ignores_val_size(specimens):
    table = read_manifest(specimens).table
    split = make_split(table, DataConfig())
    rows, val_split = validation_split(split)
    assert not set(rows) & set(split.test)
    assert set(table["image_id"].iloc[rows[val_split.test]]) == set(table["image_id"].iloc[split.val])
    assert set(rows[val_split.train]) == set(split.training_rows)
    # eval keeps the val rows in its gallery: its table does not depend on val_size
    vectors = torch.randn(len(table), 8)
    tables = [evaluation_table(vectors, table, make_split(table, DataConfig(val_size=size)),
                                   chunk_size=EvalConfig().chunk_size)
              for size in (0.0, 0.1, 0.3)]
    for other in tables[1:]:
        pd.testing.assert_frame_equal(other, tables[0])


def test_the_fingerprint_names_rows_and_roles_whatever_their_order(specimens):
    table = read_manifest(specimens).table
    order, roles = split_roles(make_split(table, DataConfig()))
    text = table.iloc[order][["image_id"]].assign(split=roles).to_csv(index=False)
    assert set(roles) == {"train", "val", "test"}
    reordered = pd.read_csv(io.StringIO(text)).iloc[::-1].to_csv(index=False)
    assert split_fingerprint(reordered) == split_fingerprint(text)
    moved = text.replace(",val\n", ",train\n", 1)
    assert split_fingerprint(moved) != split_fingerprint(text)


def test_select_best_without_val_rows_is_refused():
    with pytest.raises(ConfigError, match="val_size"):
        TrainConfig(data=DataConfig(val_size=0.0))
    assert TrainConfig(data=DataConfig(val_size=0.0), select="last").select == "last"


def _record_reads(monkeypatch) -> list[tuple[str, str]]:
    """(phase, image path) of every image read: `train`, or `evaluation <n>` during the n-th
    evaluation a training makes."""
    reads: list[tuple[str, str]] = []
    phase = ["train"]
    real_item, real_evaluate = ImageDataset.__getitem__, train_module.evaluate

    def item(self, i):
        reads.append((phase[0], self.paths[i]))
        return real_item(self, i)

    calls = []

    def evaluate(*args, **kwargs):
        calls.append(1)
        phase[0] = f"evaluation {len(calls)}"
        try:
            return real_evaluate(*args, **kwargs)
        finally:
            phase[0] = "train"

    monkeypatch.setattr(ImageDataset, "__getitem__", item)
    for module in (train_module, selection_module):  # the final test table; each validation
        monkeypatch.setattr(module, "evaluate", evaluate)
    return reads


def _test_paths(root, data: DataConfig) -> set[str]:
    table = read_manifest(root).table
    return set(table["image_path"].iloc[make_split(table, data).test])


def _check_test_read_last_and_once(reads: list[tuple[str, str]], test_paths: set[str]) -> None:
    phases = list(dict.fromkeys(phase for phase, _ in reads if phase != "train"))
    last = phases[-1]
    before = {path for phase, path in reads if phase != last}
    assert not before & test_paths, "a test image was read before the final evaluation"
    assert test_paths <= {path for phase, path in reads if phase == last}
    assert len(phases) >= 3  # two validations, then the final evaluation


def test_a_training_reads_no_test_image_before_its_final_evaluation(specimens, tracking,
                                                                    monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "no-test-before-the-end")
    reads = _record_reads(monkeypatch)
    assert main(["train", "--data", str(specimens), "--epochs", "2", *FAST]) == 0
    _check_test_read_last_and_once(reads, _test_paths(specimens, DataConfig()))
    printed = capsys.readouterr().out
    assert "the model: epoch" in printed and "test (scored once" in printed
    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("no-test-before-the-end")
                                .experiment_id])
    history = client.get_metric_history(run.info.run_id, names.val_metric("All", "species",
                                                                          "top1_cos"))
    assert sorted(m.step for m in history) == [1, 2]
    assert [m.step for m in client.get_metric_history(
        run.info.run_id, names.eval_metric("All", "species", "top1_cos"))] == [0]
    assert run.data.tags[names.TAG_SPLIT_FINGERPRINT]
    split_file = client.download_artifacts(run.info.run_id, names.SPLIT_ARTIFACT)
    assert set(pd.read_csv(split_file)["split"]) == {"train", "val", "test"}


def test_an_official_training_validates_on_val_partitions_and_tests_once(tmp_path, tracking,
                                                                         monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "official-selection")
    bioscan = write_fixture(tmp_path / "bioscan", seed=0, size=32)
    reads = _record_reads(monkeypatch)
    assert main(["train", "--data", str(bioscan), "--split", "official", "--epochs", "2",
                 "--model", "tiny", "--batch_size", "8", "--workers", "0", "--label", "genus",
                 "--metric", "All/genus/top1_cos"]) == 0
    table = read_manifest(bioscan).table
    test_paths = set(table["image_path"][table["split"].isin(["test", "test_unseen"])])
    val_paths = set(table["image_path"][table["split"].isin(["val", "val_unseen"])])
    _check_test_read_last_and_once(reads, test_paths)
    assert val_paths <= {path for phase, path in reads if phase == "evaluation 1"}


def test_select_last_keeps_the_last_epochs_weights(specimens, tracking, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "select-last")
    assert main(["train", "--data", str(specimens), "--epochs", "2", "--select", "last",
                 *FAST]) == 0
    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("select-last").experiment_id])
    assert run.data.tags[names.TAG_SELECTED_EPOCH] == "2"
    assert run.data.params["select"] == "last" and "select=last" in run.info.run_name
    assert "the model: epoch 2 of 2 (select=last" in capsys.readouterr().out
