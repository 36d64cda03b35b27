"""One helper draws the classes that a class_fraction keeps, for train and eval alike."""

from __future__ import annotations

import pytest

from taxonclip.captions.prompts import query_rows
from taxonclip.config import DataConfig, EvalConfig, TrainConfig
from taxonclip.data.manifest import read_manifest
from taxonclip.data.splits import select_classes
from taxonclip.data.subset import class_subset
from taxonclip.evaluation import prepare_evaluation
from taxonclip.train import prepare_data


@pytest.mark.parametrize("fraction, seed", [(0.5, 0), (0.34, 3)])
def test_train_and_eval_keep_the_same_species(specimens, fraction, seed):
    data = DataConfig(data=str(specimens), class_fraction=fraction, seed=seed)
    trained = prepare_data(TrainConfig(data=data, label="species", batch_size=8))
    manifest, split = prepare_evaluation(EvalConfig(data=data, workers=0, device="cpu"))
    evaluated = set(manifest.table["species"])
    assert 0 < len(evaluated) < trained.manifest.table["species"].nunique()
    assert trained.seen.classes == evaluated
    assert set(trained.manifest.table["species"].iloc[trained.rows]) == evaluated
    # a caption prompt may name no row that is an evaluation's query
    whole = trained.manifest.table
    may_not_name = set(whole["image_id"].iloc[query_rows(whole, data)])
    assert set(manifest.table["image_id"].iloc[split.test]) <= may_not_name


def test_class_subset_marks_the_rows_of_the_selected_classes(specimens):
    table = read_manifest(specimens).table
    assert class_subset(table, DataConfig(data=str(specimens)), "species") is None
    subset = class_subset(table, DataConfig(data=str(specimens), class_fraction=0.5, seed=2), "genus")
    assert subset.level == "genus"
    assert subset.classes == frozenset(select_classes(table, 0.5, 2, "genus"))
    assert list(subset.rows) == list(table["genus"].isin(subset.classes))
