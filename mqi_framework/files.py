"""Writing files so that readers see all of a file or none of it, and a crash loses nothing
that was reported written.

The one rule: data goes to ``<name>.part`` in the target's folder, is fsynced, renamed over
the target, and the folder is fsynced so that the rename survives a power loss. Only data
that is cheap to lose (a progress counter) may skip the fsyncs with ``durable=False``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

PART_SUFFIX = ".part"


def part_path(dst: Path) -> Path:
    """Where a write to ``dst`` goes before its atomic rename (``dst.part``)."""
    return dst.with_name(dst.name + PART_SUFFIX)


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (best effort where the OS refuses)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Union[Path, str], data: Union[bytes, str], *, durable: bool = True,
                 mode: Optional[int] = None, unchanged_ok: bool = False, encoding: str = "utf-8") -> bool:
    """Write ``data`` (text is encoded with ``encoding``) to ``path`` atomically.

    A leftover ``path.part`` (an interrupted earlier write, even a symlink) is replaced,
    never written through; on any error no part file is left. ``mode`` sets the file's
    permissions (default: 0o666 less the umask). With ``unchanged_ok`` a target that already
    holds exactly ``data`` is left alone. Returns True when the file was written.
    """
    path = Path(path)
    payload = data.encode(encoding) if isinstance(data, str) else data
    if unchanged_ok:
        try:
            if path.is_file() and not path.is_symlink() and path.read_bytes() == payload:
                return False
        except OSError:
            pass
    part = part_path(path)
    part.unlink(missing_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(part, flags, 0o666 if mode is None else mode)
    try:
        with open(fd, "wb") as fh:
            if mode is not None:
                os.fchmod(fh.fileno(), mode)  # exactly mode, whatever the umask
            fh.write(payload)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
    return True


def remove_tree(path: Union[Path, str]) -> bool:
    """Delete the tree at ``path`` (retention); return False when nothing was there. Links
    inside it are removed, never followed (``shutil.rmtree`` works on folder descriptors on
    Linux, so a link swapped in meanwhile cannot lead it elsewhere); ``path`` itself being a
    link removes only the link."""
    import shutil

    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
        return True
    if not path.exists():
        return False
    shutil.rmtree(path)
    return True
