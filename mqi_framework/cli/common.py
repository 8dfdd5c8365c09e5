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


def setup_logging(level: str = "INFO", debug: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


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
