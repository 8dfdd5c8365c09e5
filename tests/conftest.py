"""Shared fixtures: the plugin-author fixtures come from mqi_framework.testing (pytest11).

Also the hook tracer (:class:`HookTrace`): every hook call made through pluggy in the test
process, on every ``mqi`` PluginManager, is recorded; when the whole suite ran (no ``-k``,
``-m``, deselection, ``--lf``, subset of the test paths, and no ``-x`` abort), the session
fails if a hookspec of :mod:`mqi_framework.hookspecs` was never called. A hook called only
in a subprocess (``mqi-host ...`` run by a test) does not count: write an in-process test.
"""

import os
import sys
from pathlib import Path

import pluggy
import pytest

# Tests never pick up a site's MQI_* switches by accident.
for _name in ("MQI_LOAD_PLUGINS", "MQI_DISABLE_PLUGINS", "MQI_STRICT_PLUGINS", "MQI_TRACE_HOOKS", "MQI_CONFIG"):
    os.environ.pop(_name, None)

sys._called_from_test = True  # type: ignore[attr-defined]

HOOK_TRACE_PLUGIN = "mqi-hook-trace"


class HookTrace:
    """Records the hooks called on every ``mqi`` PluginManager created while it is installed.

    Registered as the pytest plugin ``mqi-hook-trace``; a test reaches it with
    ``request.config.pluginmanager.get_plugin("mqi-hook-trace")``.
    """

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.called: dict[str, int] = {}
        self.deselected = 0
        self.missing: list[str] = []
        self.checked = False
        self.skipped_because = ""
        self._original_init = None

    # ------------------------------------------------------------------ tracing

    def monitor(self, pm: pluggy.PluginManager) -> None:
        """Record every hook call made through ``pm`` (subset callers included: they call
        the manager's hook executor, which the monitoring wraps)."""

        def before(hook_name: str, hook_impls: object, kwargs: object) -> None:
            self.called[hook_name] = self.called.get(hook_name, 0) + 1

        def after(outcome: object, hook_name: str, hook_impls: object, kwargs: object) -> None:
            pass

        pm.add_hookcall_monitoring(before, after)

    def install(self) -> None:
        from mqi_framework import PROJECT_NAME

        original = pluggy.PluginManager.__init__
        trace = self

        def traced_init(pm: pluggy.PluginManager, project_name: str, *args: object, **kwargs: object) -> None:
            original(pm, project_name, *args, **kwargs)
            if project_name == PROJECT_NAME:
                trace.monitor(pm)

        self._original_init = original
        pluggy.PluginManager.__init__ = traced_init  # type: ignore[method-assign]
        # a process-wide host built before this plugin was installed (none is, normally)
        from mqi_framework import plugins

        existing = getattr(plugins, "_default", None)
        if existing is not None:
            self.monitor(existing.pm)

    def uninstall(self) -> None:
        if self._original_init is not None:
            pluggy.PluginManager.__init__ = self._original_init  # type: ignore[method-assign]
            self._original_init = None

    # ------------------------------------------------------------------ the check

    def whole_suite_reason(self, session: pytest.Session) -> str:
        """Why this run is not the whole suite ('' when it is)."""
        config = self.config
        option = config.option
        if getattr(option, "collectonly", False):
            return "--collect-only"
        if getattr(option, "keyword", ""):
            return "-k"
        if getattr(option, "markexpr", ""):
            return "-m"
        if self.deselected:
            return f"{self.deselected} tests deselected"
        if getattr(option, "lf", False):
            return "--lf"
        if getattr(option, "stepwise", False) or getattr(option, "stepwise_skip", False):
            return "--stepwise"
        if getattr(option, "ignore", None) or getattr(option, "ignore_glob", None) or getattr(option, "deselect", None):
            return "--ignore/--deselect"
        if hasattr(config, "workerinput"):
            return "an xdist worker"
        if session.shouldstop or session.shouldfail:
            return "the run was stopped early (-x / --maxfail)"
        if session.testscollected == 0:
            return "no test ran"
        testpaths = [config.rootpath / p for p in config.getini("testpaths")] or [config.rootpath]
        args = []
        for arg in config.args:
            if "::" in arg:
                return "a test id on the command line"
            args.append(Path(arg) if Path(arg).is_absolute() else Path(config.invocation_params.dir) / arg)
        args = [a.resolve() for a in args]
        for testpath in testpaths:
            testpath = testpath.resolve()
            if not any(testpath == a or a in testpath.parents for a in args):
                return f"{testpath.relative_to(config.rootpath)} was not run"
        return ""

    def check(self, session: pytest.Session, exitstatus: int) -> None:
        from mqi_framework import hookspecs

        if exitstatus == pytest.ExitCode.INTERRUPTED:
            self.skipped_because = "interrupted"
            return
        self.skipped_because = self.whole_suite_reason(session)
        if self.skipped_because:
            return
        self.checked = True
        self.missing = [name for name in hookspecs.ALL_HOOKS if name not in self.called]
        if self.missing and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    # ------------------------------------------------------------------ pytest hooks

    def pytest_deselected(self, items: list) -> None:
        self.deselected += len(items)

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        self.check(session, exitstatus)

    def pytest_terminal_summary(self, terminalreporter: object) -> None:
        from mqi_framework import hookspecs

        if not self.checked:
            return
        write = terminalreporter.write_line  # type: ignore[attr-defined]
        if self.missing:
            terminalreporter.section("hooks never called", red=True)  # type: ignore[attr-defined]
            write(f"FAILED: {len(self.missing)} of {len(hookspecs.ALL_HOOKS)} hookspecs were never called in the "
                  f"test process: {', '.join(self.missing)}. Write a test that calls each (in-process: calls made "
                  f"by an `mqi-host` subprocess are not traced).", red=True)
        else:
            write(f"hook trace: all {len(hookspecs.ALL_HOOKS)} hookspecs were called in the test process")


def pytest_configure(config: pytest.Config) -> None:
    trace = HookTrace(config)
    trace.install()
    config.pluginmanager.register(trace, HOOK_TRACE_PLUGIN)


def pytest_unconfigure(config: pytest.Config) -> None:
    trace = config.pluginmanager.get_plugin(HOOK_TRACE_PLUGIN)
    if trace is not None:
        trace.uninstall()
