"""``mqi_register_commands`` in-process: the CLI parser asks every plugin for its commands
through pluggy, one plugin at a time (the subprocess tests in test_plugins.py cover a
broken plugin; here the hook call itself is seen by the hook tracer of tests/conftest.py)."""

from __future__ import annotations

import argparse

import pytest

from mqi_framework import cli, hookimpl, plugins


class HelloCommand:
    @hookimpl
    def mqi_register_commands(self, register):
        def configure(parser: argparse.ArgumentParser) -> None:
            parser.add_argument("--who", default="world")

        def run(args: argparse.Namespace) -> int:
            print(f"hello {args.who}")
            return 3

        register("site-hello", "say hello (a test plugin's command)", configure, run)
        register("cases", "a name the core uses already", configure, run)  # ignored, with a warning


@pytest.fixture
def host_with_hello(monkeypatch):
    host = plugins.PluginHost()
    host.register(HelloCommand(), name="site.hello")
    monkeypatch.setattr(plugins, "get_plugin_host", lambda: host)
    return host


def test_a_plugin_command_is_added_and_runs(host_with_hello, capsys):
    assert cli.main(["site-hello", "--who", "clinic"]) == 3
    assert capsys.readouterr().out == "hello clinic\n"


def test_plugin_commands_sit_beside_the_core_ones_and_cannot_replace_them(host_with_hello, caplog):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"site-hello", "demo", "cases"} <= set(sub.choices)  # demo: mqi-moqui's, through its entry point
    assert sub.choices["cases"].get_default("func") is not None
    assert sub.choices["cases"].get_default("func").__module__.startswith("mqi_framework.cli")
    assert "'cases', which exists already" in caplog.text
