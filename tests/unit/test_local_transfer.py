"""core.local transfer: verified copies, resume, re-run no-op, no symlinks, root escape."""

from __future__ import annotations

import json
import os

import pytest

from mqi_framework.builtin.local_transfer import LocalTransfer, LocalTransferSettings
from mqi_framework.tree import MANIFEST
from mqi_framework.hashing import VerificationError, copy_verified, sha256_file
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


def test_manifest_lists_every_file_with_size_and_is_written_last(tmp_path, tree):
    remote = tmp_path / "remote"
    seen = []

    def progress(p):  # the manifest appears only after the last file
        seen.append((p.files_done, (remote / MANIFEST).exists()))

    transfer(tmp_path).upload(tree, str(remote), progress)
    assert seen == [(i, False) for i in range(1, len(NAMES) + 1)]
    manifest = json.loads((remote / MANIFEST).read_text())
    files = sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file())
    assert sorted(manifest) == files
    for rel, entry in manifest.items():
        assert entry["size"] == (tree / rel).stat().st_size
        assert entry["sha256"] == sha256_file(tree / rel)
        assert (remote / rel).stat().st_mtime_ns == (tree / rel).stat().st_mtime_ns  # preserve_mtime


def test_leftover_part_next_to_a_good_file_is_removed(tmp_path, tree):
    t = transfer(tmp_path)
    remote = tmp_path / "remote"
    t.upload(tree, str(remote), lambda p: None)
    good = remote / "beams" / "0" / NAMES[0]
    good.with_name(good.name + ".part").write_bytes(b"junk")
    assert t.upload(tree, str(remote), lambda p: None).skipped == len(NAMES)
    assert not list(remote.rglob("*.part"))


def test_destination_symlinks_are_never_written_through(tmp_path, tree):
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_text("keep me")
    remote = tmp_path / "remote"
    # a leftover .part that is a symlink, and a destination file that is a symlink
    target = remote / "beams" / "0" / NAMES[0]
    target.parent.mkdir(parents=True)
    target.with_name(target.name + ".part").symlink_to(victim)
    (remote / "beams" / "1").mkdir()
    (remote / "beams" / "1" / NAMES[1]).symlink_to(victim)
    transfer(tmp_path).upload(tree, str(remote), lambda p: None)
    assert victim.read_text() == "keep me"
    assert not (remote / "beams" / "1" / NAMES[1]).is_symlink()
    assert sha256_file(target) == sha256_file(tree / "beams" / "0" / NAMES[0])


def test_destination_folder_symlinked_out_is_refused(tmp_path, tree):
    outside = tmp_path / "outside"
    outside.mkdir()
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "beams").symlink_to(outside)
    with pytest.raises(PathEscapeError):
        transfer(tmp_path).upload(tree, str(remote), lambda p: None)
    assert not list(outside.iterdir())


def test_remote_root_relative_and_symlinked_escapes(tmp_path, tree):
    root = tmp_path / "remote"
    root.mkdir()
    (root / "door").symlink_to(tmp_path)
    t = transfer(tmp_path, root=str(root))
    t.upload(tree, "case-000002", lambda p: None)  # relative: inside the root
    assert (root / "case-000002" / MANIFEST).exists()
    for bad in ("/etc", str(root / "door" / "x"), "../x"):
        with pytest.raises(PathEscapeError):
            t.upload(tree, bad, lambda p: None)
        with pytest.raises(PathEscapeError):
            t.download(bad, tmp_path / "back", lambda p: None)
    assert not (tmp_path / "x").exists()
    assert t.check() == []
    assert transfer(tmp_path, root=str(tmp_path / "nope")).check()


def test_empty_tree_and_overlap(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    seen = []
    result = transfer(tmp_path).upload(empty, str(tmp_path / "remote"), seen.append)
    assert result.files == 0 and seen[-1].files_total == 0
    assert json.loads((tmp_path / "remote" / MANIFEST).read_text()) == {}
    with pytest.raises(ValueError, match="overlap"):
        transfer(tmp_path).upload(empty, str(empty / "inner"), lambda p: None)


def test_download_does_not_bring_back_the_upload_manifest_as_data(tmp_path, tree):
    t = transfer(tmp_path)
    t.upload(tree, str(tmp_path / "remote"), lambda p: None)
    (tmp_path / "remote" / "result").mkdir()
    (tmp_path / "remote" / "result" / "dose.raw").write_bytes(b"d" * 100)
    back = t.download(str(tmp_path / "remote"), tmp_path / "back", lambda p: None)
    assert back.files == len(NAMES) + 1
    manifest = json.loads((tmp_path / "back" / MANIFEST).read_text())
    assert MANIFEST not in manifest and "result/dose.raw" in manifest


def test_copy_verified_streams_and_replaces_atomically(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    dst = tmp_path / "out" / "dst.bin"
    chunks = []
    digest = copy_verified(src, dst, on_bytes=chunks.append)
    assert digest == sha256_file(src) == sha256_file(dst)
    assert sum(chunks) == src.stat().st_size and max(chunks) == 1024 * 1024
    assert not dst.with_name("dst.bin.part").exists()
    assert issubclass(VerificationError, OSError)
    with pytest.raises(FileNotFoundError):
        copy_verified(tmp_path / "missing", tmp_path / "out" / "x")
    assert not (tmp_path / "out" / "x.part").exists()


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
