"""Commands that inspect and steer cases: ``cases``, ``case``, ``retry``, ``cancel``, ``status``, ``dlq``,
``backup``
(presentation of :class:`mqi_framework.api.Host` reads and actions)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable

from mqi_framework.cli.common import (EXIT_FAILED, EXIT_OK, UsageError, load, open_host, print_json, private_files,
                                      when)


def cmd_cases(args: argparse.Namespace) -> int:
    with open_host(args) as host:
        if args.state and args.state not in host.case_states():
            raise UsageError(f"--state: no case state {args.state!r}; the states are "
                             f"{', '.join(host.case_states())} (see docs/states.md)")
        cases = host.cases(state=args.state, show_names=args.names)
    if args.json:
        print_json(cases)
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
    with open_host(args) as host:
        try:
            detail = host.case(args.id, show_names=args.names, by_name=True, events_limit=None)
        except CaseNotFound as exc:
            raise UsageError(str(exc)) from None
    if args.json:
        print_json(detail)
        return EXIT_OK
    print(f"{detail['id']}: {detail['state']}{'  [attention]' if detail['attention'] else ''}")
    if detail["message"]:
        print(f"  {detail['message']}")
    print(f"  detected {when(detail['detected_at'])}, finished {when(detail['finished_at'])}")
    for beam in detail["beams"]:
        note = beam["message"] if beam["message"] and beam["message"] != beam["state"] else ""
        print(f"  beam {beam['number']}: {beam['state']}{'  ' + note if note else ''}")
    notes = (detail.get("info") or {}).get("notes") or []
    if notes:  # what the interpreter found: beams not simulated, delivery findings, ...
        print("  notes:")
        for line in notes:
            print(f"    {line}")
    print("  steps:")
    for step in detail["steps"]:
        beam = f" beam {step['beam']}" if step["beam"] else ""
        progress = f" {step['progress'] * 100:.0f}%" if step["progress"] is not None else ""
        code = f" exit {step['exit_code']}" if step["exit_code"] is not None else ""
        tries = f"attempt {step['attempt']}" if step["attempt"] else "not run"
        message = step["message"] if step["message"] and step["message"] != step["state"] else ""
        print(f"    {step['step']}{beam}: {step['state']} ({tries}){progress}{code}{'  ' + message if message else ''}")
    if args.events:
        print("  events:")
        for event in reversed(detail["events"]):  # oldest first, as a log reads
            print(f"    {when(event['at'])} {event['kind']}{' beam ' + str(event['beam']) if event['beam'] else ''}"
                  f" {event['message']} ({event['actor']})")
    return EXIT_OK


def _wait_for_case(args: argparse.Namespace) -> int:
    """Wait until the case exists and is final; print its state; 0 only when it is done."""
    from mqi_framework.api import FINAL_CASE_STATES, CaseNotFound

    loaded = load(args)
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
                    print_json(summary)
                return EXIT_OK if summary["state"] == "done" else EXIT_FAILED
        if time.monotonic() >= deadline:
            print(f"error: {args.id!r} is not finished after {args.wait:.0f}s", file=sys.stderr)
            return EXIT_FAILED
        time.sleep(0.5)


def _steer(args: argparse.Namespace, action: Callable[[Any], str]) -> int:
    from mqi_framework.api import ActionRefused, CaseNotFound

    with open_host(args) as host:
        try:
            state = action(host)
        except (ActionRefused, CaseNotFound) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_FAILED
    if args.json:
        print_json({"id": args.id, "state": state})
    else:
        print(f"{args.id}: {state}")
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    return _steer(args, lambda host: host.retry(args.id, beam=args.beam, by_name=True))


def cmd_cancel(args: argparse.Namespace) -> int:
    return _steer(args, lambda host: host.cancel(args.id, by_name=True))


def cmd_status(args: argparse.Namespace) -> int:
    with open_host(args) as host:
        status = host.status()
    if args.json:
        print_json(status)
        return EXIT_OK
    now = time.time()
    host = status["host"]
    print(f"host:    running (pid {host['pid']})" if host["running"] else
          "host:    NOT RUNNING (start it with mqi-host run; worker states below are from its last run)")
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


#: the keys of a command body that hold case folder paths (their names may be patient ids)
NAMED_BODY_KEYS = ("case_path", "inbox", "name", "path")


def cmd_dlq(args: argparse.Namespace) -> int:
    with open_host(args) as host:
        if args.action == "list":
            letters = host.dead_letters(args.queue)
            resolved = host.dead_letter_resolutions(letters)
            reasons = [d.reason for d in letters]
            bodies = [d.body if isinstance(d.body, dict) else {} for d in letters]
            if not args.names:  # exception texts and command bodies carry case folder paths
                reasons = host.redact_names(reasons)
                bodies = [{k: v for k, v in b.items() if k not in NAMED_BODY_KEYS} for b in bodies]
            if args.json:
                print_json([{"id": d.id, "queue": d.queue, "message_id": d.message_id, "reason": reason,
                              "attempts": d.attempts, "dead_at": d.dead_at, "body": body, "resolved": r}
                             for d, reason, body, r in zip(letters, reasons, bodies, resolved)])
            elif not letters:
                print("dead-letter queue is empty")
            else:
                for d, reason, body, r in zip(letters, reasons, bodies, resolved):
                    what = body.get("type", "?")
                    where = f" {body.get('case', '')} {body.get('step', '')}".rstrip()
                    print(f"{d.id}  {d.queue}  {what}{where}  attempts {d.attempts}  {when(d.dead_at)}\n    {reason}"
                          + (f"\n    {r} (safe to purge)" if r else ""))
            return EXIT_OK
        if not args.all and not args.ids:
            raise UsageError(f"dlq {args.action}: name message ids or pass --all")
        ids = None if args.all else args.ids
        done = host.replay_dead_letters(ids) if args.action == "replay" else host.purge_dead_letters(ids)
    verb = "replayed" if args.action == "replay" else "purged"
    if args.json:
        print_json({verb: len(done)})
    else:
        print(f"{verb} {len(done)} message(s)")
    return EXIT_OK


def cmd_backup(args: argparse.Namespace) -> int:
    from mqi_framework.api import StoreError

    private_files()
    with open_host(args) as host:
        target = args.output or host.workspace_path("backups")
        if args.output is None:
            target.mkdir(parents=True, exist_ok=True)
        try:
            written = host.backup(target)
        except StoreError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_FAILED
    if args.json:
        print_json({"backup": str(written)})
    else:
        print(f"consistent copy of the state database written to {written}")
    return EXIT_OK
