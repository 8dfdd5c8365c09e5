"""``core.local`` transfer: copies a tree on this machine (the embedded default, and the
model for remote transfers): ``.part`` files renamed only after their SHA-256 matched the
source, a manifest written last, verified files skipped on a re-run."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import attrs

from mqi_framework import hookimpl
from mqi_framework.hashing import copy_verified, sha256_file
from mqi_framework.protocols import ProgressCallback, Transfer, TransferProgress, TransferResult
from mqi_framework.safepath import PathEscapeError, is_within

log = logging.getLogger(__name__)

MANIFEST = ".mqi-manifest.json"


@attrs.frozen
class LocalTransferSettings:
    """Settings of the ``core.local`` transfer."""

    root: Optional[str] = None  # when set, every remote folder must lie inside it
    preserve_mtime: bool = True


def _walk(root: Path) -> list[tuple[str, Path, int]]:
    """(relative posix path, path, size) of every regular file; symlinks are skipped."""
    out = []
    stack = [root]
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_symlink():
                    log.warning("skipping a symlink in a transfer tree (never followed)")
                    continue
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    if entry.name == MANIFEST or entry.name.endswith(".part"):
                        continue
                    path = Path(entry.path)
                    out.append((path.relative_to(root).as_posix(), path, entry.stat(follow_symlinks=False).st_size))
    return sorted(out)


class LocalTransfer(Transfer):
    """Copies trees between the host and a local "remote" folder."""

    name = "core.local"
    settings_class = LocalTransferSettings

    def __init__(self, settings: Optional[LocalTransferSettings], context) -> None:  # type: ignore[no-untyped-def]
        super().__init__(settings or LocalTransferSettings(), context)

    def _remote(self, remote_dir: str) -> Path:
        path = Path(remote_dir)
        if self.settings.root is not None and not is_within(Path(self.settings.root), path):
            raise PathEscapeError(f"remote folder {remote_dir} lies outside the transfer root {self.settings.root}")
        return path

    def upload(self, local_dir: Path, remote_dir: str, progress: ProgressCallback) -> TransferResult:
        return self._copy_tree(Path(local_dir), self._remote(remote_dir), progress)

    def download(self, remote_dir: str, local_dir: Path, progress: ProgressCallback) -> TransferResult:
        return self._copy_tree(self._remote(remote_dir), Path(local_dir), progress)

    def _copy_tree(self, src: Path, dst: Path, progress: ProgressCallback) -> TransferResult:
        if not src.is_dir():
            raise FileNotFoundError(f"transfer source folder {src} does not exist")
        files = _walk(src)
        total = sum(size for _, _, size in files)
        dst.mkdir(parents=True, exist_ok=True)
        manifest: dict[str, dict] = {}
        done_bytes = skipped = 0
        for count, (rel, path, size) in enumerate(files, start=1):
            target = dst / rel
            source_hash = None
            if target.is_file() and not target.is_symlink() and target.stat().st_size == size:
                source_hash = sha256_file(path)
                if sha256_file(target) == source_hash:
                    skipped += 1
                else:
                    source_hash = None
            if source_hash is None:
                source_hash = copy_verified(path, target)  # hashed while streaming, verified before rename
                if self.settings.preserve_mtime:
                    stat = path.stat()
                    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
            manifest[rel] = {"sha256": source_hash, "size": size}
            done_bytes += size
            progress(TransferProgress(files_done=count, files_total=len(files), bytes_done=done_bytes,
                                      bytes_total=total))
        part = dst / (MANIFEST + ".part")
        part.write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(part, dst / MANIFEST)
        if not files:
            progress(TransferProgress(0, 0, 0, 0))
        return TransferResult(files=len(files), bytes=total, skipped=skipped)


@hookimpl
def mqi_register_transfers(register):  # type: ignore[no-untyped-def]
    register(LocalTransfer)
