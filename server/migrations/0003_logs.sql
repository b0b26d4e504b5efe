
    CREATE TABLE log_sources (
        id INTEGER PRIMARY KEY,              -- referenced by log_lines.src (smaller than the hex)
        instance TEXT NOT NULL UNIQUE,       -- hex instance id
        app TEXT NOT NULL,
        next_seq INTEGER NOT NULL DEFAULT 0, -- H: every entry below is stored or known lost
        lost INTEGER NOT NULL DEFAULT 0,     -- entries known lost (sum of the markers)
        reported_dropped INTEGER NOT NULL DEFAULT 0 -- sum of LogBatch.dropped (informational)
    );
    CREATE INDEX log_sources_app ON log_sources (app);
    CREATE TABLE log_lines (
        id INTEGER PRIMARY KEY,              -- arrival order: the order `logs` shows
        app TEXT NOT NULL,
        src INTEGER NOT NULL,                -- log_sources.id
        seq INTEGER NOT NULL,
        stream INTEGER NOT NULL,             -- 0 stdout, 1 stderr, 2 entrypoint
        ts_us INTEGER NOT NULL,              -- first byte of the line, Unix µs
        truncated INTEGER NOT NULL DEFAULT 0,-- 1: the line continues in a later entry
        dropped INTEGER NOT NULL DEFAULT 0,  -- > 0: a marker: entries seq..seq+dropped were lost
        data BLOB NOT NULL
    );
    -- Reading an app in arrival order, and one instance of it (src is in the index, so the
    -- filter needs no table lookups). Not (src, id): with many instances logging at once its
    -- inserts land all over the tree, which costs about a quarter of the ingest rate.
    CREATE INDEX log_lines_app ON log_lines (app, id, src);
    -- Where --since starts (appends near the end: timestamps grow).
    CREATE INDEX log_lines_time ON log_lines (app, ts_us);
    CREATE TABLE log_settings (
        app TEXT PRIMARY KEY REFERENCES apps(name),
        max_lines INTEGER,                   -- NULL: DEFAULT_MAX_LINES
        max_bytes INTEGER                    -- NULL: DEFAULT_MAX_BYTES
    );
    CREATE TABLE log_usage (
        app TEXT PRIMARY KEY,
        lines INTEGER NOT NULL DEFAULT 0,    -- rows in log_lines (markers included)
        bytes INTEGER NOT NULL DEFAULT 0     -- sum of length(data)
    );