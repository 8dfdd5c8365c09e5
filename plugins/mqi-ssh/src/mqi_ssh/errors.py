"""What can go wrong with an SSH connection, as exceptions whose messages are for people."""

from __future__ import annotations

__all__ = ["AuthError", "HostKeyError", "SshError", "SshUnreachable"]


class SshError(ConnectionError):
    """An SSH connection could not be made or used; the message says why, for people."""


class SshUnreachable(SshError):
    """The host (or the jump host) does not answer, or the connection dropped."""


class HostKeyError(SshError):
    """The server's host key is not in known_hosts, or differs from the one there."""


class AuthError(SshError):
    """The server refused every credential offered."""
