"""A single `.csv` or `.parquet` manifest, or a folder holding one `metadata.csv`,
`manifest.csv`, `metadata.parquet` or `manifest.parquet`. Image paths are relative to the
manifest's folder, or else to its `images/` subfolder (whichever holds more of the listed
files). The taxa comes from `taxa=`, else a `taxa` column, else the manifest folder's name."""

from __future__ import annotations

import os
from pathlib import Path

from taxonclip.data.readers import tabular
from taxonclip.data.readers.base import Reader, ReadOptions
from taxonclip.data.validated import Manifest
from taxonclip.errors import DataError

NAME = "manifest"


def detect(data: str) -> bool:
    """A `.csv` or `.parquet` file, or a folder holding one of `tabular.MANIFEST_FILES`."""
    path = Path(data).expanduser()
    if path.is_file():
        return path.suffix.lower() in tabular.MANIFEST_SUFFIXES
    return path.is_dir() and any((path / f).is_file() for f in tabular.MANIFEST_FILES)


def read(data: str, options: ReadOptions) -> Manifest:
    """The validated table of the one manifest file."""
    path = Path(os.path.abspath(Path(data).expanduser()))
    if path.is_dir():
        found = [path / name for name in tabular.MANIFEST_FILES if (path / name).is_file()]
        if len(found) > 1:
            raise DataError(f"{path} holds several manifests ({', '.join(f.name for f in found)}); "
                            "pass the path of the one to use")
        path = found[0]
    root, sources = tabular.single_file(path)
    return tabular.read_sources(root, sources, options, NAME)


READER = Reader(NAME, "a manifest CSV or parquet", detect, read, tabular.HONOURED)
