"""The dataset formats, in the order they are tried, and the one way a `data` value is read.

Adding a format is a module in this package that defines `READER` (see `base.Reader`) and one
line in `READERS`; `format=NAME` then names it and `data synth --format NAME` writes its
fixture where it has one.
"""

from __future__ import annotations

from pathlib import Path

from taxonclip.data import shards
from taxonclip.data import treeoflife as treeoflife_layout
from taxonclip.data.readers import bioscan5m, manifest_file, prepared, treeoflife, vlm4bio
from taxonclip.data.readers.base import Reader, ReadOptions, check_honoured
from taxonclip.data.readers.tabular import MANIFEST_FILES, MANIFEST_SUFFIXES, VLM4BIO_METADATA
from taxonclip.data.validated import Manifest
from taxonclip.errors import ConfigError, DataError

# tried in this order: the first that detects its format reads the data
READERS: tuple[Reader, ...] = (
    prepared.READER,
    treeoflife.READER,
    bioscan5m.READER,
    vlm4bio.READER,
    manifest_file.READER,
)
AUTO = "auto"


def names() -> tuple[str, ...]:
    """The formats' names, as `format=` takes them."""
    return tuple(reader.name for reader in READERS)


def reader_named(name: str) -> Reader:
    """The reader of format `name`."""
    for reader in READERS:
        if reader.name == name:
            return reader
    raise ConfigError(f"parameter 'format' is {name!r}; choose one of {AUTO}, {', '.join(names())}")


def choose(data: str, format: str = AUTO) -> Reader:
    """The reader of `data`: the one `format` names, else the first that detects it."""
    if format != AUTO:
        return reader_named(format)
    for reader in READERS:
        if reader.detect(data):
            return reader
    raise DataError(_unknown(data))


def read(data: str, options: ReadOptions, format: str = AUTO) -> Manifest:
    """The validated manifest of `data`, read by its format's reader, which first refuses any
    parameter it does not honour."""
    reader = choose(data, format)
    check_honoured(reader, options, data)
    return reader.read(data, options)


def _unknown(data: str) -> str:
    """Why no reader takes `data`."""
    if shards.is_shard_url(data):
        keys = ", ".join(sorted(shards.first_sample_keys(data)))
        return (f"the first sample of shard {shards.expand_urls(data)[0]} has the keys {keys}: "
                f"neither a prepared shard's ('json') nor TreeOfLife-10M's "
                f"({treeoflife_layout.TAXONOMIC_KEY!r})")
    path = Path(data).expanduser()
    if not path.exists():
        return f"data path {path} does not exist"
    if path.is_file():
        return (f"{path} is not a manifest: expected a {' or '.join(MANIFEST_SUFFIXES)} file, "
                f"BIOSCAN-5M metadata, or WebDataset .tar shards")
    return (f"no manifest in {path}: expected one of {', '.join(MANIFEST_FILES)}, VLM4Bio group "
            f"folders <Group>/{VLM4BIO_METADATA}/*.csv, BIOSCAN-5M metadata, or a folder of "
            f"`taxonclip data prepare`")
