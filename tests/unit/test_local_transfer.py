"""core.local transfer: verified copies, resume, re-run no-op, no symlinks, root escape."""

from __future__ import annotations

import json
import os

import pytest

from mqi_framework.builtin.local_transfer import MANIFEST, LocalTransfer, LocalTransferSettings
from mqi_framework.hashing import sha256_file
from mqi_framework.protocols import PluginContext
from mqi_framework.safepath import PathEscapeError

NAMES = ["plain.txt", "with space.dcm", "quote's \"x\".ptn", "semi;colon $(touch PWNED).mgn", "ünï/cödé.bin"]


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "src"
    for i, name in enumerate(NAMES):
        path = src / "beams" / str(i) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(1000 + i * 5000))
    return src


def transfer(tmp_path, **settings):
    return LocalTransfer(LocalTransferSettings(**settings), PluginContext(workspace=tmp_path))


def test_round_trip_verified_with_progress(tmp_path, tree):
    seen = []
    result = transfer(tmp_path).upload(tree, str(tmp_path / "remote"), seen.append)
    assert result.files == len(NAMES) and result.skipped == 0
    assert seen[-1].files_done == seen[-1].files_total == len(NAMES)
    assert seen[-1].bytes_done == seen[-1].bytes_total == result.bytes
    manifest = json.loads((tmp_path / "remote" / MANIFEST).read_text())
    for rel, entry in manifest.items():
        assert sha256_file(tmp_path / "remote" / rel) == sha256_file(tree / rel) == entry["sha256"]
    back = transfer(tmp_path).download(str(tmp_path / "remote"), tmp_path / "back", lambda p: None)
    assert back.files == len(NAMES)
    assert not list(tmp_path.rglob("*.part")) and not list(tmp_path.rglob("PWNED"))


def test_rerun_is_a_noop_and_resume_replaces_bad_files(tmp_path, tree):
    t = transfer(tmp_path)
    remote = tmp_path / "remote"
    t.upload(tree, str(remote), lambda p: None)
    again = t.upload(tree, str(remote), lambda p: None)
    assert again.skipped == len(NAMES)
    # an interrupted transfer: a leftover .part, a truncated file, a corrupted file
    victim = sorted(p for p in remote.rglob("*") if p.is_file() and p.name != MANIFEST)
    victim[0].with_name(victim[0].name + ".part").write_bytes(b"partial")
    victim[0].unlink()
    victim[1].write_bytes(victim[1].read_bytes()[:10])
    data = bytearray(victim[2].read_bytes())
    data[0] ^= 0xFF
    victim[2].write_bytes(bytes(data))
    resumed = t.upload(tree, str(remote), lambda p: None)
    assert resumed.skipped == len(NAMES) - 3
    for path in victim[:3]:
        rel = path.relative_to(remote)
        assert sha256_file(path) == sha256_file(tree / rel)
    assert not list(remote.rglob("*.part"))


def test_symlinks_are_not_followed(tmp_path, tree):
    secret = tmp_path / "secret.txt"
    secret.write_text("outside")
    (tree / "link.txt").symlink_to(secret)
    (tree / "linkdir").symlink_to(tmp_path)
    transfer(tmp_path).upload(tree, str(tmp_path / "remote"), lambda p: None)
    assert not (tmp_path / "remote" / "link.txt").exists()
    assert not (tmp_path / "remote" / "linkdir").exists()


def test_remote_root_is_enforced(tmp_path, tree):
    t = transfer(tmp_path, root=str(tmp_path / "remote"))
    t.upload(tree, str(tmp_path / "remote" / "case-000001"), lambda p: None)
    with pytest.raises(PathEscapeError):
        t.upload(tree, str(tmp_path / "remote" / ".." / "elsewhere"), lambda p: None)


def test_missing_source_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        transfer(tmp_path).upload(tmp_path / "none", str(tmp_path / "remote"), lambda p: None)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs: a real full disk (needs root, as in CI)."""
    import subprocess

    mount = tmp_path / "tiny"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot mount a tmpfs for the full-disk test: {proc.stderr.decode()}")
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_is_a_clear_error_and_leaves_no_half_files(tmp_path, tiny_disk):
    import errno

    src = tmp_path / "big"
    src.mkdir()
    for i in range(3):
        (src / f"log{i}.ptn").write_bytes(os.urandom(600_000))
    before = {p.name: sha256_file(p) for p in src.iterdir()}
    with pytest.raises(OSError) as err:
        transfer(tmp_path).upload(src, str(tiny_disk / "case-000001"), lambda p: None)
    assert err.value.errno == errno.ENOSPC
    assert not list(tiny_disk.rglob("*.part"))
    assert {p.name: sha256_file(p) for p in src.iterdir()} == before  # the source is untouched
