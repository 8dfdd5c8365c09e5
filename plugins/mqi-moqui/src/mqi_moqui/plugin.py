"""Entry point of mqi-moqui (group ``mqi_framework.plugins``, name ``moqui``).

Registers the ``moqui`` interpreter and the ``mqi-host demo`` command. Kept light: pydicom
and the demo's dependencies are imported only when used.
"""

from __future__ import annotations

import argparse
from typing import Callable

from mqi_framework import hookimpl


@hookimpl
def mqi_register_interpreters(register: Callable[[type], None]) -> None:
    from mqi_moqui.interpreter import MoquiInterpreter

    register(MoquiInterpreter)


def _configure_demo(parser: argparse.ArgumentParser) -> None:
    from mqi_moqui import demo

    demo.configure(parser)


def _run_demo(args: argparse.Namespace) -> int:
    from mqi_moqui import demo

    return demo.run(args)


@hookimpl
def mqi_register_commands(register: Callable[..., None]) -> None:
    register("demo", "run the quickstart end to end: sample cases, stand-in simulator, no GPU needed",
             _configure_demo, _run_demo)
