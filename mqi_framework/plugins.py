"""Plugin loading and lookup: one pluggy PluginManager, entry points, and the registry of
named implementations (scanners, transfers, executors, curators, archivers, interpreters).

Builtins are registered exactly like third-party plugins: through the entry-point group
``mqi_framework.plugins`` of the ``mqi-host`` distribution. Each entry point is loaded on
its own, so one broken plugin is reported (``mqi-host --plugins`` lists it as ``failed``)
without taking the host down; the host refuses to start only when the config uses it,
or when ``MQI_STRICT_PLUGINS=1``.

Environment switches:

* ``MQI_LOAD_PLUGINS=a,b`` loads only those entry points (empty: none);
* ``MQI_DISABLE_PLUGINS=a,b`` blocks those entry points;
* ``MQI_TRACE_HOOKS=1`` prints every hook call with its arguments and results to stderr;
* ``MQI_STRICT_PLUGINS=1`` makes any plugin load failure fatal.
"""

from __future__ import annotations

import importlib.metadata as md
import logging
import os
import sys
import traceback
from typing import Any, Optional

import attrs
import pluggy

from mqi_framework import ENTRY_POINT_GROUP, PROJECT_NAME, hookspecs
from mqi_framework import protocols as p
from mqi_framework.kinds import KINDS

log = logging.getLogger(__name__)

BUILTIN_DISTRIBUTION = "mqi-host"


class PluginError(Exception):
    """A plugin the configuration needs is missing, broken, or of the wrong kind."""


@attrs.define
class PluginRecord:
    """What we know of one entry point: where it came from and whether it loaded."""

    name: str
    module: str
    distribution: str
    version: str
    status: str = "ok"  # ok | failed | disabled
    error: str = ""  # one line
    traceback: str = ""
    plugin: Any = None
    registered: list[str] = attrs.field(factory=list)  # "scanner core.fs", ...

    @property
    def source(self) -> str:
        return "builtin" if self.distribution == BUILTIN_DISTRIBUTION else "entry point"


@attrs.define
class Registered:
    kind: str
    name: str
    cls: type
    plugin: str  # entry-point (or test plugin) name that registered it


def _env_list(name: str) -> Optional[set[str]]:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return {item.strip() for item in raw.split(",") if item.strip()}


class PluginHost:
    """The PluginManager plus our own record of every plugin and what it registered."""

    def __init__(self, *, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.records: dict[str, PluginRecord] = {}
        self._registry: Optional[dict[str, dict[str, Registered]]] = None
        self.registry_errors: list[str] = []
        if os.environ.get("MQI_TRACE_HOOKS"):
            self._enable_tracing()
        if load_entry_points:
            self._load_entry_points()
        self.pm.check_pending()

    # ------------------------------------------------------------------ loading

    def _load_entry_points(self) -> None:
        allow = _env_list("MQI_LOAD_PLUGINS")
        block = _env_list("MQI_DISABLE_PLUGINS") or set()
        strict = os.environ.get("MQI_STRICT_PLUGINS") == "1"
        for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = getattr(ep, "dist", None)
            record = PluginRecord(
                name=ep.name,
                module=ep.value,
                distribution=dist.metadata["Name"] if dist else "?",
                version=dist.version if dist else "?",
            )
            if ep.name in self.records:  # the same distribution seen twice on sys.path
                continue
            self.records[ep.name] = record
            if (allow is not None and ep.name not in allow) or ep.name in block:
                record.status = "disabled"
                self.pm.set_blocked(ep.name)
                continue
            try:
                plugin = ep.load()
                self.pm.register(plugin, name=ep.name)
                unknown = self._unknown_hooks(plugin)
                if unknown:  # check_pending() for this plugin alone: a typo must not break every command
                    self.pm.unregister(plugin)
                    raise PluginError(f"implements {', '.join(unknown)}, which no hookspec defines (a misspelt "
                                      f"hook? see docs/hooks.md for the names)")
                record.plugin = plugin
            except Exception as exc:  # one broken plugin must not take the host down
                record.status = "failed"
                record.error = f"{type(exc).__name__}: {exc}"
                record.traceback = traceback.format_exc()
                log.warning(
                    "plugin %s (distribution %s) failed to load: %s", ep.name, record.distribution, record.error
                )
                if strict:
                    raise PluginError(
                        f"plugin {ep.name!r} from {record.distribution} failed to load "
                        f"(MQI_STRICT_PLUGINS=1):\n{record.traceback}"
                    ) from exc

    def _unknown_hooks(self, plugin: Any) -> list[str]:
        """The hooks ``plugin`` implements that no hookspec defines (optional hooks aside)."""
        unknown = []
        for name, caller in vars(self.pm.hook).items():
            if not isinstance(caller, pluggy.HookCaller) or caller.has_spec():
                continue
            if any(impl.plugin is plugin and not impl.optionalhook for impl in caller.get_hookimpls()):
                unknown.append(name)
        return sorted(unknown)

    def register(self, plugin: Any, name: Optional[str] = None) -> str:
        """Register a plugin object (module, class or instance) directly, e.g. in tests."""
        try:
            hash(plugin)
        except TypeError:  # pluggy's per-plugin calls (call_one) keep plugins in a set
            raise PluginError(f"a plugin must be a module, a class or a hashable object, got {plugin!r}") from None
        registered_name = self.pm.register(plugin, name=name)
        assert registered_name is not None
        self.records[registered_name] = PluginRecord(
            name=registered_name, module=getattr(plugin, "__name__", type(plugin).__name__),
            distribution="(registered at run time)", version="", plugin=plugin,
        )
        self.pm.check_pending()
        self._registry = None
        return registered_name

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self.records.pop(name, None)
        self._registry = None

    def _enable_tracing(self) -> None:
        def before(hook_name: str, hook_impls: Any, kwargs: dict) -> None:
            print(f"[mqi hook] {hook_name}({kwargs!r}) -> {[i.plugin_name for i in hook_impls]}", file=sys.stderr)

        def after(outcome: Any, hook_name: str, hook_impls: Any, kwargs: dict) -> None:
            try:
                result = outcome.get_result()
            except BaseException as exc:  # report, then let pluggy re-raise
                result = f"raised {exc!r}"
            print(f"[mqi hook] {hook_name} returned {result!r}", file=sys.stderr)

        self.pm.add_hookcall_monitoring(before, after)

    # ------------------------------------------------------------------ registry

    def registry(self) -> dict[str, dict[str, Registered]]:
        """kind -> name -> Registered, built once by calling every registration hook."""
        if self._registry is not None:
            return self._registry
        registry: dict[str, dict[str, Registered]] = {kind: {} for kind in KINDS}
        self.registry_errors = []
        for kind in KINDS.values():
            for impl in getattr(self.pm.hook, kind.hook).get_hookimpls():
                plugin_name = impl.plugin_name

                def register(cls: type, _kind: str = kind.name, _base: type = kind.base, _plugin: str = plugin_name) -> None:
                    self._add(registry, _kind, _base, _plugin, cls)

                try:
                    self.call_one(kind.hook, impl.plugin, register=register)
                except Exception as exc:
                    self.registry_errors.append(f"plugin {plugin_name!r}: {kind.hook} raised {exc!r}")
        self._registry = registry
        return registry

    def _add(self, registry: dict, kind: str, base: type, plugin_name: str, cls: type) -> None:
        if not (isinstance(cls, type) and issubclass(cls, base)):
            self.registry_errors.append(
                f"plugin {plugin_name!r} registered {cls!r} as a {kind}, but it is not a subclass of {base.__name__}"
            )
            return
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            self.registry_errors.append(f"plugin {plugin_name!r}: {cls.__name__} has no 'name' attribute")
            return
        existing = registry[kind].get(name)
        if existing is not None and existing.cls is not cls:
            self.registry_errors.append(
                f"{kind} {name!r} registered twice: by {existing.plugin!r} and by {plugin_name!r}; "
                f"the first one is used (disable one with MQI_DISABLE_PLUGINS)"
            )
            return
        registry[kind][name] = Registered(kind=kind, name=name, cls=cls, plugin=plugin_name)
        record = self.records.get(plugin_name)
        if record is not None and f"{kind} {name}" not in record.registered:
            record.registered.append(f"{kind} {name}")

    def lookup(self, kind: str, name: str, *, config_key: str = "") -> type:
        """Return the class registered as ``name`` for ``kind`` or raise a PluginError for people."""
        found = self.registry()[kind].get(name)
        if found is not None:
            return found.cls
        where = f"{config_key}: " if config_key else ""
        installed = ", ".join(sorted(self.registry()[kind])) or "none"
        failed = [r for r in self.records.values() if r.status == "failed"]
        hint = ""
        if failed:
            hint = " Plugins that failed to load and may provide it: " + "; ".join(
                f"{r.name} ({r.distribution}): {r.error}" for r in failed
            ) + "."
        disabled = [r.name for r in self.records.values() if r.status == "disabled"]
        if disabled:
            hint += " Disabled by MQI_LOAD_PLUGINS/MQI_DISABLE_PLUGINS: " + ", ".join(disabled) + "."
        raise PluginError(
            f"{where}no {kind} named {name!r} is installed (installed {kind}s: {installed}).{hint} "
            f"Install the plugin that provides it (pip install ...) or fix the name; "
            f"`mqi-host --plugins` lists what is installed."
        )

    def call_one(self, hook_name: str, plugin: Any, **kwargs: Any) -> list:
        """Call ``hook_name`` of one plugin only, through pluggy (so ``MQI_TRACE_HOOKS`` and
        hook wrappers see the call); its exception is the caller's to isolate."""
        impls = getattr(self.pm.hook, hook_name).get_hookimpls()
        wrapping = {id(i.plugin) for i in impls if i.hookwrapper or getattr(i, "wrapper", False)}
        others = [i.plugin for i in impls if i.plugin is not plugin and id(i.plugin) not in wrapping]
        return self.pm.subset_hook_caller(hook_name, remove_plugins=others)(**kwargs)

    def call_each(self, hook_name: str, **kwargs: Any) -> None:
        """Call every implementation of ``hook_name`` on its own, in pluggy's order (last
        registered first): one that raises is logged and does not stop the others (a plain
        pluggy call would stop at the first exception)."""
        for impl in reversed(getattr(self.pm.hook, hook_name).get_hookimpls()):
            try:
                self.call_one(hook_name, impl.plugin, **kwargs)
            except Exception:
                log.exception("plugin %r failed in %s; ignored", impl.plugin_name, hook_name)

    def notify(self, hook_name: str, **kwargs: Any) -> None:
        """Deliver a notification hook to every plugin (see :meth:`call_each`)."""
        self.call_each(hook_name, **kwargs)

    # ------------------------------------------------------------------ introspection

    def get_plugins(self) -> list[dict]:
        """The single introspection point: one dict per plugin, for --plugins, check and the dashboard."""
        self.registry()
        out = []
        for record in sorted(self.records.values(), key=lambda r: (r.source != "builtin", r.name)):
            hooks: list[str] = []
            if record.plugin is not None and self.pm.is_registered(record.plugin):
                callers = self.pm.get_hookcallers(record.plugin) or []
                hooks = sorted(caller.name for caller in callers)
            out.append(
                {
                    "name": record.name,
                    "distribution": record.distribution,
                    "version": record.version,
                    "module": record.module,
                    "source": record.source,
                    "status": record.status,
                    "hooks": hooks,
                    "provides": list(record.registered),
                    "error": record.error,
                }
            )
        return out


_default: Optional[PluginHost] = None


def get_plugin_host() -> PluginHost:
    """The process-wide PluginHost, built lazily on first use (importing is cheap)."""
    global _default
    if _default is None:
        _default = PluginHost()
    return _default


def build(
    kind: str, name: str, settings_data: Any, context: p.PluginContext, *, config_key: str,
    plugin_host: Optional[PluginHost] = None, lines: Optional[dict] = None, source: Optional[str] = None,
) -> p.Plugin:
    """Look up ``name`` of ``kind``, validate its settings with its own attrs class, instantiate it.

    ``config_key`` is the YAML path of the section (``workers.transfer``): errors name
    ``<config_key>.plugin`` or ``<config_key>.settings.<field>``.
    """
    from mqi_framework import configload

    host = plugin_host or get_plugin_host()
    cls = host.lookup(kind, name, config_key=f"{config_key}.plugin")
    settings_class = getattr(cls, "settings_class", None)
    if settings_class is None:
        if settings_data:
            raise configload.ConfigError(
                [configload.ConfigProblem(f"{config_key}.settings", f"{kind} {name!r} takes no settings",
                                          (lines or {}).get(f"{config_key}.settings"))],
                source=source,
            )
        settings = None
    else:
        settings = configload.structure(
            settings_class, settings_data or {}, path=f"{config_key}.settings", lines=lines, source=source
        )
    return cls(settings, context)
