"""Generates docs/hooks.md from the hookspec docstrings and docs/configuration.md from the
attrs config classes, so neither can drift from the code (a test compares them).

    python -m mqi_framework.docgen          # rewrite both files
    python -m mqi_framework.docgen --check  # exit 1 when a file is stale
"""

from __future__ import annotations

import argparse
import inspect
import sys
import typing
from pathlib import Path
from typing import Optional, Sequence

import attrs

DOCS = Path(__file__).resolve().parent.parent / "docs"


def hooks_markdown() -> str:
    from mqi_framework import hookspecs

    lines = ["# Hooks reference", "",
             "Generated from `mqi_framework/hookspecs.py` by `python -m mqi_framework.docgen`; do not edit.", "",
             "Implement a hook with `from mqi_framework import hookimpl` and a function of the same name "
             "taking exactly the arguments it uses (no defaults). Register the module through the entry-point "
             "group `mqi_framework.plugins`.", ""]
    for name, fn in hookspecs.hook_docs().items():
        signature = inspect.signature(fn)
        lines += [f"## `{name}`", "", "```python", f"def {name}{signature}", "```", "",
                  inspect.cleandoc(fn.__doc__ or "(undocumented)"), ""]
    return "\n".join(lines)


def _type_name(tp: object) -> str:
    if typing.get_origin(tp) is not None or isinstance(tp, str):
        text = str(tp)
    else:
        text = getattr(tp, "__name__", None) or repr(tp)
    return text.replace("typing.", "").replace("mqi_framework.config.", "").replace("NoneType", "None")


def _default(field: attrs.Attribute) -> str:
    if field.default is attrs.NOTHING:
        return "**required**"
    if isinstance(field.default, attrs.Factory):  # type: ignore[arg-type]
        return f"`{field.default.factory()!r}`"
    if attrs.has(type(field.default)):
        return "(section)"
    return f"`{field.default!r}`"


def _section(cls: type, prefix: str, out: list[str], seen: set) -> None:
    hints = typing.get_type_hints(cls)
    source = inspect.getsource(cls)
    out += [f"### `{prefix or '(top level)'}` — {cls.__name__}", "", inspect.cleandoc(cls.__doc__ or ""), "",
            "| key | type | default | notes |", "|---|---|---|---|"]
    nested = []
    for field in attrs.fields(cls):
        comment = ""
        for line in source.splitlines():
            stripped = line.strip()
            if stripped.startswith(f"{field.name}:") and "#" in stripped:
                comment = stripped.split("#", 1)[1].strip()
        tp = hints.get(field.name, field.type)
        out.append(f"| `{field.name}` | `{_type_name(tp)}` | {_default(field)} | {comment} |")
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


def config_markdown() -> str:
    from mqi_framework import config

    out = ["# Configuration reference", "",
           "Generated from `mqi_framework/config.py` by `python -m mqi_framework.docgen`; do not edit.", "",
           "One YAML file (`mqi.yaml`). Unknown keys and wrong types are errors naming the YAML path and line. "
           "`${VAR}` / `${VAR:-default}` in any string is replaced from the environment (use it for secrets). "
           "Relative paths resolve against `workspace`, which resolves against the config file's folder. "
           "Each worker's `settings:` is validated by its plugin's own settings class (see the plugin's README).",
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


GENERATED = {"hooks.md": hooks_markdown, "configuration.md": config_markdown}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mqi_framework.docgen", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a generated file is stale")
    parser.add_argument("--docs", type=Path, default=DOCS, help="docs folder")
    args = parser.parse_args(argv)
    stale = []
    for name, make in GENERATED.items():
        target = args.docs / name
        text = make() + "\n"
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
