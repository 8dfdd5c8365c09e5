-- 003: indexes for the dashboard (overview, case list) so that its pages stay fast with
-- 10,000+ cases: "needs attention" newest first, cases that arrived or finished since a
-- time (today, last 24 hours), and beams counted by state.
CREATE INDEX cases_attention ON cases(attention, updated_at);
CREATE INDEX cases_detected ON cases(detected_at);
CREATE INDEX cases_finished ON cases(finished_at);
CREATE INDEX beams_state ON beams(state);
