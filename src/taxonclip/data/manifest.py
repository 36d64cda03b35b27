"""Read any dataset into the one validated table: one row per image with its path, cleaned
scientific name, ranks and taxa (`taxonclip.data.validated`).

The format is found by the readers of `taxonclip.data.readers` (VLM4Bio, manifest CSV/parquet,
BIOSCAN-5M, prepared shards, TreeOfLife-10M shards), or named by `format=`; a reading parameter
the format does not honour is refused by name. Captions from a separate file (one text per
scientific name) are joined here, whatever the format.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd

from taxonclip.config import SYNTHETIC, DataConfig, check_missing
from taxonclip.data.readers import registry
from taxonclip.data.readers.base import ReadOptions
from taxonclip.data.readers.tabular import CAPTION_COLUMNS, NAME_COLUMNS, pick_column
from taxonclip.data.synthetic import default_dataset
from taxonclip.data.validated import (CHECK_THREADS, COLUMNS, SHOWN, Manifest, ManifestReport,
                                      check_taxa_names, clean_name, drop_unreadable, genus_of,
                                      listed, read_table, species_of)
from taxonclip.errors import DataError

__all__ = ["CHECK_THREADS", "COLUMNS", "SHOWN", "Manifest", "ManifestReport", "check_taxa_names",
           "clean_name", "drop_unreadable", "genus_of", "load_manifest", "read_manifest",
           "species_of", "with_captions"]


def load_manifest(config: DataConfig) -> Manifest:
    """Read the dataset named by `config.data` (`synthetic` means the generated default set),
    with the captions of `config.captions` when given (`caption_column` then names their column
    in that file rather than in the manifest)."""
    data = default_dataset() if config.data == SYNTHETIC else config.data
    manifest = read_manifest(
        data, image_column=config.image_column, name_column=config.name_column, taxa=config.taxa,
        missing=config.missing, caption_column=None if config.captions else config.caption_column,
        group_column=config.group_column, image_package=config.image_package,
        text_key=config.text_key, queries=config.queries, format=config.format)
    if config.captions:
        return with_captions(manifest, Path(config.captions).expanduser(), config.caption_column)
    return manifest


def read_manifest(path: str | Path, image_column: str | None = None, name_column: str | None = None,
                  taxa: str | None = None, missing: str = DataConfig.missing,
                  caption_column: str | None = None, group_column: str | None = None,
                  image_package: str | None = None, text_key: str | None = None,
                  queries: str | None = None, format: str = registry.AUTO) -> Manifest:
    """Read and validate the dataset at `path` with the reader of its format (`format`, or the
    first that detects it).

    Column names default to the VLM4Bio ones (`fileNameAsDelivered`, `scientificName`) and also
    accept `image_path`/`file_name`-style and `scientific_name` names; `taxa` sets one taxa for
    every row. Rows with a blank name are dropped and counted. Missing or unreadable images raise
    `DataError` under `missing="error"` and are dropped and listed under `missing="skip"`. A
    `caption_column` is renamed `caption`; without one, a `caption` column is kept as it is. A
    `group_column` becomes the column `group`. Taxa names that would share a metric key, or take
    the overall row's name, are refused. `image_package` picks BIOSCAN-5M's image package;
    `text_key` and `queries` are TreeOfLife-10M's (see their readers). A parameter that the
    format does not honour is refused by name.
    """
    check_missing(missing)  # tests and bench scripts read without a config
    options = ReadOptions(image_column=image_column, name_column=name_column, taxa=taxa,
                          caption_column=caption_column, group_column=group_column,
                          missing=missing, image_package=image_package, text_key=text_key,
                          queries=queries)
    return registry.read(str(path), options, format)


def with_captions(manifest: Manifest, file: Path, caption_column: str | None = None) -> Manifest:
    """The manifest with a `caption` per row from `file`, a CSV or parquet table of one text per
    scientific name (such as field-guide descriptions of each species), replacing any caption the
    manifest had. Every name in the manifest needs one; names are matched after cleaning. A file
    with an `image_id` column (as `taxonclip caption` writes) gives each image its own caption
    instead (`taxonclip.captions.keyed`)."""
    from taxonclip.captions.keyed import is_keyed, join_by_image

    if file.is_file() and is_keyed(file):
        return join_by_image(manifest, file, caption_column)
    captions = manifest.table["scientific_name"].map(_captions_by_name(file, caption_column))
    uncaptioned = sorted(manifest.table.loc[captions.isna(), "scientific_name"].unique())
    if uncaptioned:
        raise DataError(f"{file}: no caption for {len(uncaptioned)} of "
                        f"{manifest.table['scientific_name'].nunique()} names in the manifest: "
                        f"{listed(uncaptioned)}")
    return replace(manifest, table=manifest.table.assign(caption=captions.astype(str)))


def _captions_by_name(file: Path, caption_column: str | None) -> pd.Series:
    """Caption text indexed by cleaned scientific name; a name given two texts is an error."""
    if not file.is_file():
        raise DataError(f"captions file {file} does not exist")
    raw = read_table(file, role="captions file")
    name_col = pick_column(raw, None, NAME_COLUMNS, "name", file, settable=False)
    text_col = pick_column(raw, caption_column, CAPTION_COLUMNS, "caption", file)
    texts = pd.DataFrame({"name": raw[name_col].map(clean_name), "text": raw[text_col]}).dropna()
    conflicting = texts.groupby("name")["text"].nunique().loc[lambda counts: counts > 1]
    if not conflicting.empty:
        raise DataError(f"{file}: different captions for the same name: "
                        f"{listed(list(conflicting.index))}")
    return texts.drop_duplicates("name").set_index("name")["text"]
