"""What one case may cost the host: a case folder is measured before anything in it is read
or copied, so that a hostile or broken export cannot fill the disk (every case is copied
three times: staging, the execution side, results) or the memory.

Sizes are *apparent* sizes (``st_size``): a sparse file of 5 GiB that takes 24 KB on disk
counts as 5 GiB, because that is what a copy of it writes. The walk never follows symlinks
and stops as soon as a limit is passed, so measuring a folder of a million files costs no
more than the limit allows.
"""

from __future__ import annotations

import os
from typing import Optional

import attrs


@attrs.frozen
class CaseSize:
    """What was counted, and whether counting stopped at a limit."""

    files: int
    bytes: int
    over: Optional[str] = None  # the reason, when a limit was passed


def human_bytes(n: float) -> str:
    """``1.5 GiB``-style size for messages."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def measure_case(folder: str | os.PathLike, max_bytes: int = 0, max_files: int = 0) -> CaseSize:
    """Count the regular files under ``folder`` and their apparent size, stopping once
    ``max_bytes`` or ``max_files`` (0: no limit) is passed; ``over`` then says which and how
    to go on. Unreadable subfolders raise ``OSError``."""
    files = total = 0
    stack = [os.fspath(folder)]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                    continue
                if not entry.is_file(follow_symlinks=False):
                    continue
                files += 1
                total += entry.stat(follow_symlinks=False).st_size
                if max_files and files > max_files:
                    return CaseSize(files, total, f"the case folder holds more than {max_files} files "
                                                  f"(cases.max_case_files)")
                if max_bytes and total > max_bytes:
                    return CaseSize(files, total, f"the case folder holds more than {human_bytes(max_bytes)} "
                                                  f"(cases.max_case_bytes; sizes are apparent sizes, so a sparse "
                                                  f"file counts in full)")
    return CaseSize(files, total)
