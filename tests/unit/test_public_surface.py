"""What may import what (drawn in docs/architecture.md): the core imports no plugin, and
the plugins and examples of this repository import only the core's public surface,
``mqi_framework.PUBLIC_MODULES``, so that a site plugin written like them keeps working when
the internals change. Found by parsing every source file's imports, not by running them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mqi_framework

ROOT = Path(__file__).resolve().parents[2]
PLUGIN_SOURCES = sorted(p for p in (ROOT / "plugins").glob("*/src/*") if p.is_dir())
EXAMPLE_SOURCES = sorted(p for p in (ROOT / "examples").glob("*/src/*") if p.is_dir())


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every absolute module a file imports (``from X import a`` gives ``X`` and ``X.a``, as
    ``a`` may be a submodule), with its line."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def core_imports_outside_surface(package: Path, base: Path = ROOT) -> list[str]:
    bad = []
    for path in sorted(package.rglob("*.py")):
        for line, module in imported_modules(path):
            if not (module == "mqi_framework" or module.startswith("mqi_framework.")):
                continue
            if module in mqi_framework.PUBLIC_MODULES:
                continue
            parent = module.rsplit(".", 1)[0]
            if parent in mqi_framework.PUBLIC_MODULES and not _is_module(module):
                continue  # a name imported from a public module
            bad.append(f"{path.relative_to(base)}:{line}: imports {module}")
    return bad


def _is_module(dotted: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(dotted) is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.parametrize("package", PLUGIN_SOURCES + EXAMPLE_SOURCES, ids=lambda p: p.name)
def test_plugins_and_examples_import_only_the_public_surface(package):
    assert core_imports_outside_surface(package) == [], (
        "plugins may import only " + ", ".join(mqi_framework.PUBLIC_MODULES) + " from the core")


def test_the_check_finds_an_internal_import(tmp_path):
    package = tmp_path / "site_plugin"
    package.mkdir()
    (package / "__init__.py").write_text("from mqi_framework.store import records\n"
                                         "from mqi_framework.api import Host\n"
                                         "import mqi_framework.conductor\n")
    found = core_imports_outside_surface(package, base=tmp_path)
    assert [f.split(": ", 1)[1] for f in found] == ["imports mqi_framework.store", "imports mqi_framework.store.records",
                                                    "imports mqi_framework.conductor"]


def test_the_core_imports_no_plugin():
    plugin_packages = {p.name for p in PLUGIN_SOURCES + EXAMPLE_SOURCES}
    bad = [f"{path.relative_to(ROOT)}:{line}: imports {module}"
           for path in sorted((ROOT / "mqi_framework").rglob("*.py"))
           for line, module in imported_modules(path) if module.split(".")[0] in plugin_packages]
    assert bad == []


def test_every_public_module_exists_and_declares_its_names():
    import importlib

    for name in mqi_framework.PUBLIC_MODULES:
        module = importlib.import_module(name)
        assert module.__doc__, f"{name} has no docstring"
        exported = getattr(module, "__all__", None)
        if name in ("mqi_framework.hookspecs", "mqi_framework.testing"):
            continue  # hooks and fixtures are found by pluggy and pytest, not by __all__
        assert exported, f"{name} declares no __all__"
        assert all(hasattr(module, n) for n in exported), name
