"""VLM4Bio: `<root>/<Group>/metadata/*.csv` with images in `<root>/<Group>/images/`. The taxa of
a row is its group folder's name (or `taxa=`). When a group holds several CSV files they are
read together and an image listed in more than one of them counts once (first file by name
wins). A single CSV inside a `<Group>/metadata/` folder is read as that one group."""

from __future__ import annotations

import os
from pathlib import Path

from taxonclip.data.readers import tabular
from taxonclip.data.readers.base import Reader, ReadOptions
from taxonclip.data.synthetic import generate
from taxonclip.data.validated import Manifest
from taxonclip.errors import DataError

NAME = "vlm4bio"


def detect(data: str) -> bool:
    """A folder of VLM4Bio group folders (and no manifest file of its own), or a CSV file in a
    group's `metadata/` folder."""
    path = Path(data).expanduser()
    if path.is_file():
        return path.suffix.lower() == ".csv" and path.parent.name == tabular.VLM4BIO_METADATA
    return (path.is_dir() and not any((path / f).is_file() for f in tabular.MANIFEST_FILES)
            and bool(_groups(path)))


def read(data: str, options: ReadOptions) -> Manifest:
    """The validated table of every group's manifests."""
    path = Path(os.path.abspath(Path(data).expanduser()))
    if path.is_file():
        root, sources = tabular.single_file(path)
    else:
        root = path
        sources = [tabular.Source(f, (g / tabular.IMAGE_FOLDER, g), g.name, g.name)
                   for g in _groups(path) for f in tabular.group_files(g)]
    if not sources:
        raise DataError(f"no VLM4Bio group folders <Group>/{tabular.VLM4BIO_METADATA}/*.csv in "
                        f"{path}")
    return tabular.read_sources(root, sources, options, NAME)


def _groups(path: Path) -> list[Path]:
    return sorted(d for d in path.iterdir() if d.is_dir() and tabular.group_files(d))


READER = Reader(NAME, "a VLM4Bio folder", detect, read, tabular.HONOURED, generate)
