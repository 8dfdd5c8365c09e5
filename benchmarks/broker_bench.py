"""Broker throughput and orchestration overhead, measured in one run.

    python benchmarks/broker_bench.py                      # both parts (needs RabbitMQ)
    python benchmarks/broker_bench.py --messages 5000 --rounds 5 --cases 10 --steps 20
    MQI_BENCH_AMQP_URL=amqp://user:pass@host/vhost python benchmarks/broker_bench.py

Part 1, messages per second through one publish (with publisher confirm) -> get -> ack cycle
per message, on a durable queue of the type the backend picks (quorum on RabbitMQ >= 3.10):
our ``RabbitBroker`` against a bare pika loop doing the same on the same server
(``basic_publish`` persistent + mandatory on a confirm channel, ``basic_get``,
``basic_ack``), alternating the two for ``--rounds`` rounds and comparing medians. The
embedded SQLite broker is shown for reference. Goal: RabbitBroker >= 0.7x bare pika.

Part 2, end-to-end orchestration overhead per workflow step with no-op plugins: a workflow
of ``--steps`` steps (a no-op interpreter, then no-op transfers) runs ``--cases`` cases one
after the other through the real Conductor and WorkerRuntime (state in SQLite, commands
and events over the broker), on both backends, in two ways:

* ``round-robin``: one thread calls ``step_once(wait=0)`` on the conductor and the two
  workers in turn: the pure cost of the machinery (broker round trips, SQLite transactions);
* ``threads``: each runtime in its own thread, waiting in ``get(timeout=0.2)`` as
  ``mqi-host run``'s processes do: what a step costs including how fast a waiting consumer
  wakes up (RabbitMQ pushes; the embedded queue polls every 50 ms).

Goal: <= 30 ms per step. Exit status 1 when a goal is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
THROUGHPUT_GOAL = 0.7
STEP_GOAL_MS = 30.0


# ------------------------------------------------------------------------------ part 1


def ours_cycle(broker: Any, queue: str, n: int) -> float:
    body = {"type": "bench", "case": "case-000001", "step": "simulate", "n": 0}
    start = time.perf_counter()
    for i in range(n):
        body["n"] = i
        broker.publish(queue, body)
        delivery = broker.get(queue)
        assert delivery is not None and delivery.body["n"] == i
        broker.ack(delivery)
    return n / (time.perf_counter() - start)


def bare_cycle(channel: Any, queue: str, n: int) -> float:
    import pika

    body = json.dumps({"type": "bench", "case": "case-000001", "step": "simulate", "n": 0}).encode()
    start = time.perf_counter()
    for _ in range(n):
        props = pika.BasicProperties(content_type="application/json", delivery_mode=2,
                                     message_id=uuid.uuid4().hex, headers={"mqi-attempts": 0})
        channel.basic_publish("", queue, body, props, mandatory=True)
        method, _props, _body = channel.basic_get(queue, auto_ack=False)
        assert method is not None
        channel.basic_ack(method.delivery_tag)
    return n / (time.perf_counter() - start)


def throughput(url: str, messages: int, rounds: int) -> dict[str, float]:
    import pika

    from mqi_framework.broker import SqliteBroker
    from mqi_framework.broker.rabbitmq import RabbitBroker

    prefix = f"bench{uuid.uuid4().hex[:8]}."
    ours = RabbitBroker(url, prefix=prefix)
    ours.depth("warm")  # connect, learn the server version and queue type
    conn = pika.BlockingConnection(pika.URLParameters(url))
    channel = conn.channel()
    channel.confirm_delivery()
    bare_queue = prefix + "bare"
    channel.queue_declare(bare_queue, durable=True, arguments=ours._base_args())
    kind = "quorum" if ours._quorum else "classic"
    print(f"part 1: publish (confirm) -> get -> ack, {messages} messages x {rounds} rounds, "
          f"{kind} queues on RabbitMQ {ours._server_version} at {ours.where}")
    rates: dict[str, list[float]] = {"bare pika": [], "RabbitBroker": []}
    try:
        ours_cycle(ours, "ours", 200)  # warm-up both
        bare_cycle(channel, bare_queue, 200)
        for r in range(rounds):
            rates["bare pika"].append(bare_cycle(channel, bare_queue, messages))
            rates["RabbitBroker"].append(ours_cycle(ours, "ours", messages))
            print(f"  round {r + 1}: bare pika {rates['bare pika'][-1]:8.0f} msg/s   "
                  f"RabbitBroker {rates['RabbitBroker'][-1]:8.0f} msg/s")
        with tempfile.TemporaryDirectory() as tmp:
            embedded = SqliteBroker(Path(tmp) / "queue.db")
            embedded_rate = ours_cycle(embedded, "ours", messages)
            embedded.close()
    finally:
        channel.queue_delete(bare_queue)
        conn.close()
        ours.delete_queue("ours")
        ours.delete_queue("warm")
        ours.close()
    bare = statistics.median(rates["bare pika"])
    mine = statistics.median(rates["RabbitBroker"])
    print(f"  median: bare pika {bare:.0f} msg/s ({1000 / bare:.2f} ms/msg), RabbitBroker {mine:.0f} msg/s "
          f"({1000 / mine:.2f} ms/msg)")
    print(f"  RATIO RabbitBroker / bare pika = {mine / bare:.2f}x (goal >= {THROUGHPUT_GOAL}x)")
    print(f"  (embedded SQLite broker, same cycle: {embedded_rate:.0f} msg/s)")
    return {"bare": bare, "ours": mine, "ratio": mine / bare, "sqlite": embedded_rate}


# ------------------------------------------------------------------------------ part 2


def noop_plugins() -> Any:
    from mqi_framework import hookimpl
    from mqi_framework import protocols as p

    class NoopInterpreter(p.Interpreter):
        name = "bench.noop"

        def interpret(self, case_dir: Path) -> p.CasePlan:
            return p.CasePlan(beams=[p.BeamPlan(number=1, name="B1", delivery_dir="d1")])

        def prepare(self, case_dir: Path, plan: p.CasePlan, staging_dir: Path, remote_dir: str) -> dict[int, str]:
            return {1: "beam1/input.in"}

        def parse_log(self, text: str) -> p.LogVerdict:
            return p.LogVerdict("success")

    class NoopTransfer(p.Transfer):
        name = "bench.noop"

        def upload(self, local_dir: Path, remote_dir: str, progress: Any) -> p.TransferResult:
            return p.TransferResult(files=0, bytes=0)

        def download(self, remote_dir: str, local_dir: Path, progress: Any) -> p.TransferResult:
            return p.TransferResult(files=0, bytes=0)

    class Plugins:
        @hookimpl
        def mqi_register_interpreters(self, register: Callable) -> None:
            register(NoopInterpreter)

        @hookimpl
        def mqi_register_transfers(self, register: Callable) -> None:
            register(NoopTransfer)

    return Plugins()


def bench_config(url: str, prefix: str, steps: int) -> dict:
    workflow = [{"name": "prepare", "worker": "prepare"}]
    workflow += [{"name": f"t{i}", "worker": "transfer", "direction": "upload" if i % 2 else "download"}
                 for i in range(1, steps)]
    return {
        "workspace": ".",
        "broker": {"url": url, "queue_prefix": prefix, "lease_seconds": 30, "max_attempts": 3,
                   "retry_base_seconds": 0.2},
        "workers": {
            "scan": {"plugin": "core.fs", "settings": {"inboxes": ["inbox"]}},  # not run: cases are injected
            "prepare": {"plugin": "bench.noop", "kind": "interpreter"},
            "transfer": {"plugin": "bench.noop", "kind": "transfer"},
        },
        "workflow": {"steps": workflow},
        "supervision": {"heartbeat_seconds": 1.0, "tick_seconds": 0.5},
        "logging": {"level": "WARNING"},
    }


def orchestrate(url: str, backend: str, mode: str, cases: int, steps: int) -> float:
    """Milliseconds per workflow step, cases run one after the other."""
    from mqi_framework.config import load_config
    from mqi_framework.kinds import EVENTS_QUEUE
    from mqi_framework.plugins import PluginHost
    from mqi_framework.store import connect, open_state
    from mqi_framework.worker import WorkerRuntime, make_broker
    from mqi_framework.workspace import write_workspace

    host = PluginHost(load_entry_points=False)
    host.register(noop_plugins(), name="bench")
    prefix = f"bench{uuid.uuid4().hex[:8]}."
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        broker_url = url if backend == "rabbitmq" else "sqlite:queue.db"
        loaded = load_config(write_workspace(folder, bench_config(broker_url, prefix, steps)))
        names = ["conductor", "prepare", "transfer"]
        injector = make_broker(loaded)
        stop = threading.Event()
        runtimes: list[Any] = []
        threads: list[threading.Thread] = []
        if mode == "round-robin":
            runtimes = [WorkerRuntime(loaded, n, plugin_host=host) for n in names]
        else:
            ready = threading.Barrier(len(names) + 1)
            building = threading.Lock()
            open_state(loaded.database_path).close()  # schema first, then the runtimes one by one

            def serve(name: str) -> None:
                with building:
                    rt = WorkerRuntime(loaded, name, plugin_host=host)  # its own SQLite and broker connections
                runtimes.append(rt)
                ready.wait()
                while not stop.is_set():
                    rt.step_once(wait=0.2)

            threads = [threading.Thread(target=serve, args=(n,), daemon=True) for n in names]
            for t in threads:
                t.start()
            ready.wait()
        state = connect(loaded.database_path, readonly=True)
        per_case: list[float] = []
        try:
            for c in range(cases + 1):  # case 0 warms up
                name = f"bench-{c:03d}"
                (folder / "inbox" / name).mkdir(parents=True)
                start = time.perf_counter()
                injector.publish(EVENTS_QUEUE, {"type": "case.seen", "worker": "scan", "name": name,
                                                "path": str(folder / "inbox" / name),
                                                "inbox": str(folder / "inbox"), "reason": "marker"})
                deadline = time.monotonic() + 60
                while True:
                    if mode == "round-robin":
                        for rt in runtimes:
                            rt.step_once(wait=0)
                    else:
                        time.sleep(0.001)
                    row = state.execute("SELECT state FROM cases WHERE name = ?", (name,)).fetchone()
                    if row is not None and row[0] in ("done", "failed", "rejected"):
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{backend}/{mode}: case {name} did not finish")
                if row[0] != "done":
                    raise RuntimeError(f"{backend}/{mode}: case {name} ended {row[0]}")
                if c:
                    per_case.append(time.perf_counter() - start)
        finally:
            stop.set()
            for t in threads:
                t.join(10)
            state.close()
            for rt in runtimes:
                rt.close()
            if backend == "rabbitmq":
                from mqi_framework.kinds import command_queue

                for queue in [EVENTS_QUEUE] + [command_queue(n) for n in loaded.config.workers]:
                    injector.delete_queue(queue)  # type: ignore[attr-defined]
            injector.close()
    return statistics.median(per_case) / steps * 1000


def overhead(url: str, cases: int, steps: int) -> dict[tuple[str, str], float]:
    print(f"\npart 2: orchestration overhead per workflow step, no-op plugins, {steps} steps per case, "
          f"{cases} cases one after the other (median case)")
    results = {}
    for mode in ("round-robin", "threads"):
        for backend in ("sqlite", "rabbitmq"):
            ms = orchestrate(url, backend, mode, cases, steps)
            results[(backend, mode)] = ms
            print(f"  {mode:<12} {backend:<9} {ms:6.2f} ms per step   "
                  f"(goal <= {STEP_GOAL_MS:.0f} ms: {'ok' if ms <= STEP_GOAL_MS else 'MISSED'})")
        print(f"  {mode:<12} RATIO rabbitmq / sqlite = {results[('rabbitmq', mode)] / results[('sqlite', mode)]:.2f}x")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("MQI_BENCH_AMQP_URL",
                                                        os.environ.get("MQI_TEST_AMQP_URL", DEFAULT_URL)))
    parser.add_argument("--messages", type=int, default=2000, help="messages per round (default 2000)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="workflow steps per case (default 10)")
    parser.add_argument("--part", choices=("all", "throughput", "overhead"), default="all")
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    from mqi_framework.broker import redact_url

    print(f"RabbitMQ: {redact_url(args.url)}")
    ok = True
    if args.part in ("all", "throughput"):
        ok &= throughput(args.url, args.messages, args.rounds)["ratio"] >= THROUGHPUT_GOAL
    if args.part in ("all", "overhead"):
        ok &= all(ms <= STEP_GOAL_MS for ms in overhead(args.url, args.cases, args.steps).values())
    print("\nall goals met" if ok else "\nsome goal MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
