"""The ``settings:`` of a dashboard worker section, and the bind-address rule.

No ``from __future__ import annotations`` here: cattrs structures the settings from the
real (evaluated) annotations.
"""

import ipaddress
from typing import Any, Optional

import attrs

#: host names and addresses that only this machine can reach
LOOPBACK_NAMES = ("127.0.0.1", "::1", "localhost")


def _positive(instance: Any, attribute: Any, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be greater than 0, got {value!r}")


def _not_negative(instance: Any, attribute: Any, value: float) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must be 0 (off) or more, got {value!r}")


def _port(instance: Any, attribute: Any, value: int) -> None:
    if not 0 <= value <= 65535:
        raise ValueError(f"{attribute.name} must be a TCP port 1..65535 (0: any free port), got {value!r}")


def _page_size(instance: Any, attribute: Any, value: int) -> None:
    if not 1 <= value <= 500:
        raise ValueError(f"{attribute.name} must be between 1 and 500, got {value!r}")


def _non_empty_or_none(instance: Any, attribute: Any, value: Optional[str]) -> None:
    if value is not None and not value.strip():
        raise ValueError(f"{attribute.name} is empty: leave the key out, or set a value (e.g. ${{MQI_DASHBOARD_TOKEN}})")


def _users(instance: Any, attribute: Any, value: dict) -> None:
    for name in value:
        if not name or ":" in name or name != name.strip():
            raise ValueError(f"users: user name {name!r} must be non-empty, without ':' or surrounding blanks")


@attrs.frozen
class DashboardSettings:
    """``workers.<name>.settings`` of a dashboard worker (``plugin: dashboard``, ``kind: service``)."""

    #: address to listen on; anything but 127.0.0.1, ::1 or localhost needs token or password_hash
    host: str = "127.0.0.1"
    #: TCP port (0: any free port, for tests)
    port: int = attrs.field(default=8080, validator=_port)
    #: bearer token for the API and /metrics, and a login secret for people (use ${ENV})
    token: Optional[str] = attrs.field(default=None, validator=_non_empty_or_none)
    #: password hash (``mqi-dashboard-hash-password``) of the user ``username``
    password_hash: Optional[str] = attrs.field(default=None, validator=_non_empty_or_none)
    #: the user name that goes with ``password_hash``
    username: str = "admin"
    #: more users: name -> password hash (each person logs in as themselves: the audit log names them)
    users: dict[str, str] = attrs.field(factory=dict, validator=_users)
    #: show case folder names (may be patient ids) in pages and API
    show_patient_names: bool = False
    #: how often open pages refresh themselves (seconds; 0: never)
    refresh_seconds: float = attrs.field(default=5.0, validator=_not_negative)
    #: cases per page in the case list (a request may ask for up to 500)
    page_size: int = attrs.field(default=50, validator=_page_size)
    #: waitress worker threads
    threads: int = attrs.field(default=4, validator=_positive)
    #: signs session cookies; default: random at each start. Sessions live in the dashboard's
    #: memory (so logout ends them), so everyone logs in again after a restart either way
    secret_key: Optional[str] = attrs.field(default=None, validator=_non_empty_or_none)
    #: mark cookies Secure (set when a TLS proxy fronts the dashboard)
    secure_cookies: bool = False
    #: hours of GPU history drawn on the GPU page
    gpu_history_hours: float = attrs.field(default=6.0, validator=_positive)
    #: largest request body accepted (bytes); bigger ones get 413 before authentication
    #: and are never spooled to disk (the dashboard's forms are a few hundred bytes)
    max_body_bytes: int = attrs.field(default=64 * 1024, validator=_positive)
    #: open connections in all; past it the least recently active idle ones are closed
    max_connections: int = attrs.field(default=100, validator=_positive)
    #: open connections one client address may hold (same eviction of its idle ones)
    connections_per_client: int = attrs.field(default=16, validator=_positive)
    #: seconds an idle connection is kept open
    idle_timeout_seconds: int = attrs.field(default=30, validator=_positive)

    @property
    def has_credentials(self) -> bool:
        return bool(self.token or self.password_hash or self.users)

    def accounts(self) -> dict[str, str]:
        """Every user name with its password hash."""
        out = dict(self.users)
        if self.password_hash:
            out.setdefault(self.username, self.password_hash)
        return out


def is_loopback(host: str) -> bool:
    """True when ``host`` is reachable only from this machine."""
    value = host.strip().strip("[]").lower()
    if value in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(value).is_loopback
    except ValueError:
        return False


def bind_problem(settings: DashboardSettings, config_key: str = "settings") -> Optional[str]:
    """Why the dashboard must not start with these settings, or None."""
    if is_loopback(settings.host) or settings.has_credentials:
        return None
    return (f"{config_key}.host is {settings.host!r}: that exposes the dashboard beyond this machine, "
            f"and no credentials are set. Set {config_key}.token (e.g. token: ${{MQI_DASHBOARD_TOKEN}}) or "
            f"{config_key}.password_hash (from `mqi-dashboard-hash-password`), or bind 127.0.0.1 and reach it "
            f"through an SSH tunnel.")
