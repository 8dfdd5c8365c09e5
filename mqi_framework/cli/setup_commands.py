"""Commands that set a host up and run it: ``--plugins``, ``init``, ``check``, ``run``, ``worker``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from mqi_framework.cli.common import (DEFAULT_CONFIG, EXIT_FAILED, EXIT_OK, EXIT_USAGE, UsageError, load, print_json,
                                      private_files, setup_logging)


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


def _built_workers(loaded, host) -> tuple[list, list[str]]:
    """Build every enabled worker's plugin with its validated settings, as its worker will:
    ``([(name, plugin)], problems)``; each problem names its YAML key."""
    from mqi_framework.worker import build_worker_plugin

    built, problems = [], []
    for name, worker in loaded.config.workers.items():
        if not worker.enabled:
            continue
        try:
            built.append((name, build_worker_plugin(loaded, name, host)))
        except Exception as exc:  # PluginError, ConfigError: both name the key
            problems.append(str(exc))
    return built, problems


def step_program(command: str) -> Optional[str]:
    """The program a step command template runs (its first word after ``VAR=value``
    assignments), with ``{python}`` filled in; None when a placeholder decides it."""
    import shlex

    try:
        words = shlex.split(command)
    except ValueError:
        return None
    while words and "=" in words[0] and not words[0].startswith(("=", "{")) and "/" not in words[0].split("=")[0]:
        words.pop(0)
    if not words:
        return None
    program = words[0].replace("{python}", sys.executable)
    return None if "{" in program or "$" in program else program


def _program_problems(loaded, built: dict) -> list[str]:
    """A step whose program cannot be run where its executor runs jobs (issue 19)."""
    problems = []
    for index, step in enumerate(loaded.config.workflow.steps):
        impl = built.get(step.worker)
        program = step_program(step.command) if step.command else None
        if impl is None or program is None or not hasattr(impl, "program_problem"):
            continue
        problem = impl.program_problem(program)
        if problem:
            problems.append(f"{_line_of(loaded, f'workflow.steps.{index}.command')}workflow.steps[{index}] "
                            f"({step.name}): {problem}")
    return problems


def cmd_check(args: argparse.Namespace) -> int:
    from mqi_framework import plugins
    from mqi_framework.api import EVENTS_QUEUE, Host

    loaded = load(args)
    host = plugins.get_plugin_host()
    for item in host.get_plugins():
        if item["status"] == "failed":
            print(f"warning: plugin {item['name']} ({item['distribution']}) failed to load: {item['error']}")
    built, problems = _built_workers(loaded, host)
    print(f"config {loaded.path}: " + ("valid" if not problems else "read; plugin settings have problems (below)"))
    problems += _program_problems(loaded, dict(built))
    for name, impl in built:
        plugin = loaded.config.workers[name].plugin
        for problem in impl.check():
            problems.append(f"{_line_of(loaded, f'workers.{name}.settings', f'workers.{name}')}workers.{name} "
                            f"({plugin}): {problem}")
        for line in impl.check_info():
            print(f"workers.{name} ({plugin}): {line}")
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


def _line_of(loaded, *keys: str) -> str:
    """``mqi.yaml:12: `` for the first of ``keys`` the config file has, or ``""``: a plugin's
    own check names the place to fix as the YAML checks do."""
    for key in keys:
        line = loaded.lines.get(key)
        if line:
            return f"{loaded.path.name}:{line}: "
    return ""


def _refuse_broken_setup(loaded) -> None:
    """Refuse to start, with the messages ``check`` gives, when a plugin the config uses is
    missing or broken or its settings are wrong: a worker that cannot start would only
    restart forever, and when a scanner's own folders are missing. (Reachability is not
    required: a GPU server that is down at start-up is waited for, not refused.)"""
    from mqi_framework import plugins

    built, problems = _built_workers(loaded, plugins.get_plugin_host())
    for name, impl in built:
        # a scanner's checks are of this machine's folders (an inbox that does not exist):
        # nothing would ever be taken, and the log would only warn every tick
        if loaded.worker_kind(name) == "scanner":
            problems += [f"{_line_of(loaded, f'workers.{name}.settings', f'workers.{name}')}workers.{name} "
                         f"({loaded.config.workers[name].plugin}): {p}" for p in impl.check()]
        impl.close()
    if problems:
        raise UsageError("the host was not started:\n  " + "\n  ".join(problems)
                         + f"\n(mqi-host check -c {loaded.path} lists every problem)")


def cmd_run(args: argparse.Namespace) -> int:
    from mqi_framework.api import Host, WorkspaceBusy

    loaded = load(args)
    _refuse_broken_setup(loaded)
    private_files()
    setup_logging(loaded.config.logging.level, args.debug)

    def started(log_dir: Path) -> None:
        print(f"mqi-host running: workspace {loaded.workspace}; logs in {log_dir}; Ctrl-C stops", file=sys.stderr)

    host = Host(loaded, actor="host")
    try:
        code = host.run_supervised(on_start=started)
    except WorkspaceBusy as exc:
        raise UsageError(str(exc)) from None
    if host.stopped_because:
        print(f"error: {host.stopped_because}; the host stopped: fix the configuration, then start it again",
              file=sys.stderr)
    return code


def cmd_worker(args: argparse.Namespace) -> int:
    from mqi_framework.worker import WorkerRuntime

    loaded = load(args)
    private_files()
    setup_logging(loaded.config.logging.level, args.debug)
    return WorkerRuntime(loaded, args.name).run()
