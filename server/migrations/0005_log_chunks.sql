CREATE TABLE log_chunks (
    -- The id of its first line. The lines of a chunk have the consecutive ids first_id..last_id
    -- (arrival order, the order `logs` shows, as log_lines.id was); ids are never reused.
    first_id INTEGER PRIMARY KEY,
    last_id INTEGER NOT NULL,
    app TEXT NOT NULL,
    src INTEGER NOT NULL,                -- log_sources.id: one instance per chunk
    first_seq INTEGER NOT NULL,          -- sequence numbers of its first and last line
    last_seq INTEGER NOT NULL,
    min_ts_us INTEGER NOT NULL,          -- its oldest and newest line, Unix µs
    max_ts_us INTEGER NOT NULL,
    lines INTEGER NOT NULL,              -- last_id - first_id + 1 (markers included)
    bytes INTEGER NOT NULL,              -- sum of the lines' data lengths
    streams INTEGER NOT NULL,            -- bit 1 << stream per stream present; 8: has a marker
    codec INTEGER NOT NULL DEFAULT 0,    -- how `data` is encoded: 0 plain, 1 deflated (model/logs.rs)
    data BLOB NOT NULL                   -- the lines, length-prefixed, in id order
);
-- Reading an app in arrival order, one instance of it (src in the index: no table lookups to
-- filter), and pruning the oldest chunks first.
CREATE INDEX log_chunks_app ON log_chunks (app, last_id, src);
-- Where --since starts.
CREATE INDEX log_chunks_time ON log_chunks (app, max_ts_us);
