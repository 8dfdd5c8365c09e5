"""Retention (issue 15.2): the copies of a finished case go when their time has come, the
remote root is swept for orphans, and a case retried after its copies went runs again from
its first step. Real host processes, the core.local transfer, the stand-in engine."""

from __future__ import annotations

import os
import time

import pytest

from mqi_framework.testing import Workspace, wait_final
from mqi_framework.workspace import fast_config, wait_until

pytestmark = pytest.mark.integration
samples = pytest.importorskip("mqi_moqui.samples")

PROMPT = {"retention": {"remote_after_hours": 0, "staging_after_days": 0, "results_after_days": None,
                        "check_seconds": 0.3, "orphan_sweep_hours": 0.0003}}


def cleaned_events(ws: Workspace, uid: str) -> list[str]:
    return [r["message"] for r in ws.query("SELECT e.message FROM events e JOIN cases c ON c.id = e.case_id "
                                           "WHERE c.uid = ? AND e.kind = 'case.cleaned'", uid)]


def test_copies_go_orphans_are_swept_and_a_retry_runs_again_from_the_start(tmp_path, host_factory):
    ws = Workspace(tmp_path / "ws", fast_config(overrides=PROMPT))
    remote = ws.folder / "remote"
    remote.mkdir()
    orphan, foreign = remote / "case-999999", remote / "not-a-case"  # left by a crash / someone else's
    for folder in (orphan, foreign):
        (folder / "beams").mkdir(parents=True)
        (folder / "beams" / "dose.raw").write_bytes(b"\0" * 100)
        os.utime(folder, (time.time() - 7200, time.time() - 7200))
    samples.generate_case(ws.inbox, "GOOD", seed=1)
    bad = samples.generate_case(ws.inbox, "BAD", seed=2)
    (samples.delivery_dir_of(bad, 2) / "STANDIN_MODE").write_text("fail")
    host_factory(workspace=ws)
    cases = wait_final(ws, 2)
    good, failed = cases["GOOD"], cases["BAD"]
    assert good["state"] == "done" and failed["state"] == "failed"

    def gone(uid: str) -> bool:
        return not (remote / uid).exists() and not (ws.folder / "staging" / uid).exists()

    assert wait_until(lambda: gone(good["id"]) and gone(failed["id"]), 30), ws.logs()
    assert (ws.folder / "results" / good["id"]).is_dir()  # results are the QA record: kept by default
    assert any("removed the remote copy, the staging copy" in m for m in cleaned_events(ws, good["id"]))
    assert wait_until(lambda: not orphan.exists(), 30)
    assert foreign.is_dir()  # only folders named like this host's case ids are ever swept

    # the stand-in now succeeds: a retry must not run beam 2 alone on inputs that are gone
    (samples.delivery_dir_of(bad, 2) / "STANDIN_MODE").unlink()
    retried = ws.cli("retry", failed["id"])
    assert retried.returncode == 0, retried.stderr
    after = wait_final(ws, 2)
    assert after["BAD"]["state"] == "done", after["BAD"]
    steps = ws.query("SELECT s.step_index, s.attempt FROM steps s JOIN cases c ON c.id = s.case_id "
                     "WHERE c.uid = ? AND s.step_index = 0", failed["id"])
    assert steps[0]["attempt"] == 2  # prepared again
    import json

    record = json.loads((ws.folder / "results" / failed["id"] / "beams" / "2" / "run.json").read_text())
    assert record["prepare_attempt"] == 2  # so its beams got new seeds (issue 14.3), recorded with the result
    retry_events = [r["message"] for r in ws.query(
        "SELECT e.message FROM events e JOIN cases c ON c.id = e.case_id WHERE c.uid = ? AND e.kind = 'case.retry'",
        failed["id"])]
    assert any("runs again from its first step" in m for m in retry_events)
