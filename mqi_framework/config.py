"""The configuration schema (one YAML file) and its semantic checks.

Every key is documented here, in the attribute docstrings (``docs/configuration.md`` is
generated from them). Loading turns every problem into one :class:`ConfigError` naming
the YAML path and line.
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Any, Literal, Optional

import attrs

from mqi_framework import configload
from mqi_framework.configload import ConfigError, ConfigProblem
from mqi_framework.kinds import KINDS, kind_of

RESERVED_WORKER_NAMES = ("conductor", "host")
WORKER_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")

#: placeholders a step command may use (values are shell-quoted when substituted)
COMMAND_FIELDS = {
    "python": "the Python interpreter running the host",
    "case": "the case's host id (case-000042), never the folder name",
    "case_dir": "the case folder on the execution side (remote_root/<case>)",
    "staging_dir": "the prepared case tree on the host",
    "results_dir": "where results of the case are downloaded on the host",
    "beam": "beam number (per-beam steps)",
    "beam_dir": "the beam's folder on the execution side",
    "input_file": "the beam's simulator input on the execution side",
    "local_beam_dir": "the beam's folder inside results_dir",
    "gpu": "the index of the GPU allocated to the beam (steps with gpu: true)",
    "attempt": "attempt number of this step",
}


@attrs.frozen
class RetrySettings:
    """How often a failed step is tried again, with exponential backoff and jitter."""

    #: tries of the step in all, the first one included (at least 1; 1: never retried); a
    #: permanent failure ends the step at once, and an attempt whose host was unreachable
    #: does not count during the first hour of an unreachable streak
    max_attempts: int = 3
    #: seconds before the second attempt; doubled for each further attempt and multiplied
    #: by a random jitter of 0.5–1.0
    backoff_seconds: float = 5.0
    #: upper bound in seconds of the wait between attempts (before the jitter)
    max_backoff_seconds: float = 300.0


@attrs.frozen
class StepConfig:
    """One step of the workflow. Steps run in order; ``per_beam`` steps run once per
    treatment beam (all beams must finish a step before the case moves on)."""

    #: the step's name, unique in the workflow; also the case state while it runs unless
    #: ``state`` says otherwise
    name: str
    #: the ``workers`` entry that runs the step; its kind decides what the step does
    #: (interpreter: find the beams and prepare inputs, transfer: move the case tree,
    #: executor: run ``command``)
    worker: str
    #: case state while this step runs; default: the step name
    state: Optional[str] = None
    #: run once per treatment beam instead of once per case; every beam must finish the step
    #: before the case moves on (needs the interpreter step before it)
    per_beam: bool = False
    #: transfer steps: ``upload`` (staging to the execution side) or ``download`` (results back)
    direction: Optional[Literal["upload", "download"]] = None
    #: executor steps: template with {placeholders}
    command: Optional[str] = None
    #: allocate one GPU per beam for this step
    gpu: bool = False
    #: executor steps: seconds a job may run; past it the executor kills the job's process
    #: group and the attempt fails as timed out (retried under ``retry``); unset: no limit
    timeout_seconds: Optional[float] = None
    #: how often a failed attempt of this step is tried again, and how long between tries
    retry: RetrySettings = RetrySettings()
    #: executor steps: globs that must match after success
    outputs: list[str] = attrs.field(factory=list)
    #: judge the job log with the interpreter (success/failure/progress)
    log_rules: bool = False
    #: executor steps: environment variables set for the job (values are templates with
    #: {placeholders}, filled without shell quoting)
    env: dict[str, str] = attrs.field(factory=dict)
    #: template; default {beam_dir} for per-beam steps, else {case_dir}
    workdir: Optional[str] = None

    @property
    def label(self) -> str:
        return self.state or self.name


@attrs.frozen
class WorkflowConfig:
    """The pipeline as data."""

    #: the steps in the order they run; the first one must use an interpreter worker
    steps: list[StepConfig]
    #: execution-side root; relative paths resolve against workspace
    remote_root: str = "remote"
    #: extra {placeholders} for commands
    vars: dict[str, str] = attrs.field(factory=dict)


@attrs.frozen
class WorkerConfig:
    """A worker process: which plugin it runs and that plugin's own settings."""

    #: the registered name of the implementation this worker runs (``core.fs``, ``sftp``,
    #: ...; ``mqi-host --plugins`` lists what is installed)
    plugin: str
    #: one of mqi_framework.kinds.KINDS; default from the worker's name
    kind: Optional[str] = None
    #: the plugin's own settings, validated by its settings class (see the plugin settings
    #: reference); a plugin without a settings class takes none
    settings: dict[str, Any] = attrs.field(factory=dict)
    #: ``false``: the host does not start this worker (a step that names it is a config error)
    enabled: bool = True
    #: how often scanners, curators and job pollers look
    interval_seconds: float = 1.0


@attrs.frozen
class BrokerConfig:
    """Where commands and events travel: ``sqlite:`` (embedded; paths relative to the workspace) or
    ``amqp://user:${AMQP_PASSWORD}@host:5672/vhost`` (RabbitMQ, see docs/brokers.md)."""

    #: ``sqlite:<path>`` or ``amqp://...`` (see the section's description)
    url: str = "sqlite:queue.db"
    #: SQLite: seconds a delivered message stays invisible to other consumers before it is
    #: handed out again (a worker busy with one message extends its lease as it goes); on
    #: RabbitMQ a delivery ends with its connection instead. The conductor fails an attempt
    #: that no worker started within ``lease_seconds × (max_attempts + 1) + 60`` seconds.
    lease_seconds: float = 120.0
    #: deliveries of one message in all; a message that comes back more often (its worker
    #: died holding it, or could not report) goes to the queue's dead letters
    #: (``mqi-host dlq``). Not the step retries: those are ``workflow.steps.<n>.retry``.
    max_attempts: int = 5
    #: seconds before a message given back for retry is delivered again; doubled per
    #: delivery, multiplied by a random jitter of 0.5–1.0
    retry_base_seconds: float = 1.0
    #: upper bound in seconds of that redelivery delay (before the jitter)
    retry_max_seconds: float = 300.0
    #: RabbitMQ: put before every queue name (hosts sharing a vhost; tests)
    queue_prefix: str = ""


@attrs.frozen
class CaseRules:
    """How cases are held and flagged."""

    #: a case whose plan names beams that have no delivery folder yet waits in state
    #: ``incomplete`` and is interpreted again this many seconds later, until it is complete
    incomplete_recheck_seconds: float = 30.0
    #: a case still ``incomplete`` after this many seconds is flagged for attention (a
    #: ``case.flagged`` event); it keeps being re-checked
    incomplete_flag_after_seconds: float = 3600.0
    #: a case folder bigger than this (bytes, apparent sizes: a sparse file counts in full)
    #: is rejected before anything in it is read or copied; 0: no limit. Every case is copied
    #: three times (staging, execution side, results)
    max_case_bytes: int = attrs.field(default=2 * 1024**3, validator=attrs.validators.ge(0))
    #: a case folder with more files than this is rejected the same way; 0: no limit
    max_case_files: int = attrs.field(default=20000, validator=attrs.validators.ge(0))


def _never_or_not_negative(instance: Any, attribute: Any, value: Optional[float]) -> None:
    if value is not None and value < 0:
        raise ValueError(f"{attribute.name} must be 0 or more, or null (never), got {value!r}")


@attrs.frozen
class RetentionConfig:
    """How long the copies of a finished case are kept (docs/privacy.md). Each time counts
    from the moment the case finished (done, failed, cancelled or rejected); ``null`` keeps
    that copy for ever. A case retried after any of its copies was removed runs again from
    its first step."""

    #: hours until the case's tree on the execution side (``remote_root/<case>``) is removed
    remote_after_hours: Optional[float] = attrs.field(default=24.0, validator=_never_or_not_negative)
    #: days until the staged (de-identified, uploaded) copy in ``<workspace>/staging`` is removed
    staging_after_days: Optional[float] = attrs.field(default=7.0, validator=_never_or_not_negative)
    #: days until the downloaded results in ``<workspace>/results`` are removed (default:
    #: kept; they are the QA record: archive them before setting this)
    results_after_days: Optional[float] = attrs.field(default=None, validator=_never_or_not_negative)
    #: hours between sweeps of the remote root for orphans: folders named like a case id
    #: (``case-000042``) that no case of this host still needs, older than
    #: ``remote_after_hours`` (``null``: no sweep). The remote root must be this host's own
    orphan_sweep_hours: Optional[float] = attrs.field(default=24.0, validator=_never_or_not_negative)
    #: how often the conductor looks for copies that are due (seconds)
    check_seconds: float = attrs.field(default=60.0, validator=attrs.validators.gt(0))


@attrs.frozen
class SupervisionConfig:
    """How ``mqi-host run`` watches its processes."""

    #: how often each worker and the conductor record that they are alive (seconds)
    heartbeat_seconds: float = 2.0
    #: a process whose last heartbeat is older than this many seconds is killed with SIGKILL
    #: and restarted (a process just started gets this long before it is judged)
    hung_after_seconds: float = 60.0
    #: seconds before a process that exited or hung is started again; doubled at each
    #: further restart, and reset once a process ran for 60 s
    restart_backoff_seconds: float = 1.0
    #: upper bound in seconds of that restart delay
    restart_backoff_max_seconds: float = 60.0
    #: on SIGTERM, seconds the processes get to finish what they hold (the workers are
    #: signalled first, the conductor last) before the ones still running get SIGKILL
    drain_seconds: float = 20.0
    #: conductor housekeeping interval
    tick_seconds: float = 0.5


@attrs.frozen
class LoggingConfig:
    """Where and how much the host's processes log."""

    #: the lowest level written by every process (``--debug`` on the command line: DEBUG)
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: per-process log files, relative to the workspace
    directory: str = "logs"


@attrs.frozen
class MqiConfig:
    """The whole ``mqi.yaml``."""

    #: the pipeline: its steps and their placeholders
    workflow: WorkflowConfig
    #: worker name -> worker section; each enabled worker is one process of ``mqi-host
    #: run``. Names match ``[a-z][a-z0-9_-]{0,31}`` and are not ``conductor`` or ``host``
    workers: dict[str, WorkerConfig]
    #: relative to the config file's folder
    workspace: str = "."
    #: the message broker between the conductor and the workers
    broker: BrokerConfig = BrokerConfig()
    #: how incomplete cases are re-checked and flagged
    cases: CaseRules = CaseRules()
    #: how long the copies of a finished case are kept on the execution side and the host
    retention: RetentionConfig = RetentionConfig()
    #: how ``mqi-host run`` watches, restarts and stops its processes
    supervision: SupervisionConfig = SupervisionConfig()
    #: log level and log folder
    logging: LoggingConfig = LoggingConfig()
    #: relative to the workspace
    database: str = "state.db"


@attrs.define
class LoadedConfig:
    """A validated config plus where it came from (for plugin settings and paths)."""

    config: MqiConfig
    path: Optional[Path]
    lines: dict[str, int]

    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path else Path.cwd()

    @property
    def workspace(self) -> Path:
        return (self.base_dir / self.config.workspace).resolve()

    def workspace_path(self, value: str) -> Path:
        return (self.workspace / value).resolve()

    @property
    def database_path(self) -> Path:
        return self.workspace_path(self.config.database)

    @property
    def remote_root(self) -> str:
        root = Path(self.config.workflow.remote_root)
        return str(root if root.is_absolute() else self.workspace / root)

    @property
    def broker_url(self) -> str:
        url = self.config.broker.url
        if url.startswith("sqlite:") and not url.startswith("sqlite:///"):
            return "sqlite:///" + str(self.workspace_path(url[len("sqlite:"):]))
        return url

    def worker_kind(self, name: str) -> str:
        kind = kind_of(name, self.config.workers[name].kind)
        assert kind is not None, "semantic_problems() refuses a worker without a kind"
        return kind

    def consuming_workers(self) -> list[str]:
        """The enabled workers that take commands from a queue (their queues exist)."""
        return [n for n, w in self.config.workers.items() if w.enabled and KINDS[self.worker_kind(n)].consumes]

    def interpreter_worker(self) -> str:
        for step in self.config.workflow.steps:
            if self.worker_kind(step.worker) == "interpreter":
                return step.worker
        raise ConfigError([ConfigProblem("workflow.steps", "no step uses an interpreter worker", None)])

    def problem(self, path: str, message: str) -> ConfigProblem:
        return ConfigProblem(path, message, self.lines.get(path))


def load_config(path: Path) -> LoadedConfig:
    """Load and validate ``path``; raise ConfigError listing every problem."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(
            [ConfigProblem("", f"config file {path} does not exist (create one with `mqi-host init`)", None)],
            source=str(path),
        )
    config, lines = configload.load_with_lines(MqiConfig, path)
    loaded = LoadedConfig(config=config, path=path.resolve(), lines=lines)
    problems = semantic_problems(loaded)
    if problems:
        raise ConfigError(problems, source=str(path))
    return loaded


def _placeholders(template: str) -> list[str]:
    try:
        return [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as exc:
        return [f"!{exc}"]


def semantic_problems(loaded: LoadedConfig) -> list[ConfigProblem]:
    """Checks a schema cannot express: references between sections, templates, kinds."""
    cfg = loaded.config
    out: list[ConfigProblem] = []
    for name, worker in cfg.workers.items():
        key = f"workers.{name}"
        if not WORKER_NAME_RE.match(name) or name in RESERVED_WORKER_NAMES:
            out.append(loaded.problem(key, f"worker name {name!r} must match {WORKER_NAME_RE.pattern} and not be "
                                           f"one of {', '.join(RESERVED_WORKER_NAMES)}"))
        kind = kind_of(name, worker.kind)
        if kind is None:
            out.append(loaded.problem(key, f"say which kind of worker this is: kind: one of {', '.join(KINDS)}"))
        elif kind not in KINDS:
            out.append(loaded.problem(f"{key}.kind", f"expected one of {', '.join(KINDS)}, got {kind!r}"))
    steps = cfg.workflow.steps
    if not steps:
        out.append(loaded.problem("workflow.steps", "the workflow needs at least one step"))
    seen: set[str] = set()
    interpreter_seen = False
    allowed = set(COMMAND_FIELDS) | set(cfg.workflow.vars)
    for i, step in enumerate(steps):
        key = f"workflow.steps.{i}"
        if step.name in seen:
            out.append(loaded.problem(f"{key}.name", f"step name {step.name!r} is used twice"))
        seen.add(step.name)
        worker = cfg.workers.get(step.worker)
        if worker is None:
            out.append(loaded.problem(f"{key}.worker", f"no worker named {step.worker!r} in workers "
                                                       f"(defined: {', '.join(sorted(cfg.workers)) or 'none'})"))
            continue
        if not worker.enabled:
            out.append(loaded.problem(f"{key}.worker", f"worker {step.worker!r} is disabled but step {step.name!r} needs it"))
        kind = kind_of(step.worker, worker.kind)
        if kind == "interpreter":
            if i != 0:
                out.append(loaded.problem(key, "the interpreter step (which finds the beams) must be the first step"))
            if step.per_beam:
                out.append(loaded.problem(f"{key}.per_beam", "the interpreter step runs once per case"))
            interpreter_seen = True
        elif kind == "transfer":
            if step.direction is None:
                out.append(loaded.problem(key, "a transfer step needs direction: upload or download"))
        elif kind == "executor":
            if not step.command:
                out.append(loaded.problem(key, "an executor step needs a command template"))
        elif kind is not None and not (kind in KINDS and KINDS[kind].runs_steps):
            out.append(loaded.problem(f"{key}.worker", f"a {kind} worker cannot run a workflow step"))
        if step.per_beam and not interpreter_seen:
            out.append(loaded.problem(f"{key}.per_beam", "per-beam steps need an interpreter step before them"))
        if step.gpu and not step.per_beam:
            out.append(loaded.problem(f"{key}.gpu", "GPUs are allocated per beam: set per_beam: true"))
        if step.gpu and not loaded_has_kind(cfg, "curator"):
            out.append(loaded.problem(f"{key}.gpu", "gpu: true needs an enabled curator worker (e.g. workers.curate)"))
        for field_name, template in [("command", step.command or ""), ("workdir", step.workdir or "")] + [
            (f"outputs.{j}", o) for j, o in enumerate(step.outputs)
        ]:
            for placeholder in _placeholders(template):
                if placeholder.startswith("!"):
                    out.append(loaded.problem(f"{key}.{field_name}", f"bad template: {placeholder[1:]}"))
                elif placeholder not in allowed:
                    out.append(loaded.problem(
                        f"{key}.{field_name}",
                        f"unknown placeholder {{{placeholder}}} (known: {', '.join(sorted(allowed))})"))
                elif placeholder in ("beam", "beam_dir", "input_file", "local_beam_dir", "gpu") and not step.per_beam:
                    out.append(loaded.problem(f"{key}.{field_name}", f"{{{placeholder}}} needs per_beam: true"))
                elif placeholder == "gpu" and not step.gpu:
                    out.append(loaded.problem(f"{key}.{field_name}", "{gpu} needs gpu: true"))
        if step.retry.max_attempts < 1:
            out.append(loaded.problem(f"{key}.retry.max_attempts", "must be at least 1"))
    if steps and not interpreter_seen:
        out.append(loaded.problem("workflow.steps", "the first step must use an interpreter worker (kind: interpreter)"))
    if not loaded_has_kind(cfg, "scanner"):
        out.append(loaded.problem("workers", "no enabled scanner worker: nothing would find cases (add workers.scan)"))
    return out


def loaded_has_kind(cfg: MqiConfig, kind: str) -> bool:
    return any(w.enabled and kind_of(n, w.kind) == kind for n, w in cfg.workers.items())
