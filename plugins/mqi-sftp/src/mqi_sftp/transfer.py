"""``sftp`` transfer: uploads a prepared case tree to an SSH host and downloads results.

Correctness, as for the ``core.local`` transfer: every file is written as ``<name>.part``
and renamed over its final name only when its SHA-256 matches the source's; a manifest
``.mqi-manifest.json`` is written last. A re-run skips files whose destination already
has the source's size and SHA-256 (a finished transfer is a no-op) and continues
``.part`` files left by an interrupted run from where they end (the whole file is still
verified; a part that does not match is written again from the start).

The remote side's SHA-256 is computed on the host for a whole batch of files in one
command (``openssl dgst``, or coreutils' ``sha256sum`` where openssl is missing); with
``remote_hash: readback`` files are read back over SFTP instead. Local files are hashed
while they stream; a download is hashed on both sides at once.

Speed (see DESIGN §7): one shared connection per host (``TCP_NODELAY``, AES-GCM), SFTP
requests as large as the server allows (``limits@openssh.com``), pipelined writes and
prefetched reads for big files, and ``parallel_channels`` SFTP sessions working through
the file list at once, so many small files are not bound by one round trip each.

The parts: :mod:`mqi_sftp.settings` (what a site configures), :mod:`mqi_sftp.verify`
(hashes on the host and while streaming), :mod:`mqi_sftp.channels` (parallel SFTP
sessions, progress counts); this module walks the trees and moves the files.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import posixpath
import stat
from pathlib import Path
from typing import Callable, Optional

import paramiko

from mqi_framework.protocols import (PermanentError, PluginContext, ProgressCallback, RemoteFolder, Transfer,
                                     TransferResult)
from mqi_framework.toolkit import (MANIFEST, PART_SUFFIX, PathEscapeError, TreeFile, VerificationError, fsync_dir,
                                   is_within, manifest_text, part_path, sha256_file, walk_tree, write_manifest)
from mqi_ssh import remotepath
from mqi_ssh.connection import SshConnection, SshError, SshUnreachable, connect, sftp_limits
from mqi_ssh.settings import SshHostSettings
from mqi_sftp.channels import Counter, run_parallel
from mqi_sftp.settings import SftpTransferSettings
from mqi_sftp.streams import RemoteEntry, fetch_file, open_part, send_file, walk_remote
from mqi_sftp.verify import RemoteHasher

log = logging.getLogger(__name__)

#: paramiko's SFTP request size, used where the server states no limits
DEFAULT_REQUEST = 32768
#: the largest request we send even when the server allows more
MAX_REQUEST = 256 * 1024
#: downloads of up to this many files fsync each; more are made durable with one sync()
SYNC_EACH_UP_TO = 16

__all__ = ["SftpTransfer", "SftpTransferSettings"]


class SftpTransfer(Transfer):
    """Moves trees between the host and an SSH host over SFTP."""

    name = "sftp"
    settings_class = SftpTransferSettings

    def __init__(self, settings: SftpTransferSettings, context: PluginContext) -> None:
        super().__init__(settings, context)
        self.host_name = settings.host or next(iter(settings.hosts))
        self.host: SshHostSettings = settings.hosts[self.host_name]
        self._conn: Optional[SshConnection] = None
        self._request_sizes: Optional[tuple[int, int]] = None
        self._info: list[str] = []
        self.hasher = RemoteHasher(lambda: self.conn, self.host_name, settings.remote_hash)

    # ------------------------------------------------------------------ connection

    @property
    def conn(self) -> SshConnection:
        if self._conn is None:
            self._conn = connect(self.host)
        return self._conn

    def check(self) -> list[str]:
        self._info = []
        bad_root = self.host.check_root() or remotepath.remote_root_problem(self.context.remote_root, self.host.root,
                                                                             self.host_name)
        if bad_root:
            return [f"hosts.{self.host_name}: {bad_root}"]
        try:
            self._info.append(self.conn.known_key_line(self.host_name))
            with self.conn.sftp() as sftp:
                if self.host.root is not None:
                    try:
                        if not stat.S_ISDIR(sftp.stat(self.host.root).st_mode or 0):
                            return [f"hosts.{self.host_name}: root {self.host.root} is not a folder"]
                    except OSError:
                        return [f"hosts.{self.host_name}: root {self.host.root} does not exist on the host"]
                _, write_size = self._sizes(sftp)
            self._info.append(f"host {self.host_name}: SFTP requests up to {write_size} bytes")
            if self.settings.remote_hash == "host":
                probe = self.conn.run("command -v openssl || command -v sha256sum")
                if probe.returncode != 0:
                    return [f"hosts.{self.host_name}: neither openssl nor sha256sum is on the host's PATH; "
                            f"install coreutils or set remote_hash: readback"]
        except (SshError, TimeoutError) as exc:
            return [f"hosts.{self.host_name}: {exc}"]
        return []

    def check_info(self) -> list[str]:
        return list(self._info)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _remote(self, remote_dir: str) -> str:
        return remotepath.inside_root(remote_dir, self.host.root)

    def _sizes(self, sftp: paramiko.SFTPClient) -> tuple[int, int]:
        if self._request_sizes is None:
            limits = sftp_limits(sftp)
            self._request_sizes = (min(limits[0], MAX_REQUEST), min(limits[1], MAX_REQUEST)) if limits else (
                DEFAULT_REQUEST, DEFAULT_REQUEST)
        return self._request_sizes

    def _guard(self, work: Callable[[], TransferResult]) -> TransferResult:
        """Connection failures become :class:`SshUnreachable` (the broker retries the
        step, which resumes) and the broken connection is dropped."""
        try:
            return work()
        except (SshError, PathEscapeError, VerificationError, FileNotFoundError, ValueError):
            raise
        except (paramiko.SSHException, EOFError, OSError) as exc:
            if isinstance(exc, PermissionError):  # the same attempt fails the same way: say so at once
                raise PermanentError(f"SFTP with {self.host.label()}: permission denied ({exc.filename or exc}): the "
                                     "workflow's remote root must be writable by the user the host logs in as; fix "
                                     "its permissions, then retry the case") from None
            # an OSError with an errno is about a file (a full disk): it keeps its own message;
            # the rest (a closed socket, a dropped session) is the connection
            if isinstance(exc, OSError) and exc.errno is not None and not isinstance(exc, (ConnectionError,
                                                                                           TimeoutError)):
                raise
            if self._conn is not None:
                self._conn.drop()
            raise SshUnreachable(f"SFTP with {self.host.label()} failed: {type(exc).__name__}: {exc}; "
                                 f"the transfer resumes on the next attempt") from exc

    # ------------------------------------------------------------------ retention

    def remove(self, remote_dir: str) -> bool:
        path = self._remote(remote_dir)
        return self._guard(lambda: self._remove(path))  # type: ignore[arg-type,return-value]

    def _remove(self, path: str) -> bool:
        """Delete the tree over SFTP (no shell needed): files and links are unlinked (a link
        is never followed: ``listdir_attr`` reports it as a link), then folders bottom-up."""
        with self.conn.sftp() as sftp:
            try:
                mode = sftp.lstat(path).st_mode or 0
            except FileNotFoundError:
                return False
            if not stat.S_ISDIR(mode):
                sftp.remove(path)
                return True
            folders, stack = [], [path]
            while stack:
                folder = stack.pop()
                folders.append(folder)
                for entry in sftp.listdir_attr(folder):
                    child = posixpath.join(folder, entry.filename)
                    if stat.S_ISDIR(entry.st_mode or 0):
                        stack.append(child)
                    else:
                        sftp.remove(child)
            for folder in reversed(folders):
                sftp.rmdir(folder)
        return True

    def list_remote(self, remote_root: str) -> list[RemoteFolder]:
        path = self._remote(remote_root)
        return self._guard(lambda: self._list_remote(path))  # type: ignore[arg-type,return-value]

    def _list_remote(self, path: str) -> list[RemoteFolder]:
        with self.conn.sftp() as sftp:
            try:
                entries = sftp.listdir_attr(path)
            except FileNotFoundError:
                return []
        return [RemoteFolder(e.filename, float(e.st_mtime or 0)) for e in entries if stat.S_ISDIR(e.st_mode or 0)]

    # ------------------------------------------------------------------ remote helpers

    def _remote_walk(self, sftp: paramiko.SFTPClient, top: str) -> tuple[dict[str, RemoteEntry], dict[str, int],
                                                                         set[str]]:
        """(files, part sizes, folders) under ``top``; symlinks are skipped, and said so."""
        files, parts, folders, links = walk_remote(sftp, top)
        if links:
            log.warning("transfer from %s:%s: skipped %d symlink(s)", self.host_name, top, links)
        return files, parts, folders

    def _parallel(self, items: list, work: Callable[[paramiko.SFTPClient, object], None],
                  report: Callable[[], None], reserve: int = 0) -> None:
        """``work(sftp, item)`` for every item on up to ``parallel_channels`` SFTP sessions;
        ``reserve`` of the host's channel slots are left free for a command running at the
        same time (each session holds one slot for the whole transfer)."""
        channels = min(self.settings.parallel_channels, max(1, self.host.max_channels - reserve))
        run_parallel(self.conn, channels, items, work, report)

    # ------------------------------------------------------------------ upload

    def upload(self, local_dir: Path, remote_dir: str, progress: ProgressCallback) -> TransferResult:
        return self._guard(lambda: self._upload(Path(local_dir), self._remote(remote_dir), progress))

    def _upload(self, src: Path, dst: str, progress: ProgressCallback) -> TransferResult:
        if not src.is_dir():
            raise FileNotFoundError(f"transfer source folder {src} does not exist (or is not a folder)")
        files = walk_tree(src)
        total = sum(f.size for f in files)
        counter = Counter()
        report = counter.reporter(progress, len(files), total)

        with self.conn.sftp() as sftp:
            self._sizes(sftp)
            self._make_folder(sftp, dst)
            remote_files, parts, folders = self._remote_walk(sftp, dst)
            for folder in sorted({posixpath.dirname(f.rel) for f in files} - folders):
                self._make_folder(sftp, posixpath.join(dst, folder))
        # files the remote already has with the same size: equal SHA-256 means skip
        same_size = [f for f in files if f.rel in remote_files and remote_files[f.rel].size == f.size]
        remote_hashes = self.hasher.hashes(dst, [f.rel for f in same_size], sum(f.size for f in same_size))
        digests: dict[str, str] = {}
        todo: list[TreeFile] = []
        for item in files:
            if item.rel in remote_hashes:
                local_hash = sha256_file(item.path)
                if remote_hashes[item.rel] == local_hash:
                    digests[item.rel] = local_hash
                    counter.add(item.size, 1)
                    continue
            todo.append(item)
        skipped = len(files) - len(todo)
        report()
        verified = self._send_all(todo, dst, parts, digests, counter, report)
        self._verify_and_rename_uploads(todo, dst, digests, verified, counter, report)
        self._write_remote_manifest(dst, {f.rel: {"sha256": digests[f.rel], "size": f.size} for f in files})
        report()
        return TransferResult(files=len(files), bytes=total, skipped=skipped)

    def _make_folder(self, sftp: paramiko.SFTPClient, path: str) -> None:
        """mkdir -p over SFTP; a symlink on the way is refused (it could lead anywhere)."""
        current = "/" if path.startswith("/") else ""
        for part in [p for p in path.split("/") if p]:
            current = posixpath.join(current, part) if current else part
            try:
                mode = sftp.lstat(current).st_mode or 0
            except FileNotFoundError:
                sftp.mkdir(current, 0o700)  # case trees are patient data, even de-identified
                continue
            if stat.S_ISLNK(mode) and self.host.root is not None and \
                    len(current) > len(posixpath.normpath(self.host.root)):
                raise PathEscapeError(f"remote folder {current} is a symlink; refusing to write through it")
            if not stat.S_ISDIR(sftp.stat(current).st_mode or 0):
                raise NotADirectoryError(f"remote path {current} on {self.host_name} is not a folder")

    def _send_all(self, todo: list[TreeFile], dst: str, parts: dict[str, int], digests: dict[str, str],
                  counter: Counter, report: Callable[[], None]) -> set[str]:
        """Send every file to its ``.part``; return the files already verified while they
        streamed (see :meth:`_send`)."""
        verified: set[str] = set()

        def send(sftp: paramiko.SFTPClient, item: object) -> None:
            assert isinstance(item, TreeFile)
            digests[item.rel], ok = self._send(sftp, item, posixpath.join(dst, item.rel), parts.get(item.rel),
                                               counter)
            if ok:
                verified.add(item.rel)

        # one channel stays free for the segment hashers of big files
        self._parallel(todo, send, report, reserve=1)  # type: ignore[arg-type]
        return verified

    def _send(self, sftp: paramiko.SFTPClient, item: TreeFile, final: str, part_size: Optional[int],
              counter: Counter, stream_verify: bool = True) -> tuple[str, bool]:
        """:func:`~mqi_sftp.streams.send_file` with this transfer's settings; big files are
        verified segment by segment on the host unless ``stream_verify`` is False."""
        _, write_size = self._sizes(sftp)
        segments = self.hasher if stream_verify and self.settings.remote_hash == "host" else None
        return send_file(sftp, item, final, part_size, counter, write_size=write_size, segment_hasher=segments,
                         preserve_mtime=self.settings.preserve_mtime)

    def _verify_and_rename_uploads(self, todo: list[TreeFile], dst: str, digests: dict[str, str],
                                   verified: set[str], counter: Counter, report: Callable[[], None]) -> None:
        if not todo:
            return
        unverified = [f for f in todo if f.rel not in verified]
        part_rels = [f.rel + PART_SUFFIX for f in unverified]
        remote_hashes = self.hasher.hashes(dst, part_rels, sum(f.size for f in unverified))
        bad = [f for f in unverified if remote_hashes.get(f.rel + PART_SUFFIX) != digests[f.rel]]
        if bad:
            log.warning("upload to %s: %d file(s) did not verify; writing them again from the start",
                        self.host_name, len(bad))
            with self.conn.sftp() as sftp:
                for item in bad:
                    counter.add(-item.size)
                    digests[item.rel], _ = self._send(sftp, item, posixpath.join(dst, item.rel), None, counter,
                                                      stream_verify=False)
            again = self.hasher.hashes(dst, [f.rel + PART_SUFFIX for f in bad], sum(f.size for f in bad))
            still = [f.rel for f in bad if again.get(f.rel + PART_SUFFIX) != digests[f.rel]]
            if still:
                raise VerificationError(f"upload to {self.host_name}: SHA-256 of {len(still)} file(s) does not "
                                        f"match the source after a second try (e.g. {still[0]})")

        def rename(sftp: paramiko.SFTPClient, item: object) -> None:
            assert isinstance(item, TreeFile)
            final = posixpath.join(dst, item.rel)
            sftp.posix_rename(final + PART_SUFFIX, final)
            counter.add(files=1)

        self._parallel(todo, rename, report)  # type: ignore[arg-type]

    def _write_remote_manifest(self, dst: str, manifest: dict[str, dict]) -> None:
        data = manifest_text(manifest).encode("ascii")
        final = posixpath.join(dst, MANIFEST)
        with self.conn.sftp() as sftp:
            try:
                with sftp.open(final, "rb") as fh:
                    if fh.read() == data:
                        return  # a re-run of a finished transfer writes nothing
            except OSError:
                pass
            with open_part(sftp, final + PART_SUFFIX) as fh:
                fh.write(data)
            sftp.posix_rename(final + PART_SUFFIX, final)

    # ------------------------------------------------------------------ download

    def download(self, remote_dir: str, local_dir: Path, progress: ProgressCallback) -> TransferResult:
        return self._guard(lambda: self._download(self._remote(remote_dir), Path(local_dir), progress))

    def _download(self, src: str, dst: Path, progress: ProgressCallback) -> TransferResult:
        with self.conn.sftp() as sftp:
            self._sizes(sftp)
            try:
                mode = sftp.stat(src).st_mode or 0
            except FileNotFoundError:
                raise FileNotFoundError(f"transfer source folder {self.host_name}:{src} does not exist") from None
            if not stat.S_ISDIR(mode):
                raise FileNotFoundError(f"transfer source {self.host_name}:{src} is not a folder")
            remote_files, _, _ = self._remote_walk(sftp, src)
        files = [remote_files[k] for k in sorted(remote_files)]
        total = sum(f.size for f in files)
        dst.mkdir(parents=True, exist_ok=True)
        # the host hashes its files while they stream here (both sides at once)
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sftp-hash") as hasher:
            pending_hashes = hasher.submit(self.hasher.hashes, src, [f.rel for f in files], total)
            try:
                return self._download_files(src, dst, files, total, pending_hashes, progress)
            finally:
                pending_hashes.cancel()

    def _download_files(self, src: str, dst: Path, files: list[RemoteEntry], total: int,
                        pending_hashes: "concurrent.futures.Future[dict[str, str]]",
                        progress: ProgressCallback) -> TransferResult:
        counter = Counter()
        report = counter.reporter(progress, len(files), total)
        targets = {entry.rel: self._local_target(dst, entry.rel) for entry in files}
        present = set()
        for entry in files:
            target = targets[entry.rel]
            try:
                if target.is_file() and not target.is_symlink() and target.stat().st_size == entry.size:
                    present.add(entry.rel)
            except OSError:
                pass
        todo: list[RemoteEntry] = []
        if present:  # files already here: equal SHA-256 means skip (a re-run, a resume)
            hashes = pending_hashes.result()
            for entry in files:
                target = targets[entry.rel]
                if entry.rel in present and sha256_file(target) == hashes[entry.rel]:
                    part_path(target).unlink(missing_ok=True)
                    counter.add(entry.size, 1)
                else:
                    todo.append(entry)
        else:
            todo = list(files)
        skipped = len(files) - len(todo)
        report()
        digests: dict[str, str] = {}

        # parts must be on disk before they get their final names: one fsync per file for a
        # few files, one sync() for many (2,000 fsyncs cost more than the whole transfer)
        sync_each = len(todo) <= SYNC_EACH_UP_TO

        def fetch(sftp: paramiko.SFTPClient, item: object) -> None:
            assert isinstance(item, RemoteEntry)
            target = targets[item.rel]
            target.parent.mkdir(parents=True, exist_ok=True)
            digests[item.rel] = self._fetch(sftp, posixpath.join(src, item.rel), item, target, counter, sync_each)

        self._parallel(todo, fetch, report, reserve=1)  # type: ignore[arg-type]
        if todo and not sync_each:
            os.sync()
        hashes = pending_hashes.result()
        bad = [e for e in todo if digests[e.rel] != hashes[e.rel]]
        if bad:
            log.warning("download from %s: %d file(s) did not verify; fetching them again from the start",
                        self.host_name, len(bad))
            with self.conn.sftp() as sftp:
                for entry in bad:
                    target = targets[entry.rel]
                    part_path(target).unlink(missing_ok=True)
                    counter.add(-entry.size)
                    if self._fetch(sftp, posixpath.join(src, entry.rel), entry, target, counter) != hashes[entry.rel]:
                        part_path(target).unlink(missing_ok=True)
                        raise VerificationError(f"{entry.rel}: SHA-256 of the download does not match the source "
                                                f"after a second try")
        for entry in todo:
            os.replace(part_path(targets[entry.rel]), targets[entry.rel])
            counter.add(files=1)
        for folder in {targets[e.rel].parent for e in todo} | {dst}:
            fsync_dir(folder)
        write_manifest(dst, {f.rel: {"sha256": hashes[f.rel], "size": f.size} for f in files})
        report()
        return TransferResult(files=len(files), bytes=total, skipped=skipped)

    @staticmethod
    def _local_target(dst: Path, rel: str) -> Path:
        target = dst.joinpath(*rel.split("/"))
        if not is_within(dst, target.parent):
            raise PathEscapeError(f"destination folder {target.parent} leads outside {dst} (a symlink?)")
        return target

    def _fetch(self, sftp: paramiko.SFTPClient, path: str, entry: RemoteEntry, target: Path,
               counter: Counter, sync: bool = True) -> str:
        """:func:`~mqi_sftp.streams.fetch_file` with this transfer's settings."""
        read_size, _ = self._sizes(sftp)
        return fetch_file(sftp, path, entry, target, counter, read_size=read_size, sync=sync,
                          preserve_mtime=self.settings.preserve_mtime, where=self.host_name)
