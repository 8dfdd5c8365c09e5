"""Paths built from data never leave their root."""

import pytest

from mqi_framework.safepath import PathEscapeError, is_within, safe_component, safe_join


def test_safe_join(tmp_path):
    assert safe_join(tmp_path, "a", "b c") == tmp_path / "a" / "b c"
    for bad in ("..", "../x", "/etc/passwd", "a/../../x"):
        with pytest.raises(PathEscapeError):
            safe_join(tmp_path, bad)
    (tmp_path / "out").symlink_to("/")
    with pytest.raises(PathEscapeError):
        safe_join(tmp_path, "out", "etc")


def test_is_within(tmp_path):
    assert is_within(tmp_path, tmp_path / "x")
    assert not is_within(tmp_path / "x", tmp_path)


@pytest.mark.parametrize("text", ["plain", "a b", "x'; rm -rf /", "..", "/abs", "new\nline", "ü" * 200, ""])
def test_safe_component(text):
    out = safe_component(text)
    assert out and "/" not in out and out not in (".", "..") and len(out) <= 100
    assert out == safe_component(text)
    assert all(c.isalnum() or c in "._-" for c in out)
