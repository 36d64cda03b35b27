"""`taxonclip caption` as processes: killed with SIGKILL and rerun, two torchrun processes
against one, and the Leeds butterflies end to end (slow: each starts Python processes or
decodes hundreds of photographs)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from taxonclip.captions import parts
from taxonclip.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ARGS = ("--workers", "0", "--max_new_tokens", "40")


def _command(out, data, *extra) -> list[str]:
    return [sys.executable, "-m", "taxonclip", "caption", "--out", str(out), "--data", str(data),
            *ARGS, *extra]


def test_sigkill_midway_then_rerun_gives_every_row_exactly_once(specimens, tmp_path, tracking):
    out = tmp_path / "out"
    process = subprocess.Popen(_command(out, specimens, "--batch_size", "2", "--part_size", "4"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while len(parts.part_files(out)) < 2 and process.poll() is None:
        assert time.monotonic() < deadline, "no part file appeared"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the job ended before it could be killed"
    before = parts.read_parts(out)
    assert 0 < len(before) < 96 and not (out / parts.CAPTIONS_FILE).exists()
    assert main(["caption", "--out", str(out), "--data", str(specimens), *ARGS,
                 "--batch_size", "2", "--part_size", "4"]) == 0
    every = parts.read_parts(out)
    assert every["image_id"].is_unique and len(every) == 96  # nothing captioned twice or lost
    table = pd.read_parquet(out / parts.CAPTIONS_FILE)
    assert table["image_id"].is_unique and len(table) == 96
    # the killed job's captions are those an uninterrupted job writes
    whole = tmp_path / "whole"
    assert main(["caption", "--out", str(whole), "--data", str(specimens), *ARGS,
                 "--batch_size", "2"]) == 0
    expected = pd.read_parquet(whole / parts.CAPTIONS_FILE).set_index("image_id")["caption"]
    assert table.set_index("image_id")["caption"].equals(expected.loc[table["image_id"]])


def test_two_torchrun_processes_caption_as_one(specimens, tmp_path, tracking):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["caption", "--out", str(one), "--data", str(specimens), *ARGS,
                 "--batch_size", "4"]) == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    finished = subprocess.run([*torchrun, "-m", "taxonclip", *_command(two, specimens,
                                                                       "--batch_size", "4")[3:]],
                              env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    shares = {p.name.split("-")[1] for p in parts.part_files(two)}
    assert shares == {"00000", "00001"}  # each rank wrote its own parts
    a = pd.read_parquet(one / parts.CAPTIONS_FILE)
    b = pd.read_parquet(two / parts.CAPTIONS_FILE)
    assert a["image_id"].tolist() == b["image_id"].tolist()
    assert a["caption"].tolist() == b["caption"].tolist()


def _port() -> int:
    from tests.helpers import free_port

    return free_port()


def test_the_leeds_butterflies_end_to_end(leeds, tmp_path, tracking, capsys):
    out = tmp_path / "leeds"
    assert main(["caption", "--out", str(out), "--data", str(leeds), "--max_new_tokens", "8",
                 "--batch_size", "32"]) == 0
    table = pd.read_parquet(out / parts.CAPTIONS_FILE)
    from taxonclip.data.manifest import read_manifest

    ids = read_manifest(leeds).table["image_id"]
    assert sorted(table["image_id"]) == sorted(ids) and table["image_id"].is_unique
    assert main(["eval", "--data", str(leeds), "--embedding", "avg", "--captions",
                 str(out / parts.CAPTIONS_FILE)]) == 0
    assert "All species" in " ".join(capsys.readouterr().out.split())
