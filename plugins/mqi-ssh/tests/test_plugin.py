"""mqi-ssh and mqi-sftp are installed plugins: listed by ``mqi-host --plugins``, their
settings validated with errors that name the key."""

from __future__ import annotations

import json

import pytest

from mqi_framework import configload
from mqi_framework.configload import ConfigError
from mqi_framework.testing import run_cli
from mqi_ssh.executor import SshExecutorSettings


def test_plugins_listing_shows_ssh_and_sftp():
    proc = run_cli("--plugins", "--json", check=True)
    plugins = {p["name"]: p for p in json.loads(proc.stdout)}
    assert plugins["ssh"]["status"] == "ok" and plugins["ssh"]["distribution"] == "mqi-ssh"
    text = run_cli("--plugins", check=True).stdout
    assert "provides: executor ssh" in text
    if "sftp" in plugins:  # mqi-sftp is a separate distribution
        assert "provides: transfer sftp" in text


def test_settings_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"settings\.hosts\.gpu1\.port"):
        configload.structure(SshExecutorSettings, {"hosts": {"gpu1": {"hostname": "h", "port": "abc"}}},
                             path="settings")
    with pytest.raises(ConfigError, match="hostname"):
        configload.structure(SshExecutorSettings, {"hosts": {"gpu1": {"port": 22}}}, path="settings")
    with pytest.raises(ConfigError, match="at least one"):
        configload.structure(SshExecutorSettings, {"hosts": {}}, path="settings")
    with pytest.raises(ConfigError, match="hostnmae"):
        configload.structure(SshExecutorSettings, {"hosts": {"gpu1": {"hostnmae": "h"}}}, path="settings")


def test_secrets_never_show_in_settings_repr():
    from mqi_ssh.settings import JumpHostSettings, SshHostSettings

    settings = SshHostSettings(hostname="h", password="pw-SECRET", key_passphrase="pp-SECRET",
                               jump_host=JumpHostSettings(hostname="j", password="jump-SECRET"))
    assert "SECRET" not in repr(settings) and "SECRET" not in str(settings)
