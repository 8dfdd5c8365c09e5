"""The one table of worker kinds.

A *kind* says what a worker does and how the host drives it: which registration hook a
plugin uses to offer an implementation, which base class that implementation must
subclass, which role (:mod:`mqi_framework.roles`) adapts it to the broker, whether the
worker takes commands from a queue, and which worker names imply the kind when a
``workers.<name>`` section does not say ``kind:``. Config validation, plugin loading,
the worker runtime, the CLI and the dashboard all read this table and nothing else.
"""

from __future__ import annotations

import importlib
from typing import Optional

import attrs

from mqi_framework import protocols as p

EVENTS_QUEUE = "mqi.events"  # every worker reports here; only the conductor consumes it


def command_queue(worker: str) -> str:
    """The queue a consuming worker takes its commands from (``mqi.<worker name>``)."""
    return f"mqi.{worker}"


@attrs.frozen
class WorkerKind:
    """One kind of worker (see the module docstring)."""

    #: the kind's name as written in ``workers.<name>.kind``
    name: str
    #: the registration hook plugins implement to offer this kind (``mqi_register_scanners``)
    hook: str
    #: the base class a registered implementation must subclass
    base: type
    #: the role class in :mod:`mqi_framework.roles` that drives it
    role: str
    #: whether the worker takes commands from its queue (``mqi.<worker name>``)
    consumes: bool
    #: whether a workflow step may name a worker of this kind
    runs_steps: bool
    #: worker names that mean this kind when ``kind:`` is not given
    default_workers: tuple[str, ...] = ()

    def role_class(self) -> type:
        """The role class (imported on first use: roles import the runtime's helpers)."""
        return getattr(importlib.import_module("mqi_framework.roles"), self.role)


KINDS: dict[str, WorkerKind] = {k.name: k for k in (
    WorkerKind("scanner", "mqi_register_scanners", p.Scanner, "ScanRole", consumes=False, runs_steps=False,
               default_workers=("scan",)),
    WorkerKind("interpreter", "mqi_register_interpreters", p.Interpreter, "PrepareRole", consumes=True,
               runs_steps=True, default_workers=("prepare",)),
    WorkerKind("transfer", "mqi_register_transfers", p.Transfer, "TransferRole", consumes=True, runs_steps=True,
               default_workers=("transfer",)),
    WorkerKind("executor", "mqi_register_executors", p.Executor, "ExecuteRole", consumes=True, runs_steps=True,
               default_workers=("execute", "postprocess")),
    WorkerKind("curator", "mqi_register_curators", p.Curator, "CurateRole", consumes=False, runs_steps=False,
               default_workers=("curate",)),
    WorkerKind("archiver", "mqi_register_archivers", p.Archiver, "ArchiveRole", consumes=False, runs_steps=False,
               default_workers=("archive",)),
    WorkerKind("service", "mqi_register_services", p.Service, "ServiceRole", consumes=False, runs_steps=False,
               default_workers=("dashboard",)),
)}

#: worker name -> kind, for ``workers.<name>`` sections that do not say ``kind:``
DEFAULT_KIND_BY_NAME: dict[str, str] = {w: k.name for k in KINDS.values() for w in k.default_workers}


def kind_of(name: str, declared: Optional[str]) -> Optional[str]:
    """The kind of worker ``name``: the declared one, else the one its name implies, else None."""
    return declared or DEFAULT_KIND_BY_NAME.get(name)
