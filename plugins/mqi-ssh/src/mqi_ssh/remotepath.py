"""Remote (POSIX) paths built from data, and file-system questions answered over SFTP
(which starts no remote shell).

* :func:`inside_root` refuses a remote path that is not inside the host's root;
* :func:`glob_exists` tells whether a glob pattern matches a remote file;
* :func:`tail` reads the end of a remote file.
"""

from __future__ import annotations

import fnmatch
import posixpath
import stat
from typing import Optional

import paramiko

from mqi_framework.toolkit import PathEscapeError

MAGIC = ("*", "?", "[")


def inside_root(path: str, root: Optional[str]) -> str:
    """``path`` normalised; relative paths are taken inside ``root``. Raises
    :class:`PathEscapeError` when the result is not ``root`` or below it (``..``), or
    when it contains a NUL or newline. With no root, only the characters are checked."""
    if "\x00" in path or "\n" in path:
        raise PathEscapeError(f"remote path {path!r} contains a NUL or newline character")
    if root is None:
        return posixpath.normpath(path)
    root = posixpath.normpath(root)
    full = posixpath.normpath(posixpath.join(root, path))
    if full != root and not full.startswith(root.rstrip("/") + "/"):
        raise PathEscapeError(f"remote path {path} lies outside the host's root {root}")
    return full


def remote_root_problem(remote_root: Optional[str], host_root: Optional[str], host_name: str) -> Optional[str]:
    """Why cases under ``workflow.remote_root`` cannot go to this host, or None."""
    if remote_root is None or host_root is None:
        return None
    try:
        inside_root(remote_root, host_root)
    except PathEscapeError:
        return (f"workflow.remote_root {remote_root} is not inside the root {host_root} of host {host_name}: "
                f"cases would be refused (set remote_root to an absolute path inside it)")
    return None


def _is_magic(part: str) -> bool:
    return any(c in part for c in MAGIC)


def glob_exists(sftp: paramiko.SFTPClient, pattern: str) -> bool:
    """True when ``pattern`` (``*``, ``?``, ``[...]``, ``**`` for any depth) matches at
    least one remote path. Like :mod:`glob`, wildcards do not match a leading dot."""
    absolute = pattern.startswith("/")
    parts = [p for p in pattern.split("/") if p not in ("", ".")]
    return _match(sftp, "/" if absolute else ".", parts)


def _listdir(sftp: paramiko.SFTPClient, folder: str) -> list[paramiko.SFTPAttributes]:
    try:
        return sftp.listdir_attr(folder)
    except OSError:
        return []


def _match(sftp: paramiko.SFTPClient, base: str, parts: list[str]) -> bool:
    if not parts:
        try:
            sftp.stat(base)
            return True
        except OSError:
            return False
    head, rest = parts[0], parts[1:]
    if head == "**":
        if _match(sftp, base, rest):
            return True
        for entry in _listdir(sftp, base):
            if not entry.filename.startswith(".") and stat.S_ISDIR(entry.st_mode or 0):
                if _match(sftp, posixpath.join(base, entry.filename), parts):
                    return True
        return False
    if not _is_magic(head):
        return _match(sftp, posixpath.join(base, head), rest)
    for entry in _listdir(sftp, base):
        name = entry.filename
        if name.startswith(".") and not head.startswith("."):
            continue
        if fnmatch.fnmatchcase(name, head) and _match(sftp, posixpath.join(base, name), rest):
            return True
    return False


def tail(sftp: paramiko.SFTPClient, path: str, max_bytes: int) -> str:
    """The last ``max_bytes`` of a remote file, decoded leniently ("" when missing)."""
    try:
        with sftp.open(path, "rb") as fh:
            size = fh.stat().st_size or 0
            fh.seek(max(0, size - max(0, max_bytes)))
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
