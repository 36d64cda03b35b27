"""The benchmarks on the CPU: bench/train_throughput.py --ddp with the tiny model in a plain process
(a process group of one) and under torchrun in 2 gloo processes; bench/eval_scale.py at a small
size; bench/device_check.sh's steps and its --dry-run."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from taxonclip import knn_scan
from tests.helpers import REPO, free_port

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


# --- bench/device_check.sh ---------------------------------------------------------------------

DEVICE_CHECK = REPO / "bench" / "device_check.sh"


def bench_module(name: str):
    """A script of bench/ as a module (its main not run)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def device_check_commands(tmp_path, *options: str) -> list[str]:
    """The commands `device_check.sh --dry-run` hands to its checker, with a stand-in python
    that records them instead of checking them."""
    recorder = tmp_path / "python"
    recorder.write_text(f"#!/bin/sh\ncat > {tmp_path / 'commands.txt'}\n")
    recorder.chmod(0o755)
    done = subprocess.run(["bash", str(DEVICE_CHECK), "--dry-run", *options], cwd=REPO,
                          env={**os.environ, "PYTHON": str(recorder)}, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    return (tmp_path / "commands.txt").read_text().splitlines()


def test_device_check_has_every_row_the_gpu_measurements_need(tmp_path):
    commands = device_check_commands(tmp_path)
    text = "\n".join(commands)

    assert "-m pytest -q -rs -m gpu tests/test_gpu.py" in text
    for model, batch in (("ViT-B/32", 256), ("ViT-L/14@336px", 64)):
        rows = [c for c in commands if f"--model {model} --batch {batch}" in c and "--compile" in c]
        assert all("--ddp" in c for c in rows)
        assert {"default", "reduce-overhead", "max-autotune"} == {
            re.search(r"--compile-mode (\S+)", c).group(1) if "--compile-mode" in c else "default"
            for c in rows}
    assert {re.search(r"--decode (\S+)", c).group(1) for c in commands if "--from-shards" in c} == {
        "workers", "device"}
    assert any("bench/eval_knn.py --device cuda" in c for c in commands)
    caption = next(c for c in commands if "bench/caption_throughput.py" in c)
    for option in ("--model", "--images", "--batch", "--max-new-tokens", "--device cuda"):
        assert option in caption
    assert not any("caption_throughput" in c for c in device_check_commands(tmp_path, "--skip", "caption"))


def test_the_command_checker_finds_a_missing_script_and_a_refused_argument():
    check = bench_module("check_commands").check
    python = sys.executable

    assert check([python, "bench/eval_knn.py", "--device", "cuda", "--repeat", "3"]) is None
    assert "refuses its arguments" in check([python, "bench/eval_knn.py", "--repeats", "3"])
    assert "does not exist" in check([python, "bench/no_such_bench.py"])
    assert "refuses its arguments" in check([python, "bench/eval_scale.py", "--gallery", "many"])


@pytest.mark.slow  # about 6 s: every script imported and its parser given the step's arguments
def test_device_check_dry_run_passes():
    done = subprocess.run(["bash", str(DEVICE_CHECK), "--dry-run"], cwd=REPO,
                          env={**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""},
                          capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "FAILED" not in done.stdout
    assert done.stdout.count("ok: ") == 12


# --- bench/eval_scale.py -------------------------------------------------------------------------

SMALL_SCALE = ["--gallery", "600", "--queries", "120", "--dim", "16", "--species", "20", "--taxa", "3",
               "--chunk-size", "32", "--check"]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_eval_scale_scores_its_store_in_place_as_an_in_memory_copy(tmp_path, dtype):
    scale = bench_module("eval_scale")
    args = scale.parse_args([*SMALL_SCALE, "--dtype", dtype])
    scale.write_store(tmp_path, args)

    outcome = scale.score(tmp_path, args)
    last = scale.report(args, None, outcome, (tmp_path / "embeddings.npy").stat().st_size).splitlines()[-1]

    assert outcome["same_as_in_memory"] is True
    assert re.fullmatch(r"peak_rss_gb=\d+\.\d\d store_gb=0\.00", last), last
    table = json.loads(outcome["table"])
    assert [(row["taxa"], row["level"]) for row in table] == [
        ("taxon 0", "species"), ("taxon 1", "species"), ("taxon 2", "species"), ("All", "species")]
    assert table[-1]["n_test"] == 120 and table[-1]["n_lone"] == 0


@pytest.mark.slow  # two child processes
def test_eval_scale_command_ends_with_its_memory_line(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "bench" / "eval_scale.py"), *SMALL_SCALE,
                           "--keep", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)

    assert done.returncode == 0, done.stderr
    assert "same table as the in-memory reference: yes" in done.stdout
    assert re.fullmatch(r"peak_rss_gb=\d+\.\d\d store_gb=0\.00", done.stdout.splitlines()[-1])


def test_eval_knn_times_the_products_ours_makes_in_chunks_and_blocks(monkeypatch):
    """The products row of bench/eval_knn.py goes through the same path as ours (the kernel's
    BLAS calls where knn makes its products there), over several chunks and gallery blocks."""
    eval_knn = bench_module("eval_knn")
    data = eval_knn.clustered_embeddings(40, 300, 8, 5, 1.0, seed=0)
    calls = []
    fused = knn_scan.fused
    monkeypatch.setattr(knn_scan, "fused", lambda *args, **kwargs: calls.append(kwargs) or fused(*args, **kwargs))
    monkeypatch.setattr(eval_knn, "BLOCK_ELEMENTS", 16 * 100)  # blocks of 100 items for chunks of 16

    assert eval_knn.products_only(*data, 16, "cpu") == {}
    assert eval_knn.torch_products(*data, 16, "cpu") == {}
    if knn_scan.supports("cpu", torch.float32) and knn_scan.gemm(torch.float32) is not None:
        assert calls == [{"products_only": True}] * (3 * 3)  # 3 chunks x 3 blocks
