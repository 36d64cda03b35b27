"""BIOSCAN-5M: read its metadata and images into the validated table, and write a small dataset
in its format (the test fixture of `taxonclip data synth --format bioscan5m`).

The metadata file `BIOSCAN_5M_Insect_Dataset_metadata.csv` (or `.parquet`) has one row per
specimen: `processid`, the ranks `phylum` to `species` (a species is a binomial such as "Aedes
aegypti"; most rows stop above it), the partition `split` and the image `chunk`. Its images lie
in an image package folder (`cropped_256`, `original_256`, `cropped_full` or `original_full`,
the first found in that order) at `<package>/<split>/<chunk>/<processid>.jpg`, the chunk folder
absent when the chunk is blank. The package sits beside the metadata file or in its `images/`
folder; the dataset root, which `image_id` is relative to, is the metadata file's folder, or for
the official download layout (`metadata/csv/`) the folder above `metadata`.

The table's levels are the ranks (`names.BIOSCAN_LEVELS`); its taxa are the orders, so the
per-taxa rows are orders. A row's scientific name is its lowest known rank. A row without an
order cannot be placed in a taxa and is dropped and counted as blank.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pandas as pd

from taxonclip import names
from taxonclip.data.manifest import (COLUMNS, Manifest, ManifestReport, _listed, _read_table,
                                     check_taxa_names, clean_name, drop_unreadable)
from taxonclip.data.synthetic import _make_folder, render, taxonomy
from taxonclip.errors import DataError

METADATA_NAME = "BIOSCAN_5M_Insect_Dataset_metadata"
METADATA_FILES = (f"{METADATA_NAME}.csv", f"{METADATA_NAME}.parquet")
IMAGE_PACKAGES = ("cropped_256", "original_256", "cropped_full", "original_full")
IMAGE_FOLDER = "images"
RANKS = names.BIOSCAN_RANKS
TAXA_RANK = "order"
ID_COLUMN = "processid"
PARTITION_COLUMN = "split"
CHUNK_COLUMN = "chunk"
PARTITIONS = ("train", "val", "test", "key_unseen", "val_unseen", "test_unseen", "pretrain",
              "other_heldout")  # BIOSCAN-5M's own
REQUIRED_COLUMNS = (ID_COLUMN, *RANKS, PARTITION_COLUMN, CHUNK_COLUMN)
NAME_COLUMN = "taxon"  # the lowest known rank's name: the table derives it as scientific_name


def metadata_file(path: Path) -> Path | None:
    """The BIOSCAN-5M metadata file that `path` is or holds, else None."""
    if path.is_file():
        return path if path.name in METADATA_FILES else None
    if path.is_dir():
        return next((path / name for name in METADATA_FILES if (path / name).is_file()), None)
    return None


def read_bioscan(file: Path, missing: str) -> Manifest:
    """The validated table of a BIOSCAN-5M metadata file and its images (see the module
    docstring); missing or unreadable images follow `missing` as in `read_manifest`."""
    file = Path(os.path.abspath(file))
    raw = _read_table(file)
    absent = [column for column in REQUIRED_COLUMNS if column not in raw.columns]
    if absent:
        raise DataError(f"{file}: no column {', '.join(map(repr, absent))}; a BIOSCAN-5M "
                        f"metadata file has {', '.join(REQUIRED_COLUMNS)}")
    ranks = raw[list(RANKS)].map(clean_name)
    placed = ranks[TAXA_RANK].notna()
    raw, ranks = raw[placed].reset_index(drop=True), ranks[placed].reset_index(drop=True)
    root = _dataset_root(file)
    table = _table(raw, ranks, _image_package(file), root, file)
    check_taxa_names(table["taxa"], file)
    table, problems = drop_unreadable(table, missing, root)
    if table.empty:
        raise DataError(f"no usable rows in {file}: {int((~placed).sum())} without an order, "
                        f"{len(problems)} with a missing or unreadable image")
    report = ManifestReport(
        source=str(file), rows=len(table), dropped_blank=int((~placed).sum()),
        no_epithet=int(table["species"].isna().sum()), missing=tuple(problems), policy=missing,
        n_species=int(table["species"].nunique()), n_genera=int(table["genus"].nunique()),
        n_taxa=int(table["taxa"].nunique()), above_genus=int(table["genus"].isna().sum()),
        ranked=True)
    return Manifest(table=table, report=report, root=root, levels=names.BIOSCAN_LEVELS)


def _table(raw: pd.DataFrame, ranks: pd.DataFrame, package: Path, root: Path,
           file: Path) -> pd.DataFrame:
    """The table's columns (`COLUMNS`, the other ranks, then the metadata's other columns) for
    the rows of `raw`, whose cleaned ranks are `ranks`."""
    ids = raw[ID_COLUMN].map(clean_name)
    if ids.isna().any():
        raise DataError(f"{file}: column {ID_COLUMN!r} is blank in {int(ids.isna().sum())} rows")
    repeated = sorted(ids[ids.duplicated()].unique())
    if repeated:
        raise DataError(f"{file}: column {ID_COLUMN!r} repeats {len(repeated)} ids: "
                        f"{_listed(repeated)}")
    check_partitions(raw[PARTITION_COLUMN], file)
    paths = [os.path.abspath(_image_path(package, partition, chunk, pid))
             for partition, chunk, pid in zip(raw[PARTITION_COLUMN], raw[CHUNK_COLUMN], ids)]
    outside = next((i for i, p in enumerate(paths) if not Path(p).is_relative_to(root)), None)
    if outside is not None:  # `..` in a split, chunk or processid would read any file
        raise DataError(f"{file}: row {outside + 1} (processid {ids[outside]!r}, split "
                        f"{raw[PARTITION_COLUMN][outside]!r}, chunk {raw[CHUNK_COLUMN][outside]!r}) "
                        f"names an image outside the dataset folder {root}")
    lowest_first = ranks[list(reversed(RANKS))]
    fixed = pd.DataFrame({
        "image_id": [Path(p).relative_to(root).as_posix() for p in paths], "image_path": paths,
        "scientific_name": lowest_first.bfill(axis=1).iloc[:, 0], "species": ranks["species"],
        "genus": ranks["genus"], "taxa": ranks[TAXA_RANK]})
    other_ranks = ranks[[rank for rank in RANKS if rank not in COLUMNS]]
    extra = raw.drop(columns=[c for c in raw.columns
                              if c in RANKS or c in COLUMNS or c == NAME_COLUMN])
    return pd.concat([fixed, other_ranks, extra], axis=1)


def check_partitions(values: pd.Series, source: object) -> None:
    """Refuse a partition name BIOSCAN-5M does not have (a typo would read as missing images,
    or as rows that take no part), naming it and its rows."""
    named = values.map(clean_name)
    unknown = named.notna() & ~named.isin(PARTITIONS)
    if unknown.any():
        found = sorted(named[unknown].unique())
        raise DataError(f"{source}: column {PARTITION_COLUMN!r} holds the unknown partition(s) "
                        f"{', '.join(map(repr, found))} ({int(unknown.sum())} rows, the first row "
                        f"{int(np.flatnonzero(unknown.to_numpy())[0]) + 1}); the partitions are "
                        f"{', '.join(PARTITIONS)}")


def _image_path(package: Path, partition: object, chunk: object, processid: str) -> Path:
    """`<package>/<split>/<chunk>/<processid>.jpg`, without the chunk folder when it is blank."""
    folder = package / str(clean_name(partition))
    chunk_name = _chunk_name(chunk)
    return (folder / chunk_name if chunk_name else folder) / f"{processid}.jpg"


def _chunk_name(chunk: object) -> str | None:
    # a parquet file may give the chunk as a float (3.0) or NaN
    if isinstance(chunk, float) and chunk.is_integer():
        return str(int(chunk))
    return clean_name(chunk)


def _dataset_root(file: Path) -> Path:
    """The metadata file's folder, or the dataset folder of the official `metadata/csv/` one."""
    folder = file.parent
    if folder.parent.name == "metadata":
        return folder.parent.parent
    return folder


def _image_package(file: Path) -> Path:
    """The first image package folder found beside the metadata or in its `images/` folder."""
    root = _dataset_root(file)
    bases = dict.fromkeys((file.parent, root, root / IMAGE_FOLDER))
    candidates = [base / package for package in IMAGE_PACKAGES for base in bases]
    found = next((folder for folder in candidates if folder.is_dir()), None)
    if found is None:
        raise DataError(f"{file}: no image folder: expected one of {', '.join(IMAGE_PACKAGES)} "
                        f"in {' or '.join(map(str, bases))}")
    return found


# The fixture: 2 orders x 2 families x 2 genera x 3 species. The third species of each genus is
# unseen: its images are only in the unseen partitions, as BIOSCAN-5M keeps them out of train.
FIXTURE_ORDERS = ("Diptera", "Hymenoptera")
FIXTURE_FAMILIES, FIXTURE_GENERA, FIXTURE_SPECIES = 2, 2, 3
SEEN_IMAGES = ("train",) * 4 + ("val",) + ("test",) * 2
UNSEEN_IMAGES = ("key_unseen",) * 2 + ("val_unseen",) + ("test_unseen",) * 2
# images per genus and per family whose lower ranks are blank, as most BIOSCAN-5M rows are
NO_SPECIES_IMAGES = ("train", "test", "pretrain", "pretrain")
NO_GENUS_IMAGES = ("train", "test", "pretrain")
FIXTURE_PACKAGE = "cropped_256"
_FIXTURE_IMAGE_STREAM = 7
_HEADER = ("processid", "sampleid", "taxon", *RANKS, PARTITION_COLUMN, CHUNK_COLUMN)


def write_fixture(out: str | Path, seed: int = 0, size: int = 32) -> Path:
    """Write a small BIOSCAN-5M-format dataset of generated specimens into `out` (absent or
    empty) and return `out`: the metadata file and `cropped_256/<split>/<chunk>/*.jpg`."""
    root = Path(out)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"{root} is not an empty folder; choose a new or empty one")
    _make_folder(root)
    rows = []
    for order_index, order in enumerate(FIXTURE_ORDERS):
        catalogue = taxonomy(seed, order_index, len(FIXTURE_ORDERS),
                             FIXTURE_FAMILIES * FIXTURE_GENERA, FIXTURE_SPECIES)
        for genus_index in range(FIXTURE_FAMILIES * FIXTURE_GENERA):
            genus_species = catalogue[genus_index * FIXTURE_SPECIES:][:FIXTURE_SPECIES]
            family_first = catalogue[genus_index // FIXTURE_GENERA * FIXTURE_GENERA
                                     * FIXTURE_SPECIES].genus.name
            rows += _genus_rows(order, family_first, genus_species,
                                with_family_rows=genus_index % FIXTURE_GENERA == 0)
    with open(root / METADATA_FILES[0], "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(_HEADER)
        for number, (sp, ranks, partition) in enumerate(rows):
            writer.writerow(_write_specimen(root, number, sp, ranks, partition, seed, size))
    return root


def _genus_rows(order: str, family_first: str, genus_species: list,
                with_family_rows: bool) -> list[tuple]:
    """(specimen species, its known ranks, partition) of each image of one genus, and of its
    family's images without a genus when `with_family_rows`."""
    higher = {"phylum": "Arthropoda", "class": "Insecta", "order": order,
              "family": f"{family_first}idae", "subfamily": f"{family_first}inae"}
    rows = []
    for index, sp in enumerate(genus_species):
        ranks = {**higher, "genus": sp.genus.name, "species": sp.name}
        partitions = UNSEEN_IMAGES if index == len(genus_species) - 1 else SEEN_IMAGES
        rows += [(sp, ranks, partition) for partition in partitions]
    genus_only = {**higher, "genus": genus_species[0].genus.name}
    rows += [(genus_species[0], genus_only, partition) for partition in NO_SPECIES_IMAGES]
    if with_family_rows:
        family_only = {k: v for k, v in higher.items() if k != "subfamily"}
        rows += [(genus_species[1], family_only, partition) for partition in NO_GENUS_IMAGES]
    return rows


def _write_specimen(root: Path, number: int, sp, ranks: dict[str, str], partition: str,
                    seed: int, size: int) -> list[str]:
    """Render one specimen image into its folder and return its metadata row; train images
    are spread over two chunks, the others have a blank chunk."""
    processid = f"SYNTH{number:05d}-24"
    chunk = str(1 + number % 2) if partition == "train" else ""
    path = _image_path(root / FIXTURE_PACKAGE, partition, chunk, processid)
    path.parent.mkdir(parents=True, exist_ok=True)
    render(sp, np.random.default_rng([seed, _FIXTURE_IMAGE_STREAM, number]), size).save(
        path, format="JPEG", quality=95)
    taxon = next(ranks[rank] for rank in reversed(RANKS) if rank in ranks)
    return [processid, f"SAMPLE{number:05d}", taxon, *(ranks.get(rank, "") for rank in RANKS),
            partition, chunk]
