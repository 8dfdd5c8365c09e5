"""The conductor: the state machine that moves cases and beams through the workflow.

Events come in (from workers, over the broker); each is applied in ONE SQLite
transaction that changes state and writes the commands it causes into the outbox; the
outbox is then relayed to the broker. Duplicated events are ignored (their message ids
are remembered), and results of a superseded attempt are recorded but change nothing.

Case states (``docs/states.md``): ``detected`` → one state per workflow step (its
``state:`` label, e.g. ``preparing``, ``uploading``, ``running``, ``downloading``,
``postprocessing``) → ``done``; on the side ``incomplete`` (waits for missing beams),
``cancelling``; final: ``done``, ``failed``, ``rejected``, ``cancelled``.

Beam states: ``missing`` (no delivery yet), ``pending``, ``queued`` (waiting for a GPU),
the label of the per-beam step it is in, ``waiting`` (between per-beam steps),
``retrying``, and final ``done``, ``failed``, ``cancelled``.

What the conductor tells workers (``run_step``, ``cancel_step``) is rendered by
:mod:`mqi_framework.command_render`, written and relayed by :mod:`mqi_framework.outbox`;
what follows a failed attempt is :mod:`mqi_framework.retry_policy`. Every attempt the
conductor gives up while it is in flight (a case cancel, an attempt no worker started) is
also a ``cancel_step`` to its worker, in the same transaction.

Why this module is over 400 lines: what is left is one reason, the state machine. The
event handlers, the steering requests (cancel, retry) and the housekeeping of ``tick()``
all move the same case, beam and step states inside one transaction each, through the
same helpers (``_advance``, ``_dispatch``, ``_set_case``); splitting them would put the
transitions of one state in several files.
"""

from __future__ import annotations

import json
import logging
import random
import sqlite3
import time
from typing import Any, Callable, Optional

from mqi_framework import command_render, logfields, outbox, retention, retry_policy
from mqi_framework.broker.base import Broker
from mqi_framework.config import LoadedConfig, StepConfig
from mqi_framework.kinds import EVENTS_QUEUE, command_queue
from mqi_framework.store import transaction
from mqi_framework.store import records as rec

log = logging.getLogger(__name__)

FINAL = rec.FINAL_CASE_STATES
IN_FLIGHT = rec.IN_FLIGHT_STEP_STATES
BOOKKEEPING_DAYS = 7.0  # sent outbox rows and remembered event ids are kept this long
GPU_RECONCILE_GRACE_SECONDS = 60.0  # a GPU held by a step not in flight is freed after this


class ConductorError(Exception):
    """A steering request (retry, cancel) that cannot be applied; the message says why."""


class Conductor:
    """Applies events and steering requests to the state database."""

    def __init__(
        self, loaded: LoadedConfig, conn: sqlite3.Connection, *, broker: Optional[Broker] = None,
        notify: Optional[Callable[..., Any]] = None, clock: Callable[[], float] = time.time,
        rng: Optional[random.Random] = None, actor: str = "conductor",
    ) -> None:
        self.loaded = loaded
        self.cfg = loaded.config
        self.steps: list[StepConfig] = loaded.config.workflow.steps
        self.conn = conn
        self.broker = broker
        self.notify = notify
        self.clock = clock
        self.rng = rng or random.Random()
        self.actor = actor
        self._changes: list[tuple[str, str, str, dict]] = []
        self._last_prune = 0.0
        self._last_retention = 0.0
        self._last_sweep = 0.0
        #: while the host was down nobody could start (or report) anything: the grace for
        #: unstarted attempts counts from the later of their dispatch and this conductor's start
        self.started_at = clock()

    # ================================================================ entry points

    def handle_event(self, body: dict, message_id: str) -> None:
        """Apply one worker event in one transaction (idempotent by message id)."""
        with transaction(self.conn):
            if self.conn.execute("SELECT 1 FROM processed_messages WHERE message_id = ?", (message_id,)).fetchone():
                log.info("duplicate event %s ignored", message_id)
                return
            self.conn.execute("INSERT INTO processed_messages(message_id, at) VALUES (?, ?)",
                              (message_id, self.clock()))
            kind = body.get("type")
            handler = {
                "case.seen": self._on_case_seen,
                "step.started": self._on_step_started,
                "step.progress": self._on_step_progress,
                "step.reattached": self._on_step_reattached,
                "step.finished": self._on_step_finished,
                "case.cleaned": self._on_case_cleaned,
                "remote.swept": self._on_remote_swept,
            }.get(kind)
            if handler is None:
                rec.add_event(self.conn, "event.unknown", f"unknown event type {kind!r} ignored")
            else:
                handler(body)
            self._schedule_gpus()
        self._flush_notifications()

    def tick(self) -> None:
        """Housekeeping: re-check incomplete cases, flag old ones, dispatch what became possible."""
        now = self.clock()
        with transaction(self.conn):
            rules = self.cfg.cases
            for case in self.conn.execute(
                "SELECT * FROM cases WHERE state = 'incomplete' AND attention = 0 AND incomplete_since <= ?",
                (now - rules.incomplete_flag_after_seconds,),
            ).fetchall():
                self.conn.execute("UPDATE cases SET attention = 1, updated_at = ? WHERE id = ?", (now, case["id"]))
                rec.add_event(self.conn, "case.flagged", f"incomplete for more than "
                              f"{rules.incomplete_flag_after_seconds:.0f}s: {case['message']}", case_id=case["id"])
                log.warning("case=%s: flagged: %s", case["uid"], case["message"])
            for case in self.conn.execute(
                "SELECT * FROM cases WHERE state = 'incomplete' AND next_check_at <= ?", (now,)
            ).fetchall():
                # re-check quietly: the case stays `incomplete` (no state changes, no events
                # unless what it waits for changed) until the interpreter finds it complete
                self.conn.execute("UPDATE steps SET state = 'pending', max_attempt = attempt + ? "
                                  "WHERE case_id = ? AND step_index = 0 AND beam_number = 0",
                                  (self.steps[0].retry.max_attempts, case["id"]))
                self.conn.execute("UPDATE cases SET next_check_at = NULL WHERE id = ?", (case["id"],))
                first = self.conn.execute("SELECT * FROM steps WHERE case_id = ? AND step_index = 0 AND beam_number = 0",
                                          (case["id"],)).fetchone()
                if first is not None:
                    self._dispatch(case, 0, self.steps[0], first)
            for case in self.conn.execute(
                f"SELECT * FROM cases WHERE state NOT IN ({','.join('?' * len(FINAL))}) AND state != 'incomplete'",
                FINAL,
            ).fetchall():
                self._advance(case["id"])
            self._reconcile_unstarted(now)
            self._reconcile_allocations(now)
            self._schedule_gpus()
            self._apply_retention(now)
            if now - self._last_prune > 3600:
                self._last_prune = now
                horizon = now - BOOKKEEPING_DAYS * 86400
                outbox.prune(self.conn, horizon)
                self.conn.execute("DELETE FROM processed_messages WHERE at < ?", (horizon,))
        self._flush_notifications()

    def _retention_worker(self) -> Optional[str]:
        """The worker that removes a case's copies: the one that moved them (the first
        transfer step's); None in a workflow without transfers."""
        return next((step.worker for step in self.steps if step.direction), None)

    def _apply_retention(self, now: float) -> None:
        """Ask the transfer worker to remove the copies of finished cases that are due, and
        to sweep the remote root for orphans (:mod:`mqi_framework.retention`)."""
        if now - self._last_retention < self.cfg.retention.check_seconds:
            return
        self._last_retention = now
        worker = self._retention_worker()
        if worker is None:
            return
        for row, copies in retention.due(self.conn, self.cfg.retention, FINAL, now):
            self._send(worker, retention.clean_command(self.loaded, row, copies))
            retention.mark_requested(self.conn, row, now)
        sweep_hours = self.cfg.retention.orphan_sweep_hours
        if sweep_hours is not None and now - self._last_sweep >= sweep_hours * 3600:
            body = retention.sweep_command(self.loaded, self.conn, now)
            if body is not None:
                self._last_sweep = now
                self._send(worker, body)

    def _reconcile_unstarted(self, now: float) -> None:
        """A command no worker started within every lease and retry it had (dead-lettered,
        or its queue has no worker) fails its attempt, so its GPU is released and the
        step's retry policy applies, instead of holding the case forever. Never while the
        attempt may still start: the grace counts from this conductor's start too (a
        restarted host's workers re-attach and report first), not while events wait in the
        queue (one may be that attempt's start) or while its worker, alive, still has
        commands queued before it; and never without telling the worker: a
        ``cancel_step`` kills the job if it started after all (a late ``step.started`` of
        the attempt is answered with one too, see :meth:`_step_for`)."""
        broker = self.cfg.broker
        grace = broker.lease_seconds * (broker.max_attempts + 1) + 60
        if now - self.started_at < grace:
            return
        rows = self.conn.execute(
            "SELECT s.* FROM steps s JOIN attempts a ON a.step_id = s.id AND a.attempt = s.attempt "
            "WHERE s.job IS NULL AND s.state IN ('dispatched', 'cancelling') AND a.dispatched_at < ?", (now - grace,)
        ).fetchall()
        if not rows or self._events_waiting():
            return
        for row in rows:
            if self._worker_behind(row["worker"], now, grace):
                continue
            message = f"no worker started it within {grace:.0f}s (dead-lettered? see `mqi-host dlq list`)"
            self._cancel_attempt(row, message)
            self._on_step_finished({"type": "step.finished", "step_id": row["id"], "attempt": row["attempt"],
                                    "outcome": "failed", "worker": "conductor", "message": message})

    def _worker_behind(self, worker: Optional[str], now: float, grace: float) -> bool:
        """Whether ``worker`` heartbeats and still has commands waiting in its queue (it is
        busy with earlier work, e.g. a long line of uploads, not lost)."""
        if self.broker is None or not worker:
            return False
        beat = self.conn.execute("SELECT heartbeat_at FROM workers WHERE name = ?", (worker,)).fetchone()
        if beat is None or beat[0] is None or now - beat[0] > grace:
            return False
        try:
            return self.broker.depth(command_queue(worker)) > 0
        except Exception:  # cannot tell: assume it is behind and look again next tick
            return True

    def _events_waiting(self) -> bool:
        if self.broker is None:
            return False
        try:
            return self.broker.depth(EVENTS_QUEUE) > 0
        except Exception as exc:  # cannot tell: wait for a tick that can
            log.warning("cannot read the depth of %s (%s); reconciling later", EVENTS_QUEUE, exc)
            return True

    def relay_outbox(self, limit: int = 500) -> int:
        """Publish unsent outbox rows (each confirmed by the broker), then mark them sent."""
        return 0 if self.broker is None else outbox.relay(self.conn, self.broker, self.clock(), limit)

    # ---------------------------------------------------------------- steering

    def cancel(self, ident: str, *, actor: str = "cli") -> str:
        """Cancel a case: queued work is dropped, running jobs are killed by their workers."""
        with transaction(self.conn):
            case = self._find(ident)
            if case["state"] in FINAL:
                raise ConductorError(f"{case['uid']} is already {case['state']}; nothing to cancel")
            now = self.clock()
            self.conn.execute("UPDATE steps SET state = 'cancelled', finished_at = ? WHERE case_id = ? "
                              "AND state IN ('pending', 'queued', 'waiting')", (now, case["id"]))
            # a beam with no attempt in flight is cancelled now (not left "queued for a GPU")
            for (number,) in self.conn.execute(
                    "SELECT number FROM beams WHERE case_id = ? AND state NOT IN ('done', 'failed', 'cancelled') "
                    "AND number NOT IN (SELECT beam_number FROM steps WHERE case_id = ? "
                    "AND state IN ('dispatched', 'running'))", (case["id"], case["id"])).fetchall():
                self._set_beam(case["id"], number, "cancelled", f"by {actor}, before it ran")
            for row in self.conn.execute("SELECT * FROM steps WHERE case_id = ? AND state IN ('dispatched', 'running')",
                                         (case["id"],)).fetchall():
                self._cancel_attempt(row, f"case cancelled by {actor}")
            self.conn.execute("UPDATE steps SET state = 'cancelling' WHERE case_id = ? "
                              "AND state IN ('dispatched', 'running')", (case["id"],))
            rec.add_event(self.conn, "case.cancel", "cancel requested", case_id=case["id"], actor=actor)
            self._set_case(case, "cancelling", f"cancel requested by {actor}")
            self._advance(case["id"])
            self._schedule_gpus()
            state = self._case(case["id"])["state"]
        self._flush_notifications()
        return state

    def retry(self, ident: str, *, beam: Optional[int] = None, actor: str = "cli") -> str:
        """Run the failed (or cancelled, rejected, incomplete) parts of a case again."""
        with transaction(self.conn):
            case = self._find(ident)
            state = case["state"]
            if state not in ("failed", "cancelled", "rejected", "incomplete"):
                raise ConductorError(f"{case['uid']} is {state}; only failed, cancelled, rejected or incomplete "
                                     f"cases can be retried")
            now = self.clock()
            removed = retention.removed_copies(case)
            if removed and state not in ("rejected", "incomplete") and case["step_index"] != 0:
                # retention removed what later steps need (inputs on the execution side, outputs
                # not yet downloaded, the staged copy): the whole case runs again, from its first step
                if beam is not None:
                    raise ConductorError(f"{case['uid']}'s {' and '.join(removed)} copies were removed by retention; "
                                         "retry the whole case (it runs again from its first step)")
                for row in self.conn.execute("SELECT * FROM steps WHERE case_id = ?", (case["id"],)).fetchall():
                    self.conn.execute("UPDATE steps SET state = 'pending', max_attempt = attempt + ?, "
                                      "next_attempt_at = NULL, message = '' WHERE id = ?",
                                      (self.steps[row["step_index"]].retry.max_attempts, row["id"]))
                self.conn.execute("UPDATE beams SET state = 'pending', message = '', updated_at = ? WHERE case_id = ?",
                                  (now, case["id"]))
                self.conn.execute("UPDATE cases SET step_index = 0, cleaned = '{}' WHERE id = ?", (case["id"],))
                rec.add_event(self.conn, "case.retry", f"its {' and '.join(removed)} copies were removed by "
                              "retention: the case runs again from its first step", case_id=case["id"], actor=actor)
                case = self._case(case["id"])
                state = "rejected"  # from here on: a retry from the first step
            if state in ("rejected", "incomplete") or case["step_index"] == 0:
                if beam is not None:
                    raise ConductorError(f"{case['uid']} has not got its beams yet; retry the whole case")
                self.conn.execute("UPDATE steps SET state = 'pending', max_attempt = attempt + ?, "
                                  "next_attempt_at = NULL WHERE case_id = ? AND step_index = 0",
                                  (self.steps[0].retry.max_attempts, case["id"]))
            else:
                beam_filter, params = "", [case["id"]]
                if beam is not None:
                    if not self.conn.execute("SELECT 1 FROM beams WHERE case_id = ? AND number = ?",
                                             (case["id"], beam)).fetchone():
                        raise ConductorError(f"{case['uid']} has no beam {beam}")
                    beam_filter, params = " AND beam_number = ?", [case["id"], beam]
                for row in self.conn.execute(
                    f"SELECT * FROM steps WHERE case_id = ? AND state IN ('failed', 'cancelled'){beam_filter}", params
                ).fetchall():
                    step = self.steps[row["step_index"]]
                    self.conn.execute("UPDATE steps SET state = 'pending', max_attempt = attempt + ?, "
                                      "next_attempt_at = NULL, message = '' WHERE id = ?",
                                      (step.retry.max_attempts, row["id"]))
                self.conn.execute(f"UPDATE beams SET state = 'pending', message = '', updated_at = ? "
                                  f"WHERE case_id = ? AND state IN ('failed', 'cancelled')"
                                  f"{beam_filter.replace('beam_number', 'number')}", [now] + params)
            self.conn.execute("UPDATE cases SET attention = 0, finished_at = NULL, incomplete_since = NULL, "
                              "next_check_at = NULL, cleaned = '{}' WHERE id = ?", (case["id"],))
            rec.add_event(self.conn, "case.retry", f"retry requested{f' for beam {beam}' if beam else ''}",
                          case_id=case["id"], actor=actor)
            self._set_case(case, "detected" if case["step_index"] == 0 or state in ("rejected", "incomplete")
                           else self.steps[case["step_index"]].label, f"retry requested by {actor}")
            self._advance(case["id"])
            self._schedule_gpus()
            new_state = self._case(case["id"])["state"]
        self._flush_notifications()
        return new_state

    # ================================================================ event handlers

    def _on_case_seen(self, body: dict) -> None:
        name = body["name"]
        if self.conn.execute("SELECT 1 FROM cases WHERE name = ?", (name,)).fetchone():
            return  # a case is never picked up twice
        now = self.clock()
        cur = self.conn.execute(
            "INSERT INTO cases(uid, name, inbox, path, state, detected_at, updated_at, info) "
            "VALUES ('', ?, ?, ?, 'detected', ?, ?, '{}')",
            (name, body["inbox"], body["path"], now, now),
        )
        case_id = cur.lastrowid
        uid = rec.case_uid(case_id)
        self.conn.execute("UPDATE cases SET uid = ? WHERE id = ?", (uid, case_id))
        rec.add_event(self.conn, "case.detected", f"ready ({body.get('reason', '')})", case_id=case_id,
                      actor=body.get("worker", "scan"))
        log.info("case=%s: detected (%s)", uid, body.get("reason", ""))
        self._changes.append((uid, "", "detected", {"reason": body.get("reason", "")}))
        if body.get("problem"):  # a folder that cannot be a case as it is: shown, never run
            self.conn.execute("UPDATE cases SET attention = 1 WHERE id = ?", (case_id,))
            case = self.conn.execute("SELECT * FROM cases WHERE id = ?", (case_id,)).fetchone()
            self._set_case(case, "rejected", str(body["problem"]), final=True)
            return
        self._advance(case_id)

    def _on_case_cleaned(self, body: dict) -> None:
        line = retention.apply_cleaned(self.conn, body, self.clock(), FINAL)
        if line is not None:
            rec.add_event(self.conn, "case.cleaned", line, case_id=body.get("case_id"))

    def _on_remote_swept(self, body: dict) -> None:
        removed, problems = int(body.get("removed") or 0), list(body.get("problems") or [])
        if removed or problems:
            rec.add_event(self.conn, "remote.swept", f"removed {removed} orphaned case folder(s) from the remote root"
                          + (f"; problems: {'; '.join(problems)[:500]}" if problems else ""))

    def _on_step_started(self, body: dict) -> None:
        row = self._step_for(body)
        if row is None:
            return
        now = self.clock()
        new_state = "cancelling" if row["state"] == "cancelling" else "running"
        self.conn.execute("UPDATE steps SET state = ?, job = ?, started_at = COALESCE(started_at, ?) WHERE id = ?",
                          (new_state, json.dumps(body.get("job")) if body.get("job") else None,
                           body.get("at", now), row["id"]))
        self.conn.execute("UPDATE attempts SET started_at = COALESCE(started_at, ?) WHERE step_id = ? AND attempt = ?",
                          (body.get("at", now), row["id"], row["attempt"]))
        if self._case(row["case_id"])["state"] != "incomplete":  # a quiet re-check is not news
            rec.add_event(self.conn, "step.started", f"attempt {row['attempt']}", case_id=row["case_id"],
                          beam=row["beam_number"] or None, step=row["name"], actor=body.get("worker", "worker"))

    def _on_step_reattached(self, body: dict) -> None:
        row = self._step_for(body)
        if row is None:
            return
        rec.add_event(self.conn, "step.reattached", f"attempt {row['attempt']}: its job was found running after a "
                      "restart and re-attached (not started again)", case_id=row["case_id"],
                      beam=row["beam_number"] or None, step=row["name"], actor=body.get("worker", "worker"))

    def _on_step_progress(self, body: dict) -> None:
        row = self._step_for(body, quiet=True)
        if row is None:
            return
        self.conn.execute("UPDATE steps SET progress = ?, progress_text = ? WHERE id = ?",
                          (body.get("progress"), str(body.get("text", ""))[:200], row["id"]))

    def _on_step_finished(self, body: dict) -> None:
        row = self._step_for(body)
        if row is None:
            return
        now = self.clock()
        outcome = body.get("outcome", "failed")
        if outcome == "failed" and body.get("unreachable") and not body.get("permanent"):
            outcome = "unreachable"  # the worker could not reach its host: see "Retries" in docs/concepts.md
        message = str(body.get("message", ""))[:2000]
        exit_code = body.get("exit_code")
        step = self.steps[row["step_index"]]
        beam = row["beam_number"] or None
        had_gpu = rec.release_gpu(self.conn, row["id"])
        self.conn.execute(
            "UPDATE attempts SET finished_at = ?, outcome = ?, exit_code = ?, message = ?, log_tail = ? "
            "WHERE step_id = ? AND attempt = ?",
            (now, outcome, exit_code, message, str(body.get("log_tail", ""))[-4000:], row["id"], row["attempt"]),
        )
        case = self._case(row["case_id"])
        recheck = case["state"] == "incomplete"  # a re-check of a case waiting for deliveries
        if not (recheck and outcome == "incomplete" and message == case["message"]):  # nothing new: no event
            rec.add_event(self.conn, f"step.{outcome}", message or f"attempt {row['attempt']}", case_id=row["case_id"],
                          beam=beam, step=row["name"], actor=body.get("worker", "worker"),
                          data={"exit_code": exit_code, "gpu_released": had_gpu})
        if recheck and outcome != "incomplete":  # complete now (or broken): the case moves on from here
            self._set_case(case, step.label, "")
            case = self._case(row["case_id"])

        if row["state"] == "cancelling" or outcome == "cancelled":
            self._finish_step(row, "cancelled", message or "cancelled", exit_code)
            if beam:
                self._set_beam(row["case_id"], beam, "cancelled", message or "cancelled")
        elif outcome == "ok":
            self._finish_step(row, "done", message, exit_code, progress=1.0)
            if row["step_index"] == 0 and not step.per_beam and self._is_interpreter(step):
                self._apply_plan(case, body.get("data") or {})
            elif beam and row["step_index"] == len(self.steps) - 1:  # its last step: the beam's result is there
                self._set_beam(row["case_id"], beam, "done", "")
            elif beam:  # progress, not a stall: the words say so
                self._set_beam(row["case_id"], beam, "waiting", f"{step.name} done; waiting for the case's other beams")
        elif outcome == "incomplete":
            self._finish_step(row, "pending", message, exit_code)
            data = body.get("data") or {}
            self._record_beams(case, data)
            self.conn.execute(
                "UPDATE cases SET incomplete_since = COALESCE(incomplete_since, ?), next_check_at = ?, info = ? "
                "WHERE id = ?",
                (now, now + self.cfg.cases.incomplete_recheck_seconds, json.dumps(data.get("info", {})), case["id"]),
            )
            self._set_case(case, "incomplete", message)
        elif outcome == "rejected":
            self._finish_step(row, "failed", message, exit_code)
            self.conn.execute("UPDATE cases SET attention = 1 WHERE id = ?", (case["id"],))
            self._set_case(case, "rejected", message, final=True)
        else:  # failed or unreachable: the step's retry policy decides
            decision = retry_policy.decide(self.conn, row, step.retry, outcome=outcome,
                                           permanent=bool(body.get("permanent")), now=now, rng=self.rng)
            if decision.free:  # this attempt does not count against retry.max_attempts
                self.conn.execute("UPDATE steps SET max_attempt = max_attempt + 1 WHERE id = ?", (row["id"],))
            if decision.retry:
                self.conn.execute("UPDATE steps SET state = 'waiting', next_attempt_at = ?, message = ?, exit_code = ?, "
                                  "job = NULL WHERE id = ?", (now + decision.delay, message, exit_code, row["id"]))
                note = f" ({decision.note})" if decision.note else ""
                rec.add_event(self.conn, "step.retry_scheduled",
                              f"attempt {row['attempt'] + 1} in {decision.delay:.1f}s{note}",
                              case_id=row["case_id"], beam=beam, step=row["name"])
                if beam:
                    self._set_beam(row["case_id"], beam, "retrying", message)
            else:
                self._finish_step(row, "failed", message, exit_code)
                if beam:
                    self._set_beam(row["case_id"], beam, "failed", message)
                log.warning("case=%s%s step=%s attempt=%s: failed for good: %s", case["uid"],
                            f" beam={beam}" if beam else "", row["name"], row["attempt"], message)
        self._advance(row["case_id"])

    # ================================================================ the state machine

    def _advance(self, case_id: int) -> None:
        case = self._case(case_id)
        state = case["state"]
        if state in FINAL or state == "incomplete":
            return
        in_flight = self._count_steps(case_id, IN_FLIGHT)
        if state == "cancelling":
            if in_flight == 0:
                self._finalise_beams(case_id, "cancelled", "case cancelled")
                self._set_case(case, "cancelled", "cancelled", final=True)
            return
        index = case["step_index"]
        while index < len(self.steps):
            step = self.steps[index]
            rows = self._ensure_step_rows(case, index, step)
            states = [r["state"] for r in rows]
            if rows and all(s == "done" for s in states):
                index += 1
                self.conn.execute("UPDATE cases SET step_index = ? WHERE id = ?", (index, case_id))
                continue
            if "failed" in states or "cancelled" in states:
                if in_flight == 0:
                    failed = [r for r in rows if r["state"] == "failed"]
                    what = ", ".join(f"beam {r['beam_number']}" if r["beam_number"] else "the case" for r in failed)
                    reason = f"step {step.name} failed for {what or 'the case'}"
                    self._stop_beams_after_failure(case_id, reason)
                    self.conn.execute("UPDATE cases SET attention = 1 WHERE id = ?", (case_id,))
                    self._set_case(self._case(case_id), "failed", reason, final=True)
                else:
                    self._set_case(case, step.label, f"a beam failed; waiting for {in_flight} running step(s)")
                return
            self._set_case(case, step.label, case["message"] if case["state"] == step.label else "")
            now = self.clock()
            for row in rows:
                if row["state"] in ("pending", "queued") or (
                    row["state"] == "waiting" and (row["next_attempt_at"] or 0) <= now
                ):
                    if step.gpu:  # GPUs are handed out across cases by _schedule_gpus, in fair order
                        self._enqueue_for_gpu(case, row)
                    else:
                        self._dispatch(case, index, step, row)
            return
        # every step done for every beam: the case is done
        self._finalise_beams(case_id, "done", "")
        self._set_case(case, "done", "", final=True)

    def _enqueue_for_gpu(self, case: sqlite3.Row, row: sqlite3.Row) -> None:
        if row["state"] != "queued":
            self.conn.execute("UPDATE steps SET state = 'queued' WHERE id = ?", (row["id"],))
            self._set_beam(case["id"], row["beam_number"] or None, "queued", "waiting for a free GPU")

    def _schedule_gpus(self) -> None:
        """Hand free GPUs to queued beams in the order of :func:`records.gpu_queue`
        (fewest GPUs held by the case first, then case arrival, then beam number)."""
        while rec.has_free_gpu(self.conn):
            nxt = rec.gpu_queue(self.conn, limit=1)
            if not nxt:
                return
            row = self.conn.execute("SELECT * FROM steps WHERE id = ?", (nxt[0]["step_id"],)).fetchone()
            case = self._case(row["case_id"])
            self._dispatch(case, row["step_index"], self.steps[row["step_index"]], row)
            if self.conn.execute("SELECT state FROM steps WHERE id = ?", (row["id"],)).fetchone()[0] == "queued":
                return  # no GPU after all (cannot happen inside one transaction; never loop)

    def _reconcile_allocations(self, now: float) -> None:
        """Free GPUs held by steps that are no longer in flight (left by a crash or a hand edit).
        A running step keeps its GPU until its executor reports it: its job may still use it."""
        for gpu in rec.release_orphaned_gpus(self.conn, now - GPU_RECONCILE_GRACE_SECONDS):
            rec.add_event(self.conn, "gpu.reconciled", f"GPU {gpu['host']}:{gpu['idx']} was held by step "
                          f"{gpu['allocated_step']}, which is not in flight: released")
            log.warning("GPU %s:%s was held by step %s, which is not in flight: released", gpu["host"], gpu["idx"],
                        gpu["allocated_step"])

    def _ensure_step_rows(self, case: sqlite3.Row, index: int, step: StepConfig) -> list[sqlite3.Row]:
        numbers = [0]
        if step.per_beam:
            numbers = [r["number"] for r in self.conn.execute(
                "SELECT number FROM beams WHERE case_id = ? AND state != 'missing' ORDER BY number", (case["id"],))]
        for number in numbers:
            self.conn.execute(
                "INSERT OR IGNORE INTO steps(case_id, beam_number, step_index, name, worker, state, max_attempt) "
                "VALUES (?, ?, ?, ?, ?, 'pending', ?)",
                (case["id"], number, index, step.name, step.worker, step.retry.max_attempts),
            )
        return self.conn.execute("SELECT * FROM steps WHERE case_id = ? AND step_index = ? ORDER BY beam_number",
                                 (case["id"], index)).fetchall()

    def _dispatch(self, case: sqlite3.Row, index: int, step: StepConfig, row: sqlite3.Row) -> None:
        beam = row["beam_number"] or None
        gpu = None
        if step.gpu:
            gpu = rec.allocate_gpu(self.conn, row["id"])
            if gpu is None:
                if row["state"] != "queued":
                    self.conn.execute("UPDATE steps SET state = 'queued' WHERE id = ?", (row["id"],))
                    self._set_beam(case["id"], beam, "queued", "waiting for a free GPU")
                return
        attempt = row["attempt"] + 1
        input_rel = None
        if beam:
            found = self.conn.execute("SELECT input_rel FROM beams WHERE case_id = ? AND number = ?",
                                      (case["id"], beam)).fetchone()
            input_rel = found[0] if found is not None else None
        body = command_render.run_step(self.loaded, case, index, step, row["id"], attempt, beam=beam,
                                       input_rel=input_rel, gpu=gpu)
        now = self.clock()
        self.conn.execute(
            "UPDATE steps SET state = 'dispatched', attempt = ?, next_attempt_at = NULL, command = ?, job = NULL, "
            "progress = NULL, progress_text = '', message = '' WHERE id = ?",
            (attempt, json.dumps(body), row["id"]),
        )
        self.conn.execute("INSERT INTO attempts(step_id, attempt, dispatched_at) VALUES (?, ?, ?)",
                          (row["id"], attempt, now))
        self._send(step.worker, body)
        if beam:
            self._set_beam(case["id"], beam, step.label, "")
        if case["state"] != "incomplete":  # a quiet re-check of a waiting case is not news
            rec.add_event(self.conn, "step.dispatched",
                          f"attempt {attempt}" + (f" on GPU {gpu['host']}:{gpu['idx']}" if gpu is not None else ""),
                          case_id=case["id"], beam=beam, step=step.name)

    def _send(self, worker: str, body: dict) -> None:
        outbox.write(self.conn, command_queue(worker), body, self.clock())

    def _cancel_attempt(self, row: sqlite3.Row, reason: str) -> None:
        """Tell the step's worker that its current attempt is given up (``cancel_step``)."""
        if row["command"]:
            self._send(row["worker"], command_render.cancel_step(json.loads(row["command"]), reason))

    # ================================================================ helpers

    def _apply_plan(self, case: sqlite3.Row, data: dict) -> None:
        self._record_beams(case, data)
        inputs = {int(k): v for k, v in (data.get("inputs") or {}).items()}
        for number, rel in inputs.items():
            self.conn.execute("UPDATE beams SET input_rel = ? WHERE case_id = ? AND number = ?",
                              (rel, case["id"], number))
        self.conn.execute("UPDATE cases SET info = ?, incomplete_since = NULL, next_check_at = NULL WHERE id = ?",
                          (json.dumps(data.get("info", {})), case["id"]))

    def _record_beams(self, case: sqlite3.Row, data: dict) -> None:
        now = self.clock()
        missing = set(int(n) for n in data.get("missing", []))
        for beam in data.get("beams", []):
            number = int(beam["number"])
            state = "missing" if number in missing else "pending"
            self.conn.execute(
                "INSERT INTO beams(case_id, number, name, delivery_dir, state, updated_at) VALUES (?,?,?,?,?,?) "
                "ON CONFLICT(case_id, number) DO UPDATE SET name=excluded.name, delivery_dir=excluded.delivery_dir, "
                "state=CASE WHEN beams.state IN ('missing','pending') THEN excluded.state ELSE beams.state END, "
                "updated_at=excluded.updated_at",
                (case["id"], number, str(beam.get("name", "")), beam.get("delivery_dir"), state, now),
            )

    def _finish_step(self, row: sqlite3.Row, state: str, message: str, exit_code: Optional[int],
                     progress: Optional[float] = None) -> None:
        self.conn.execute(
            "UPDATE steps SET state = ?, message = ?, exit_code = ?, finished_at = ?, "
            "progress = COALESCE(?, progress) WHERE id = ?",
            (state, message, exit_code, self.clock() if state != "pending" else None, progress, row["id"]),
        )

    def _stop_beams_after_failure(self, case_id: int, reason: str) -> None:
        """A sibling failed: the other beams stop where they are, and their words say how far
        they got (a beam that simulated is not 'not run', issue 19)."""
        reached = {row["beam_number"]: row["name"] for row in self.conn.execute(
            "SELECT beam_number, name, MAX(step_index) FROM steps WHERE case_id = ? AND beam_number > 0 "
            "AND state = 'done' GROUP BY beam_number", (case_id,))}
        open_beams = [row["number"] for row in self.conn.execute(
            "SELECT number FROM beams WHERE case_id = ? AND state NOT IN ('done', 'failed', 'cancelled', 'missing')",
            (case_id,))]
        for number in open_beams:
            done = reached.get(number)
            message = f"stopped after {done} (done): {reason}" if done else f"not run: {reason}"
            self.conn.execute("UPDATE beams SET state = 'cancelled', message = ?, updated_at = ? "
                              "WHERE case_id = ? AND number = ?", (message, self.clock(), case_id, number))
        self._finalise_beams(case_id, "cancelled", f"not run: {reason}")

    def _finalise_beams(self, case_id: int, state: str, message: str) -> None:
        self.conn.execute(
            "UPDATE beams SET state = ?, message = ?, updated_at = ? WHERE case_id = ? "
            "AND state NOT IN ('done', 'failed', 'cancelled', 'missing')",
            (state, message, self.clock(), case_id),
        )
        self.conn.execute("UPDATE steps SET state = 'cancelled' WHERE case_id = ? "
                          "AND state IN ('pending', 'queued', 'waiting')", (case_id,))

    def _set_case(self, case: sqlite3.Row, state: str, message: str, *, final: bool = False) -> None:
        old = case["state"]
        if old == state and case["message"] == message:
            return
        now = self.clock()
        self.conn.execute("UPDATE cases SET state = ?, message = ?, updated_at = ?, "
                          "finished_at = CASE WHEN ? THEN ? ELSE finished_at END WHERE id = ?",
                          (state, message, now, 1 if final else 0, now, case["id"]))
        if old != state:
            rec.add_event(self.conn, "case.state", f"{old} -> {state}" + (f": {message}" if message else ""),
                          case_id=case["id"], actor=self.actor)
            log.info("case=%s: %s -> %s%s", case["uid"], old, state, f" ({message})" if message else "")
            self._changes.append((case["uid"], old, state, {"reason": message}))

    def _set_beam(self, case_id: int, number: Optional[int], state: str, message: str) -> None:
        if number:
            self.conn.execute("UPDATE beams SET state = ?, message = ?, updated_at = ? WHERE case_id = ? AND number = ?",
                              (state, message, self.clock(), case_id, number))

    def _count_steps(self, case_id: int, states: tuple[str, ...]) -> int:
        return self.conn.execute(
            f"SELECT COUNT(*) FROM steps WHERE case_id = ? AND state IN ({','.join('?' * len(states))})",
            (case_id, *states),
        ).fetchone()[0]

    def _is_interpreter(self, step: StepConfig) -> bool:
        return self.loaded.worker_kind(step.worker) == "interpreter"

    def _case(self, case_id: int) -> sqlite3.Row:
        return self.conn.execute("SELECT * FROM cases WHERE id = ?", (case_id,)).fetchone()

    def _find(self, ident: str) -> sqlite3.Row:
        case = rec.find_case(self.conn, ident)
        if case is None:
            raise ConductorError(f"no case {ident!r} (see `mqi-host cases`)")
        return case

    def _step_for(self, body: dict, *, quiet: bool = False) -> Optional[sqlite3.Row]:
        row = self.conn.execute("SELECT * FROM steps WHERE id = ?", (body.get("step_id"),)).fetchone()
        if row is None:
            rec.add_event(self.conn, "event.orphan", f"event for unknown step {body.get('step_id')!r} ignored")
            return None
        if row["attempt"] != body.get("attempt") or row["state"] not in IN_FLIGHT:
            if not quiet:
                rec.add_event(self.conn, "event.stale",
                              f"{body.get('type')} of attempt {body.get('attempt')} ignored "
                              f"(step is {row['state']} at attempt {row['attempt']})",
                              case_id=row["case_id"], beam=row["beam_number"] or None, step=row["name"])
            if body.get("type") == "step.started" and body.get("job"):
                self._cancel_stale_job(row, body)
            return None
        return row

    def _cancel_stale_job(self, row: sqlite3.Row, body: dict) -> None:
        """A job started for an attempt this conductor has given up (a start reported late,
        after a restart): it must not run beside the attempt that replaced it, on a GPU that
        may be someone else's now. Its worker is told to kill it."""
        worker = body.get("worker") or row["worker"]
        if not worker or worker == "conductor":
            return
        job = body.get("job") or {}
        reason = (f"attempt {body.get('attempt')} was given up before its start was reported; "
                  f"its job is killed so that it does not run beside attempt {row['attempt']}")
        self._send(worker, command_render.cancel_step(
            {"step_id": row["id"], "attempt": body.get("attempt"), "job_key": job.get("job_key"),
             "step": row["name"], "beam": row["beam_number"] or None, "worker": worker}, reason))
        rec.add_event(self.conn, "step.stale_job_killed", reason, case_id=row["case_id"],
                      beam=row["beam_number"] or None, step=row["name"])
        log.warning("%s: %s", logfields.fields(self._case(row["case_id"])["uid"], row["beam_number"], row["name"],
                                               body.get("attempt"), job.get("job_key")), reason)

    def _flush_notifications(self) -> None:
        changes, self._changes = self._changes, []
        if self.notify is None:
            return
        for uid, old, new, info in changes:
            try:
                self.notify(case_id=uid, old_state=old, new_state=new, info=info)
            except Exception:  # an observer must never break the conductor
                log.exception("mqi_case_state_changed hook failed for %s", uid)
