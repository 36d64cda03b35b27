"""What the VLM4Bio and manifest readers share: manifest files read into the validated table,
their image, name, taxa, caption and group columns found or named, the image folders their paths
are relative to.

`image_id` is the image's path relative to the dataset root (the VLM4Bio folder or the
manifest's folder): unique and stable, it keys the saved split and embedding caches. Columns
other than the image, name and taxa ones are kept, except those named like a column of
`COLUMNS`, which the table derives itself. With `group_column`, a column `group` holds each row's
group (a specimen, clip or observation id; a blank group is the row's own image), which the split
keeps on one side.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from taxonclip.data.readers.base import ReadOptions
from taxonclip.data.validated import (COLUMNS, Manifest, clean_name, check_taxa_names,
                                      drop_unreadable, genus_of, listed, read_table, report_of,
                                      species_of)
from taxonclip.errors import DataError
from taxonclip.names import GROUP_COLUMN

IMAGE_COLUMNS = ("fileNameAsDelivered", "image_path", "file_name", "file_path", "image", "path")
NAME_COLUMNS = ("scientificName", "scientific_name")
TAXA_COLUMNS = ("taxa", "taxon")
CAPTION_COLUMNS = ("caption", "description", "text")
MANIFEST_FILES = ("metadata.csv", "manifest.csv", "metadata.parquet", "manifest.parquet")
MANIFEST_SUFFIXES = (".csv", ".parquet")
IMAGE_FOLDER = "images"
VLM4BIO_METADATA = "metadata"
# the parameters a manifest file or VLM4Bio folder honours
HONOURED = frozenset({"image_column", "name_column", "taxa", "caption_column", "group_column",
                      "missing"})


@dataclass(frozen=True)
class _Columns:
    """The manifest columns a user named (None: found by their usual names, or absent)."""

    image: str | None
    name: str | None
    caption: str | None
    group: str | None


@dataclass(frozen=True)
class Source:
    """One manifest file, the folders its image paths may be relative to, its VLM4Bio group (the
    taxa of all its rows) if it is in one, and its folder's name (the taxa when nothing else is)."""

    file: Path
    image_dirs: tuple[Path, ...]
    group: str | None
    folder_name: str


def read_sources(root: Path, sources: list[Source], options: ReadOptions,
                 format: str) -> Manifest:
    """The validated table of the manifest files `sources` of the dataset at `root`: rows with a
    blank name dropped and counted, an image listed twice under one name kept once (under two
    names refused), missing images handled by `options.missing`."""
    columns = _Columns(options.image_column, options.name_column, options.caption_column,
                       options.group_column)
    frames, dropped_blank = [], 0
    for source in sources:
        frame, blank = _read_source(source, columns, options.taxa)
        frames.append(frame)
        dropped_blank += blank
    table = pd.concat(frames, ignore_index=True)
    if table.empty and not dropped_blank:
        where = sources[0].file if len(sources) == 1 else f"the {len(sources)} manifests of {root}"
        raise DataError(f"no rows in {where}: a header and no image listed under it")
    table["image_id"] = [_image_id(p, root) for p in table["image_path"]]
    if options.group_column:
        table[GROUP_COLUMN] = table[GROUP_COLUMN].fillna(table["image_id"])
    listed_rows = len(table)
    table = _drop_repeated_images(table, root)
    check_taxa_names(table["taxa"], root)
    table, problems = drop_unreadable(table, options.missing, root)
    if table.empty:
        raise DataError(f"no usable rows in {root}: {dropped_blank} with a blank name, "
                        f"{len(problems)} with a missing or unreadable image")
    table = table[list(COLUMNS) + [c for c in table.columns if c not in COLUMNS]]
    report = report_of(table, root if len(sources) > 1 else sources[0].file,
                       policy=options.missing, dropped_blank=dropped_blank, missing=problems,
                       dropped_repeated=listed_rows - len(table), format=format)
    return Manifest(table=table, report=report, root=root)


def single_file(file: Path) -> tuple[Path, list[Source]]:
    """The dataset root and source of one manifest file; one inside `<Group>/metadata/` is that
    VLM4Bio group, its root the folder above the group."""
    if file.suffix.lower() not in MANIFEST_SUFFIXES:
        raise DataError(f"{file} is not a manifest: expected a .csv or .parquet file")
    folder = file.parent
    if folder.name == VLM4BIO_METADATA:
        group = folder.parent
        return group.parent, [Source(file, (group / IMAGE_FOLDER, group), group.name, group.name)]
    return folder, [Source(file, (folder, folder / IMAGE_FOLDER), None, folder.name)]


def group_files(group: Path) -> list[Path]:
    """The manifest files of a VLM4Bio group folder, by name."""
    return sorted((group / VLM4BIO_METADATA).glob("*.csv"))


def _read_source(source: Source, columns: _Columns,
                 taxa: str | None) -> tuple[pd.DataFrame, int]:
    """One manifest file as a table with the columns of `COLUMNS` (but `image_id`), its group
    when asked for, its extra columns, and the number of rows dropped for a blank name."""
    raw = read_table(source.file)
    image_col = pick_column(raw, columns.image, IMAGE_COLUMNS, "image", source.file)
    name_col = pick_column(raw, columns.name, NAME_COLUMNS, "name", source.file)
    caption_col = (pick_column(raw, columns.caption, (), "caption", source.file)
                   if columns.caption else None)
    group_col = (pick_column(raw, columns.group, (), "group", source.file)
                 if columns.group else None)
    fixed_taxa = taxa or source.group
    taxa_col = None if fixed_taxa else _find_column(raw, TAXA_COLUMNS)
    names = raw[name_col].map(clean_name)
    kept = raw[names.notna()]
    files = [_image_file(value, source.file, row, image_col)
             for row, value in kept[image_col].items()]
    base = _image_base(files, source.image_dirs)
    frame = _extra_columns(kept, (image_col, name_col, taxa_col), caption_col, group_col).assign(
        image_path=[os.path.abspath(base / f) for f in files],
        scientific_name=names[names.notna()].to_numpy(),
        species=[species_of(n) for n in names.dropna()],
        genus=[genus_of(n) for n in names.dropna()],
        taxa=_taxa_values(kept, taxa_col, fixed_taxa or source.folder_name, source.file))
    return frame.reset_index(drop=True), int(names.isna().sum())


def _extra_columns(kept: pd.DataFrame, used: tuple[str | None, ...], caption_col: str | None,
                   group_col: str | None) -> pd.DataFrame:
    """The columns carried along unchanged: all but those read into `COLUMNS` or replaced by
    them, with the caption column renamed `caption` and the group column `group` (a column
    already named `group` is not one unless `group_column` names it)."""
    derived = (*COLUMNS, GROUP_COLUMN)
    frame = kept.drop(columns=[c for c in kept.columns if c in used or c in derived])
    if caption_col is not None:
        frame = frame.drop(columns=[caption_col], errors="ignore").assign(caption=kept[caption_col])
    if group_col is not None:
        frame = frame.drop(columns=[group_col], errors="ignore").assign(
            **{GROUP_COLUMN: kept[group_col].map(clean_name)})
    return frame


def pick_column(frame: pd.DataFrame, requested: str | None, candidates: tuple[str, ...],
                 role: str, file: Path, settable: bool = True) -> str:
    """The column asked for, else the first default candidate present (ignoring case and _);
    `settable` says whether a `<role>_column` parameter can name another one."""
    existing = ", ".join(map(str, frame.columns))
    if requested is not None:
        if requested in frame.columns:
            return requested
        raise DataError(f"{file}: no column {requested!r} (set as the {role} column); "
                        f"the columns are: {existing}")
    found = _find_column(frame, candidates)
    if found is None:
        alternative = f" (or set {role}_column)" if settable else ""
        raise DataError(f"{file}: no {role} column: expected one of {', '.join(candidates)}"
                        f"{alternative}; the columns are: {existing}")
    return found


def _find_column(frame: pd.DataFrame, candidates: tuple[str, ...]) -> str | None:
    by_key = {_column_key(c): c for c in frame.columns}
    return next((by_key[_column_key(c)] for c in candidates if _column_key(c) in by_key), None)


def _column_key(column: object) -> str:
    return re.sub(r"[^a-z0-9]", "", str(column).lower())


def _image_file(value: object, file: Path, row: int, column: str) -> str:
    text = clean_name(value)
    if text is None:
        raise DataError(f"{file}, row {_row_number(row)}: column {column!r} is blank")
    return text


def _image_base(files: list[str], candidates: tuple[Path, ...]) -> Path:
    """The candidate folder that holds the most of the first listed files (first wins a tie)."""
    sample = files[:100]
    return max(candidates, key=lambda folder: sum((folder / f).is_file() for f in sample))


def _taxa_values(kept: pd.DataFrame, taxa_col: str | None, default: str, file: Path) -> list[str]:
    if taxa_col is None:
        return [default] * len(kept)
    values = kept[taxa_col].map(clean_name)
    if values.isna().any():
        row = int(values.index[values.isna()][0])
        raise DataError(f"{file}, row {_row_number(row)}: column {taxa_col!r} is blank "
                        "(fill it, or set one taxa for every row)")
    return values.tolist()


def _row_number(index: int) -> int:
    """Rows are counted from 1, the header excluded."""
    return index + 1


def _image_id(image_path: str, root: Path) -> str:
    path = Path(image_path)
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()


def _drop_repeated_images(table: pd.DataFrame, root: Path) -> pd.DataFrame:
    """Keep the first row of an image listed more than once; refuse one listed under two names."""
    repeated = table[table.duplicated("image_id", keep=False)]
    conflicting = repeated.groupby("image_id")["scientific_name"].nunique()
    conflicting = conflicting[conflicting > 1]
    if not conflicting.empty:
        raise DataError(f"{root}: {len(conflicting)} images are listed under different names: "
                        f"{listed(list(conflicting.index))}")
    return table.drop_duplicates("image_id").reset_index(drop=True)


