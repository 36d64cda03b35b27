"""BIOSCAN-5M: its metadata (CSV or parquet) read with the owners' column types, its images in
the owners' layout (see `taxonclip.data.bioscan`).

Accepted as `data`: the metadata file, the folder holding it, the `bioscan5m/` folder itself
(metadata in `metadata/csv/` or `metadata/parquet/`), or the folder above it (the owners' `root`).
The dataset root, which `image_id` is relative to, is the `bioscan5m/` folder (or, for a metadata
file elsewhere, its folder). The image package is `image_package=` or the first of
`IMAGE_PACKAGES` present, in `<root>/images/`, `<root>/` or beside the metadata file.

The table's levels are the ranks phylum to species and the BIN (`dna_bin`, the species proxy);
its taxa are the orders. `not_classified` is a blank label, as the owners' loaders take it; a row
missing a rank is left out of that rank only, and a row without an order, which no taxa can
hold, is dropped and counted as blank. A row's scientific name is its lowest known rank.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from taxonclip import names
from taxonclip.config import check_image_package
from taxonclip.data import bioscan
from taxonclip.data.readers.base import Reader, ReadOptions
from taxonclip.data.validated import (COLUMNS, Manifest, check_taxa_names, clean_name,
                                      drop_unreadable, listed, read_table, report_of)
from taxonclip.errors import DataError

NAME = "bioscan5m"
TAXA_RANK = "order"
LEVEL_COLUMNS = (*bioscan.RANKS, bioscan.BIN_COLUMN)
REQUIRED_COLUMNS = (bioscan.ID_COLUMN, *LEVEL_COLUMNS, names.PARTITION_COLUMN,
                    bioscan.CHUNK_COLUMN)
NAME_COLUMN = "taxon"  # the lowest known rank's name: the table derives it as scientific_name
HONOURED = frozenset({"missing", "image_package"})


def metadata_file(path: Path) -> Path | None:
    """The BIOSCAN-5M metadata file that `path` is or holds (see the module docstring)."""
    if path.is_file():
        return path if path.name in bioscan.METADATA_FILES else None
    if not path.is_dir():
        return None
    for folder in (path, path / bioscan.DATASET_FOLDER):
        for sub in ("", *bioscan.METADATA_FOLDERS):
            for name in bioscan.METADATA_FILES:
                if (folder / sub / name).is_file():
                    return folder / sub / name
    return None


def detect(data: str) -> bool:
    """Whether `data` is or holds BIOSCAN-5M metadata."""
    return metadata_file(Path(data).expanduser()) is not None


def read(data: str, options: ReadOptions) -> Manifest:
    """The validated table of the metadata and its images; missing or unreadable images follow
    `options.missing`."""
    file = Path(os.path.abspath(metadata_file(Path(data).expanduser())))
    raw = read_metadata(file)
    ranks = raw[list(LEVEL_COLUMNS)].astype(object).map(_label)
    placed = ranks[TAXA_RANK].notna()
    raw, ranks = raw[placed].reset_index(drop=True), ranks[placed].reset_index(drop=True)
    root = dataset_root(file)
    package = image_package(file, options.image_package)
    table = _table(raw, ranks, package, root, file)
    check_taxa_names(table["taxa"], file)
    table, problems = drop_unreadable(table, options.missing, root)
    if table.empty:
        raise DataError(f"no usable rows in {file}: {int((~placed).sum())} without an order, "
                        f"{len(problems)} with a missing or unreadable image")
    report = report_of(table, file, policy=options.missing, dropped_blank=int((~placed).sum()),
                       missing=problems, ranked=True, format=NAME, image_package=package.name)
    return Manifest(table=table, report=report, root=root, levels=names.BIOSCAN_LEVELS)


def read_metadata(file: Path) -> pd.DataFrame:
    """The metadata with the owners' column types (`bioscan.COLUMN_DTYPES`: the ranks as
    categories, coordinates as floats, the chunk as text), its required columns checked."""
    header = read_table(file).columns if file.suffix == ".parquet" else \
        pd.read_csv(file, nrows=0).columns
    absent = [column for column in REQUIRED_COLUMNS if column not in header]
    if absent:
        raise DataError(f"{file}: no column {', '.join(map(repr, absent))}; BIOSCAN-5M metadata "
                        f"has the columns {', '.join(bioscan.COLUMNS)}")
    dtypes = {column: kind for column, kind in bioscan.COLUMN_DTYPES.items() if column in header}
    try:
        if file.suffix == ".parquet":
            return read_table(file).astype(dtypes)
        return pd.read_csv(file, dtype=dtypes)
    except (ValueError, TypeError) as err:
        raise DataError(f"cannot read BIOSCAN-5M metadata {file} with the owners' column types: "
                        f"{err}") from None


def _label(value: object) -> str | None:
    """A cleaned label, None for a blank or `not_classified` one."""
    text = clean_name(value)
    return None if text == bioscan.NOT_CLASSIFIED else text


def dataset_root(file: Path) -> Path:
    """The `bioscan5m/` folder of the owners' `metadata/csv/` layout, else the file's folder."""
    folder = file.parent
    if folder.parent.name == "metadata":
        return folder.parent.parent
    return folder


def image_package(file: Path, wanted: str | None) -> Path:
    """The image package folder: `wanted`, else the first of `IMAGE_PACKAGES` present."""
    if wanted is not None:  # read_manifest takes it without a DataConfig
        check_image_package(wanted)
    root = dataset_root(file)
    bases = list(dict.fromkeys((root / bioscan.IMAGE_FOLDER, root, file.parent)))
    packages = (wanted,) if wanted else bioscan.IMAGE_PACKAGES
    found = next((base / p for p in packages for base in bases if (base / p).is_dir()), None)
    if found is None:
        raise DataError(f"{file}: no image folder: expected "
                        f"{'the package ' + wanted if wanted else 'one of ' + ', '.join(packages)} "
                        f"in {' or '.join(map(str, bases))}")
    return found


def _table(raw: pd.DataFrame, ranks: pd.DataFrame, package: Path, root: Path,
           file: Path) -> pd.DataFrame:
    """The table's columns (`COLUMNS`, the other levels, then the metadata's other columns) for
    the rows of `raw`, whose cleaned levels are `ranks`."""
    ids = raw[bioscan.ID_COLUMN].map(clean_name)
    if ids.isna().any():
        raise DataError(f"{file}: column {bioscan.ID_COLUMN!r} is blank in "
                        f"{int(ids.isna().sum())} rows")
    repeated = sorted(ids[ids.duplicated()].unique())
    if repeated:
        raise DataError(f"{file}: column {bioscan.ID_COLUMN!r} repeats {len(repeated)} ids: "
                        f"{listed(repeated)}")
    paths = [os.path.abspath(package / _relpath(file, row, partition, chunk, pid))
             for row, (partition, chunk, pid) in enumerate(zip(
                 raw[names.PARTITION_COLUMN], raw[bioscan.CHUNK_COLUMN], ids))]
    lowest_first = ranks[list(reversed(bioscan.RANKS))]
    fixed = pd.DataFrame({
        "image_id": [Path(p).relative_to(root).as_posix() for p in paths], "image_path": paths,
        "scientific_name": lowest_first.bfill(axis=1).iloc[:, 0], "species": ranks["species"],
        "genus": ranks["genus"], "taxa": ranks[TAXA_RANK]})
    other_levels = ranks[[level for level in LEVEL_COLUMNS if level not in COLUMNS]]
    extra = raw.drop(columns=[c for c in raw.columns
                              if c in LEVEL_COLUMNS or c in COLUMNS or c == NAME_COLUMN])
    return pd.concat([fixed, other_levels, extra], axis=1)


def _relpath(file: Path, row: int, partition: object, chunk: object, processid: str) -> str:
    """The image's path in its package; a partition outside the owners' set, or a part that is
    not a plain file name (`..`, a separator), is refused naming the row."""
    partition_name, chunk_name = clean_name(partition), clean_name(chunk)
    if partition_name not in bioscan.PARTITIONS:
        raise DataError(f"{file}, row {row + 1}: column {names.PARTITION_COLUMN!r} is "
                        f"{partition_name!r}; BIOSCAN-5M's partitions are "
                        f"{', '.join(bioscan.PARTITIONS)}")
    for column, part in ((bioscan.CHUNK_COLUMN, chunk_name), (bioscan.ID_COLUMN, processid)):
        if part is not None and (part in (".", "..") or "/" in part or "\\" in part):
            raise DataError(f"{file}, row {row + 1}: column {column!r} is {part!r}, not a plain "
                            f"folder or file name: an image path may not leave its package")
    return bioscan.image_relpath(partition_name, chunk_name, processid)


READER = Reader(NAME, "BIOSCAN-5M", detect, read, HONOURED, bioscan.write_fixture)
