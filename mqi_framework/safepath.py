"""Paths built from data (case folder names) must never leave their root."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path


class PathEscapeError(ValueError):
    """A path built from data would lie outside its root."""


def is_within(root: Path, path: Path) -> bool:
    """True when ``path`` (symlinks resolved) lies inside ``root`` (symlinks resolved)."""
    try:
        Path(path).resolve().relative_to(Path(root).resolve())
    except ValueError:
        return False
    return True


def safe_join(root: Path, *parts: str) -> Path:
    """``root / parts`` or PathEscapeError when the result escapes ``root``."""
    candidate = Path(root).joinpath(*parts)
    if any(Path(part).is_absolute() for part in parts) or not is_within(root, candidate):
        raise PathEscapeError(f"path {'/'.join(parts)!r} would leave its root {root}")
    return candidate


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_component(text: str) -> str:
    """A single, harmless path component derived from any text (stable for the same text)."""
    cleaned = _UNSAFE.sub("_", text).strip("._") or "x"
    if cleaned != text or len(cleaned) > 100:
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:10]
        cleaned = f"{cleaned[:80]}-{digest}"
    return cleaned
