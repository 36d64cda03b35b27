"""Prepared shards: a folder written by `taxonclip data prepare`, or WebDataset shards named by
a URL pattern whose samples carry their manifest row as `.json` (read by
`taxonclip.data.prepare`; the images are then samples of the shards). `taxa=` names the taxa of
every row of shards by URL; a prepared folder keeps the taxa it was prepared with."""

from __future__ import annotations

import os
from pathlib import Path

from taxonclip.data import prepare, shards
from taxonclip.data.readers.base import Reader, ReadOptions
from taxonclip.data.validated import Manifest
from taxonclip.errors import ConfigError, DataError

NAME = "prepared"
HONOURED = frozenset({"missing", "taxa"})


def detect(data: str) -> bool:
    """A prepared folder (finished or not), or shards whose first sample has a `.json` row."""
    if shards.is_shard_url(data):
        return "json" in shards.first_sample_keys(data)
    folder = Path(data).expanduser()
    return (shards.prepared_file(folder) is not None
            or (folder.is_dir() and (folder / prepare.PLAN_FILE).is_file()))


def read(data: str, options: ReadOptions) -> Manifest:
    """The manifest of the shards or of the prepared folder."""
    if shards.is_shard_url(data):
        return prepare.read_shard_urls(data, options.taxa)
    folder = Path(os.path.abspath(Path(data).expanduser()))
    unfinished = prepare.unfinished_message(folder)
    if unfinished:
        raise DataError(unfinished)
    if options.taxa is not None:
        raise ConfigError(f"parameter 'taxa' does not apply to the prepared folder {folder}: it "
                          f"keeps the taxa it was prepared with. Leave it out")
    return prepare.read_prepared(folder, options.missing)


READER = Reader(NAME, "prepared shards", detect, read, HONOURED)
