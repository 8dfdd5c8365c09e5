"""End to end over RabbitMQ: `mqi-host run` with `broker.url: amqp://...`, a broker restart in the
middle of a run, a consumer killed while it holds a message, and the CLI (check, dlq, status).

RabbitMQ runs at ``MQI_TEST_AMQP_URL`` (default amqp://guest:guest@127.0.0.1:5672/%2F). Every
test uses its own ``broker.queue_prefix`` and deletes its queues afterwards. When the broker
cannot be reached the tests are skipped, except with ``CI=true``, where they fail. The restart
test runs ``rabbitmqctl stop_app`` / ``start_app`` (``MQI_TEST_RABBITMQCTL`` overrides the
command, e.g. ``docker exec rabbitmq rabbitmqctl``); it is skipped when that command cannot
talk to the broker.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import time
import urllib.parse
import uuid
from typing import Iterator, Optional

import pytest

from mqi_framework.broker import BrokerError, open_broker, redact_url
from mqi_framework.kinds import EVENTS_QUEUE, command_queue
from mqi_framework.testing import Workspace, wait_final
from mqi_framework.workspace import fast_config, wait_until

pytestmark = pytest.mark.integration
samples = pytest.importorskip("mqi_moqui.samples")
generate_case = samples.generate_case

AMQP_URL = os.environ.get("MQI_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
RABBITMQCTL = shlex.split(os.environ.get("MQI_TEST_RABBITMQCTL", "rabbitmqctl"))

_problem: Optional[str] = None


def require_rabbitmq() -> None:
    """Skip (fail with CI=true) when RabbitMQ at MQI_TEST_AMQP_URL cannot be used."""
    global _problem
    if _problem is None:
        broker = open_broker(AMQP_URL)
        try:
            broker.depth("mqi.probe")
            _problem = ""
        except BrokerError as exc:
            _problem = str(exc)
        finally:
            broker.close()
    if _problem:
        message = f"RabbitMQ at {redact_url(AMQP_URL)} (MQI_TEST_AMQP_URL) is not usable: {_problem}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " -- CI=true: RabbitMQ tests must run", pytrace=False)
        pytest.skip(message)


def rabbitmqctl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*RABBITMQCTL, *args], capture_output=True, text=True, timeout=timeout)


def url_with(**changes: str) -> str:
    """AMQP_URL with its password, port or vhost replaced."""
    parts = urllib.parse.urlsplit(AMQP_URL)
    user = parts.username or "guest"
    password = changes.get("password", parts.password or "")
    port = changes.get("port", str(parts.port or 5672))
    path = changes.get("vhost", parts.path.lstrip("/") or "%2F")
    return urllib.parse.urlunsplit((parts.scheme, f"{user}:{password}@{parts.hostname}:{port}", "/" + path, "", ""))


class RabbitWorkspace(Workspace):
    prefix: str

    def broker(self):
        return open_broker(AMQP_URL, prefix=self.prefix, queues=self.queues())

    def queues(self) -> list[str]:
        return [EVENTS_QUEUE] + [command_queue(name) for name in self.config["workers"]]

    def physical(self, queue: str) -> str:
        return self.prefix + queue

    def counts(self, queue: str, missing_ok: bool = False) -> tuple[int, int]:
        """(ready messages, consumers) of a queue, straight from RabbitMQ; with
        ``missing_ok`` a queue nobody declared yet counts as (0, 0)."""
        import pika

        conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        try:
            ok = conn.channel().queue_declare(self.physical(queue), passive=True).method
            return ok.message_count, ok.consumer_count
        except pika.exceptions.ChannelClosedByBroker as exc:
            if missing_ok and exc.reply_code == 404:
                return 0, 0
            raise
        finally:
            if conn.is_open:
                conn.close()


def make_workspace(folder, overrides: Optional[dict] = None) -> RabbitWorkspace:
    prefix = f"it{uuid.uuid4().hex[:8]}."
    config = fast_config(overrides={"broker": {"url": AMQP_URL, "queue_prefix": prefix}, **(overrides or {})})
    ws = RabbitWorkspace(folder, config)
    ws.prefix = prefix
    return ws


@pytest.fixture
def rws(tmp_path) -> Iterator[RabbitWorkspace]:
    require_rabbitmq()
    ws = make_workspace(tmp_path / "rws")
    yield ws
    ws.kill_jobs()
    from mqi_framework.broker.rabbitmq import RabbitBroker

    broker = RabbitBroker(AMQP_URL, prefix=ws.prefix)
    try:
        for queue in ws.queues():
            broker.delete_queue(queue)
    finally:
        broker.close()


def simulate_attempts(ws: Workspace) -> list[int]:
    return [r[0] for r in ws.query("SELECT attempt FROM steps WHERE name = 'simulate'")]


def running_simulations(ws: Workspace) -> int:
    rows = ws.query("SELECT COUNT(*) FROM steps WHERE name = 'simulate' AND state = 'running'")
    return rows[0][0] if rows else 0


def step_rows(ws: Workspace, name: str) -> list[dict]:
    return [dict(r) for r in ws.query("SELECT state, attempt FROM steps WHERE name = ?", name)]


def worker_row(ws: Workspace, name: str) -> dict:
    rows = ws.query("SELECT * FROM workers WHERE name = ?", name)
    return dict(rows[0]) if rows else {}


def simulate_job_folders(ws: Workspace) -> list[str]:
    return sorted(p.name for p in (ws.folder / "jobs").iterdir() if "simulate" in p.name)


def assert_drained(ws: RabbitWorkspace) -> None:
    broker = ws.broker()
    try:
        assert {q: broker.depth(q) for q in ws.queues()} == {q: 0 for q in ws.queues()}
        assert broker.dlq_list() == []
    finally:
        broker.close()


# ------------------------------------------------------------------------------------- tests


def test_three_cases_end_to_end_over_rabbitmq(rws, host_factory):
    for i in range(3):
        generate_case(rws.inbox, f"RMQ-{i}", seed=i)
    host = host_factory(workspace=rws)
    cases = wait_final(rws, 3)
    for case in cases.values():
        assert case["state"] == "done", case
        assert [b["state"] for b in case["beams"]] == ["done"] * 3
        assert samples.outputs_missing(rws.folder, case) == []
    assert host.stop() == 0
    assert simulate_attempts(rws) == [1] * 9
    assert rws.gpu_allocations() == []
    assert not (rws.folder / "queue.db").exists()  # nothing went through the embedded queue
    assert_drained(rws)


def test_broker_restart_mid_run_loses_nothing_and_runs_no_beam_twice(rws, host_factory):
    status = rabbitmqctl("-q", "status", timeout=30)
    if status.returncode != 0:
        pytest.skip(f"cannot restart RabbitMQ with {' '.join(RABBITMQCTL)}: {status.stderr.strip()[:300]}")
    for i in range(2):
        generate_case(rws.inbox, f"RESTART-{i}", seed=20 + i)
    host = host_factory(workspace=rws, env={"MQI_STANDIN_SECONDS": "1.5"})
    assert wait_until(lambda: running_simulations(rws) >= 1, 60), rws.logs()
    stopped = rabbitmqctl("stop_app")
    try:
        assert stopped.returncode == 0, stopped.stderr
        # the detached simulations finish meanwhile: their reports wait in retrying publishers,
        # the conductor's commands in its outbox
        time.sleep(4)
    finally:
        started = rabbitmqctl("start_app")
        assert started.returncode == 0, started.stderr
        rabbitmqctl("await_startup")
    cases = wait_final(rws, 2, timeout=150)
    for case in cases.values():
        assert case["state"] == "done", case
        assert samples.outputs_missing(rws.folder, case) == []
    assert host.stop() == 0
    assert simulate_attempts(rws) == [1] * 6  # no beam ran twice...
    assert len(simulate_job_folders(rws)) == 6  # ...nor was started twice
    assert rws.gpu_allocations() == []
    logs = "\n".join(p.read_text(errors="replace") for p in (rws.folder / "logs").glob("*.log"))
    assert "connection lost" in logs and "reconnected to RabbitMQ" in logs
    assert "guest:guest" not in logs  # credentials never logged
    assert_drained(rws)


def test_consumer_killed_holding_an_unacked_message_gets_it_redelivered(rws, host_factory):
    host = host_factory(workspace=rws)
    assert wait_until(lambda: worker_row(rws, "transfer").get("state") == "running", 30), rws.logs()
    pid = worker_row(rws, "transfer")["pid"]
    # Freeze the transfer worker while it waits for a command (a consumer is registered):
    # RabbitMQ will push the upload command to it, and it will hold it, unacked.
    for _ in range(40):
        os.kill(pid, signal.SIGSTOP)
        time.sleep(0.3)
        # the worker may report "running" before it declared its queue: no queue, no consumer yet
        if rws.counts(command_queue("transfer"), missing_ok=True)[1] == 1:
            break
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.05 + 0.1 * (_ % 3))
    else:
        pytest.fail("never caught the transfer worker waiting with a consumer")
    try:
        generate_case(rws.inbox, "HELD", seed=31)
        assert wait_until(lambda: [s["state"] for s in step_rows(rws, "upload")] == ["dispatched"], 60), rws.logs()
        time.sleep(0.5)
        assert rws.counts(command_queue("transfer")) == (0, 1)  # not ready: the frozen consumer holds it
        assert [s["state"] for s in step_rows(rws, "upload")] == ["dispatched"]
    finally:
        os.kill(pid, signal.SIGKILL)
    case = wait_final(rws, 1, timeout=90)["HELD"]
    assert case["state"] == "done", case
    assert step_rows(rws, "upload") == [{"state": "done", "attempt": 1}]  # redelivered, not retried as a step
    assert simulate_attempts(rws) == [1, 1, 1]
    assert worker_row(rws, "transfer")["restarts"] >= 1
    assert host.stop() == 0
    assert_drained(rws)


def test_check_reports_broker_problems_clearly_without_credentials(tmp_path, monkeypatch):
    require_rabbitmq()
    secret = "not-the-password-" + uuid.uuid4().hex[:8]
    monkeypatch.setenv("MQI_TEST_BROKER_PASSWORD", secret)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        free_port = str(s.getsockname()[1])
    good = make_workspace(tmp_path / "good")
    assert good.cli("check").returncode == 0, good.cli("check").stdout
    cases = {
        "password": (url_with(password="${MQI_TEST_BROKER_PASSWORD}"), "refused the login of user"),
        "vhost": (url_with(vhost="mqi-no-such-vhost"), "virtual host 'mqi-no-such-vhost' does not exist"),
        "down": (url_with(port=free_port), "cannot reach RabbitMQ"),
    }
    for name, (url, expected) in cases.items():
        ws = Workspace(tmp_path / name, fast_config(overrides={"broker": {"url": url}}))
        proc = ws.cli("check")
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0, out
        assert expected in out, out
        assert secret not in out
        assert "guest:guest" not in out


def test_dlq_list_replay_purge_and_status_through_the_cli(rws):
    broker = rws.broker()
    try:
        broker.publish("mqi.execute", {"type": "run_step", "case": "case-000009", "step": "simulate"})
        delivery = broker.get("mqi.execute", timeout=5)
        assert broker.nack(delivery, reason="RuntimeError: boom", retry=False) is False
        listed = json.loads(rws.cli("dlq", "list", "--json", check=True).stdout)
        assert len(listed) == 1 and listed[0]["reason"] == "RuntimeError: boom"
        assert listed[0]["queue"] == "mqi.execute"  # the site's name, without the prefix
        assert "case-000009" in rws.cli("dlq", "list", check=True).stdout
        from mqi_framework.store import open_state

        open_state(rws.folder / "state.db").close()  # status reads the state database too
        status = rws.cli("status", "--json", check=True)
        assert json.loads(status.stdout)["dead_letters"] == 1
        assert "replayed 1" in rws.cli("dlq", "replay", listed[0]["id"], check=True).stdout
        assert broker.depth("mqi.execute") == 1
        delivery = broker.get("mqi.execute", timeout=5)
        assert (delivery.message_id, delivery.attempt) == (listed[0]["message_id"], 1)
        broker.nack(delivery, reason="again", retry=False)
        assert "purged 1" in rws.cli("dlq", "purge", "--all", check=True).stdout
        assert json.loads(rws.cli("dlq", "list", "--json", check=True).stdout) == []
    finally:
        broker.close()
