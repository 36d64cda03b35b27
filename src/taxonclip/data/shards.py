"""Prepared datasets: WebDataset tar shards of resized images with their manifest rows, read by
train and eval wherever a manifest is accepted.

A prepared folder (written by `taxonclip.data.prepare`) holds

- `shards/shard-NNNNNN.tar`: WebDataset shards. Sample `<key>` is `<key>.jpg` (or `.webp`; an
  image that needed no resize keeps its own encoded bytes, e.g. `<key>.png`) and `<key>.json`,
  its manifest row;
- `manifest.parquet`: the validated table, each row with the `shard` and `key` of its image and
  the sha256 of its source image (which the duplicate audit compares);
- `prepared.json`, written last: the settings, the source's content hash, the levels and the
  report of the source manifest, and each shard's rows, bytes and sha256.

A shard URL pattern (`/data/shard-{000000..000099}.tar`, `file:...`, `pipe:curl -s ...`, or any
URL webdataset opens) gives the same samples without the folder: its table is built from the
samples' JSON rows in one pass over the shards.

`taxonclip.data.streams` reads the shards for a model. This module needs no torch, so that the
processes of a prepare start light.
"""

from __future__ import annotations

import functools
import io
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import pandas as pd
from PIL import Image

from taxonclip import names
from taxonclip.errors import DataError

PREPARED_FILE = "prepared.json"
MANIFEST_FILE = "manifest.parquet"
SHARD_FOLDER = "shards"
FORMAT = "taxonclip-prepared"
FORMAT_VERSION = 1
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# shard URLs webdataset opens itself; a plain path or brace pattern ending in .tar is one too
_URL_SCHEMES = ("file:", "pipe:", "http://", "https://", "s3://", "gs://", "ais://")
_BRACES = re.compile(r"\{[^}]*\.\.[^}]*\}")


def shard_name(index: int) -> str:
    """The file name of shard `index` in a prepared folder."""
    return f"shard-{index:06d}.tar"


def is_shard_url(data: str) -> bool:
    """Whether `data` names tar shards (a URL webdataset opens, or a `.tar` path or pattern)
    rather than a manifest or dataset folder."""
    return data.startswith(_URL_SCHEMES) or data.endswith(".tar") or bool(_BRACES.search(data))


def is_sharded(data: str) -> bool:
    """Whether the dataset `data` names is read from shards (a prepared folder or shard URLs)."""
    return is_shard_url(data) or prepared_file(Path(data).expanduser()) is not None


def prepared_file(path: Path) -> Path | None:
    """The `prepared.json` of the prepared folder `path`, else None."""
    candidate = path / PREPARED_FILE
    return candidate if path.is_dir() and candidate.is_file() else None


def read_prepared_info(folder: Path) -> dict:
    """The record of a prepared folder, checked to be one this version reads."""
    file = folder / PREPARED_FILE
    try:
        info = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{file} cannot be read as a prepared dataset record: {err}") from None
    if info.get("format") != FORMAT or info.get("version") != FORMAT_VERSION:
        raise DataError(f"{file} is not a {FORMAT} record of version {FORMAT_VERSION} "
                        f"(format {info.get('format')!r}, version {info.get('version')!r}); "
                        f"prepare the dataset again")
    return info


def expand_urls(pattern: str) -> list[str]:
    """The shard URLs of a brace pattern (`shard-{000000..000009}.tar`), a `::`-separated list,
    or a single URL."""
    import webdataset

    urls = webdataset.shardlists.expand_urls(pattern)
    if not urls:
        raise DataError(f"shard pattern {pattern!r} names no shard")
    return urls


def decode_sample(sample: dict) -> Image.Image:
    """The RGB image of a WebDataset sample, or a DataError naming its shard and key."""
    extension = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
    where = f"sample {sample.get('__key__')!r} of shard {sample.get('__url__')}"
    if extension is None:
        raise DataError(f"{where} has no image (expected one of "
                        f"{', '.join('.' + e for e in IMAGE_EXTENSIONS)}; it has "
                        f"{', '.join(k for k in sample if not k.startswith('__'))})")
    try:
        with Image.open(io.BytesIO(sample[extension])) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot decode the image of {where}: {err or type(err).__name__}") from None


def sample_row(sample: dict) -> dict:
    """The manifest row a sample's JSON holds."""
    if "json" not in sample:
        raise DataError(f"sample {sample.get('__key__')!r} of shard {sample.get('__url__')} has "
                        f"no .json row: a shard needs each image's labels beside it")
    try:
        row = json.loads(sample["json"])
    except ValueError as err:
        raise DataError(f"sample {sample.get('__key__')!r} of shard {sample.get('__url__')}: its "
                        f".json does not parse: {err}") from None
    if not isinstance(row, dict):
        raise DataError(f"sample {sample.get('__key__')!r} of shard {sample.get('__url__')}: its "
                        f".json is not an object")
    return row


def iter_samples(urls: Sequence[str]) -> Iterator[dict]:
    """The samples of the shards at `urls`, in order; a shard that cannot be opened or read
    raises a DataError naming it."""
    import webdataset

    stages = webdataset.DataPipeline(webdataset.SimpleShardList(list(urls)),
                                     webdataset.tarfile_to_samples())
    try:
        yield from stages
    except (OSError, ValueError, EOFError) as err:
        shard = next((str(a) for a in err.args if isinstance(a, str) and a in urls), None)
        where = f"shard {shard}" if shard else f"one of the shards {urls[0]} ..."
        reason = getattr(err, "strerror", None) or (err.args[0] if err.args else type(err).__name__)
        raise DataError(f"cannot read {where}: {reason}") from None


def scan_shards(urls: Sequence[str]) -> pd.DataFrame:
    """The rows of every sample of the shards, with its shard index and key (one pass)."""
    index = {url: i for i, url in enumerate(urls)}
    rows = []
    for sample in iter_samples(urls):
        rows.append({**sample_row(sample), names.SHARD_COLUMN: index[sample["__url__"]],
                     names.KEY_COLUMN: sample["__key__"]})
    if not rows:
        raise DataError(f"the shards {urls[0]} ... hold no sample")
    return pd.DataFrame(rows)


def first_sample_keys(pattern: str) -> frozenset[str]:
    """The file keys (`jpg`, `json`, `sci.txt`, ...) of the first sample of the first shard that
    `pattern` names: what tells one sharded format from another. A shard that cannot be read, or
    holds no sample, is a DataError naming it."""
    url = expand_urls(pattern)[0]
    return _first_keys(url)


@functools.lru_cache(maxsize=16)
def _first_keys(url: str) -> frozenset[str]:
    for sample in iter_samples([url]):
        return frozenset(k for k in sample if not k.startswith("__"))
    raise DataError(f"shard {url} holds no sample")


def sample_locator(url: str, key: str) -> str:
    """The `image_path` of a sharded image: its shard and key."""
    return f"{url}#{key}"


def levels_record(levels: names.Levels) -> dict:
    """A prepared record's form of the table's levels."""
    return {"scored": list(levels.scored), "within_taxa": list(levels.within_taxa)}


def levels_of_record(record: dict) -> names.Levels:
    """The levels a prepared record holds."""
    return names.Levels(scored=tuple(record["scored"]), within_taxa=tuple(record["within_taxa"]))
