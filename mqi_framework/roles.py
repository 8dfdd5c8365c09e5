"""What each kind of worker does with its plugin: the adapters between broker messages and
plugin calls. The runtime (:mod:`mqi_framework.worker`) drives a role: ``handle()`` for each
command message, ``tick()`` every ``interval_seconds``.

Every role reports back with events on ``mqi.events``; the conductor owns the state.
A command whose step was cancelled or superseded meanwhile is dropped, never run.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional

from mqi_framework import protocols as p
from mqi_framework.safepath import is_within

log = logging.getLogger(__name__)

Report = Callable[..., None]


def fields(body: dict) -> str:
    """The structured prefix of every log line about a step: case, beam, step, attempt."""
    beam = f" beam={body['beam']}" if body.get("beam") else ""
    return f"case={body.get('case')}{beam} step={body.get('step')} attempt={body.get('attempt')}"


PermanentError = p.PermanentError  # retrying cannot help: the step fails at once


class Role:
    """Base: no queue, no tick."""

    consumes = False

    def __init__(self, runtime: Any, impl: p.Plugin) -> None:
        self.runtime = runtime
        self.impl = impl
        self.report: Report = runtime.report

    def handle(self, body: dict) -> None:  # pragma: no cover - roles that consume override it
        raise PermanentError(f"worker {self.runtime.name} does not take commands")

    def tick(self) -> None:
        pass

    def close(self) -> None:
        pass

    # -- helpers shared by command-taking roles

    def current_state(self, body: dict) -> Optional[str]:
        """The step's state if the command is still its current attempt, else None."""
        row = self.runtime.conn.execute("SELECT state, attempt FROM steps WHERE id = ?", (body["step_id"],)).fetchone()
        if row is None or row["attempt"] != body["attempt"]:
            return None
        return row["state"]

    def accept(self, body: dict) -> bool:
        """True when the command should run; reports cancellation of a cancelled step."""
        state = self.current_state(body)
        if state in ("dispatched", "running"):
            return True
        if state == "cancelling":
            self.finished(body, "cancelled", "cancelled before it started")
        else:
            log.info("%s: superseded command dropped (step is %s now)", fields(body), state)
        return False

    def begin(self, body: dict, **extra: Any) -> bool:
        """Accept the command and report its start; False when it must not run."""
        if not self.accept(body):
            return False
        self.report("step.started", step_id=body["step_id"], attempt=body["attempt"], at=time.time(), **extra)
        log.info("%s: started", fields(body))
        return True

    def finished(self, body: dict, outcome: str, message: str = "", **extra: Any) -> None:
        self.report("step.finished", step_id=body["step_id"], attempt=body["attempt"], outcome=outcome,
                    message=message, **extra)
        (log.info if outcome == "ok" else log.warning)("%s: %s%s", fields(body), outcome,
                                                          f" ({message})" if message else "")


class ScanRole(Role):
    """Announces ready case folders (the conductor deduplicates by folder name)."""

    def __init__(self, runtime: Any, impl: p.Scanner) -> None:
        super().__init__(runtime, impl)
        self.announced: set[str] = set()

    def tick(self) -> None:
        known = {r[0] for r in self.runtime.conn.execute("SELECT name FROM cases")}
        for candidate in self.impl.scan():
            if not candidate.ready or candidate.case_id in known or candidate.case_id in self.announced:
                continue
            self.report("case.seen", name=candidate.case_id, path=str(candidate.path), inbox=str(candidate.inbox),
                        reason=candidate.reason)
            self.announced.add(candidate.case_id)


class CurateRole(Role):
    """Writes GPU readings into the resources table."""

    def tick(self) -> None:
        from mqi_framework.store import records, transaction

        readings = self.impl.observe()
        with transaction(self.runtime.conn):
            records.record_gpu_readings(self.runtime.conn, self.impl.name + ":" + self.runtime.name, readings,
                                        history_spacing=self.impl.history_spacing_seconds,
                                        history_keep=self.impl.history_keep_seconds)


class ArchiveRole(Role):
    """Runs the archiver on an APScheduler interval."""

    def __init__(self, runtime: Any, impl: p.Archiver) -> None:
        super().__init__(runtime, impl)
        from mqi_framework.archive_schedule import start_archive_scheduler

        interval = getattr(impl.settings, "interval_seconds", None) or impl.default_interval_seconds
        self.scheduler = start_archive_scheduler(impl, runtime.loaded.database_path, interval)

    def close(self) -> None:
        from mqi_framework.archive_schedule import stop_archive_scheduler

        stop_archive_scheduler(self.scheduler)


class ServiceRole(Role):
    """Runs a service's ``serve(stop)`` in a thread; a service that dies ends the worker."""

    def __init__(self, runtime: Any, impl: p.Service) -> None:
        import threading

        super().__init__(runtime, impl)
        self.stop = threading.Event()
        self.failure: Optional[BaseException] = None

        def target() -> None:
            try:
                impl.serve(self.stop)
            except BaseException as exc:  # reported by tick(); the host restarts the worker
                self.failure = exc
                log.exception("service %s failed", runtime.name)

        self.thread = threading.Thread(target=target, name=f"service-{runtime.name}", daemon=True)
        self.thread.start()

    def tick(self) -> None:
        if not self.thread.is_alive() and not self.stop.is_set():
            raise SystemExit(f"service {self.runtime.name} stopped: {self.failure!r}")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


class PrepareRole(Role):
    """Interprets a case folder and writes the per-beam inputs into staging."""

    consumes = True

    def handle(self, body: dict) -> None:
        if not self.begin(body):
            return
        case_dir = Path(body["case_path"])
        inbox = Path(body["inbox"])
        if case_dir.is_symlink() or not is_within(inbox, case_dir) or not case_dir.is_dir():
            self.finished(body, "rejected", "the case folder is missing or lies outside its inbox (symlink?)")
            return
        try:
            outcome, message, data = self._prepare(case_dir, body)
        except p.CaseRejected as exc:
            outcome, message, data = "rejected", str(exc), {}
        self.finished(body, outcome, message, data=data)

    def _prepare(self, case_dir: Path, body: dict) -> tuple[str, str, dict]:
        plan = self.impl.interpret(case_dir)
        data: dict[str, Any] = {
            "beams": [{"number": b.number, "name": b.name, "delivery_dir": b.delivery_dir} for b in plan.beams],
            "missing": list(plan.missing),
            "info": dict(plan.info),
        }
        if plan.missing:
            return "incomplete", f"waiting for delivery of beam(s) {', '.join(map(str, sorted(plan.missing)))}", data
        staging = Path(body["staging_dir"])
        staging.mkdir(parents=True, exist_ok=True)
        inputs = self.impl.prepare(case_dir, plan, staging, body["remote_dir"])
        data["inputs"] = {str(k): v for k, v in inputs.items()}
        return "ok", f"{len(plan.beams)} treatment beam(s) prepared", data


class TransferRole(Role):
    """Uploads the staging tree or downloads results, reporting progress."""

    consumes = True

    def handle(self, body: dict) -> None:
        if not self.begin(body):
            return
        last = [0.0]

        def progress(pr: p.TransferProgress) -> None:
            self.runtime.keep_alive()
            now = time.monotonic()
            if now - last[0] >= 0.5 or pr.files_done == pr.files_total:
                last[0] = now
                fraction = pr.bytes_done / pr.bytes_total if pr.bytes_total else None
                self.report("step.progress", step_id=body["step_id"], attempt=body["attempt"], progress=fraction,
                            text=f"{pr.files_done}/{pr.files_total} files, {pr.bytes_done}/{pr.bytes_total} bytes")

        if body["direction"] == "upload":
            result = self.impl.upload(Path(body["staging_dir"]), body["remote_dir"], progress)
        else:
            result = self.impl.download(body["remote_dir"], Path(body["results_dir"]), progress)
        self.finished(body, "ok", f"{result.files} file(s), {result.bytes} bytes, {result.skipped} already there",
                      data={"files": result.files, "bytes": result.bytes, "skipped": result.skipped})


class ExecuteRole(Role):
    """Starts jobs detached, then polls them on every tick; re-attaches after a restart."""

    consumes = True

    def __init__(self, runtime: Any, impl: p.Executor) -> None:
        super().__init__(runtime, impl)
        self.interpreter: Optional[p.Interpreter] = None
        self.started: dict[int, tuple[dict, p.JobHandle]] = {}  # jobs whose start the conductor may not know yet
        self.reported: set[tuple[int, int]] = set()
        self.last_progress: dict[int, float] = {}

    def _interpreter(self) -> p.Interpreter:
        if self.interpreter is None:
            self.interpreter = self.runtime.build_interpreter()
        return self.interpreter

    def handle(self, body: dict) -> None:
        if not self.accept(body):
            return
        spec = p.JobSpec(job_key=body["job_key"], command=body["command"], workdir=body["workdir"],
                         timeout=body.get("timeout"), env=dict(body.get("env") or {}), gpu=body.get("gpu"))
        handle = self.impl.start(spec)
        self.started[body["step_id"]] = (body, handle)
        self.report("step.started", step_id=body["step_id"], attempt=body["attempt"], at=time.time(),
                    job={"executor": handle.executor, "job_key": handle.job_key, "data": handle.data})
        log.info("%s: job %s started detached", fields(body), handle.job_key)

    def _running(self) -> dict[int, tuple[dict, p.JobHandle, str]]:
        jobs: dict[int, tuple[dict, p.JobHandle, str]] = {}
        rows = self.runtime.conn.execute(
            "SELECT id, attempt, state, command, job FROM steps WHERE worker = ? AND job IS NOT NULL "
            "AND state IN ('running', 'cancelling')", (self.runtime.name,)).fetchall()
        for row in rows:
            job = json.loads(row["job"])
            jobs[row["id"]] = (json.loads(row["command"]), p.JobHandle(job["executor"], job["job_key"], job["data"]),
                               row["state"])
        for step_id, (body, handle) in list(self.started.items()):
            state = self.current_state(body)
            if state is None or state not in ("dispatched", "running", "cancelling"):
                self.started.pop(step_id)
                continue
            if state != "dispatched":
                self.started.pop(step_id)  # the conductor knows it now: the query above covers it
            jobs.setdefault(step_id, (body, handle, state))
        return jobs

    def tick(self) -> None:
        for step_id, (body, handle, state) in self._running().items():
            key = (step_id, body["attempt"])
            if key in self.reported:
                continue
            if state == "cancelling":
                self.impl.kill(handle)
                self._final(body, "cancelled", "killed on cancel", handle)
                continue
            status = self.impl.poll(handle)
            if status.state == "running":
                self._progress(body, handle)
                continue
            if status.state == "lost":
                self._final(body, "failed", f"job lost: {status.message}", handle)
                continue
            outcome, message = self.judge(body, handle, status)
            self._final(body, outcome, message, handle, exit_code=status.exit_code)

    def judge(self, body: dict, handle: p.JobHandle, status: p.JobStatus) -> tuple[str, str]:
        """Exit code AND log together decide: a non-zero exit is never success."""
        if status.timed_out:
            return "failed", f"timed out after {body.get('timeout')}s; process group killed"
        verdict = None
        if body.get("log_rules"):
            verdict = self._interpreter().parse_log(self.impl.read_log(handle, 262144))
        if status.exit_code != 0:
            detail = f": {verdict.message}" if verdict is not None and verdict.message else ""
            detail += f" ({status.message})" if status.message else ""
            return "failed", f"exit code {status.exit_code}{detail}"
        if verdict is not None and verdict.outcome != "success":
            return "failed", f"exit code 0 but the log does not show success{': ' + verdict.message if verdict.message else ''}"
        missing = self.impl.missing_outputs(list(body.get("outputs") or []))
        if missing:
            return "failed", "expected output missing: " + ", ".join(missing)
        return "ok", "exit code 0" + (" and the log shows success" if verdict is not None else "")

    def _progress(self, body: dict, handle: p.JobHandle) -> None:
        now = time.monotonic()
        if now - self.last_progress.get(body["step_id"], 0.0) < 1.0:
            return
        self.last_progress[body["step_id"]] = now
        reported = self.impl.progress(handle)
        if reported is None and body.get("log_rules"):
            verdict = self._interpreter().parse_log(self.impl.read_log(handle, 16384))
            if verdict.progress is not None:
                reported = (verdict.progress, verdict.message)
        if reported is not None:
            self.report("step.progress", step_id=body["step_id"], attempt=body["attempt"], progress=reported[0],
                        text=reported[1])

    def _final(self, body: dict, outcome: str, message: str, handle: p.JobHandle, exit_code: Optional[int] = None) -> None:
        tail = ""
        try:
            tail = self.impl.read_log(handle, 2048)
        except Exception:  # the log is a courtesy; the verdict is already made
            log.debug("could not read log tail", exc_info=True)
        self.finished(body, outcome, message, exit_code=exit_code, log_tail=tail)
        self.reported.add((body["step_id"], body["attempt"]))
        self.started.pop(body["step_id"], None)
        self.last_progress.pop(body["step_id"], None)


ROLE_BY_KIND: dict[str, type[Role]] = {
    "scanner": ScanRole,
    "curator": CurateRole,
    "archiver": ArchiveRole,
    "interpreter": PrepareRole,
    "transfer": TransferRole,
    "executor": ExecuteRole,
    "service": ServiceRole,
}

