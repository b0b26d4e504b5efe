-- The entrypoint's own resident memory (bytes), from its latest Status: what waypost itself costs
-- next to the app (child_rss_bytes). 0: not reported yet.
ALTER TABLE instances ADD COLUMN entrypoint_rss_bytes INTEGER NOT NULL DEFAULT 0;
