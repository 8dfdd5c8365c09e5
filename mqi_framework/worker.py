"""The worker runtime: consume → call the plugin (through its role) → report → ack, with
heartbeats and a graceful drain on SIGTERM. The conductor runs in the same runtime.

A message is acked only after its result was reported (the report is a durable,
confirmed publish). Retries (``docs/concepts.md``, "Retries"): a step command whose
handler raises is a failed attempt, reported at once as ``step.finished outcome=failed``
(``permanent`` for a :class:`~mqi_framework.protocols.PermanentError`, ``unreachable`` for
a :class:`ConnectionError`) and acked; the conductor's step retry policy decides what
follows. The broker redelivers only a message whose worker died holding it (lease expiry)
or could not report (the broker was away), and dead-letters it after
``broker.max_attempts`` deliveries. Each worker keeps its own ledger
(:mod:`mqi_framework.ledger`); it reads nothing of the conductor's tables.
"""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import time
import traceback
import uuid
from typing import Any, Optional

from mqi_framework import plugins, protocols as p
from mqi_framework.logfields import from_command as command_fields
from mqi_framework.broker import open_broker
from mqi_framework.broker.base import Broker, BrokerUnavailable, Delivery, RetryPolicy
from mqi_framework.config import LoadedConfig
from mqi_framework.conductor import Conductor
from mqi_framework.heartbeat import Heartbeat
from mqi_framework.kinds import EVENTS_QUEUE, KINDS, command_queue
from mqi_framework.ledger import Ledger, ledger_path
from mqi_framework.names import printable, without_case_folder
from mqi_framework.store import open_state
from mqi_framework.store import records as rec

log = logging.getLogger(__name__)

CONDUCTOR = "conductor"


def make_broker(loaded: LoadedConfig) -> Broker:
    """The configured broker. It knows the host's queues (events + one per worker) so that
    ``dlq_list()`` finds every dead letter on RabbitMQ too."""
    b = loaded.config.broker
    return open_broker(
        loaded.broker_url,
        retry=RetryPolicy(max_attempts=b.max_attempts, base_seconds=b.retry_base_seconds,
                          max_seconds=b.retry_max_seconds),
        lease_seconds=b.lease_seconds,
        prefix=b.queue_prefix,
        queues=[EVENTS_QUEUE] + [command_queue(name) for name in loaded.config.workers],
    )


def plugin_context(loaded: LoadedConfig, worker: Optional[str]) -> p.PluginContext:
    return p.PluginContext(workspace=loaded.workspace, worker=worker, config_path=loaded.path,
                           state_db=loaded.database_path, broker_url=loaded.broker_url,
                           remote_root=loaded.remote_root)


def build_worker_plugin(loaded: LoadedConfig, name: str, host: Optional[plugins.PluginHost] = None) -> p.Plugin:
    """Instantiate the plugin of ``workers.<name>`` with its validated settings."""
    wc = loaded.config.workers[name]
    return plugins.build(loaded.worker_kind(name), wc.plugin, wc.settings, plugin_context(loaded, name),
                         config_key=f"workers.{name}", plugin_host=host, lines=loaded.lines,
                         source=str(loaded.path) if loaded.path else None)


class WorkerRuntime:
    """Runs one worker (or the conductor) until SIGTERM/SIGINT or :meth:`stop`."""

    def __init__(self, loaded: LoadedConfig, name: str, *, plugin_host: Optional[plugins.PluginHost] = None) -> None:
        self.loaded = loaded
        self.name = name
        self.plugin_host = plugin_host or plugins.get_plugin_host()
        self.stopping = False
        self.conn: sqlite3.Connection = open_state(loaded.database_path)
        self.broker = make_broker(loaded)
        self.heartbeat_every = loaded.config.supervision.heartbeat_seconds
        self._beat: Optional[Heartbeat] = None
        self._last_tick = 0.0
        self._current: Optional[Delivery] = None
        self._current_since = 0.0
        self.role: Any = None
        self._ledger: Optional[Ledger] = None
        self.conductor: Optional[Conductor] = None
        if name == CONDUCTOR:
            self.kind = CONDUCTOR
            self.queue: Optional[str] = EVENTS_QUEUE
            self.interval = loaded.config.supervision.tick_seconds
            self.conductor = Conductor(loaded, self.conn, broker=self.broker, notify=self._notify)
        else:
            if name not in loaded.config.workers:
                raise plugins.PluginError(f"no worker named {name!r} in the config "
                                          f"(defined: {', '.join(loaded.config.workers)})")
            self.kind = loaded.worker_kind(name)
            self.impl = build_worker_plugin(loaded, name, self.plugin_host)
            self.role = KINDS[self.kind].role_class()(self, self.impl)
            self.queue = command_queue(name) if KINDS[self.kind].consumes else None
            self.interval = loaded.config.workers[name].interval_seconds

    @property
    def ledger(self) -> Ledger:
        """This worker's own ledger (``<workspace>/workers/<name>.db``), opened on first use."""
        if self._ledger is None:
            self._ledger = Ledger(ledger_path(self.loaded.workspace, self.name))
        return self._ledger

    # ---------------------------------------------------------------- reporting

    def report(self, event_type: str, **fields: Any) -> None:
        """Publish an event for the conductor (returns once the broker confirmed it)."""
        body = {"type": event_type, "worker": self.name, **fields}
        self.broker.publish(EVENTS_QUEUE, body, message_id=uuid.uuid4().hex)

    def heartbeat(self, *, force: bool = False, state: str = "running") -> None:
        """Show that this worker is alive: a mark in memory that the heartbeat thread writes
        (:mod:`mqi_framework.heartbeat`); ``force`` writes the row now, with ``state``."""
        if self._beat is not None:
            self._beat.alive()
        if force:
            rec.worker_state(self.conn, self.name, self.kind, pid=os.getpid(), state=state)

    def build_interpreter(self) -> p.Interpreter:
        return build_worker_plugin(self.loaded, self.loaded.interpreter_worker(), self.plugin_host)  # type: ignore

    def _notify(self, **kwargs: Any) -> None:
        self.plugin_host.notify("mqi_case_state_changed", **kwargs)

    # ---------------------------------------------------------------- loop

    def stop(self, *_: Any) -> None:
        if not self.stopping:
            log.info("%s: draining (finishing the current message, then stopping)", self.name)
        self.stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        log.info("%s (%s) started, pid %d", self.name, self.kind, os.getpid())
        self.heartbeat(force=True)
        self._beat = Heartbeat(self.loaded.database_path, self.name, self.kind, self.heartbeat_every)
        self._beat.start()
        try:
            while not self.stopping:
                self.step_once()
        finally:
            self._beat.stop()
            self.heartbeat(force=True, state="stopped")
            self.close()
        log.info("%s stopped", self.name)
        return 0

    def step_once(self, wait: float = 0.2) -> None:
        """One turn of the loop: tick when due, then handle at most one message."""
        self.heartbeat()
        now = time.monotonic()
        if now - self._last_tick >= self.interval:
            self._last_tick = now
            self._tick()
        if self.queue is None:
            time.sleep(min(wait, self.interval))
            return
        delivery = self.broker.get(self.queue, timeout=wait)
        if delivery is not None:
            self._handle(delivery)

    def _tick(self) -> None:
        try:
            if self.conductor is not None:
                self.conductor.tick()
                self.conductor.relay_outbox()
            else:
                self.role.tick()
        except BrokerUnavailable as exc:  # the broker is away: what was not sent is sent on a later tick
            log.warning("%s: %s; trying again in %.1fs", self.name, exc, self.interval)
        except Exception:
            log.exception("%s: periodic work failed; trying again in %.1fs", self.name, self.interval)

    def _handle(self, delivery: Delivery) -> None:
        self._current, self._current_since = delivery, time.monotonic()
        try:
            if self.conductor is not None:
                self.conductor.handle_event(delivery.body, delivery.message_id)
            else:
                self.role.handle(delivery.body)
        except Exception as exc:
            self._failed(delivery, exc)
            return
        finally:
            self._current = None
        self.broker.ack(delivery)
        if self.conductor is not None:
            try:
                self.conductor.relay_outbox()
            except BrokerUnavailable as exc:  # the outbox keeps the commands; the next tick relays them
                log.warning("%s: relaying the outbox failed (%s); will retry", self.name, exc)
            except Exception:  # the outbox keeps the commands; the next tick relays them
                log.exception("%s: relaying the outbox failed; will retry", self.name)

    def _failed(self, delivery: Delivery, exc: Exception) -> None:
        """A handler raised. A step command: the attempt failed, reported now and acked (the
        step's retry policy decides). Anything else, or a report that could not be sent:
        nacked, for the broker to redeliver with backoff and dead-letter in the end."""
        from mqi_framework.safepath import PathEscapeError

        body = delivery.body
        # a path that would leave its root stays such a path: retrying cannot help
        permanent = isinstance(exc, (p.PermanentError, PathEscapeError))
        # exception texts often carry the case folder's path, and its name may be a patient id
        reason = printable(without_case_folder(f"{type(exc).__name__}: {exc}", body.get("case_path")))
        if (self.conductor is None and not isinstance(exc, BrokerUnavailable) and body.get("type") == "run_step"
                and "step_id" in body and "attempt" in body):
            unreachable = isinstance(exc, ConnectionError) and not permanent
            if unreachable:
                log.warning("%s: %s failed: %s", self.name, command_fields(body), reason)
            else:
                log.error("%s: %s failed: %s\n%s", self.name, command_fields(body), reason,
                          "".join(traceback.format_tb(exc.__traceback__)).rstrip())
            try:
                self.role.finished(body, "failed", reason, permanent=permanent, unreachable=unreachable)
            except Exception as report_exc:  # could not report: the broker redelivers, the next try reports
                log.warning("%s: reporting the failure failed (%s); the command is redelivered", self.name, report_exc)
            else:
                self.broker.ack(delivery)
                return
        else:
            # the frames, not the exception's text (that is `reason`, redacted)
            frames = "".join(traceback.format_tb(exc.__traceback__))
            log.error("%s: handling %s failed (delivery %d): %s\n%s", self.name, body.get("type"), delivery.attempt,
                      reason, frames.rstrip())
        try:
            self.broker.nack(delivery, reason=reason, retry=not permanent)
        except BrokerUnavailable as nack_exc:  # the lease runs out and the broker redelivers
            log.warning("%s: nack failed (%s); the lease will expire", self.name, nack_exc)

    def keep_alive(self) -> None:
        """Heartbeat and, during a long message (a big transfer), extend its broker lease
        (on RabbitMQ: service the connection's heartbeats, at least every 10 s)."""
        self.heartbeat()
        lease = self.loaded.config.broker.lease_seconds
        if self._current is not None and time.monotonic() - self._current_since > min(lease / 2, 10.0):
            self.broker.extend(self._current, lease)
            self._current_since = time.monotonic()

    def close(self) -> None:
        for closer in (getattr(self.role, "close", None), getattr(getattr(self, "impl", None), "close", None),
                       self.broker.close, self._ledger.close if self._ledger is not None else None):
            if closer is None:
                continue
            try:
                closer()
            except Exception:
                log.exception("%s: error while closing", self.name)
