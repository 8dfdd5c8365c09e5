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
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import logging
import os
import posixpath
import queue
import stat
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Optional

import attrs
import paramiko

from mqi_framework.protocols import PluginContext, ProgressCallback, Transfer, TransferProgress, TransferResult
from mqi_framework.toolkit import (MANIFEST, PART_SUFFIX, PathEscapeError, TreeFile, VerificationError, fsync_dir,
                                   is_within, manifest_text, part_path, sha256_file, walk_tree, write_manifest)
from mqi_ssh import remote, remotepath
from mqi_ssh.connection import SshConnection, SshError, SshUnreachable, connect, sftp_limits
from mqi_ssh.settings import SshHostSettings

log = logging.getLogger(__name__)

#: paramiko's SFTP request size, used where the server states no limits
DEFAULT_REQUEST = 32768
#: the largest request we send even when the server allows more
MAX_REQUEST = 256 * 1024
#: local read buffer per file
BUFFER = 1024 * 1024
#: downloads of up to this many files fsync each; more are made durable with one sync()
SYNC_EACH_UP_TO = 16
#: uploads of files this big are verified segment by segment while they stream
STREAM_VERIFY_FROM = 64 * 1024 * 1024
#: segment size of that verification (the last segment is hashed after the data arrived)
SEGMENT = 32 * 1024 * 1024
#: the host's segment hasher gives up when the file did not grow for this long
SEGMENT_STALL_SECONDS = 15


def _check_hosts(instance: object, attribute: attrs.Attribute, value: dict) -> None:
    if not value:
        raise ValueError("hosts: name at least one SSH host")


def _positive(instance: object, attribute: attrs.Attribute, value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be >= 1, got {value}")


@attrs.frozen
class SftpTransferSettings:
    """Settings of the ``sftp`` transfer."""

    #: SSH hosts by name (the same mapping as the ssh executor's: share it with a YAML anchor)
    hosts: dict[str, SshHostSettings] = attrs.field(validator=_check_hosts)
    #: the host cases are uploaded to; default: the only host
    host: Optional[str] = None
    #: SFTP sessions used at once for trees of many files
    parallel_channels: int = attrs.field(default=4, validator=_positive)
    #: where the remote SHA-256 is computed: ``host`` (openssl dgst, else sha256sum, run on
    #: the host) or ``readback`` (files read back over SFTP: slower, needs nothing there)
    remote_hash: Literal["host", "readback"] = "host"
    #: give copied files the source's modification time
    preserve_mtime: bool = True

    def __attrs_post_init__(self) -> None:
        if self.host is not None and self.host not in self.hosts:
            raise ValueError(f"host: {self.host!r} is not one of hosts ({', '.join(self.hosts)})")
        if self.host is None and len(self.hosts) > 1:
            raise ValueError(f"host: say which of the hosts ({', '.join(self.hosts)}) cases are uploaded to")


@attrs.frozen
class _RemoteEntry:
    rel: str
    size: int
    mtime: int


class _Counter:
    """Bytes and files done, updated by worker threads and read by the caller's thread
    (progress callbacks run only there: the broker connection behind them is not
    thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bytes = 0
        self.files = 0

    def add(self, nbytes: int = 0, files: int = 0) -> None:
        with self.lock:
            self.bytes += nbytes
            self.files += files

    def reporter(self, progress: ProgressCallback, files_total: int, bytes_total: int) -> Callable[[], None]:
        """A function that reports the current counts through ``progress``."""

        def report() -> None:
            with self.lock:
                files, nbytes = self.files, self.bytes
            progress(TransferProgress(files, files_total, min(nbytes, bytes_total), bytes_total))

        return report


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
            # an OSError with an errno is about a file (a full disk, a permission): it keeps its
            # own message; the rest (a closed socket, a dropped session) is the connection
            if isinstance(exc, OSError) and exc.errno is not None and not isinstance(exc, (ConnectionError,
                                                                                           TimeoutError)):
                raise
            if self._conn is not None:
                self._conn.drop()
            raise SshUnreachable(f"SFTP with {self.host.label()} failed: {type(exc).__name__}: {exc}; "
                                 f"the transfer resumes on the next attempt") from exc

    # ------------------------------------------------------------------ remote helpers

    def _remote_walk(self, sftp: paramiko.SFTPClient, top: str) -> tuple[dict[str, _RemoteEntry], dict[str, int],
                                                                         set[str]]:
        """(files, part sizes, folders) under ``top``, relative; symlinks are skipped."""
        files: dict[str, _RemoteEntry] = {}
        parts: dict[str, int] = {}
        folders: set[str] = {""}
        stack = [""]
        links = 0
        while stack:
            rel = stack.pop()
            for entry in sftp.listdir_attr(posixpath.join(top, rel) if rel else top):
                mode = entry.st_mode or 0
                child = posixpath.join(rel, entry.filename) if rel else entry.filename
                if stat.S_ISLNK(mode):
                    links += 1
                elif stat.S_ISDIR(mode):
                    folders.add(child)
                    stack.append(child)
                elif stat.S_ISREG(mode):
                    if entry.filename.endswith(PART_SUFFIX):
                        parts[child[: -len(PART_SUFFIX)]] = entry.st_size or 0
                    elif not (child == MANIFEST):
                        files[child] = _RemoteEntry(child, entry.st_size or 0, int(entry.st_mtime or 0))
        if links:
            log.warning("transfer from %s:%s: skipped %d symlink(s)", self.host_name, top, links)
        return files, parts, folders

    def _remote_hashes(self, base: str, rels: list[str], total_bytes: int) -> dict[str, str]:
        """SHA-256 of remote files (relative to ``base``), computed on the host in one
        command per batch: ``openssl dgst`` where the host has it (several times faster
        than coreutils' ``sha256sum``), else ``sha256sum``. Names with a newline or a
        backslash always go to ``sha256sum``, whose output escapes them."""
        if not rels:
            return {}
        if self.settings.remote_hash == "readback":
            return self._readback_hashes(base, rels)
        plain = [r for r in rels if "\n" not in r and "\\" not in r]
        odd = [r for r in rels if "\n" in r or "\\" in r]
        out: dict[str, str] = {}
        for group, tool in ((plain, "fast"), (odd, "sha256sum")):
            for start in range(0, len(group), 5000):
                batch = group[start:start + 5000]
                hashes = self._hash_batch(base, batch, tool, total_bytes)
                if hashes is None:  # neither tool on the host
                    log.warning("no sha256sum or openssl on %s: reading files back to verify them (set "
                                "remote_hash: readback to skip this probe)", self.host_name)
                    return self._readback_hashes(base, rels)
                out.update(hashes)
        return out

    def _hash_batch(self, base: str, batch: list[str], tool: str, total_bytes: int) -> Optional[dict[str, str]]:
        line = remote.script_call(remote.HASH, "mqi-hash", base, tool)
        # "./" in front: a name that starts with "-" is never read as an option
        names = b"\0".join(("./" + r).encode("utf-8", "surrogateescape") for r in batch)
        result = self.conn.run(line, timeout=120 + total_bytes / 50e6, stdin=names)
        if result.returncode == 127:
            return None
        lines = result.stdout.splitlines()
        if result.returncode != 0 or len(lines) != len(batch):
            raise VerificationError(f"hashing on {self.host_name} failed (exit {result.returncode}, "
                                    f"{len(lines)} of {len(batch)} lines): {result.stderr.strip()[:300]}")
        out = {}
        for rel, text in zip(batch, lines):
            text = text[1:] if text.startswith("\\") else text  # sha256sum escapes odd names this way
            out[rel] = text[:64].lower()
        return out

    def _readback_hashes(self, base: str, rels: list[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        with self.conn.sftp() as sftp:
            for rel in rels:
                with sftp.open(posixpath.join(base, rel), "rb") as fh:
                    fh.prefetch()
                    out[rel] = hashlib.file_digest(fh, "sha256").hexdigest()
        return out

    def _parallel(self, items: list, work: Callable[[paramiko.SFTPClient, object], None], counter: _Counter,
                  report: Callable[[], None], reserve: int = 0) -> None:
        """Run ``work(sftp, item)`` for every item on up to ``parallel_channels`` SFTP
        sessions, reporting progress from this thread meanwhile; ``reserve`` channel slots
        are left free for a command running at the same time."""
        if not items:
            return
        pending = list(reversed(items))
        lock = threading.Lock()
        stop = threading.Event()

        def worker() -> None:
            with self.conn.sftp() as sftp:
                while not stop.is_set():
                    with lock:
                        if not pending:
                            return
                        item = pending.pop()
                    work(sftp, item)

        # each session holds one of the host's max_channels slots for the whole transfer
        channels = min(self.settings.parallel_channels, max(1, self.host.max_channels - reserve), len(items))
        with concurrent.futures.ThreadPoolExecutor(channels, thread_name_prefix="sftp") as pool:
            futures = [pool.submit(worker) for _ in range(channels)]
            try:
                while True:
                    done, _ = concurrent.futures.wait(futures, timeout=0.25,
                                                      return_when=concurrent.futures.FIRST_EXCEPTION)
                    report()
                    for future in done:
                        if future.exception() is not None:
                            raise future.exception()  # type: ignore[misc]
                    if len(done) == len(futures):
                        return
            finally:
                stop.set()

    # ------------------------------------------------------------------ upload

    def upload(self, local_dir: Path, remote_dir: str, progress: ProgressCallback) -> TransferResult:
        return self._guard(lambda: self._upload(Path(local_dir), self._remote(remote_dir), progress))

    def _upload(self, src: Path, dst: str, progress: ProgressCallback) -> TransferResult:
        if not src.is_dir():
            raise FileNotFoundError(f"transfer source folder {src} does not exist (or is not a folder)")
        files = walk_tree(src)
        total = sum(f.size for f in files)
        counter = _Counter()
        report = counter.reporter(progress, len(files), total)

        with self.conn.sftp() as sftp:
            self._sizes(sftp)
            self._make_folder(sftp, dst)
            remote_files, parts, folders = self._remote_walk(sftp, dst)
            for folder in sorted({posixpath.dirname(f.rel) for f in files} - folders):
                self._make_folder(sftp, posixpath.join(dst, folder))
        # files the remote already has with the same size: equal SHA-256 means skip
        same_size = [f for f in files if f.rel in remote_files and remote_files[f.rel].size == f.size]
        remote_hashes = self._remote_hashes(dst, [f.rel for f in same_size], sum(f.size for f in same_size))
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
                sftp.mkdir(current)
                continue
            if stat.S_ISLNK(mode) and self.host.root is not None and \
                    len(current) > len(posixpath.normpath(self.host.root)):
                raise PathEscapeError(f"remote folder {current} is a symlink; refusing to write through it")
            if not stat.S_ISDIR(sftp.stat(current).st_mode or 0):
                raise NotADirectoryError(f"remote path {current} on {self.host_name} is not a folder")

    def _send_all(self, todo: list[TreeFile], dst: str, parts: dict[str, int], digests: dict[str, str],
                  counter: _Counter, report: Callable[[], None]) -> set[str]:
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
        self._parallel(todo, send, counter, report, reserve=1)  # type: ignore[arg-type]
        return verified

    def _send(self, sftp: paramiko.SFTPClient, item: TreeFile, final: str, part_size: Optional[int],
              counter: _Counter, stream_verify: bool = True) -> tuple[str, bool]:
        """Write ``item`` to ``final.part`` (continuing a shorter leftover part). Returns
        the SHA-256 of the whole local file, hashed as it streamed, and whether the part was
        verified on the way: a big file is hashed on the host segment by segment while
        later segments still stream, and every segment's SHA-256 matched the source's."""
        part = final + PART_SUFFIX
        offset = part_size if part_size is not None and 0 < part_size <= item.size else 0
        _, write_size = self._sizes(sftp)
        segmented = stream_verify and item.size >= STREAM_VERIFY_FROM and self.settings.remote_hash == "host"
        hashes = _StreamHashes(item.size if segmented else 0)
        # not a `with`: after a failure the host's hasher is not waited for (it gives up by itself)
        verifier = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sftp-verify")
        remote_segments: Optional[concurrent.futures.Future] = None
        try:
            with open(item.path, "rb") as fin:
                if offset:
                    _hash_prefix(fin, offset, hashes.update)
                    counter.add(offset)
                # unbuffered, one SFTP request per read: paramiko's own write buffer only copies
                with _closing(sftp.open(part, "r+b" if offset else "wb", bufsize=0)) as fout:
                    if segmented:  # started once the part is open (and a fresh one truncated)
                        remote_segments = verifier.submit(self._segment_hashes, part, hashes.segments, item.size)
                    fout.MAX_REQUEST_SIZE = write_size
                    fout.set_pipelined(True)
                    if offset:
                        fout.seek(offset)
                    while True:
                        block = fin.read(write_size)
                        if not block:
                            break
                        hashes.update(block)
                        fout.write(block)
                        counter.add(len(block))
            verified = False
            if remote_segments is not None:
                try:
                    verified = remote_segments.result() == hashes.segment_digests()
                except (SshError, TimeoutError, RuntimeError) as exc:
                    log.info("segment check of %s on %s failed (%s); verifying the whole file", item.rel,
                             self.host_name, exc)
        finally:
            verifier.shutdown(wait=False, cancel_futures=True)
        if self.settings.preserve_mtime:
            st = item.path.stat()
            sftp.utime(part, (int(st.st_atime), int(st.st_mtime)))
        return hashes.whole.hexdigest(), verified

    def _segment_hashes(self, path: str, segments: list[tuple[int, int]], size: int) -> list[str]:
        args: list[object] = [path, SEGMENT_STALL_SECONDS]
        for start, length in segments:
            args += [start, length]
        result = self.conn.run(remote.script_call(remote.SEGMENT_HASH, "mqi-segments", *args),
                               timeout=SEGMENT_STALL_SECONDS * 2 + size / 20e6)
        lines = result.stdout.splitlines()
        if result.returncode != 0 or len(lines) != len(segments):
            raise RuntimeError(f"exit {result.returncode}, {len(lines)} of {len(segments)} segments: "
                               f"{(result.stderr or result.stdout).strip()[:200]}")
        return [line[:64].lower() for line in lines]

    def _verify_and_rename_uploads(self, todo: list[TreeFile], dst: str, digests: dict[str, str],
                                   verified: set[str], counter: _Counter, report: Callable[[], None]) -> None:
        if not todo:
            return
        unverified = [f for f in todo if f.rel not in verified]
        part_rels = [f.rel + PART_SUFFIX for f in unverified]
        remote_hashes = self._remote_hashes(dst, part_rels, sum(f.size for f in unverified))
        bad = [f for f in unverified if remote_hashes.get(f.rel + PART_SUFFIX) != digests[f.rel]]
        if bad:
            log.warning("upload to %s: %d file(s) did not verify; writing them again from the start",
                        self.host_name, len(bad))
            with self.conn.sftp() as sftp:
                for item in bad:
                    counter.add(-item.size)
                    digests[item.rel], _ = self._send(sftp, item, posixpath.join(dst, item.rel), None, counter,
                                                      stream_verify=False)
            again = self._remote_hashes(dst, [f.rel + PART_SUFFIX for f in bad], sum(f.size for f in bad))
            still = [f.rel for f in bad if again.get(f.rel + PART_SUFFIX) != digests[f.rel]]
            if still:
                raise VerificationError(f"upload to {self.host_name}: SHA-256 of {len(still)} file(s) does not "
                                        f"match the source after a second try (e.g. {still[0]})")

        def rename(sftp: paramiko.SFTPClient, item: object) -> None:
            assert isinstance(item, TreeFile)
            final = posixpath.join(dst, item.rel)
            sftp.posix_rename(final + PART_SUFFIX, final)
            counter.add(files=1)

        self._parallel(todo, rename, counter, report)  # type: ignore[arg-type]

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
            with sftp.open(final + PART_SUFFIX, "wb") as fh:
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
            pending_hashes = hasher.submit(self._remote_hashes, src, [f.rel for f in files], total)
            try:
                return self._download_files(src, dst, files, total, pending_hashes, progress)
            finally:
                pending_hashes.cancel()

    def _download_files(self, src: str, dst: Path, files: list[_RemoteEntry], total: int,
                        pending_hashes: "concurrent.futures.Future[dict[str, str]]",
                        progress: ProgressCallback) -> TransferResult:
        counter = _Counter()
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
        todo: list[_RemoteEntry] = []
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
            assert isinstance(item, _RemoteEntry)
            target = targets[item.rel]
            target.parent.mkdir(parents=True, exist_ok=True)
            digests[item.rel] = self._fetch(sftp, posixpath.join(src, item.rel), item, target, counter, sync_each)

        self._parallel(todo, fetch, counter, report, reserve=1)  # type: ignore[arg-type]
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

    def _fetch(self, sftp: paramiko.SFTPClient, path: str, entry: _RemoteEntry, target: Path,
               counter: _Counter, sync: bool = True) -> str:
        """Read ``path`` into ``target.part`` (continuing a shorter leftover part), fsync it
        when ``sync``; return the SHA-256 of the whole part, hashed as it streamed."""
        part = part_path(target)
        if part.is_symlink():
            part.unlink()
        try:
            offset = part.stat().st_size if part.is_file() else 0
        except OSError:
            offset = 0
        if offset > entry.size:
            part.unlink()
            offset = 0
        digest = hashlib.sha256()
        read_size, _ = self._sizes(sftp)
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(part, flags, 0o644)
        with open(fd, "r+b") as fout:
            if offset:
                _hash_prefix(fout, offset, digest.update)
                counter.add(offset)
            fout.seek(offset)
            fout.truncate(offset)
            chunks = []
            position = offset
            while position < entry.size:
                length = min(read_size, entry.size - position)
                chunks.append((position, length))
                position += length
            with _closing(sftp.open(path, "rb")) as fin:
                fin.MAX_REQUEST_SIZE = read_size
                if len(chunks) > 1:  # readv pipelines every request (in a thread of its own)
                    blocks: Iterable[bytes] = fin.readv(chunks)
                else:  # a small file: one request, no thread
                    fin.seek(offset)
                    blocks = [fin.read(chunks[0][1])] if chunks else []
                with _BackgroundHash(digest, len(chunks) > 1) as hasher:
                    for block in blocks:
                        fout.write(block)
                        hasher.update(block)
                        counter.add(len(block))
            if fout.tell() != entry.size:
                raise VerificationError(f"{path} on {self.host_name} changed size while it was read")
            fout.flush()
            if sync:
                os.fsync(fout.fileno())
        if self.settings.preserve_mtime:
            os.utime(part, (entry.mtime, entry.mtime))
        return digest.hexdigest()


class _BackgroundHash:
    """Feeds a digest from a thread of its own (hashlib releases the GIL), so hashing a
    big download overlaps with receiving it; inline when ``threaded`` is False."""

    def __init__(self, digest: "hashlib._Hash", threaded: bool) -> None:
        self.digest = digest
        self.queue: Optional[queue.Queue] = queue.Queue(maxsize=64) if threaded else None
        self.thread: Optional[threading.Thread] = None

    def __enter__(self) -> "_BackgroundHash":
        if self.queue is not None:
            self.thread = threading.Thread(target=self._run, name="sftp-sha256", daemon=True)
            self.thread.start()
        return self

    def _run(self) -> None:
        assert self.queue is not None
        while True:
            block = self.queue.get()
            if block is None:
                return
            self.digest.update(block)

    def update(self, block: bytes) -> None:
        if self.queue is None:
            self.digest.update(block)
        else:
            self.queue.put(block)

    def __exit__(self, *exc: object) -> None:
        if self.queue is not None and self.thread is not None:
            self.queue.put(None)
            self.thread.join()


@contextlib.contextmanager
def _closing(fh: paramiko.SFTPFile) -> Iterator[paramiko.SFTPFile]:
    """Close an SFTP file; when the connection broke, close it quietly and for good (a
    second close from the garbage collector would only raise again)."""
    try:
        yield fh
    except BaseException:
        try:
            fh.close()
        except Exception:
            fh._closed = True  # paramiko's BufferedFile flag: nothing left to flush
        raise
    fh.close()


class _StreamHashes:
    """SHA-256 of a whole file and, when ``segmented_size`` is given, of each
    :data:`SEGMENT`-sized segment, fed with consecutive blocks."""

    def __init__(self, segmented_size: int = 0) -> None:
        self.whole = hashlib.sha256()
        self.segments = [(start, min(SEGMENT, segmented_size - start)) for start in range(0, segmented_size, SEGMENT)]
        self._parts = [hashlib.sha256() for _ in self.segments]
        self._position = 0

    def update(self, block: bytes) -> None:
        self.whole.update(block)
        view = memoryview(block)
        while view and self._parts:
            index = self._position // SEGMENT
            take = min(len(view), (index + 1) * SEGMENT - self._position)
            self._parts[index].update(view[:take])
            view = view[take:]
            self._position += take

    def segment_digests(self) -> list[str]:
        return [h.hexdigest() for h in self._parts]


def _hash_prefix(fh, length: int, feed: Callable[[bytes], None]) -> None:  # type: ignore[no-untyped-def]
    """Feed the first ``length`` bytes of ``fh`` to ``feed``, leaving ``fh`` after them."""
    left = length
    while left > 0:
        block = fh.read(min(BUFFER, left))
        if not block:
            break
        feed(block)
        left -= len(block)

