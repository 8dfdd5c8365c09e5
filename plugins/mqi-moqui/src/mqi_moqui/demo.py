"""``mqi-host demo``: the quickstart end to end on the embedded defaults.

Generates sample cases (3 treatment beams + 1 setup beam each), runs the whole host with
the stand-in simulator, shows progress per case and beam, and exits 0 only when every
treatment beam of every case is done and its dose and summary exist.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

DEMO_TIMEOUT_SECONDS = 120.0


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path,
                        help="keep the workspace here (mqi.yaml, inbox/, database, results); "
                             "`mqi-host run -c DIR/mqi.yaml` then processes cases dropped into DIR/inbox/")
    parser.add_argument("--cases", type=int, default=3, help="how many sample cases (default 3)")
    parser.add_argument("--gpus", type=int, default=2, help="stand-in GPUs (default 2)")
    parser.add_argument("--seconds", type=float, default=1.0, help="stand-in simulation time per beam (default 1)")
    parser.add_argument("--timeout", type=float, default=DEMO_TIMEOUT_SECONDS,
                        help=f"give up after this many seconds (default {DEMO_TIMEOUT_SECONDS:.0f})")
    parser.add_argument("--dashboard", action="store_true",
                        help="also serve the web dashboard (plugin mqi-dashboard) and keep it up after the demo, "
                             "until Ctrl-C")
    parser.add_argument("--port", type=int, default=8080, help="port of the dashboard on 127.0.0.1 (default 8080)")


def _progress_line(case: dict) -> str:
    beams = " ".join(f"{b['number']}:{b['state']}" for b in case["beams"]) or "-"
    return f"{case['id']}  {case['state']:<14} beams {beams}"


def run(args: argparse.Namespace) -> int:
    from mqi_framework.api import FINAL_CASE_STATES, Host, fast_config, write_workspace

    from mqi_moqui.samples import SAMPLE_CALIBRATION, SAMPLE_ROOM, generate_case, outputs_missing

    if args.cases < 1 or args.gpus < 1:
        print("error: --cases and --gpus must be at least 1", file=sys.stderr)
        return 2
    folder = (args.workdir or Path(tempfile.mkdtemp(prefix="mqi-demo-"))).resolve()
    if (folder / "state.db").exists():
        print(f"error: {folder} already holds a workspace (state.db); choose an empty --workdir", file=sys.stderr)
        return 2
    config = fast_config(gpus=args.gpus)
    if args.dashboard:
        problem = _dashboard_problem(args.port)
        if problem:
            print(f"error: --dashboard: {problem}", file=sys.stderr)
            return 2
        config["workers"]["dashboard"] = {"plugin": "dashboard", "kind": "service", "settings": {"port": args.port}}
    # the delivery logs are analysed against the plan; the sample logs' calibration (room G1)
    config["workers"]["prepare"]["settings"]["delivery_calibrations"] = {SAMPLE_ROOM: CALIBRATION_FILE}
    config_path = write_workspace(folder, config)
    (folder / CALIBRATION_FILE).parent.mkdir(parents=True, exist_ok=True)
    (folder / CALIBRATION_FILE).write_text(SAMPLE_CALIBRATION, encoding="utf-8")
    api_host = Host.open(config_path, actor="demo")
    inbox = folder / "inbox"
    for i in range(1, args.cases + 1):
        # the second case's beam 1 was delivered 2 mm off on its second layer: flagged, still run
        generate_case(inbox, f"DEMO-{i:03d}", seed=i, delivery_shift={(1, 2): (2.0, 0.0)} if i == 2 else None)
    print(f"mqi-host demo: {args.cases} sample case(s) in {inbox}, {args.gpus} stand-in GPU(s)", flush=True)
    if args.dashboard:
        print(f"dashboard: http://127.0.0.1:{args.port}/", flush=True)

    started = time.monotonic()
    shown: dict[str, str] = {}
    final: list[dict] = []
    kept: list[float] = []  # with --dashboard: when the demo finished (the host keeps serving until Ctrl-C)

    def finished() -> bool:
        if not api_host.database_path.exists():
            return False
        cases = api_host.cases()
        for case in cases:
            line = _progress_line(case)
            if shown.get(case["id"]) != line:
                shown[case["id"]] = line
                print(f"[{time.monotonic() - started:5.1f}s] {line}", flush=True)
        if kept:
            return False
        if time.monotonic() - started > args.timeout:
            print(f"demo: gave up after {args.timeout:.0f}s", flush=True)
            final[:] = cases
            return True
        if len(cases) >= args.cases and all(c["state"] in FINAL_CASE_STATES for c in cases):
            final[:] = cases
            if args.dashboard:
                kept.append(time.monotonic())
                print(f"demo finished; the dashboard stays up at http://127.0.0.1:{args.port}/ "
                      f"- press Ctrl-C to stop", flush=True)
                return False
            return True
        return False

    try:
        api_host.run_supervised(until=finished, poll_seconds=0.3,
                                extra_env={"MQI_STANDIN_SECONDS": str(args.seconds)})
    finally:
        api_host.close()
    elapsed = (kept[0] if kept else time.monotonic()) - started

    problems = []
    if not final:  # Ctrl-C / SIGTERM before every case was final
        problems.append(f"stopped before the demo finished ({sum(1 for line in shown.values() if '  done ' in line)} "
                        f"of {args.cases} case(s) done)")
    elif len(final) < args.cases:
        problems.append(f"only {len(final)} of {args.cases} cases were detected")
    for case in final:
        if case["state"] != "done":
            problems.append(f"{case['id']} ended {case['state']}: {case['message']}")
            continue
        if len(case["beams"]) != 3 or any(b["state"] != "done" for b in case["beams"]):
            problems.append(f"{case['id']}: beams {[(b['number'], b['state']) for b in case['beams']]}")
        problems.extend(outputs_missing(folder, case))
    print()
    print(f"results:  {folder / 'results'}")
    print(f"database: {api_host.database_path}")
    print(f"logs:     {api_host.log_dir}")
    command = host_command()
    print(f"inspect:  {command} cases -c {config_path}")
    print(f"continue: {command} run -c {config_path}   (drop case folders into {inbox})")
    if not args.workdir:
        print(f"the workspace {folder} is kept for that; rm -r {folder} removes it (--workdir DIR chooses where)")
    if problems:
        print(f"demo FAILED after {elapsed:.1f}s:")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    for case in final:  # what the delivery analysis flagged for the physicist
        for note in (case.get("info") or {}).get("notes") or []:
            if ": delivery " in note:
                print(f"flagged:  {case['id']} {note}")
    beams = sum(len(c["beams"]) for c in final)
    print(f"demo passed: {len(final)} case(s), {beams} treatment beam(s) done in {elapsed:.1f}s")
    return 0


#: the demo workspace's position-monitor calibration of the sample logs (relative to mqi.yaml)
CALIBRATION_FILE = "calibration/scv_init_G1.txt"


def host_command() -> str:
    """How the reader runs ``mqi-host`` after the demo: by its full path when the demo ran
    inside tox, whose environment the reader's shell does not have."""
    import os
    import shutil

    found = shutil.which("mqi-host")
    return found if found and os.environ.get("TOX_ENV_NAME") else "mqi-host"


def _dashboard_problem(port: int) -> str:
    """Why the demo cannot serve the dashboard on ``port``, or ""."""
    import importlib.util
    import socket

    if importlib.util.find_spec("mqi_dashboard") is None:
        return "the dashboard plugin is not installed (pip install -e plugins/mqi-dashboard)"
    if not 1 <= port <= 65535:
        return f"--port must be 1..65535, got {port}"
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as waitress does
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            return f"port {port} on 127.0.0.1 is not free ({exc.strerror}); choose another with --port"
    return ""
