-- Application config in scopes: '' is the global scope (applies to every app), otherwise an app's
-- name. A scope's definitions are one JSON document (model/config.rs `ScopeConfig::to_doc`), so
-- a version is one row and `config rollback` copies an old document back. The rows of the
-- tables of migration 2 are converted into documents by the store right after this migration
-- runs (store/config.rs `convert_legacy`), which then drops those tables.
CREATE TABLE config_scopes (
    scope TEXT PRIMARY KEY,
    version INTEGER NOT NULL DEFAULT 0,   -- bumped by every change an operator makes
    epoch INTEGER NOT NULL DEFAULT 0,     -- bumped when a dynamic value the scope uses changed
    doc TEXT NOT NULL                     -- the definitions (never a resolved dynamic value)
);
-- Every version of every scope, newest HISTORY_KEPT kept: `config history` and `rollback`.
CREATE TABLE config_history (
    scope TEXT NOT NULL,
    version INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,               -- when, Unix ms
    summary TEXT NOT NULL,                -- which names changed (never values)
    doc TEXT NOT NULL,
    PRIMARY KEY (scope, version)
);
-- Config sources (OpenBao/Vault, etcd): where dynamic values are read from, with the
-- credentials the server uses (the database holds them, as it holds the CA's key).
CREATE TABLE config_sources (
    scope TEXT NOT NULL,                  -- '' global, else the app that owns it
    name TEXT NOT NULL,
    kind TEXT NOT NULL,                   -- openbao | vault | etcd
    addr TEXT NOT NULL,
    ca TEXT,                              -- PEM; NULL: the system bundle
    auth TEXT NOT NULL,                   -- JSON (sources/mod.rs `Auth`)
    refresh_ms INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (scope, name)
);
