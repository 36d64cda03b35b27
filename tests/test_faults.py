"""Faults beyond bad input: a full disk under the spool and under a prepare, a queue write that
fails, a tampered prepared shard, sweep workers started together on one study, and processes
started together on a new tracking store. Each ends in one message, leaves no partial file, and
keeps what can go on resumable."""

from __future__ import annotations

import errno
import io
import multiprocessing
import os
import re
import subprocess
import tarfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from taxonclip import names
from taxonclip.cli import main
from taxonclip.data import integrity
from taxonclip.data.manifest import read_manifest
from taxonclip.data.prepare import PrepareSettings, prepare
from taxonclip.errors import DiskError
from taxonclip.sweep.run import open_study, suggest
from taxonclip.sweep.spec import load_sweep
from taxonclip.tracking.spool import Spool
from tests.helpers import sqlite_tracking

TRAIN = ["train", "--model", "tiny", "--batch_size", "16", "--lr", "3e-3", "--margin_s", "16",
         "--margin_m2", "0.2", "--workers", "0", "--epochs", "1"]


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs (the tiny model's checkpoint takes 14 MB), unmounted after the test; a visible
    skip where this process may not mount one."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)],
                             capture_output=True, text=True) if os.geteuid() == 0 else None
    if mounted is None or mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({'not root' if mounted is None else mounted.stderr.strip()}); "
                    f"the patched-writer tests cover the same code")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_a_disk_error_leaves_a_training_run_running_with_its_reason(tmp_path, monkeypatch):
    from taxonclip.tracking.runs import tracked_run

    sqlite_tracking(monkeypatch, tmp_path, "stopped")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DiskError, match="then continue the run with: taxonclip train --resume"):
        with tracked_run("train") as run:
            raise DiskError("cannot write x into /full: no space left")
    stopped = MlflowClient().get_run(run.run_id)
    assert stopped.info.status == "RUNNING"
    assert stopped.data.tags[names.TAG_STOPPED_REASON].startswith("cannot write x")
    with pytest.raises(DiskError):  # an eval cannot go on: it fails
        with tracked_run("eval") as run:
            raise DiskError("cannot write y")
    assert MlflowClient().get_run(run.run_id).info.status == "FAILED"


@pytest.mark.slow  # two trainings; the test above and the spool's tests cover its parts fast
def test_a_full_disk_under_the_spool_stops_the_run_resumably(small_disk, specimens, tmp_path,
                                                              monkeypatch, capsys):
    sqlite_tracking(monkeypatch, tmp_path, "full-disk")
    monkeypatch.chdir(tmp_path)  # the sqlite store's artifacts land in ./mlruns
    monkeypatch.setenv("TAXONCLIP_SPOOL", str(small_disk))
    assert main([*TRAIN, "--data", str(specimens)]) == 1
    error = capsys.readouterr().err
    assert "Traceback" not in error and "basic_ios" not in error, error
    assert f"cannot write epoch_001.pt into {small_disk}/" in error and "no space left" in error
    assert re.search(r"\(2\.\d MB free, 14\.\d MB needed\)", error), error
    assert "taxonclip train --resume" in error, error
    assert _files(small_disk) == [], "a partial checkpoint was left in the spool"
    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("full-disk").experiment_id])
    assert run.info.status == "RUNNING"
    assert "no space left" in run.data.tags[names.TAG_STOPPED_REASON]
    # space freed: the run goes on into the same record
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    assert main(["train", "--resume", run.info.run_id, "--workers", "0"]) == 0
    after = client.get_run(run.info.run_id)
    assert after.info.status == "FINISHED" and names.TAG_STOPPED_REASON not in after.data.tags
    steps = [m.step for m in client.get_metric_history(run.info.run_id, names.TRAIN_LOSS)]
    assert sorted(steps) == [1, 2, 3, 4], "steps lost or logged twice"


def test_a_full_disk_under_a_prepare_leaves_no_partial_shard(small_disk, specimens):
    (small_disk / "filler").write_bytes(b"\0" * (2 * 1024 * 1024 - 200 * 1024))
    with pytest.raises(DiskError, match=r"no space left \(.* free, .* needed\)"):
        prepare(read_manifest(specimens), small_disk / "prepared",
                PrepareSettings(size=32, shard_size=48), workers=1, progress=False)
    assert not [f for f in _files(small_disk) if f.endswith(".partial") or ".partial" in f]


def test_a_failed_queue_write_leaves_no_half_line(tmp_path, monkeypatch):
    spool = Spool(tmp_path / "run")
    spool.add({"call": "tags", "tags": {"a": "1"}})

    def full(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(DiskError, match=f"cannot write a queued call into {tmp_path / 'run'}"):
        spool.add({"call": "tags", "tags": {"b": "2"}})
    monkeypatch.undo()
    assert spool.pending() == [{"call": "tags", "tags": {"a": "1"}}]


def test_a_refused_checkpoint_write_leaves_nothing_in_the_spool(tmp_path):
    spool = Spool(tmp_path / "run")

    def denied(path):
        Path(path).write_bytes(b"half")
        raise OSError(errno.EACCES, "Permission denied")

    with pytest.raises(DiskError, match="permission denied"):
        spool.write("epoch_001.pt", denied, 100)
    assert _files(tmp_path) == []


@pytest.fixture
def prepared(specimens, tmp_path):
    folder = tmp_path / "prepared"
    prepare(read_manifest(specimens), folder, PrepareSettings(size=32, shard_size=48), workers=1,
            progress=False)
    return folder


def _remove_a_member_keeping_the_size(shard: Path) -> None:
    """Drop one sample's .json from a tar and pad it back to its size (the size check passes)."""
    size = shard.stat().st_size
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            if member.name != "000000001.json":
                tar.addfile(member, io.BytesIO(data))
    shard.write_bytes(out.getvalue().ljust(size, b"\0")[:size])
    assert shard.stat().st_size == size


def test_a_shard_with_a_removed_member_is_refused_before_any_run(prepared, tmp_path, monkeypatch,
                                                                  capsys):
    sqlite_tracking(monkeypatch, tmp_path, "tampered")
    monkeypatch.chdir(tmp_path)
    shard = prepared / "shards" / "shard-000000.tar"
    _remove_a_member_keeping_the_size(shard)
    assert main(["eval", "--model", "tiny", "--data", str(prepared), "--workers", "0"]) == 1
    error = capsys.readouterr().err
    assert f"shard {shard} has SHA-256" in error and "Traceback" not in error, error
    assert not (tmp_path / "mlflow.db").exists(), "a run was created for a tampered folder"


def test_a_verified_folder_is_not_hashed_again_until_a_shard_changes(prepared, monkeypatch):
    hashed = []
    real = integrity.file_sha256
    monkeypatch.setattr(integrity, "file_sha256", lambda path: hashed.append(path) or real(path))
    integrity.verify_prepared(prepared)
    assert len(hashed) == 2  # 96 rows, 48 a shard
    integrity.verify_prepared(prepared)
    assert len(hashed) == 2, "an unchanged folder was hashed again"
    shard = prepared / "shards" / "shard-000001.tar"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    integrity.verify_prepared(prepared)
    assert hashed[2:] == [shard]


SWEEP = """metric: val/All/species/top1_cos
sampler: {type: tpe, seed: 7}
search:
  lr: {type: float, low: 0.0001, high: 0.1, log: true}
  margin_m2: {type: float, low: 0.0, high: 0.5}
"""


@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_two_workers_on_one_study_draw_different_trials(storage, tmp_path):
    """Both open the study before either asks (started together): their first trials differ,
    and a worker's trials follow from the seed and the trial numbers."""
    (tmp_path / "s.yaml").write_text(SWEEP)
    spec = load_sweep(tmp_path / "s.yaml")
    url = (f"sqlite:///{tmp_path / 'optuna.db'}" if storage == "sqlite"
           else f"journal:{tmp_path / 'optuna.log'}")
    workers = [open_study(spec, "together", url) for _ in range(2)]
    firsts = []
    for study in workers:
        trial = study.ask()
        firsts.append({name: suggest(trial, name, spec.search[name]) for name in spec.search})
        study.tell(trial, 0.5)
    assert firsts[0] != firsts[1], firsts
    assert workers[0].sampler.trial_seed(1) == 8


def _start_store(uri: str, barrier, results) -> None:
    os.environ["MLFLOW_TRACKING_URI"] = uri
    from taxonclip.errors import TaxonclipError
    from taxonclip.tracking.connection import connect

    barrier.wait()
    try:
        connect()
        import mlflow

        mlflow.set_experiment("together")
        results.put("ok")
    except TaxonclipError as error:
        results.put(f"message: {error}")
    except Exception as error:  # noqa: BLE001 - the race this test looks for
        results.put(f"raw {type(error).__name__}: {error}")


def test_two_processes_started_together_on_a_new_store_both_start(tmp_path):
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(2), context.Queue()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    workers = [context.Process(target=_start_store, args=(uri, barrier, results))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert sorted(results.get(timeout=5) for _ in workers) == ["ok", "ok"]
