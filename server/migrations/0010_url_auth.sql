-- Access control of an app's URL (`waypost url auth`): one JSON document per app
-- (model/urlauth.rs `UrlAuth`): basic-auth users with salted PBKDF2 password hashes, bearer
-- tokens as SHA-256 hashes, allowed client networks. No row: the URL is open to anyone who can
-- reach the ingress.
CREATE TABLE url_auth (
    app TEXT PRIMARY KEY,
    doc TEXT NOT NULL
);
