"""A prepared folder is read only as it was written: every shard's size and SHA-256 against the
record `prepared.json` keeps (`verify_prepared`), before any run is created.

Hashing a folder of millions of images takes minutes, so a shard once verified is remembered,
by its size and modification time, in a small file under the cache (`<cache>/integrity/`); a
later read hashes only the shards changed since. Editing a shard in place changes its mtime, so
it is hashed again; the remembered digest must equal the recorded one, so a stale memory never
passes a shard the record does not name.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path

from taxonclip.config import cache_dir
from taxonclip.data import shards
from taxonclip.diskio import write_bytes
from taxonclip.errors import DataError, DiskError

_READ_CHUNK = 1 << 20
CACHE_FOLDER = "integrity"


def verify_prepared(folder: Path) -> None:
    """Refuse a prepared folder one of whose shards is missing, or differs in size or SHA-256
    from its record, naming the shard; shards verified before and unchanged since (same size and
    mtime) are not hashed again."""
    folder = Path(os.path.abspath(folder))
    info = shards.read_prepared_info(folder)
    memory_file = _memory_file(folder)
    memory = _read_memory(memory_file)
    verified = {}
    for entry in info["shards"]:
        path = folder / shards.SHARD_FOLDER / entry["file"]
        stat = path.stat() if path.is_file() else None
        if stat is None or stat.st_size != entry["bytes"]:
            state = "is missing" if stat is None else f"has {stat.st_size} bytes, the record {entry['bytes']}"
            raise DataError(f"shard {path} {state}: the prepared folder {folder} was changed "
                            f"after it was written; prepare it again")
        seen = [stat.st_size, stat.st_mtime_ns, entry["sha256"]]
        if memory.get(entry["file"]) != seen:
            digest = file_sha256(path)
            if digest != entry["sha256"]:
                raise DataError(f"shard {path} has SHA-256 {digest[:16]}..., the record "
                                f"{folder / shards.PREPARED_FILE} {entry['sha256'][:16]}...: its "
                                f"content was changed after it was written (a sample edited, "
                                f"removed or replaced); prepare the folder again")
        verified[entry["file"]] = seen
    if verified != memory:
        _remember(memory_file, verified)


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read a chunk at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _memory_file(folder: Path) -> Path:
    name = hashlib.sha256(str(folder).encode()).hexdigest()[:24]
    return cache_dir() / CACHE_FOLDER / f"{name}.json"


def _read_memory(path: Path) -> dict:
    try:
        memory = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return memory if isinstance(memory, dict) else {}


def _remember(path: Path, verified: dict) -> None:
    """Keep what was verified; a cache that cannot be written costs the next read time only."""
    try:
        write_bytes(path, json.dumps(verified).encode())
    except (DiskError, OSError):
        pass


def undecodable_images(paths: Sequence[str], workers: int) -> dict[str, str]:
    """Path -> reason for every image file whose pixels do not decode in full (truncated,
    corrupt), decoded on `workers` processes (inline with 0 or 1)."""
    paths = list(paths)
    if workers <= 1 or len(paths) < 2:
        reasons = map(decode_problem, paths)
        return {p: r for p, r in zip(paths, reasons) if r is not None}
    context = get_context("fork" if "fork" in get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        reasons = list(pool.map(decode_problem, paths, chunksize=max(1, len(paths) // (workers * 8))))
    return {p: r for p, r in zip(paths, reasons) if r is not None}


def decode_problem(path: str) -> str | None:
    """Why the image at `path` does not decode in full, else None."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
    except FileNotFoundError:
        return "no such file"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return str(err) or type(err).__name__
    return None
