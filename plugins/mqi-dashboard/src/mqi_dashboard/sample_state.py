"""Synthetic state for tests and the benchmark: cases in every state with beams, steps,
attempts (timings, exit codes, log tails), events, GPUs with history, and workers, written
straight into a state database that has the host's schema.

Folder names look like patient ids (``PATIENT-000042``) and some messages mention them, so
that tests can prove they are never shown unless ``show_patient_names`` is on.
"""

from __future__ import annotations

import json
import random
import sqlite3
import time
from typing import Optional


CASE_STEPS = (("prepare", "prepare", False), ("upload", "transfer", False), ("simulate", "execute", True),
              ("download", "transfer", False), ("postprocess", "postprocess", True))
LABELS = {"prepare": "preparing", "upload": "uploading", "simulate": "running", "download": "downloading",
          "postprocess": "postprocessing"}
WORKERS = ("conductor", "scan", "prepare", "transfer", "execute", "postprocess", "curate", "archive", "dashboard")


def folder_name(i: int) -> str:
    return f"PATIENT-{i:06d}"


def _pick_state(rng: random.Random, i: int, cases: int) -> str:
    if i > cases - 6:  # the newest few are in flight
        return ("preparing", "running", "running", "uploading", "incomplete", "postprocessing")[cases - i]
    roll = rng.random()
    if roll < 0.86:
        return "done"
    if roll < 0.92:
        return "failed"
    if roll < 0.95:
        return "cancelled"
    if roll < 0.97:
        return "rejected"
    return "done"


def fill_state(conn: sqlite3.Connection, *, cases: int = 20, beams_per_case: int = 4, gpus: int = 4,
               now: Optional[float] = None, seed: int = 1, days: float = 30.0,
               total_beams: Optional[int] = None) -> dict:
    """Write ``cases`` cases (ids 1..cases, oldest first) into an empty, migrated state database.

    Cases that were rejected or are still being prepared have no beams; the others have
    ``beams_per_case`` each, or, with ``total_beams``, that many beams spread over them.
    Returns a few facts for assertions: ``{"by_state": {...}, "failed": [uid, ...], ...}``.
    """
    rng = random.Random(seed)
    states = [_pick_state(rng, i, cases) for i in range(1, cases + 1)]
    with_beams = [i for i, state in enumerate(states, 1) if state not in ("rejected", "preparing")]
    if total_beams is not None and with_beams:
        base, extra = divmod(total_beams, len(with_beams))
        beam_count = {i: base + (1 if k < extra else 0) for k, i in enumerate(with_beams)}
    else:
        beam_count = {i: beams_per_case for i in with_beams}
    now = time.time() if now is None else now
    start = now - days * 86400
    spacing = (now - start - 300) / max(cases, 1)  # the newest case arrived 5 minutes ago
    case_rows, beam_rows, step_rows, attempt_rows, event_rows = [], [], [], [], []
    by_state: dict[str, int] = {}
    facts: dict = {"failed": [], "done": [], "running": [], "rejected": [], "cancelled": []}
    step_id = 0
    running_steps: list[int] = []
    for i in range(1, cases + 1):
        uid = f"case-{i:06d}"
        name = folder_name(i)
        state = states[i - 1]
        by_state[state] = by_state.get(state, 0) + 1
        facts.setdefault(state, []).append(uid)
        detected = start + i * spacing + rng.random() * 60
        final = state in ("done", "failed", "cancelled", "rejected")
        nbeams = beam_count.get(i, 0)
        failed_beam = rng.randint(1, nbeams) if state == "failed" and nbeams else None
        t = detected + 1.0
        plan_info = {"plan_label": f"PLAN-{i % 97:02d}", "treatment_machine": "G1", "treatment_beams": nbeams,
                     "setup_beams": 1, "deliveries": nbeams}
        message = ""
        attention = 0
        steps_to_run = len(CASE_STEPS)
        if state == "rejected":
            message = f"no RT Ion Plan in the case folder {name}: add the plan and retry"
            attention = 1
            steps_to_run = 1
        elif state == "failed":
            message = f"step simulate failed for beam {failed_beam}"
            attention = 1
            steps_to_run = 3
        elif state == "cancelled":
            message = "cancelled"
            steps_to_run = 3
        elif not final:
            steps_to_run = {"preparing": 1, "uploading": 2, "running": 3, "postprocessing": 5, "incomplete": 1}[state]
        current_index = 0
        for index, (step, worker, per_beam) in enumerate(CASE_STEPS[:steps_to_run]):
            current_index = index
            numbers = list(range(1, nbeams + 1)) if per_beam else [0]
            step_end = t
            for beam in numbers:
                step_id += 1
                last_step = index == steps_to_run - 1
                in_flight = not final and last_step and (state != "incomplete")
                outcome = "ok"
                exit_code: Optional[int] = 0 if worker in ("execute", "postprocess") else None
                step_state = "done"
                attempts = 1
                if state == "rejected":
                    outcome, step_state = "rejected", "failed"
                elif state == "failed" and step == "simulate" and beam == failed_beam:
                    outcome, step_state, exit_code, attempts = "failed", "failed", 3, 2
                elif state == "cancelled" and last_step:
                    outcome, step_state, exit_code = "cancelled", "cancelled", None
                elif state == "incomplete":
                    outcome, step_state = "incomplete", "pending"
                if in_flight:
                    step_state = "running" if (beam or 1) <= 2 or step != "simulate" else "queued"
                    outcome = None
                run = {"prepare": 2.0, "upload": 4.0, "simulate": 40.0, "download": 5.0, "postprocess": 3.0}[step]
                begin = t + (beam - 1) * 0.5 if per_beam else t
                s_started = s_finished = None
                for attempt in range(1, attempts + 1):
                    dispatched = begin
                    started = dispatched + rng.random() * 2
                    finished = started + run * (0.6 + rng.random() * 0.8)
                    a_outcome = outcome if attempt == attempts else "failed"
                    a_exit = exit_code if attempt == attempts else 3
                    if step_state in ("running", "queued"):
                        finished = None
                        if step_state == "queued":
                            started = None
                    log_tail = ""
                    if worker == "execute":
                        log_tail = (f"Generating particles for (8 of 8 batches)\nTime taken by MC engine: {run:.1f} s\n"
                                    if a_outcome == "ok" else
                                    f"reading {name}/beams/{beam}\nFATAL ERROR: CUDA out of memory\n")
                    attempt_rows.append((step_id, attempt, dispatched, started, finished, a_outcome if finished else None,
                                         a_exit if finished else None, "" if a_outcome == "ok" else f"exit code {a_exit}",
                                         log_tail))
                    s_started, s_finished = started, finished
                    begin = (finished or started or dispatched) + 2.0
                step_end = max(step_end, s_finished or s_started or begin)
                progress = None
                if step_state == "running" and step == "simulate":
                    progress = round(rng.random(), 2)
                    running_steps.append(step_id)
                step_rows.append((step_id, i, beam, index, step, worker, step_state, attempts, attempts + 2,
                                  None, None, None, progress,
                                  f"{int((progress or 0) * 8)} of 8 batches" if progress is not None else "", None,
                                  s_started, s_finished, exit_code if s_finished else None,
                                  "" if outcome in ("ok", None) else f"exit code {exit_code}" if exit_code else ""))
            t = step_end + 1.0
        finished_at = t if final else None
        updated = finished_at or t
        case_rows.append((i, uid, name, "/srv/mqi/inbox", f"/srv/mqi/inbox/{name}", state, current_index, attention,
                          message, json.dumps(plan_info), detected, updated, finished_at,
                          detected if state == "incomplete" else None, None))
        for beam in range(1, nbeams + 1):
            if state == "done":
                b_state = "done"
            elif state == "failed":
                b_state = "failed" if beam == failed_beam else "cancelled"
            elif state == "cancelled":
                b_state = "cancelled"
            elif state == "incomplete":
                b_state = "missing" if beam == nbeams else "pending"
            else:
                b_state = LABELS.get({"running": "simulate", "postprocessing": "postprocess"}.get(state, ""), "pending")
            beam_rows.append((i, beam, f"Beam {beam}", f"G{beam:03d}", None, b_state,
                              "exit code 3" if b_state == "failed" else "", updated))
        event_rows.append((detected, i, None, None, "case.detected", "ready (marker)", "scan", "{}"))
        event_rows.append((detected + 0.5, i, None, None, "case.state", "detected -> preparing", "conductor", "{}"))
        if final:
            event_rows.append((finished_at, i, None, None, "case.state", f"-> {state}", "conductor", "{}"))
    with conn:  # sqlite3 commits the transaction on success and rolls it back on an error
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO cases(id, uid, name, inbox, path, state, step_index, attention, message, info, "
                         "detected_at, updated_at, finished_at, incomplete_since, next_check_at) "
                         "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", case_rows)
        conn.executemany("INSERT INTO beams(case_id, number, name, delivery_dir, input_rel, state, message, updated_at) "
                         "VALUES (?,?,?,?,?,?,?,?)", beam_rows)
        conn.executemany("INSERT INTO steps(id, case_id, beam_number, step_index, name, worker, state, attempt, "
                         "max_attempt, next_attempt_at, command, job, progress, progress_text, gpu_id, started_at, "
                         "finished_at, exit_code, message) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", step_rows)
        conn.executemany("INSERT INTO attempts(step_id, attempt, dispatched_at, started_at, finished_at, outcome, "
                         "exit_code, message, log_tail) VALUES (?,?,?,?,?,?,?,?,?)", attempt_rows)
        conn.executemany("INSERT INTO events(at, case_id, beam, step, kind, message, actor, data) "
                         "VALUES (?,?,?,?,?,?,?,?)", event_rows)
        columns = {r[1] for r in conn.execute("PRAGMA table_info(resources)")}
        for index in range(gpus):
            unhealthy = index == gpus - 1 and gpus > 2
            held = running_steps[index] if index < len(running_steps) and not unhealthy else None
            conn.execute(
                "INSERT INTO resources(kind, host, idx, uuid, name, memory_total_mb, memory_used_mb, memory_free_mb, "
                "utilization_pct, temperature_c, healthy, curator, seen_at, allocated_step, allocated_at) "
                "VALUES ('gpu', 'gpu-node', ?, ?, 'Stand-in A100', 40960, ?, ?, ?, 55, ?, 'core.standin:curate', ?, ?, ?)",
                (index, f"GPU-{index:08d}", 30000 if held else 500, 10960 if held else 40460, 95 if held else 0,
                 0 if unhealthy else 1, now - 1, held, now - 30 if held else None))
            if held:
                conn.execute("UPDATE steps SET gpu_id = (SELECT id FROM resources WHERE idx = ?) WHERE id = ?",
                             (index, held))
        if "note" in columns and gpus > 2:
            conn.execute("UPDATE resources SET note = 'not reported since 10:00' WHERE idx = ?", (gpus - 1,))
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'gpu_history'").fetchone():
            rows = []
            for index in range(gpus):
                for k in range(120):
                    at = now - (120 - k) * 120
                    busy = (k // 10 + index) % 3 != 0
                    rows.append((at, "gpu-node", index, 30000 if busy else 500, 40460 - (30000 if busy else 500),
                                 90 if busy else 2, 50, 1, 1, int(busy)))
            conn.executemany("INSERT INTO gpu_history(at, host, idx, memory_used_mb, memory_free_mb, utilization_pct, "
                             "temperature_c, healthy, eligible, allocated) VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
        for n, worker in enumerate(WORKERS):
            conn.execute("INSERT INTO workers(name, kind, pid, state, started_at, heartbeat_at, restarts, last_exit, "
                         "message) VALUES (?,?,?,?,?,?,?,?,?)",
                         (worker, "process", 1000 + n, "running", now - 3600, now - 1,
                          2 if worker == "execute" else 0, -9 if worker == "execute" else None,
                          "hung (no heartbeat)" if worker == "execute" else ""))
    facts["by_state"] = by_state
    return facts
