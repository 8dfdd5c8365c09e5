"""Paths built from data (case folder names, job keys) must never leave their root.

* :func:`safe_join` joins data onto a root and refuses anything that would land outside
  it (``..``, absolute parts, a symlink pointing out);
* :func:`is_within` tells whether a path (symlinks followed) lies inside a root;
* :func:`safe_component` turns any text into one harmless path component, for names
  that must never be interpreted (by the file system or a shell).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Union

PathLike = Union[str, "os.PathLike[str]"]


class PathEscapeError(ValueError):
    """A path built from data would lie outside its root."""


def is_within(root: PathLike, path: PathLike) -> bool:
    """True when ``path`` (symlinks resolved) lies inside ``root`` (symlinks resolved).

    ``root`` itself counts as inside. Paths that do not exist yet are resolved as far
    as they exist.
    """
    try:
        return Path(path).resolve().is_relative_to(Path(root).resolve())
    except (OSError, RuntimeError):  # a symlink loop, an unreadable folder
        return False


def safe_join(root: PathLike, *parts: str) -> Path:
    """``root / parts``, or :class:`PathEscapeError` when the result would leave ``root``.

    Refused: absolute parts, ``..`` that climbs out, a symlink (anywhere on the way)
    that points outside ``root``, and NUL characters. ``root`` is returned unchanged
    (not resolved) so callers keep the paths they configured.
    """
    for part in parts:
        text = os.fspath(part)
        if "\x00" in text:
            raise PathEscapeError(f"path part {text!r} contains a NUL character")
        if Path(text).is_absolute():
            raise PathEscapeError(f"path part {text!r} is absolute; it must stay inside {root}")
    candidate = Path(root).joinpath(*parts)
    if not is_within(root, candidate):
        raise PathEscapeError(f"path {'/'.join(os.fspath(p) for p in parts)!r} would leave its root {root}")
    return candidate


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_HASHED = re.compile(r"-[0-9a-f]{10}$")
MAX_COMPONENT = 100


def safe_component(text: str) -> str:
    """A single, harmless path component derived from any text.

    Stable (the same text always gives the same name), made of ``[A-Za-z0-9._-]`` only,
    never ``.``/``..``, never starting with ``-`` or ``.``, at most 100 characters. Text
    that is already such a name is returned unchanged; anything else is cleaned and gets
    a short SHA-256 suffix, so two different texts do not share a name.
    """
    cleaned = _UNSAFE.sub("_", text).lstrip("._-").rstrip("._") or "x"
    if cleaned != text or len(cleaned) > MAX_COMPONENT or _HASHED.search(cleaned):
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:10]
        cleaned = f"{cleaned[:80]}-{digest}"
    return cleaned
