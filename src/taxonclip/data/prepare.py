"""`taxonclip data prepare`: a dataset written once as WebDataset shards of images resized to the
largest input a model will use, so that training decodes small JPEGs instead of the originals.

The rows keep the manifest's order and go `shard_size` to a shard, so the plan of the output is
a function of the source table and the settings alone. Each shard is written to a `.partial`
file, synced, then renamed, and a sidecar `.json` beside it records the source digests of its
rows; a rerun keeps every shard whose sidecar matches the source as it is now and writes the
others again. A prepare killed part-way therefore continues where it stopped and never leaves a
half-written shard under a shard's name, and, since tar headers carry fixed times and owners and
the encoders are deterministic, its shards are byte for byte those of an uninterrupted run.
`prepared.json`, written last, marks the folder complete (see `taxonclip.data.shards`).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import json
import math
import os
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from taxonclip import names
from taxonclip.config import PrepareConfig, check_prepare
from taxonclip.data import shards
from taxonclip.data.integrity import file_sha256
from taxonclip.data.validated import (COLUMNS, Manifest, ManifestReport, check_taxa_names,
                                      clean_name, genus_of, report_of, species_of)
from taxonclip.diskio import atomic_path, disk_errors, write_bytes
from taxonclip.errors import ConfigError, DataError
from taxonclip.progress import Progress

PLAN_FILE = "plan.json"
_JSON_BLOCK_ROWS = 10_000
IMAGE_FORMATS = {"jpeg": ("jpg", "JPEG"), "webp": ("webp", "WEBP")}
# an image already no larger than the size keeps its own bytes when it is in one of these
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_TAR_OWNER = "taxonclip"
_PR_SET_PDEATHSIG = 1  # prctl(2)


@dataclass(frozen=True)
class PrepareSettings:
    """How images are written: the short side in pixels (an image no larger keeps its own
    bytes), the format and quality of the resized ones, and the rows per shard."""

    size: int = PrepareConfig.size
    image_format: str = PrepareConfig.image_format
    quality: int = PrepareConfig.quality
    shard_size: int = PrepareConfig.shard_size

    def __post_init__(self) -> None:
        # tests and bench scripts build settings without a PrepareConfig
        check_prepare(self.size, self.image_format, self.quality, self.shard_size)


@dataclass(frozen=True)
class PrepareResult:
    """What one prepare did: shards written and kept, images, bytes in and out, seconds."""

    folder: Path
    shards_written: int
    shards_kept: int
    images: int
    resized: int
    source_bytes: int
    output_bytes: int
    seconds: float

    def summary(self) -> str:
        """Lines for people: what was written and how fast."""
        rate = self.images / max(self.seconds, 1e-9)
        ratio = self.output_bytes / max(self.source_bytes, 1)
        return "\n".join([
            f"prepared: {self.folder}",
            f"shards: {self.shards_written} written, {self.shards_kept} already up to date",
            f"images: {self.images} ({self.resized} resized, the others kept as they were)",
            f"size: {self.output_bytes / 1e6:.1f} MB from {self.source_bytes / 1e6:.1f} MB of "
            f"source images ({100 * ratio:.1f}%)",
            f"time: {self.seconds:.1f} s ({rate:.0f} images/s)"])


@dataclass(frozen=True)
class _ShardJob:
    index: int
    folder: str
    paths: tuple[str, ...]
    keys: tuple[str, ...]
    rows: tuple[str, ...]  # each row's JSON
    settings: PrepareSettings


@dataclass(frozen=True)
class _ShardDone:
    index: int
    written: bool
    digests: tuple[str, ...]
    resized: int
    source_bytes: int
    tar_bytes: int
    tar_sha256: str


def prepare(manifest: Manifest, out: str | Path, settings: PrepareSettings = PrepareSettings(),
            workers: int | None = None, progress: bool = True) -> PrepareResult:
    """Write `manifest` as shards into `out` (new, empty, or a prepare of the same source and
    settings to continue or refresh); returns what was done. `workers` processes encode images
    (default: every core)."""
    if not str(out):
        raise ConfigError("prepare needs an output folder (--out)")
    if manifest.shards:
        raise DataError(f"{manifest.report.source} is WebDataset shards already: train and eval "
                        f"read it as it is, with no prepare step")
    start = time.perf_counter()
    folder = Path(os.path.abspath(Path(out).expanduser()))
    table = manifest.table
    keys = [f"{row:09d}" for row in range(len(table))]
    rows = _json_rows(table)
    plan = _plan(rows, settings)
    _claim(folder, plan)
    jobs = [_ShardJob(i, str(folder), tuple(table["image_path"].iloc[s]), tuple(keys[s]),
                      tuple(rows[s]), settings)
            for i, s in enumerate(_shard_slices(len(table), settings.shard_size))]
    done = sorted(_run(jobs, workers or os.cpu_count() or 1, len(table), progress),
                  key=lambda d: d.index)
    digests = [digest for shard in done for digest in shard.digests]
    _write_manifest(folder, table, keys, digests, settings.shard_size)
    _write_record(folder, manifest, plan, done, digests)
    return PrepareResult(folder, sum(d.written for d in done), sum(not d.written for d in done),
                         len(table), sum(d.resized for d in done),
                         sum(d.source_bytes for d in done), sum(d.tar_bytes for d in done),
                         time.perf_counter() - start)


def _json_rows(table: pd.DataFrame) -> list[str]:
    """Each row's JSON (every column but the source path; blanks as null), keys sorted.

    Made block by block: the dictionaries of all rows at once (about four times the size of
    their JSON) would take gigabytes for a table of millions of rows."""
    rows = []
    for start in range(0, len(table), _JSON_BLOCK_ROWS):
        frame = table.iloc[start:start + _JSON_BLOCK_ROWS].drop(columns=["image_path"]).astype(object)
        frame = frame.where(frame.notna(), None)
        rows.extend(json.dumps(record, sort_keys=True, ensure_ascii=False, default=_plain)
                    for record in frame.to_dict("records"))
    return rows


def _plain(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"a manifest value of type {type(value).__name__} cannot be written as JSON")


def _plan(rows: list[str], settings: PrepareSettings) -> dict:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(row.encode() + b"\n")
    return {"format": shards.FORMAT, "version": shards.FORMAT_VERSION,
            "settings": asdict(settings), "table_sha256": digest.hexdigest(), "rows": len(rows),
            "shards": math.ceil(len(rows) / settings.shard_size)}


def _claim(folder: Path, plan: dict) -> None:
    """Make `folder` the output of `plan`: a new or empty folder, or one prepared (or being
    prepared) by the same plan; anything else is refused, naming what differs."""
    plan_file = folder / PLAN_FILE
    if plan_file.is_file():
        recorded = json.loads(plan_file.read_text())
        if recorded != plan:
            differs = [k for k in plan if recorded.get(k) != plan[k]]
            raise DataError(f"{folder} was prepared from another source table or with other "
                            f"settings ({', '.join(differs)} differ: {recorded.get('settings')} "
                            f"then, {plan['settings']} now); choose a new --out, or delete "
                            f"{folder} to prepare it again")
    elif folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise DataError(f"{folder} is not empty and holds no prepare of this tool; choose a new "
                        f"or empty --out")
    above = next(p for p in (folder, *folder.parents) if p.exists())
    if not above.is_dir():
        raise DataError(f"--out {folder}: {above} is a file, not a folder; choose another --out")
    with disk_errors(above, what="the prepared folder"):
        (folder / shards.SHARD_FOLDER).mkdir(parents=True, exist_ok=True)
    for partial in (folder / shards.SHARD_FOLDER).glob("*.partial"):
        partial.unlink(missing_ok=True)  # what a killed prepare was writing
    _write_atomic(plan_file, json.dumps(plan, indent=1).encode())


def _shard_slices(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _run(jobs: list[_ShardJob], workers: int, images: int, progress: bool) -> list[_ShardDone]:
    """Every shard job, on `workers` processes (inline with one), with a progress bar."""
    bar = Progress(images, "prepare", "images", show=progress)
    done = []
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            done.append(write_shard(job))
            bar.update(len(job.keys))
    else:
        # forked where the platform can: the workers start at once and run only PIL, and a
        # caller's script needs no `if __name__ == "__main__"` guard
        context = get_context("fork" if "fork" in get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context,
                                 initializer=_die_with_parent) as pool:
            futures = {pool.submit(write_shard, job): job for job in jobs}
            for future in as_completed(futures):
                done.append(future.result())
                bar.update(len(futures[future].keys))
    bar.close()
    return done


def _die_with_parent() -> None:
    """On Linux, end this worker when the prepare that started it is killed."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def write_shard(job: _ShardJob) -> _ShardDone:
    """Write one shard, unless its sidecar shows it was written from these very source bytes."""
    tar = Path(job.folder, shards.SHARD_FOLDER, shards.shard_name(job.index))
    sidecar = tar.with_suffix(".json")
    sources = [_read(path) for path in job.paths]
    digests = tuple(hashlib.sha256(data).hexdigest() for data in sources)
    source_bytes = sum(len(data) for data in sources)
    recorded = _read_sidecar(sidecar)
    if tar.is_file() and recorded.get("digests") == list(digests) and recorded.get("keys") == list(job.keys):
        return _ShardDone(job.index, False, digests, recorded["resized"], source_bytes,
                          recorded["bytes"], recorded["sha256"])
    import webdataset

    # one partial file per process: a worker left running by a killed prepare never writes
    # into the file of the prepare run after it
    partial = tar.with_name(f"{tar.name}.{os.getpid()}.partial")
    resized = 0
    with _whole_or_none(partial, sum(map(len, sources))), open(partial, "wb") as stream:
        writer = webdataset.TarWriter(stream, encoder=False, mtime=0, user=_TAR_OWNER,
                                      group=_TAR_OWNER, mode=0o444)
        for path, key, row, data in zip(job.paths, job.keys, job.rows, sources):
            extension, encoded, was_resized = encode_image(data, job.settings, path)
            resized += was_resized
            writer.write({"__key__": key, extension: encoded, "json": row.encode()})
        writer.close()
        stream.flush()
        os.fsync(stream.fileno())
    digest = file_sha256(partial)
    size = partial.stat().st_size
    partial.replace(tar)
    _write_atomic(sidecar, json.dumps({"keys": list(job.keys), "digests": list(digests),
                                       "resized": resized, "bytes": size, "sha256": digest}).encode())
    return _ShardDone(job.index, True, digests, resized, source_bytes, size, digest)


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise DataError(f"cannot read image {path}: {err.strerror or err}") from None


def _read_sidecar(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def encode_image(data: bytes, settings: PrepareSettings, path: str = "<bytes>") -> tuple[str, bytes, bool]:
    """(extension, bytes, resized) of one image for a shard: an image whose short side is at
    most `settings.size` keeps its own bytes (when JPEG, PNG or WebP), any other is decoded,
    resized to that short side (bicubic) and encoded in `settings.image_format`."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            short = min(image.size)
            if short <= settings.size and image.format in KEPT_FORMATS:
                return KEPT_FORMATS[image.format], data, False
            target = _target_size(image.size, settings.size)
            if image.format == "JPEG" and short > settings.size:
                image.draft("RGB", target)  # decode at the smallest DCT scale still >= target
            rgb = image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot decode image {path}: {err or type(err).__name__}") from None
    if min(rgb.size) > settings.size:
        rgb = rgb.resize(target, Image.Resampling.BICUBIC)
    extension, pil_format = IMAGE_FORMATS[settings.image_format]
    out = io.BytesIO()
    # full-resolution colour (4:4:4): chroma subsampling would blur the small colour marks
    # that tell species apart, for a few per cent of file size
    rgb.save(out, format=pil_format, quality=settings.quality, subsampling=0)
    return extension, out.getvalue(), short > settings.size


def _target_size(size: tuple[int, int], short_side: int) -> tuple[int, int]:
    width, height = size
    if min(width, height) <= short_side:
        return width, height
    scale = short_side / min(width, height)
    return max(short_side, round(width * scale)), max(short_side, round(height * scale))


def _write_atomic(path: Path, data: bytes) -> None:
    write_bytes(path, data)


@contextlib.contextmanager
def _whole_or_none(partial: Path, needed: int):
    """Remove `partial` when its writing fails; a full disk is a DiskError naming the folder."""
    try:
        with disk_errors(partial.parent, needed, "a shard"):
            yield
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _write_manifest(folder: Path, table: pd.DataFrame, keys: list[str], digests: list[str],
                    shard_size: int) -> None:
    frame = table.drop(columns=["image_path"]).assign(**{
        names.SHARD_COLUMN: np.arange(len(table)) // shard_size,
        names.KEY_COLUMN: keys, names.SOURCE_DIGEST_COLUMN: digests})
    with atomic_path(folder / shards.MANIFEST_FILE) as partial:
        frame.to_parquet(partial, index=False)


def _write_record(folder: Path, manifest: Manifest, plan: dict, done: list[_ShardDone],
                  digests: list[str]) -> None:
    content = hashlib.sha256(plan["table_sha256"].encode())
    for digest in digests:
        content.update(digest.encode())
    record = {
        "format": shards.FORMAT, "version": shards.FORMAT_VERSION, "settings": plan["settings"],
        "source": manifest.report.source, "source_sha256": content.hexdigest(),
        "table_sha256": plan["table_sha256"], "rows": plan["rows"],
        "levels": shards.levels_record(manifest.levels), "report": asdict(manifest.report),
        "source_bytes": sum(d.source_bytes for d in done),
        "shards": [{"file": shards.shard_name(d.index), "rows": len(d.digests), "bytes": d.tar_bytes,
                    "sha256": d.tar_sha256} for d in done]}
    _write_atomic(folder / shards.PREPARED_FILE, json.dumps(record, indent=1).encode())


def read_prepared(folder: Path, missing: str) -> Manifest:
    """The manifest of a prepared folder, its images in its shards; a shard that is absent or
    whose size differs from the record is refused, naming it."""
    from taxonclip.data.integrity import verify_prepared

    verify_prepared(folder)  # every shard's size and SHA-256 as recorded, before any run
    info = shards.read_prepared_info(folder)
    urls = []
    for entry in info["shards"]:
        path = folder / shards.SHARD_FOLDER / entry["file"]
        size = path.stat().st_size if path.is_file() else None
        if size != entry["bytes"]:
            state = "is missing" if size is None else f"has {size} bytes, the record {entry['bytes']}"
            raise DataError(f"shard {path} {state}: the prepared folder {folder} was changed "
                            f"after it was written; prepare it again")
        urls.append(str(path))
    try:
        table = pd.read_parquet(folder / shards.MANIFEST_FILE)
    except (OSError, ValueError) as err:
        raise DataError(f"{folder / shards.MANIFEST_FILE} cannot be read: {err}") from None
    table = _with_locators(table, urls)
    report = ManifestReport(**{**info["report"], "source": str(folder),
                               "missing": tuple(info["report"]["missing"])})
    return Manifest(table=table, report=report, root=folder,
                    levels=shards.levels_of_record(info["levels"]), shards=tuple(urls))


def _with_locators(table: pd.DataFrame, urls: list[str]) -> pd.DataFrame:
    """The table with `image_path` naming each row's shard and key, columns in manifest order."""
    shard_of = table[names.SHARD_COLUMN].astype(int)
    table = table.assign(image_path=[shards.sample_locator(urls[s], k)
                                     for s, k in zip(shard_of, table[names.KEY_COLUMN].astype(str))])
    return table[list(COLUMNS) + [c for c in table.columns if c not in COLUMNS]]


def shard_note(manifest: Manifest) -> str:
    """A line on where a sharded manifest's images are: its shards and, for a prepared folder,
    the source and settings it was prepared from."""
    record = manifest.root / shards.PREPARED_FILE
    if not record.is_file():
        return f"images: {len(manifest.shards)} shards ({manifest.report.source})"
    info = shards.read_prepared_info(manifest.root)
    settings = info["settings"]
    return (f"images: {len(manifest.shards)} shards prepared from {info['source']} (source "
            f"sha256 {info['source_sha256'][:16]}), short side {settings['size']} px, "
            f"{settings['image_format']} quality {settings['quality']}")


def unfinished_message(folder: Path) -> str | None:
    """Why `folder` cannot be read yet when it is a prepare that has not finished, else None."""
    plan = folder / PLAN_FILE
    if not plan.is_file() or (folder / shards.PREPARED_FILE).is_file():
        return None
    total = json.loads(plan.read_text()).get("shards", "?")
    written = len(list((folder / shards.SHARD_FOLDER).glob("shard-*.json")))
    return (f"{folder} is an unfinished prepare ({written} of {total} shards written); run the "
            f"same `taxonclip data prepare ... --out {folder}` again to finish it")


def read_shard_urls(pattern: str, taxa: str | None = None) -> Manifest:
    """The manifest of shards named by a URL pattern, built from their samples' JSON rows: each
    row needs a `scientific_name` (or `scientificName`); `taxa` (or the row's own) sets its taxa;
    a row with every BIOSCAN-5M rank makes the table's levels the ranks."""
    urls = shards.expand_urls(pattern)
    table = shards.scan_shards(urls)
    name_column = next((c for c in ("scientific_name", "scientificName") if c in table.columns), None)
    if name_column is None:
        raise DataError(f"the samples of {pattern} have no 'scientific_name' in their .json rows "
                        f"(they have {', '.join(map(str, table.columns))})")
    table["scientific_name"] = table[name_column].map(clean_name)
    blank = int(table["scientific_name"].isna().sum())
    table = table[table["scientific_name"].notna()].reset_index(drop=True)
    if taxa is None and "taxa" not in table.columns:
        raise DataError(f"the samples of {pattern} have no 'taxa' in their .json rows; name the "
                        f"taxa of them all with taxa=NAME")
    if taxa is not None:
        table["taxa"] = taxa
    ranked = all(rank in table.columns for rank in names.BIOSCAN_RANKS)
    if ranked and names.BIOSCAN_BIN not in table.columns:
        table[names.BIOSCAN_BIN] = None  # shards of BIOSCAN-5M rows read without their BIN
    if not ranked:
        table["species"] = table["scientific_name"].map(species_of)
        table["genus"] = table["scientific_name"].map(genus_of)
    if "image_id" not in table.columns:
        table["image_id"] = [f"{urls[s]}#{k}" for s, k in zip(table[names.SHARD_COLUMN], table[names.KEY_COLUMN])]
    check_taxa_names(table["taxa"], pattern)
    table = _with_locators(table, urls)
    report = report_of(table, pattern, dropped_blank=blank, ranked=ranked, format="prepared")
    levels = names.BIOSCAN_LEVELS if ranked else names.VLM4BIO_LEVELS
    return Manifest(table=table, report=report, root=Path("."), levels=levels, shards=tuple(urls))
