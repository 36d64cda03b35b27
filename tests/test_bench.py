"""bench/train_throughput.py --ddp on the CPU with the tiny model: in a plain process (a process
group of one) and under torchrun in 2 gloo processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port

BENCH = REPO / "bench" / "train_throughput.py"
BATCH = 8
TINY = ["--model", "tiny", "--batch", str(BATCH), "--classes", "32", "--steps", "2", "--warmup",
        "1", "--no-baseline", "--ddp"]
TIMEOUT_S = 120


def bench(launcher: list[str]) -> str:
    """The benchmark's output with the TINY settings, started by `launcher`; fails on an error."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the CPU and gloo even where a GPU is
    done = subprocess.run([*launcher, str(BENCH), *TINY], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def ddp_row(output: str) -> tuple[int, float]:
    """Images/s and step ms of the one DDP row of the one table in `output`."""
    assert output.count("| method |") == 1, output
    rows = re.findall(r"^\| taxonclip bf16 DDP \| (\d+) \| ([\d.]+) \|", output, re.MULTILINE)
    assert len(rows) == 1, output
    img_s, step_ms = rows[0]
    return int(img_s), float(step_ms)


def test_ddp_row_in_a_plain_process_is_compared_with_the_step_outside_a_group():
    output = bench([sys.executable])
    img_s, _ = ddp_row(output)
    assert img_s > 0
    assert "world size 1 (gloo)" in output
    assert re.search(r"^\| taxonclip bf16 \| [1-9]\d* \|", output, re.MULTILINE), output
    assert re.search(r"^taxonclip bf16 DDP: step time [+-]\d+\.\d% against taxonclip bf16 ",
                     output, re.MULTILINE), output


@pytest.mark.slow  # the plain-process case above runs the same rows in make test
def test_ddp_row_under_torchrun_is_the_global_rate_printed_by_rank_0_alone():
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2",
                "--master_port", str(free_port())]
    output = bench(torchrun)
    img_s, step_ms = ddp_row(output)
    assert img_s > 0
    assert "world size 2 (gloo)" in output
    assert img_s == pytest.approx(BATCH * 2 / (step_ms / 1000), rel=0.02)
