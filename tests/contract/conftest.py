"""Fixtures for the contract suites: the same tests run over every backend.

``broker_factory`` is parametrized over backends. Each test gets a
:class:`BrokerFactory` with a unique queue prefix and a URL that ``open_broker``
understands (so that consumer *subprocesses* can reach the same store), and calling it
opens a NEW connection to the SAME store: tests that need two consumers call it twice.

To add a backend, add its name to ``BACKENDS`` and a branch in ``_backend_url`` that
yields its URL (skipping when the server is not reachable) and cleans up the test's queues
afterwards.

RabbitMQ runs at ``MQI_TEST_AMQP_URL`` (default amqp://guest:guest@127.0.0.1:5672/%2F);
every test's queues carry a unique prefix and are deleted afterwards. When the server
cannot be reached the RabbitMQ tests are skipped, except with ``CI=true``, where they fail.

Backends differ in documented capabilities (class attributes of the broker, see
``mqi_framework/broker/base.py``); a test that needs one is marked
``@pytest.mark.requires("lease_expiry")`` and is skipped, with the reason, on a backend
without it. ``connection_leases`` is the RabbitMQ counterpart: a lease that lasts as long
as the consumer's connection.
"""

from __future__ import annotations

import functools
import os
import sys
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from mqi_framework.broker import Broker, RetryPolicy, open_broker, redact_url

BACKENDS = ["sqlite", "rabbitmq"]

AMQP_URL = os.environ.get("MQI_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")



def _capabilities(cls: type) -> set[str]:
    """Capability names from a broker class's attributes (``Broker.supports_lease_expiry``, ...)."""
    caps = {"lease_expiry" if cls.supports_lease_expiry else "connection_leases"}
    if cls.depth_counts_leased:
        caps.add("depth_counts_leased")
    return caps


def _backend_classes() -> dict[str, type]:
    from mqi_framework.broker.rabbitmq import RabbitBroker
    from mqi_framework.broker.sqlite import SqliteBroker

    return {"sqlite": SqliteBroker, "rabbitmq": RabbitBroker}


#: what each backend can do
CAPABILITIES = {name: _capabilities(cls) for name, cls in _backend_classes().items()}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "requires(capability): the test needs a broker capability "
                                       "(lease_expiry, depth_counts_leased, connection_leases)")


@functools.lru_cache(maxsize=None)
def rabbitmq_problem(url: str = AMQP_URL) -> str:
    """'' when RabbitMQ at ``url`` answers, else why not (checked once per session)."""
    from mqi_framework.broker import BrokerError

    broker = open_broker(url)
    try:
        broker.depth("mqi.probe")
        return ""
    except BrokerError as exc:
        return str(exc)
    finally:
        broker.close()


def require_rabbitmq(url: str = AMQP_URL) -> None:
    """Skip (fail with CI=true) when RabbitMQ at ``url`` cannot be used."""
    problem = rabbitmq_problem(url)
    if problem:
        message = f"RabbitMQ at {redact_url(url)} (MQI_TEST_AMQP_URL) is not usable: {problem}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " -- CI=true: RabbitMQ tests must run", pytrace=False)
        pytest.skip(message)

REPO_ROOT = Path(__file__).resolve().parents[2]

# Short timings keep the suite fast; tests that need other values pass their own.
FAST_RETRY = RetryPolicy(max_attempts=3, base_seconds=0.05, max_seconds=0.2)
SHORT_LEASE = 0.5


class BrokerFactory:
    """Opens connections to one backend store; closes them all at teardown."""

    def __init__(self, backend: str, url: str, prefix: str) -> None:
        self.backend = backend
        self.url = url
        self.prefix = prefix
        self.queues: list[str] = []
        self._opened: list[Broker] = []

    @property
    def capabilities(self) -> set[str]:
        return CAPABILITIES[self.backend]

    @property
    def supports_lease_expiry(self) -> bool:
        return "lease_expiry" in self.capabilities

    @property
    def depth_counts_leased(self) -> bool:
        return "depth_counts_leased" in self.capabilities

    def __call__(self, *, retry: RetryPolicy = FAST_RETRY, lease_seconds: float = SHORT_LEASE) -> Broker:
        broker = open_broker(self.url, retry=retry, lease_seconds=lease_seconds)
        self._opened.append(broker)
        return broker

    def queue(self, name: str = "q") -> str:
        """A queue name unique to this test."""
        queue = f"{self.prefix}.{name}"
        if queue not in self.queues:
            self.queues.append(queue)
        return queue

    def subprocess_env(self) -> dict[str, str]:
        """Environment for a consumer subprocess: finds this checkout's mqi_framework."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def python(self) -> str:
        return sys.executable

    def close_all(self) -> None:
        for broker in self._opened:
            try:
                broker.close()
            except Exception:  # noqa: BLE001 - teardown must not mask the test's outcome
                pass
        self._opened.clear()


def delete_rabbitmq_queues(url: str, queues: list[str], prefix: str = "") -> None:
    """Delete queues with their DLQs and delay queues (test cleanup)."""
    from mqi_framework.broker.rabbitmq import RabbitBroker

    broker = RabbitBroker(url, prefix=prefix)
    try:
        for queue in queues:
            broker.delete_queue(queue)
    finally:
        broker.close()


def _backend_url(backend: str, tmp_path: Path, factory_queues: list[str]) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'broker.db'}"
        return
    if backend == "rabbitmq":
        require_rabbitmq(AMQP_URL)
        yield AMQP_URL
        delete_rabbitmq_queues(AMQP_URL, factory_queues)
        return
    raise AssertionError(f"unknown broker backend {backend!r}")  # pragma: no cover


@pytest.fixture(params=BACKENDS)
def broker_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerFactory]:
    backend = request.param
    needed = [m.args[0] for m in request.node.iter_markers("requires")]
    missing = [c for c in needed if c not in CAPABILITIES[backend]]
    if missing:
        pytest.skip(f"the {backend} broker has no {', '.join(missing)} (see docs/brokers.md)")
    prefix = f"t{uuid.uuid4().hex[:10]}"
    queues: list[str] = []
    urls = _backend_url(backend, tmp_path, queues)
    url = next(urls)
    factory = BrokerFactory(backend, url, prefix)
    factory.queues = queues
    try:
        yield factory
    finally:
        factory.close_all()
        for _ in urls:  # let the backend clean up
            pass


@pytest.fixture
def broker(broker_factory: BrokerFactory) -> Broker:
    """One connection with the fast defaults."""
    return broker_factory()


class RabbitKit:
    """For RabbitMQ-only tests: brokers on one unique queue prefix, all deleted afterwards."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.prefix = f"t{uuid.uuid4().hex[:10]}."
        self.queues: set[tuple[str, str]] = set()  # (prefix, queue) to delete
        self._opened: list[Broker] = []

    def broker(self, *, prefix: str | None = None, retry: RetryPolicy = FAST_RETRY, url: str | None = None,
               **kwargs) -> "Broker":
        from mqi_framework.broker.rabbitmq import RabbitBroker

        broker = RabbitBroker(url or self.url, retry=retry, prefix=self.prefix if prefix is None else prefix,
                              **kwargs)
        self._opened.append(broker)
        return broker

    def queue(self, name: str = "q", *, prefix: str | None = None) -> str:
        self.queues.add((self.prefix if prefix is None else prefix, name))
        return name

    def close(self) -> None:
        for broker in self._opened:
            try:
                broker.close()
            except Exception:  # noqa: BLE001 - teardown
                pass
        by_prefix: dict[str, list[str]] = {}
        for prefix, name in self.queues:
            by_prefix.setdefault(prefix, []).append(name)
        for prefix, names in by_prefix.items():
            delete_rabbitmq_queues(self.url, names, prefix)


@pytest.fixture
def rabbit() -> Iterator[RabbitKit]:
    require_rabbitmq(AMQP_URL)
    kit = RabbitKit(AMQP_URL)
    try:
        yield kit
    finally:
        kit.close()
