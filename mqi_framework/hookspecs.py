"""Every hook the MQI host calls. Each docstring here is the hook's reference documentation;
``docs/hooks.md`` is generated from them (``python -m mqi_framework.docgen``).

Worker families are *registration* hooks: a plugin hands classes to ``register`` and the
config selects them by name. Implementations take exactly the arguments they use, without
defaults (pluggy does not pass arguments that have defaults).
"""

from __future__ import annotations

from typing import Any, Callable

from mqi_framework import hookspec


@hookspec
def mqi_register_scanners(register: Callable[[type], None]) -> None:
    """Register scanner classes (scan family).

    :param register: call ``register(cls)`` with a subclass of
        :class:`mqi_framework.protocols.Scanner` for each scanner the plugin offers.
        ``cls.name`` is what ``workers.<name>.plugin`` selects (builtin: ``core.fs``).

    Called once, when the plugin registry is first built. A scanner finds case folders;
    the ``scan`` worker calls its ``scan()`` every ``interval`` seconds.
    """


@hookspec
def mqi_register_transfers(register: Callable[[type], None]) -> None:
    """Register transfer classes (transfer family).

    :param register: call ``register(cls)`` with a subclass of
        :class:`mqi_framework.protocols.Transfer` (builtin: ``core.local``).

    Called once, when the plugin registry is first built. A transfer uploads prepared
    case trees to the execution side and downloads results; it must resume and verify.
    """


@hookspec
def mqi_register_executors(register: Callable[[type], None]) -> None:
    """Register executor classes (execute family).

    :param register: call ``register(cls)`` with a subclass of
        :class:`mqi_framework.protocols.Executor` (builtin: ``core.local``).

    Called once, when the plugin registry is first built. An executor runs a rendered
    command detached, polls it, kills it on timeout or cancel and re-attaches after a
    restart.
    """


@hookspec
def mqi_register_curators(register: Callable[[type], None]) -> None:
    """Register curator classes (curate family).

    :param register: call ``register(cls)`` with a subclass of
        :class:`mqi_framework.protocols.Curator` (builtin: ``core.standin``).

    Called once, when the plugin registry is first built. A curator reports the GPUs it
    watches; the core allocates them to beams.
    """


@hookspec
def mqi_register_archivers(register: Callable[[type], None]) -> None:
    """Register archiver classes (archive family).

    :param register: call ``register(cls)`` with a subclass of
        :class:`mqi_framework.protocols.Archiver` (builtin: ``core.sqlite``).

    Called once, when the plugin registry is first built. An archiver backs up the
    state database and applies retention on a schedule.
    """


@hookspec
def mqi_register_interpreters(register: Callable[[type], None]) -> None:
    """Register case interpreters (RTPLAN → beams → per-beam inputs).

    :param register: call ``register(cls)`` with a subclass of
        :class:`mqi_framework.protocols.Interpreter` (e.g. ``moqui`` from ``mqi-moqui``).

    Called once, when the plugin registry is first built. The interpreter named by
    ``interpreter:`` in the config reads each case, lists its treatment beams, writes
    their simulator inputs and judges simulator logs.
    """


@hookspec
def mqi_register_services(register: Callable[[type], None]) -> None:
    """Register long-running services (e.g. a dashboard).

    :param register: call ``register(cls)`` with a subclass of
        :class:`mqi_framework.protocols.Service`.

    Called once, when the plugin registry is first built. A worker of ``kind: service``
    runs the service's ``serve(stop)`` as one of the host's supervised processes.
    """


@hookspec
def mqi_register_commands(register: Callable[..., None]) -> None:
    """Register extra ``mqi-host`` subcommands.

    :param register: call ``register(name, help, configure, run)`` where
        ``configure(parser)`` adds arguments to an :class:`argparse.ArgumentParser` and
        ``run(args) -> int`` executes the command and returns its exit code.

    Called when the CLI builds its parser. A command name that already exists is an
    error reported at start-up.
    """


@hookspec
def mqi_register_dashboard_pages(register: Callable[..., None]) -> None:
    """Register extra dashboard pages.

    :param register: call ``register(path, title, view)`` where ``view`` is a callable
        returning the page's HTML (used by the dashboard plugin when installed).

    Called when the dashboard application is built; ignored when no dashboard runs.
    """


@hookspec
def mqi_case_state_changed(case_id: str, old_state: str, new_state: str, info: dict) -> None:
    """Observe a case's state change (notification hook; return value ignored).

    :param case_id: the case's host identifier (``case-000042``), never a patient identifier.
    :param old_state: the state before the change.
    :param new_state: the state after the change (see ``docs/states.md``).
    :param info: PHI-free extras: ``{"reason": ..., "beams": {number: state}}``.

    Called by the conductor after the transaction that made the change committed, so a
    slow or failing implementation never loses or blocks a state change (exceptions are
    logged and ignored).
    """


ALL_HOOKS: tuple[str, ...] = tuple(
    name for name, value in list(globals().items()) if name.startswith("mqi_") and callable(value)
)


def hook_docs() -> dict[str, Any]:
    """Return ``{hook name: function}`` in definition order, for the docs generator."""
    return {name: globals()[name] for name in ALL_HOOKS}
