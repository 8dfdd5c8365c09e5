"""core.sqlite archiver and the stand-in curator: real databases, real scheduler."""

from __future__ import annotations

import os
import sqlite3
import threading
import time

from mqi_framework.archive_schedule import start_archive_scheduler, stop_archive_scheduler
from mqi_framework.builtin.sqlite_archiver import SqliteArchiver, SqliteArchiverSettings
from mqi_framework.builtin.standin_curator import StandinCurator, StandinCuratorSettings
from mqi_framework.protocols import PluginContext
from mqi_framework.store import open_state
from mqi_framework.store import records as rec
from mqi_framework.workspace import wait_until


def archiver(tmp_path, **kw):
    return SqliteArchiver(SqliteArchiverSettings(**kw), PluginContext(workspace=tmp_path))


def test_backup_while_another_connection_writes(tmp_path):
    db = tmp_path / "state.db"
    conn = open_state(db)
    stop = threading.Event()

    def writer():
        c = open_state(db)
        while not stop.is_set():
            rec.add_event(c, "test", "write")

    t = threading.Thread(target=writer)
    t.start()
    try:
        time.sleep(0.2)
        result = archiver(tmp_path).run(db)
    finally:
        stop.set()
        t.join()
    copy = sqlite3.connect(result.backup_path)
    assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert copy.execute("SELECT COUNT(*) FROM events").fetchone()[0] > 0
    assert result.backup_path.parent == tmp_path / "backups"
    conn.close()


def test_retention_keep_last_and_max_age(tmp_path):
    db = tmp_path / "state.db"
    open_state(db).close()
    a = archiver(tmp_path, keep_last=2)
    made = [a.run(db).backup_path for _ in range(4)]
    left = sorted((tmp_path / "backups").glob("state-*.db"))
    assert len(left) == 2 and made[-1] in left
    old = time.time() - 10 * 86400
    for path in left:
        os.utime(path, (old, old))
    newest = archiver(tmp_path, keep_last=5, max_age_days=1).run(db).backup_path
    assert sorted((tmp_path / "backups").glob("state-*.db")) == [newest]


def test_scheduler_runs_the_archiver(tmp_path):
    db = tmp_path / "state.db"
    open_state(db).close()
    scheduler = start_archive_scheduler(archiver(tmp_path, keep_last=10), db, 0.3)
    try:
        assert wait_until(lambda: len(list((tmp_path / "backups").glob("state-*.db"))) >= 2, 10)
    finally:
        stop_archive_scheduler(scheduler)


def test_standin_curator(tmp_path):
    curator = StandinCurator(StandinCuratorSettings(gpus=3, host="gpu1"), PluginContext(workspace=tmp_path))
    readings = curator.observe()
    assert [r.index for r in readings] == [0, 1, 2]
    assert all(r.healthy and r.memory_free_mb == r.memory_total_mb for r in readings)
    assert len({r.uuid for r in readings}) == 3
    assert StandinCurator(StandinCuratorSettings(gpus=0), PluginContext(workspace=tmp_path)).check()


def test_mqi_host_backup_copies_what_is_still_in_the_wal(tmp_path):
    """A plain copy of state.db while the host runs misses the transactions that are still in
    the WAL; `mqi-host backup` has them (issue 13.5)."""
    import json
    import shutil

    from mqi_framework.testing import run_cli
    from mqi_framework.workspace import fast_config, write_workspace

    config = write_workspace(tmp_path / "ws", fast_config())
    db = tmp_path / "ws" / "state.db"
    writer = open_state(db)
    writer.execute("PRAGMA wal_autocheckpoint = 0")  # as a busy host: the WAL is not folded back yet
    writer.execute("INSERT INTO cases(uid, name, inbox, path, state, detected_at, updated_at, info) "
                   "VALUES ('case-000001', 'n', '/in', '/in/n', 'detected', 1, 1, '{}')")
    try:
        shutil.copyfile(db, tmp_path / "plain.db")
        plain = sqlite3.connect(tmp_path / "plain.db")
        tables = {r[0] for r in plain.execute("SELECT name FROM sqlite_master")}
        stale = "cases" not in tables or plain.execute("SELECT COUNT(*) FROM cases").fetchone()[0] == 0
        plain.close()
        assert stale  # the plain copy misses the case

        proc = run_cli("backup", "-c", str(config), "--json")
        assert proc.returncode == 0, proc.stderr
        written = json.loads(proc.stdout)["backup"]
        assert written.startswith(str(tmp_path / "ws" / "backups" / "state-"))
        copy = sqlite3.connect(written)
        assert copy.execute("SELECT uid FROM cases").fetchall() == [("case-000001",)]
        copy.close()
        target = tmp_path / "chosen.db"
        assert run_cli("backup", "-c", str(config), "-o", str(target)).returncode == 0
        assert target.is_file() and not (tmp_path / "chosen.db.part").exists()
    finally:
        writer.close()
