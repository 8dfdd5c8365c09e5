"""Names that come from outside (case and delivery folder names, file names): data that may be
any bytes, shown safely and judged before a case is made of them.

A folder name that is not valid UTF-8 (a Latin-1 export: ``M\\xdcLLER``), carries control
characters (a newline or an ANSI escape would forge log lines and terminal output) or is too
long to derive paths from cannot become a case as it is. :func:`name_problem` says why, for
the person who must rename it; :func:`printable` is how such a name (or any text from outside)
is written into logs, messages and pages: control characters and undecodable bytes become
``\\xNN`` escapes, everything else stays as it is.
"""

from __future__ import annotations

import re

__all__ = ["CASE_FOLDER", "MAX_NAME_BYTES", "name_problem", "printable", "without_case_folder"]

#: what stands in a message for a case folder's path (its name may be a patient id)
CASE_FOLDER = "[case folder]"

#: the longest folder name taken as a case (UTF-8 bytes): room for the suffixes of derived
#: names within the 255 bytes a file name may have
MAX_NAME_BYTES = 200

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def _escape(match: re.Match) -> str:
    char = match.group()
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, as os.fsdecode carries it (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def printable(text: object) -> str:
    """``text`` with control characters, line separators and undecodable bytes escaped
    (``\\n`` becomes the two characters ``\\x0a``): one line, safe for logs and terminals."""
    return _CONTROL.sub(_escape, str(text))


def name_problem(name: str) -> str:
    """Why folder ``name`` cannot be taken as a case ('' when it can)."""
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return ("the folder name is not valid UTF-8 (exported in another encoding?); rename it with plain "
                "UTF-8 characters and it is picked up")
    if _CONTROL.search(name):
        return "the folder name contains control characters (a line break, an escape); rename it"
    if size > MAX_NAME_BYTES:
        return f"the folder name is {size} bytes long (at most {MAX_NAME_BYTES}); rename it shorter"
    return ""


def without_case_folder(text: str, case_path: object) -> str:
    """``text`` (an exception's message, say) with the case folder ``case_path`` and any path
    inside it replaced by :data:`CASE_FOLDER`, and the folder's name wherever else it
    appears: messages, events and dead letters name cases by their host id only."""
    if not case_path or not isinstance(case_path, str):
        return text
    folder = case_path.rstrip("/")
    text = re.sub(re.escape(folder) + r"(/[^\s'\"]*)?", CASE_FOLDER, text)
    name = folder.rsplit("/", 1)[-1]
    if len(name) >= 3:
        text = text.replace(name, CASE_FOLDER)
    return text
