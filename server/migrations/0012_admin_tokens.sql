-- Named admin tokens with an optional expiry (`waypost token create --admin --name N --ttl D`).
-- name: what `token list` shows of an admin token (NULL for entrypoint tokens); unique among
-- admin tokens, which the server checks when it creates one.
ALTER TABLE tokens ADD COLUMN name TEXT;
-- Unix ms after which the token is refused ("expired"); NULL: it never expires.
ALTER TABLE tokens ADD COLUMN expires_at INTEGER;
-- Admin tokens from before: minted at first start (again if the CLI context was lost). The
-- oldest is `initial`, any later ones `initial-` and the start of their id, so names stay unique.
UPDATE tokens SET name = 'initial-' || substr(hash, 1, 12) WHERE kind = 'admin';
UPDATE tokens SET name = 'initial'
 WHERE hash = (SELECT hash FROM tokens WHERE kind = 'admin' ORDER BY created_at, hash LIMIT 1);
