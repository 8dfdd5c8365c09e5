"""A real single-node Slurm on this machine for the tests (session-scoped), and fake Slurm
commands for the canned-output tests.

The real cluster: munged with a throw-away key and socket, slurmctld and slurmd in the
foreground on free ports, state and spool folders in a temp dir, proctrack/linuxproc,
task/none, no accounting (so sacct is unavailable, as on many small sites), and two fake
GPUs (``Gres=gpu:2`` on character devices made with mknod) so that ``--gres=gpu:1`` queues
jobs as on a GPU node. ``SLURM_CONF`` points every Slurm command of the session at it.

Where Slurm is not installed or cannot start, the real tests are skipped – except under
``CI=true``, where they fail: ``scripts/test`` installs the Debian packages.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

import pytest

SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo", "scontrol")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    """slurmctld + slurmd + munged for one test session."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.conf = folder / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.gpus = 0
        self.host = socket.gethostname().split(".")[0]
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def _spawn(self, argv: list[str], log_name: str) -> subprocess.Popen:
        log = open(self.folder / "log" / log_name, "ab")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
                                start_new_session=True)
        log.close()
        self.procs.append(proc)
        return proc

    def _fake_gpus(self) -> bool:
        dev = self.folder / "dev"
        dev.mkdir()
        try:
            for i in range(2):
                os.mknod(dev / f"nvidia{i}", 0o644 | 0o020000, os.makedev(1, 3))  # like /dev/null
        except OSError:
            return False
        (self.folder / "gres.conf").write_text(f"AutoDetect=off\nNodeName={self.host} Name=gpu File={dev}/nvidia[0-1]\n")
        return True

    def start(self) -> None:
        f = self.folder
        for sub in ("state", "spool", "log", "munge"):
            (f / sub).mkdir()
        (f / "munge").chmod(0o755)
        key = f / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o600)
        socket_path = f / "munge" / "munge.socket"
        self._spawn(["munged", "-F", "-f", f"--socket={socket_path}", f"--key-file={key}",
                     f"--pid-file={f / 'munge' / 'munged.pid'}", f"--seed-file={f / 'munge' / 'seed'}",
                     f"--log-file={f / 'log' / 'munged.log'}"], "munged.out")
        self._wait(lambda: socket_path.exists(), 15, "munged did not create its socket")
        self.gpus = 2 if self._fake_gpus() else 0
        cpus = max(os.cpu_count() or 1, 8)
        gres = f" Gres=gpu:{self.gpus}" if self.gpus else ""
        self.conf.write_text("\n".join([
            "ClusterName=mqitest", f"SlurmctldHost={self.host}", "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={socket_path}",
            "MpiDefault=none", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none", "SchedulerType=sched/backfill", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "ReturnToService=2", "SlurmdParameters=config_overrides",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            f"StateSaveLocation={f / 'state'}", f"SlurmdSpoolDir={f / 'spool'}",
            f"SlurmctldPidFile={f / 'slurmctld.pid'}", f"SlurmdPidFile={f / 'slurmd.pid'}",
            f"SlurmctldLogFile={f / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={f / 'log' / 'slurmd.log'}",
            "MinJobAge=300", "KillWait=5", "InactiveLimit=0", "MessageTimeout=20",
            *(["GresTypes=gpu"] if self.gpus else []),
            f"NodeName={self.host} CPUs={cpus}{gres} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP", ""]))
        self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld.out")
        self._wait(lambda: self.run("scontrol", "ping").returncode == 0 and "UP" in self.run("scontrol", "ping").stdout,
                   30, "slurmctld does not answer `scontrol ping`")
        self._spawn(["slurmd", "-D", "-f", str(self.conf)], "slurmd.out")
        self._wait(lambda: self.node_state() in ("idle", "mixed", "allocated"), 40,
                   "the node did not become idle")

    def node_state(self) -> str:
        return self.run("sinfo", "--noheader", "--format=%T").stdout.strip().rstrip("*~#")

    def run(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), capture_output=True, text=True, env=self.env, timeout=30)

    def _wait(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} ({what})")
            try:
                if predicate():
                    return
            except (subprocess.SubprocessError, OSError):
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{what} within {timeout:.0f}s")

    def jobs(self) -> list[dict]:
        out = self.run("squeue", "--noheader", "--states=all", "--format=%i|%T|%j").stdout
        return [dict(zip(("id", "state", "name"), line.split("|"))) for line in out.splitlines() if line.strip()]

    def logs(self) -> str:
        parts = []
        for log in sorted((self.folder / "log").glob("*")):
            parts.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:]))
        return "\n".join(parts)

    def stop(self) -> None:
        try:
            ids = [j["id"] for j in self.jobs() if j["state"] in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING")]
            if ids:
                self.run("scancel", *ids)
                time.sleep(1)
        except Exception:
            pass
        for proc in reversed(self.procs):  # slurmd, slurmctld, munged
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def slurm_unavailable(message: str) -> None:
    """Skip – or fail under CI=true, where Slurm is installed by scripts/test and must work."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    missing = [b for b in SLURM_BINARIES if shutil.which(b) is None]
    if missing:
        slurm_unavailable(f"Slurm is not installed (missing {', '.join(missing)}); `scripts/test` installs the "
                          f"Debian packages slurmctld, slurmd, slurm-client and munge")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except Exception as exc:
        logs = cluster.logs()
        cluster.stop()
        slurm_unavailable(f"a single-node Slurm could not start on this machine: {exc}\n{logs}")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    yield cluster
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous
    cluster.stop()


# ----------------------------------------------------------------------------- fake commands

FAKE = """#!/bin/sh
# fake {name}: logs its arguments, prints the file named in {name}.out, exits with {name}.rc
d="$(dirname "$0")"
echo "$*" >> "$d/{name}.calls"
[ -f "$d/{name}.err" ] && cat "$d/{name}.err" >&2
[ -f "$d/{name}.out" ] && cat "$(cat "$d/{name}.out")"
exit "$(cat "$d/{name}.rc" 2>/dev/null || echo 0)"
"""


class FakeSlurm:
    """sbatch, squeue, sacct, scancel that print canned output (``answer``) and log calls."""

    def __init__(self, folder: Path) -> None:
        self.bin = folder
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("sbatch", "squeue", "sacct", "scancel"):
            path = folder / name
            path.write_text(FAKE.format(name=name))
            path.chmod(0o755)

    def answer(self, name: str, stdout: str = "", *, rc: int = 0, stderr: str = "") -> None:
        out = self.bin / f"{name}.canned"
        out.write_text(stdout)
        (self.bin / f"{name}.out").write_text(str(out))
        (self.bin / f"{name}.rc").write_text(str(rc))
        (self.bin / f"{name}.err").write_text(stderr)

    def calls(self, name: str) -> list[str]:
        path = self.bin / f"{name}.calls"
        return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def fake_slurm(tmp_path) -> FakeSlurm:
    return FakeSlurm(tmp_path / "fake-slurm")


def wait_for(predicate, timeout: float = 30, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = predicate()
    return value


def poll_until_done(executor, handle, timeout: float = 60) -> Optional[object]:
    """Poll like the execute worker does until the job is no longer running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = executor.poll(handle)
        if status.state != "running":
            return status
        time.sleep(0.2)
    raise AssertionError(f"job {handle.data} still running after {timeout}s")
