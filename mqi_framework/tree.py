"""The file list of a tree to transfer, shared by every transfer plugin: regular files
only, sorted, symlinks never followed, in-flight ``*.part`` files and the top-level
manifest left out."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import attrs

from mqi_framework.files import PART_SUFFIX, write_atomic

log = logging.getLogger(__name__)

#: written into a transferred tree last: its presence means the tree is complete
MANIFEST = ".mqi-manifest.json"
#: files are written as ``<name>.part`` and renamed once verified


@attrs.frozen
class TreeFile:
    """A regular file of a tree: relative POSIX path, full path, size in bytes."""

    rel: str
    path: Path
    size: int


def walk_tree(root: Path) -> list[TreeFile]:
    """Every regular file under ``root``, sorted by relative path. Symlinks (to files or
    folders) are skipped with a warning, never followed; ``*.part`` files and the
    top-level manifest are left out."""
    root = Path(root)
    out: list[TreeFile] = []
    links = parts = 0
    stack = [root]
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_symlink():
                    links += 1
                    continue
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    if entry.name.endswith(PART_SUFFIX):
                        parts += 1
                        continue
                    if entry.name == MANIFEST and folder == root:
                        continue
                    path = Path(entry.path)
                    out.append(TreeFile(path.relative_to(root).as_posix(), path,
                                        entry.stat(follow_symlinks=False).st_size))
                # sockets, fifos, devices: not part of a case tree
    if links:
        log.warning("transfer from %s: skipped %d symlink(s) (symlinks are never followed or copied)", root, links)
    if parts:
        log.warning("transfer from %s: skipped %d unfinished *.part file(s)", root, parts)
    out.sort(key=lambda f: f.rel)
    return out


def manifest_text(manifest: dict[str, dict]) -> str:
    """The manifest's file content (relative path → sha256, size), the same for every
    transfer plugin: ASCII JSON, so undecodable names survive."""
    return json.dumps(manifest, indent=1, sort_keys=True)


def write_manifest(dst: Path, manifest: dict[str, dict]) -> None:
    """Write ``dst/.mqi-manifest.json`` atomically and durably: the last file of a
    transferred tree. An identical manifest already there is left alone."""
    write_atomic(Path(dst) / MANIFEST, manifest_text(manifest), unchanged_ok=True)  # a re-run writes nothing
