"""Settings of the ``sftp`` transfer (``workers.<name>.settings``)."""

from __future__ import annotations

from typing import Literal, Optional

import attrs

from mqi_ssh.settings import SshHostSettings


def _check_hosts(instance: object, attribute: attrs.Attribute, value: dict) -> None:
    if not value:
        raise ValueError("hosts: name at least one SSH host")


def _positive(instance: object, attribute: attrs.Attribute, value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be >= 1, got {value}")


@attrs.frozen
class SftpTransferSettings:
    """Settings of the ``sftp`` transfer."""

    #: SSH hosts by name (the same mapping as the ssh executor's: share it with a YAML anchor)
    hosts: dict[str, SshHostSettings] = attrs.field(validator=_check_hosts)
    #: the host cases are uploaded to; default: the only host
    host: Optional[str] = None
    #: SFTP sessions used at once for trees of many files
    parallel_channels: int = attrs.field(default=4, validator=_positive)
    #: where the remote SHA-256 is computed: ``host`` (openssl dgst, else sha256sum, run on
    #: the host) or ``readback`` (files read back over SFTP: slower, needs nothing there)
    remote_hash: Literal["host", "readback"] = "host"
    #: give copied files the source's modification time
    preserve_mtime: bool = True

    def __attrs_post_init__(self) -> None:
        if self.host is not None and self.host not in self.hosts:
            raise ValueError(f"host: {self.host!r} is not one of hosts ({', '.join(self.hosts)})")
        if self.host is None and len(self.hosts) > 1:
            raise ValueError(f"host: say which of the hosts ({', '.join(self.hosts)}) cases are uploaded to")
