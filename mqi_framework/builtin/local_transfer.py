"""``core.local`` transfer: copies a tree on this machine (the embedded default, and the
model for remote transfers).

Every file is written as ``<name>.part``, hashed (SHA-256) while it streams, hashed again
from disk and renamed over its final name only when both match the source. A manifest
``.mqi-manifest.json`` (relative path → sha256, size) is written into the destination
last, so its presence means the tree is complete. A re-run skips files whose destination
already has the source's size and SHA-256; leftover ``.part`` files are replaced.

Symlinks in the source are never followed or copied (skipped with a warning), and a
destination folder that is a symlink leading out of the destination is refused.
``<name>.part`` files in a source tree are in-flight files by convention and are not
transferred.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import attrs

from mqi_framework import hookimpl
from mqi_framework.files import remove_tree
from mqi_framework.hashing import copy_verified, fsync_dir, part_path, sha256_file
from mqi_framework.protocols import (PluginContext, ProgressCallback, RemoteFolder, Transfer, TransferProgress,
                                     TransferResult)
from mqi_framework.safepath import PathEscapeError, is_within
from mqi_framework.tree import TreeFile, walk_tree, write_manifest

log = logging.getLogger(__name__)


@attrs.frozen
class LocalTransferSettings:
    """Settings of the ``core.local`` transfer."""

    #: when set, every remote folder must lie inside it (symlinks followed), else PathEscapeError
    root: Optional[str] = None
    #: give copied files the source's modification time
    preserve_mtime: bool = True


class LocalTransfer(Transfer):
    """Copies trees between the host and a local "remote" folder."""

    name = "core.local"
    settings_class = LocalTransferSettings

    def __init__(self, settings: Optional[LocalTransferSettings], context: PluginContext) -> None:
        super().__init__(settings or LocalTransferSettings(), context)

    def check(self) -> list[str]:
        root = self.settings.root
        if root is not None and not Path(root).is_dir():
            return [f"transfer root {root} does not exist or is not a folder"]
        return []

    def _remote(self, remote_dir: str) -> Path:
        path = Path(remote_dir)
        root = self.settings.root
        if root is not None:
            if not path.is_absolute():
                path = Path(root) / path
            if not is_within(Path(root), path):
                raise PathEscapeError(f"remote folder {remote_dir} lies outside the transfer root {root}")
        return path

    def upload(self, local_dir: Path, remote_dir: str, progress: ProgressCallback) -> TransferResult:
        return self._copy_tree(Path(local_dir), self._remote(remote_dir), progress)

    def download(self, remote_dir: str, local_dir: Path, progress: ProgressCallback) -> TransferResult:
        return self._copy_tree(self._remote(remote_dir), Path(local_dir), progress)

    def remove(self, remote_dir: str) -> bool:
        return remove_tree(self._remote(remote_dir))

    def list_remote(self, remote_root: str) -> list[RemoteFolder]:
        root = self._remote(remote_root)
        try:
            entries = list(os.scandir(root))
        except FileNotFoundError:
            return []
        return [RemoteFolder(e.name, e.stat(follow_symlinks=False).st_mtime) for e in entries
                if e.is_dir(follow_symlinks=False)]

    def _copy_tree(self, src: Path, dst: Path, progress: ProgressCallback) -> TransferResult:
        if not src.is_dir():
            raise FileNotFoundError(f"transfer source folder {src} does not exist (or is not a folder)")
        if is_within(src, dst) or is_within(dst, src):
            raise ValueError(f"transfer source {src} and destination {dst} overlap")
        files = walk_tree(src)
        total = sum(f.size for f in files)
        dst.mkdir(parents=True, exist_ok=True)
        manifest: dict[str, dict] = {}
        done_bytes = skipped = 0
        folders: set[Path] = {dst}
        for count, item in enumerate(files, start=1):
            target = dst.joinpath(*item.rel.split("/"))
            if not is_within(dst, target.parent):
                raise PathEscapeError(f"destination folder {target.parent} leads outside {dst} (a symlink?)")
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = self._verified_copy_present(item, target)
            if digest is not None:
                skipped += 1
                part_path(target).unlink(missing_ok=True)  # a leftover from an interrupted copy
            else:
                digest = copy_verified(item.path, target, sync_dir=False)
                folders.add(target.parent)
                if self.settings.preserve_mtime:
                    stat = item.path.stat()
                    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
            manifest[item.rel] = {"sha256": digest, "size": target.stat().st_size}
            done_bytes += item.size
            progress(TransferProgress(files_done=count, files_total=len(files), bytes_done=done_bytes,
                                      bytes_total=total))
        for folder in folders:
            fsync_dir(folder)
        write_manifest(dst, manifest)
        if not files:
            progress(TransferProgress(files_done=0, files_total=0, bytes_done=0, bytes_total=0))
        return TransferResult(files=len(files), bytes=total, skipped=skipped)

    @staticmethod
    def _verified_copy_present(item: TreeFile, target: Path) -> Optional[str]:
        """The source's SHA-256 when ``target`` is a regular file with the same size and
        SHA-256 (nothing to copy), else None."""
        try:
            if target.is_symlink() or not target.is_file() or target.stat().st_size != item.size:
                return None
        except OSError:
            return None
        digest = sha256_file(item.path)
        return digest if sha256_file(target) == digest else None


@hookimpl
def mqi_register_transfers(register):  # type: ignore[no-untyped-def]
    register(LocalTransfer)
