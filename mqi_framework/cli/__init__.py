"""``mqi-host``: one entry point, subcommands, ``--help`` everywhere, ``--json`` where it lists.

Exit codes: 0 success, 1 failure of the work, 2 bad usage or configuration.
Imports are deferred into the commands so that ``mqi-host --help`` stays fast; the commands
live in :mod:`~mqi_framework.cli.setup_commands` and :mod:`~mqi_framework.cli.case_commands`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from mqi_framework.cli import case_commands as cases
from mqi_framework.cli import setup_commands as setup
from mqi_framework.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, UsageError, add_config

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]

log = logging.getLogger("mqi_framework.cli")


def build_parser() -> argparse.ArgumentParser:
    from mqi_framework import __version__

    parser = argparse.ArgumentParser(
        prog="mqi-host",
        description="Runs the Moqui dose-QA pipeline unattended: scan, prepare, upload, simulate per beam "
                    "on a free GPU, download, post-process.",
        epilog="Exit codes: 0 success, 1 failure of the work, 2 bad usage or configuration.",
    )
    parser.add_argument("--version", action="version", version=f"mqi-host {__version__}")
    parser.add_argument("--plugins", action="store_true", help="list installed plugins and exit")
    parser.add_argument("--json", action="store_true", dest="top_json",
                        help="machine-readable output (with --plugins, or before a command that lists)")
    parser.add_argument("--strict", action="store_true", help="with --plugins: exit 1 when a plugin failed to load")
    parser.add_argument("--debug", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    real_add_parser = sub.add_parser

    def add_parser(name: str, **kw: object) -> argparse.ArgumentParser:
        # `mqi-host CMD --help` starts with what the command does, as the overview says it
        text = str(kw.get("help", ""))
        kw.setdefault("description", text[:1].upper() + text[1:] + ("." if text and not text.endswith(".") else ""))
        return real_add_parser(name, **kw)  # type: ignore[arg-type]

    sub.add_parser = add_parser  # type: ignore[method-assign]

    p = sub.add_parser("init", help="write a commented starter mqi.yaml and folders")
    p.add_argument("dir", nargs="?", default=".", help="folder to initialise (default: .)")
    p.add_argument("--force", action="store_true", help="overwrite an existing mqi.yaml")
    p.set_defaults(func=setup.cmd_init)

    p = sub.add_parser("check", help="validate the config and probe plugins, broker and database")
    add_config(p)
    p.set_defaults(func=setup.cmd_check)

    p = sub.add_parser("run", help="run the host: conductor and workers as supervised processes")
    add_config(p)
    p.set_defaults(func=setup.cmd_run)

    p = sub.add_parser("worker", help="run one worker (or the conductor) alone")
    p.add_argument("name", help="a name under workers: in the config, or 'conductor'")
    add_config(p)
    p.set_defaults(func=setup.cmd_worker)

    p = sub.add_parser("cases", help="list cases and their beams")
    add_config(p)
    p.add_argument("--state", help="only cases in this state")
    p.add_argument("--names", action="store_true", help="show case folder names (may be patient ids)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cases.cmd_cases)

    p = sub.add_parser("case", help="one case: beams, steps, attempts, events")
    p.add_argument("id", help="case id (case-000042) or folder name")
    add_config(p)
    p.add_argument("--events", action="store_true", help="also print the audit log")
    p.add_argument("--wait", type=float, metavar="SECONDS",
                   help="wait until the case exists and is finished (exit 0 only when done)")
    p.add_argument("--names", action="store_true", help="show the case folder name (may be a patient id)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cases.cmd_case)

    p = sub.add_parser("retry", help="run the failed, cancelled, rejected or incomplete parts of a case again")
    p.add_argument("id", help="case id or folder name")
    p.add_argument("--beam", type=int, help="only this beam")
    add_config(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cases.cmd_retry)

    p = sub.add_parser("cancel", help="cancel a case (running jobs are killed)")
    p.add_argument("id", help="case id or folder name")
    add_config(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cases.cmd_cancel)

    p = sub.add_parser("status", help="workers (heartbeats, restarts), GPUs, queue depths, cases by state")
    add_config(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cases.cmd_status)

    p = sub.add_parser("dlq", help="dead-lettered messages: list, replay, purge")
    p.add_argument("action", nargs="?", default="list", choices=["list", "replay", "purge"],
                   help="list (the default), replay or purge")
    p.add_argument("ids", nargs="*", help="dead-letter ids (replay/purge)")
    p.add_argument("--all", action="store_true", help="replay/purge every dead letter")
    p.add_argument("--queue", help="list: only this queue")
    p.add_argument("--names", action="store_true", help="list: show case folder names and paths (may be patient ids)")
    add_config(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cases.cmd_dlq)

    p = sub.add_parser("backup", help="a consistent copy of the state database (safe while the host runs)")
    p.add_argument("-o", "--output", type=Path, metavar="PATH",
                   help="file or folder to write (default: <workspace>/backups/state-<UTC time>.db)")
    add_config(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cases.cmd_backup)

    _add_plugin_commands(sub)
    return parser


def _add_plugin_commands(sub: argparse._SubParsersAction) -> None:
    from mqi_framework.plugins import get_plugin_host

    existing = set(sub.choices)

    def register(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None],
                 run: Callable[[argparse.Namespace], int]) -> None:
        if name in existing:
            log.warning("a plugin tried to register command %r, which exists already; ignored", name)
            return
        existing.add(name)
        p = sub.add_parser(name, help=help)
        configure(p)
        p.set_defaults(func=run)

    get_plugin_host().call_each("mqi_register_commands", register=register)  # a broken plugin spares --help


def main(argv: Optional[Sequence[str]] = None) -> int:
    from mqi_framework.configload import ConfigError
    from mqi_framework.plugins import PluginError
    from mqi_framework.store import StoreError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.plugins:
            args.json = args.top_json
            code = setup.cmd_plugins(args)
            sys.stdout.flush()
            return code
        if args.top_json:  # `mqi-host --json cases` means `mqi-host cases --json`
            if hasattr(args, "json"):
                args.json = True
            elif getattr(args, "func", None):
                raise UsageError(f"--json: `{args.command}` has no JSON output")
        if not getattr(args, "func", None):
            parser.print_help()
            return EXIT_USAGE
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, where it is handled, not at interpreter exit
        return code
    except (ConfigError, PluginError, UsageError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_FAILED
    except BrokenPipeError:  # `mqi-host cases | head`: the reader left, as for any Unix tool
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout at exit
        return 128 + signal.SIGPIPE
    except Exception as exc:
        if debug:
            raise
        print(f"error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_FAILED
