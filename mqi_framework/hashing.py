"""SHA-256 while streaming: a copy is hashed in the same pass that writes it, then the
written file is hashed again before it gets its final name."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Optional

from mqi_framework.files import fsync_dir, part_path

CHUNK = 1024 * 1024


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of the file at ``path``."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


__all__ = ["CHUNK", "VerificationError", "copy_verified", "fsync_dir", "part_path", "sha256_file"]


class VerificationError(OSError):
    """A copy's SHA-256 does not match its source."""


def copy_verified(src: Path, dst: Path, *, on_bytes: Optional[Callable[[int], None]] = None,
                  sync_dir: bool = True) -> str:
    """Copy ``src`` to ``dst`` through ``dst.part`` and return the SHA-256 hex digest.

    The source is read once, hashed while it streams into ``dst.part`` (1 MiB chunks);
    the part file is fsynced, hashed again from disk, and renamed over ``dst`` only when
    both digests match (else :class:`VerificationError`, and no part file is left).
    A leftover ``dst.part`` (an interrupted earlier copy, even a symlink) is replaced,
    never written through. ``on_bytes(n)`` is called after every chunk written.
    ``sync_dir=False`` leaves the fsync of ``dst``'s folder to the caller (a tree copy
    syncs each folder once at the end).
    """
    src, dst = Path(src), Path(dst)
    part = part_path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    part.unlink(missing_ok=True)
    source_hash = hashlib.sha256()
    try:
        with open(src, "rb") as fin:
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
            with open(fd, "wb") as fout:
                while True:
                    chunk = fin.read(CHUNK)
                    if not chunk:
                        break
                    source_hash.update(chunk)
                    fout.write(chunk)
                    if on_bytes is not None:
                        on_bytes(len(chunk))
                fout.flush()
                os.fsync(fout.fileno())
        digest = source_hash.hexdigest()
        if sha256_file(part) != digest:
            raise VerificationError(f"{dst.name}: SHA-256 of the copy does not match the source")
    except BaseException:
        part.unlink(missing_ok=True)  # a full disk, a bad copy or an interruption leaves no half file
        raise
    os.replace(part, dst)
    if sync_dir:
        fsync_dir(dst.parent)
    return digest
