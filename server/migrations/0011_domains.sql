-- Custom domains of apps' URLs (`waypost domain add`; model/domains.rs). The HTTPS ingress picks
-- a domain's certificate by SNI, and both ingress listeners route Host = domain to its app.
-- key_pem is a private key: the SQLite file is owner-only (0600 in a 0700 data dir); on
-- PostgreSQL it is as safe as the database (like the CA key in meta).
CREATE TABLE domains (
    domain TEXT PRIMARY KEY,             -- lowercase, no trailing dot
    app TEXT NOT NULL REFERENCES apps(name) ON DELETE CASCADE,
    cert_pem TEXT NOT NULL,              -- the chain, leaf first
    key_pem TEXT NOT NULL,
    subject TEXT NOT NULL,               -- the leaf's, for `domain list`
    not_after INTEGER NOT NULL,          -- unix ms, the leaf's notAfter
    created_at INTEGER NOT NULL          -- unix ms, of the latest add (a new certificate too)
);
CREATE INDEX domains_app ON domains (app);
