"""The fault campaign: real ``mqi-host run`` processes under injected faults, judged by a
ledger of every simulator invocation.

    python benchmarks/faults.py                  # the long campaign (about 15 minutes)
    python benchmarks/faults.py --short          # the CI version (about 3 minutes)
    python benchmarks/faults.py --scenario ssh-rabbitmq --kills 80 --markdown

Each scenario is one workspace with its own host: cases are dropped into the inbox in waves
while a chaos thread injects faults, then the campaign waits for every case to end and
judges the result against the ledger that ``benchmarks/fault_sim.py`` (the simulator every
scenario runs, the stand-in wrapped) writes on the simulator side:

========================  ==========================================================
scenario                  path and faults
========================  ==========================================================
``local-embedded``        embedded queue, ``core.local`` transfer and executor;
                          SIGKILLs of random host processes (the host included),
                          ``state.db`` and ``queue.db`` held under an exclusive lock,
                          the results disk full during downloads
``ssh-rabbitmq``          RabbitMQ, ``sftp`` + ``ssh`` to a throw-away sshd; SIGKILLs,
                          sshd stopped and connections reset during uploads,
                          simulations and downloads, the remote root disk full,
                          RabbitMQ ``stop_app``/``start_app`` (and in the long
                          campaign the node SIGKILLed and started again), a host down
                          longer than the lease budget while simulations run
========================  ==========================================================

Every scenario also has a case whose simulator lies (success log, exit 3): it must fail,
for that reason, and is counted apart ("failed, real cause"), as is a case whose simulator
met a full disk on every attempt (its log says ENOSPC: the engine failed, not the host).

The table, one row per scenario:

* **faults**: injected (kinds below the table);
* **done / failed / stuck**: cases at the end (stuck: not final when the recovery deadline
  passed); failed counts only failures without a real cause;
* **duplicate**: beams with more than one successful simulator run;
* **overlap**: simulator runs that started while another run of the same beam ran, or on a
  GPU another run held;
* **done w/o run**: beams reported done without a successful run in the ledger, or a done
  case without a dose and summary per beam;
* **dead letters**: dead letters left that are not resolved (all of them in brackets);
* **orphans**: host processes alive after the host was stopped;
* **recovery s**: seconds from the last fault's end until every case was final.

The target is 0 in every column but done and faults, with every case done. Exit status 1
when a target is missed. Disk-full faults need ``mount -t tmpfs`` (root); where mounting is
refused they are left out and the table says so. RabbitMQ at ``MQI_TEST_AMQP_URL`` (default
amqp://guest:guest@127.0.0.1:5672/%2F) and ``rabbitmqctl``; sshd from ``openssh-server``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mqi_framework.testing import FINAL_STATES, HostProcess, Workspace  # noqa: E402
from mqi_framework.workspace import fast_config, wait_until  # noqa: E402

FAULT_SIM = Path(__file__).resolve().parent / "fault_sim.py"
AMQP_URL = os.environ.get("MQI_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
LYING_PREFIX = "LIE-"


# ------------------------------------------------------------------------------ scenarios


@dataclass
class Scenario:
    """One workspace, one host, one set of faults."""

    name: str
    broker: str  # "embedded" | "rabbitmq"
    path: str  # "local" | "ssh"
    faults: list[str]
    cases: int
    kills: int
    sim_seconds: float = 1.5
    active: int = 3
    host_down_seconds: float = 0.0
    fault_gap: tuple[float, float] = (0.5, 2.0)


def scenarios(short: bool) -> list[Scenario]:
    if short:
        return [
            Scenario("local-embedded", "embedded", "local", cases=5, kills=12,
                     faults=["state_db_lock", "queue_db_lock", "results_disk_full"]),
            Scenario("ssh-rabbitmq", "rabbitmq", "ssh", cases=5, kills=10, host_down_seconds=8,
                     faults=["sshd_stop:upload", "sshd_reset:simulate", "sshd_reset:download", "broker_stop_start",
                             "host_down", "remote_disk_full"]),
        ]
    return [
        Scenario("local-embedded", "embedded", "local", cases=16, kills=60,
                 faults=["state_db_lock", "state_db_lock", "queue_db_lock", "results_disk_full", "results_disk_full",
                         "host_down"], host_down_seconds=20),
        Scenario("ssh-rabbitmq", "rabbitmq", "ssh", cases=16, kills=55, host_down_seconds=80,
                 faults=["sshd_stop:upload", "sshd_stop:simulate", "sshd_stop:download", "sshd_reset:upload",
                         "sshd_reset:simulate", "sshd_reset:download", "broker_stop_start", "broker_sigkill",
                         "remote_disk_full", "results_disk_full", "state_db_lock", "host_down"]),
    ]


# ------------------------------------------------------------------------------ the run


@dataclass
class Injected:
    kind: str
    started: float
    ended: float
    note: str = ""


@dataclass
class Run:
    """A scenario while it runs: the workspace, the host, what was injected."""

    scenario: Scenario
    folder: Path
    ws: Workspace
    ledger: Path
    env: dict
    sshd: Any = None
    remote_root: Optional[Path] = None
    prefix: str = ""
    host: Optional[HostProcess] = None
    injected: list[Injected] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)
    mounts: list[Path] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    rng: random.Random = field(default_factory=random.Random)
    dropped: int = 0

    def log(self, text: str) -> None:
        print(f"  [{self.scenario.name} {time.strftime('%H:%M:%S')}] {text}", flush=True)

    def start_host(self) -> None:
        self.host = HostProcess(self.ws, self.env).start()

    def steps_running(self, name: str) -> int:
        rows = self.ws.query("SELECT COUNT(*) FROM steps WHERE name = ? AND state = 'running'", name)
        return rows[0][0] if rows else 0

    def wait_phase(self, step: str, timeout: float = 60) -> bool:
        return wait_until(lambda: self.steps_running(step) > 0, timeout, 0.05)


def build_config(run: Run) -> dict:
    s = run.scenario
    overrides: dict[str, Any] = {
        # redeliveries and the "never started" grace come quickly, so that the faults exercise them
        "broker": {"lease_seconds": 5},
        "workflow": {"vars": {"ledger": str(run.ledger), "fault_sim": str(FAULT_SIM)}},
    }
    if s.broker == "rabbitmq":
        overrides["broker"].update(url=AMQP_URL, queue_prefix=run.prefix)
    if s.path == "ssh":
        host = run.sshd.host_settings(root=str(run.remote_root))
        overrides["workers"] = {
            "transfer": {"plugin": "sftp", "settings": {"hosts": {"gpu1": host}}},
            "execute": {"plugin": "ssh", "interval_seconds": 0.2,
                        "settings": {"hosts": {"gpu1": host}, "kill_grace_seconds": 1, "poll_interval_seconds": 0.2}},
        }
    config = fast_config(overrides=overrides)
    if s.path == "ssh":
        config["workflow"]["remote_root"] = str(run.remote_root / "cases")
    for step in config["workflow"]["steps"]:
        if step["name"] == "simulate":
            step["command"] = ("CUDA_VISIBLE_DEVICES={gpu} {python} {fault_sim} {ledger} {case} {beam} {attempt} "
                               "{gpu} {input_file}")
            step["env"] = {"MQI_STANDIN_SECONDS": str(s.sim_seconds)}
    return config


def try_mount(run: Run, folder: Path, size: str) -> Optional[str]:
    """Mount a tmpfs of ``size`` on ``folder`` (for disk-full faults); the reason when refused."""
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return "no mount command"
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return (proc.stderr or proc.stdout).strip() or f"mount exited {proc.returncode}"
    run.mounts.append(folder)
    return None


# ------------------------------------------------------------------------------ faults


def host_pids(run: Run) -> dict[str, int]:
    pids = {r["name"]: r["pid"] for r in run.ws.query("SELECT name, pid FROM workers WHERE state = 'running'")
            if r["pid"]}
    if run.host is not None and run.host.running:
        pids["host"] = run.host.proc.pid
    return pids


def restart_after_host_death(run: Run, down: float = 0.0) -> None:
    assert run.host is not None
    run.host.proc.wait()
    run.host._log.close()
    time.sleep(down)
    run.start_host()


def fault_kill(run: Run) -> str:
    """SIGKILL one host process, chosen at random among the host and its running workers."""
    for _ in range(50):
        pids = host_pids(run)
        if pids:
            name = run.rng.choice(sorted(pids))
            try:
                os.kill(pids[name], signal.SIGKILL)
                break
            except ProcessLookupError:  # restarting just now: choose again
                pass
        time.sleep(0.2)
    else:
        return "not injected: no host process ran for 10 s"
    if name == "host":
        restart_after_host_death(run, down=run.rng.uniform(0, 1.5))
    return f"SIGKILL {name}"


def fault_host_down(run: Run) -> str:
    """Every host process SIGKILLed while simulations run; the host stays down a while."""
    if not run.wait_phase("simulate", 90):
        return "not injected: no simulation ran"
    assert run.host is not None
    run.host.kill_everything()
    time.sleep(run.scenario.host_down_seconds)
    run.start_host()
    return f"host and workers SIGKILLed during simulations, down {run.scenario.host_down_seconds:.0f} s"


def fault_db_lock(run: Run, db: str, seconds: float) -> str:
    path = run.folder / db
    if not path.exists():
        return f"not injected: no {db} yet"
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        time.sleep(seconds)
        conn.execute("ROLLBACK")
    finally:
        conn.close()
    return f"{db} held under an exclusive lock for {seconds:.0f} s"


def fill(folder: Path, seconds: float) -> str:
    stats = os.statvfs(folder)
    free = stats.f_bavail * stats.f_frsize
    filler = folder / f".filler-{uuid.uuid4().hex[:6]}"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        try:
            os.posix_fallocate(fd, 0, free)
        except OSError:
            pass
        time.sleep(seconds)
    finally:
        os.close(fd)
        filler.unlink()
    return f"{folder.name} full ({free // 2**20} MiB filled) for {seconds:.0f} s"


def fault_disk_full(run: Run, which: str, step: str) -> str:
    folder = run.folder / "results" if which == "results" else (run.remote_root / "cases")
    if folder not in run.mounts:
        return f"not injected: {run.unavailable.get(which, 'no tmpfs')}"
    if not run.wait_phase(step, 60):
        return f"not injected: no {step} ran"
    return fill(folder, 6) + f" during {step}"


def fault_sshd(run: Run, how: str, step: str) -> str:
    if not run.wait_phase(step, 60):
        return f"not injected: no {step} ran"
    if how == "reset":
        run.sshd.drop_connections()
        return f"ssh connections reset during {step}"
    run.sshd.stop()
    time.sleep(run.rng.uniform(3, 8))
    run.sshd.start()
    return f"sshd stopped during {step}, started again"


def rabbitmqctl(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout)


def fault_broker_stop_start(run: Run) -> str:
    if not run.wait_phase("simulate", 60):
        return "not injected: no simulation ran"
    rabbitmqctl("stop_app")
    time.sleep(run.rng.uniform(3, 6))
    rabbitmqctl("start_app")
    rabbitmqctl("await_startup")
    return "RabbitMQ stop_app / start_app"


def fault_broker_sigkill(run: Run) -> str:
    pid = subprocess.run(["pgrep", "-o", "-f", "beam.smp.*rabbit"], capture_output=True, text=True).stdout.split()
    if not pid:
        return "not injected: no RabbitMQ node process found"
    os.kill(int(pid[0]), signal.SIGKILL)
    time.sleep(2)
    subprocess.run(["rabbitmq-server", "-detached"], capture_output=True, timeout=60)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and rabbitmqctl("await_startup", timeout=60).returncode != 0:
        time.sleep(1)
    return "RabbitMQ node SIGKILLed, started again"


def inject(run: Run, kind: str) -> str:
    name, _, arg = kind.partition(":")
    if name == "kill":
        return fault_kill(run)
    if name == "host_down":
        return fault_host_down(run)
    if name == "state_db_lock":
        return fault_db_lock(run, "state.db", 12)
    if name == "queue_db_lock":
        return fault_db_lock(run, "queue.db", 8)
    if name == "results_disk_full":
        return fault_disk_full(run, "results", "download")
    if name == "remote_disk_full":
        return fault_disk_full(run, "remote", "upload")
    if name in ("sshd_stop", "sshd_reset"):
        return fault_sshd(run, name.split("_")[1], arg)
    if name == "broker_stop_start":
        return fault_broker_stop_start(run)
    if name == "broker_sigkill":
        return fault_broker_sigkill(run)
    raise ValueError(f"unknown fault {kind!r}")


def chaos(run: Run, stop: threading.Event) -> None:
    """Inject the scenario's faults and its SIGKILLs in a random order, one at a time."""
    s = run.scenario
    plan = ["kill"] * s.kills + list(s.faults)
    run.rng.shuffle(plan)
    for kind in plan:
        if stop.is_set():
            break
        time.sleep(run.rng.uniform(*s.fault_gap))
        started = time.monotonic()
        try:
            note = inject(run, kind)
        except Exception as exc:  # a fault that could not be injected is reported, not fatal
            note = f"not injected: {type(exc).__name__}: {exc}"
            traceback.print_exc()
        run.injected.append(Injected(kind.split(":")[0], started, time.monotonic(), note))
        if kind != "kill":
            run.log(note)


def active_cases(run: Run, dropped: int) -> int:
    """Cases dropped and not final yet (a case the scanner has not seen counts as active)."""
    rows = run.ws.query("SELECT COUNT(*) FROM cases WHERE state IN (%s)" % ",".join("?" * len(FINAL_STATES)),
                        *FINAL_STATES)
    final = rows[0][0] if rows else 0
    return dropped - final


def drop_cases(run: Run, stop: threading.Event) -> None:
    """Keep ``scenario.active`` cases in flight until the chaos is over (at least
    ``scenario.cases`` in all), so that every fault meets work to disturb."""
    from mqi_moqui.samples import delivery_dir_of, generate_case

    s = run.scenario
    made = 0
    while made < s.cases or not stop.is_set():
        if made >= s.cases * 4:
            break
        try:
            busy = active_cases(run, made)
        except sqlite3.OperationalError:  # state.db locked by a fault: look again
            busy = s.active
        if busy < s.active:
            lying = made == 1
            name = f"{LYING_PREFIX}{made:02d}" if lying else f"F{made:02d} {run.rng.choice(['a', 'Ø', 'x y'])}"
            case_dir = generate_case(run.ws.inbox, name, seed=100 + made, treatment_beams=run.rng.choice([2, 3]),
                                     ready_marker=False)
            if lying:
                (delivery_dir_of(case_dir, 1) / "STANDIN_MODE").write_text("lying")
            (case_dir / "_CASE_READY").touch()
            made += 1
        stop.wait(0.5)
    run.dropped = made


# ------------------------------------------------------------------------------ judging


@dataclass
class Result:
    scenario: str
    faults: int = 0
    by_kind: dict = field(default_factory=dict)
    cases: int = 0
    done: int = 0
    failed_real: int = 0
    lying: int = 0
    lying_failed: int = 0
    failed: int = 0
    stuck: int = 0
    duplicate: int = 0
    overlap: int = 0
    done_without_run: int = 0
    dead_letters: int = 0
    dead_letters_all: int = 0
    orphans: int = 0
    recovery_s: float = 0.0
    sim_runs: int = 0
    notes: list = field(default_factory=list)

    def missed(self) -> list[str]:
        misses = [f"{name} {getattr(self, name)}" for name in
                  ("failed", "stuck", "duplicate", "overlap", "done_without_run", "dead_letters", "orphans")
                  if getattr(self, name)]
        if self.done + self.failed_real != self.cases:
            misses.append(f"{self.cases - self.done - self.failed_real} cases not done")
        if self.lying_failed != self.lying:
            misses.append(f"{self.lying - self.lying_failed} case(s) whose simulator lied did not fail")
        return misses


def read_ledger(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def disk_full_in_job_logs(run: Run, case: str) -> bool:
    """Whether the simulator logs of ``case`` (local and remote job folders) say ENOSPC."""
    roots = [run.folder / "jobs"] + ([run.remote_root / ".mqi-jobs"] if run.remote_root else [])
    for root in roots:
        for log in root.glob(f"{case}-simulate-*/output.log"):
            if "No space left on device" in log.read_text(errors="replace"):
                return True
    return False


def judge(run: Run, cases: dict[str, dict], recovery_s: float) -> Result:
    from mqi_moqui.samples import outputs_missing

    result = Result(run.scenario.name, recovery_s=recovery_s)
    result.faults = len(run.injected)
    for item in run.injected:
        key = item.kind if not item.note.startswith("not injected") else f"{item.kind} (not injected)"
        result.by_kind[key] = result.by_kind.get(key, 0) + 1
    entries = read_ledger(run.ledger)
    starts = [e for e in entries if e["event"] == "start"]
    result.sim_runs = len(starts)
    successes: dict[tuple, int] = {}
    for e in entries:
        if e["event"] == "end" and e["rc"] == 0:
            successes[(e["case"], e["beam"])] = successes.get((e["case"], e["beam"]), 0) + 1
    result.duplicate = sum(1 for n in successes.values() if n > 1)
    result.overlap = sum(1 for e in starts if e["beam_busy"] or e["gpu_busy"])
    result.cases = len(cases)
    result.lying = sum(1 for name in cases if name.startswith(LYING_PREFIX))
    for name, case in cases.items():
        state = case["state"]
        if state == "done":
            result.done += 1
            missing = [b for b in case["beams"] if b["state"] == "done" and not successes.get((case["id"], b["number"]))]
            result.done_without_run += len(missing) + (1 if outputs_missing(run.folder, case) else 0)
        elif state not in FINAL_STATES:
            result.stuck += 1
            result.notes.append(f"{case['id']} stuck in {state}: {case.get('message', '')}")
        elif name.startswith(LYING_PREFIX) and state == "failed" and (
                "exit code 3" in json.dumps(case["beams"]) or disk_full_in_job_logs(run, case["id"])):
            # A lying simulator that also met the filled disk fails for that reason first; either
            # way the case must not be done, which is what this counts.
            result.failed_real += 1
            result.lying_failed += 1
        elif state == "failed" and disk_full_in_job_logs(run, case["id"]):
            result.failed_real += 1  # the simulator itself failed on a full disk, every attempt
            result.notes.append(f"{case['id']} failed for a real cause: its simulator met a full disk")
        else:
            result.failed += 1
            beams = "; ".join(f"beam {b['number']} {b['state']}: {b.get('message', '')}" for b in case["beams"]
                              if b["state"] != "done")
            result.notes.append(f"{case['id']} {state}: {case.get('message', '')} {beams}")
    letters = json.loads(run.ws.cli("dlq", "list", "--json", timeout=60).stdout or "[]")
    result.dead_letters_all = len(letters)
    result.dead_letters = sum(1 for d in letters if not d.get("resolved"))
    for d in letters:
        if not d.get("resolved"):
            result.notes.append(f"dead letter {d.get('queue')}: {d.get('reason')}")
    return result


def orphans(run: Run) -> list[str]:
    config = str(run.ws.config_path)
    out = subprocess.run(["pgrep", "-a", "-f", "mqi_framework"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if config in line]


# ------------------------------------------------------------------------------ one scenario


def run_scenario(s: Scenario, base: Path, seed: int) -> Result:
    folder = base / s.name
    run = Run(scenario=s, folder=folder / "ws", ws=None, ledger=folder / "ledger" / "sim.jsonl",  # type: ignore[arg-type]
              env={}, rng=random.Random(seed))
    run.ledger.parent.mkdir(parents=True)
    if s.broker == "rabbitmq":
        run.prefix = f"faults{uuid.uuid4().hex[:6]}."
    if s.path == "ssh":
        from mqi_ssh.testing import start_test_server

        (folder / "sshd").mkdir()
        run.sshd = start_test_server(folder / "sshd")
        run.remote_root = folder / "gpu server"
        run.remote_root.mkdir()
    run.ws = Workspace(run.folder, build_config(run))
    for which, path in (("results", run.folder / "results"), ("remote", run.remote_root and run.remote_root / "cases")):
        if path is not None and any(f.startswith(f"{which}_disk_full") for f in s.faults):
            problem = try_mount(run, path, "48m")
            if problem:
                run.unavailable[which] = f"tmpfs refused: {problem}"
    check = run.ws.cli("check", timeout=120)
    if check.returncode != 0:
        raise RuntimeError(f"{s.name}: mqi-host check failed:\n{check.stdout}\n{check.stderr}")
    stop = threading.Event()
    try:
        run.log(f"{s.broker} broker, {s.path} path, {s.active} cases in flight (at least {s.cases}), {s.kills} SIGKILLs + {len(s.faults)} other faults")
        run.start_host()
        dropper = threading.Thread(target=drop_cases, args=(run, stop), daemon=True)
        dropper.start()
        chaos(run, stop)
        stop.set()
        dropper.join()
        last_fault = max((i.ended for i in run.injected), default=time.monotonic())
        if run.host is None or not run.host.running:
            run.start_host()
        run.log(f"{len(run.injected)} faults injected; waiting for every case to end")
        cases: dict[str, dict] = {}

        def all_final() -> bool:
            nonlocal cases
            proc = run.ws.cli("cases", "--json", "--names", timeout=60)
            if proc.returncode != 0:
                return False
            cases = {c["name"]: c for c in json.loads(proc.stdout)}
            return len(cases) >= run.dropped and all(c["state"] in FINAL_STATES for c in cases.values())

        wait_until(all_final, 300 + s.host_down_seconds, 1.0)
        recovery = max(0.0, time.monotonic() - last_fault)
        assert run.host is not None
        run.host.stop()
        time.sleep(1)
        left = orphans(run)
        result = judge(run, cases, recovery)
        result.orphans = len(left)
        result.notes.extend(f"orphan: {line}" for line in left)
        result.notes.extend(f"{k}: {v}" for k, v in run.unavailable.items())
        return result
    finally:
        stop.set()
        if run.host is not None and run.host.running:
            run.host.kill_everything()
        run.ws.kill_jobs()
        if run.remote_root is not None:
            from mqi_ssh.testing import kill_remote_jobs

            kill_remote_jobs(run.remote_root)
        if run.sshd is not None:
            run.sshd.stop()
        for mount in reversed(run.mounts):
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)
        if run.prefix:
            delete_queues(run)


def delete_queues(run: Run) -> None:
    from mqi_framework.broker.rabbitmq import RabbitBroker
    from mqi_framework.kinds import EVENTS_QUEUE, command_queue

    try:
        broker = RabbitBroker(AMQP_URL, prefix=run.prefix)
        try:
            for queue in [EVENTS_QUEUE] + [command_queue(n) for n in run.ws.config["workers"]]:
                broker.delete_queue(queue)
        finally:
            broker.close()
    except Exception as exc:  # cleaning up a broker that is gone is not a finding
        print(f"  (queues with prefix {run.prefix} not deleted: {exc})")


# ------------------------------------------------------------------------------ report

COLUMNS = [("scenario", "scenario"), ("faults", "faults"), ("sim runs", "sim_runs"), ("cases", "cases"),
           ("done", "done"), ("failed, real cause", "failed_real"), ("failed", "failed"), ("stuck", "stuck"),
           ("duplicate", "duplicate"), ("overlap", "overlap"), ("done w/o run", "done_without_run"),
           ("dead letters", "dead_letters"), ("orphans", "orphans"), ("recovery s", "recovery_s")]


def cell(result: Result, attr: str) -> str:
    value = getattr(result, attr)
    if attr == "recovery_s":
        return f"{value:.0f}"
    if attr == "dead_letters":
        return f"{value} ({result.dead_letters_all})"
    return str(value)


def table(results: list[Result], markdown: bool) -> str:
    heads = [h for h, _ in COLUMNS]
    rows = [[cell(r, a) for _, a in COLUMNS] for r in results]
    if markdown:
        lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    else:
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(heads)]
        lines = ["  ".join(h.rjust(w) for h, w in zip(heads, widths))]
        lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    for r in results:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(r.by_kind.items()))
        lines.append(f"{'' if markdown else '  '}{r.scenario}: {kinds}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true", help="the CI version: fewer cases and faults")
    parser.add_argument("--scenario", action="append", help="run only this scenario (repeatable)")
    parser.add_argument("--kills", type=int, help="SIGKILLs per scenario instead of the campaign's number")
    parser.add_argument("--seed", type=int, default=int(time.time()), help="random seed (printed; reruns a campaign)")
    parser.add_argument("--dir", type=Path, help="keep the workspaces here (default: a temp folder, removed)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown (for the docs)")
    args = parser.parse_args(argv)
    chosen = [s for s in scenarios(args.short) if not args.scenario or s.name in args.scenario]
    if not chosen:
        parser.error(f"no scenario named {args.scenario}")
    for s in chosen:
        if args.kills is not None:
            s.kills = args.kills
    base = args.dir or Path(tempfile.mkdtemp(prefix="mqi-faults-"))
    base.mkdir(parents=True, exist_ok=True)
    print(f"fault campaign ({'short' if args.short else 'long'}), seed {args.seed}, in {base}", flush=True)
    started = time.monotonic()
    results = [run_scenario(s, base, args.seed + i) for i, s in enumerate(chosen)]
    print(f"\n{table(results, args.markdown)}")
    failed = False
    for r in results:
        for note in r.notes:
            print(f"  {r.scenario}: {note}")
        if r.missed():
            failed = True
            print(f"  {r.scenario}: TARGET MISSED: {', '.join(r.missed())}")
    print(f"campaign took {time.monotonic() - started:.0f} s; target "
          f"{'MISSED' if failed else 'met: every case done or failed for its real cause, 0 in every other column'}")
    if args.dir is None and not failed:
        shutil.rmtree(base, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
