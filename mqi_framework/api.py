"""The host's operations: one public API for the CLI, the dashboard, examples and site plugins.

A :class:`Host` is one workspace (its config, state database and broker). Reads return
plain, JSON-ready data and never show case folder names (which may be patient ids)
unless asked with ``show_names=True``; actions (retry, cancel, dead-letter replay and
purge) exist only here, so each is applied, written to the audit log with the person who
asked, and notified (``mqi_case_state_changed``) exactly once, whichever front end asked::

    from mqi_framework.api import Host

    with Host.open("mqi.yaml", actor="cli:alice") as host:
        for case in host.cases(state="failed"):
            host.retry(case["id"])

Front ends that hold their own read connection (one per request, :meth:`Host.new_reader`)
call the read models directly: ``mqi_framework.api.views`` (:mod:`mqi_framework.store.views`).

A ``Host`` holds one read-only connection for reads, opens a writing one per action,
and opens the broker on first use; it is meant for one thread at a time (the dashboard
makes one per worker thread or request).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from mqi_framework.config import LoadedConfig, load_config
from mqi_framework.kinds import EVENTS_QUEUE, command_queue
from mqi_framework.store import StoreError, views
from mqi_framework.store.records import FINAL_CASE_STATES
from mqi_framework.workspace import fast_config, write_workspace

__all__ = [
    "ActionRefused", "CaseNotFound", "EVENTS_QUEUE", "FINAL_CASE_STATES", "Host", "RETRYABLE_CASE_STATES",
    "StoreError", "WorkspaceBusy", "command_queue", "fast_config", "load_config", "views", "write_workspace",
]

#: case states a retry accepts
RETRYABLE_CASE_STATES = ("failed", "cancelled", "rejected", "incomplete")


class WorkspaceBusy(Exception):
    """Another host runs on this workspace (it holds ``<workspace>/host.lock``)."""


class CaseNotFound(LookupError):
    """No case has that id (or folder name, where names may be used)."""


class ActionRefused(Exception):
    """A retry or cancel that cannot be applied to the case as it is; the message says why."""


class Host:
    """One host workspace: its config, state database and broker (see the module docstring)."""

    def __init__(self, loaded: LoadedConfig, *, actor: str = "api", plugin_host: Any = None) -> None:
        self.stopped_because: Optional[str] = None
        self.loaded = loaded
        self.actor = actor
        self._plugin_host = plugin_host
        self._reader: Optional[sqlite3.Connection] = None
        self._broker: Any = None

    @classmethod
    def open(cls, config_path: "Path | str", *, actor: str = "api", plugin_host: Any = None) -> "Host":
        """The host of the config file at ``config_path`` (raises ConfigError naming every problem)."""
        return cls(load_config(Path(config_path)), actor=actor, plugin_host=plugin_host)

    def __enter__(self) -> "Host":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the read connection and the broker (the Host can be used again afterwards)."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._broker is not None:
            self._broker.close()
            self._broker = None

    # ------------------------------------------------------------------ where things are

    @property
    def workspace(self) -> Path:
        """The workspace folder (inbox, staging, results, logs are under it by default)."""
        return self.loaded.workspace

    @property
    def database_path(self) -> Path:
        """The state database."""
        return self.loaded.database_path

    def queue_names(self) -> list[str]:
        """The queues this host uses: events, then one per enabled worker that takes commands."""
        return [EVENTS_QUEUE] + [command_queue(name) for name in self.loaded.consuming_workers()]

    def workflow_states(self) -> list[str]:
        """The case states of the workflow's steps, in order (``preparing``, ``uploading``, ...)."""
        return [step.label for step in self.loaded.config.workflow.steps]

    def plugin_context(self, worker: Optional[str]) -> Any:
        """The :class:`~mqi_framework.protocols.PluginContext` a plugin of ``worker`` gets."""
        from mqi_framework.worker import plugin_context

        return plugin_context(self.loaded, worker)

    @property
    def plugin_host(self) -> Any:
        """The plugin manager whose hooks this host calls (the process-wide one by default)."""
        if self._plugin_host is None:
            from mqi_framework.plugins import get_plugin_host

            self._plugin_host = get_plugin_host()
        return self._plugin_host

    # ------------------------------------------------------------------ state and broker access

    def reader(self) -> sqlite3.Connection:
        """The read-only connection to the state database (``PRAGMA query_only``), for the
        functions of :mod:`mqi_framework.store.views` that a page or report needs."""
        if self._reader is None:
            self._reader = self.new_reader()
        return self._reader

    def new_reader(self) -> sqlite3.Connection:
        """A new read-only connection the caller owns and closes (one per thread or request;
        :meth:`reader` is this Host's own). Raises ``StoreError`` when the database is missing."""
        from mqi_framework.store import connect

        conn = connect(self.database_path, readonly=True)
        conn.execute("PRAGMA query_only = 1")
        return conn

    def broker(self) -> Any:
        """The configured broker (opened on first use; it knows every queue of the host)."""
        if self._broker is None:
            from mqi_framework.worker import make_broker

            self._broker = make_broker(self.loaded)
        return self._broker

    # ------------------------------------------------------------------ reads

    def find_case(self, ident: str, *, by_name: bool = False) -> sqlite3.Row:
        """The case row for ``case-000042`` (or ``42``); by folder name only with ``by_name``
        (a front end that hides names must not let anyone probe for a patient id)."""
        row = views.find_case_row(self.reader(), ident, show_names=by_name)
        if row is None:
            raise CaseNotFound(f"no case {ident!r} (see `mqi-host cases`; cases are named case-000042)")
        return row

    def cases(self, *, state: Optional[str] = None, show_names: bool = False) -> list[dict]:
        """Every case, oldest first, with its beams (``id``, ``state``, ``message``, ``beams``...)."""
        return views.list_cases(self.reader(), state=state, show_names=show_names)

    def case_page(self, **query: Any) -> dict:
        """One page of cases, newest first (see :func:`mqi_framework.store.views.case_page`)."""
        return views.case_page(self.reader(), **query)

    def case(self, ident: str, *, show_names: bool = False, by_name: bool = False,
             events_limit: Optional[int] = 300) -> dict:
        """One case: beams, steps with every attempt and GPU, and its newest events."""
        return views.case_detail(self.reader(), self.find_case(ident, by_name=by_name), show_names=show_names,
                                 events_limit=events_limit)

    def case_summary(self, ident: str, *, show_names: bool = False, by_name: bool = False) -> dict:
        """One case with its beams, as in :meth:`cases`."""
        return views.case_summary(self.reader(), self.find_case(ident, by_name=by_name), show_names=show_names)

    def case_states(self) -> list[str]:
        """Every case state worth offering as a filter."""
        return views.case_states(self.reader(), self.workflow_states())

    def events(self, *, limit: int = 100, before: Optional[int] = None, people_only: bool = False,
               show_names: bool = False) -> list[dict]:
        """The audit log, newest first."""
        return views.events(self.reader(), limit=limit, before=before, people_only=people_only,
                            show_names=show_names)

    def overview(self, *, show_names: bool = False) -> dict:
        """Counts, throughput, cases needing attention, GPUs and workers at a glance."""
        return views.overview(self.reader(), show_names=show_names)

    def gpus(self) -> list[dict]:
        """Every GPU the curators saw, with the case, beam and step holding it."""
        return views.gpus(self.reader())

    def gpu_history(self, since: float) -> dict[str, list[dict]]:
        """``"host:index"`` -> readings since ``since``."""
        return views.gpu_history(self.reader(), since=since)

    def gpu_queue(self) -> list[dict]:
        """Beams waiting for a GPU, in the order they will get one."""
        from mqi_framework.store import records

        return records.gpu_queue(self.reader())

    def workers(self) -> list[dict]:
        """Every worker process: state, pid, heartbeat age, restarts."""
        return views.workers(self.reader())

    def queues(self) -> list[Any]:
        """Every queue of the host with its depth and dead letters
        (:class:`~mqi_framework.broker.QueueStats`), idle ones included."""
        from mqi_framework.broker import QueueStats

        stats = list(self.broker().queues())
        known = {q.queue for q in stats}
        stats += [QueueStats(q, 0, 0, 0, 0, 0) for q in self.queue_names() if q not in known]
        return sorted(stats, key=lambda q: q.queue)

    def dead_letters(self, queue: Optional[str] = None) -> list[Any]:
        """Dead-lettered messages, oldest first (:class:`~mqi_framework.broker.DeadLetter`)."""
        return self.broker().dlq_list(queue)

    def dead_letter_resolutions(self, letters: list[Any]) -> list[Optional[str]]:
        """For each of ``letters``, why it no longer matters (``resolved: case case-000042 is
        done``), or None while it may (:func:`mqi_framework.store.views.dead_letter_resolutions`)."""
        if not letters:
            return []
        try:
            return views.dead_letter_resolutions(self.reader(), [d.body for d in letters])
        except StoreError:  # no state database here (a broker shared with another workspace)
            return [None] * len(letters)

    def redact_names(self, texts: list[str]) -> list[str]:
        """``texts`` with every case folder name in them replaced by ``[case folder]``
        (:func:`mqi_framework.store.views.redact_known_names`): for free texts such as
        dead-letter reasons, shown unless the user asked for names."""
        try:
            return views.redact_known_names(self.reader(), texts)
        except StoreError:  # no state database: no case, so no name to hide
            return list(texts)

    def host_pid(self) -> Optional[int]:
        """The pid of the ``mqi-host run`` that holds this workspace's lock, None when no host
        runs. Read from the kernel's lock table: asking never takes the lock, so it cannot
        stop a host that is starting."""
        lock = self.workspace / "host.lock"
        try:
            st = lock.stat()
            table = Path("/proc/locks").read_text()
        except OSError:
            return None
        for line in table.splitlines():
            parts = line.split()
            # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
            if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5].rsplit(":", 1)[-1] == str(st.st_ino):
                return int(parts[4])
        return None

    def status(self) -> dict:
        """What ``mqi-host status`` shows: whether the host runs, cases by state, workers, GPUs,
        the GPU queue, queues."""
        conn = self.reader()
        counts = views.counts_by_state(conn, "cases")
        attention = conn.execute("SELECT COUNT(*) FROM cases WHERE attention = 1").fetchone()[0]
        queues = self.queues()
        pid = self.host_pid()
        return {"host": {"running": pid is not None, "pid": pid}, "cases": counts, "attention": attention,
                "workers": self.workers(), "gpus": self.gpus(), "gpu_queue": self.gpu_queue(),
                "queues": {q.queue: q.depth for q in queues}, "dead_letters": sum(q.dead for q in queues)}

    # ------------------------------------------------------------------ actions

    def retry(self, ident: str, *, beam: Optional[int] = None, actor: Optional[str] = None,
              by_name: bool = False) -> str:
        """Run the failed, cancelled, rejected or incomplete parts of a case (or of one beam)
        again; return the case's new state. Raises :class:`ActionRefused` for a case that
        cannot be retried (done, running), :class:`CaseNotFound` for an unknown one."""
        uid = self.find_case(ident, by_name=by_name)["uid"]
        return self._steer(lambda c: c.retry(uid, beam=beam, actor=actor or self.actor))

    def cancel(self, ident: str, *, actor: Optional[str] = None, by_name: bool = False) -> str:
        """Cancel a case that is still running (its jobs are killed, its GPUs freed); return its
        new state (``cancelling`` until the jobs are gone, then ``cancelled``)."""
        uid = self.find_case(ident, by_name=by_name)["uid"]
        return self._steer(lambda c: c.cancel(uid, actor=actor or self.actor))

    def replay_dead_letters(self, ids: Optional[Sequence[str]] = None, *, actor: Optional[str] = None) -> list[str]:
        """Put dead letters (``None``: all) back on their queues; return the ids replayed."""
        return self._dead_letter_action("replay", ids, actor or self.actor)

    def purge_dead_letters(self, ids: Optional[Sequence[str]] = None, *, actor: Optional[str] = None) -> list[str]:
        """Delete dead letters (``None``: all); return the ids purged."""
        return self._dead_letter_action("purge", ids, actor or self.actor)

    def backup(self, target: "Path | str") -> Path:
        """A consistent copy of the state database at ``target`` (a file, or a folder for
        ``state-<UTC time>.db``), safe while the host runs; returns the file written."""
        from mqi_framework.store import backup

        target = Path(target)
        if target.is_dir():
            target = target / time.strftime("state-%Y%m%dT%H%M%SZ.db", time.gmtime())
        return backup(self.database_path, target)

    # ------------------------------------------------------------------ running the host

    def run_supervised(self, *, until: Any = None, poll_seconds: float = 0.5,
                       extra_env: Optional[dict] = None, on_start: Any = None) -> int:
        """Run the conductor and every enabled worker as supervised processes, as
        ``mqi-host run`` does, until SIGTERM/Ctrl-C or until ``until()`` returns true; return
        the exit code (2 when a worker could not run for a configuration reason, which
        ``stopped_because`` then says). ``on_start(log_dir)`` is called once the processes are started.
        Raises ``WorkspaceBusy`` when another host runs on this workspace."""
        from mqi_framework import host as process_host

        host = process_host.ProcessHost(self.loaded, extra_env=extra_env)
        try:
            host.lock()
        except process_host.WorkspaceBusy as exc:
            raise WorkspaceBusy(str(exc)) from None
        if on_start is not None:
            on_start(host.log_dir)
        code = host.run_forever(until=until, poll_seconds=poll_seconds)
        self.stopped_because = host.fatal
        return code

    @property
    def log_dir(self) -> Path:
        """Where the host's processes write their logs."""
        return self.workspace_path(self.loaded.config.logging.directory)

    def workspace_path(self, value: str) -> Path:
        """``value`` resolved against the workspace."""
        return self.loaded.workspace_path(value)

    # ------------------------------------------------------------------ internals

    @contextlib.contextmanager
    def _writer(self) -> Iterator[sqlite3.Connection]:
        from mqi_framework.store import open_state

        conn = open_state(self.database_path)
        try:
            yield conn
        finally:
            conn.close()

    def _steer(self, call: Any) -> str:
        from mqi_framework.conductor import Conductor, ConductorError

        with self._writer() as conn:
            conductor = Conductor(self.loaded, conn, actor=self.actor, notify=self.notifier(conn))
            try:
                return call(conductor)
            except ConductorError as exc:
                raise ActionRefused(str(exc)) from None

    def notifier(self, conn: sqlite3.Connection) -> Any:
        """The ``notify`` callable the conductor calls after a committed state change: it
        completes ``info`` with the case's beams (``{number: state}``) and calls
        ``mqi_case_state_changed`` on every plugin, each on its own."""

        def notify(*, case_id: str, old_state: str, new_state: str, info: dict) -> None:
            beams = {r[0]: r[1] for r in conn.execute(
                "SELECT b.number, b.state FROM beams b JOIN cases c ON c.id = b.case_id WHERE c.uid = ? "
                "ORDER BY b.number", (case_id,))}
            self.plugin_host.notify("mqi_case_state_changed", case_id=case_id, old_state=old_state,
                                    new_state=new_state, info={**info, "beams": beams})

        return notify

    def _dead_letter_action(self, action: str, ids: Optional[Sequence[str]], actor: str) -> list[str]:
        from mqi_framework.store import records, transaction

        broker = self.broker()
        letters = {d.id: d for d in broker.dlq_list()}
        targets = list(letters.values()) if ids is None else [letters[i] for i in ids if i in letters]
        if not targets:
            return []
        chosen = [d.id for d in targets]
        (broker.dlq_replay if action == "replay" else broker.dlq_purge)(chosen)
        with self._writer() as conn, transaction(conn):
            for d in targets:
                body = d.body if isinstance(d.body, dict) else {}
                uid = body.get("case") if isinstance(body.get("case"), str) else None
                found = conn.execute("SELECT id FROM cases WHERE uid = ?", (uid,)).fetchone() if uid else None
                step = body.get("step") if isinstance(body.get("step"), str) else None
                records.add_event(
                    conn, f"dlq.{action}", f"dead letter {d.id} ({body.get('type') or 'command'} on {d.queue}"
                    f"{', step ' + step if step else ''}) {action}ed",
                    case_id=found[0] if found else None, beam=body.get("beam") if isinstance(body.get("beam"), int)
                    else None, step=step, actor=actor,
                    data={"dead_letter": d.id, "queue": d.queue, "message_id": d.message_id, "at": time.time()})
        return chosen
