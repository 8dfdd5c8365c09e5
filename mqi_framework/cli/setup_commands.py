"""Commands that set a host up and run it: ``--plugins``, ``init``, ``check``, ``run``, ``worker``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mqi_framework.cli.common import (DEFAULT_CONFIG, EXIT_FAILED, EXIT_OK, EXIT_USAGE, UsageError, load, print_json,
                                      setup_logging)


def cmd_plugins(args: argparse.Namespace) -> int:
    from mqi_framework.plugins import get_plugin_host

    host = get_plugin_host()
    listing = host.get_plugins()
    if args.json:
        print_json(listing)
    else:
        for item in listing:
            version = f" {item['version']}" if item["version"] else ""
            print(f"{item['name']}  [{item['status']}]  {item['distribution']}{version}  ({item['source']}: {item['module']})")
            if item["provides"]:
                print(f"    provides: {', '.join(item['provides'])}")
            if item["hooks"]:
                print(f"    hooks:    {', '.join(item['hooks'])}")
            if item["error"]:
                print(f"    error:    {item['error']}  (run with --debug for the traceback)")
                if args.debug:
                    print(host.records[item["name"]].traceback)
        for problem in host.registry_errors:
            print(f"problem: {problem}")
    return EXIT_FAILED if any(i["status"] == "failed" for i in listing) and args.strict else EXIT_OK


def cmd_init(args: argparse.Namespace) -> int:
    from importlib import resources

    target = Path(args.dir)
    target.mkdir(parents=True, exist_ok=True)
    config = target / DEFAULT_CONFIG
    if config.exists() and not args.force:
        raise UsageError(f"{config} exists already; use --force to overwrite it")
    text = resources.files("mqi_framework").joinpath("templates/mqi.yaml").read_text(encoding="utf-8")
    config.write_text(text, encoding="utf-8")
    for folder in ("inbox", "logs"):
        (target / folder).mkdir(exist_ok=True)
    print(f"wrote {config} and folders inbox/, logs/")
    print(f"next: mqi-host check -c {config}   then   mqi-host run -c {config}")
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from mqi_framework import plugins
    from mqi_framework.api import EVENTS_QUEUE, Host
    from mqi_framework.worker import build_worker_plugin

    loaded = load(args)
    print(f"config {loaded.path}: valid")
    problems: list[str] = []
    host = plugins.get_plugin_host()
    for item in host.get_plugins():
        if item["status"] == "failed":
            print(f"warning: plugin {item['name']} ({item['distribution']}) failed to load: {item['error']}")
    for name, worker in loaded.config.workers.items():
        if not worker.enabled:
            continue
        try:
            impl = build_worker_plugin(loaded, name, host)
        except Exception as exc:  # PluginError, ConfigError: both name the key
            problems.append(str(exc))
            continue
        for problem in impl.check():
            problems.append(f"workers.{name} ({worker.plugin}): {problem}")
        for line in impl.check_info():
            print(f"workers.{name} ({worker.plugin}): {line}")
        impl.close()
    try:
        with Host(loaded) as workspace_host:
            workspace_host.broker().depth(EVENTS_QUEUE)
        print(f"broker {loaded.broker_url.split('@')[-1]}: reachable")
    except Exception as exc:
        problems.append(f"broker: {exc}")
    try:
        from mqi_framework.store import open_state

        open_state(loaded.database_path).close()
        print(f"state database {loaded.database_path}: ok")
    except Exception as exc:
        problems.append(f"state database {loaded.database_path}: {exc}")
    for problem in problems:
        print(f"problem: {problem}")
    if problems:
        print(f"{len(problems)} problem(s) found")
        return EXIT_USAGE
    print("all checks passed")
    return EXIT_OK


def _check_plugins_for(loaded) -> None:
    """Refuse to start when a plugin the config uses is missing or broken."""
    from mqi_framework import plugins

    host = plugins.get_plugin_host()
    for name, worker in loaded.config.workers.items():
        if worker.enabled:
            host.lookup(loaded.worker_kind(name), worker.plugin, config_key=f"workers.{name}.plugin")


def cmd_run(args: argparse.Namespace) -> int:
    from mqi_framework.api import Host, WorkspaceBusy

    loaded = load(args)
    _check_plugins_for(loaded)
    setup_logging(loaded.config.logging.level, args.debug)

    def started(log_dir: Path) -> None:
        print(f"mqi-host running: workspace {loaded.workspace}; logs in {log_dir}; Ctrl-C stops", file=sys.stderr)

    try:
        return Host(loaded, actor="host").run_supervised(on_start=started)
    except WorkspaceBusy as exc:
        raise UsageError(str(exc)) from None


def cmd_worker(args: argparse.Namespace) -> int:
    from mqi_framework.worker import WorkerRuntime

    loaded = load(args)
    setup_logging(loaded.config.logging.level, args.debug)
    return WorkerRuntime(loaded, args.name).run()
