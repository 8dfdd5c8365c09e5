"""core.fs scanner on real folders; time is controlled through mtimes, not a mocked clock."""

from __future__ import annotations

import os
import time


from mqi_framework.builtin.fs_scanner import FsScanner, FsScannerSettings
from mqi_framework.protocols import PluginContext

ODD = ["with space", "quote's \"q\"", "semi;colon", "$(touch PWNED)", "ünïcödé", "new\nline"]


def scanner(tmp_path, **kw):
    settings = FsScannerSettings(inboxes=[str(tmp_path / "inbox")], **kw)
    return FsScanner(settings, PluginContext(workspace=tmp_path, config_path=tmp_path / "mqi.yaml"))


def age(path, seconds):
    old = time.time() - seconds
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.utime(os.path.join(root, name), (old, old), follow_symlinks=False)
    os.utime(path, (old, old))


def found(s):
    return {c.case_id: c for c in s.scan()}


def test_marker_settled_and_changing(tmp_path):
    inbox = tmp_path / "inbox"
    (inbox / "marked").mkdir(parents=True)
    (inbox / "marked" / "_CASE_READY").touch()
    (inbox / "old" / "sub").mkdir(parents=True)
    (inbox / "old" / "sub" / "f.ptn").write_bytes(b"x")
    age(inbox / "old", 120)
    (inbox / "fresh").mkdir()
    (inbox / "fresh" / "RP.dcm").write_bytes(b"x")
    cases = found(scanner(tmp_path, settle_seconds=60))
    assert cases["marked"].ready and cases["marked"].reason == "marker"
    assert cases["old"].ready and cases["old"].reason == "settled"
    assert not cases["fresh"].ready and cases["fresh"].reason == "changing"
    # a new file deep inside an old case makes it change again
    (inbox / "old" / "sub" / "late.mgn").write_bytes(b"y")
    assert not found(scanner(tmp_path, settle_seconds=60))["old"].ready


def test_hidden_files_symlinks_are_skipped(tmp_path):
    inbox = tmp_path / "inbox"
    (inbox / ".hidden").mkdir(parents=True)
    (inbox / "file.txt").write_text("not a case")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "_CASE_READY").touch()
    (inbox / "link").symlink_to(outside)
    assert found(scanner(tmp_path, settle_seconds=0)) == {}
    assert ".hidden" in found(scanner(tmp_path, settle_seconds=0, ignore_hidden=False))


def test_odd_names_are_data(tmp_path):
    inbox = tmp_path / "inbox"
    for name in ODD:
        (inbox / name).mkdir(parents=True)
        (inbox / name / "_CASE_READY").touch()
    cases = found(scanner(tmp_path))
    assert set(cases) == set(ODD)
    assert all(c.path.parent == inbox.resolve() for c in cases.values())
    assert not list(tmp_path.rglob("PWNED"))


def test_missing_inbox_is_tolerated_and_checked(tmp_path):
    s = FsScanner(FsScannerSettings(inboxes=[str(tmp_path / "nope"), str(tmp_path / "inbox")]),
                  PluginContext(workspace=tmp_path, config_path=tmp_path / "mqi.yaml"))
    (tmp_path / "inbox" / "c").mkdir(parents=True)
    (tmp_path / "inbox" / "c" / "_CASE_READY").touch()
    assert set(found(s)) == {"c"}
    assert any("does not exist" in p for p in s.check())
    assert FsScanner(FsScannerSettings(), PluginContext(workspace=tmp_path)).check()


def test_many_folders(tmp_path):
    inbox = tmp_path / "inbox"
    for i in range(2000):
        (inbox / f"case{i:05d}").mkdir(parents=True)
    (inbox / "case00007" / "_CASE_READY").touch()
    cases = found(scanner(tmp_path, settle_seconds=3600))
    assert len(cases) == 2000 and [c for c in cases.values() if c.ready] == [cases["case00007"]]


def test_a_missing_inbox_is_said_once_then_again_only_every_ten_minutes(tmp_path, caplog, mocker):
    """Issue 19: a missing inbox warned every 2 s. The clock is the edge mocked here."""
    import logging

    from mqi_framework.builtin import fs_scanner

    s = scanner(tmp_path)
    clock = mocker.patch.object(fs_scanner.time, "time", return_value=1000.0)
    with caplog.at_level(logging.INFO, logger="mqi_framework.builtin.fs_scanner"):
        for tick in range(5):
            clock.return_value = 1000.0 + 2 * tick
            assert found(s) == {}
        assert [r.levelname for r in caplog.records] == ["WARNING"]
        assert "cannot be read" in caplog.records[0].getMessage()
        clock.return_value = 1000.0 + fs_scanner.REPEAT_WARNING_SECONDS + 1
        found(s)
        assert [r.levelname for r in caplog.records] == ["WARNING", "WARNING"]
        (tmp_path / "inbox").mkdir()
        found(s)
        assert caplog.records[-1].levelname == "INFO" and "can be read again" in caplog.records[-1].getMessage()
    assert s.check() == []
