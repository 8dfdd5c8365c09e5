"""Fixtures for the contract suites: the same tests run over every backend.

``broker_factory`` is parametrized over backends. Each test gets a
:class:`BrokerFactory` with a unique queue prefix and a URL that ``open_broker``
understands (so that consumer *subprocesses* can reach the same store), and calling it
opens a NEW connection to the SAME store: tests that need two consumers call it twice.

To add a backend (e.g. RabbitMQ), add its name to ``BACKENDS`` and a branch in
``_backend_url`` that yields its URL (skipping when the server is not reachable) and
cleans up queues starting with the prefix afterwards.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from mqi_framework.broker import Broker, RetryPolicy, open_broker

BACKENDS = ["sqlite"]

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
        self._opened: list[Broker] = []

    def __call__(self, *, retry: RetryPolicy = FAST_RETRY, lease_seconds: float = SHORT_LEASE) -> Broker:
        broker = open_broker(self.url, retry=retry, lease_seconds=lease_seconds)
        self._opened.append(broker)
        return broker

    def queue(self, name: str = "q") -> str:
        """A queue name unique to this test."""
        return f"{self.prefix}.{name}"

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


def _backend_url(backend: str, tmp_path: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'broker.db'}"
        return
    raise AssertionError(f"unknown broker backend {backend!r}")  # pragma: no cover


@pytest.fixture(params=BACKENDS)
def broker_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerFactory]:
    backend = request.param
    prefix = f"t{uuid.uuid4().hex[:10]}"
    urls = _backend_url(backend, tmp_path)
    url = next(urls)
    factory = BrokerFactory(backend, url, prefix)
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
