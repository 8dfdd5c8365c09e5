"""SFTP transfer speed and remote command round trips against OpenSSH, measured in one run.

    python benchmarks/sftp_bench.py                  # 256 MB file, 2,000 small files, 50 commands
    python benchmarks/sftp_bench.py --quick          # 32 MB, 300 files, 10 commands: ~30 s
    python benchmarks/sftp_bench.py --part big --big-mb 1024 --repeat 5

Everything runs on loopback against a throw-away ``sshd`` this script starts itself
(``mqi_ssh.testing.start_test_server``) and stops at the end; its data lives in a temp
folder that is removed at the end. Each measurement runs ``--repeat`` times (the
contenders alternate) and the best (minimum) time counts. The destination is deleted (and
``sync`` run) before every run, untimed, so each run really transfers.

(a) One big file (``--big-mb``, default 256 MB; MB = 2**20 bytes here): upload and download
    with our ``sftp`` transfer (mqi-sftp, paramiko) against OpenSSH ``sftp -b`` (put / get)
    and ``scp`` of the same file. Our transfer also checks SHA-256 on both sides
    (``openssl dgst``, else ``sha256sum``, on the host) and fsyncs downloads: that is part
    of its cost.
    Goal: >= 0.8x OpenSSH.
(b) A case-like tree of ``--files`` small files (default 2,000, 10-30 KB each, a few
    folders): upload and download with our transfer against ``sftp -r`` (put -r / get -r).
    Goal: >= 1.0x ``sftp -r``.
(c) Remote command round trip: ``--commands`` runs of ``true`` on one shared connection
    (``mqi_ssh.connection``, opened before timing) against a fresh ``ssh ... true`` process
    per command. No goal; shown for reference.

Every RATIO is OpenSSH's time / ours, so above 1 means ours is faster. Each run of our
transfer uses a new transfer instance and so a new SSH connection, as each OpenSSH run
does. OpenSSH clients run with ``-F none`` (no user or system ssh_config) and their
default cipher unless ``--openssh-cipher`` is given. The goals are printed, not enforced:
the exit status is 0 whenever every measurement ran.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MB = 1024 * 1024
BIG_GOAL = 0.8
TREE_GOAL = 1.0
BIG_NAME = "big.bin"
#: folders of the case-like tree and how many of its files each gets (relative weights)
TREE_FOLDERS = {"ct": 60, "rtplan": 1, "rtstruct": 2, "rtdose": 4, "beams/beam1": 8, "beams/beam2": 8,
                "beams/beam3": 8, "beams/beam4": 8, "logs": 1}
TREE_SIZES = (10_000, 30_000)  # bytes, uniform: ~20 KB on average


# ------------------------------------------------------------------------------ timing


@dataclass
class Contender:
    """One way of doing a measured job: ``run`` is timed; ``reset`` (remove what a run
    leaves) and ``check`` (confirm a run really did the job) are not."""

    label: str
    run: Callable[[], None]
    reset: Callable[[], None] = lambda: None
    check: Callable[[], None] = lambda: None
    times: list[float] = field(default_factory=list)

    @property
    def best(self) -> float:
        return min(self.times)


def measure(contenders: list[Contender], repeat: int, sync: bool = True) -> None:
    """Run every contender ``repeat`` times, alternating them; record the times."""
    for _ in range(repeat):
        for c in contenders:
            c.reset()
            if sync:
                os.sync()  # earlier runs' dirty pages go to disk before the clock starts
            start = time.perf_counter()
            c.run()
            c.times.append(time.perf_counter() - start)
            c.check()
            c.reset()


def ratio_line(ours: Contender, baselines: list[Contender], goal: Optional[float]) -> str:
    """``RATIO`` line: each baseline's best time / ours, with the goal next to each."""
    parts = []
    for base in baselines:
        ratio = base.best / ours.best
        verdict = "" if goal is None else f" (goal >= {goal:.1f}x: {'met' if ratio >= goal else 'BELOW'})"
        parts.append(f"vs {base.label} {ratio:.2f}x{verdict}")
    return "    RATIO ours " + ", ".join(parts)


def print_transfer_table(title: str, contenders: list[Contender], nbytes: int) -> None:
    print(f"  {title}")
    print(f"    {'tool':<28} {'best s':>8} {'MB/s':>8}   all runs (s)")
    for c in contenders:
        runs = " ".join(f"{t:.2f}" for t in c.times)
        print(f"    {c.label:<28} {c.best:8.3f} {nbytes / MB / c.best:8.1f}   {runs}")


# ------------------------------------------------------------------------------ helpers


def remove(path: Path) -> None:
    """Delete a file or a folder tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def tree_stats(folder: Path) -> tuple[int, int]:
    """(files, bytes) under ``folder``, leaving out our transfer's manifest."""
    from mqi_framework.tree import MANIFEST

    files = [p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST]
    return len(files), sum(p.stat().st_size for p in files)


def expect_tree(folder: Path, files: int, nbytes: int) -> Callable[[], None]:
    """A check that ``folder`` holds ``files`` files of ``nbytes`` bytes in all."""

    def check() -> None:
        got = tree_stats(folder) if folder.is_dir() else (0, 0)
        if got != (files, nbytes):
            raise RuntimeError(f"{folder}: expected {files} files / {nbytes} bytes, found {got[0]} / {got[1]}")

    return check


def expect_size(path: Path, size: int) -> None:
    """Raise unless ``path`` is a file of ``size`` bytes."""
    if not path.is_file() or path.stat().st_size != size:
        raise RuntimeError(f"{path}: expected a file of {size} bytes")


def write_big_file(path: Path, size: int) -> None:
    """``size`` random (incompressible) bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        left = size
        while left > 0:
            block = os.urandom(min(MB, left))
            fh.write(block)
            left -= len(block)


def write_tree(folder: Path, files: int, seed: int = 20261129) -> int:
    """A case-like tree of ``files`` random files of 10-30 KB in a few folders; returns its bytes."""
    rng = random.Random(seed)
    names = list(TREE_FOLDERS)
    total = 0
    for i, sub in enumerate(rng.choices(names, weights=list(TREE_FOLDERS.values()), k=files)):
        path = folder / sub / f"{sub.replace('/', '_').upper()}.{i:05d}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = rng.randbytes(rng.randint(*TREE_SIZES))
        path.write_bytes(data)
        total += len(data)
    return total


# ------------------------------------------------------------------------------ contenders


class Bench:
    """The running sshd, the data folders and the commands of both sides."""

    def __init__(self, server: Any, base: Path, openssh_cipher: Optional[str]) -> None:
        self.server = server
        self.local = base / "local"
        self.remote = base / "remote"  # the host's root (same machine: loopback)
        self.local.mkdir()
        self.remote.mkdir()
        self.workspace = base / "workspace"
        self.workspace.mkdir()
        self.cipher_opts = ["-c", openssh_cipher] if openssh_cipher else []
        self.target = f"{server.user}@{server.host}"
        self._batches = itertools.count(1)

    # -- ours

    def transfer(self) -> Any:
        """A new ``sftp`` transfer on the bench host (it connects on first use)."""
        from mqi_framework import configload
        from mqi_framework.protocols import PluginContext
        from mqi_sftp.transfer import SftpTransfer, SftpTransferSettings

        settings = configload.structure(
            SftpTransferSettings, {"hosts": {"bench": self.server.host_settings(root=str(self.remote))}})
        return SftpTransfer(settings, PluginContext(workspace=self.workspace))

    def ours(self, direction: str, src: Path, dst: Path, files: int) -> Callable[[], None]:
        """Upload ``src`` (a local folder) to ``dst`` (a remote folder), or download ``src``
        (remote) to ``dst`` (local), with a new transfer instance."""

        def run() -> None:
            transfer = self.transfer()
            try:
                if direction == "upload":
                    result = transfer.upload(src, str(dst), lambda progress: None)
                else:
                    result = transfer.download(str(src), dst, lambda progress: None)
            finally:
                transfer.close()
            if result.files != files or result.skipped:
                raise RuntimeError(f"our {direction}: {result}, expected {files} files and none skipped")

        return run

    # -- OpenSSH

    def ssh_args(self, tool: str) -> list[str]:
        """``tool`` with the options that reach the bench server (no ssh_config)."""
        port_flag = "-p" if tool == "ssh" else "-P"
        return [tool, "-F", "none", *self.server.client_options(port_flag), *self.cipher_opts]

    def sftp_batch(self, *commands: str) -> Callable[[], None]:
        """``sftp -b`` running ``commands``."""
        batch = self.workspace / f"batch-{next(self._batches)}.txt"
        batch.write_text("".join(c + "\n" for c in commands))
        argv = self.ssh_args("sftp") + ["-q", "-b", str(batch), self.target]
        return lambda: run_quiet(argv)

    def scp(self, src: str, dst: str) -> Callable[[], None]:
        argv = self.ssh_args("scp") + ["-q", src, dst]
        return lambda: run_quiet(argv)

    def remote_spec(self, path: Path) -> str:
        return f"{self.target}:{path}"

    def openssh_cipher(self) -> str:
        """The cipher OpenSSH negotiates with the bench server."""
        out = subprocess.run(self.ssh_args("ssh") + ["-v", self.target, "true"], capture_output=True, text=True,
                             stdin=subprocess.DEVNULL)
        found = re.search(r"kex: client->server cipher: (\S+)", out.stderr)
        return found.group(1) if found else "unknown"


def run_quiet(argv: list[str]) -> None:
    """Run an OpenSSH client; its stderr becomes the error if it fails."""
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited with {proc.returncode}: {proc.stderr.decode(errors='replace')[-500:]}")


def q(path: Path) -> str:
    """A path quoted for an sftp batch file."""
    return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'


# ------------------------------------------------------------------------------ parts


def big_file(bench: Bench, size_mb: int, repeat: int) -> list[tuple[str, float, Optional[float]]]:
    """Part (a): one big file up and down; returns (what, ratio, goal) rows."""
    size = size_mb * MB
    src_dir = bench.local / "big"  # our upload sends this folder; OpenSSH the file in it
    write_big_file(src_dir / BIG_NAME, size)
    remote_src = bench.remote / "big-src"  # the download source, put there directly
    remote_src.mkdir()
    shutil.copyfile(src_dir / BIG_NAME, remote_src / BIG_NAME)
    print(f"\n(a) one {size_mb} MB file, best of {repeat}")

    up_ours, up_sftp, up_scp = bench.remote / "up-ours", bench.remote / "up-sftp.bin", bench.remote / "up-scp.bin"
    down_ours, down_sftp = bench.local / "down-ours", bench.local / "down-sftp.bin"
    down_scp = bench.local / "down-scp.bin"
    upload = [
        Contender("sftp transfer (ours)", bench.ours("upload", src_dir, up_ours, 1), lambda: remove(up_ours),
                  expect_tree(up_ours, 1, size)),
        Contender("OpenSSH sftp -b put", bench.sftp_batch(f"put {q(src_dir / BIG_NAME)} {q(up_sftp)}"),
                  lambda: remove(up_sftp), lambda: expect_size(up_sftp, size)),
        Contender("OpenSSH scp", bench.scp(str(src_dir / BIG_NAME), bench.remote_spec(up_scp)),
                  lambda: remove(up_scp), lambda: expect_size(up_scp, size)),
    ]
    download = [
        Contender("sftp transfer (ours)", bench.ours("download", remote_src, down_ours, 1),
                  lambda: remove(down_ours), expect_tree(down_ours, 1, size)),
        Contender("OpenSSH sftp -b get", bench.sftp_batch(f"get {q(remote_src / BIG_NAME)} {q(down_sftp)}"),
                  lambda: remove(down_sftp), lambda: expect_size(down_sftp, size)),
        Contender("OpenSSH scp", bench.scp(bench.remote_spec(remote_src / BIG_NAME), str(down_scp)),
                  lambda: remove(down_scp), lambda: expect_size(down_scp, size)),
    ]
    rows = []
    try:
        for direction, contenders in (("upload", upload), ("download", download)):
            measure(contenders, repeat)
            print_transfer_table(direction, contenders, size)
            print(ratio_line(contenders[0], contenders[1:], BIG_GOAL))
            rows += [(f"(a) {size_mb} MB {direction} vs {c.label}", c.best / contenders[0].best, BIG_GOAL)
                     for c in contenders[1:]]
    finally:
        remove(src_dir)
        remove(remote_src)
    return rows


def small_files(bench: Bench, files: int, repeat: int) -> list[tuple[str, float, Optional[float]]]:
    """Part (b): a case-like tree of small files up and down; returns (what, ratio, goal) rows."""
    src = bench.local / "tree"
    nbytes = write_tree(src, files)
    remote_src = bench.remote / "tree-src"
    shutil.copytree(src, remote_src)
    folders = sum(1 for p in src.rglob("*") if p.is_dir())
    print(f"\n(b) case-like tree: {files} files, {nbytes / MB:.1f} MB ({nbytes / files / 1000:.1f} KB average), "
          f"{folders} folders, best of {repeat}")

    up_ours, up_sftp = bench.remote / "tree-up-ours", bench.remote / "tree-up-sftp"
    down_ours, down_sftp = bench.local / "tree-down-ours", bench.local / "tree-down-sftp"
    upload = [
        Contender("sftp transfer (ours)", bench.ours("upload", src, up_ours, files), lambda: remove(up_ours),
                  expect_tree(up_ours, files, nbytes)),
        Contender("OpenSSH sftp -r put", bench.sftp_batch(f"put -r {q(src)} {q(up_sftp)}"),
                  lambda: remove(up_sftp), expect_tree(up_sftp, files, nbytes)),
    ]
    download = [
        Contender("sftp transfer (ours)", bench.ours("download", remote_src, down_ours, files),
                  lambda: remove(down_ours), expect_tree(down_ours, files, nbytes)),
        Contender("OpenSSH sftp -r get", bench.sftp_batch(f"get -r {q(remote_src)} {q(down_sftp)}"),
                  lambda: remove(down_sftp), expect_tree(down_sftp, files, nbytes)),
    ]
    rows = []
    try:
        for direction, contenders in (("upload", upload), ("download", download)):
            measure(contenders, repeat)
            print_transfer_table(direction, contenders, nbytes)
            ours = contenders[0]
            print(f"    ours: {ours.best / files * 1000:.2f} ms per file; "
                  f"{contenders[1].label}: {contenders[1].best / files * 1000:.2f} ms per file")
            print(ratio_line(ours, contenders[1:], TREE_GOAL))
            rows += [(f"(b) {files} files {direction} vs {c.label}", c.best / ours.best, TREE_GOAL)
                     for c in contenders[1:]]
    finally:
        remove(src)
        remove(remote_src)
    return rows


def commands(bench: Bench, count: int, repeat: int) -> list[tuple[str, float, Optional[float]]]:
    """Part (c): ``true`` on one shared connection vs a fresh ``ssh`` per command."""
    from mqi_ssh.connection import connect

    print(f"\n(c) remote command round trip: {count} x `true`, best of {repeat}")
    conn = connect(bench.server.host_settings())
    try:
        start = time.perf_counter()
        first = conn.run("true")  # connects
        connect_s = time.perf_counter() - start
        if first.returncode != 0:
            raise RuntimeError(f"`true` on the shared connection exited with {first.returncode}: {first.stderr}")

        def ours() -> None:
            for _ in range(count):
                result = conn.run("true")
                if result.returncode != 0:
                    raise RuntimeError(f"`true` exited with {result.returncode}: {result.stderr}")

        argv = bench.ssh_args("ssh") + [bench.target, "true"]

        def fresh() -> None:
            for _ in range(count):
                run_quiet(argv)

        contenders = [Contender("shared connection (ours)", ours), Contender("fresh ssh per command", fresh)]
        measure(contenders, repeat, sync=False)
        with conn.sftp() as sftp:

            def stats() -> None:
                for _ in range(count):
                    sftp.stat(".")

            stat = Contender("SFTP stat, shared connection", stats)
            measure([stat], repeat, sync=False)
    finally:
        conn.close()
    print(f"    {'how':<28} {'ms/command':>10}   all runs (ms/command)")
    for c in contenders + [stat]:
        runs = " ".join(f"{t / count * 1000:.1f}" for t in c.times)
        print(f"    {c.label:<28} {c.best / count * 1000:10.2f}   {runs}")
    print(f"    (our first command, which opened the connection: {connect_s * 1000:.0f} ms; an SFTP request "
          f"starts no remote shell, so `true` minus stat is about the shell's start-up with the user's rc files)")
    print(ratio_line(contenders[0], contenders[1:], None) + " (no goal)")
    return [(f"(c) command round trip vs {contenders[1].label}", contenders[1].best / contenders[0].best, None)]


# ------------------------------------------------------------------------------ main


def describe(bench: Bench) -> None:
    """Header: versions, ciphers, request sizes of both sides."""
    import paramiko

    version = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
    transfer = bench.transfer()
    try:
        problems = transfer.check()
        if problems:
            raise RuntimeError("our sftp transfer cannot use the bench server: " + "; ".join(problems))
        requests = [line.split(": ", 1)[-1] for line in transfer.check_info() if "SFTP requests" in line]
        cipher = transfer.conn.transport().local_cipher
        channels = transfer.settings.parallel_channels
    finally:
        transfer.close()
    print(f"sshd on {bench.server.host}:{bench.server.port} (loopback), {os.cpu_count()} cores, "
          f"{platform.system()} {platform.release()}, Python {platform.python_version()}")
    print(f"  OpenSSH: {version}, cipher {bench.openssh_cipher()}")
    print(f"  ours: mqi-sftp on paramiko {paramiko.__version__}, cipher {cipher}, {channels} parallel channels, "
          f"{requests[0] if requests else 'SFTP request size unknown'}; verifies SHA-256 on both sides "
          f"(remote: openssl dgst, else sha256sum) and fsyncs downloads")
    print("  RATIO = OpenSSH time / our time (> 1: ours is faster); MB = 2**20 bytes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    parser.add_argument("--big-mb", type=int, help="size of the big file in MB (default 256; --quick: 32)")
    parser.add_argument("--files", type=int, help="files in the small-file tree (default 2000; --quick: 300)")
    parser.add_argument("--commands", type=int, help="remote commands per run (default 50; --quick: 10)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement, the best counts (default 3)")
    parser.add_argument("--quick", action="store_true", help="32 MB, 300 files, 10 commands: about 30 s on 2 cores")
    parser.add_argument("--part", choices=("all", "big", "tree", "commands"), default="all",
                        help="run only (a) big, (b) tree or (c) commands (default all)")
    parser.add_argument("--openssh-cipher", metavar="CIPHER",
                        help="cipher for the OpenSSH clients (-c), e.g. aes128-gcm@openssh.com as ours uses; "
                             "default: OpenSSH's own choice")
    parser.add_argument("--dir", type=Path, help="where to put the temp data (default: the system temp folder; "
                                                 "needs about 3x --big-mb free)")
    args = parser.parse_args(argv)
    big_mb = args.big_mb if args.big_mb is not None else (32 if args.quick else 256)
    files = args.files if args.files is not None else (300 if args.quick else 2000)
    count = args.commands if args.commands is not None else (10 if args.quick else 50)
    if min(big_mb, files, count, args.repeat) < 1:
        parser.error("sizes, counts and --repeat must be >= 1")

    import logging

    logging.basicConfig(level=logging.WARNING)
    from mqi_ssh.testing import start_test_server

    base = Path(tempfile.mkdtemp(prefix="mqi-sftp-bench-", dir=args.dir)).resolve()
    rows: list[tuple[str, float, Optional[float]]] = []
    server = None
    try:
        (base / "sshd").mkdir()
        server = start_test_server(base / "sshd")
        bench = Bench(server, base, args.openssh_cipher)
        describe(bench)
        if args.part in ("all", "big"):
            rows += big_file(bench, big_mb, args.repeat)
        if args.part in ("all", "tree"):
            rows += small_files(bench, files, args.repeat)
        if args.part in ("all", "commands"):
            rows += commands(bench, count, args.repeat)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(base, ignore_errors=True)
    print("\nsummary (RATIO = OpenSSH time / ours)")
    for what, ratio, goal in rows:
        verdict = "" if goal is None else f"goal >= {goal:.1f}x: {'met' if ratio >= goal else 'BELOW'}"
        print(f"  {what:<52} {ratio:6.2f}x   {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
