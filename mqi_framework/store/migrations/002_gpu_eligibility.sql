-- 002: GPU eligibility and a bounded reading history.
-- A curator says whether a GPU may take a beam now (enough free memory, low enough
-- utilisation); allocate_gpu only hands out GPUs that are healthy AND eligible. `note`
-- says why a GPU is unhealthy or not eligible, for people (CLI, dashboard).
ALTER TABLE resources ADD COLUMN eligible INTEGER NOT NULL DEFAULT 1;
ALTER TABLE resources ADD COLUMN note TEXT NOT NULL DEFAULT '';

-- Readings over time for charts: at most one row per GPU per spacing interval, rows older
-- than the curator's history horizon are pruned when new ones are written.
CREATE TABLE gpu_history (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    at              REAL NOT NULL,
    host            TEXT NOT NULL,
    idx             INTEGER NOT NULL,
    memory_used_mb  INTEGER,
    memory_free_mb  INTEGER,
    utilization_pct INTEGER,
    temperature_c   INTEGER,
    healthy         INTEGER NOT NULL,
    eligible        INTEGER NOT NULL,
    allocated       INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX gpu_history_gpu_at ON gpu_history(host, idx, at);
CREATE INDEX gpu_history_at ON gpu_history(at);
