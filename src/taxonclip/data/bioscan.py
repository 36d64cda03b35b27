"""BIOSCAN-5M as its owners define it (the `bioscan-dataset` package, `bioscan5m.py`): the
metadata's 23 columns and their types, the partitions, the image packages and the folder layout,
and a small dataset written in exactly that form (`taxonclip data synth --format bioscan5m`).

The owners' layout is `bioscan5m/metadata/csv/BIOSCAN_5M_Insect_Dataset_metadata.csv` (or
`metadata/parquet/...parquet`) and `bioscan5m/images/<package>/<split>/<chunk>/<processid>.jpg`,
the chunk folder absent when the chunk is blank. The reader is `taxonclip.data.readers.bioscan5m`.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path, PurePosixPath

import numpy as np

from taxonclip import names
from taxonclip.data.synthetic import _make_folder, render, taxonomy
from taxonclip.errors import DataError

METADATA_NAME = "BIOSCAN_5M_Insect_Dataset_metadata"
METADATA_FILES = (f"{METADATA_NAME}.csv", f"{METADATA_NAME}.parquet")
DATASET_FOLDER = "bioscan5m"  # the owners' folder under the root they download into
METADATA_FOLDERS = ("metadata/csv", "metadata/parquet")  # where the owners put each form
IMAGE_FOLDER = "images"
# the owners' image packages; a reader takes the first one present unless image_package= names one
IMAGE_PACKAGES = ("cropped_256", "original_256", "cropped", "original_full")
# the metadata's columns in the owners' order
COLUMNS = ("processid", "sampleid", "taxon", "phylum", "class", "order", "family", "subfamily",
           "genus", "species", "dna_bin", "dna_barcode", "country", "province_state", "coord-lat",
           "coord-lon", "image_measurement_value", "area_fraction", "scale_factor",
           "inferred_ranks", "split", "index_bioscan_1M_insect", "chunk")
# the owners' column types (`bioscan_dataset.bioscan5m.COLUMN_DTYPES`, which tests/test_readers.py
# checks this is): written here so that reading needs no import of torchvision's datasets
COLUMN_DTYPES = {
    "processid": str, "sampleid": str, "taxon": "category", "phylum": "category",
    "class": "category", "order": "category", "family": "category", "subfamily": "category",
    "genus": "category", "species": "category", "dna_bin": "category", "dna_barcode": str,
    "country": "category", "province_state": "category", "coord-lat": float, "coord-lon": float,
    "image_measurement_value": float, "area_fraction": float, "scale_factor": float,
    "inferred_ranks": "uint8", "split": str, "index_bioscan_1M_insect": "Int64", "chunk": str}
RANKS = names.BIOSCAN_RANKS
BIN_COLUMN = "dna_bin"  # the BIN: the species proxy of specimens without a species name
ID_COLUMN = "processid"
CHUNK_COLUMN = "chunk"
NOT_CLASSIFIED = "not_classified"  # the owners' word for a blank label
PARTITIONS = ("pretrain", "train", "val", "test", "key_unseen", "val_unseen", "test_unseen",
              "other_heldout")
CHUNKED = {"pretrain": 2, "train": 1, "other_heldout": 1}  # hex digits of a partition's chunks


def check_partitions(values, source: object) -> None:
    """Refuse a partition name BIOSCAN-5M does not have (a typo would read as missing images,
    or as rows that take no part), naming it and its rows."""
    from taxonclip.data.validated import clean_name

    named = values.map(clean_name)
    unknown = named.notna() & ~named.isin(PARTITIONS)
    if unknown.any():
        found = sorted(named[unknown].unique())
        raise DataError(f"{source}: column {names.PARTITION_COLUMN!r} holds the unknown partition(s) "
                        f"{', '.join(map(repr, found))} ({int(unknown.sum())} rows, the first row "
                        f"{int(np.flatnonzero(unknown.to_numpy())[0]) + 1}); the partitions are "
                        f"{', '.join(PARTITIONS)}")


def image_relpath(partition: str, chunk: str | None, processid: str) -> str:
    """`<split>/<chunk>/<processid>.jpg` (no chunk folder when the chunk is blank), as the
    owners' `get_image_path` gives it."""
    parts = [partition, *([chunk] if chunk else []), f"{processid}.jpg"]
    return str(PurePosixPath(*parts))


# The fixture: 2 orders x 2 families x 2 genera x 3 species. The third species of each genus is
# unseen: its images are only in the unseen partitions, under a placeholder name, as BIOSCAN-5M
# keeps them out of train.
FIXTURE_ORDERS = ("Diptera", "Hymenoptera")
FIXTURE_FAMILIES, FIXTURE_GENERA, FIXTURE_SPECIES = 2, 2, 3
SEEN_IMAGES = ("train",) * 4 + ("val",) + ("test",) * 2
UNSEEN_IMAGES = ("key_unseen",) * 2 + ("val_unseen",) + ("test_unseen",) * 2
# images per genus and per family whose lower ranks are blank, as most BIOSCAN-5M rows are
NO_SPECIES_IMAGES = ("train", "test", "pretrain", "pretrain", "other_heldout")
NO_GENUS_IMAGES = ("train", "test", "pretrain")
FIXTURE_PACKAGE = "cropped_256"
_FIXTURE_IMAGE_STREAM = 7


def write_fixture(out: str | Path, seed: int = 0, size: int = 32) -> Path:
    """Write a small BIOSCAN-5M dataset of generated specimens in the owners' layout into `out`
    (absent or empty): `out/bioscan5m/metadata/csv/...csv` with the 23 columns in their order,
    and `out/bioscan5m/images/cropped_256/<split>/<chunk>/*.jpg`; returns `out`."""
    root = Path(out)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"{root} is not an empty folder; choose a new or empty one")
    _make_folder(root)
    dataset = root / DATASET_FOLDER
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
    metadata = dataset / METADATA_FOLDERS[0] / METADATA_FILES[0]
    metadata.parent.mkdir(parents=True)
    with open(metadata, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(COLUMNS)
        for number, (sp, ranks, partition) in enumerate(rows):
            writer.writerow(_write_specimen(dataset, number, sp, ranks, partition, seed, size))
    return root


def _genus_rows(order: str, family_first: str, genus_species: list,
                with_family_rows: bool) -> list[tuple]:
    """(specimen species, its known ranks, partition) of each image of one genus, and of its
    family's images without a genus when `with_family_rows`."""
    higher = {"phylum": "Arthropoda", "class": "Insecta", "order": order,
              "family": f"{family_first}idae", "subfamily": f"{family_first}inae"}
    rows = []
    for index, sp in enumerate(genus_species):
        unseen = index == len(genus_species) - 1
        # an unseen species has an interim name, as BIOSCAN-5M's unseen species have
        name = f"{sp.genus.name} sp. {_code(sp.name, 4)}" if unseen else sp.name
        ranks = {**higher, "genus": sp.genus.name, "species": name, BIN_COLUMN: _bin(name)}
        rows += [(sp, ranks, partition) for partition in (UNSEEN_IMAGES if unseen else SEEN_IMAGES)]
    genus = genus_species[0].genus.name
    # the owners write a blank rank as not_classified in places: the subfamily here
    genus_only = {**higher, "subfamily": NOT_CLASSIFIED, "genus": genus,
                  BIN_COLUMN: _bin(f"{genus} sp.")}
    rows += [(genus_species[0], genus_only, partition) for partition in NO_SPECIES_IMAGES]
    if with_family_rows:
        family_only = {k: v for k, v in higher.items() if k != "subfamily"}
        rows += [(genus_species[1], family_only, partition) for partition in NO_GENUS_IMAGES]
    return rows


def _code(text: str, length: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length].upper()


def _bin(name: str) -> str:
    """A BOLD BIN URI (`BOLD:AAA0000`) for a name."""
    digest = hashlib.sha256(name.encode()).digest()
    letters = "".join(chr(ord("A") + b % 26) for b in digest[:3])
    return f"BOLD:{letters}{int.from_bytes(digest[3:5], 'big') % 10000:04d}"


def _chunk(partition: str, processid: str) -> str:
    """The chunk folder of a partition that has them (hex: 0-f, pretrain 00-ff), else blank."""
    digits = CHUNKED.get(partition, 0)
    return hashlib.md5(processid.encode()).hexdigest()[:digits] if digits else ""


def _write_specimen(dataset: Path, number: int, sp, ranks: dict[str, str], partition: str,
                    seed: int, size: int) -> list[object]:
    """Render one specimen image into its folder and return its metadata row."""
    processid = f"SYNTH{number:05d}-24"
    chunk = _chunk(partition, processid)
    path = dataset / IMAGE_FOLDER / FIXTURE_PACKAGE / image_relpath(partition, chunk, processid)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, _FIXTURE_IMAGE_STREAM, number])
    render(sp, rng, size).save(path, format="JPEG", quality=95)
    known = [rank for rank in RANKS if ranks.get(rank) not in (None, NOT_CLASSIFIED)]
    values = {
        "processid": processid, "sampleid": f"SAMPLE{number:05d}", "taxon": ranks[known[-1]],
        **{rank: ranks.get(rank, "") for rank in RANKS}, BIN_COLUMN: ranks.get(BIN_COLUMN, ""),
        "dna_barcode": "".join(rng.choice(list("ACGT"), 40)), "country": "Canada",
        "province_state": "Ontario", "coord-lat": f"{43 + rng.random():.3f}",
        "coord-lon": "" if number % 5 == 0 else f"{-80 - rng.random():.3f}",
        "image_measurement_value": f"{1000 + number}", "area_fraction": f"{rng.random():.4f}",
        "scale_factor": f"{1 + rng.random():.4f}", "inferred_ranks": "0",
        names.PARTITION_COLUMN: partition, "index_bioscan_1M_insect": "" if number % 3 else str(number),
        CHUNK_COLUMN: chunk}
    return [values[column] for column in COLUMNS]
