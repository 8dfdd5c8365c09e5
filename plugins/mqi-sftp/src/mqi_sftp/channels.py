"""Several SFTP sessions working through one file list, and the progress they make.

Progress callbacks run only in the caller's thread: the broker connection behind them is
not thread-safe, so worker threads only count (:class:`Counter`) and the caller reports.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
from typing import Callable, Iterator

import paramiko

from mqi_framework.protocols import ProgressCallback, TransferProgress
from mqi_ssh.connection import SshConnection


class Counter:
    """Bytes and files done, updated by worker threads and read by the caller's thread."""

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


def run_parallel(conn: SshConnection, channels: int, items: list,
                 work: Callable[[paramiko.SFTPClient, object], None], report: Callable[[], None]) -> None:
    """Run ``work(sftp, item)`` for every item on up to ``channels`` SFTP sessions of
    ``conn``, calling ``report()`` from this thread meanwhile. The first exception of any
    session stops the others (after their current item) and is raised here."""
    if not items:
        return
    pending = list(reversed(items))
    lock = threading.Lock()
    stop = threading.Event()

    def worker() -> None:
        with conn.sftp() as sftp:
            while not stop.is_set():
                with lock:
                    if not pending:
                        return
                    item = pending.pop()
                work(sftp, item)

    channels = max(1, min(channels, len(items)))
    with concurrent.futures.ThreadPoolExecutor(channels, thread_name_prefix="sftp") as pool:
        futures = [pool.submit(worker) for _ in range(channels)]
        try:
            while True:
                done, _ = concurrent.futures.wait(futures, timeout=0.25, return_when=concurrent.futures.FIRST_EXCEPTION)
                report()
                for future in done:
                    if future.exception() is not None:
                        raise future.exception()  # type: ignore[misc]
                if len(done) == len(futures):
                    return
        finally:
            stop.set()


@contextlib.contextmanager
def closing(fh: paramiko.SFTPFile) -> Iterator[paramiko.SFTPFile]:
    """Close an SFTP file; when the connection broke, close it quietly and for good (a
    second close from the garbage collector would only raise again)."""
    try:
        yield fh
    except BaseException:
        try:
            fh.close()
        except Exception:
            fh._closed = True  # paramiko's BufferedFile flag (pinned <6): nothing left to flush
        raise
    fh.close()
