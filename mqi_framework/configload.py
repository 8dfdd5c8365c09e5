"""YAML → frozen attrs classes, with errors that name the YAML path and line.

* :func:`load_yaml` parses with a SafeLoader that records the line of every mapping key
  and sequence item, keyed by dotted path (``workers.transfer.settings.port``; list items
  by index: ``workflow.steps.2.name``), and refuses duplicate keys.
* :func:`expand_env` replaces ``${VAR}`` and ``${VAR:-default}`` in strings (``$${`` is a
  literal ``${``). An unset variable is a problem at its path; values never appear in errors.
* :func:`structure` converts with one strict cattrs converter (no string → int coercion,
  real YAML booleans only, unknown keys refused) and reports every bad path at once.
"""

from __future__ import annotations

import re
import os
import typing
from pathlib import Path
from typing import Any, Optional

import attrs
import cattrs
import yaml
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError


@attrs.frozen
class ConfigProblem:
    path: str
    message: str
    line: Optional[int] = None


class ConfigError(Exception):
    """Every problem of a configuration, each with its YAML path (and line when known)."""

    def __init__(self, problems: list[ConfigProblem], source: Optional[str] = None) -> None:
        self.problems = list(problems)
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        name = self.source or "configuration"
        head = f"invalid configuration in {name} ({len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}):"
        lines = [head]
        for pr in self.problems:
            where = f"{name}:{pr.line}: " if pr.line else ""
            path = f"{pr.path}: " if pr.path else ""
            lines.append(f"  {where}{path}{pr.message}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


# --------------------------------------------------------------------------- YAML with lines


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers where each node started."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key]})", key_node.start_mark)
        seen[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _record_lines(node: yaml.Node, path: str, lines: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = str(key_node.value)
            child = f"{path}.{key}" if path else key
            lines[child] = key_node.start_mark.line + 1
            _record_lines(value_node, child, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            child = f"{path}.{i}" if path else str(i)
            lines[child] = item.start_mark.line + 1
            _record_lines(item, child, lines)


def _yaml_hint(problem: str, text: str, line: Optional[int]) -> str:
    """What a person most likely did, for PyYAML's terse syntax errors."""
    lines = text.splitlines()
    here = lines[line - 1] if line and 0 < line <= len(lines) else ""
    if "\t" in problem or "\t" in here[: len(here) - len(here.lstrip())]:
        return "; YAML does not allow tabs for indentation: indent with spaces"
    if "mapping values are not allowed" in problem:
        return ("; a `key: value` where a value was expected: check this line's indentation against the "
                "line above, and quote a value that contains ': '")
    if "expected <block end>" in problem or "did not find expected key" in problem:
        return "; this line is indented differently from the keys beside it: align it with them (spaces only)"
    if "could not find expected ':'" in problem:
        return "; a key without ':' (or an unclosed quote above)"
    return ""


def load_yaml(path: Path) -> tuple[Any, dict[str, int]]:
    """Parse ``path``; return (data, {dotted path: line}). Syntax errors become ConfigError."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigProblem("", f"cannot read the file: {exc}")], source=source) from exc
    try:
        node = yaml.compose(text, Loader=_LineLoader)
        data = yaml.load(text, Loader=_LineLoader) if node is not None else {}
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        where = f" (column {mark.column + 1})" if mark else ""
        hint = _yaml_hint(str(exc.problem or exc), text, line)
        raise ConfigError([ConfigProblem("", f"YAML syntax: {exc.problem or exc}{where}{hint}", line)],
                          source=source) from exc
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigProblem("", f"YAML syntax: {exc}")], source=source) from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([ConfigProblem("", f"the top level must be a mapping of keys, got {type(data).__name__}", 1)],
                          source=source)
    lines: dict[str, int] = {}
    if node is not None:
        _record_lines(node, "", lines)
    return data, lines


# --------------------------------------------------------------------------- ${ENV}

_ENV = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


def expand_env(data: Any, *, path: str = "", lines: Optional[dict[str, int]] = None,
               environ: Optional[dict] = None) -> tuple[Any, list[ConfigProblem]]:
    """Return (data with ``${VAR}`` replaced, problems for unset variables)."""
    env = os.environ if environ is None else environ
    problems: list[ConfigProblem] = []

    def walk(value: Any, where: str) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, f"{where}.{i}" if where else str(i)) for i, v in enumerate(value)]
        if isinstance(value, str) and "$" in value:
            def sub(match: re.Match) -> str:
                if match.group(0) == "$${":
                    return "${"
                name, default = match.group(1), match.group(2)
                if name in env:
                    return env[name]
                if default is not None:
                    return default
                problems.append(ConfigProblem(where, f"environment variable {name} is not set",
                                              (lines or {}).get(where)))
                return ""
            return _ENV.sub(sub, value)
        return value

    return walk(data, path), problems


# --------------------------------------------------------------------------- strict converter


class _Mismatch(ValueError):
    pass


def _describe(value: Any) -> str:
    return repr(value) if not isinstance(value, (dict, list)) else type(value).__name__


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)

    def strict_int(value: Any, _: type) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Mismatch(f"expected int, got {_describe(value)}")
        return value

    def strict_float(value: Any, _: type) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Mismatch(f"expected number, got {_describe(value)}")
        return float(value)

    def strict_bool(value: Any, _: type) -> bool:
        if not isinstance(value, bool):
            raise _Mismatch(f"expected true or false, got {_describe(value)}")
        return value

    def strict_str(value: Any, _: type) -> str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise _Mismatch(f"expected text, got {_describe(value)}")
        return str(value)

    def to_path(value: Any, _: type) -> Path:
        if not isinstance(value, str):
            raise _Mismatch(f"expected a path, got {_describe(value)}")
        return Path(value)

    conv.register_structure_hook(int, strict_int)
    conv.register_structure_hook(float, strict_float)
    conv.register_structure_hook(bool, strict_bool)
    conv.register_structure_hook(str, strict_str)
    conv.register_structure_hook(Path, to_path)
    conv.register_structure_hook(typing.Any, lambda v, _: v)

    def is_literal(tp: Any) -> bool:
        return typing.get_origin(tp) is typing.Literal

    def literal(value: Any, tp: Any) -> Any:
        options = typing.get_args(tp)
        if value not in options or isinstance(value, bool) != any(isinstance(o, bool) for o in options):
            raise _Mismatch(f"expected one of {', '.join(repr(o) for o in options)}, got {_describe(value)}")
        return value

    conv.register_structure_hook_func(is_literal, literal)

    return conv


converter = _make_converter()


def _precheck(cls: Any, data: Any, path: str, problems: list[ConfigProblem], lines: dict[str, int]) -> None:
    """Type-shape errors cattrs reports poorly: a scalar where a mapping or list is expected."""
    origin = typing.get_origin(cls)
    if isinstance(cls, type) and attrs.has(cls):
        if not isinstance(data, dict):
            problems.append(ConfigProblem(path, f"expected a mapping of keys, got {_describe(data)}", lines.get(path)))
            return
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in attrs.fields(cls)}
        for key in data:
            if key not in fields:
                where = f"{path}.{key}" if path else str(key)
                problems.append(ConfigProblem(
                    where, f"unknown key {key!r} (expected one of: {', '.join(fields)})", lines.get(where)))
        for name, field in fields.items():
            where = f"{path}.{name}" if path else name
            if name not in data:
                if field.default is attrs.NOTHING:
                    problems.append(ConfigProblem(where, f"missing required key {name!r}", lines.get(path) or None))
                continue
            _precheck(hints.get(name, field.type), data[name], where, problems, lines)
    elif origin in (list, typing.List):
        if not isinstance(data, list):
            problems.append(ConfigProblem(path, f"expected a list, got {_describe(data)}", lines.get(path)))
            return
        (item,) = typing.get_args(cls) or (typing.Any,)
        for i, value in enumerate(data):
            _precheck(item, value, f"{path}.{i}", problems, lines)
    elif origin in (dict, typing.Dict):
        if not isinstance(data, dict):
            problems.append(ConfigProblem(path, f"expected a mapping of keys, got {_describe(data)}", lines.get(path)))
            return
        args = typing.get_args(cls)
        value_type = args[1] if len(args) == 2 else typing.Any
        for key, value in data.items():
            _precheck(value_type, value, f"{path}.{key}", problems, lines)
    elif origin is typing.Union:
        args = [a for a in typing.get_args(cls) if a is not type(None)]
        if data is None:
            if len(args) == len(typing.get_args(cls)):
                problems.append(ConfigProblem(path, "a value is required here", lines.get(path)))
            return
        if len(args) == 1:
            _precheck(args[0], data, path, problems, lines)
        else:
            _scalar(args[0], data, path, problems, lines)
    else:
        _scalar(cls, data, path, problems, lines)


def _scalar(tp: Any, data: Any, path: str, problems: list[ConfigProblem], lines: dict[str, int]) -> None:
    if tp is typing.Any:
        return
    if data is None:
        problems.append(ConfigProblem(path, "a value is required here (got nothing)", lines.get(path)))
        return
    try:
        converter.structure(data, tp)
    except _Mismatch as exc:
        problems.append(ConfigProblem(path, str(exc), lines.get(path)))
    except (ValueError, TypeError, cattrs.BaseValidationError) as exc:
        problems.append(ConfigProblem(path, f"invalid value {_describe(data)}: {exc}", lines.get(path)))


def _from_cattrs(exc: BaseException, path: str, lines: dict[str, int]) -> list[ConfigProblem]:
    """Fallback: flatten a cattrs exception group into problems (validators, odd types)."""
    out: list[ConfigProblem] = []
    if isinstance(exc, (ClassValidationError, IterableValidationError)):
        for sub in exc.exceptions:
            note = next((n for n in getattr(sub, "__notes__", []) if n), "")
            name = getattr(note, "name", None) if not isinstance(note, str) else None
            index = getattr(note, "index", None) if not isinstance(note, str) else None
            child = path
            if name is not None:
                child = f"{path}.{name}" if path else str(name)
            elif index is not None:
                child = f"{path}.{index}" if path else str(index)
            out.extend(_from_cattrs(sub, child, lines))
    elif isinstance(exc, ForbiddenExtraKeysError):
        for key in sorted(exc.extra_fields):
            where = f"{path}.{key}" if path else key
            out.append(ConfigProblem(where, f"unknown key {key!r}", lines.get(where)))
    else:
        out.append(ConfigProblem(path, str(exc), lines.get(path)))
    return out


def structure(cls: type, data: Any, *, path: str = "", lines: Optional[dict[str, int]] = None,
              source: Optional[str] = None) -> Any:
    """Structure ``data`` into ``cls``; raise one ConfigError listing every problem."""
    lines = lines or {}
    data, problems = expand_env(data, path=path, lines=lines)
    _precheck(cls, data, path, problems, lines)
    if problems:
        raise ConfigError(problems, source=source)
    try:
        return converter.structure(data, cls)
    except Exception as exc:  # validators and anything the precheck did not foresee
        raise ConfigError(_from_cattrs(exc, path, lines) or [ConfigProblem(path, str(exc), lines.get(path))],
                          source=source) from exc


def load_with_lines(cls: type, path: Path) -> tuple[Any, dict[str, int]]:
    """Load ``path`` into ``cls``; return (instance, line map) for later plugin sections."""
    data, lines = load_yaml(path)
    return structure(cls, data, lines=lines, source=str(path)), lines


def load(cls: type, path: Path) -> Any:
    """Load ``path`` into ``cls`` (YAML, ``${ENV}`` expansion, strict structuring)."""
    return load_with_lines(cls, path)[0]


def unstructure(obj: Any) -> Any:
    return converter.unstructure(obj)
