"""The dashboard's connection policy: a client that opens many connections and leaves them
idle (or trickles a request in slowly) must not lock everyone else out, ``/healthz``
included. waitress alone stops accepting at its connection limit and keeps an idle
connection for ``channel_timeout`` seconds, so 100 idle sockets silence it for minutes.

Here, when a new connection arrives and its client already holds ``per_client`` of them,
or the server holds ``total``, the least recently active *idle* connections (no request
being answered, nothing left to send) are closed to make room: the newcomer is served, the
hoarder loses its oldest sockets. Only when every connection is busy is the newcomer
refused (closed at once), which is load, not an attack to defend against here.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

from waitress.channel import HTTPChannel

log = logging.getLogger(__name__)


def client_of(channel: Any) -> str:
    """The address a connection comes from (its port left out)."""
    addr = getattr(channel, "addr", None)
    return str(addr[0]) if isinstance(addr, tuple) and addr else str(addr)


def is_idle(channel: Any) -> bool:
    """Whether closing ``channel`` loses no work: no complete request queued or being run,
    and no response bytes waiting to go out (a half-sent request counts as idle)."""
    return not channel.requests and not channel.total_outbufs_len


def to_close(channels: Iterable[Any], newcomer: Any, per_client: int, total: int) -> tuple[list[Any], bool]:
    """Which idle connections to close so that ``newcomer`` fits both limits, oldest first,
    and whether it then fits (False: everything is busy, refuse the newcomer)."""
    others = sorted((c for c in channels if c is not newcomer), key=lambda c: c.last_activity)
    client = client_of(newcomer)
    victims: list[Any] = []
    mine = [c for c in others if client_of(c) == client]
    for channel in mine:
        if len(mine) - len(victims) < per_client:
            break
        if is_idle(channel):
            victims.append(channel)
    for channel in others:
        if len(others) - len(victims) < total:
            break
        if channel not in victims and is_idle(channel):
            victims.append(channel)
    fits = len(mine) - sum(1 for v in victims if client_of(v) == client) < per_client and \
        len(others) - len(victims) < total
    return victims, fits


def guarded_channel_class(per_client: int, total: int) -> type:
    """An ``HTTPChannel`` that applies the policy as each connection is accepted (on the
    server's loop thread, where channels may safely be closed)."""

    class GuardedChannel(HTTPChannel):
        def __init__(self, server: Any, sock: Any, addr: Any, adj: Any, map: Any = None) -> None:
            super().__init__(server, sock, addr, adj, map)
            victims, fits = to_close(list(server.active_channels.values()), self, per_client, total)
            for channel in victims:
                channel.handle_close()
            if victims:
                log.info("dashboard: closed %d idle connection(s) to make room for a new one from %s",
                         len(victims), client_of(self))
            if not fits:
                log.warning("dashboard: every connection is busy; refused a new one from %s", client_of(self))
                self.handle_close()

    return GuardedChannel
