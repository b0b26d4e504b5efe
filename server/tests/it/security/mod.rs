//! Security and reliability, adversarially: every finding of the second wave's security review
//! run as an integration test against the real server, the real entrypoint and real children.
//! Each submodule is one finding (or a family of them); each test has its own temp dir and
//! binds port 0.

mod datadir;
mod entrypoint_secrets;
mod last_words;
mod matrix;
mod preauth;
mod takeover;
