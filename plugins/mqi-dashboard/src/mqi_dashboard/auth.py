"""Who may use the dashboard, and proof that a POST came from its own pages.

* No credentials configured (only allowed on a loopback bind): everyone who can reach the
  port may use it; actions are recorded as ``dashboard:local``.
* ``token``: API clients and Prometheus send ``Authorization: Bearer <token>`` (actor
  ``dashboard:token``); people may log in with it on ``/login`` and give their name
  (actor ``dashboard:<name>``; the name is self-declared).
* ``password_hash`` / ``users``: people log in with name and password (actor
  ``dashboard:<name>``).

Browser sessions live in a signed, HttpOnly, SameSite=Strict cookie. Every POST made with
a session (or without credentials at all) must carry the session's CSRF token, in the
form field ``csrf_token`` or the ``X-CSRF-Token`` header. A request authenticated by a
bearer token needs none: browsers never send that header on their own.

Passwords are hashed with werkzeug (``scrypt``); ``mqi-dashboard-hash-password`` prints a hash.
"""

from __future__ import annotations

import hmac
import re
import secrets
import threading
import time
from typing import Optional

from mqi_dashboard.settings import DashboardSettings

CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
LOCAL_ACTOR = "dashboard:local"
TOKEN_ACTOR = "dashboard:token"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._@-]{0,63}$")
#: failed logins per client address before it must wait
MAX_FAILURES = 10
FAILURE_WINDOW_SECONDS = 300.0


def hash_password(password: str) -> str:
    from werkzeug.security import generate_password_hash

    return generate_password_hash(password, method="scrypt")


def hash_problem(hashed: str) -> Optional[str]:
    """Why ``hashed`` is not a usable password hash, or None."""
    method = hashed.split("$", 1)[0].split(":", 1)[0]
    if "$" not in hashed or method not in ("scrypt", "pbkdf2"):
        return ("is not a password hash (expected one printed by `mqi-dashboard-hash-password`, "
                "starting with scrypt: or pbkdf2:)")
    return None


def check_password(settings: DashboardSettings, user: str, password: str) -> bool:
    from werkzeug.security import check_password_hash

    hashed = settings.accounts().get(user)
    if hashed is None or hash_problem(hashed):
        check_password_hash(hash_password("x"), password)  # same work for unknown users
        return False
    return check_password_hash(hashed, password)


def check_token(settings: DashboardSettings, token: str) -> bool:
    return bool(settings.token) and hmac.compare_digest(token.encode(), str(settings.token).encode())


def valid_name(name: str) -> bool:
    return bool(_NAME.match(name))


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def same_token(expected: Optional[str], given: Optional[str]) -> bool:
    return bool(expected) and bool(given) and hmac.compare_digest(str(expected), str(given))


class LoginThrottle:
    """Counts failed logins per client address; after ``MAX_FAILURES`` within the window the
    address is refused until the window has passed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failures: dict[str, list[float]] = {}

    def blocked(self, client: str) -> bool:
        now = time.monotonic()
        with self._lock:
            recent = [t for t in self._failures.get(client, []) if now - t < FAILURE_WINDOW_SECONDS]
            self._failures[client] = recent
            return len(recent) >= MAX_FAILURES

    def failed(self, client: str) -> None:
        with self._lock:
            self._failures.setdefault(client, []).append(time.monotonic())

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._failures.pop(client, None)


class SessionRegistry:
    """The browser sessions that are alive, kept on the server. The signed cookie only names a
    session; a session id that is not here (logged out, expired, or from before a restart) is
    refused, so logging out ends the session even where a copy of the cookie survives."""

    def __init__(self, lifetime_seconds: float) -> None:
        self.lifetime = lifetime_seconds
        self._lock = threading.Lock()
        self._expires: dict[str, float] = {}

    def start(self) -> str:
        """A new session id, valid for the lifetime."""
        sid = secrets.token_urlsafe(24)
        now = time.monotonic()
        with self._lock:
            self._expires = {k: t for k, t in self._expires.items() if t > now}
            self._expires[sid] = now + self.lifetime
        return sid

    def alive(self, sid: Optional[str]) -> bool:
        if not sid:
            return False
        with self._lock:
            expires = self._expires.get(sid)
            if expires is None:
                return False
            if expires <= time.monotonic():
                del self._expires[sid]
                return False
            return True

    def end(self, sid: Optional[str]) -> None:
        with self._lock:
            self._expires.pop(sid or "", None)


def hash_password_main(argv: Optional[list[str]] = None) -> int:
    """``mqi-dashboard-hash-password``: read a password (twice, not echoed) and print its hash."""
    import argparse
    import getpass
    import sys

    parser = argparse.ArgumentParser(
        prog="mqi-dashboard-hash-password",
        description="Print a password hash for workers.<dashboard>.settings.password_hash (or users:).")
    parser.add_argument("--stdin", action="store_true", help="read the password from standard input (one line)")
    args = parser.parse_args(argv)
    if args.stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("error: the passwords differ", file=sys.stderr)
            return 2
    if len(password) < 8:
        print("error: use at least 8 characters", file=sys.stderr)
        return 2
    print(hash_password(password))
    return 0
