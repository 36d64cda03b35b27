"""Manifest reading: every layout, column rule, name rule and missing-image policy, on small files
written by the tests, and the real butterfly sample as it is."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from taxonclip.config import DataConfig
from taxonclip.data.manifest import (COLUMNS, SHOWN, genus_of, load_manifest, read_manifest,
                                     species_of)
from taxonclip.errors import ConfigError, DataError


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (200, 30, 30)).save(path)


def _manifest(folder: Path, rows: list[dict], name: str = "metadata.csv", images: str = "",
              make_images: bool = True) -> Path:
    """A manifest file in `folder`, its images written under `folder/images` (relative to
    `images/` when `images` is "", else listed with that prefix)."""
    folder.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)
    if make_images:
        for file_name in frame.iloc[:, 0].dropna():
            _png(folder / "images" / file_name)
    frame.iloc[:, 0] = [None if pd.isna(f) else images + f for f in frame.iloc[:, 0]]
    path = folder / name
    if name.endswith(".parquet"):
        frame.to_parquet(path)
    else:
        frame.to_csv(path, index=False)
    return path


def _rows(*names: str | None) -> list[dict]:
    return [{"fileNameAsDelivered": f"{i}.png", "scientificName": n} for i, n in enumerate(names)]


def test_vlm4bio_columns_clean_names_and_derive_levels(tmp_path):
    names = ["  Danaus  plexippus ", "Danaus\tgilippus", "Danaus sp.", "Nymphalidae", "Pierinae",
             "Heliconiini", "Papilionoidea", "Cypriniformes", "Vanessa", "Vanessa atalanta rubria"]
    path = _manifest(tmp_path / "set", _rows(*names))
    manifest = read_manifest(path)
    table = manifest.table
    cleaned = [" ".join(n.split()) for n in names]
    assert table["scientific_name"].tolist() == cleaned
    expected_genus = ["Danaus", "Danaus", "Danaus", None, None, None, None, None, "Vanessa",
                      "Vanessa"]
    expected_species = ["Danaus plexippus", "Danaus gilippus", None, None, None, None, None, None,
                        None, "Vanessa atalanta rubria"]
    assert [None if pd.isna(g) else g for g in table["genus"]] == expected_genus
    assert [None if pd.isna(s) else s for s in table["species"]] == expected_species
    assert manifest.report.no_epithet == sum(s is None for s in expected_species)
    assert (manifest.n_species, manifest.n_genera, manifest.n_taxa) == (3, 2, 1)


def test_paths_ids_taxa_and_column_order(tmp_path):
    rows = [dict(r, commonName="Monarch") for r in _rows("Danaus plexippus", "Danaus plexippus")]
    manifest = read_manifest(_manifest(tmp_path / "butterflies", rows))
    table = manifest.table
    assert list(table.columns) == list(COLUMNS) + ["commonName"]
    assert table["image_id"].tolist() == ["images/0.png", "images/1.png"]
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in table["image_path"])
    assert table["taxa"].unique().tolist() == ["butterflies"]  # the manifest folder's name
    assert manifest.root == tmp_path / "butterflies"
    assert table.index.tolist() == [0, 1]


def test_image_paths_relative_to_the_manifest_folder(tmp_path):
    path = _manifest(tmp_path / "set", _rows("Danaus plexippus"), images="images/")
    assert read_manifest(path).table["image_id"].tolist() == ["images/0.png"]


def test_blank_names_dropped_and_counted(tmp_path):
    path = _manifest(tmp_path / "set", _rows("Danaus plexippus", "", "   ", None, "Pieris rapae"))
    manifest = read_manifest(path)
    assert manifest.table["scientific_name"].tolist() == ["Danaus plexippus", "Pieris rapae"]
    assert manifest.report.dropped_blank == 3
    assert manifest.report.rows == 2
    assert "dropped (blank name): 3" in manifest.report.summary()


def test_only_blank_names_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no usable rows"):
        read_manifest(_manifest(tmp_path / "set", _rows("", " ")))


def test_missing_name_column_names_the_file_and_existing_columns(tmp_path):
    rows = [{"fileNameAsDelivered": "0.png", "speciesName": "Danaus plexippus"}]
    path = _manifest(tmp_path / "set", rows)
    with pytest.raises(DataError) as err:
        read_manifest(path)
    message = str(err.value)
    assert str(path) in message and "scientificName" in message
    assert "fileNameAsDelivered, speciesName" in message


def test_requested_column_absent_names_it(tmp_path):
    path = _manifest(tmp_path / "set", _rows("Danaus plexippus"))
    with pytest.raises(DataError) as err:
        read_manifest(path, image_column="photo")
    assert "'photo'" in str(err.value) and str(path) in str(err.value)
    assert "fileNameAsDelivered, scientificName" in str(err.value)


def test_custom_and_snake_case_column_names(tmp_path):
    rows = [{"file_name": "0.png", "scientific_name": "Danaus plexippus"}]
    assert read_manifest(_manifest(tmp_path / "a", rows)).table["genus"].tolist() == ["Danaus"]
    rows = [{"photo": "0.png", "label": "Danaus plexippus"}]
    manifest = read_manifest(_manifest(tmp_path / "b", rows), image_column="photo",
                             name_column="label")
    assert manifest.table["species"].tolist() == ["Danaus plexippus"]


def test_blank_image_cell_names_row_and_column(tmp_path):
    rows = [{"fileNameAsDelivered": "0.png", "scientificName": "Danaus plexippus"},
            {"fileNameAsDelivered": None, "scientificName": "Pieris rapae"}]
    with pytest.raises(DataError, match=r"row 2: column 'fileNameAsDelivered' is blank"):
        read_manifest(_manifest(tmp_path / "set", rows))


def test_parquet_and_csv_give_the_same_table(tmp_path):
    rows = [dict(r, caption="orange") for r in _rows("Danaus plexippus", "Pieris  rapae", "")]
    from_csv = read_manifest(_manifest(tmp_path / "set", rows)).table
    from_parquet = read_manifest(_manifest(tmp_path / "set", rows, name="manifest.parquet"))
    pd.testing.assert_frame_equal(from_csv, from_parquet.table)
    assert from_parquet.report.dropped_blank == 1


def test_folder_with_two_manifests_is_ambiguous(tmp_path):
    _manifest(tmp_path / "set", _rows("Danaus plexippus"))
    _manifest(tmp_path / "set", _rows("Danaus plexippus"), name="manifest.parquet")
    with pytest.raises(DataError, match="several manifests"):
        read_manifest(tmp_path / "set")


def test_one_taxa_for_all_rows_and_taxa_column(tmp_path):
    rows = [dict(r, taxa=t) for r, t in zip(_rows("Danaus plexippus", "Salmo trutta"),
                                           ["Butterfly", " Fish "])]
    path = _manifest(tmp_path / "set", rows)
    assert read_manifest(path).table["taxa"].tolist() == ["Butterfly", "Fish"]
    assert read_manifest(path, taxa="Insect").table["taxa"].tolist() == ["Insect", "Insect"]


def test_blank_taxa_cell_names_row_and_column(tmp_path):
    rows = [dict(r, taxa=t)
            for r, t in zip(_rows("Danaus plexippus", "Salmo trutta"), ["Fish", ""])]
    with pytest.raises(DataError, match=r"row 2: column 'taxa' is blank"):
        read_manifest(_manifest(tmp_path / "set", rows))


def test_caption_column(tmp_path):
    rows = [dict(r, description="orange wings") for r in _rows("Danaus plexippus")]
    path = _manifest(tmp_path / "set", rows)
    table = read_manifest(path, caption_column="description").table
    assert table["caption"].tolist() == ["orange wings"] and "description" not in table
    assert "caption" not in read_manifest(path).table
    with pytest.raises(DataError, match="'text'"):
        read_manifest(path, caption_column="text")


def _captions_file(path: Path, rows: list[tuple[str, str]]) -> Path:
    pd.DataFrame(rows, columns=["scientificName", "description"]).to_csv(path, index=False)
    return path


def test_captions_file_gives_each_row_the_text_of_its_name(tmp_path):
    rows = [dict(r, caption="old") for r in _rows("Danaus plexippus", "Pieris  rapae", "Danaus plexippus")]
    path = _manifest(tmp_path / "set", rows)
    captions = _captions_file(tmp_path / "guide.csv", [(" Pieris rapae", "white wings"),
                                                       ("Danaus plexippus", "orange wings"),
                                                       ("Vanessa atalanta", "red bands")])

    table = load_manifest(DataConfig(data=str(path), captions=str(captions))).table

    assert table["caption"].tolist() == ["orange wings", "white wings", "orange wings"]


def test_captions_file_errors_name_the_file_and_the_names(tmp_path):
    path = _manifest(tmp_path / "set", _rows("Danaus plexippus", "Pieris rapae"))
    one_missing = _captions_file(tmp_path / "one.csv", [("Danaus plexippus", "orange wings")])
    twice = _captions_file(tmp_path / "twice.csv", [("Danaus plexippus", "orange"), ("Danaus plexippus", "red"),
                                                    ("Pieris rapae", "white")])
    cases = [(one_missing, None, r"one.csv: no caption for 1 of 2 names in the manifest: Pieris rapae"),
             (twice, None, r"twice.csv: different captions for the same name: Danaus plexippus"),
             (one_missing, "notes", r"one.csv: no column 'notes'.*scientificName, description"),
             (tmp_path / "absent.csv", None, r"captions file .*absent.csv does not exist")]
    for captions, column, message in cases:
        config = DataConfig(data=str(path), captions=str(captions), caption_column=column)
        with pytest.raises(DataError, match=message):
            load_manifest(config)

    unnamed = tmp_path / "unnamed.csv"
    unnamed.write_text("name,text\nDanaus plexippus,orange\n")
    with pytest.raises(DataError) as error:
        load_manifest(DataConfig(data=str(path), captions=str(unnamed)))
    assert str(error.value) == (f"{unnamed}: no name column: expected one of scientificName, "
                                "scientific_name; the columns are: name, text")


def test_leeds_field_guide_descriptions_caption_every_image(leeds):
    table = load_manifest(DataConfig(data=str(leeds), captions=str(leeds / "descriptions.csv"))).table

    assert len(table) == 832 and table["caption"].str.len().gt(40).all()
    assert table.groupby("species")["caption"].nunique().eq(1).all()
    assert table["caption"].nunique() == 10


def test_missing_images_raise_under_error_policy(tmp_path):
    names = [f"Danaus n{i}" for i in range(SHOWN + 3)] + ["Pieris rapae"]
    path = _manifest(tmp_path / "set", _rows(*names), make_images=False)
    _png(tmp_path / "set" / "images" / f"{len(names) - 1}.png")
    with pytest.raises(DataError) as err:
        read_manifest(path)
    message = str(err.value)
    assert f"{SHOWN + 3} of {len(names)} images" in message
    assert str(tmp_path / "set" / "images" / "0.png") in message and "no such file" in message
    assert "and 3 more" in message and "missing=skip" in message


def test_missing_images_dropped_and_listed_under_skip_policy(tmp_path):
    path = _manifest(tmp_path / "set", _rows("Danaus plexippus", "Pieris rapae", "Vanessa cardui"))
    (tmp_path / "set" / "images" / "1.png").unlink()
    manifest = read_manifest(path, missing="skip")
    assert manifest.table["scientific_name"].tolist() == ["Danaus plexippus", "Vanessa cardui"]
    assert manifest.report.missing == (str(tmp_path / "set" / "images" / "1.png"),)
    assert manifest.report.policy == "skip"
    assert "missing or unreadable images: 1 (policy skip)" in manifest.report.summary()


def test_unreadable_image_is_reported(tmp_path):
    path = _manifest(tmp_path / "set", _rows("Danaus plexippus", "Pieris rapae"))
    broken = tmp_path / "set" / "images" / "1.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot identify image file"):
        read_manifest(path)
    assert read_manifest(path, missing="skip").report.missing == (str(broken),)


def test_unknown_policy_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="'missing'"):
        read_manifest(_manifest(tmp_path / "set", _rows("Danaus plexippus")), missing="ignore")


def test_unusable_paths(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_manifest(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no manifest in"):
        read_manifest(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="not a manifest"):
        read_manifest(tmp_path / "notes.txt")


def test_unparsable_manifest(tmp_path):
    (tmp_path / "metadata.parquet").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read manifest"):
        read_manifest(tmp_path / "metadata.parquet")


def _vlm4bio(root: Path) -> Path:
    for group, names in {"Fish": ["Salmo trutta", "Esox lucius"],
                         "Bird": ["Turdus merula", " ", "Passeridae"]}.items():
        rows = [{"fileNameAsDelivered": f"{group.lower()}{i}.jpg", "scientificName": n}
                for i, n in enumerate(names)]
        _manifest(root / group / "metadata", rows, name="metadata_10k.csv", make_images=False)
        for row in rows:
            _png(root / group / "images" / row["fileNameAsDelivered"])
    return root


def test_vlm4bio_folder_with_two_groups(tmp_path):
    manifest = read_manifest(_vlm4bio(tmp_path / "vlm4bio"))
    table = manifest.table
    assert table["taxa"].tolist() == ["Bird", "Bird", "Fish", "Fish"]
    assert table["image_id"].tolist() == ["Bird/images/bird0.jpg", "Bird/images/bird2.jpg",
                                          "Fish/images/fish0.jpg", "Fish/images/fish1.jpg"]
    assert manifest.report.dropped_blank == 1 and manifest.report.no_epithet == 1
    assert manifest.report.source == str(tmp_path / "vlm4bio")
    one_group = read_manifest(tmp_path / "vlm4bio" / "Fish" / "metadata" / "metadata_10k.csv")
    assert one_group.table["image_id"].tolist() == table["image_id"].tolist()[2:]


def test_vlm4bio_group_files_are_merged_by_image(tmp_path):
    root = _vlm4bio(tmp_path / "vlm4bio")
    subset = pd.DataFrame([{"fileNameAsDelivered": "fish1.jpg", "scientificName": "Esox  lucius"}])
    subset.to_csv(root / "Fish" / "metadata" / "metadata_easy.csv", index=False)
    assert len(read_manifest(root).table) == 4
    conflicting = subset.assign(scientificName="Esox niger")
    conflicting.to_csv(root / "Fish" / "metadata" / "metadata_easy.csv", index=False)
    with pytest.raises(DataError, match="Fish/images/fish1.jpg"):
        read_manifest(root)


def test_load_manifest_passes_the_config(tmp_path):
    rows = [{"photo": "0.png", "label": "Danaus plexippus"}]
    path = _manifest(tmp_path / "set", rows)
    config = DataConfig(data=str(path), image_column="photo", name_column="label", taxa="Butterfly")
    assert load_manifest(config).table["taxa"].tolist() == ["Butterfly"]


def test_name_rules_against_reference_words():
    for name in ["Danaus plexippus", "Danaus", "Danaus sp.", "Danaus cf. plexippus", "Nymphalidae",
                 "Salmoniformes", "Danaus Plexippus"]:
        words = name.split()
        epithet = len(words) > 1 and words[1].isalpha() and words[1].islower() and words[1] != "cf"
        assert species_of(name) == (name if epithet else None)
        above_genus = any(words[0].endswith(s) for s in ("idae", "inae", "ini", "oidea", "formes"))
        assert genus_of(name) == (None if above_genus and not epithet else words[0])


def test_leeds_folder_and_its_metadata_file(leeds):
    manifest = read_manifest(leeds)
    table = manifest.table
    counts = (manifest.report.rows, manifest.n_species, manifest.n_genera, manifest.n_taxa)
    assert counts == (832, 10, 8, 1)
    assert table["taxa"].unique().tolist() == ["Butterfly"]
    assert table["image_id"].is_unique and table["image_id"].str.startswith("images/").all()
    assert manifest.report.missing == () and manifest.report.dropped_blank == 0
    assert "commonName" in table
    pd.testing.assert_frame_equal(read_manifest(leeds / "metadata.csv").table, table)
