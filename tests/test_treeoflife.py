"""TreeOfLife-10M: its WebDataset shards read directly, in the owners' key layout; the levels
kingdom to species, a missing rank left out of that rank only; gallery and queries by held-out
shards or a seeded split by shard; training streams the shards in the seeded order of prepared
shards; bad shards named by shard and key."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from taxonclip import names
from taxonclip.cli import main
from taxonclip.config import DataConfig
from taxonclip.data import treeoflife
from taxonclip.data.manifest import load_manifest, read_manifest
from taxonclip.data.splits import make_split
from taxonclip.data.streams import ShardStream
from taxonclip.errors import ConfigError, DataError
from taxonclip.zero_shot import class_texts
from tests.helpers import sqlite_tracking


@pytest.fixture(scope="module")
def tol(tmp_path_factory) -> Path:
    """`data synth --format treeoflife`."""
    return treeoflife.write_fixture(tmp_path_factory.mktemp("treeoflife") / "tol", size=16)


def _patterns(tol: Path) -> tuple[str, str]:
    return treeoflife.fixture_patterns(tol)


def _members(shard: Path) -> dict[str, set[str]]:
    """Sample key -> its file keys, as written in the tar (case kept)."""
    keys: dict[str, set[str]] = {}
    with tarfile.open(shard) as archive:
        for name in archive.getnames():
            key, _, ext = name.partition(".")
            keys.setdefault(key, set()).add(ext)
    return keys


def test_the_fixture_has_the_owners_key_layout(tol):
    shards = sorted(tol.glob("*/shard-*.tar"))
    assert [s.relative_to(tol).as_posix() for s in shards] == [
        *(f"train/shard-{i:06d}.tar" for i in range(treeoflife.TRAIN_SHARDS)), "val/shard-000000.tar"]
    for shard in shards:
        assert all(keys == set(treeoflife.SAMPLE_KEYS) for keys in _members(shard).values())
    with tarfile.open(shards[0]) as archive:
        key = archive.getnames()[0].split(".")[0]
        text = {ext: archive.extractfile(f"{key}.{ext}").read().decode()
                for ext in treeoflife.SAMPLE_KEYS if ext != "jpg"}
    scientific, taxonomic = text["scientific_name.txt"], text["taxonomic_name.txt"]
    assert text["sci.txt"] == f"a photo of {scientific}."
    assert text["taxon.txt"] == f"a photo of {taxonomic}."
    assert taxonomic.startswith("Animalia ") and taxonomic.endswith(scientific.split(" ")[1])
    assert text["taxonTag.txt"].startswith("a photo of kingdom Animalia phylum ")


def test_the_shards_read_as_kingdom_to_species_with_missing_ranks_left_out(tol):
    train, _ = _patterns(tol)
    manifest = read_manifest(train)
    table = manifest.table
    assert manifest.levels == names.TREEOFLIFE_LEVELS and manifest.report.format == "treeoflife"
    assert len(manifest.shards) == treeoflife.TRAIN_SHARDS and len(table) == 72
    assert set(names.TREEOFLIFE_RANKS) <= set(table.columns)
    assert (table["taxa"] == table["kingdom"]).all()
    assert (table["species"].dropna().str.split(" ").str[0]
            == table.loc[table["species"].notna(), "genus"]).all()
    no_family = table[table["family"].isna()]
    assert len(no_family) and no_family["genus"].notna().all()  # the ranks below stay in place
    no_species = table[table["species"].isna()]
    assert len(no_species) and no_species["genus"].notna().all()
    assert table[names.GROUP_COLUMN].nunique() == treeoflife.TRAIN_SHARDS
    assert table["image_path"].str.contains("#").all()


def test_a_seeded_split_keeps_each_shard_on_one_side(tol):
    table = read_manifest(_patterns(tol)[0]).table
    split = make_split(table, DataConfig(seed=3))
    groups = table[names.GROUP_COLUMN]
    train, test = set(groups.iloc[split.train]), set(groups.iloc[split.test])
    assert train and test and not train & test


def test_held_out_query_shards_are_the_queries(tol):
    train, val = _patterns(tol)
    config = DataConfig(data=train, queries=val, split="official")
    manifest = load_manifest(config)
    split = make_split(manifest.table, config)
    from_val = manifest.table["image_path"].str.startswith(val).to_numpy()
    assert list(split.test) == list(np.flatnonzero(from_val)) and from_val.sum() == 24
    assert list(split.training_rows) == list(np.flatnonzero(~from_val))
    with pytest.raises(ConfigError, match="'queries' names shards that data also names"):
        read_manifest(train, queries=train)


def test_text_key_gives_each_row_its_own_text_for_zero_shot(tol):
    manifest = read_manifest(_patterns(tol)[0], text_key="sci")
    table = manifest.table
    assert (table["caption"] == "a photo of " + table["scientific_name"] + ".").all()
    texts = class_texts(table, "species")
    name = table["species"].dropna().iloc[0]
    assert f"a photo of {name}." in texts[name]
    with pytest.raises(ConfigError, match="'text_key'"):
        read_manifest(_patterns(tol)[0], text_key="caption")


def test_train_then_eval_from_the_fixture(tol, tmp_path, monkeypatch, capsys):
    sqlite_tracking(monkeypatch, tmp_path, "treeoflife")
    train, val = _patterns(tol)
    streams = []

    class Recorded(ShardStream):  # training reads the shards as prepared shards are read
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            streams.append(self)

    monkeypatch.setattr("taxonclip.training.data.ShardStream", Recorded)
    assert main(["train", "--data", train, "--epochs", "1", "--batch_size", "8",
                 "--workers", "0"]) == 0
    assert streams and len(streams[0].rows.urls) == treeoflife.TRAIN_SHARDS
    import mlflow

    run = mlflow.search_runs(experiment_names=["treeoflife"]).iloc[0]
    assert run["status"] == "FINISHED"
    for level in names.TREEOFLIFE_RANKS:
        assert np.isfinite(run[f"metrics.eval/All/{level}/top1_cos"]), level
    assert "queries: the seeded test split" in capsys.readouterr().out


@pytest.mark.slow
def test_eval_on_held_out_shards_with_the_shards_own_texts(tol, tmp_path, monkeypatch, capsys):
    sqlite_tracking(monkeypatch, tmp_path, "treeoflife-eval")
    train, val = _patterns(tol)
    assert main(["eval", "--data", train, "--queries", val, "--split", "official",
                 "--zero_shot", "true", "--text_key", "taxon", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "queries: test (24 rows); gallery: train (72 rows)" in out
    assert "All species" in " ".join(out.split())


def _tar(path: Path, samples: list[dict[str, bytes]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        for sample in samples:
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                member = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                member.size = len(data)
                archive.addfile(member, io.BytesIO(data))
    return str(path)


def _sample(key: str, taxonomic: str, **extra: bytes) -> dict:
    image = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image, format="JPEG")
    return {"__key__": key, "jpg": image.getvalue(), "taxonomic_name.txt": taxonomic.encode(),
            **extra}


@pytest.mark.parametrize("samples, phrase", [
    ([_sample("k1", "Animalia Chordata"), {"__key__": "k2", "jpg": b"x", "sci.txt": b"a"}],
     r"sample 'k2' of shard .*bad.tar has no 'taxonomic_name.txt'"),
    ([_sample("k1", "Animalia Chordata Aves Passeriformes Corvidae Corvus corax extra")],
     r"sample 'k1' of shard .*bad.tar: 'taxonomic_name.txt' is .*not the ranks"),
    ([_sample("k1", "Animalia Chordata", **{"taxonTag.txt": b"a photo of kingdom Animalia "
                                                            b"phylum Arthropoda."})],
     r"sample 'k1' of shard .*bad.tar: 'taxonTag.txt' .* name different ranks"),
    ([_sample("k1", "Animalia Chordata", **{"taxonTag.txt": b"a photo of phylum Chordata "
                                                            b"kingdom Animalia."})],
     r"sample 'k1' of shard .*bad.tar: 'taxonTag.txt' is .*rank-name pairs"),
])
def test_a_bad_shard_is_named_with_its_key(tmp_path, samples, phrase):
    shard = _tar(tmp_path / "bad.tar", samples)
    with pytest.raises(DataError, match=phrase):
        read_manifest(shard)


def test_missing_keys_and_empty_shard_lists_are_one_message(tmp_path, capsys):
    no_labels = _tar(tmp_path / "plain.tar", [{"__key__": "k1", "jpg": b"x", "sci.txt": b"a"}])
    assert main(["data", "check", no_labels]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "plain.tar" in err and "'taxonomic_name.txt'" in err
    no_image = _tar(tmp_path / "noimage.tar", [
        _sample("k1", "Animalia Chordata"),
        {"__key__": "k2", "taxonomic_name.txt": b"Animalia Chordata"}])
    with pytest.raises(DataError, match=r"noimage.tar#k2 has no 'jpg' key"):
        read_manifest(no_image)
    assert len(read_manifest(no_image, missing="skip").table) == 1
    assert main(["data", "prepare", no_image, "--missing", "skip", "--out", str(tmp_path / "p")]) == 1
    assert "is WebDataset shards already" in capsys.readouterr().err
    empty = _tar(tmp_path / "empty.tar", [])
    for data in (empty, str(tmp_path / "none-{000001..000000}.tar"), str(tmp_path / "gone.tar")):
        assert main(["data", "check", data]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_identical_images_in_two_shards_are_found_by_the_audit(tmp_path):
    from taxonclip.data.audit import audit_split
    from taxonclip.names import SOURCE_DIGEST_COLUMN

    same = _sample("k1", "Animalia Chordata Aves Passeriformes Corvidae Corvus corax")
    other = dict(same, __key__="k2")
    first, second = _tar(tmp_path / "s-0.tar", [same]), _tar(tmp_path / "s-1.tar", [other])
    manifest = read_manifest(str(tmp_path / "s-{0..1}.tar"))
    assert manifest.table[SOURCE_DIGEST_COLUMN].nunique() == 1 and len(manifest.shards) == 2
    assert {first, second} == set(manifest.shards)
    audit = audit_split(manifest.table, make_split(manifest.table, DataConfig()))
    assert audit.duplicates == (("k1", "k2"),)
