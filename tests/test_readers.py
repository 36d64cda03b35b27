"""The reader registry: one interface for every format, each reader refusing a parameter it
does not honour; and BIOSCAN-5M read exactly as its owners define it (their loader, their
dtypes, their layout, their image packages)."""

from __future__ import annotations

import json
import shutil
from dataclasses import fields

import pandas as pd
import pytest
import torch

from taxonclip import config as cfg
from taxonclip import names
from taxonclip.cli import SYNTH_FORMATS, main
from taxonclip.data import bioscan
from taxonclip.data.manifest import read_manifest
from taxonclip.data.readers import bioscan5m, registry
from taxonclip.data.readers.base import ReadOptions
from taxonclip.data.shards import PREPARED_FILE
from taxonclip.data.splits import official_split
from taxonclip.errors import ConfigError, DataError
from taxonclip.table import OFFICIAL_SEEN, evaluation_table, scored_note

# a value for each reading parameter, to hand a reader that may not take it
GIVEN = {"image_column": "file", "name_column": "name", "taxa": "Fish", "caption_column": "text",
         "group_column": "specimen", "missing": "skip", "image_package": "cropped_256",
         "text_key": "sci", "queries": "/nowhere/shard-000000.tar"}


@pytest.fixture(scope="module")
def bioscan_root(tmp_path_factory):
    """`data synth --format bioscan5m`: the owners' root folder holding `bioscan5m/`."""
    return bioscan.write_fixture(tmp_path_factory.mktemp("bioscan5m") / "root", seed=0, size=16)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, specimens, bioscan_root):
    """A `data` value of every format (the prepared one only as far as detection looks)."""
    from taxonclip.data.treeoflife import fixture_patterns, write_fixture

    folder = tmp_path_factory.mktemp("formats")
    manifest = folder / "manifest"
    manifest.mkdir()
    pd.DataFrame({"file": ["a.png"], "name": ["Danaus plexippus"]}).to_csv(
        manifest / "metadata.csv", index=False)
    prepared = folder / "prepared"
    prepared.mkdir()
    (prepared / PREPARED_FILE).write_text(json.dumps({"format": "x"}))
    treeoflife = fixture_patterns(write_fixture(folder / "treeoflife", size=16))[0]
    return {"vlm4bio": str(specimens), "manifest": str(manifest / "metadata.csv"),
            "bioscan5m": str(bioscan_root), "prepared": str(prepared), "treeoflife": treeoflife}


def test_the_registry_is_the_formats_the_config_and_the_cli_name():
    assert (registry.AUTO, *registry.names()) == cfg.DATA_FORMATS
    assert set(SYNTH_FORMATS) == {r.name for r in registry.READERS if r.write_fixture is not None}
    options = {f.name for f in fields(ReadOptions)}
    for reader in registry.READERS:
        assert reader.honours <= options and "missing" in reader.honours, reader.name
    assert cfg.BIOSCAN_IMAGE_PACKAGES == bioscan.IMAGE_PACKAGES
    from taxonclip.data.treeoflife import TEXT_KEYS

    assert cfg.TREEOFLIFE_TEXT_KEYS == tuple(TEXT_KEYS)


def test_each_format_is_detected_by_its_own_reader(datasets):
    for name, data in datasets.items():
        assert registry.choose(data).name == name


@pytest.mark.parametrize("reader", registry.READERS, ids=lambda r: r.name)
def test_every_reader_refuses_a_parameter_it_does_not_honour(reader, datasets):
    refused = [name for name in GIVEN if name not in reader.honours]
    assert refused, f"{reader.name} honours every parameter"
    for name in refused:
        with pytest.raises(ConfigError, match=f"'{name}' does not apply to {reader.title}"):
            read_manifest(datasets[reader.name], **{name: GIVEN[name]})


def test_format_names_the_reader_and_an_unknown_one_is_refused(specimens):
    with pytest.raises(DataError, match="no VLM4Bio group folders"):
        read_manifest(specimens / "Fish", format="vlm4bio")
    assert read_manifest(specimens, format="vlm4bio").report.format == "vlm4bio"
    with pytest.raises(ConfigError, match="parameter 'format'"):
        cfg.DataConfig(format="bioscan")
    with pytest.raises(ConfigError, match="'queries'.*split=official"):
        cfg.DataConfig(queries="a.tar")


def test_the_owners_loader_reads_the_fixture_and_every_image_path_exists(bioscan_root):
    from bioscan_dataset import load_bioscan5m_metadata
    from bioscan_dataset.bioscan5m import VALID_SPLITS, get_image_path

    dataset = bioscan_root / bioscan.DATASET_FOLDER
    file = dataset / "metadata" / "csv" / "BIOSCAN_5M_Insect_Dataset_metadata.csv"
    assert pd.read_csv(file, nrows=0).columns.tolist() == list(bioscan.COLUMNS)  # all 23, in order
    owners = load_bioscan5m_metadata(file)
    images = dataset / "images" / "cropped_256"
    paths = [images / get_image_path(row) for _, row in owners.iterrows()]
    assert paths and all(p.is_file() for p in paths)
    assert set(owners["split"]) == set(VALID_SPLITS)
    chunks = owners.groupby("split")["chunk"].agg(lambda c: set(c.dropna()))
    assert all(len(c) == 1 and c in "0123456789abcdef" for c in chunks["train"])
    assert all(len(c) == 2 for c in chunks["pretrain"]) and chunks["pretrain"]
    assert not chunks["test"] and chunks["other_heldout"]
    assert owners.loc[owners["split"] == "pretrain", "species"].isna().all()
    unseen = set(owners.loc[owners["split"].str.endswith("unseen"), "species"].dropna())
    assert unseen and all(" sp. " in name for name in unseen)  # placeholder names
    assert not unseen & set(owners.loc[owners["split"] == "train", "species"].dropna())


def test_the_table_has_the_owners_dtypes_and_not_classified_is_blank(bioscan_root):
    from bioscan_dataset import load_bioscan5m_metadata
    from bioscan_dataset.bioscan5m import COLUMN_DTYPES

    assert bioscan.COLUMN_DTYPES == COLUMN_DTYPES
    manifest = read_manifest(bioscan_root)
    file = bioscan5m.metadata_file(bioscan_root)
    owners = load_bioscan5m_metadata(file, max_nucleotides=None)
    ours = bioscan5m.read_metadata(file)
    assert (ours.dtypes == owners[ours.columns].dtypes).all()
    assert ours["coord-lat"].dtype == float and ours["order"].dtype == "category"
    table = manifest.table
    assert (table["coord-lon"].isna() == owners.loc[owners["order"].notna(), "coord-lon"]
            .isna().to_numpy()).all()
    assert (owners["subfamily"] == bioscan.NOT_CLASSIFIED).any()
    assert not (table["subfamily"] == bioscan.NOT_CLASSIFIED).any()
    assert table["subfamily"].isna().sum() > table["family"].isna().sum()
    assert manifest.levels.scored[-1] == "dna_bin"
    assert table["dna_bin"].notna().sum() > table["species"].notna().sum()
    # the BIN reaches rows that have no species name
    assert table.loc[table["species"].isna(), "dna_bin"].nunique() > 0


def test_not_classified_rows_leave_that_rank_only(bioscan_root):
    table = read_manifest(bioscan_root).table
    split = official_split(table)
    result = evaluation_table(torch.randn(len(table), 4, generator=torch.Generator().manual_seed(0)),
                              table, split, seen=OFFICIAL_SEEN, levels=names.BIOSCAN_LEVELS,
                              chunk_size=cfg.EvalConfig().chunk_size)
    queries = table.iloc[split.test]
    for level in names.BIOSCAN_LEVELS.scored:
        row = result[(result["taxa"] == "All") & (result["level"] == level)].iloc[0]
        assert row["n_test"] == queries[level].notna().sum(), level
    seen_rows = result[result["taxa"].isin(["All:seen", "All:unseen"])]
    assert sorted(set(seen_rows["level"])) == sorted(names.BIOSCAN_LEVELS.scored)
    assert "queries: test + test_unseen" in scored_note(table, split)


def test_every_form_of_the_owners_layout_reads_the_same(bioscan_root, tmp_path):
    whole = read_manifest(bioscan_root).table
    dataset = bioscan_root / bioscan.DATASET_FOLDER
    assert read_manifest(dataset).table.equals(whole)
    copy = tmp_path / "bioscan5m"
    shutil.copytree(dataset, copy)
    csv = copy / "metadata" / "csv" / "BIOSCAN_5M_Insect_Dataset_metadata.csv"
    parquet = copy / "metadata" / "parquet" / "BIOSCAN_5M_Insect_Dataset_metadata.parquet"
    parquet.parent.mkdir()
    pd.read_csv(csv, dtype=str).to_parquet(parquet)
    csv.unlink()
    table = read_manifest(copy).table
    assert table["image_id"].tolist() == whole["image_id"].tolist()
    assert (table.dtypes == whole.dtypes).all()
    assert table.drop(columns="image_path").equals(whole.drop(columns="image_path"))


def test_the_image_package_is_chosen_named_and_logged(bioscan_root, tmp_path, capsys):
    copy = tmp_path / "bioscan5m"
    shutil.copytree(bioscan_root / bioscan.DATASET_FOLDER, copy)
    (copy / "images" / "cropped_256").rename(copy / "images" / "cropped")
    manifest = read_manifest(copy)
    assert manifest.report.image_package == "cropped"
    assert "image package: cropped" in manifest.report.summary()
    assert manifest.table["image_id"].str.startswith("images/cropped/").all()
    with pytest.raises(DataError, match="no image folder: expected the package original_full"):
        read_manifest(copy, image_package="original_full")
    with pytest.raises(ConfigError, match="'image_package'"):
        cfg.DataConfig(image_package="cropped_full")
    assert main(["data", "check", str(copy), "--image_package", "cropped"]) == 0
    assert "image package: cropped" in capsys.readouterr().out


@pytest.mark.parametrize("column, value", [("chunk", "../../etc"), ("processid", "../x"),
                                           ("chunk", ".."), ("split", "secret")])
def test_a_path_part_that_leaves_its_package_is_refused(bioscan_root, tmp_path, capsys, column,
                                                       value):
    copy = tmp_path / "bioscan5m"
    shutil.copytree(bioscan_root / bioscan.DATASET_FOLDER, copy)
    file = copy / "metadata" / "csv" / "BIOSCAN_5M_Insect_Dataset_metadata.csv"
    frame = pd.read_csv(file, dtype=str, keep_default_na=False)
    frame.loc[3, column] = value
    frame.to_csv(file, index=False)
    assert main(["data", "check", str(copy)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "row 4" in err and repr(value) in err
    assert "Traceback" not in err
