"""The ``nvidia-smi`` curator: reads the GPUs of every configured host and says which may
take a beam now.

Each host is read on its own APScheduler interval job (``interval_seconds``), so a slow or
hanging host never delays the others nor the worker's heartbeat; :meth:`observe` returns
the latest reading of every host. A host whose command fails, times out, or has not
answered for three intervals reports every GPU it had as unhealthy (with the reason).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import attrs

from mqi_framework.protocols import Curator, GpuReading, PluginContext
from mqi_framework.toolkit import require_ssh_plugin
from mqi_gpu.nvidia_smi import QUERY_ARGS, SmiGpu, parse
from mqi_gpu.runner import CommandResult, CommandRunner, LocalRunner, PluginMissing, SshRunner

log = logging.getLogger(__name__)


@attrs.frozen
class GpuHostSettings:
    """One GPU host. ``name`` is what the GPUs are recorded under (``host:index``) and must
    be the host name the executor runs beams on. Without ``ssh`` the command runs locally."""

    name: str = "localhost"  # GPUs are recorded as ``<name>:<index>``; the executor's name for the host
    ssh: Optional[dict[str, Any]] = None  # connection settings of mqi-ssh (hostname, port, user, ...)
    command: str = "nvidia-smi"  # path of nvidia-smi on that host
    exclude: list[int] = attrs.field(factory=list)  # GPU indices never given a beam (e.g. a display GPU)


def _hosts_default() -> list[GpuHostSettings]:
    return [GpuHostSettings()]


@attrs.frozen
class NvidiaSmiSettings:
    """Settings of the ``nvidia-smi`` curator."""

    #: the GPU hosts to read; default: this machine only (one host ``localhost`` without ``ssh``)
    hosts: list[GpuHostSettings] = attrs.field(factory=_hosts_default)
    min_free_memory_mb: int = 2048  # a GPU with less free memory takes no beam
    max_utilization_pct: int = 20  # a GPU busier than this takes no beam (unknown utilisation: not judged)
    timeout_seconds: float = 10.0  # nvidia-smi running longer is killed; the host's GPUs become unhealthy
    interval_seconds: float = 5.0  # how often each host is read (0: on every worker tick, in the tick)
    history_interval_seconds: float = 60.0  # one history row per GPU this often (charts)
    history_keep_hours: float = 168.0  # history older than this is pruned


@attrs.define
class HostState:
    """What the curator last knew about one host."""

    readings: list[GpuReading] = attrs.field(factory=list)
    known: dict[int, GpuReading] = attrs.field(factory=dict)  # last good reading per index
    at: float = 0.0  # time.monotonic() of the last completed read
    problem: str = ""
    partial: str = ""  # a non-zero exit that still listed GPUs (one GPU's handle unreadable)


class NvidiaSmiCurator(Curator):
    """GPUs from ``nvidia-smi --query-gpu=...`` on one or more hosts."""

    name = "nvidia-smi"
    settings_class = NvidiaSmiSettings

    def __init__(self, settings: Optional[NvidiaSmiSettings], context: PluginContext) -> None:
        super().__init__(settings or NvidiaSmiSettings(), context)
        s = self.settings
        self.history_spacing_seconds = s.history_interval_seconds
        self.history_keep_seconds = s.history_keep_hours * 3600.0
        self._lock = threading.Lock()
        self._state: dict[str, HostState] = {h.name: HostState() for h in s.hosts}
        self._runners: dict[str, CommandRunner] = {}
        self._scheduler: Any = None

    # ------------------------------------------------------------------ checks

    def check(self) -> list[str]:
        s = self.settings
        problems = []
        if not s.hosts:
            problems.append("hosts: list at least one GPU host")
        names = [h.name for h in s.hosts]
        for dup in sorted({n for n in names if names.count(n) > 1}):
            problems.append(f"hosts: {dup!r} is listed twice")
        if s.timeout_seconds <= 0:
            problems.append(f"timeout_seconds must be positive, got {s.timeout_seconds}")
        if not 0 <= s.max_utilization_pct <= 100:
            problems.append(f"max_utilization_pct must be 0..100, got {s.max_utilization_pct}")
        if problems:
            return problems
        for host in s.hosts:
            try:
                runner = self._runner(host)
            except PluginMissing as exc:
                problems.append(f"host {host.name}: {exc}")
                continue
            readings, problem = self.read_host(host)
            if problem:
                problems.append(f"host {host.name}: {problem}")
            elif not readings:
                problems.append(f"host {host.name}: nvidia-smi {runner.where} lists no GPU")
        return problems

    # ------------------------------------------------------------------ reading

    def _runner(self, host: GpuHostSettings) -> CommandRunner:
        runner = self._runners.get(host.name)
        if runner is None:
            if host.ssh is not None:
                require_ssh_plugin()  # fail now, with the message saying how to install it
                runner = SshRunner(host.name, host.ssh)
            else:
                runner = LocalRunner()
            self._runners[host.name] = runner
        return runner

    def read_host(self, host: GpuHostSettings) -> tuple[list[GpuReading], str]:
        """Run nvidia-smi on ``host`` now; return its readings and a problem ('' when fine).

        Never raises: a failing, hanging or missing command is a problem, and the host's
        GPUs known from earlier readings are returned unhealthy with that problem as note.
        """
        try:
            runner = self._runner(host)
            result = runner.run([host.command, *QUERY_ARGS], self.settings.timeout_seconds)
        except PluginMissing as exc:
            result, runner = CommandResult(None, "", str(exc)), None
        except Exception as exc:  # a bug or an unexpected transport error: still not fatal
            log.exception("reading GPUs of %s failed", host.name)
            result, runner = CommandResult(None, "", f"{type(exc).__name__}: {exc}"), None
        what = f"nvidia-smi {runner.where}" if runner is not None else "nvidia-smi"
        state = self._state.setdefault(host.name, HostState())
        parsed = parse(result.stdout) if not result.timed_out else None
        if parsed is not None and parsed.skipped:
            log.debug("host %s: nvidia-smi lines that are no GPU: %s", host.name, parsed.skipped)
        problem = ""
        if result.timed_out:
            problem = f"{what} timed out after {self.settings.timeout_seconds:g}s"
        elif result.returncode != 0 and not (parsed and parsed.gpus):
            problem = f"{what} failed: {result.problem()}"
        elif parsed is not None and not parsed.gpus and parsed.skipped:
            problem = f"{what} printed no GPU line: {parsed.skipped[0]}"
        if problem:
            readings = [attrs.evolve(r, healthy=False, eligible=False, note=problem) for r in state.known.values()]
            return readings, problem
        assert parsed is not None
        partial = f"exited {result.returncode} but listed {len(parsed.gpus)} GPU(s): {result.problem()}" \
            if result.returncode != 0 else ""
        if partial and partial != state.partial:  # logged when it starts or changes, not at every reading
            log.warning("host %s: nvidia-smi %s", host.name, partial)
        state.partial = partial
        readings = [self._judge(host, gpu) for gpu in parsed.gpus]
        state.known = {r.index: r for r in readings}
        return readings, ""

    def _judge(self, host: GpuHostSettings, gpu: SmiGpu) -> GpuReading:
        s = self.settings
        reading = GpuReading(host=host.name, index=gpu.index, uuid=gpu.uuid, name=gpu.name,
                             memory_total_mb=gpu.memory_total_mb, memory_used_mb=gpu.memory_used_mb,
                             memory_free_mb=gpu.memory_free_mb, utilization_pct=gpu.utilization_pct,
                             temperature_c=gpu.temperature_c)
        if gpu.errors:
            return attrs.evolve(reading, healthy=False, eligible=False, note="nvidia-smi reports " + "; ".join(gpu.errors))
        reasons = []
        if gpu.index in host.exclude:
            reasons.append("excluded by the config (exclude)")
        if s.min_free_memory_mb > 0:
            if gpu.memory_free_mb is None:
                reasons.append("free memory unknown (nvidia-smi reports N/A)")
            elif gpu.memory_free_mb < s.min_free_memory_mb:
                reasons.append(f"free memory {gpu.memory_free_mb} MiB < {s.min_free_memory_mb} MiB")
        if gpu.utilization_pct is not None and gpu.utilization_pct > s.max_utilization_pct:
            reasons.append(f"utilization {gpu.utilization_pct}% > {s.max_utilization_pct}%")
        if reasons:
            return attrs.evolve(reading, eligible=False, note="; ".join(reasons))
        return reading

    def _poll(self, host: GpuHostSettings) -> None:
        """One scheduled read: remember the result, log when the host's health changes."""
        readings, problem = self.read_host(host)
        with self._lock:
            state = self._state.setdefault(host.name, HostState())
            if problem and problem != state.problem:
                log.warning("GPU host %s: %s; its GPUs are unhealthy until it answers", host.name, problem)
            elif not problem and state.problem:
                log.info("GPU host %s answers again: %d GPU(s)", host.name, len(readings))
            state.readings, state.problem, state.at = readings, problem, time.monotonic()

    # ------------------------------------------------------------------ Curator

    def observe(self) -> list[GpuReading]:
        s = self.settings
        if s.interval_seconds <= 0:
            for host in s.hosts:
                self._poll(host)
        elif self._scheduler is None:
            self._read_all_now()
            self._start_scheduler()
        stale_after = 3 * s.interval_seconds + s.timeout_seconds
        now = time.monotonic()
        out: list[GpuReading] = []
        with self._lock:
            for host in s.hosts:
                state = self._state[host.name]
                if s.interval_seconds > 0 and now - state.at > stale_after:
                    note = f"no answer from host {host.name} for {now - state.at:.0f}s"
                    out += [attrs.evolve(r, healthy=False, eligible=False, note=note) for r in state.known.values()]
                else:
                    out += state.readings
        return out

    def _read_all_now(self) -> None:
        """The first reading of every host, in parallel, so the first tick has data."""
        hosts = self.settings.hosts
        with ThreadPoolExecutor(max_workers=max(1, min(8, len(hosts))), thread_name_prefix="nvidia-smi") as pool:
            list(pool.map(self._poll, hosts))

    def _start_scheduler(self) -> None:
        from datetime import datetime, timedelta

        from apscheduler.schedulers.background import BackgroundScheduler
        from apscheduler.triggers.interval import IntervalTrigger

        interval = self.settings.interval_seconds
        scheduler = BackgroundScheduler(daemon=True)
        first = datetime.now() + timedelta(seconds=interval)
        for host in self.settings.hosts:
            scheduler.add_job(self._poll, IntervalTrigger(seconds=interval), args=[host], id=f"gpu-{host.name}",
                              max_instances=1, coalesce=True, next_run_time=first, misfire_grace_time=None)
        scheduler.start()
        self._scheduler = scheduler

    def close(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        for runner in self._runners.values():
            try:
                runner.close()
            except Exception:
                log.debug("closing the runner of a GPU host failed", exc_info=True)
        self._runners.clear()
