"""The ``sftp`` transfer against a real sshd: verified copies, resume, re-runs, hostile
names, paths that would leave the root, a server that goes away mid-upload."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import paramiko
import pytest

from mqi_framework.safepath import PathEscapeError
from mqi_framework.tree import MANIFEST
from mqi_ssh.connection import SshUnreachable

NAMES = ["plain.txt", "with space.txt", "quote's \"double\".txt", "semi;colon $(touch PWNED).txt", "-leading-dash",
         "back\\slash.txt", "line\nbreak.txt", "ünïcödé.txt", "folder with space/inner;file", "a/b/c/deep.bin"]


def make_tree(root: Path, big: int = 0) -> dict[str, bytes]:
    content = {}
    for i, name in enumerate(NAMES):
        data = os.urandom(1000 + i * 3000)
        content[name] = data
    if big:
        content["big.bin"] = os.urandom(big)
    for name, data in content.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return content


def tree_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and p.name != MANIFEST}


class Bytes:
    """Counts bytes paramiko really writes to / reads from the server (a spy, not a mock)."""

    def __init__(self, mocker) -> None:
        self.written = 0
        self.read = 0
        original_write, original_read = paramiko.SFTPFile._write, paramiko.SFTPFile._read

        def write(file, data):  # type: ignore[no-untyped-def]
            n = original_write(file, data)
            self.written += n
            return n

        def read(file, size):  # type: ignore[no-untyped-def]
            data = original_read(file, size)
            self.read += len(data or b"")
            return data

        mocker.patch.object(paramiko.SFTPFile, "_write", write)
        mocker.patch.object(paramiko.SFTPFile, "_read", read)


def test_round_trip_with_hostile_names_is_verified(make_transfer, tmp_path, remote_root):
    src = tmp_path / "src"
    content = make_tree(src, big=3_000_000)
    transfer = make_transfer()
    seen = []
    result = transfer.upload(src, str(remote_root / "case 1"), seen.append)
    assert (result.files, result.skipped) == (len(content), 0)
    assert result.bytes == sum(map(len, content.values()))
    assert tree_of(remote_root / "case 1") == content
    assert not list((remote_root / "case 1").rglob("*.part"))
    manifest = json.loads((remote_root / "case 1" / MANIFEST).read_text())
    assert manifest["big.bin"]["sha256"] == hashlib.sha256(content["big.bin"]).hexdigest()
    assert [p.bytes_done for p in seen] == sorted(p.bytes_done for p in seen)
    assert (seen[-1].files_done, seen[-1].bytes_done) == (len(content), result.bytes)
    back = tmp_path / "back"
    result = transfer.download(str(remote_root / "case 1"), back, seen.append)
    assert (result.files, result.skipped) == (len(content), 0)
    assert tree_of(back) == content
    assert json.loads((back / MANIFEST).read_text()) == manifest
    assert not list(tmp_path.rglob("PWNED"))


def test_rerun_of_a_finished_transfer_is_a_no_op(make_transfer, tmp_path, remote_root, mocker):
    src = tmp_path / "src"
    content = make_tree(src)
    transfer = make_transfer()
    transfer.upload(src, str(remote_root / "c"), lambda p: None)
    inodes = {p: p.stat().st_ino for p in (remote_root / "c").rglob("*") if p.is_file()}
    spy = Bytes(mocker)
    result = transfer.upload(src, str(remote_root / "c"), lambda p: None)
    assert result.skipped == len(content)
    assert spy.written == 0
    assert {p: p.stat().st_ino for p in inodes} == inodes
    transfer.download(str(remote_root / "c"), tmp_path / "back", lambda p: None)
    spy.read = 0
    assert transfer.download(str(remote_root / "c"), tmp_path / "back", lambda p: None).skipped == len(content)
    assert spy.read == 0


def test_interrupted_upload_continues_its_part_file(make_transfer, tmp_path, remote_root, mocker):
    src = tmp_path / "src"
    data = os.urandom(4_000_000)
    src.mkdir()
    (src / "dose.raw").write_bytes(data)
    (remote_root / "c").mkdir()
    (remote_root / "c" / "dose.raw.part").write_bytes(data[:2_500_000])  # left by a dropped connection
    spy = Bytes(mocker)
    result = make_transfer().upload(src, str(remote_root / "c"), lambda p: None)
    assert result.skipped == 0
    assert spy.written < 1_600_000  # only the rest was sent
    assert (remote_root / "c" / "dose.raw").read_bytes() == data
    assert not (remote_root / "c" / "dose.raw.part").exists()


def test_a_part_that_does_not_match_is_written_again(make_transfer, tmp_path, remote_root):
    src = tmp_path / "src"
    data = os.urandom(1_000_000)
    src.mkdir()
    (src / "dose.raw").write_bytes(data)
    (src / "same-size.txt").write_bytes(b"right content")
    (remote_root / "c").mkdir()
    (remote_root / "c" / "dose.raw.part").write_bytes(os.urandom(500_000))  # a wrong prefix
    (remote_root / "c" / "same-size.txt").write_bytes(b"wrong content")  # same size, other bytes
    result = make_transfer().upload(src, str(remote_root / "c"), lambda p: None)
    assert result.skipped == 0
    assert (remote_root / "c" / "dose.raw").read_bytes() == data
    assert (remote_root / "c" / "same-size.txt").read_bytes() == b"right content"


def test_interrupted_download_continues_and_corruption_is_refetched(make_transfer, tmp_path, remote_root, mocker):
    remote = remote_root / "c"
    remote.mkdir()
    data = os.urandom(3_000_000)
    (remote / "dose.raw").write_bytes(data)
    (remote / "log.txt").write_bytes(b"simulation log")
    back = tmp_path / "back"
    back.mkdir()
    (back / "dose.raw.part").write_bytes(data[:2_000_000])
    (back / "log.txt").write_bytes(b"corrupted lo")
    spy = Bytes(mocker)
    result = make_transfer().download(str(remote), back, lambda p: None)
    assert result.skipped == 0
    assert spy.read < 1_300_000
    assert (back / "dose.raw").read_bytes() == data and (back / "log.txt").read_bytes() == b"simulation log"
    (back / "dose.raw.part").write_bytes(os.urandom(100))  # a wrong prefix is fetched again from the start
    (back / "dose.raw").unlink()
    make_transfer().download(str(remote), back, lambda p: None)
    assert (back / "dose.raw").read_bytes() == data and not (back / "dose.raw.part").exists()


def test_server_stopped_mid_upload_then_resumed(make_transfer, tmp_path, remote_root, sshd_running, mocker):
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(120_000_000)
    (src / "big.raw").write_bytes(data)
    for i in range(30):
        (src / f"small-{i}.txt").write_bytes(os.urandom(2000))
    transfer = make_transfer()
    stopped = []

    def progress(p):  # runs in the caller's thread, like the worker's progress reports
        if not stopped and p.bytes_done > p.bytes_total * 0.3:
            stopped.append(p.bytes_done)
            sshd_running.stop()

    try:
        with pytest.raises(SshUnreachable, match="resumes"):
            transfer.upload(src, str(remote_root / "c"), progress)
    finally:
        sshd_running.start()
    assert stopped
    part = remote_root / "c" / "big.raw.part"
    assert part.exists() and 0 < part.stat().st_size < len(data)
    already = part.stat().st_size
    spy = Bytes(mocker)
    result = transfer.upload(src, str(remote_root / "c"), lambda p: None)
    assert spy.written <= len(data) - already + 100_000  # continued, not started over
    assert result.files == 31
    assert (remote_root / "c" / "big.raw").read_bytes() == data


def test_paths_that_would_leave_the_root_are_refused(make_transfer, tmp_path, remote_root):
    src = tmp_path / "src"
    make_tree(src)
    transfer = make_transfer()
    for target in ("/etc/mqi", str(remote_root / ".." / "outside"), "../outside"):
        with pytest.raises(PathEscapeError):
            transfer.upload(src, target, lambda p: None)
    outside = tmp_path / "outside"
    outside.mkdir()
    (remote_root / "link").symlink_to(outside)
    with pytest.raises(PathEscapeError, match="symlink"):
        transfer.upload(src, str(remote_root / "link" / "case"), lambda p: None)
    assert not list(outside.iterdir())
    assert not (tmp_path / "outside" / "mqi").exists()


def test_symlinks_are_never_followed(make_transfer, tmp_path, remote_root):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the remote")
    src = tmp_path / "src"
    src.mkdir()
    (src / "real.txt").write_text("real")
    (src / "link.txt").symlink_to(secret)
    transfer = make_transfer()
    transfer.upload(src, str(remote_root / "c"), lambda p: None)
    assert sorted(p.name for p in (remote_root / "c").iterdir()) == [MANIFEST, "real.txt"]
    (remote_root / "c" / "remote-link").symlink_to(secret)
    transfer.download(str(remote_root / "c"), tmp_path / "back", lambda p: None)
    assert sorted(p.name for p in (tmp_path / "back").iterdir()) == [MANIFEST, "real.txt"]


def test_more_parallel_channels_than_the_host_allows(make_transfer, tmp_path, remote_root):
    src = tmp_path / "src"
    for i in range(40):
        (src / f"d{i % 4}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 4}" / f"f{i}.txt").write_bytes(os.urandom(500))
    transfer = make_transfer(host={"max_channels": 2}, parallel_channels=8)
    assert transfer.upload(src, str(remote_root / "c"), lambda p: None).files == 40
    assert transfer.download(str(remote_root / "c"), tmp_path / "back", lambda p: None).files == 40
    assert tree_of(tmp_path / "back") == tree_of(src)


def test_readback_mode_empty_tree_and_missing_source(make_transfer, tmp_path, remote_root):
    src = tmp_path / "src"
    content = make_tree(src)
    transfer = make_transfer(remote_hash="readback", parallel_channels=1)
    transfer.upload(src, str(remote_root / "c"), lambda p: None)
    assert tree_of(remote_root / "c") == content
    assert transfer.upload(src, str(remote_root / "c"), lambda p: None).skipped == len(content)
    (tmp_path / "empty").mkdir()
    seen = []
    assert transfer.upload(tmp_path / "empty", str(remote_root / "e"), seen.append).files == 0
    assert (remote_root / "e" / MANIFEST).exists() and seen
    with pytest.raises(FileNotFoundError, match="does not exist"):
        transfer.download(str(remote_root / "nothing"), tmp_path / "x", lambda p: None)
    (remote_root / "a-file").write_text("not a folder")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        transfer.download(str(remote_root / "a-file"), tmp_path / "x", lambda p: None)
    with pytest.raises(FileNotFoundError):
        transfer.upload(tmp_path / "nothing", str(remote_root / "x"), lambda p: None)


def test_check_shows_the_fingerprint_and_names_problems(make_transfer, remote_root, sshd_running, tmp_path):
    transfer = make_transfer()
    assert transfer.check() == []
    assert any(sshd_running.fingerprint() in line for line in transfer.check_info())
    assert any("does not exist" in p for p in make_transfer(host={"root": str(remote_root / "absent")}).check())
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    problems = make_transfer(host={"known_hosts": str(empty)}).check()
    assert len(problems) == 1 and "unknown" in problems[0] and sshd_running.fingerprint() in problems[0]


def test_settings_name_the_upload_host(sshd_running, tmp_path):
    from mqi_framework import configload
    from mqi_framework.protocols import PluginContext
    from mqi_sftp.transfer import SftpTransfer, SftpTransferSettings

    from mqi_framework.configload import ConfigError

    two = {"a": sshd_running.host_settings(), "b": sshd_running.host_settings()}
    with pytest.raises(ConfigError, match=r"workers\.transfer\.settings.*say which"):
        configload.structure(SftpTransferSettings, {"hosts": two}, path="workers.transfer.settings")
    with pytest.raises(ConfigError, match="not one of"):
        configload.structure(SftpTransferSettings, {"hosts": two, "host": "c"}, path="workers.transfer.settings")
    one = configload.structure(SftpTransferSettings, {"hosts": two, "host": "b"})
    assert SftpTransfer(one, PluginContext(workspace=tmp_path)).host_name == "b"


def test_a_full_local_disk_is_named_and_the_part_kept_for_later(make_transfer, tmp_path, remote_root, mocker):
    import errno

    remote = remote_root / "c"
    remote.mkdir()
    data = os.urandom(2_000_000)
    (remote / "dose.raw").write_bytes(data)
    transfer = make_transfer()
    mocker.patch("mqi_sftp.streams.os.fsync", side_effect=OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(OSError, match="No space left") as info:
        transfer.download(str(remote), tmp_path / "back", lambda p: None)
    assert not isinstance(info.value, SshUnreachable)
    assert not (tmp_path / "back" / "dose.raw").exists()
    mocker.stopall()
    transfer.download(str(remote), tmp_path / "back", lambda p: None)  # space again: it completes
    assert (tmp_path / "back" / "dose.raw").read_bytes() == data


def test_big_files_are_verified_segment_by_segment_while_they_stream(make_transfer, tmp_path, remote_root, mocker):
    import mqi_sftp.streams
    import mqi_sftp.verify

    mocker.patch.object(mqi_sftp.verify, "SEGMENT", 1024 * 1024)
    mocker.patch.object(mqi_sftp.streams, "STREAM_VERIFY_FROM", 2 * 1024 * 1024)
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(5 * 1024 * 1024 + 123)
    (src / "dose.raw").write_bytes(data)
    (src / "small.txt").write_bytes(b"small")
    transfer = make_transfer()
    hashed = mocker.spy(transfer.hasher, "hashes")
    transfer.upload(src, str(remote_root / "c"), lambda p: None)
    assert (remote_root / "c" / "dose.raw").read_bytes() == data
    assert [c.args[1] for c in hashed.call_args_list if c.args[1]] == [["small.txt.part"]]  # the big one was done
    # a leftover part with a wrong beginning: its first segment does not match, so the whole
    # file is checked the usual way, found wrong, and written again from the start
    (remote_root / "c" / "dose.raw").unlink()
    (remote_root / "c" / "dose.raw.part").write_bytes(os.urandom(1_500_000))
    transfer.upload(src, str(remote_root / "c"), lambda p: None)
    assert (remote_root / "c" / "dose.raw").read_bytes() == data


def test_a_planted_part_symlink_is_replaced_never_written_through(make_transfer, tmp_path, remote_root):
    # On a shared cluster another account can put `<file>.part -> elsewhere` in a case folder.
    src = tmp_path / "src"
    src.mkdir()
    (src / "plan.dcm").write_bytes(os.urandom(5000))
    (src / "small.txt").write_bytes(b"x" * 10)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    case = remote_root / "c"
    case.mkdir()
    (case / "plan.dcm.part").symlink_to(victim)
    (case / "small.txt.part").symlink_to(tmp_path / "created-elsewhere")  # a dangling one
    (case / (MANIFEST + ".part")).symlink_to(victim)
    make_transfer().upload(src, str(case), lambda p: None)
    assert victim.read_bytes() == b"precious" and not (tmp_path / "created-elsewhere").exists()
    assert (case / "plan.dcm").read_bytes() == (src / "plan.dcm").read_bytes()
    assert not list(case.glob("*.part"))
    assert (case / "plan.dcm").stat().st_mode & 0o077 == 0


def test_remote_case_folders_and_files_are_private(make_transfer, tmp_path, remote_root):
    src = tmp_path / "src"
    make_tree(src)
    make_transfer().upload(src, str(remote_root / "new case"), lambda p: None)
    for path in [remote_root / "new case", *(remote_root / "new case").rglob("*")]:
        assert path.stat().st_mode & 0o077 == 0, path


def test_remove_deletes_the_tree_and_never_follows_a_link(make_transfer, tmp_path, remote_root):
    src = tmp_path / "src"
    make_tree(src)
    transfer = make_transfer()
    case = remote_root / "case-000007"
    transfer.upload(src, str(case), lambda p: None)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not the host's to delete")
    (case / "a" / "link-to-outside").symlink_to(outside)
    (case / "file-link").symlink_to(outside / "keep.txt")
    (remote_root / "case-000008").mkdir()
    names = sorted(f.name for f in transfer.list_remote(str(remote_root)))
    assert names == ["case-000007", "case-000008"]
    assert transfer.remove(str(case)) is True
    assert not case.exists() and (outside / "keep.txt").read_text() == "not the host's to delete"
    assert transfer.remove(str(case)) is False  # already gone
    with pytest.raises(PathEscapeError):
        transfer.remove(str(remote_root / ".." / "outside"))
    assert outside.is_dir()


def test_a_remote_root_that_is_not_writable_is_a_permanent_error(make_transfer, tmp_path, remote_root, mocker):
    """Issue 19: a remote root the login user cannot write retried as if the next attempt could
    fare better. The tests log in as root, whom permissions do not stop, so the server's
    refusal is the edge mocked here."""
    from mqi_framework.protocols import PermanentError

    src = tmp_path / "src"
    make_tree(src)
    transfer = make_transfer()
    mocker.patch.object(paramiko.SFTPClient, "mkdir", side_effect=PermissionError(13, "Permission denied",
                                                                                  str(remote_root / "c")))
    with pytest.raises(PermanentError, match="permission denied .*must be writable by the user the host logs in as"):
        transfer.upload(src, str(remote_root / "c"), lambda p: None)
