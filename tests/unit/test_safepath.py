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


ODD = ["with space", "quote's \"x\"", "semi;colon $(touch PWNED)", "new\nline", "ünïcödé", "-rf", "tab\there"]


@pytest.mark.parametrize("name", ODD)
def test_safe_join_keeps_odd_names_as_data(tmp_path, name):
    joined = safe_join(tmp_path, name, "file.txt")
    assert joined == tmp_path / name / "file.txt"
    joined.parent.mkdir()
    joined.write_text("x")
    assert [p.name for p in tmp_path.iterdir()] == [name]
    assert not list(tmp_path.rglob("PWNED"))


def test_safe_join_refuses_nul_and_nested_escapes(tmp_path):
    for parts in (("a\x00b",), ("a", "..", "..", "b"), ("a", "/abs")):
        with pytest.raises(PathEscapeError):
            safe_join(tmp_path, *parts)
    assert safe_join(tmp_path, "a", "..", "b") == tmp_path / "a" / ".." / "b"  # stays inside
    with pytest.raises(ValueError):  # PathEscapeError is a ValueError
        safe_join(tmp_path, "..")


def test_symlink_inside_root_is_fine_and_symlink_loops_are_refused(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    assert safe_join(tmp_path, "alias", "x") == tmp_path / "alias" / "x"
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    assert not is_within(tmp_path / "real", tmp_path / "loop")


def test_is_within_follows_symlinks(tmp_path):
    outside = tmp_path / "outside"
    root = tmp_path / "root"
    outside.mkdir()
    root.mkdir()
    (root / "door").symlink_to(outside)
    assert is_within(root, root)
    assert is_within(str(root), str(root / "new" / "file"))
    assert not is_within(root, root / "door" / "file")
    assert not is_within(root, tmp_path / "rootx")  # a prefix is not a parent


def test_safe_component_is_injective_in_practice():
    texts = ["a b", "a_b", "a/b", "a\\b", "a\nb", "a;b", "a'b", "a_b-0123456789", "A_B", "-a_b", ".a_b", "a_b."]
    outs = [safe_component(t) for t in texts]
    assert len(set(outs)) == len(texts), outs
    assert safe_component("case-000001-simulate-b1-a1") == "case-000001-simulate-b1-a1"  # clean keys unchanged
    assert not safe_component("-rf").startswith("-")
    assert not safe_component(".hidden").startswith(".")
