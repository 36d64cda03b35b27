"""Plain helpers the tests import: the checkout's paths, free ports, a server's readiness,
a per-test sqlite store, the slow cases' marks and a recorder of the largest tensor an
operation returns. (Fixtures and hooks live in conftest.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
LEEDS = SHARED / "data" / "leeds-butterflies"
UNICOM_REFERENCE = SHARED / "reference" / "unicom"


# what running Python and pytest leaves in any checkout, ignored by git and by
# conftest's check that the tests leave nothing in the checkout
_RUN_LITTER = ("__pycache__", ".pytest_cache", ".egg-info")


def checkout_entries(root: Path) -> set[str] | None:
    """The untracked and ignored entries of the checkout at `root` (`git status --porcelain
    --ignored`), less Python's caches; None where git cannot say."""
    import subprocess

    try:
        done = subprocess.run(["git", "status", "--porcelain", "--ignored"],
                              cwd=root, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return {line for line in done.stdout.splitlines()
            if line[:2] in ("??", "!!") and not any(part in line for part in _RUN_LITTER)}


def sqlite_tracking(monkeypatch, folder: Path, experiment: str | None = None) -> None:
    """Point this test (and the processes it starts) at a fresh sqlite store in `folder`,
    logging into `experiment` when given; the test runs in `folder`, where the store puts its
    artifacts (./mlruns), not in the checkout."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
    monkeypatch.chdir(folder)
    if experiment is not None:
        monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment)


def slow_but_all_three(cases) -> list:
    """The password cases of a test that takes seconds each: the one holding every character
    (`all three`) runs in `make test`, the others with the slow tests."""
    return [pytest.param(case, id=case, marks=() if case == "all three" else pytest.mark.slow)
            for case in cases]


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now, chosen below the
    kernel's range of ephemeral ports: the tests' many client connections (to their MLflow
    servers) take their local ports from that range, and one of them could take a port from it
    between this answer and the bind that needs it (a rendezvous store then never starts)."""
    import random
    import socket

    for port in random.Random().sample(range(_FIRST_PORT, _ephemeral_ports_start()), 100):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port from {_FIRST_PORT} up to the ephemeral ports")


_FIRST_PORT = 10_000


def _ephemeral_ports_start() -> int:
    """The first port of the kernel's ephemeral range (Linux), else IANA's 49152."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 49152


def wait_for_http(url: str, process, seconds: float = 90.0) -> None:
    """Poll `url` until it answers 200, failing early if `process` exits."""
    import time
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with status {process.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"no answer from {url} within {seconds} s")


def gained_entries(before: set[str] | None, after: set[str] | None) -> list[str]:
    """The paths that `checkout_entries` lists after but not before, sorted (none where git
    could not say either time)."""
    if before is None or after is None:
        return []
    return sorted(line[3:] for line in after - before)


class LargestOutput(TorchDispatchMode):
    """Records the largest `measure(tensor)` over the tensors any torch operation returns while
    it is active (`measure` gives None for a tensor that does not count)."""

    def __init__(self, measure):
        super().__init__()
        self.measure = measure
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            size = self.measure(tensor) if isinstance(tensor, torch.Tensor) else None
            if size is not None:
                self.largest = max(self.largest, size)
        return out
