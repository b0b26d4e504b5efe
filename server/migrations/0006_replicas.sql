-- Server replicas (membership). Each server process registers itself at start under a random id
-- made for that run, refreshes last_seen on a heartbeat, and deletes its row on a clean
-- shutdown; a row whose last_seen stopped moving belongs to a replica that died.
CREATE TABLE replicas (
    id TEXT PRIMARY KEY,                 -- random per server start (hex)
    peer_addr TEXT,                      -- HOST:PORT other replicas reach it at; NULL: none
    version TEXT NOT NULL,               -- the waypost version it runs
    started_at INTEGER NOT NULL,         -- unix ms
    last_seen INTEGER NOT NULL           -- unix ms of its latest heartbeat
);
-- Which replica holds the live connection of an instance (replicas.id; NULL: recorded before
-- this column existed). Kept after the instance disconnects: the last replica that held it.
ALTER TABLE instances ADD COLUMN replica TEXT;
-- Counting the live instances each replica holds.
CREATE INDEX instances_replica ON instances (replica, disconnected_at);
