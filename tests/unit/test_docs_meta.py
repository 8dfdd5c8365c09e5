"""Meta-tests of the reference documentation (issue 12, item 5): each can fail.

* every config key has a description in ``docs/configuration.md``;
* every builtin and first-party plugin (found through the real plugin registry) has its
  settings in ``docs/plugin-settings.md``, each field with a description;
* every name of :mod:`mqi_framework.protocols` is in ``docs/protocols.md`` with its
  docstring and public methods;
* every public name of the modules in :data:`mqi_framework.PUBLIC_MODULES` has a docstring;
* the hook tracer of ``tests/conftest.py`` sees hook calls (subset callers too) and fails a
  whole-suite session in which a hookspec was never called.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Optional

import attrs
import pytest

import mqi_framework
from mqi_framework import config, docgen, hookimpl, hookspecs, protocols
from mqi_framework.kinds import KINDS
from mqi_framework.plugins import PluginHost

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
ROW = re.compile(r"^\| `([^`]+)` \| `[^|]*` \| [^|]* \| (.*) \|$")

#: what the builtin plugins must keep offering (kind, registered name)
BUILTIN_IMPLEMENTATIONS = {("scanner", "core.fs"), ("transfer", "core.local"), ("executor", "core.local"),
                           ("curator", "core.standin"), ("archiver", "core.sqlite")}


# --------------------------------------------------------------------------- helpers


def sections(markdown: str, level: str) -> dict[str, str]:
    """heading text -> the text below it up to the next heading of the same level or above."""
    out: dict[str, str] = {}
    current: Optional[str] = None
    depth = len(level)
    for line in markdown.splitlines():
        match = re.match(r"^(#+) (.*)$", line)
        if match and len(match.group(1)) <= depth:
            current = match.group(2) if len(match.group(1)) == depth else None
            if current is not None:
                out[current] = ""
            continue
        if current is not None:
            out[current] += line + "\n"
    return out


def table_rows(markdown: str) -> list[tuple[str, str]]:
    """(key, description) of every settings/config table row."""
    return [(m.group(1), m.group(2).strip()) for m in map(ROW.match, markdown.splitlines()) if m]


def settings_problems(implementations: list[tuple[Any, str]], page: str) -> list[str]:
    """What is missing from the plugin settings reference ``page`` for these registered
    implementations ((Registered, distribution) pairs)."""
    problems = []
    by_heading = sections(page, "##")
    for reg, dist in implementations:
        label = f"{reg.kind} {reg.name!r} ({reg.cls.__name__} from {dist})"
        settings_class = getattr(reg.cls, "settings_class", None)
        if settings_class is not None and not attrs.has(settings_class):
            problems.append(f"{label}: settings_class {settings_class!r} is not an attrs class")
            continue
        section = by_heading.get(f"{reg.kind} `{reg.name}`")
        if section is None:
            problems.append(f"{label}: no section '## {reg.kind} `{reg.name}`' in docs/plugin-settings.md")
            continue
        if settings_class is None:
            if "Takes no settings." not in section:
                problems.append(f"{label}: takes no settings, but its section does not say so")
            continue
        problems += [f"{label}: field {field} has no description (write a `#:` comment above it or a "
                     f"trailing `# comment`)" for field in docgen.undocumented_fields(settings_class)]
        rows = dict(table_rows(section))
        for klass in docgen.nested_attrs_classes(settings_class):
            for field in attrs.fields(klass):
                if field.name not in rows:
                    problems.append(f"{label}: {klass.__name__}.{field.name} is not in its section")
                elif not rows[field.name]:
                    problems.append(f"{label}: {klass.__name__}.{field.name} has an empty description in the page")
    return problems


def own_doc(obj: Any) -> str:
    """The docstring ``obj`` itself carries ('' for none; a class does not inherit one)."""
    if inspect.isclass(obj):
        return (obj.__dict__.get("__doc__") or "").strip()
    if hasattr(obj, "_get_wrapped_function"):  # a pytest fixture
        obj = obj._get_wrapped_function()
    return (getattr(obj, "__doc__", None) or "").strip()


def public_names(module: Any) -> list[str]:
    """``__all__``, else the public functions, classes and fixtures the module defines."""
    names = getattr(module, "__all__", None)
    if names is not None:
        return list(names)
    out = []
    for name, obj in vars(module).items():
        if name.startswith("_"):
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj) or hasattr(obj, "_get_wrapped_function"):
            if getattr(obj, "__module__", None) == module.__name__:
                out.append(name)
    return out


def undocumented_names(module: Any) -> list[str]:
    """Public functions, classes and public methods of public classes without a docstring
    (constants and type aliases cannot carry one and are not checked here)."""
    missing = []
    for name in public_names(module):
        obj = getattr(module, name)
        if inspect.isclass(obj):
            if not own_doc(obj):
                missing.append(name)
            for method_name, method in docgen.public_methods(obj).items():
                doc = method.__doc__ if isinstance(method, property) else inspect.getdoc(getattr(obj, method_name))
                if not (doc or "").strip():
                    missing.append(f"{name}.{method_name}")
        elif inspect.isfunction(obj) or hasattr(obj, "_get_wrapped_function") or inspect.isbuiltin(obj):
            if not own_doc(obj):
                missing.append(name)
    return missing


# --------------------------------------------------------------------------- the generated pages


def test_every_generated_page_is_fresh_and_in_the_nav():
    import yaml

    nav = {list(item.values())[0] for item in yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]}
    assert {"hooks.md", "configuration.md", "plugin-settings.md", "protocols.md"} <= set(docgen.GENERATED)
    for name in docgen.GENERATED:
        assert name in nav, f"docs/{name} is generated but not in mkdocs.yml's nav"
        text = (DOCS / name).read_text(encoding="utf-8") if (DOCS / name).exists() else ""
        assert text == docgen.render(name), f"docs/{name} is stale: run python -m mqi_framework.docgen"


def test_field_descriptions_come_from_comments_and_docstrings_only():
    @attrs.frozen
    class Sample:
        #: from a comment
        #: of two lines
        above: int = 1
        trailing: str = "#not-a-comment"  # from the trailing comment
        literal: int = 2
        """from the string below"""
        hash_in_string: str = "# nothing here"
        bare: int = 3

    assert docgen.field_descriptions(Sample) == {
        "above": "from a comment of two lines", "trailing": "from the trailing comment",
        "literal": "from the string below", "hash_in_string": "", "bare": ""}
    assert docgen.undocumented_fields(Sample) == ["Sample.hash_in_string", "Sample.bare"]


def test_every_config_key_has_a_description():
    assert docgen.undocumented_fields(config.MqiConfig) == [], "describe these keys in mqi_framework/config.py"
    rows = table_rows(docgen.render("configuration.md"))
    described = {key for key, text in rows if text}
    every_key = {f.name for klass in docgen.nested_attrs_classes(config.MqiConfig) for f in attrs.fields(klass)}
    assert every_key <= {key for key, _ in rows}, "a config key is missing from docs/configuration.md"
    assert [key for key, text in rows if not text] == [] and every_key <= described


# --------------------------------------------------------------------------- plugin settings


def test_every_builtin_and_first_party_plugin_has_its_settings_documented():
    host = PluginHost()
    registry = host.registry()
    wanted = docgen.first_party_distributions()
    assert len(wanted) == 1 + len(list((ROOT / "plugins").glob("*/pyproject.toml")))
    implementations = [(reg, host.records[reg.plugin].distribution) for kind in KINDS
                       for reg in registry[kind].values() if host.records[reg.plugin].distribution in wanted]
    assert BUILTIN_IMPLEMENTATIONS <= {(reg.kind, reg.name) for reg, _ in implementations}
    registering = {dist for _, dist in implementations}
    assert set(wanted) <= registering, f"first-party distributions registering nothing: {set(wanted) - registering}"
    assert settings_problems(implementations, docgen.render("plugin-settings.md")) == []
    assert [reg.name for reg, _ in docgen.first_party_implementations()] == [reg.name for reg, _ in implementations]


def test_a_plugin_whose_settings_are_undocumented_is_reported(mqi_pm, register_plugin):
    @attrs.frozen
    class HalfDocumented:
        documented: int = 1  # a description
        silent: int = 2

    class Quiet(protocols.Scanner):
        name = "test.quiet"
        settings_class = HalfDocumented

        def scan(self):
            return []

    class QuietPlugin:
        @hookimpl
        def mqi_register_scanners(self, register):
            register(Quiet)

    register_plugin(QuietPlugin(), name="quiet")
    reg = mqi_pm.registry()["scanner"]["test.quiet"]
    problems = settings_problems([(reg, "site-quiet")], docgen.render("plugin-settings.md"))
    assert problems == ["scanner 'test.quiet' (Quiet from site-quiet): no section '## scanner `test.quiet`' in "
                        "docs/plugin-settings.md"]
    page = "## scanner `test.quiet`\n\n| `documented` | `int` | `1` | a description |\n| `silent` | `int` | `2` |  |\n"
    problems = settings_problems([(reg, "site-quiet")], page)
    assert any("HalfDocumented.silent has no description" in p for p in problems), problems
    assert any("HalfDocumented.silent has an empty description" in p for p in problems), problems


# --------------------------------------------------------------------------- protocols


def test_every_protocol_name_is_in_the_reference_with_its_docs():
    page = docgen.render("protocols.md")
    by_name = sections(page, "##")
    aliases = docgen.module_attribute_comments(protocols)
    defined = {n for n, o in vars(protocols).items() if inspect.isclass(o) and o.__module__ == protocols.__name__
               and not n.startswith("_")}
    assert defined <= set(protocols.__all__), f"classes of protocols.py missing from __all__: {defined - set(protocols.__all__)}"
    for base in ("Scanner", "Transfer", "Executor", "Curator", "Archiver", "Interpreter", "Service", "Plugin"):
        assert base in protocols.__all__
    problems = []
    for name in protocols.__all__:
        obj = getattr(protocols, name)
        section = by_name.get(f"`{name}`")
        if section is None:
            problems.append(f"{name}: no section in docs/protocols.md")
            continue
        if not inspect.isclass(obj):
            if not aliases.get(name):
                problems.append(f"{name}: a type alias without a `#:` comment above it")
            continue
        doc = own_doc(obj)
        if not doc:
            problems.append(f"{name}: no docstring")
        elif docgen._md(docgen._first_paragraph(doc))[:40] not in " ".join(section.split()):
            problems.append(f"{name}: its docstring is not in its section")
        for method_name, method in docgen.public_methods(obj).items():
            if not (method.__doc__ or "").strip():
                problems.append(f"{name}.{method_name}: no docstring")
            if f"### `{method_name}`" not in section:
                problems.append(f"{name}.{method_name}: not in its section")
        if attrs.has(obj):
            described = docgen.field_descriptions(obj)
            for field in attrs.fields(obj):
                if not described[field.name] and f"``{field.name}``" not in doc:
                    problems.append(f"{name}.{field.name}: neither a field comment nor named in the docstring")
    assert problems == [], "\n".join(problems)


# --------------------------------------------------------------------------- public names


def test_undocumented_names_are_found():
    import types

    module = types.ModuleType("sample")
    exec(textwrap.dedent('''
        class Shown:
            """Documented."""
            def fine(self):
                """Yes."""
            def bare(self):
                pass
            def _private(self):
                pass
        def helper():
            pass
        CONSTANT = 1
    '''), module.__dict__)
    module.__all__ = ["Shown", "helper", "CONSTANT"]
    assert undocumented_names(module) == ["Shown.bare", "helper"]


@pytest.mark.parametrize("module_name", mqi_framework.PUBLIC_MODULES)
def test_every_public_name_is_documented(module_name):
    if importlib.util.find_spec(module_name) is None:
        pytest.skip(f"{module_name} does not exist yet")
    module = importlib.import_module(module_name)
    assert (module.__doc__ or "").strip(), f"{module_name} has no module docstring"
    names = public_names(module)
    assert names, f"{module_name} exports nothing"
    assert [n for n in names if not hasattr(module, n)] == [], f"{module_name}.__all__ names what it lacks"
    missing = undocumented_names(module)
    assert missing == [], f"{module_name}: public names without a docstring: {', '.join(missing)}"


# --------------------------------------------------------------------------- the hook tracer


def test_hook_calls_are_traced_through_per_plugin_callers(request, mqi_pm, register_plugin):
    trace = request.config.pluginmanager.get_plugin("mqi-hook-trace")
    assert trace is not None, "tests/conftest.py installs the hook tracer"
    seen = []

    class Observer:
        @hookimpl
        def mqi_case_state_changed(self, case_id, new_state):
            seen.append((case_id, new_state))

    class Another:
        @hookimpl
        def mqi_case_state_changed(self, case_id):
            seen.append((case_id, "another"))

    register_plugin(Observer(), name="observer")
    register_plugin(Another(), name="another")
    before = trace.called.get("mqi_case_state_changed", 0)
    mqi_pm.notify("mqi_case_state_changed", case_id="case-000001", old_state="", new_state="detected", info={})
    assert sorted(seen) == [("case-000001", "another"), ("case-000001", "detected")]
    # notify calls each plugin on its own (PluginHost.call_one: a pluggy subset caller)
    assert trace.called["mqi_case_state_changed"] == before + 2
    registrations = trace.called.get("mqi_register_scanners", 0)
    PluginHost().registry()  # the builtins' registration hooks, one plugin at a time
    assert trace.called["mqi_register_scanners"] > registrations


def _inner_run(tmp_path: Path, test_body: str, *args: str) -> subprocess.CompletedProcess:
    """pytest in a subprocess on a throw-away suite that uses this repository's conftest."""
    suite = tmp_path / "suite"
    (suite / "t").mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "tests" / "conftest.py", suite / "t" / "conftest.py")
    (suite / "pytest.ini").write_text("[pytest]\ntestpaths = t\naddopts = -p no:cacheprovider\n")
    (suite / "t" / "test_inner.py").write_text(textwrap.dedent(test_body))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", *args], cwd=suite, capture_output=True, text=True,
                          timeout=120)


CALL_SOME = '''
    from mqi_framework.plugins import PluginHost

    def test_registry():
        PluginHost().registry()

    def test_other():
        pass
'''

CALL_ALL = '''
    from mqi_framework import hookimpl, hookspecs
    from mqi_framework.plugins import PluginHost

    def test_every_hook():
        host = PluginHost(load_entry_points=False)
        for name in hookspecs.ALL_HOOKS:
            getattr(host.pm.hook, name)(**{arg: None for arg in getattr(host.pm.hook, name).spec.argnames})
'''


def test_a_whole_run_that_never_calls_a_hook_fails(tmp_path):
    proc = _inner_run(tmp_path, CALL_SOME)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "2 passed" in out and "hooks never called" in out, out
    missing = re.search(r"never called in the test process: (.*?)\. Write", out).group(1).split(", ")
    assert "mqi_case_state_changed" in missing and "mqi_register_scanners" not in missing


@pytest.mark.parametrize("args", [["-k", "registry"], ["t/test_inner.py::test_other"], ["-m", "not slow"],
                                  ["--deselect", "t/test_inner.py::test_other"]])
def test_a_partial_run_is_not_checked(tmp_path, args):
    proc = _inner_run(tmp_path, CALL_SOME, *args)
    assert proc.returncode == 0 and "hooks never called" not in proc.stdout, proc.stdout + proc.stderr


def test_a_run_stopped_by_x_is_not_checked(tmp_path):
    proc = _inner_run(tmp_path, "def test_fails():\n    assert False\n" + textwrap.dedent(CALL_SOME), "-x")
    assert proc.returncode == 1 and "1 failed" in proc.stdout and "hooks never called" not in proc.stdout, proc.stdout


def test_a_whole_run_that_calls_every_hook_passes(tmp_path):
    proc = _inner_run(tmp_path, CALL_ALL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"all {len(hookspecs.ALL_HOOKS)} hookspecs were called" in proc.stdout
