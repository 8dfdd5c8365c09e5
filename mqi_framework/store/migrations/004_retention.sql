-- 004: retention. What was removed of a finished case and when, as JSON
-- ({"remote": t, "staging": t, "results": t}; "requested": t while a removal is asked for).
ALTER TABLE cases ADD COLUMN cleaned TEXT NOT NULL DEFAULT '{}';
