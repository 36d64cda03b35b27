"""The generated specimens: same bytes for the same seed, a visible taxonomy, the VLM4Bio layout,
and the default set made once in the cache."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from taxonclip.data import synthetic
from taxonclip.data.manifest import read_manifest
from taxonclip.data.synthetic import default_dataset, generate
from taxonclip.errors import ConfigError, DataError

SMALL = {"taxa": 2, "genera": 2, "species": 2, "images": 3, "size": 24}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    first = _files(generate(tmp_path / "a", seed=3, **SMALL))
    assert first == _files(generate(tmp_path / "b", seed=3, **SMALL))
    other = _files(generate(tmp_path / "c", seed=4, **SMALL))
    assert first.keys() == other.keys()
    images = [k for k in first if k.endswith(".png")]
    assert all(first[k] != other[k] for k in images)
    assert len(images) == 2 * 2 * 2 * 3


def test_layout_loads_through_read_manifest(specimens):
    manifest = read_manifest(specimens)
    table = manifest.table
    assert (len(table), manifest.n_taxa, manifest.n_genera, manifest.n_species) == (96, 2, 4, 12)
    assert (table.groupby("species").size() == 8).all()
    assert table.groupby("genus")["taxa"].nunique().eq(1).all()  # every genus in one taxon
    assert table["species"].str.split(" ").map(lambda w: len(w) == 2 and w[1].islower()).all()
    assert table["caption"].str.len().gt(20).all()
    assert table.groupby("species")["caption"].nunique().eq(1).all()
    assert sorted(p.name for p in specimens.iterdir()) == sorted(table["taxa"].unique())
    assert Image.open(table["image_path"][0]).size == (32, 32)


def test_caption_names_the_colours_of_the_species():
    catalogue = synthetic.taxonomy(seed=0, taxon_index=0, n_taxa=1, genera=1, species=2)
    text = synthetic.caption(catalogue[0])
    genus = catalogue[0].genus
    assert text.startswith(f"{genus.taxon}-like.")
    for colour in (genus.body, genus.marking, catalogue[0].accent):
        assert synthetic.colour_name(colour) in text
    assert catalogue[0].epithet != catalogue[1].epithet


def _pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).resize((8, 8), Image.Resampling.BOX), np.float64).ravel()


def test_species_harder_than_genus_harder_than_taxa(tmp_path):
    table = read_manifest(generate(tmp_path / "set", seed=0, taxa=3, genera=3, species=3, images=8,
                                   size=32)).table
    features = np.stack([_pixels(p) for p in table["image_path"]])
    distance = np.sqrt(((features[:, None] - features[None]) ** 2).sum(-1))
    same = {level: table[level].to_numpy()[:, None] == table[level].to_numpy()[None]
            for level in ("species", "genus", "taxa")}
    others = ~np.eye(len(table), dtype=bool)
    mean_within_species = distance[same["species"] & others].mean()
    mean_within_genus = distance[same["genus"] & ~same["species"]].mean()
    mean_within_taxa = distance[same["taxa"] & ~same["genus"]].mean()
    mean_across_taxa = distance[~same["taxa"]].mean()
    assert mean_within_species < mean_within_genus < mean_within_taxa < mean_across_taxa

    np.fill_diagonal(distance, np.inf)
    nearest = distance.argmin(axis=1)
    accuracy = {level: (table[level].to_numpy()[nearest] == table[level].to_numpy()).mean()
                for level in same}
    chance = {"species": 1 / 27, "genus": 1 / 9, "taxa": 1 / 3}
    assert accuracy["taxa"] > accuracy["genus"] + 0.1 > accuracy["species"] + 0.2
    assert all(accuracy[level] > 2 * chance[level] for level in same)


def test_refuses_a_folder_that_holds_files(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="not an empty folder"):
        generate(tmp_path, **SMALL)


@pytest.mark.parametrize("name, value", [("taxa", 0), ("taxa", 7), ("species", 9), ("size", 8),
                                         ("images", 0)])
def test_bad_counts(tmp_path, name, value):
    with pytest.raises(ConfigError, match=f"'{name}'"):
        generate(tmp_path / "set", **{**SMALL, name: value})


def test_default_dataset_is_made_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("TAXONCLIP_CACHE", str(tmp_path))
    monkeypatch.setattr(synthetic, "DEFAULT", {"seed": 0, **SMALL})
    root = default_dataset()
    assert root.parent == tmp_path and root.name.startswith("synthetic-v1-")
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # no staging folder left behind

    def fail(*args, **kwargs):
        raise AssertionError("generated twice")

    monkeypatch.setattr(synthetic, "generate", fail)
    assert default_dataset() == root
    assert len(read_manifest(root).table) == 2 * 2 * 2 * 3


@pytest.mark.slow
def test_full_default_set_generates_in_under_30_s(tmp_path, monkeypatch):
    monkeypatch.setenv("TAXONCLIP_CACHE", str(tmp_path))
    start = time.perf_counter()
    manifest = read_manifest(default_dataset())
    assert time.perf_counter() - start < 30
    counts = (len(manifest.table), manifest.n_taxa, manifest.n_genera, manifest.n_species)
    assert counts == (1800, 3, 12, 60)
