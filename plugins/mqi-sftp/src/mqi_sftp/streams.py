"""One file over SFTP, in either direction: resumable from a shorter ``.part`` left by an
interrupted run, hashed while it streams (so no file is read twice), and as fast as the
server lets it be (requests of the server's size, pipelined writes, ``readv`` reads).

What is sent or fetched, verification of whole trees and renames are the transfer's
(:mod:`mqi_sftp.transfer`); these functions only move bytes and count them.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
import posixpath
import stat
from pathlib import Path
from typing import Iterable, Optional

import attrs
import paramiko

from mqi_framework.toolkit import MANIFEST, PART_SUFFIX, TreeFile, VerificationError, part_path
from mqi_sftp.channels import Counter, closing
from mqi_sftp.verify import BackgroundHash, RemoteHasher, StreamHashes, hash_prefix
from mqi_ssh.connection import SshError

log = logging.getLogger(__name__)

#: uploads of files this big are verified segment by segment while they stream
STREAM_VERIFY_FROM = 64 * 1024 * 1024


@attrs.frozen
class RemoteEntry:
    """A file found on the remote side (path relative to the tree's top)."""

    rel: str
    size: int
    mtime: int


def walk_remote(sftp: paramiko.SFTPClient, top: str) -> tuple[dict[str, RemoteEntry], dict[str, int], set[str], int]:
    """What is under remote ``top``, relative to it: its files (not the manifest), the sizes
    of leftover ``.part`` files by their final names, its folders (``""`` is ``top``), and
    how many symlinks were skipped (never followed)."""
    files: dict[str, RemoteEntry] = {}
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
                elif child != MANIFEST:
                    files[child] = RemoteEntry(child, entry.st_size or 0, int(entry.st_mtime or 0))
    return files, parts, folders, links


def send_file(sftp: paramiko.SFTPClient, item: TreeFile, final: str, part_size: Optional[int], counter: Counter, *,
              write_size: int, segment_hasher: Optional[RemoteHasher], preserve_mtime: bool) -> tuple[str, bool]:
    """Write ``item`` to ``final.part`` (continuing a leftover part of ``part_size`` bytes
    when it is not longer than the file). Returns the SHA-256 of the whole local file,
    hashed as it streamed, and whether the part was verified on the way: with a
    ``segment_hasher``, a file of :data:`STREAM_VERIFY_FROM` bytes or more is hashed on
    the host segment by segment while later segments still stream, and it is verified when
    every segment's SHA-256 matched the source's."""
    part = final + PART_SUFFIX
    offset = part_size if part_size is not None and 0 < part_size <= item.size else 0
    segmented = segment_hasher is not None and item.size >= STREAM_VERIFY_FROM
    hashes = StreamHashes(item.size if segmented else 0)
    # not a `with`: after a failure the host's hasher is not waited for (it gives up by itself)
    verifier = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sftp-verify")
    remote_segments: Optional[concurrent.futures.Future] = None
    try:
        with open(item.path, "rb") as fin:
            if offset:
                hash_prefix(fin, offset, hashes.update)
                counter.add(offset)
            # unbuffered, one SFTP request per read: paramiko's own write buffer only copies
            with closing(open_part(sftp, part, resume=bool(offset))) as fout:
                if segmented:  # started once the part is open (and a fresh one truncated)
                    assert segment_hasher is not None
                    remote_segments = verifier.submit(segment_hasher.segment_hashes, part, hashes.segments, item.size)
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
                log.info("segment check of %s failed (%s); verifying the whole file", item.rel, exc)
    finally:
        verifier.shutdown(wait=False, cancel_futures=True)
    if preserve_mtime:
        st = item.path.stat()
        sftp.utime(part, (int(st.st_atime), int(st.st_mtime)))
    return hashes.whole.hexdigest(), verified


def open_part(sftp: paramiko.SFTPClient, part: str, *, resume: bool = False) -> paramiko.SFTPFile:
    """Open remote ``part`` for writing without ever writing through what someone else put at
    its name: on a shared server a ``.part`` symlink planted in the case folder would
    otherwise make the upload write wherever it points. Whatever is there (a link, a leftover
    that is not continued) is removed as an entry, never followed, and a new part is created
    with ``O_EXCL`` (which fails rather than follow a link made in between) and made 0600.
    ``resume`` continues an existing regular file, checked with ``lstat`` just before."""
    try:
        mode: Optional[int] = sftp.lstat(part).st_mode or 0
    except FileNotFoundError:
        mode = None
    if resume and mode is not None and stat.S_ISREG(mode):
        return sftp.open(part, "r+b", bufsize=0)
    if mode is not None:
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(f"remote {part} is a folder; refusing to replace it")
        sftp.remove(part)
    fout = sftp.open(part, "wx", bufsize=0)
    fout.chmod(0o600)
    return fout


def _resumable_offset(part: Path, size: int) -> int:
    """How much of a leftover ``part`` can be continued (0: start again)."""
    if part.is_symlink():  # never written through
        part.unlink()
    try:
        offset = part.stat().st_size if part.is_file() else 0
    except OSError:
        offset = 0
    if offset > size:
        part.unlink()
        offset = 0
    return offset


def fetch_file(sftp: paramiko.SFTPClient, path: str, entry: RemoteEntry, target: Path, counter: Counter, *,
               read_size: int, sync: bool, preserve_mtime: bool, where: str) -> str:
    """Read remote ``path`` into ``target.part`` (continuing a shorter leftover part; the
    part is readable by this user only), fsync it when ``sync``; return the SHA-256 of the
    whole part, hashed as it streamed. ``where`` names the host in errors."""
    part = part_path(target)
    offset = _resumable_offset(part, entry.size)
    digest = hashlib.sha256()
    fd = os.open(part, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with open(fd, "r+b") as fout:
        if offset:
            hash_prefix(fout, offset, digest.update)
            counter.add(offset)
        fout.seek(offset)
        fout.truncate(offset)
        chunks = []
        position = offset
        while position < entry.size:
            length = min(read_size, entry.size - position)
            chunks.append((position, length))
            position += length
        with closing(sftp.open(path, "rb")) as fin:
            fin.MAX_REQUEST_SIZE = read_size
            if len(chunks) > 1:  # readv pipelines every request (in a thread of its own)
                blocks: Iterable[bytes] = fin.readv(chunks)
            else:  # a small file: one request, no thread
                fin.seek(offset)
                blocks = [fin.read(chunks[0][1])] if chunks else []
            with BackgroundHash(digest, len(chunks) > 1) as hasher:
                for block in blocks:
                    fout.write(block)
                    hasher.update(block)
                    counter.add(len(block))
        if fout.tell() != entry.size:
            raise VerificationError(f"{path} on {where} changed size while it was read")
        fout.flush()
        if sync:
            os.fsync(fout.fileno())
    if preserve_mtime:
        os.utime(part, (entry.mtime, entry.mtime))
    return digest.hexdigest()
