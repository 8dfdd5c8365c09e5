"""The read queries stay index-backed (migration 003), the SVG pictures, the password tool, and
the benchmark script (small, so that it never rots)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mqi_framework.store import connect

from mqi_dashboard import charts
from mqi_framework.store import views as queries
from mqi_dashboard.auth import check_password, hash_problem
from mqi_dashboard.settings import DashboardSettings

REPO_ROOT = Path(__file__).resolve().parents[3]


def plan(conn, sql, *params):
    return " | ".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, params))


def test_dashboard_queries_use_indexes(state_ws):
    conn = connect(state_ws.db, readonly=True)
    try:
        assert "cases_attention" in plan(conn, "SELECT * FROM cases WHERE attention = 1 ORDER BY updated_at DESC LIMIT 5")
        assert "cases_detected" in plan(conn, "SELECT COUNT(*) FROM cases WHERE detected_at >= ?", 0)
        assert "cases_finished" in plan(conn, "SELECT state FROM cases WHERE finished_at >= ?", 0)
        assert "COVERING INDEX beams_state" in plan(conn, "SELECT state, COUNT(*) FROM beams GROUP BY state")
        assert "COVERING INDEX cases_state" in plan(conn, "SELECT state, COUNT(*) FROM cases GROUP BY state")
        assert "SCAN" not in plan(conn, "SELECT * FROM steps WHERE case_id = ? ORDER BY step_index, beam_number", 1)
    finally:
        conn.close()


def test_redact_replaces_the_folder_name_only():
    assert queries.redact("no plan in /in/PAT-1/x", "PAT-1") == "no plan in /in/[case folder]/x"
    assert queries.redact("fine", None) == "fine"
    assert queries.redact(None, "PAT-1") == ""


def test_step_duration_histogram_is_cumulative(state_ws):
    conn = connect(state_ws.db, readonly=True)
    try:
        series = queries.step_durations(conn)
    finally:
        conn.close()
    assert {s["step"] for s in series} == {"prepare", "upload", "simulate", "download", "postprocess"}
    for s in series:
        counts = [n for _, n in s["buckets"]]
        assert counts == sorted(counts) and counts[-1] <= s["count"] and s["sum"] > 0


def test_gantt_draws_a_row_per_beam_and_marks_failures():
    detail = {"id": "case-000001", "steps": [
        {"step": "prepare", "beam": None, "attempt": 1, "attempts": [
            {"attempt": 1, "dispatched_at": 100.0, "started_at": 101.0, "finished_at": 103.0, "outcome": "ok",
             "exit_code": None}]},
        {"step": "simulate", "beam": 2, "attempt": 2, "attempts": [
            {"attempt": 1, "dispatched_at": 104.0, "started_at": 105.0, "finished_at": 110.0, "outcome": "failed",
             "exit_code": 3},
            {"attempt": 2, "dispatched_at": 111.0, "started_at": 112.0, "finished_at": None, "outcome": None,
             "exit_code": None}]},
        {"step": "simulate", "beam": 10, "attempt": 1, "attempts": [
            {"attempt": 1, "dispatched_at": 104.0, "started_at": None, "finished_at": None, "outcome": None,
             "exit_code": None}]},
    ]}
    svg = str(charts.gantt(detail, now=120.0))
    assert svg.startswith('<svg class="gantt"') and svg.endswith("</svg>")
    assert svg.index(">case<") < svg.index(">beam 2<") < svg.index(">beam 10<")  # beams in numeric order
    assert "simulate beam 2 attempt 1: 5.0s, waited 1.0s, failed (exit 3)" in svg
    assert 'class="running"' in svg and "waiting 16s for a worker" in svg
    assert "stroke=\"#d62728\"" in svg
    assert "timeline appears" in str(charts.gantt({"id": "x", "steps": []}))


def test_duration_formatting():
    assert [charts.duration(v) for v in (None, 4.25, 42, 185, 3725, 90061)] == \
        ["–", "4.2s", "42s", "3m05s", "1h02m", "1d01h"]


def test_password_hash_tool_and_check():
    proc = subprocess.run([sys.executable, "-c", "from mqi_dashboard.auth import hash_password_main as m; m()",
                           "--stdin"], input="correct horse\n", capture_output=True, text=True, check=True)
    hashed = proc.stdout.strip()
    assert hash_problem(hashed) is None and hash_problem("secret") is not None
    settings = DashboardSettings(password_hash=hashed, username="physicist")
    assert check_password(settings, "physicist", "correct horse")
    assert not check_password(settings, "physicist", "wrong") and not check_password(settings, "admin", "correct horse")


@pytest.mark.integration
def test_benchmark_script_runs(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "dashboard_bench.py"), "--cases", "300",
                           "--beams", "1000", "--requests", "3", "--workdir", str(tmp_path / "bench")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "300 cases, 1,000 beams" in proc.stdout and "goal met" in proc.stdout


def test_the_overview_counts_the_same_way_in_both_windows(tmp_path):
    """Issue 19: "failed today 1" stood beside "0 done, 3 failed" (rejected and cancelled were
    failures in one count and not in the other)."""
    from mqi_framework.store import open_state

    conn = open_state(tmp_path / "state.db")
    now = queries.local_midnight(1_800_000_000.0) + 12 * 3600  # noon
    for i, state in enumerate(["done", "failed", "rejected", "cancelled", "done"]):
        conn.execute("INSERT INTO cases(uid, name, inbox, path, state, detected_at, updated_at, finished_at) "
                     "VALUES (?, ?, '/in', ?, ?, ?, ?, ?)", (f"case-{i:06d}", f"c{i}", f"/in/c{i}", state, now - 600,
                                                             now - 60, now - 60))
    data = queries.overview(conn, now=now)
    assert data["today"]["finished"] == {"done": 2, "failed": 2, "other": 1}
    assert (data["throughput"]["done_24h"], data["throughput"]["failed_24h"]) == (2, 2)
    conn.close()
