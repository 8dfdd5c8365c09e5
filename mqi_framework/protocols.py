"""What a scanner, transfer, executor, curator, archiver and interpreter must offer.

Plugins register *classes* that subclass one of the abstract bases below (see
:mod:`mqi_framework.hookspecs`). The host instantiates a class with the plugin's own
settings (an instance of its ``settings_class``, an attrs class validated from the YAML
``settings:`` mapping) and a :class:`PluginContext`.

The core never imports a plugin; plugins import this module.
"""

from __future__ import annotations

import abc
import threading
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Literal, Optional

import attrs

__all__ = [
    "ArchiveResult", "Archiver", "BeamPlan", "CaseCandidate", "CasePlan", "CaseRejected", "Curator", "Executor",
    "GpuReading", "Interpreter", "JobHandle", "JobSpec", "JobState", "JobStatus", "LogVerdict", "PermanentError",
    "Plugin", "PluginContext", "ProgressCallback", "Scanner", "Service", "StartUnconfirmed", "Transfer",
    "RemoteFolder", "TransferProgress", "TransferResult",
]


# --------------------------------------------------------------------------- context


@attrs.frozen
class PluginContext:
    """What the host tells every plugin instance about where it runs.

    ``workspace`` is the host's working folder (database, staging, results, logs);
    ``worker`` is the name of the worker section that created the instance (``None``
    when the CLI creates it, e.g. for ``mqi-host check``); ``state_db`` and
    ``broker_url`` locate the state database and the broker (services such as a
    dashboard read them; workers report through events instead); ``remote_root`` is
    ``workflow.remote_root`` as the host uses it (cases live in ``remote_root/<case>``
    on the execution side), so that a remote plugin's ``check`` can tell whether it
    fits its own settings; ``config_path`` is the config file the host loaded (``None``
    for a config built in memory, as in tests).
    """

    workspace: Path
    worker: Optional[str] = None
    config_path: Optional[Path] = None
    state_db: Optional[Path] = None
    broker_url: Optional[str] = None
    remote_root: Optional[str] = None


class Plugin(abc.ABC):
    """Common base: a registered, named implementation with its own settings class."""

    #: The name the config selects this implementation by (``core.fs``, ``sftp``, ...).
    name: ClassVar[str]
    #: attrs class for the ``settings:`` mapping of the worker section, or None.
    settings_class: ClassVar[Optional[type]] = None

    def __init__(self, settings: Any, context: PluginContext) -> None:
        self.settings = settings
        self.context = context

    def check(self) -> list[str]:
        """Probe what this implementation depends on; return problems for ``mqi-host check``."""
        return []

    def check_info(self) -> list[str]:
        """Facts for people that ``mqi-host check`` prints after :meth:`check` ran (the SSH
        host-key fingerprints it saw, versions found): lines, not problems."""
        return []

    def close(self) -> None:
        """Release connections and files; called when the worker stops."""


class PermanentError(Exception):
    """Raised by a plugin when retrying cannot help (bad input, a path that would leave its
    root): the step fails at once instead of being retried."""


class StartUnconfirmed(ConnectionError):
    """Raised by :meth:`Executor.start` when the start was sent but its answer was lost (the
    connection dropped or timed out while the start command ran): the job may run. The
    worker keeps the attempt and calls ``start`` again with the same job key (``start`` is
    idempotent by key) until it gets an answer; the attempt is neither failed nor retried
    meanwhile, so a job that did start is never run a second time beside it."""


# --------------------------------------------------------------------------- scan


@attrs.frozen
class CaseCandidate:
    """A case folder found in an inbox.

    ``case_id`` is the folder name (data, never shell syntax); ``path`` the case folder
    and ``inbox`` the inbox folder it was found in; ``ready`` is True when the folder holds
    ``_CASE_READY`` or nothing in it changed for ``settle_seconds``; ``reason`` says why
    (``marker``, ``settled``, ``changing``), for people. ``problem``, when not empty, says
    why the folder cannot be a case as it is (its name is not valid UTF-8, has control
    characters, is too long): the host shows it as a rejected case with that message and
    never runs it. The scan worker sets it for such names whatever the scanner said.
    """

    case_id: str
    path: Path
    inbox: Path
    ready: bool
    reason: str = ""  # "marker", "settled", "changing", ...
    problem: str = ""


class Scanner(Plugin):
    """Finds case folders. Called periodically by the ``scan`` worker."""

    @abc.abstractmethod
    def scan(self) -> Iterable[CaseCandidate]:
        """Return every case folder currently present, ready or not."""


# --------------------------------------------------------------------------- transfer


@attrs.frozen
class TransferProgress:
    """How far a transfer got, handed to its :data:`ProgressCallback` as it goes:
    ``files_done`` of ``files_total`` files and ``bytes_done`` of ``bytes_total`` bytes."""

    files_done: int
    files_total: int
    bytes_done: int
    bytes_total: int


#: what :meth:`Transfer.upload` and :meth:`Transfer.download` call with a
#: :class:`TransferProgress` as the transfer goes (the worker turns it into progress events)
ProgressCallback = Callable[[TransferProgress], None]


@attrs.frozen
class TransferResult:
    """What a finished upload or download did: ``files`` and ``bytes`` in the tree, of
    which ``skipped`` files were already present and verified, so not copied again."""

    files: int
    bytes: int
    skipped: int = 0  # files already present and verified (resume / re-run)


@attrs.frozen
class RemoteFolder:
    """A folder found directly under the remote root (for the orphan sweep)."""

    #: the folder's name (not a path)
    name: str
    #: its modification time, epoch seconds
    mtime: float


class Transfer(Plugin):
    """Moves a tree between the host and the execution side ("remote").

    Both directions must be idempotent: a re-run of a finished transfer is a no-op and
    an interrupted one resumes. Files are written as ``<name>.part`` and renamed only
    after their SHA-256 matches the source.
    """

    @abc.abstractmethod
    def upload(self, local_dir: Path, remote_dir: str, progress: ProgressCallback) -> TransferResult:
        """Copy the tree ``local_dir`` to ``remote_dir`` (created if missing)."""

    @abc.abstractmethod
    def download(self, remote_dir: str, local_dir: Path, progress: ProgressCallback) -> TransferResult:
        """Copy the tree ``remote_dir`` to ``local_dir`` (created if missing)."""

    def remove(self, remote_dir: str) -> bool:
        """Delete the tree ``remote_dir`` on the execution side (retention, after the
        results are downloaded and verified); symlinks inside it are removed, never
        followed. Return False when it was not there. The default raises
        ``NotImplementedError``: the host then keeps remote trees and says so."""
        raise NotImplementedError(f"the {self.name} transfer cannot remove remote trees")

    def list_remote(self, remote_root: str) -> list[RemoteFolder]:
        """The folders directly under ``remote_root`` (for the orphan sweep); an empty list
        when it does not exist. The default raises ``NotImplementedError``."""
        raise NotImplementedError(f"the {self.name} transfer cannot list remote folders")


# --------------------------------------------------------------------------- execute


@attrs.frozen
class JobSpec:
    """One command to run detached.

    ``job_key`` is stable for one attempt of one step of one beam: starting the same
    key twice must re-attach to the first job, never start a second one.
    ``command`` is already rendered, every substituted value shell-quoted; it runs in
    ``workdir`` (a folder on the execution side) with ``env`` added to its environment.
    ``timeout`` is in seconds (``None``: no limit): past it the executor kills the job's
    process group and reports it as exited with ``timed_out``.
    """

    job_key: str
    command: str
    workdir: str
    timeout: Optional[float] = None
    env: dict = attrs.field(factory=dict)
    #: the GPU allocated to this job (``{"host", "index", "uuid"}``) for steps with
    #: ``gpu: true``, else None; an executor that serves several GPU hosts routes by ``host``
    gpu: Optional[dict] = None


@attrs.frozen
class JobHandle:
    """Everything needed to find a started job again after a restart (JSON-serialisable):
    the ``executor``'s name, the job's ``job_key`` and the executor's own ``data`` (a pid,
    a Slurm job id, a host)."""

    executor: str
    job_key: str
    data: dict = attrs.field(factory=dict)


#: the states of a job as :attr:`JobStatus.state` reports them
JobState = Literal["running", "exited", "lost"]


@attrs.frozen
class JobStatus:
    """What :meth:`Executor.poll` found: ``state`` is ``running``, ``exited`` (with
    ``exit_code``) or ``lost`` (the job vanished without an exit code: host rebooted, job
    folder removed; the attempt fails and is retried); ``message`` says more, for people."""

    state: JobState
    exit_code: Optional[int] = None
    message: str = ""
    timed_out: bool = False  # the job ran past JobSpec.timeout and its process group was killed


class Executor(Plugin):
    """Runs commands detached (own process group / session), polls them, kills them."""

    @abc.abstractmethod
    def start(self, spec: JobSpec) -> JobHandle:
        """Start the job, or re-attach when ``spec.job_key`` was started before."""

    @abc.abstractmethod
    def poll(self, handle: JobHandle) -> JobStatus:
        """Report whether the job runs, exited (with code) or was lost."""

    @abc.abstractmethod
    def kill(self, handle: JobHandle) -> None:
        """Kill the job's whole process group; a finished job is left alone."""

    @abc.abstractmethod
    def read_log(self, handle: JobHandle, max_bytes: int = 65536) -> str:
        """Return the last ``max_bytes`` of the job's combined stdout/stderr."""

    @abc.abstractmethod
    def missing_outputs(self, patterns: list[str]) -> list[str]:
        """Return the glob patterns that match no file on the execution side."""

    def progress(self, handle: JobHandle) -> Optional[tuple[float, str]]:
        """Progress of a running job as (fraction 0..1, text), or None when the executor
        cannot tell (the step's log rules may still tell from the log)."""
        return None

    def program_problem(self, program: str) -> Optional[str]:
        """Why ``program`` (the first word of a step's command, e.g. ``tps_env``) cannot be
        run where this executor runs jobs (``tps_env: command not found on gpu1``), or None
        when it can or the executor cannot tell. ``mqi-host check`` asks, so a simulator that
        is not installed is found before every beam fails with exit code 127."""
        return None


# --------------------------------------------------------------------------- curate


@attrs.frozen
class GpuReading:
    """One GPU as observed by a curator. ``None`` where the source reports N/A.

    ``healthy`` is False for a GPU that is broken or cannot be read; ``eligible`` is False
    for a healthy GPU that must not take a beam now (too little free memory, busy with
    someone else's work). Only healthy, eligible, unallocated GPUs are allocated.
    ``note`` says why, for people.

    ``host`` and ``index`` identify the GPU (``host`` is the name the executor runs beams
    on); ``uuid`` and ``name`` (the model) are as the driver reports them; the
    ``memory_total_mb``, ``memory_used_mb`` and ``memory_free_mb`` are MiB,
    ``utilization_pct`` percent and ``temperature_c`` degrees Celsius.
    """

    host: str
    index: int
    uuid: str = ""
    name: str = ""
    memory_total_mb: Optional[int] = None
    memory_used_mb: Optional[int] = None
    memory_free_mb: Optional[int] = None
    utilization_pct: Optional[int] = None
    temperature_c: Optional[int] = None
    healthy: bool = True
    eligible: bool = True
    note: str = ""


class Curator(Plugin):
    """Observes resources (GPUs). Allocation itself is done by the core in one SQLite
    transaction per beam; a curator only says what exists and how it is doing.

    Readings also go into a history for charts: at most one row per GPU every
    ``history_spacing_seconds``, kept for ``history_keep_seconds`` (a curator may set
    both from its settings)."""

    history_spacing_seconds: float = 60.0
    history_keep_seconds: float = 7 * 86400.0

    @abc.abstractmethod
    def observe(self) -> list[GpuReading]:
        """Return the current reading of every GPU this curator watches."""


# --------------------------------------------------------------------------- archive


@attrs.frozen
class ArchiveResult:
    """What one archiver run did: ``backup_path`` is the backup it wrote (``None`` when it
    wrote none), ``removed`` the old backups retention deleted, ``message`` a line for the
    log."""

    backup_path: Optional[Path]
    removed: list[Path] = attrs.field(factory=list)
    message: str = ""


class Archiver(Plugin):
    """Backs up the state database and applies retention. Scheduled by the ``archive`` worker."""

    #: seconds between runs unless the settings say otherwise
    default_interval_seconds: ClassVar[float] = 3600.0

    @abc.abstractmethod
    def run(self, state_db: Path) -> ArchiveResult:
        """Back up ``state_db`` (consistent online copy) and apply retention."""


# --------------------------------------------------------------------------- services


class Service(Plugin):
    """A long-running side service of the host (e.g. the dashboard), run by a worker of
    kind ``service``: ``serve`` blocks until ``stop`` is set, then returns promptly."""

    @abc.abstractmethod
    def serve(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set. Exceptions end the worker (the host restarts it)."""


# --------------------------------------------------------------------------- interpret


@attrs.frozen
class BeamPlan:
    """A treatment beam of a case: ``number`` is its beam number in the plan and ``name``
    its label there (may be empty). ``delivery_dir`` is the folder name inside the case
    folder whose PlanInfo.txt names this beam, or None when no delivery was found."""

    number: int
    name: str = ""
    delivery_dir: Optional[str] = None


@attrs.frozen
class CasePlan:
    """What an interpreter found in a case folder.

    ``beams`` are the treatment beams (setup beams excluded); ``missing`` the numbers of
    treatment beams that have no delivery folder yet; ``info`` a PHI-free summary
    (plan label, beam count, ...) shown in the CLI and dashboard.
    """

    beams: list[BeamPlan]
    missing: list[int] = attrs.field(factory=list)
    info: dict = attrs.field(factory=dict)


class CaseRejected(Exception):
    """The case folder is unusable (no plan, unreadable plan, no treatment beam, ...).

    The message is for people: what is wrong and what to do next. It must not contain
    patient identifiers.
    """


@attrs.frozen
class LogVerdict:
    """What a simulator log says: ``outcome`` is ``success``, ``failure`` or ``unknown``
    (still running or nothing recognisable), ``message`` an optional line for people,
    ``progress`` the fraction done (0..1) when the log tells it, else None, and
    ``permanent`` whether a failure is one that running the same input again cannot fix
    (the step then fails at once instead of being retried)."""

    outcome: Literal["success", "failure", "unknown"]
    message: str = ""
    progress: Optional[float] = None
    permanent: bool = False


class Interpreter(Plugin):
    """Turns a case folder into beams and per-beam simulator inputs."""

    @abc.abstractmethod
    def interpret(self, case_dir: Path) -> CasePlan:
        """Read the plan and delivery folders. Raise :class:`CaseRejected` when unusable."""

    @abc.abstractmethod
    def prepare(self, case_dir: Path, plan: CasePlan, staging_dir: Path, remote_dir: str) -> dict[int, str]:
        """Write the execution-side tree into ``staging_dir``.

        Paths inside the written inputs refer to ``remote_dir``, where the tree will be
        uploaded. Returns, per beam number, the input file path relative to ``staging_dir``.
        ``plan.info["prepare_attempt"]`` is the attempt number of this preparation (a case run
        again from its first step has a higher one), for inputs that should differ then (a
        random seed). Must be idempotent for one attempt (a re-run rewrites the same files).
        """

    @abc.abstractmethod
    def parse_log(self, text: str) -> LogVerdict:
        """Judge a simulator log (or its tail)."""
