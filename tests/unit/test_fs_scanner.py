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
