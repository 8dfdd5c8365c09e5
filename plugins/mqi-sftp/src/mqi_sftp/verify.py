"""SHA-256 verification of transferred files, on both sides.

* :class:`RemoteHasher` – hashes on the SSH host: a whole batch of files in one command
  (``openssl dgst``, or coreutils' ``sha256sum`` where openssl is missing), segments of a
  big upload while later segments still stream, or files read back over SFTP
  (``remote_hash: readback``);
* :class:`StreamHashes`, :class:`BackgroundHash`, :func:`hash_prefix` – local files
  hashed while they stream, so no file is read twice.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import queue
import threading
from typing import Callable, Literal, Optional

from mqi_framework.toolkit import VerificationError
from mqi_ssh import remote
from mqi_ssh.connection import SshConnection

log = logging.getLogger(__name__)

#: local read buffer when hashing what is already there
BUFFER = 1024 * 1024
#: segment size of the streamed verification (the last segment is hashed after the data arrived)
SEGMENT = 32 * 1024 * 1024
#: the host's segment hasher gives up when the file did not grow for this long
SEGMENT_STALL_SECONDS = 15
#: names per hashing command on the host
BATCH = 5000


class RemoteHasher:
    """SHA-256 of files on one SSH host. ``conn`` returns the host's (shared) connection."""

    def __init__(self, conn: Callable[[], SshConnection], host_name: str,
                 mode: Literal["host", "readback"] = "host") -> None:
        self._conn = conn
        self.host_name = host_name
        self.mode = mode

    def hashes(self, base: str, rels: list[str], total_bytes: int) -> dict[str, str]:
        """SHA-256 of remote files (relative to ``base``), computed on the host in one
        command per batch: ``openssl dgst`` where the host has it (several times faster
        than coreutils' ``sha256sum``), else ``sha256sum``. Names with a newline or a
        backslash always go to ``sha256sum``, whose output escapes them."""
        if not rels:
            return {}
        if self.mode == "readback":
            return self.read_back(base, rels)
        plain = [r for r in rels if "\n" not in r and "\\" not in r]
        odd = [r for r in rels if "\n" in r or "\\" in r]
        out: dict[str, str] = {}
        for group, tool in ((plain, "fast"), (odd, "sha256sum")):
            for start in range(0, len(group), BATCH):
                batch = group[start:start + BATCH]
                hashes = self._hash_batch(base, batch, tool, total_bytes)
                if hashes is None:  # neither tool on the host
                    log.warning("no sha256sum or openssl on %s: reading files back to verify them (set "
                                "remote_hash: readback to skip this probe)", self.host_name)
                    return self.read_back(base, rels)
                out.update(hashes)
        return out

    def _hash_batch(self, base: str, batch: list[str], tool: str, total_bytes: int) -> Optional[dict[str, str]]:
        line = remote.script_call(remote.HASH, "mqi-hash", base, tool)
        # "./" in front: a name that starts with "-" is never read as an option
        names = b"\0".join(("./" + r).encode("utf-8", "surrogateescape") for r in batch)
        result = self._conn().run(line, timeout=120 + total_bytes / 50e6, stdin=names)
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

    def read_back(self, base: str, rels: list[str]) -> dict[str, str]:
        """SHA-256 of remote files read back over SFTP (needs nothing on the host)."""
        out: dict[str, str] = {}
        with self._conn().sftp() as sftp:
            for rel in rels:
                with sftp.open(posixpath.join(base, rel), "rb") as fh:
                    fh.prefetch()
                    out[rel] = hashlib.file_digest(fh, "sha256").hexdigest()
        return out

    def segment_hashes(self, path: str, segments: list[tuple[int, int]], size: int) -> list[str]:
        """SHA-256 of each ``(start, length)`` segment of ``path`` on the host, each hashed as
        soon as the file has grown past it (the file is still being written)."""
        args: list[object] = [path, SEGMENT_STALL_SECONDS]
        for start, length in segments:
            args += [start, length]
        result = self._conn().run(remote.script_call(remote.SEGMENT_HASH, "mqi-segments", *args),
                                  timeout=SEGMENT_STALL_SECONDS * 2 + size / 20e6)
        lines = result.stdout.splitlines()
        if result.returncode != 0 or len(lines) != len(segments):
            raise RuntimeError(f"exit {result.returncode}, {len(lines)} of {len(segments)} segments: "
                               f"{(result.stderr or result.stdout).strip()[:200]}")
        return [line[:64].lower() for line in lines]


class StreamHashes:
    """SHA-256 of a whole file and, when ``segmented_size`` is given, of each
    :data:`SEGMENT`-sized segment, fed with consecutive blocks."""

    def __init__(self, segmented_size: int = 0) -> None:
        self.whole = hashlib.sha256()
        self.segments = [(start, min(SEGMENT, segmented_size - start)) for start in range(0, segmented_size, SEGMENT)]
        self._parts = [hashlib.sha256() for _ in self.segments]
        self._segment = SEGMENT
        self._position = 0

    def update(self, block: bytes) -> None:
        self.whole.update(block)
        view = memoryview(block)
        while view and self._parts:
            index = self._position // self._segment
            take = min(len(view), (index + 1) * self._segment - self._position)
            self._parts[index].update(view[:take])
            view = view[take:]
            self._position += take

    def segment_digests(self) -> list[str]:
        return [h.hexdigest() for h in self._parts]


class BackgroundHash:
    """Feeds a digest from a thread of its own (hashlib releases the GIL), so hashing a
    big download overlaps with receiving it; inline when ``threaded`` is False."""

    def __init__(self, digest: "hashlib._Hash", threaded: bool) -> None:
        self.digest = digest
        self.queue: Optional[queue.Queue] = queue.Queue(maxsize=64) if threaded else None
        self.thread: Optional[threading.Thread] = None

    def __enter__(self) -> "BackgroundHash":
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


def hash_prefix(fh, length: int, feed: Callable[[bytes], None]) -> None:  # type: ignore[no-untyped-def]
    """Feed the first ``length`` bytes of ``fh`` to ``feed``, leaving ``fh`` after them."""
    left = length
    while left > 0:
        block = fh.read(min(BUFFER, left))
        if not block:
            break
        feed(block)
        left -= len(block)
