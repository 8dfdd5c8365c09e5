"""Generates the reference pages of ``docs/`` from the code, so none can drift from it (a
test and ``--check`` compare them):

* ``hooks.md`` from the hookspec docstrings (:mod:`mqi_framework.hookspecs`);
* ``configuration.md`` from the attrs config classes (:mod:`mqi_framework.config`);
* ``plugin-settings.md`` from the settings classes of the builtin and first-party plugins,
  found through the plugin registry (what ``mqi-host --plugins`` lists);
* ``protocols.md`` from the base classes and data types of :mod:`mqi_framework.protocols`.

A field's description is its ``#:`` comment lines just above it, else its trailing
``# comment``, else a string literal right below it.

    python -m mqi_framework.docgen          # rewrite every page
    python -m mqi_framework.docgen --check  # exit 1 when a page is stale

Why this module is over 400 lines: the four pages share one way of finding a field's
description and of rendering attrs classes, types and defaults as tables; a module per page
would split that shared rendering, which is what keeps the pages consistent.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.metadata as md
import inspect
import io
import os
import re
import sys
import textwrap
import tokenize
import typing
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import attrs

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PLUGINS_DIR = ROOT / "plugins"
BUILTIN_DISTRIBUTION = "mqi-host"


class DocgenError(Exception):
    """The reference cannot be generated as it would be in a full checkout (a first-party
    plugin is not installed or failed to load)."""


# --------------------------------------------------------------------------- descriptions


def _class_source(cls: type) -> tuple[str, Optional[ast.ClassDef]]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return "", None
    tree = ast.parse(source)
    node = tree.body[0] if tree.body else None
    return source, node if isinstance(node, ast.ClassDef) else None


def _comments(source: str) -> dict[int, tuple[str, bool]]:
    """line number -> (comment text without '#', whether the line holds only the comment)."""
    out: dict[int, tuple[str, bool]] = {}
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            alone = not lines[row - 1][:col].strip()
            out[row] = (tok.string[1:], alone)
    return out


def attribute_descriptions(cls: type) -> dict[str, str]:
    """Descriptions of the annotated class attributes written in ``cls``'s own body (see the
    module docstring for where a description is taken from)."""
    source, node = _class_source(cls)
    if node is None:
        return {}
    comments = _comments(source)
    out: dict[str, str] = {}
    body = node.body
    for i, stmt in enumerate(body):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            name = stmt.target.id
        elif (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
            name = stmt.targets[0].id
        else:
            continue
        above: list[str] = []
        row = stmt.lineno - 1
        while row in comments and comments[row][1] and comments[row][0].startswith(":"):
            above.insert(0, comments[row][0][1:].strip())
            row -= 1
        text = " ".join(part for part in above if part)
        if not text:
            trailing = [comments[r][0].strip() for r in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1)
                        if r in comments and not comments[r][1]]
            text = " ".join(t.lstrip(":").strip() for t in trailing if t.strip())
        if not text and i + 1 < len(body):
            nxt = body[i + 1]
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                text = " ".join(inspect.cleandoc(nxt.value.value).split())
        out[name] = text
    return out


def field_descriptions(cls: type) -> dict[str, str]:
    """``{field name: description}`` for every attrs field of ``cls``, inherited ones included
    ('' where the source says nothing)."""
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if attrs.has(klass):
            found.update({k: v for k, v in attribute_descriptions(klass).items() if v or k not in found})
    return {field.name: found.get(field.name, "") for field in attrs.fields(cls)}


def undocumented_fields(cls: type) -> list[str]:
    """``Class.field`` for each attrs field of ``cls`` and of the attrs classes nested in it
    that has no description."""
    out = []
    for klass in nested_attrs_classes(cls):
        out += [f"{klass.__name__}.{name}" for name, text in field_descriptions(klass).items() if not text.strip()]
    return out


def nested_attrs_classes(cls: type) -> list[type]:
    """``cls`` and every attrs class reachable from its fields' types, each once."""
    seen = [cls]
    for klass in seen:
        hints = typing.get_type_hints(klass)
        for field in attrs.fields(klass):
            tp = hints.get(field.name, field.type)
            for inner in _type_parts(tp):
                if isinstance(inner, type) and attrs.has(inner) and inner not in seen:
                    seen.append(inner)
    return seen


def _type_parts(tp: Any) -> Iterator[Any]:
    yield tp
    for arg in typing.get_args(tp):
        yield from _type_parts(arg)


# --------------------------------------------------------------------------- rendering helpers


def _type_name(tp: object) -> str:
    if isinstance(tp, str):
        text = tp
    elif typing.get_origin(tp) is not None:
        text = str(tp)
    else:
        text = getattr(tp, "__name__", None) or repr(tp)
    text = re.sub(r"\b(typing|pathlib|mqi_framework\.config|mqi_framework\.protocols)\.", "", text)
    return re.sub(r"\b[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*\.(?=[A-Z])", "", text).replace("NoneType", "None")


def _default(field: attrs.Attribute) -> str:
    if field.default is attrs.NOTHING:
        return "**required**"
    if isinstance(field.default, attrs.Factory):  # type: ignore[arg-type]
        value = field.default.factory()
        if attrs.has(type(value)) or (isinstance(value, list) and value and attrs.has(type(value[0]))):
            return "(section)"
        return f"`{value!r}`"
    if attrs.has(type(field.default)):
        return "(section)"
    return f"`{field.default!r}`"


def _cell(text: str) -> str:
    return " ".join(_md(text).split()).replace("|", "\\|")


def _md(text: str) -> str:
    """reST cross-reference roles (``:class:`~a.B` ``) as Markdown code (`` `a.B` ``)."""
    return re.sub(r":(?:class|meth|func|data|attr|mod|exc|obj):`~?([^`]+)`", r"`\1`", text)


def _doc(obj_doc: Optional[str]) -> str:
    return _md(inspect.cleandoc(obj_doc or ""))


def _signature(fn: Callable) -> str:
    """``(a: int, b: str = 'x') -> None`` with string annotations shown without quotes."""
    sig = inspect.signature(fn)
    parts = []
    seen_kwonly = False
    for param in sig.parameters.values():
        if param.kind is param.KEYWORD_ONLY and not seen_kwonly:
            parts.append("*")
            seen_kwonly = True
        text = param.name
        if param.kind is param.VAR_POSITIONAL:
            text, seen_kwonly = "*" + text, True
        elif param.kind is param.VAR_KEYWORD:
            text = "**" + text
        if param.annotation is not param.empty:
            text += f": {_type_name(param.annotation)}"
        if param.default is not param.empty:
            text += f" = {param.default!r}"
        parts.append(text)
    out = f"({', '.join(parts)})"
    if sig.return_annotation is not sig.empty:
        out += f" -> {_type_name(sig.return_annotation)}"
    return out


def _section(cls: type, prefix: str, out: list[str], seen: set) -> None:
    hints = typing.get_type_hints(cls)
    described = field_descriptions(cls)
    out += [f"### `{prefix or '(top level)'}` — {cls.__name__}", "", _doc(cls.__doc__), "",
            "| key | type | default | description |", "|---|---|---|---|"]
    nested = []
    for field in attrs.fields(cls):
        tp = hints.get(field.name, field.type)
        out.append(f"| `{field.name}` | `{_type_name(tp)}` | {_default(field)} | {_cell(described[field.name])} |")
        here = f"{prefix}.{field.name}" if prefix else field.name
        origin = typing.get_origin(tp)
        suffix = ".<name>" if origin is dict else ".<n>" if origin is list else ""
        for inner in typing.get_args(tp) + (tp,):
            if isinstance(inner, type) and attrs.has(inner) and inner not in seen:
                seen.add(inner)
                nested.append((inner, here + suffix))
    out.append("")
    for inner, path in nested:
        _section(inner, path, out, seen)


# --------------------------------------------------------------------------- hooks.md


def hooks_markdown() -> str:
    from mqi_framework import hookspecs

    lines = ["# Hooks reference", "",
             "Generated from `mqi_framework/hookspecs.py` by `python -m mqi_framework.docgen`; do not edit.", "",
             "Implement a hook with `from mqi_framework import hookimpl` and a function of the same name "
             "taking exactly the arguments it uses (no defaults). Register the module through the entry-point "
             "group `mqi_framework.plugins`.", ""]
    for name, fn in hookspecs.hook_docs().items():
        lines += [f"## `{name}`", "", "```python", f"def {name}{_signature(fn)}", "```", "",
                  _doc(fn.__doc__ or "(undocumented)"), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- configuration.md


def config_markdown() -> str:
    from mqi_framework import config

    out = ["# Configuration reference", "",
           "Generated from `mqi_framework/config.py` by `python -m mqi_framework.docgen`; do not edit.", "",
           "One YAML file (`mqi.yaml`). Unknown keys and wrong types are errors naming the YAML path and line. "
           "`${VAR}` / `${VAR:-default}` in any string is replaced from the environment (use it for secrets). "
           "Relative paths resolve against `workspace`, which resolves against the config file's folder. "
           "Each worker's `settings:` is validated by its plugin's own settings class: the "
           "[plugin settings reference](plugin-settings.md) lists them for the builtin and first-party plugins.",
           "", "## Command placeholders", "",
           "Step `command`, `workdir`, `outputs` and `env` may use these; in `command` every value is "
           "shell-quoted (`shlex.quote`) when substituted.", "", "| placeholder | value |", "|---|---|"]
    out += [f"| `{{{k}}}` | {v} |" for k, v in config.COMMAND_FIELDS.items()]
    out += ["| `{name}` | any key of `workflow.vars` |", "", "## Sections", ""]
    _section(config.MqiConfig, "", out, {config.MqiConfig})
    from mqi_framework.workspace import starter_config_text

    out += ["## Example", "", "The starter config written by `mqi-host init` (the same as "
            "`examples/quickstart/mqi.yaml`):", "", "```yaml", starter_config_text().rstrip(), "```"]
    return "\n".join(out)


# --------------------------------------------------------------------------- plugin-settings.md


def first_party_distributions() -> list[str]:
    """``mqi-host`` and the distribution of every plugin folder under ``plugins/``."""
    import tomllib

    names = [BUILTIN_DISTRIBUTION]
    for pyproject in sorted(PLUGINS_DIR.glob("*/pyproject.toml")):
        names.append(tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["name"])
    return names


@contextlib.contextmanager
def _plugin_switches_off() -> Iterator[None]:
    """The reference must not depend on a site's MQI_LOAD_PLUGINS / MQI_DISABLE_PLUGINS."""
    names = ("MQI_LOAD_PLUGINS", "MQI_DISABLE_PLUGINS", "MQI_STRICT_PLUGINS", "MQI_TRACE_HOOKS")
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def first_party_implementations() -> list[tuple[Any, str]]:
    """Every implementation registered by the builtin and first-party plugins, as the
    registry's ``Registered`` record with its distribution, in the kinds table's order,
    then by name.

    Raises :class:`DocgenError` when a first-party distribution is not installed, failed to
    load or registers nothing, because the reference would then silently lose its section."""
    from mqi_framework.kinds import KINDS
    from mqi_framework.plugins import PluginHost

    with _plugin_switches_off():
        host = PluginHost()
        registry = host.registry()
    wanted = first_party_distributions()
    problems = []
    for dist in wanted:
        try:
            md.distribution(dist)
        except md.PackageNotFoundError:
            problems.append(f"{dist} is not installed (pip install -e plugins/{dist.removeprefix('mqi-')})")
    for record in host.records.values():
        if record.distribution in wanted and record.status != "ok":
            problems.append(f"plugin {record.name} of {record.distribution} is {record.status}: {record.error}")
    problems += host.registry_errors
    found = [reg for kind in KINDS for _, reg in sorted(registry[kind].items())
             if host.records[reg.plugin].distribution in wanted]
    registering = {host.records[reg.plugin].distribution for reg in found}
    problems += [f"{dist} registers no implementation" for dist in wanted
                 if dist not in registering and not any(p.startswith(dist) for p in problems)]
    if problems:
        raise DocgenError("cannot generate the plugin settings reference: " + "; ".join(problems))
    return [(reg, host.records[reg.plugin].distribution) for reg in found]


def plugin_settings_markdown() -> str:
    out = ["# Plugin settings reference", "",
           "Generated from the settings classes of the builtin plugins (`mqi_framework/builtin/`) and the "
           "first-party plugins (`plugins/`) by `python -m mqi_framework.docgen`; do not edit.", "",
           "A worker section selects an implementation with `plugin:` and configures it with `settings:`, "
           "which that implementation's own attrs class validates (unknown keys and wrong types are errors "
           "naming `workers.<name>.settings.<key>`). `mqi-host --plugins` lists what is installed.", ""]
    implementations = first_party_implementations()
    out += ["| kind | plugin | class | distribution |", "|---|---|---|---|"]
    for reg, dist in implementations:
        out.append(f"| {reg.kind} | [`{reg.name}`](#{_anchor(reg)}) | `{reg.cls.__name__}` | {dist} |")
    out.append("")
    for reg, dist in implementations:
        cls = reg.cls
        out += [f"## {reg.kind} `{reg.name}`", "",
                f"`{cls.__module__}.{cls.__name__}` from {dist}: "
                f"{_md(_first_paragraph(cls.__doc__))}", ""]
        settings_class = getattr(cls, "settings_class", None)
        if settings_class is None:
            out += ["Takes no settings.", ""]
            continue
        _section(settings_class, "workers.<name>.settings", out, {settings_class})
    return "\n".join(out).rstrip() + "\n"


def _anchor(reg: Any) -> str:
    return re.sub(r"[^a-z0-9_-]+", "", f"{reg.kind}-{reg.name}".lower().replace(" ", "-"))


def _first_sentence(text: str) -> str:
    return re.split(r"(?<=[a-z0-9)\]`])\.\s+(?=[A-Z`(])", text, maxsplit=1)[0].rstrip(".")


def _first_paragraph(doc: Optional[str]) -> str:
    text = inspect.cleandoc(doc or "")
    return " ".join(text.split("\n\n")[0].split())


# --------------------------------------------------------------------------- protocols.md


def protocol_names() -> list[str]:
    """``protocols.__all__`` in the order the module defines the names."""
    from mqi_framework import protocols

    source = inspect.getsource(protocols)
    order = {}
    for node in ast.parse(source).body:
        targets = [node.name] if isinstance(node, (ast.ClassDef, ast.FunctionDef)) else [
            t.id for t in getattr(node, "targets", [getattr(node, "target", None)]) if isinstance(t, ast.Name)]
        for name in targets:
            order.setdefault(name, node.lineno)
    return sorted(protocols.__all__, key=lambda n: (order.get(n, 10**9), n))


def module_attribute_comments(module: Any) -> dict[str, str]:
    """``#:`` comments above the module-level assignments of ``module`` (type aliases)."""
    source = inspect.getsource(module)
    comments = _comments(source)
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            above = []
            row = node.lineno - 1
            while row in comments and comments[row][1] and comments[row][0].startswith(":"):
                above.insert(0, comments[row][0][1:].strip())
                row -= 1
            out[node.targets[0].id] = " ".join(a for a in above if a)
    return out


def public_methods(cls: type) -> dict[str, Any]:
    """The public methods and properties ``cls`` itself defines (not inherited ones)."""
    out = {}
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, (classmethod, staticmethod)):
            value = value.__func__
        if inspect.isfunction(value) or isinstance(value, property):
            out[name] = value
    return out


def _class_attributes(cls: type) -> list[tuple[str, str, str]]:
    """(name, value, description) of the public class-level attributes ``cls`` declares."""
    if attrs.has(cls):
        return []
    described = attribute_descriptions(cls)
    out = []
    for name, text in described.items():
        if name.startswith("_") or name in public_methods(cls):
            continue
        value = vars(cls).get(name, attrs.NOTHING)
        out.append((name, "" if value is attrs.NOTHING else repr(value), text))
    return out


def protocols_markdown() -> str:
    from mqi_framework import protocols

    out = ["# Protocols reference", "",
           "Generated from `mqi_framework/protocols.py` by `python -m mqi_framework.docgen`; do not edit.", "",
           _doc(protocols.__doc__), "", "| name | what it is |", "|---|---|"]
    names = protocol_names()
    aliases = module_attribute_comments(protocols)
    for name in names:
        obj = getattr(protocols, name)
        summary = _first_paragraph(obj.__doc__) if inspect.isclass(obj) else aliases.get(name, "")
        out.append(f"| [`{name}`](#{name.lower()}) | {_cell(_first_sentence(summary))} |")
    out.append("")
    for name in names:
        obj = getattr(protocols, name)
        out += [f"## `{name}`", ""]
        if not inspect.isclass(obj):
            out += ["```python", f"{name} = {_type_name(obj)}", "```", "", _md(aliases.get(name, "")), ""]
            continue
        bases = [b.__name__ for b in obj.__bases__ if b is not object]
        kind = ("exception" if issubclass(obj, BaseException) else "abstract base class" if inspect.isabstract(obj)
                or issubclass(obj, protocols.Plugin) else "data type (attrs, frozen)" if attrs.has(obj) else "class")
        out += [f"*{kind}*" + (f", subclass of {', '.join(f'`{b}`' for b in bases)}" if bases else ""), "",
                _doc(obj.__dict__.get("__doc__")), ""]
        if attrs.has(obj):
            hints = typing.get_type_hints(obj)
            described = field_descriptions(obj)
            out += ["| field | type | default | description |", "|---|---|---|---|"]
            doc = obj.__dict__.get("__doc__") or ""
            for field in attrs.fields(obj):
                text = described[field.name] or ("see above" if f"``{field.name}``" in doc else "")
                out.append(f"| `{field.name}` | `{_type_name(hints.get(field.name, field.type))}` | "
                           f"{_default(field)} | {_cell(text)} |")
            out.append("")
        class_attrs = _class_attributes(obj)
        if class_attrs:
            out += ["| class attribute | default | description |", "|---|---|---|"]
            doc = obj.__dict__.get("__doc__") or ""
            out += [f"| `{n}` | {f'`{v}`' if v else ''} | {_cell(t or ('see above' if f'``{n}``' in doc else ''))} |"
                    for n, v, t in class_attrs]
            out.append("")
        for method_name, method in public_methods(obj).items():
            abstract = getattr(method, "__isabstractmethod__", False)
            if isinstance(method, property):
                head, doc = f"{name}.{method_name}  (property)", method.__doc__
            else:
                head, doc = f"{name}.{method_name}{_signature(method)}", method.__doc__
            out += [f"### `{method_name}`" + (" (abstract)" if abstract else ""), "", "```python", head, "```", "",
                    _doc(doc), ""]
    return "\n".join(out).rstrip() + "\n"


# --------------------------------------------------------------------------- main


GENERATED: dict[str, Callable[[], str]] = {
    "hooks.md": hooks_markdown,
    "configuration.md": config_markdown,
    "plugin-settings.md": plugin_settings_markdown,
    "protocols.md": protocols_markdown,
}


def render(name: str) -> str:
    """The text ``docs/<name>`` must hold."""
    return GENERATED[name]().rstrip("\n") + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mqi_framework.docgen", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a generated file is stale")
    parser.add_argument("--docs", type=Path, default=DOCS, help="docs folder")
    args = parser.parse_args(argv)
    stale = []
    for name in GENERATED:
        target = args.docs / name
        try:
            text = render(name)
        except DocgenError as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            return 2
        if args.check:
            if not target.exists() or target.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
            print(f"wrote {target}")
    if stale:
        print(f"stale: {', '.join(stale)}; run python -m mqi_framework.docgen", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
