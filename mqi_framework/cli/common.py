"""What every ``mqi-host`` command shares: exit codes, usage errors, the config file, the
host API object, output helpers."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_CONFIG = "mqi.yaml"


class UsageError(Exception):
    """Bad usage or configuration: exit code 2."""


class OneLineFormatter(logging.Formatter):
    """Log messages with control characters escaped (:func:`mqi_framework.names.printable`):
    a value from outside (a folder name with a line break or an ANSI escape) can never forge
    a log line or drive a terminal. Tracebacks keep their lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        from mqi_framework.names import printable

        record.message = printable(record.message)
        return super().formatMessage(record)


PRIVATE_UMASK = 0o077


def private_files() -> None:
    """Files and folders this process creates are its user's alone (0600/0700): the state
    database, logs, staging, results and backups hold patient data."""
    os.umask(PRIVATE_UMASK)


def setup_logging(level: str = "INFO", debug: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if debug else getattr(logging, level, logging.INFO), handlers=[handler])


def config_path(args: argparse.Namespace) -> Path:
    return Path(args.config or os.environ.get("MQI_CONFIG") or DEFAULT_CONFIG)


def load(args: argparse.Namespace):
    from mqi_framework.config import load_config

    return load_config(config_path(args))


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


def when(ts: Optional[float]) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", metavar="FILE",
                        help=f"configuration file (default: $MQI_CONFIG or ./{DEFAULT_CONFIG})")


def actor() -> str:
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except Exception:
        return "cli"


def open_host(args: argparse.Namespace):
    """The :class:`mqi_framework.api.Host` of the command's config, acting as the user."""
    from mqi_framework.api import Host

    return Host(load(args), actor=actor())
