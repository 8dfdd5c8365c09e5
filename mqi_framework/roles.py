"""What each kind of worker does with its plugin: the adapters between broker messages and
plugin calls. The runtime (:mod:`mqi_framework.worker`) drives a role: ``handle()`` for each
command message, ``tick()`` every ``interval_seconds``.

Every role reports back with events on ``mqi.events``; the conductor owns the state, and a
role never reads the conductor's tables: a command carries what the role needs
(:mod:`mqi_framework.command_render`), and what a role must remember across a restart is in
its worker's own ledger (:mod:`mqi_framework.ledger`). Two commands reach a role:
``run_step`` and ``cancel_step``. A ``run_step`` whose attempt was cancelled first (a
tombstone in the ledger) is dropped and reported cancelled, never run; one whose attempt
this worker already finished (a re-delivery) is dropped.

What a worker still writes into the state database is its own: its heartbeat row
(``workers``, see :mod:`mqi_framework.host`) and, for a curator, its GPU readings
(``resources``).
"""

from __future__ import annotations

import logging
import posixpath
import time
from pathlib import Path
from typing import Any, Callable, Optional

import attrs

from mqi_framework import logfields, protocols as p, retention
from mqi_framework.files import remove_tree
from mqi_framework.limits import measure_case
from mqi_framework.names import name_problem, printable
from mqi_framework.safepath import is_within

log = logging.getLogger(__name__)

Report = Callable[..., None]


def fields(body: dict) -> str:
    """The structured prefix of every log line about a step (:func:`logfields.from_command`)."""
    return logfields.from_command(body)


PermanentError = p.PermanentError  # retrying cannot help: the step fails at once


class Role:
    """Base: takes no commands, does nothing on a tick."""

    def __init__(self, runtime: Any, impl: p.Plugin) -> None:
        self.runtime = runtime
        self.impl = impl
        self.report: Report = runtime.report

    @property
    def ledger(self) -> Any:
        return self.runtime.ledger

    def handle(self, body: dict) -> None:
        """One command: ``run_step`` runs (:meth:`run`), ``cancel_step`` gives an attempt up."""
        kind = body.get("type", "run_step")
        if kind == "cancel_step":
            self.cancel(body)
        elif kind == "run_step":
            if self.accept(body):
                self.run(body)
        else:
            raise PermanentError(f"worker {self.runtime.name} does not know commands of type {kind!r}")

    def run(self, body: dict) -> None:  # pragma: no cover - roles that consume override it
        raise PermanentError(f"worker {self.runtime.name} does not take commands")

    def tick(self) -> None:
        pass

    def close(self) -> None:
        pass

    # -- helpers shared by command-taking roles

    def accept(self, body: dict) -> bool:
        """True when the ``run_step`` should run: not cancelled, not already finished here."""
        step_id, attempt = body["step_id"], body["attempt"]
        if self.ledger.is_cancelled(step_id, attempt):
            self.finished(body, "cancelled", "cancelled before it started")
            return False
        if self.ledger.is_finished(step_id, attempt):
            log.info("%s: dropped: this attempt was already run and reported here", fields(body))
            return False
        return True

    def cancel(self, body: dict) -> None:
        """A ``cancel_step``: remember it, so that its ``run_step`` is never run, and report
        the attempt cancelled (the worker is not running it: it takes one message at a time)."""
        step_id, attempt = body["step_id"], body["attempt"]
        self.ledger.cancel(step_id, attempt)
        if not self.ledger.is_finished(step_id, attempt):
            self.finished(body, "cancelled", "cancelled before it started")

    def begin(self, body: dict, **extra: Any) -> None:
        """Report the start of an accepted command."""
        self.report("step.started", step_id=body["step_id"], attempt=body["attempt"], at=time.time(), **extra)
        log.info("%s: started", fields(body))

    def finished(self, body: dict, outcome: str, message: str = "", **extra: Any) -> None:
        """Report the attempt's final outcome, then remember that it was reported."""
        self.report("step.finished", step_id=body["step_id"], attempt=body["attempt"], outcome=outcome,
                    message=message, **extra)
        self.ledger.finish(body["step_id"], body["attempt"], outcome)
        (log.info if outcome == "ok" else log.warning)("%s: %s%s", fields(body), outcome,
                                                          f" ({message})" if message else "")


class ScanRole(Role):
    """Announces ready case folders once (the conductor deduplicates by folder name, too);
    the names announced are remembered in the ledger, so a restart does not repeat them."""

    def __init__(self, runtime: Any, impl: p.Scanner) -> None:
        super().__init__(runtime, impl)
        self.announced: set[str] = self.ledger.announced()

    def tick(self) -> None:
        listed: list[str] = []
        for candidate in self.impl.scan():
            name = printable(candidate.case_id)  # the name as it can be stored and shown
            listed.append(name)
            problem = candidate.problem or name_problem(candidate.case_id)
            if name in self.announced or not (candidate.ready or problem):
                continue
            try:
                self.report("case.seen", name=name, path=printable(candidate.path), inbox=printable(candidate.inbox),
                            reason=candidate.reason, problem=problem)
            except Exception:  # one folder that cannot be announced never stops the others
                log.exception("a case folder of %s could not be announced", printable(candidate.inbox))
                continue
            self.ledger.announce(name)
            self.announced.add(name)
        if self.announced - set(listed):  # folders gone from the inbox: forget their names
            self.ledger.forget_except(listed)
            self.announced &= set(listed)


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

    def run(self, body: dict) -> None:
        self.begin(body)
        case_dir = Path(body["case_path"])
        inbox = Path(body["inbox"])
        if case_dir.is_symlink() or not is_within(inbox, case_dir) or not case_dir.is_dir():
            self.finished(body, "rejected", "the case folder is missing or lies outside its inbox (symlink?)")
            return
        try:
            self._check_size(case_dir)
            outcome, message, data = self._prepare(case_dir, body)
        except p.CaseRejected as exc:
            outcome, message, data = "rejected", str(exc), {}
        self.finished(body, outcome, message, data=data)

    def _check_size(self, case_dir: Path) -> None:
        """Reject a case over ``cases.max_case_bytes`` / ``max_case_files`` before the
        interpreter reads or copies anything of it."""
        rules = self.runtime.loaded.config.cases
        try:
            size = measure_case(case_dir, rules.max_case_bytes, rules.max_case_files)
        except OSError as exc:
            raise p.CaseRejected(f"the case folder cannot be read in full ({exc.strerror or type(exc).__name__}); "
                                 "fix its permissions, then retry the case") from None
        if size.over:
            raise p.CaseRejected(f"{size.over}: remove what does not belong to the case (or raise the "
                                 "limit in mqi.yaml), then retry the case")

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
        # which preparation this is, for interpreters whose inputs depend on it (a new
        # random seed when a case runs again from its first step)
        plan = attrs.evolve(plan, info={**plan.info, "prepare_attempt": int(body.get("attempt", 1))})
        inputs = self.impl.prepare(case_dir, plan, staging, body["remote_dir"])
        data["inputs"] = {str(k): v for k, v in inputs.items()}
        return "ok", f"{len(plan.beams)} treatment beam(s) prepared", data


class TransferRole(Role):
    """Uploads the staging tree or downloads results, reporting progress; removes the
    copies of finished cases and sweeps the remote root when the conductor says so
    (:mod:`mqi_framework.retention`)."""

    def handle(self, body: dict) -> None:
        kind = body.get("type")
        if kind == "clean_case":
            self._clean(body)
        elif kind == "sweep_remote":
            self._sweep(body)
        else:
            super().handle(body)

    def _clean(self, body: dict) -> None:
        uid = str(body.get("case", ""))
        if not retention.CASE_UID.match(uid):
            raise PermanentError(f"clean_case for {printable(uid)!r}: not a case id; nothing removed")
        removed, missing, unsupported, problems = [], [], [], []
        for copy in body.get("remove") or []:
            where = body.get(f"{copy}_dir")
            if copy not in retention.COPIES or not where or posixpath.basename(str(where).rstrip("/")) != uid:
                problems.append(f"{copy}: refused to remove {printable(str(where))!r} (not the case's folder)")
                continue
            try:
                found = self.impl.remove(where) if copy == "remote" else remove_tree(where)
            except NotImplementedError:
                unsupported.append(copy)
                continue
            except Exception as exc:  # noqa: BLE001 - an unreachable host, a permission: asked again later
                problems.append(f"{copy}: {type(exc).__name__}: {printable(str(exc))[:300]}")
                continue
            (removed if found else missing).append(copy)
        log.info("case=%s: retention removed %s%s", uid, ", ".join(removed) or "nothing",
                 f" (problems: {'; '.join(problems)})" if problems else "")
        self.report("case.cleaned", case_id=body.get("case_id"), case=uid, removed=removed, missing=missing,
                    unsupported=unsupported, problems=problems)

    def _sweep(self, body: dict) -> None:
        root, keep = str(body["remote_root"]), set(body.get("keep") or [])
        older_than = float(body["older_than"])
        removed, problems = 0, []
        try:
            folders = self.impl.list_remote(root)
        except NotImplementedError:
            return
        except Exception as exc:  # noqa: BLE001 - an unreachable host: the next sweep tries again
            log.info("remote sweep skipped: %s: %s", type(exc).__name__, printable(str(exc))[:300])
            return
        for folder in folders:
            if not retention.CASE_UID.match(folder.name) or folder.name in keep or folder.mtime > older_than:
                continue
            try:
                self.impl.remove(posixpath.join(root, folder.name))
                removed += 1
            except Exception as exc:  # noqa: BLE001 - the next sweep tries again
                problems.append(f"{folder.name}: {type(exc).__name__}: {printable(str(exc))[:200]}")
        if removed or problems:
            log.info("remote sweep: removed %d orphaned case folder(s)%s", removed,
                     f" (problems: {'; '.join(problems)})" if problems else "")
        self.report("remote.swept", removed=removed, problems=problems)

    def run(self, body: dict) -> None:
        self.begin(body)
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
    """Starts jobs detached and remembers them in the ledger, then polls them on every tick
    until each is final; after a restart it re-attaches to the ledger's open jobs. A
    ``cancel_step`` kills the attempt's job if it runs."""

    #: seconds between two tries to confirm an unanswered start (doubling up to the cap)
    CONFIRM_FIRST_SECONDS = 1.0
    CONFIRM_MAX_SECONDS = 30.0

    def __init__(self, runtime: Any, impl: p.Executor) -> None:
        super().__init__(runtime, impl)
        self.interpreter: Optional[p.Interpreter] = None
        self.last_progress: dict[tuple[int, int], float] = {}
        self.confirm_at: dict[tuple[int, int], tuple[float, float]] = {}  # (when, backoff)
        #: attempts whose job this process started or has announced as re-attached
        self.attached: set[tuple[int, int]] = set()

    def _interpreter(self) -> p.Interpreter:
        if self.interpreter is None:
            self.interpreter = self.runtime.build_interpreter()
        return self.interpreter

    def run(self, body: dict) -> None:
        known = self.ledger.job(body["step_id"], body["attempt"])
        if known is not None:  # a re-delivery of a command whose job runs: tell its start again
            self._started(body, known[1], again=True)
            return
        self.ledger.job_starting(body)  # a death between start and job_started is not "never started"
        try:
            handle = self.impl.start(self._spec(body))  # idempotent by job key: a second start re-attaches
        except p.StartUnconfirmed as exc:
            self._unconfirmed(body, exc)
            return
        self.ledger.job_started(body, handle)
        self._started(body, handle)

    def _unconfirmed(self, body: dict, exc: BaseException) -> None:
        """The start's answer was lost: the job may run. Not a failed attempt (a new attempt
        could run the beam twice): the start is asked again, with the same job key, on the
        coming ticks (:meth:`confirm_starts`)."""
        key = (body["step_id"], body["attempt"])
        _, backoff = self.confirm_at.get(key, (0.0, self.CONFIRM_FIRST_SECONDS / 2))
        backoff = min(self.CONFIRM_MAX_SECONDS, backoff * 2)
        self.confirm_at[key] = (time.monotonic() + backoff, backoff)
        log.warning("%s: start unconfirmed (%s): asking again with the same job key in %.0fs", fields(body), exc,
                    backoff)

    def confirm_starts(self) -> None:
        """Ask again for every start whose answer was lost (the job may run): a job that
        started is re-attached (and killed, if its attempt was cancelled meanwhile)."""
        for body in self.ledger.unconfirmed_starts():
            key = (body["step_id"], body["attempt"])
            if time.monotonic() < self.confirm_at.get(key, (0.0, 0.0))[0]:
                continue
            try:
                handle = self.impl.start(self._spec(body))
            except (ConnectionError, TimeoutError) as exc:  # still no answer: later
                self._unconfirmed(body, exc)
                continue
            self.confirm_at.pop(key, None)
            self.ledger.job_started(body, handle)
            if self.ledger.is_cancelled(body["step_id"], body["attempt"]):
                self._kill(body, handle)
            else:
                self._started(body, handle, again=True)

    @staticmethod
    def _spec(body: dict) -> p.JobSpec:
        return p.JobSpec(job_key=body["job_key"], command=body["command"], workdir=body["workdir"],
                         timeout=body.get("timeout"), env=dict(body.get("env") or {}), gpu=body.get("gpu"))

    def _started(self, body: dict, handle: p.JobHandle, *, again: bool = False) -> None:
        self.attached.add((body["step_id"], body["attempt"]))
        self.report("step.started", step_id=body["step_id"], attempt=body["attempt"], at=time.time(),
                    job={"executor": handle.executor, "job_key": handle.job_key, "data": handle.data})
        log.info("%s: job %s %s", fields(body), handle.job_key, "still runs" if again else "started detached")

    def cancel(self, body: dict) -> None:
        known = self.ledger.job(body["step_id"], body["attempt"])
        if known is None:
            run = self.ledger.starting(body["step_id"], body["attempt"])
            if run is None:
                super().cancel(body)
                return
            # the start of this attempt was never answered (this worker died before it
            # recorded the handle, or the answer was lost): the job may run. Re-attaching by
            # job key finds it (or starts it, to be killed at once); while its host does not
            # answer, the tombstone stays and confirm_starts kills it when it does
            log.warning("%s: cancelled while its start was unconfirmed: re-attaching to kill it", fields(body))
            self.ledger.cancel(body["step_id"], body["attempt"])
            try:
                handle = self.impl.start(self._spec(run))
            except (ConnectionError, TimeoutError) as exc:
                self._unconfirmed(run, exc)
                return
            self.ledger.job_started(run, handle)
            self._kill(run, handle)
            return
        self.ledger.cancel(body["step_id"], body["attempt"])
        self._kill(*known)

    def _kill(self, body: dict, handle: p.JobHandle) -> None:
        self.impl.kill(handle)
        self._final(body, "cancelled", "killed on cancel", handle)

    def tick(self) -> None:
        self.confirm_starts()
        for body, handle in self.ledger.open_jobs():
            if self.ledger.is_cancelled(body["step_id"], body["attempt"]):
                self._kill(body, handle)  # a kill that failed when the cancel came is tried again
                continue
            try:
                status = self.impl.poll(handle)
            except p.PermanentError as exc:  # e.g. the host's key changed: asking again cannot help
                self._final(body, "failed", f"{printable(str(exc))[:500]} (the job could not be asked about or "
                            "killed; it may still run there)", handle, permanent=True)
                continue
            if status.state == "running":
                self._announce_reattached(body, handle)
                self._progress(body, handle)
                continue
            if status.state == "lost":
                self._final(body, "failed", f"job lost: {status.message}", handle)
                continue
            outcome, message, permanent = self.judge(body, handle, status)
            self._final(body, outcome, message, handle, exit_code=status.exit_code, permanent=permanent)

    def _not_runnable(self, handle: p.JobHandle, code: int) -> str:
        """Exit 127 (command not found) or 126 (not executable) with the shell's own line: the
        same command fails the same way on every attempt, so it is not retried."""
        lines = self.impl.read_log(handle, 16384).splitlines()
        said = next((line.strip() for line in reversed(lines)
                     if "not found" in line or "No such file" in line or "Permission denied" in line), "")
        what = "the command's program was not found" if code == 127 else "the command's program cannot be run"
        return f"exit code {code}: {what}" + (f" ({printable(said)[:300]})" if said else "") + \
            "; install it or fix the step's command (mqi-host check probes it), then retry the case"

    def _announce_reattached(self, body: dict, handle: p.JobHandle) -> None:
        """A job started before this worker process (it restarted, or the host did) and is
        still running: say so once, so that the case's audit log shows the re-attachment."""
        key = (body["step_id"], body["attempt"])
        if key in self.attached:
            return
        self.attached.add(key)
        self.report("step.reattached", step_id=body["step_id"], attempt=body["attempt"], job_key=handle.job_key)
        log.info("%s: job %s found running after a restart: re-attached", fields(body), handle.job_key)

    def judge(self, body: dict, handle: p.JobHandle, status: p.JobStatus) -> tuple[str, str, bool]:
        """Exit code AND log together decide: a non-zero exit is never success, nor is a log
        that shows a failure. Returns (outcome, message, permanent): a failure the log calls
        permanent (the same input fails the same way) is not retried."""
        if status.timed_out:
            return "failed", f"timed out after {body.get('timeout')}s; process group killed", False
        verdict = None
        if body.get("log_rules"):
            verdict = self._interpreter().parse_log(self.impl.read_log(handle, 262144))
        permanent = verdict is not None and verdict.outcome == "failure" and verdict.permanent
        if status.exit_code in (126, 127):  # the shell found no program to run, or could not run it
            return "failed", self._not_runnable(handle, status.exit_code), True
        if status.exit_code != 0:
            detail = f": {verdict.message}" if verdict is not None and verdict.message else ""
            detail += f" ({status.message})" if status.message else ""
            return "failed", f"exit code {status.exit_code}{detail}", permanent
        if verdict is not None and verdict.outcome != "success":
            return ("failed", f"exit code 0 but the log does not show success"
                              f"{': ' + verdict.message if verdict.message else ''}", permanent)
        missing = self.impl.missing_outputs(list(body.get("outputs") or []))
        if missing:
            return "failed", "expected output missing: " + ", ".join(missing), False
        return "ok", "exit code 0" + (" and the log shows success" if verdict is not None else ""), False

    def _progress(self, body: dict, handle: p.JobHandle) -> None:
        now = time.monotonic()
        key = (body["step_id"], body["attempt"])
        if now - self.last_progress.get(key, 0.0) < 1.0:
            return
        self.last_progress[key] = now
        reported = self.impl.progress(handle)
        if reported is None and body.get("log_rules"):
            verdict = self._interpreter().parse_log(self.impl.read_log(handle, 16384))
            if verdict.progress is not None:
                reported = (verdict.progress, verdict.message)
        if reported is not None:
            self.report("step.progress", step_id=body["step_id"], attempt=body["attempt"], progress=reported[0],
                        text=reported[1])

    def _final(self, body: dict, outcome: str, message: str, handle: p.JobHandle, exit_code: Optional[int] = None,
               permanent: bool = False) -> None:
        tail = ""
        try:
            tail = self.impl.read_log(handle, 2048)
        except Exception:  # the log is a courtesy; the verdict is already made
            log.debug("could not read log tail", exc_info=True)
        extra = {"permanent": True} if permanent else {}
        self.finished(body, outcome, message, exit_code=exit_code, log_tail=tail, **extra)
        self.last_progress.pop((body["step_id"], body["attempt"]), None)
