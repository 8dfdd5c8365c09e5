"""Many beams, few GPUs: a real ``mqi-host run`` with the stand-in simulator and the
nvidia-smi curator reading a fake nvidia-smi. No GPU ever holds two beams, busy GPUs get
none, and every beam finishes."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

from mqi_framework.testing import HostProcess, Workspace, wait_final
from mqi_framework.workspace import fast_config

pytestmark = pytest.mark.integration

samples = pytest.importorskip("mqi_moqui.samples")

# The job itself writes when it starts and ends on which GPU (CUDA_VISIBLE_DEVICES={gpu}),
# so overlap is checked on what really ran, not only on what the database says.
LEDGER_COMMAND = ("CUDA_VISIBLE_DEVICES={gpu} sh -c '"
                  "echo \"start $CUDA_VISIBLE_DEVICES $(date +%s.%N)\" >> \"$0\"; "
                  "\"$1\" -m mqi_moqui.standin \"$2\"; rc=$?; "
                  "echo \"end $CUDA_VISIBLE_DEVICES $(date +%s.%N)\" >> \"$0\"; exit $rc' "
                  "{ledger} {python} {input_file}")


def gpu_workspace(folder: Path, ledger: Path) -> Workspace:
    config = fast_config(overrides={"workflow": {"vars": {"ledger": str(ledger)}}})
    config["workers"]["curate"] = {"plugin": "nvidia-smi", "interval_seconds": 0.5,
                                   "settings": {"hosts": [{"name": "localhost"}], "interval_seconds": 0.3,
                                                "min_free_memory_mb": 4096, "max_utilization_pct": 20,
                                                "timeout_seconds": 5}}
    for step in config["workflow"]["steps"]:
        if step["name"] == "simulate":
            step["command"] = LEDGER_COMMAND
    return Workspace(folder, config)


def intervals_per_gpu(ws: Workspace) -> dict[int, list[tuple[float, float, int]]]:
    """GPU index -> (allocated at, released at, step) of every simulate attempt, from the database."""
    rows = ws.query(
        "SELECT r.idx, a.dispatched_at, a.finished_at, s.id AS step, a.attempt FROM steps s "
        "JOIN attempts a ON a.step_id = s.id JOIN resources r ON r.id = s.gpu_id WHERE s.name = 'simulate'")
    assert all(r["attempt"] == 1 for r in rows), "a beam was retried: the per-step GPU id covers only its last try"
    out: dict[int, list] = defaultdict(list)
    for r in rows:
        out[r["idx"]].append((r["dispatched_at"], r["finished_at"], r["step"]))
    return out


def ledger_intervals(ledger: Path) -> dict[int, list[tuple[float, float]]]:
    opened: dict[int, list[float]] = defaultdict(list)
    out: dict[int, list] = defaultdict(list)
    for line in sorted(ledger.read_text().splitlines(), key=lambda l: float(l.split()[2])):
        kind, gpu, at = line.split()
        if kind == "start":
            assert not opened[int(gpu)], f"GPU {gpu} started a second job while one ran: {line}"
            opened[int(gpu)].append(float(at))
        else:
            out[int(gpu)].append((opened[int(gpu)].pop(), float(at)))
    assert not any(opened.values())
    return out


def assert_no_overlap(intervals: dict) -> None:
    for gpu, spans in intervals.items():
        spans = sorted(spans)
        for before, after in zip(spans, spans[1:]):
            assert before[1] <= after[0], f"GPU {gpu} held two beams: {before} and {after}"


def test_many_beams_two_gpus_no_gpu_ever_holds_two_beams(tmp_path, fake_smi):
    fake_smi.serve("gpus2_rtx_a6000.out")
    ledger = tmp_path / "ledger.txt"
    ws = gpu_workspace(tmp_path / "ws", ledger)
    names = [f"CASE-{i}" for i in range(4)]
    for i, name in enumerate(names):
        samples.generate_case(ws.inbox, name, seed=i, treatment_beams=3)
    host = HostProcess(ws, {"MQI_STANDIN_SECONDS": "0.4", **fake_smi.env()}).start()
    try:
        cases = wait_final(ws, len(names), timeout=150)
    finally:
        host.stop()
        ws.kill_jobs()
    for case in cases.values():
        assert case["state"] == "done", case
        assert [b["state"] for b in case["beams"]] == ["done"] * 3
    db = intervals_per_gpu(ws)
    assert sorted(db) == [0, 1] and sum(len(v) for v in db.values()) == 12
    assert_no_overlap(db)
    real = ledger_intervals(ledger)
    assert sorted(real) == [0, 1] and sum(len(v) for v in real.values()) == 12
    assert_no_overlap(real)
    assert ws.gpu_allocations() == []
    assert len(ws.query("SELECT * FROM gpu_history")) >= 2
    assert fake_smi.calls()  # the curator really ran the (fake) nvidia-smi


def test_busy_gpus_get_no_beam(tmp_path, fake_smi):
    fake_smi.serve("gpus4_v100_one_busy.out")  # GPU 1 busy (30 GB, 100 %), GPU 3 at 37 %: 0 and 2 are eligible
    ledger = tmp_path / "ledger.txt"
    ws = gpu_workspace(tmp_path / "ws", ledger)
    samples.generate_case(ws.inbox, "BUSY", seed=3, treatment_beams=3)
    host = HostProcess(ws, {"MQI_STANDIN_SECONDS": "0.3", **fake_smi.env()}).start()
    try:
        case = wait_final(ws, 1, timeout=120)["BUSY"]
        status = ws.cli("status")
    finally:
        host.stop()
        ws.kill_jobs()
    assert case["state"] == "done", case
    used = intervals_per_gpu(ws)
    assert sorted(used) in ([0, 2], [0], [2]) and sum(len(v) for v in used.values()) == 3
    assert sorted(ledger_intervals(ledger)) == sorted(used)
    assert "localhost:1 Tesla V100-SXM2-32GB busy" in status.stdout
    assert "utilization 100% > 20%" in status.stdout


def test_a_beam_whose_job_vanished_is_lost_its_gpu_freed_and_it_is_retried(tmp_path, fake_smi):
    """The running-step case of crash reconciliation: the job dies without an exit code (as
    when the GPU server reboots); the executor reports it lost, the GPU is released in the
    same transaction, and the beam's retry gets a GPU again."""
    import os
    import signal

    from mqi_framework.workspace import wait_until

    fake_smi.serve("gpus2_rtx_a6000.out")
    ws = gpu_workspace(tmp_path / "ws", tmp_path / "ledger.txt")
    samples.generate_case(ws.inbox, "LOST", seed=5, treatment_beams=1)
    host = HostProcess(ws, {"MQI_STANDIN_SECONDS": "8", **fake_smi.env()}).start()
    try:
        assert wait_until(lambda: ws.query("SELECT 1 FROM steps WHERE name = 'simulate' AND state = 'running'"), 60), \
            ws.logs()
        assert len(ws.gpu_allocations()) == 1
        (pid_file,) = (ws.folder / "jobs").glob("*-simulate-b1-a1/pid")
        runner_pid, child_pgid = pid_file.read_text().split()[:2]
        os.kill(int(runner_pid), signal.SIGKILL)  # the runner dies first: nobody writes an exit code
        os.killpg(int(child_pgid), signal.SIGKILL)
        assert wait_until(lambda: ws.query("SELECT 1 FROM steps WHERE name = 'simulate' AND attempt = 2"), 60), \
            ws.logs()
        first = ws.query("SELECT a.outcome, a.message FROM attempts a JOIN steps s ON s.id = a.step_id "
                         "WHERE s.name = 'simulate' AND a.attempt = 1")[0]
        assert first["outcome"] == "failed" and "job lost" in first["message"]
        released = ws.query("SELECT data FROM events WHERE kind = 'step.failed' AND step = 'simulate'")
        assert released and '"gpu_released": true' in released[0]["data"]
        case = wait_final(ws, 1, timeout=120)["LOST"]
    finally:
        host.stop()
        ws.kill_jobs()
    assert case["state"] == "done", case
    assert ws.gpu_allocations() == []
