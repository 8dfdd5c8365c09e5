"""The detached job wrapper the local executor starts:

    python -m mqi_framework.jobrunner JOB_DIR --workdir DIR [--timeout S] [--grace S] [--env K=V]... -- COMMAND

It runs COMMAND with ``/bin/sh -c`` (the caller rendered it with every value shell-quoted)
in its own session, appends stdout and stderr to ``JOB_DIR/output.log``, writes
``JOB_DIR/pid`` (runner pid, the command's process group, the runner's start time to
guard against pid reuse) and, when the command ends, ``JOB_DIR/exit_code`` atomically.
A timeout or a SIGTERM to the runner kills the command's whole process group (SIGTERM,
then SIGKILL after the grace period); a timeout is recorded as exit code 124 plus a
``timed_out`` marker. The runner outlives the worker that started it, so a restarted
worker re-attaches through these files.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

TIMEOUT_EXIT_CODE = 124


def process_start_time(pid: int) -> Optional[str]:
    """The kernel's start time of ``pid`` (field 22 of /proc/PID/stat), or None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses: split after the last ')'
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def write_atomic(path: Path, text: str) -> None:
    part = path.with_name(path.name + ".part")
    with open(part, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(part, path)


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _terminate(child: subprocess.Popen, grace: float) -> int:
    _kill_group(child.pid, signal.SIGTERM)
    try:
        return child.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        _kill_group(child.pid, signal.SIGKILL)
        return child.wait()


def run(job_dir: Path, command: str, workdir: Path, timeout: Optional[float], grace: float, env: dict) -> int:
    job_dir.mkdir(parents=True, exist_ok=True)
    log = open(job_dir / "output.log", "ab", buffering=0)
    if not workdir.is_dir():
        log.write(f"ERROR: working directory {workdir} does not exist\n".encode())
        write_atomic(job_dir / "pid", f"{os.getpid()} 0 {process_start_time(os.getpid())}\n")
        write_atomic(job_dir / "exit_code", "126\n")
        return 126
    stop = {"signal": None}

    def on_term(signum: int, _frame: object) -> None:
        stop["signal"] = signum

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    child = subprocess.Popen(["/bin/sh", "-c", command], cwd=workdir, stdin=subprocess.DEVNULL, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True, env=dict(os.environ, **env))
    write_atomic(job_dir / "pid", f"{os.getpid()} {child.pid} {process_start_time(os.getpid())}\n")
    deadline = time.monotonic() + timeout if timeout else None
    timed_out = False
    while True:
        try:
            code = child.wait(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            pass
        if stop["signal"] is not None:
            code = _terminate(child, grace)
            break
        if deadline is not None and time.monotonic() >= deadline:
            timed_out = True
            log.write(f"\n[mqi] timed out after {timeout}s: killing the process group\n".encode())
            _terminate(child, grace)
            code = TIMEOUT_EXIT_CODE
            break
    if code < 0:  # killed by a signal: report it the way a shell does
        code = 128 - code
    if timed_out:
        write_atomic(job_dir / "timed_out", f"{timeout}\n")
    write_atomic(job_dir / "exit_code", f"{code}\n")
    log.close()
    return code


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mqi_framework.jobrunner", description=__doc__.splitlines()[0])
    parser.add_argument("job_dir", type=Path)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--timeout", type=float)
    parser.add_argument("--grace", type=float, default=5.0)
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        parser.error("give the command as ONE string after --")
    split = argv.index("--")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    if len(command) != 1:
        parser.error("give the command as ONE string after --")
    env = dict(item.split("=", 1) for item in args.env)
    return run(args.job_dir, command[0], args.workdir, args.timeout, args.grace, env)


if __name__ == "__main__":
    sys.exit(main())
