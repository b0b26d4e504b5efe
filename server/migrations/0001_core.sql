CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
     CREATE TABLE apps (name TEXT PRIMARY KEY, created_at INTEGER NOT NULL);
     CREATE TABLE tokens (
         hash TEXT PRIMARY KEY,               -- hex SHA-256 of the token text
         kind TEXT NOT NULL CHECK (kind IN ('admin', 'entrypoint')),
         app TEXT REFERENCES apps(name),      -- entrypoint tokens: the app they are scoped to
         deployment TEXT,                     -- NULL: any deployment ('' on the instance)
         created_at INTEGER NOT NULL
     );
     CREATE TABLE instances (
         id TEXT PRIMARY KEY,                 -- hex of the 16-byte instance id
         app TEXT NOT NULL,
         deployment TEXT NOT NULL DEFAULT '',
         hostname TEXT NOT NULL DEFAULT '',
         entrypoint_pid INTEGER NOT NULL DEFAULT 0,
         entrypoint_version TEXT NOT NULL DEFAULT '',
         connected_at INTEGER NOT NULL,       -- unix ms, of the latest connection
         last_seen_at INTEGER NOT NULL,       -- unix ms; flushed from memory every few seconds
         disconnected_at INTEGER,             -- NULL while live
         ended TEXT,                          -- 'exited' | 'lost' once disconnected
         child_state TEXT,                    -- starting | running | restarting | exited
         child_pid INTEGER,
         exit_code INTEGER,                   -- of the last exit
         exit_signal INTEGER,
         oom_killed INTEGER NOT NULL DEFAULT 0,
         child_rss_bytes INTEGER NOT NULL DEFAULT 0,
         child_cpu_ms INTEGER NOT NULL DEFAULT 0,
         starts INTEGER NOT NULL DEFAULT 0,
         config_version INTEGER NOT NULL DEFAULT 0,
         session INTEGER NOT NULL DEFAULT 0   -- random per connection; guards late writes
     );
     CREATE INDEX instances_live ON instances (disconnected_at, app);
     CREATE INDEX instances_gone ON instances (app, disconnected_at);