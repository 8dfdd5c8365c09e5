"""The example worklist scanner on real files."""

from mqi_framework.protocols import PluginContext

import mqi_site_worklist
from mqi_site_worklist import WorklistScanner, WorklistSettings


def make(tmp_path, text):
    (tmp_path / "cases").mkdir(exist_ok=True)
    (tmp_path / "worklist.csv").write_text(text, encoding="utf-8")
    return WorklistScanner(WorklistSettings(worklist="worklist.csv", root="cases"),
                           PluginContext(workspace=tmp_path, config_path=tmp_path / "mqi.yaml"))


def test_ready_rows_become_ready_cases(tmp_path):
    scanner = make(tmp_path, "folder,status\nA 1,ready\nB;2,delivering\nmissing,ready\n")
    (tmp_path / "cases" / "A 1").mkdir()
    (tmp_path / "cases" / "B;2").mkdir()
    found = {c.case_id: c for c in scanner.scan()}
    assert set(found) == {"A 1", "B;2"}
    assert found["A 1"].ready and not found["B;2"].ready
    assert found["A 1"].inbox == (tmp_path / "cases").resolve()


def test_rows_outside_the_root_are_ignored(tmp_path):
    (tmp_path / "outside").mkdir()
    scanner = make(tmp_path, "folder,status\n../outside,ready\n/etc,ready\nlink,ready\n")
    (tmp_path / "cases" / "link").symlink_to(tmp_path / "outside")
    assert list(scanner.scan()) == []


def test_check_and_registration(tmp_path, mqi_pm, register_plugin):
    scanner = make(tmp_path, "folder,status\n")
    assert scanner.check() == []
    (tmp_path / "worklist.csv").unlink()
    assert "does not exist" in scanner.check()[0]
    assert list(scanner.scan()) == []
    register_plugin(mqi_site_worklist, name="site.worklist")
    assert mqi_pm.lookup("scanner", "site.worklist") is WorklistScanner
