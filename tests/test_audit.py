"""The duplicate and leakage audit, on generated specimens with planted copies and groups."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from taxonclip.data.audit import SplitAudit, audit_split
from taxonclip.data.manifest import read_manifest
from taxonclip.data.splits import Split, split_manifest
from taxonclip.data.synthetic import generate

# images of the generated set (8 per species, numbered in species order) that the planted rows
# copy or join into groups
ORIGINAL = "Bird/images/bird_00000.png"  # in train; its copy goes to test
RENAMED = "Bird/images/bird_00010.png"   # copied under a third species; both stay in train
COPY = "Bird/images/bird_copy.png"
COPY_RENAMED = "Bird/images/bird_renamed.png"
STRADDLING = {"Bird/images/bird_00001.png": "clip-straddling",   # train
              "Bird/images/bird_00002.png": "clip-straddling"}   # test
TWO_SPECIES = {"Bird/images/bird_00003.png": "clip-two-species",
               "Bird/images/bird_00016.png": "clip-two-species"}
GONE = "Fish/images/fish_00005.png"      # deleted after reading: unreadable, skipped
TEST_IDS = {COPY, "Bird/images/bird_00002.png", "Fish/images/fish_00001.png"}


def _plant(root: Path, source: str, copy: str, name: str | None = None) -> None:
    """Copy an image's bytes to a new file and list it in its group's metadata, under the
    original's name or under `name`."""
    shutil.copyfile(root / source, root / copy)
    metadata = root / source.split("/")[0] / "metadata" / "metadata.csv"
    rows = list(csv.DictReader(metadata.open()))
    original = next(r for r in rows if r["fileNameAsDelivered"] == Path(source).name)
    with metadata.open("a", newline="") as file:
        csv.DictWriter(file, fieldnames=list(rows[0])).writerow(
            {**original, "fileNameAsDelivered": Path(copy).name,
             "scientificName": name or original["scientificName"]})


def _split(table: pd.DataFrame, test_ids: set[str]) -> Split:
    """A hand-made split with exactly `test_ids` in test."""
    in_test = table["image_id"].isin(test_ids).to_numpy()
    return Split(train=np.flatnonzero(~in_test), test=np.flatnonzero(in_test), train_only=0,
                 seed=0, test_size=0.25)


def _groups(table: pd.DataFrame, by_id: dict[str, str]) -> pd.Series:
    """Each row's own image_id as its group, except the rows named in `by_id`."""
    return table["image_id"].map(by_id).fillna(table["image_id"])


@pytest.fixture
def planted(tmp_path) -> pd.DataFrame:
    """The generated set with the planted copies and an unreadable image, as a table whose
    groups are each image alone but for the two planted clips."""
    root = generate(tmp_path, seed=0, taxa=2, genera=2, species=3, images=8, size=32)
    names = read_manifest(root).table.set_index("image_id")["scientific_name"]
    assert names[[ORIGINAL, RENAMED, "Bird/images/bird_00016.png"]].nunique() == 3
    _plant(root, ORIGINAL, COPY)
    _plant(root, RENAMED, COPY_RENAMED, name=names["Bird/images/bird_00016.png"])
    table = read_manifest(root).table
    (root / GONE).unlink()
    return table.assign(group=_groups(table, {**STRADDLING, **TWO_SPECIES}))


def test_planted_copies_and_groups_are_reported(planted):
    audit = audit_split(planted, _split(planted, TEST_IDS))
    assert audit.images == len(planted) == 98
    assert audit.duplicates == ((ORIGINAL, COPY), (RENAMED, COPY_RENAMED))
    assert audit.cross_split == ((ORIGINAL, COPY),)
    assert audit.cross_name == ((RENAMED, COPY_RENAMED),)
    assert audit.unreadable == (GONE,)
    assert audit.has_groups
    assert audit.mixed_groups == ("clip-two-species",)
    assert audit.straddling_groups == ("clip-straddling",)
    assert audit.leaks


def test_the_summary_counts_shows_and_explains(planted):
    summary = audit_split(planted, _split(planted, TEST_IDS)).summary()
    assert "images checked: 98 (1 unreadable, skipped)" in summary
    assert "sets of byte-identical images: 2" in summary
    assert "of them with a copy in train and one in test: 1" in summary
    assert f"{ORIGINAL} = {COPY}" in summary
    assert "of them under different names: 1" in summary
    assert f"{RENAMED} = {COPY_RENAMED}" in summary
    assert "groups holding more than one name: 1" in summary and "clip-two-species" in summary
    assert "groups with images in train and in test: 1" in summary
    assert "accuracy is inflated" in summary and "group_column" in summary


def test_a_grouped_split_has_no_straddling_group(planted):
    copies = {ORIGINAL: "copies", COPY: "copies", RENAMED: "renamed", COPY_RENAMED: "renamed"}
    table = planted.assign(group=planted["image_id"].map(copies).fillna(planted["group"]))
    for seed in range(5):
        audit = audit_split(table, split_manifest(table, 0.25, seed))
        assert audit.straddling_groups == () and audit.cross_split == ()
        assert audit.mixed_groups == ("clip-two-species", "renamed")


def test_a_clean_table_reports_zeros(specimens):
    table = read_manifest(specimens).table
    for grouped in (False, True):
        checked = table.assign(group=table["image_id"]) if grouped else table
        audit = audit_split(checked, split_manifest(checked, 0.25, seed=0))
        assert (audit.duplicates, audit.cross_split, audit.cross_name, audit.unreadable,
                audit.mixed_groups, audit.straddling_groups) == ((), (), (), (), (), ())
        assert audit.has_groups == grouped and not audit.leaks
        summary = audit.summary()
        assert "sets of byte-identical images: 0" in summary and "inflated" not in summary
        assert ("groups: not checked" in summary) == (not grouped)


def test_the_summary_shows_five_examples_then_how_many_more():
    sets = tuple((f"a{i}.png", f"b{i}.png") for i in range(8))
    summary = SplitAudit(images=16, duplicates=sets, cross_split=sets, cross_name=(),
                         unreadable=()).summary()
    lines = summary.splitlines()
    assert lines[1] == "sets of byte-identical images: 8"
    assert lines[2:8] == [f"  a{i}.png = b{i}.png" for i in range(5)] + ["  and 3 more"]
    assert lines[8] == "of them with a copy in train and one in test: 8"
    assert lines[9:15] == lines[2:8]
