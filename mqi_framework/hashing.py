"""SHA-256 while streaming: a copy is hashed in the same pass that writes it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Optional

CHUNK = 1024 * 1024


def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


class VerificationError(OSError):
    """A copy's SHA-256 does not match its source."""


def copy_verified(src: Path, dst: Path, *, on_bytes: Optional[Callable[[int], None]] = None) -> str:
    """Copy ``src`` to ``dst`` through ``dst.part``: hash the source while copying, fsync,
    hash the written file, rename atomically only when both match. Returns the digest."""
    part = dst.with_name(dst.name + ".part")
    dst.parent.mkdir(parents=True, exist_ok=True)
    source_hash = hashlib.sha256()
    try:
        with open(src, "rb") as fin, open(part, "wb") as fout:
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
    except BaseException:
        part.unlink(missing_ok=True)  # a full disk or an interruption leaves no half file behind
        raise
    digest = source_hash.hexdigest()
    written = sha256_file(part)
    if written != digest:
        part.unlink(missing_ok=True)
        raise VerificationError(f"{dst.name}: SHA-256 of the copy does not match the source")
    os.replace(part, dst)
    return digest
