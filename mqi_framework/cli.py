"""``mqi-host``: one entry point, subcommands, ``--help`` everywhere, ``--json`` where it lists.

Exit codes: 0 success, 1 failure of the work, 2 bad usage or configuration.
Imports are deferred into the commands so that ``mqi-host --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_CONFIG = "mqi.yaml"

log = logging.getLogger("mqi_framework.cli")


class UsageError(Exception):
    """Bad usage or configuration: exit code 2."""


# =============================================================================== helpers


def _setup_logging(level: str = "INFO", debug: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _config_path(args: argparse.Namespace) -> Path:
    return Path(args.config or os.environ.get("MQI_CONFIG") or DEFAULT_CONFIG)


def _load(args: argparse.Namespace):
    from mqi_framework.config import load_config

    return load_config(_config_path(args))


def _print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


def _when(ts: Optional[float]) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", metavar="FILE",
                        help=f"configuration file (default: $MQI_CONFIG or ./{DEFAULT_CONFIG})")


# =============================================================================== commands


def cmd_plugins(args: argparse.Namespace) -> int:
    from mqi_framework.plugins import get_plugin_host

    host = get_plugin_host()
    listing = host.get_plugins()
    if args.json:
        _print_json(listing)
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

    loaded = _load(args)
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

    loaded = _load(args)
    _check_plugins_for(loaded)
    _setup_logging(loaded.config.logging.level, args.debug)

    def started(log_dir: Path) -> None:
        print(f"mqi-host running: workspace {loaded.workspace}; logs in {log_dir}; Ctrl-C stops", file=sys.stderr)

    try:
        return Host(loaded, actor="host").run_supervised(on_start=started)
    except WorkspaceBusy as exc:
        raise UsageError(str(exc)) from None


def cmd_worker(args: argparse.Namespace) -> int:
    from mqi_framework.worker import WorkerRuntime

    loaded = _load(args)
    _setup_logging(loaded.config.logging.level, args.debug)
    return WorkerRuntime(loaded, args.name).run()


def _host(args: argparse.Namespace):
    from mqi_framework.api import Host

    return Host(_load(args), actor=_actor())


def cmd_cases(args: argparse.Namespace) -> int:
    with _host(args) as host:
        cases = host.cases(state=args.state, show_names=args.names)
    if args.json:
        _print_json(cases)
        return EXIT_OK
    if not cases:
        print("no cases")
    for case in cases:
        beams = " ".join(f"{b['number']}:{b['state']}" for b in case["beams"]) or "-"
        name = f"  {case['name']!r}" if args.names else ""
        flag = "  [attention]" if case["attention"] else ""
        print(f"{case['id']}  {case['state']:<14} beams {beams}{name}{flag}")
        if case["message"]:
            print(f"    {case['message']}")
    return EXIT_OK


def cmd_case(args: argparse.Namespace) -> int:
    from mqi_framework.api import CaseNotFound

    if args.wait is not None:
        return _wait_for_case(args)
    with _host(args) as host:
        try:
            detail = host.case(args.id, show_names=args.names, by_name=True, events_limit=None)
        except CaseNotFound as exc:
            raise UsageError(str(exc)) from None
    if args.json:
        _print_json(detail)
        return EXIT_OK
    print(f"{detail['id']}: {detail['state']}{'  [attention]' if detail['attention'] else ''}")
    if detail["message"]:
        print(f"  {detail['message']}")
    print(f"  detected {_when(detail['detected_at'])}, finished {_when(detail['finished_at'])}")
    for beam in detail["beams"]:
        print(f"  beam {beam['number']}: {beam['state']}{'  ' + beam['message'] if beam['message'] else ''}")
    print("  steps:")
    for step in detail["steps"]:
        beam = f" beam {step['beam']}" if step["beam"] else ""
        progress = f" {step['progress'] * 100:.0f}%" if step["progress"] is not None else ""
        code = f" exit {step['exit_code']}" if step["exit_code"] is not None else ""
        print(f"    {step['step']}{beam}: {step['state']} (attempt {step['attempt']}){progress}{code}"
              f"{'  ' + step['message'] if step['message'] else ''}")
    if args.events:
        print("  events:")
        for event in reversed(detail["events"]):  # oldest first, as a log reads
            print(f"    {_when(event['at'])} {event['kind']}{' beam ' + str(event['beam']) if event['beam'] else ''}"
                  f" {event['message']} ({event['actor']})")
    return EXIT_OK


def _wait_for_case(args: argparse.Namespace) -> int:
    """Wait until the case exists and is final; print its state; 0 only when it is done."""
    from mqi_framework.api import FINAL_CASE_STATES, CaseNotFound

    loaded = _load(args)
    deadline = time.monotonic() + args.wait
    shown = None
    while True:
        summary = None
        if loaded.database_path.exists():
            from mqi_framework.api import Host

            with Host(loaded) as host:
                try:
                    summary = host.case_summary(args.id, by_name=True)
                except CaseNotFound:
                    summary = None
        if summary is not None:
            line = f"{summary['id']}: {summary['state']}  beams " + (
                " ".join(f"{b['number']}:{b['state']}" for b in summary["beams"]) or "-")
            if line != shown and not args.json:
                print(line, flush=True)
                shown = line
            if summary["state"] in FINAL_CASE_STATES:
                if args.json:
                    _print_json(summary)
                return EXIT_OK if summary["state"] == "done" else EXIT_FAILED
        if time.monotonic() >= deadline:
            print(f"error: {args.id!r} is not finished after {args.wait:.0f}s", file=sys.stderr)
            return EXIT_FAILED
        time.sleep(0.5)


def _steer(args: argparse.Namespace, action: Callable[[Any], str]) -> int:
    from mqi_framework.api import ActionRefused, CaseNotFound

    with _host(args) as host:
        try:
            state = action(host)
        except (ActionRefused, CaseNotFound) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_FAILED
    if args.json:
        _print_json({"id": args.id, "state": state})
    else:
        print(f"{args.id}: {state}")
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    return _steer(args, lambda host: host.retry(args.id, beam=args.beam, by_name=True))


def cmd_cancel(args: argparse.Namespace) -> int:
    return _steer(args, lambda host: host.cancel(args.id, by_name=True))


def _actor() -> str:
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except Exception:
        return "cli"


def cmd_status(args: argparse.Namespace) -> int:
    with _host(args) as host:
        status = host.status()
    if args.json:
        _print_json(status)
        return EXIT_OK
    now = time.time()
    print("cases:   " + (", ".join(f"{k} {v}" for k, v in sorted(status["cases"].items())) or "none")
          + (f"  ({status['attention']} need attention)" if status["attention"] else ""))
    print("workers:")
    for w in status["workers"]:
        beat = f"{w['heartbeat_age']:.0f}s ago" if w["heartbeat_age"] is not None else "never"
        print(f"  {w['name']:<12} {w['state']:<10} pid {w['pid'] or '-':<7} heartbeat {beat:<9} "
              f"restarts {w['restarts']}{'  ' + w['message'] if w['message'] else ''}")
    print("gpus:")
    for g in status["gpus"]:
        held = g["allocated"]
        where = f"{held['case']} beam {held['beam']}" if held else "free"
        health = "healthy" if g["healthy"] else "UNHEALTHY"
        if g["healthy"] and not g["eligible"]:
            health = "busy"
        print(f"  {g['host']}:{g['index']} {g['name']} {health} {where}{'  (' + g['note'] + ')' if g['note'] else ''}")
    queue = status["gpu_queue"]
    if queue:
        first = queue[0]
        waited = f", waiting {now - first['queued_since']:.0f}s" if first["queued_since"] else ""
        print(f"gpu queue: {len(queue)} beam(s) waiting for a GPU; next {first['case']} beam {first['beam']}"
              f" ({first['step']}{waited})")
    else:
        print("gpu queue: empty")
    print("queues:  " + ", ".join(f"{q} {d}" for q, d in status["queues"].items())
          + f"; dead letters {status['dead_letters']}")
    return EXIT_OK


def cmd_dlq(args: argparse.Namespace) -> int:
    with _host(args) as host:
        if args.action == "list":
            letters = host.dead_letters(args.queue)
            if args.json:
                _print_json([{"id": d.id, "queue": d.queue, "message_id": d.message_id, "reason": d.reason,
                              "attempts": d.attempts, "dead_at": d.dead_at, "body": d.body} for d in letters])
            elif not letters:
                print("dead-letter queue is empty")
            else:
                for d in letters:
                    what = d.body.get("type", "?")
                    where = f" {d.body.get('case', '')} {d.body.get('step', '')}".rstrip()
                    print(f"{d.id}  {d.queue}  {what}{where}  attempts {d.attempts}  {_when(d.dead_at)}\n    {d.reason}")
            return EXIT_OK
        if not args.all and not args.ids:
            raise UsageError(f"dlq {args.action}: name message ids or pass --all")
        ids = None if args.all else args.ids
        done = host.replay_dead_letters(ids) if args.action == "replay" else host.purge_dead_letters(ids)
    verb = "replayed" if args.action == "replay" else "purged"
    if args.json:
        _print_json({verb: len(done)})
    else:
        print(f"{verb} {len(done)} message(s)")
    return EXIT_OK


# =============================================================================== parser


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
    parser.add_argument("--json", action="store_true", help="machine-readable output (with --plugins)")
    parser.add_argument("--strict", action="store_true", help="with --plugins: exit 1 when a plugin failed to load")
    parser.add_argument("--debug", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("init", help="write a commented starter mqi.yaml and folders")
    p.add_argument("dir", nargs="?", default=".", help="folder to initialise (default: .)")
    p.add_argument("--force", action="store_true", help="overwrite an existing mqi.yaml")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("check", help="validate the config and probe plugins, broker and database")
    _add_config(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("run", help="run the host: conductor and workers as supervised processes")
    _add_config(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("worker", help="run one worker (or the conductor) alone")
    p.add_argument("name", help="a name under workers: in the config, or 'conductor'")
    _add_config(p)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("cases", help="list cases and their beams")
    _add_config(p)
    p.add_argument("--state", help="only cases in this state")
    p.add_argument("--names", action="store_true", help="show case folder names (may be patient ids)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_cases)

    p = sub.add_parser("case", help="one case: beams, steps, attempts, events")
    p.add_argument("id", help="case id (case-000042) or folder name")
    _add_config(p)
    p.add_argument("--events", action="store_true", help="also print the audit log")
    p.add_argument("--wait", type=float, metavar="SECONDS",
                   help="wait until the case exists and is finished (exit 0 only when done)")
    p.add_argument("--names", action="store_true", help="show the case folder name (may be a patient id)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_case)

    p = sub.add_parser("retry", help="run the failed, cancelled, rejected or incomplete parts of a case again")
    p.add_argument("id", help="case id or folder name")
    p.add_argument("--beam", type=int, help="only this beam")
    _add_config(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_retry)

    p = sub.add_parser("cancel", help="cancel a case (running jobs are killed)")
    p.add_argument("id", help="case id or folder name")
    _add_config(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("status", help="workers (heartbeats, restarts), GPUs, queue depths, cases by state")
    _add_config(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("dlq", help="dead-lettered messages: list, replay, purge")
    p.add_argument("action", choices=["list", "replay", "purge"])
    p.add_argument("ids", nargs="*", help="dead-letter ids (replay/purge)")
    p.add_argument("--all", action="store_true", help="replay/purge every dead letter")
    p.add_argument("--queue", help="list: only this queue")
    _add_config(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_dlq)

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

    get_plugin_host().pm.hook.mqi_register_commands(register=register)


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
            return cmd_plugins(args)
        if not getattr(args, "func", None):
            parser.print_help()
            return EXIT_USAGE
        return int(args.func(args) or 0)
    except (ConfigError, PluginError, UsageError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_FAILED
    except Exception as exc:
        if debug:
            raise
        print(f"error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
