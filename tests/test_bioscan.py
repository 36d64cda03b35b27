"""BIOSCAN-5M: the fixture in its format loads with every rank, the official split's gallery,
queries and seen/unseen rows, any rank as a level and as a training label."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from taxonclip import names
from taxonclip.cli import main
from taxonclip.config import DataConfig, EvalConfig, TrainConfig
from taxonclip.config_checks import check_table_key
from taxonclip.data.bioscan import METADATA_FILES, METADATA_FOLDERS, write_fixture
from taxonclip.data.manifest import read_manifest
from taxonclip.data.splits import make_split, official_split
from taxonclip.errors import ConfigError, DataError, MetricNotInTable
from taxonclip.table import OFFICIAL_SEEN, check_metric_cell, evaluation_table
from taxonclip.training.data import prepare_data
from tests.helpers import sqlite_tracking


@pytest.fixture(scope="module")
def bioscan(tmp_path_factory):
    """The small BIOSCAN-5M-format set of `data synth --format bioscan5m`."""
    return write_fixture(tmp_path_factory.mktemp("bioscan5m"), seed=0, size=32)


def _cell(table: pd.DataFrame, taxa: str, level: str) -> pd.Series:
    return table[(table["taxa"] == taxa) & (table["level"] == level)].iloc[0]


def test_fixture_loads_with_every_rank_and_paths_relative_to_the_root(bioscan):
    folder = read_manifest(bioscan)
    for form in (bioscan / "bioscan5m", bioscan / "bioscan5m" / METADATA_FOLDERS[0] / METADATA_FILES[0]):
        assert read_manifest(form).table.equals(folder.table)
    assert folder.levels == names.BIOSCAN_LEVELS
    table = folder.table
    assert list(table.columns[:6]) == ["image_id", "image_path", "scientific_name", "species",
                                       "genus", "taxa"]
    assert set(names.BIOSCAN_RANKS) <= set(table.columns)
    assert (table["taxa"] == table["order"]).all() and table["taxa"].nunique() == 2
    assert table["family"].nunique() == 4 and table["genus"].nunique() == 8
    assert table["species"].nunique() == 24
    assert table["species"].isna().any() and table["genus"].isna().any()
    train = table[table["split"] == "train"]
    assert train["image_id"].str.match(r"images/cropped_256/train/[0-9a-f]/SYNTH\d{5}-24\.jpg$").all()
    assert table.loc[table["split"] == "test", "image_id"].str.match(
        r"images/cropped_256/test/SYNTH\d{5}-24\.jpg$").all()  # a blank chunk has no folder
    unseen = table.loc[table["split"].str.endswith("unseen"), "species"].dropna()
    assert not set(unseen) & set(train["species"].dropna())
    # the lowest known rank names a row
    no_genus = table[table["genus"].isna()].iloc[0]
    assert no_genus["scientific_name"] == no_genus["family"]


def test_data_check_shows_every_rank(bioscan, capsys):
    assert main(["data", "check", str(bioscan), "--split", "official"]) == 0
    printed = capsys.readouterr().out
    table = read_manifest(bioscan).table
    for rank in names.BIOSCAN_RANKS:
        assert f"  {rank}: {table[rank].nunique()} classes, {table[rank].notna().sum()} rows" \
            in printed
    assert "gallery train + key_unseen" in printed and "queries test + test_unseen" in printed


def test_eval_official_has_every_rank_and_seen_unseen_rows(bioscan, tmp_path, monkeypatch,
                                                           capsys):
    sqlite_tracking(monkeypatch, tmp_path, "bioscan-official")
    assert main(["eval", "--model", "tiny", "--data", str(bioscan), "--split", "official",
                 "--workers", "0"]) == 0
    out = capsys.readouterr().out
    # the table says which partitions it scored, on the screen and in the run's tag
    assert "queries: test + test_unseen" in out and "gallery: train + key_unseen" in out
    import mlflow

    run = mlflow.search_runs(experiment_names=["bioscan-official"]).iloc[0]
    assert run[f"tags.{names.TAG_SCORED}"].startswith("queries: test + test_unseen")
    assert np.isfinite(run["metrics.eval/All:unseen/order/top1_cos"])
    assert np.isfinite(run["metrics.eval/All/dna_bin/top1_cos"])
    rows = [line.split()[:2] for line in out.splitlines()]
    for rank in names.BIOSCAN_LEVELS.scored:
        assert ["All", rank] in rows
    below_order = ("family", "subfamily", "genus", "species", "dna_bin")
    for scope in ("Diptera", "Hymenoptera"):
        assert [[scope, level] for level in below_order] == [r for r in rows if r[:1] == [scope]]
    for scope in ("All:seen", "All:unseen"):  # at every rank, order included
        assert [[scope, level] for level in names.BIOSCAN_LEVELS.scored] == \
            [r for r in rows if r[:1] == [scope]]


def test_official_table_equals_a_brute_force_nearest_neighbour(bioscan):
    table = read_manifest(bioscan).table
    split = official_split(table)
    vectors = torch.randn(len(table), 8, generator=torch.Generator().manual_seed(0))
    result = evaluation_table(vectors, table, split, seen=OFFICIAL_SEEN, chunk_size=EvalConfig().chunk_size,
                              levels=names.BIOSCAN_LEVELS)
    seen = table["split"].isin(["train", "val", "test"]).to_numpy()
    for scope, query_side in (("All", np.ones(len(table), bool)), ("All:unseen", ~seen)):
        for level in ("family", "species"):
            assert _cell(result, scope, level)["top1_cos"] == pytest.approx(
                _brute_force_top1(vectors, table[level], split, query_side))


def _brute_force_top1(vectors, labels: pd.Series, split, query_side: np.ndarray) -> float:
    """Top-1 cosine accuracy over the queries with a label whose class is in the gallery."""
    unit = F.normalize(vectors, dim=1).numpy()
    gallery = [i for i in split.train if pd.notna(labels[i])]
    hits = []
    for query in split.test:
        if not query_side[query] or pd.isna(labels[query]):
            continue
        if labels[query] not in set(labels[gallery]):
            continue  # a lone query: not scored
        nearest = gallery[int(np.argmax(unit[gallery] @ unit[query]))]
        hits.append(labels[nearest] == labels[query])
    return float(np.mean(hits))


def test_a_row_missing_a_rank_is_left_out_of_that_rank_only(bioscan):
    table = read_manifest(bioscan).table
    split = official_split(table)
    result = evaluation_table(torch.randn(len(table), 4), table, split, chunk_size=EvalConfig().chunk_size,
                              levels=names.BIOSCAN_LEVELS)
    queries = table.iloc[split.test]
    for rank in names.BIOSCAN_RANKS:
        assert _cell(result, "All", rank)["n_test"] == queries[rank].notna().sum()
    assert queries["genus"].isna().any() and queries["family"].notna().all()


def test_label_family_trains_on_the_family_of_every_train_row_with_one(bioscan):
    data = prepare_data(TrainConfig(data=DataConfig(data=str(bioscan), split="official"),
                                    label="family", batch_size=8))
    table = data.manifest.table
    expected = table.index[(table["split"] == "train") & table["family"].notna()]
    assert sorted(data.rows) == list(expected)
    assert data.classes == sorted(table["family"].unique())
    assert [data.classes[c] for c in data.labels] == table["family"].iloc[data.rows].tolist()
    assert data.seen == OFFICIAL_SEEN


def test_label_order_on_vlm4bio_data_is_refused_naming_its_ranks(specimens):
    with pytest.raises(ConfigError, match="has the ranks species, genus; choose one of them"):
        prepare_data(TrainConfig(data=DataConfig(data=str(specimens)), label="order"))
    with pytest.raises(ConfigError, match="'label' is 'tribe'"):
        TrainConfig(label="tribe")


def test_official_split_needs_a_split_column_and_no_class_fraction(specimens):
    with pytest.raises(DataError, match="split=official needs a 'split' column"):
        make_split(read_manifest(specimens).table, DataConfig(split="official"))
    with pytest.raises(ConfigError, match="class_fraction"):
        DataConfig(split="official", class_fraction=0.5)
    with pytest.raises(ConfigError, match="parameter 'split'"):
        DataConfig(split="random")


def test_metric_cells_of_any_rank(bioscan):
    check_table_key("metric", "All/family/top1_cos")
    check_metric_cell("Diptera/genus/top1_cos", ["Diptera"], False, names.BIOSCAN_LEVELS)
    check_metric_cell("All:unseen/species/top1_cos", ["Diptera"], True, names.BIOSCAN_LEVELS)
    with pytest.raises(MetricNotInTable):
        check_metric_cell("Diptera/order/top1_cos", ["Diptera"], False, names.BIOSCAN_LEVELS)
    with pytest.raises(MetricNotInTable):
        check_metric_cell("All/family/top1_cos", ["Fish"], False)


def test_data_synth_writes_either_format(tmp_path, capsys):
    assert main(["data", "synth", "--format", "bioscan5m", "--out", str(tmp_path / "b"),
                 "--size", "16"]) == 0
    assert (tmp_path / "b" / "bioscan5m" / METADATA_FOLDERS[0] / METADATA_FILES[0]).is_file()
    assert main(["data", "synth", "--format", "vlm4bio", "--out", str(tmp_path / "v"),
                 "--taxa", "1", "--genera", "1", "--species", "2", "--images", "2",
                 "--size", "16"]) == 0
    assert "rows: 4" in capsys.readouterr().out
