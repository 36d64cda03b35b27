"""A real SLURM cluster on this machine for the tests: munged, slurmctld and two slurmd (Debian's
`slurm-wlm` and `munge`), nodes node1 and node2 of one core each, so that a job can span two
nodes; key, configuration, state and logs in a temporary folder, ports free ones; stopped by
their PIDs at the end. It needs root (slurmd starts jobs as their user) and skips, saying why,
where SLURM is not installed; .ci/run installs it."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import free_port

PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol", "sinfo")
PARTITION = "debug"
NODES = ("node1", "node2")
CONF = """\
ClusterName=taxonclip-test
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job may start again 5 s after it stopped (SLURM's default is 120 s)
AuthInfo=socket={root}/munge/munge.socket,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
# the scheduler looks at the queue every second, not every minute
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=600
KillWait=30
InactiveLimit=0
# two nodes on this host, each its own slurmd on its own port
NodeName=node1 NodeHostname=localhost NodeAddr=127.0.0.1 Port={node1_port} CPUs=1 RealMemory=4000
NodeName=node2 NodeHostname=localhost NodeAddr=127.0.0.1 Port={node2_port} CPUs=1 RealMemory=4000
PartitionName={partition} Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP
"""


def missing_reason() -> str | None:
    """Why no cluster can start here, or None."""
    absent = [name for name in PROGRAMS if shutil.which(name) is None
              and not Path("/usr/sbin", name).exists()]
    if absent:
        return (f"SLURM is not installed ({', '.join(absent)} not found); .ci/run installs "
                f"slurm-wlm and munge")
    if os.geteuid() != 0:
        return "the test cluster's slurmd must run as root"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no `munge` account to run munged as (the munge package makes it)"
    return None


def _program(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _start(root: Path) -> dict[str, str]:
    """Start munged, slurmctld and slurmd; returns the environment clients need (SLURM_CONF)."""
    for folder in ("munge", "state", "spool", "log"):
        (root / folder).mkdir()
    for node in NODES:
        (root / "spool" / node).mkdir()
    munge = root / "munge"
    key = munge / "munge.key"
    key.write_bytes(os.urandom(1024))
    shutil.chown(munge, "munge", "munge")
    shutil.chown(key, "munge", "munge")
    munge.chmod(0o711)
    key.chmod(0o400)
    subprocess.run(["runuser", "-u", "munge", "--", _program("munged"), f"--key-file={key}",
                    f"--socket={munge}/munge.socket", f"--pid-file={munge}/munged.pid",
                    f"--log-file={munge}/munged.log", f"--seed-file={munge}/seed", "--force"],
                   check=True, timeout=30)
    conf = root / "slurm.conf"
    conf.write_text(CONF.format(root=root, ctld_port=free_port(), node1_port=free_port(),
                                node2_port=free_port(), partition=PARTITION))
    env = {"SLURM_CONF": str(conf)}
    for command in (["slurmctld"], *(["slurmd", "-N", node] for node in NODES)):
        subprocess.run([_program(command[0]), "-f", str(conf), *command[1:]], check=True,
                       timeout=30, env={**os.environ, **env})
    return env


def _wait_idle(env: dict[str, str], root: Path, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                              env={**os.environ, **env})
        if done.stdout.split() == ["idle"]:
            return
        time.sleep(0.3)
    logs = "\n".join(p.read_text()[-1500:] for p in (root / "log").glob("*.log"))
    raise RuntimeError(f"the test cluster's node is not idle after {seconds} s:\n{logs}")


def _stop(root: Path) -> None:
    """Stop the daemons by the PIDs they wrote, the slurmds first; munged last."""
    pid_files = [*(root / f"slurmd-{node}.pid" for node in NODES), root / "slurmctld.pid",
                 root / "munge" / "munged.pid"]
    for pid_file in pid_files:
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running single-node cluster; yields the environment its clients need (SLURM_CONF),
    which the fixture also sets for this process and the ones it starts."""
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    # outside pytest's tmp folders, which are private to the current user (munged reads here)
    root = Path(tempfile.mkdtemp(prefix="taxonclip-slurm-"))
    root.chmod(0o755)
    patch = pytest.MonkeyPatch()
    try:
        env = _start(root)
        for name, value in env.items():
            patch.setenv(name, value)
        _wait_idle(env, root)
        yield env
    finally:
        subprocess.run(["scancel", "--full", "--user=root"], capture_output=True, timeout=30)
        _stop(root)
        patch.undo()
        shutil.rmtree(root, ignore_errors=True)
