-- 001: cases, beams, steps and attempts, resources, workers, audit events, outbox.
-- Times are UNIX seconds (REAL). JSON columns hold PHI-free data only.

CREATE TABLE cases (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    uid              TEXT NOT NULL UNIQUE,          -- case-000042: used in logs, paths, CLI
    name             TEXT NOT NULL UNIQUE,          -- the case folder name (may be a patient id)
    inbox            TEXT NOT NULL,
    path             TEXT NOT NULL,
    state            TEXT NOT NULL,
    step_index       INTEGER NOT NULL DEFAULT 0,
    attention        INTEGER NOT NULL DEFAULT 0,    -- flagged for a person (incomplete too long, failed)
    message          TEXT NOT NULL DEFAULT '',
    info             TEXT NOT NULL DEFAULT '{}',
    detected_at      REAL NOT NULL,
    updated_at       REAL NOT NULL,
    finished_at      REAL,
    incomplete_since REAL,
    next_check_at    REAL
);
CREATE INDEX cases_state ON cases(state);

CREATE TABLE beams (
    case_id      INTEGER NOT NULL REFERENCES cases(id),
    number       INTEGER NOT NULL,
    name         TEXT NOT NULL DEFAULT '',
    delivery_dir TEXT,
    input_rel    TEXT,
    state        TEXT NOT NULL,
    message      TEXT NOT NULL DEFAULT '',
    updated_at   REAL NOT NULL,
    PRIMARY KEY (case_id, number)
);

-- One row per (case, beam, workflow step); beam_number 0 = a case-level step.
CREATE TABLE steps (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    case_id          INTEGER NOT NULL REFERENCES cases(id),
    beam_number      INTEGER NOT NULL DEFAULT 0,
    step_index       INTEGER NOT NULL,
    name             TEXT NOT NULL,
    worker           TEXT NOT NULL,
    state            TEXT NOT NULL,     -- pending|queued|waiting|dispatched|running|cancelling|done|failed|cancelled
    attempt          INTEGER NOT NULL DEFAULT 0,
    max_attempt      INTEGER NOT NULL,
    next_attempt_at  REAL,
    command          TEXT,              -- the last dispatched command body (JSON)
    job              TEXT,              -- JobHandle as JSON while an executor job exists
    progress         REAL,
    progress_text    TEXT NOT NULL DEFAULT '',
    gpu_id           INTEGER REFERENCES resources(id),
    started_at       REAL,
    finished_at      REAL,
    exit_code        INTEGER,
    message          TEXT NOT NULL DEFAULT '',
    UNIQUE (case_id, beam_number, step_index)
);
CREATE INDEX steps_state ON steps(state);

CREATE TABLE attempts (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    step_id     INTEGER NOT NULL REFERENCES steps(id),
    attempt     INTEGER NOT NULL,
    dispatched_at REAL NOT NULL,
    started_at  REAL,
    finished_at REAL,
    outcome     TEXT,
    exit_code   INTEGER,
    message     TEXT NOT NULL DEFAULT '',
    log_tail    TEXT NOT NULL DEFAULT '',
    UNIQUE (step_id, attempt)
);

CREATE TABLE resources (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    kind            TEXT NOT NULL DEFAULT 'gpu',
    host            TEXT NOT NULL,
    idx             INTEGER NOT NULL,
    uuid            TEXT NOT NULL DEFAULT '',
    name            TEXT NOT NULL DEFAULT '',
    memory_total_mb INTEGER,
    memory_used_mb  INTEGER,
    memory_free_mb  INTEGER,
    utilization_pct INTEGER,
    temperature_c   INTEGER,
    healthy         INTEGER NOT NULL DEFAULT 1,
    curator         TEXT NOT NULL DEFAULT '',
    seen_at         REAL NOT NULL,
    allocated_step  INTEGER,            -- steps.id holding it, NULL when free
    allocated_at    REAL,
    UNIQUE (kind, host, idx)
);

CREATE TABLE workers (
    name         TEXT PRIMARY KEY,
    kind         TEXT NOT NULL,
    pid          INTEGER,
    state        TEXT NOT NULL,         -- starting|running|draining|stopped|crashed|restarting
    started_at   REAL,
    heartbeat_at REAL,
    restarts     INTEGER NOT NULL DEFAULT 0,
    last_exit    INTEGER,
    message      TEXT NOT NULL DEFAULT ''
);

-- Append-only audit log: the triggers refuse UPDATE and DELETE.
CREATE TABLE events (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    at        REAL NOT NULL,
    case_id   INTEGER,
    beam      INTEGER,
    step      TEXT,
    kind      TEXT NOT NULL,
    message   TEXT NOT NULL DEFAULT '',
    actor     TEXT NOT NULL DEFAULT 'conductor',
    data      TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX events_case ON events(case_id);
CREATE TRIGGER events_no_update BEFORE UPDATE ON events BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
CREATE TRIGGER events_no_delete BEFORE DELETE ON events BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;

-- Transactional outbox: commands written with the state change that causes them.
CREATE TABLE outbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    queue       TEXT NOT NULL,
    message_id  TEXT NOT NULL UNIQUE,
    body        TEXT NOT NULL,
    created_at  REAL NOT NULL,
    sent_at     REAL
);
CREATE INDEX outbox_unsent ON outbox(sent_at) WHERE sent_at IS NULL;

-- Events already applied by the conductor (duplicates from redelivery are ignored).
CREATE TABLE processed_messages (
    message_id TEXT PRIMARY KEY,
    at         REAL NOT NULL
);
