"""Names from outside: escaped for logs, judged before a case is made of them (issue 15.4)."""

from __future__ import annotations

import logging
import os

from mqi_framework.cli.common import OneLineFormatter
from mqi_framework.names import MAX_NAME_BYTES, name_problem, printable


def test_printable_escapes_control_characters_and_undecodable_bytes():
    latin1 = os.fsdecode(b"M\xdcLLER")  # how a Latin-1 folder name arrives from os.scandir
    assert printable(latin1) == "M\\xdcLLER"
    assert printable("a\nb\rc\x1b[31md\x7f") == "a\\x0ab\\x0dc\\x1b[31md\\x7f"
    assert printable("Müller Ø 患者 O'Brien") == "Müller Ø 患者 O'Brien"  # ordinary text stays
    assert printable("x\u2028y") == "x\\u2028y"


def test_name_problem_says_why_a_folder_cannot_be_a_case():
    assert name_problem("Müller, Hans 2024") == ""
    assert "UTF-8" in name_problem(os.fsdecode(b"M\xdcLLER"))
    assert "control characters" in name_problem("case\nforged line")
    assert "control characters" in name_problem("case\x1b[2J")
    assert "bytes long" in name_problem("x" * (MAX_NAME_BYTES + 1))
    assert name_problem("x" * MAX_NAME_BYTES) == ""


def test_log_lines_cannot_be_forged():
    formatter = OneLineFormatter("%(levelname)s %(message)s")
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "folder %s seen", ("x\nINFO forged",), None)
    assert formatter.format(record) == "INFO folder x\\x0aINFO forged seen"


def test_a_case_folder_path_leaves_no_name_in_a_message():
    from mqi_framework.names import without_case_folder

    text = ("FileNotFoundError: [Errno 2] No such file or directory: '/srv/inbox/John Doe 1957/beam 1/001.ptn'; "
            "while reading John Doe 1957")
    out = without_case_folder(text, "/srv/inbox/John Doe 1957")
    assert "John" not in out and out.count("[case folder]") == 2 and "/srv/inbox" not in out
    assert without_case_folder("plain", None) == "plain"


def test_known_names_with_spaces_are_redacted_from_free_texts(tmp_path):
    from mqi_framework.store import open_state, transaction
    from mqi_framework.store.views import redact_known_names

    conn = open_state(tmp_path / "state.db")
    with transaction(conn):
        for i, name in enumerate(["John Doe 1957", "PAT-123"], 1):
            conn.execute("INSERT INTO cases(uid, name, inbox, path, state, detected_at, updated_at) "
                         "VALUES (?, ?, '/in', ?, 'done', 0, 0)", (f"case-{i:06d}", name, f"/in/{name}"))
    texts = ["OSError: '/in/John Doe 1957/plan.dcm': EIO", "PAT-123 failed", "nothing here"]
    assert redact_known_names(conn, texts) == ["OSError: '/in/[case folder]/plan.dcm': EIO", "[case folder] failed",
                                               "nothing here"]
