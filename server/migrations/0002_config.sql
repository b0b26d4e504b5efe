
    CREATE TABLE config_apps (
        app TEXT PRIMARY KEY REFERENCES apps(name),
        version INTEGER NOT NULL DEFAULT 0,     -- bumped by every change
        on_change TEXT NOT NULL DEFAULT 'restart' CHECK (on_change IN ('restart', 'signal', 'none')),
        signal TEXT NOT NULL DEFAULT '',        -- e.g. SIGHUP when on_change = 'signal'
        splay_ms INTEGER,                       -- NULL: DEFAULT_SPLAY
        stop_grace_ms INTEGER NOT NULL DEFAULT 0 -- 0: the entrypoint's WAYPOST_STOP_TIMEOUT
    );
    CREATE TABLE config_vars (
        app TEXT NOT NULL REFERENCES apps(name),
        deployment TEXT NOT NULL DEFAULT '',    -- '': app-wide; else overrides for that deployment
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (app, deployment, key)
    );
    CREATE TABLE config_files (
        app TEXT NOT NULL REFERENCES apps(name),
        path TEXT NOT NULL,                     -- absolute, inside the app's environment
        mode INTEGER NOT NULL,
        contents BLOB NOT NULL,
        PRIMARY KEY (app, path)
    );