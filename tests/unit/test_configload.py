"""YAML → attrs with paths and lines: every error kind, all problems at once, ${ENV}."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import attrs
import pytest

from mqi_framework.configload import ConfigError, expand_env, load, load_yaml, structure


@attrs.frozen
class Port:
    host: str
    port: int = 22
    verify: bool = True


@attrs.frozen
class Root:
    name: str
    hosts: list[Port] = attrs.field(factory=list)
    named: dict[str, Port] = attrs.field(factory=dict)
    fmt: Literal["raw", "mhd", "dcm"] = "raw"
    ratio: float = 1.0
    path: Optional[Path] = None
    extra: dict[str, str] = attrs.field(factory=dict)


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def problems(tmp_path, text):
    with pytest.raises(ConfigError) as err:
        load(Root, write(tmp_path, text))
    return {(p.path, p.line): p.message for p in err.value.problems}, str(err.value)


def test_valid_round_trip(tmp_path):
    cfg = load(Root, write(tmp_path, "name: a\nhosts:\n  - host: h\n    port: 2222\nnamed:\n  x: {host: y}\n"
                                      "fmt: mhd\nratio: 2\npath: /tmp/x\n"))
    assert cfg.hosts[0].port == 2222 and cfg.named["x"].host == "y" and cfg.fmt == "mhd"
    assert cfg.ratio == 2.0 and cfg.path == Path("/tmp/x")


def test_every_problem_with_path_and_line(tmp_path):
    text = ("name: a\n"               # 1
            "hosts:\n"                # 2
            "  - host: h\n"           # 3
            "    port: abc\n"         # 4
            "    prot: 5\n"           # 5
            "  - port: 1\n"           # 6
            "fmt: png\n"              # 7
            "ratio: fast\n"           # 8
            "named:\n"                # 9
            "  x: {host: y, verify: 'yes'}\n")  # 10
    found, rendered = problems(tmp_path, text)
    assert found[("hosts.0.port", 4)] == "expected int, got 'abc'"
    assert "unknown key 'prot'" in found[("hosts.0.prot", 5)] and "host, port, verify" in found[("hosts.0.prot", 5)]
    assert found[("hosts.1.host", 6)] == "missing required key 'host'"
    assert "expected one of 'raw', 'mhd', 'dcm', got 'png'" == found[("fmt", 7)]
    assert ("ratio", 8) in found
    assert "expected true or false" in found[("named.x.verify", 10)]
    assert "c.yaml:4: hosts.0.port: expected int, got 'abc'" in rendered
    assert "(6 problems)" in rendered


def test_wrong_shapes(tmp_path):
    found, _ = problems(tmp_path, "name: a\nhosts: notalist\nnamed: [1]\n")
    assert "expected a list" in found[("hosts", 2)]
    assert "expected a mapping" in found[("named", 3)]
    found, _ = problems(tmp_path, "- 1\n- 2\n")
    assert "top level must be a mapping" in list(found.values())[0]


def test_missing_required_top_level(tmp_path):
    found, _ = problems(tmp_path, "hosts: []\n")
    assert list(found.values()) == ["missing required key 'name'"]


def test_yaml_syntax_error_has_a_line(tmp_path):
    found, rendered = problems(tmp_path, "name: a\nhosts: [\n  - x\nfoo: : :\n")
    ((path, line), message), = found.items()
    assert line is not None and "YAML syntax" in message


def test_duplicate_keys_are_refused(tmp_path):
    found, _ = problems(tmp_path, "name: a\nname: b\n")
    assert "duplicate key 'name' (first at line 1)" in list(found.values())[0]


def test_env_expansion(tmp_path, monkeypatch):
    monkeypatch.setenv("MQI_T_NAME", "from-env")
    monkeypatch.setenv("MQI_T_SECRET", "hunter2")
    cfg = load(Root, write(tmp_path, "name: ${MQI_T_NAME}\nextra:\n  a: ${MQI_T_UNSET:-dflt}\n  b: $${LITERAL}\n"
                                      "  c: pw=${MQI_T_SECRET}\n"))
    assert cfg.name == "from-env" and cfg.extra == {"a": "dflt", "b": "${LITERAL}", "c": "pw=hunter2"}
    found, rendered = problems(tmp_path, "name: ${MQI_T_MISSING}\nextra: {c: '${MQI_T_SECRET}x'}\nratio: x\n")
    assert found[("name", 1)] == "environment variable MQI_T_MISSING is not set"
    assert "hunter2" not in rendered


def test_structure_with_prefix_for_plugin_sections(tmp_path):
    data, lines = load_yaml(write(tmp_path, "workers:\n  t:\n    settings:\n      port: x\n      host: h\n"))
    with pytest.raises(ConfigError) as err:
        structure(Port, data["workers"]["t"]["settings"], path="workers.t.settings", lines=lines)
    (problem,) = err.value.problems
    assert problem.path == "workers.t.settings.port" and problem.line == 4


def test_expand_env_reports_paths():
    data, found = expand_env({"a": ["${NOPE_X}"]}, environ={})
    assert data == {"a": [""]} and found[0].path == "a.0"


@pytest.mark.parametrize("text, line, hint", [
    ("name: a\nhosts:\n\t- x\n", 3, "does not allow tabs for indentation"),
    ("name: a\nhosts: b\n  c: d\n", 3, "check this line's indentation"),
    ("name: a\nhosts:\n    - x\n  - y\n", 4, "indented differently from the keys beside it"),
], ids=["tab", "bad-indent-mapping", "bad-indent-list"])
def test_yaml_syntax_errors_say_what_was_likely_meant(tmp_path, text, line, hint):
    """Issue 19: PyYAML's own text ("mapping values are not allowed here") with a hint."""
    found, _ = problems(tmp_path, text)
    ((_, at), message), = found.items()
    assert at == line and hint in message and "column" in message
