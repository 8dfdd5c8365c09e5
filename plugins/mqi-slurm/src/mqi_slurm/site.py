"""Where the Slurm commands run and the job files live.

:class:`LocalSite` – this machine is a Slurm submit host (``sbatch`` on PATH) and the jobs
folder is on a file system the compute nodes share. :class:`SshSite` – a login node reached
over the shared connection of the mqi-ssh plugin; files are written and read there with
plain POSIX commands (``base64``, ``cat``, ``tail``, ``ls``), every value shell-quoted.
"""

from __future__ import annotations

import abc
import base64
import glob
import os
import shlex
from pathlib import Path
from typing import Optional

from mqi_framework.toolkit import CommandResult, run_local, ssh_shell, write_atomic


class Site(abc.ABC):
    where: str = ""

    @abc.abstractmethod
    def run(self, argv: list[str], timeout: float) -> CommandResult:
        """Run ``argv`` (no local shell); never raises for a failing command."""

    @abc.abstractmethod
    def write_text(self, path: str, text: str, *, executable: bool = False) -> None:
        """Write ``path`` atomically (a temporary name, then rename), creating its folder."""

    @abc.abstractmethod
    def read_text(self, path: str) -> Optional[str]:
        """The file's text, or None when it does not exist."""

    @abc.abstractmethod
    def tail(self, path: str, max_bytes: int) -> str:
        """The last ``max_bytes`` of a file ('' when missing)."""

    @abc.abstractmethod
    def exists(self, path: str) -> bool: ...

    @abc.abstractmethod
    def missing(self, patterns: list[str]) -> list[str]:
        """The glob patterns that match nothing."""

    def close(self) -> None:
        pass


class LocalSite(Site):
    where = "locally"

    def run(self, argv: list[str], timeout: float) -> CommandResult:
        return run_local(argv, timeout, not_found_hint="is this a Slurm submit host? set bin_dir if the Slurm "
                                                      "commands are not on PATH")

    def write_text(self, path: str, text: str, *, executable: bool = False) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, text, mode=0o755 if executable else None)

    def read_text(self, path: str) -> Optional[str]:
        try:
            return Path(path).read_text(encoding="utf-8", errors="replace")
        except (FileNotFoundError, NotADirectoryError):
            return None

    def tail(self, path: str, max_bytes: int) -> str:
        try:
            with open(path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - max_bytes))
                return fh.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def missing(self, patterns: list[str]) -> list[str]:
        return [p for p in patterns if not glob.glob(p)]


class SshSite(Site):
    """A Slurm login node over the shared SSH connection of :mod:`mqi_ssh.connection`."""

    def __init__(self, settings: dict, timeout: float) -> None:
        self.settings = dict(settings)
        self.where = f"over SSH on {self.settings.get('hostname') or self.settings.get('host') or '?'}"
        self.timeout = timeout
        self._remote = ssh_shell(self.settings, "SSH")  # mqi-ssh validates the settings

    def _shell(self, command: str, timeout: Optional[float] = None) -> CommandResult:
        return self._remote.run(command, timeout or self.timeout)

    def run(self, argv: list[str], timeout: float) -> CommandResult:
        return self._shell(shlex.join(argv), timeout)

    def write_text(self, path: str, text: str, *, executable: bool = False) -> None:
        data = base64.b64encode(text.encode("utf-8")).decode("ascii")
        q, tmp = shlex.quote(path), shlex.quote(path + ".tmp")
        chmod = f" && chmod 755 {tmp}" if executable else ""
        result = self._shell(f"mkdir -p {shlex.quote(os.path.dirname(path))} && printf %s {shlex.quote(data)} "
                             f"| base64 -d > {tmp}{chmod} && mv -f {tmp} {q}")
        if result.returncode != 0:
            raise OSError(f"cannot write {path} {self.where}: {result.problem()}")

    def read_text(self, path: str) -> Optional[str]:
        q = shlex.quote(path)
        result = self._shell(f"if [ -f {q} ]; then cat {q}; else exit 3; fi")
        if result.returncode == 3:
            return None
        if result.returncode != 0:
            raise OSError(f"cannot read {path} {self.where}: {result.problem()}")
        return result.stdout

    def tail(self, path: str, max_bytes: int) -> str:
        result = self._shell(f"tail -c {int(max_bytes)} {shlex.quote(path)} 2>/dev/null")
        return result.stdout if result.returncode == 0 else ""

    def exists(self, path: str) -> bool:
        return self._shell(f"test -e {shlex.quote(path)}").returncode == 0

    def missing(self, patterns: list[str]) -> list[str]:
        out = []
        for pattern in patterns:  # the pattern's glob characters must stay active: quote all but them
            quoted = "".join(c if c in "*?[]" else shlex.quote(c) for c in pattern)
            if self._shell(f"set -- {quoted}; [ -e \"$1\" ]").returncode != 0:
                out.append(pattern)
        return out

    def close(self) -> None:
        self._remote.close()
