//! `waypost server backup FILE`: a consistent copy of the server's SQLite database, taken while
//! the server runs (or not), without its API: it reads the data dir directly
//! (store/backup.rs). A server on PostgreSQL is backed up with PostgreSQL's own `pg_dump`; this
//! command says so and prints the command.
//!
//! Restoring: stop the server, put the copy in place as `DATA_DIR/waypost.db` (no `-wal`/`-shm`
//! files next to it), start the server. The database holds everything the server needs (its CA
//! and keys, apps, tokens, config, logs); the other files of the data dir are rewritten at start.

use crate::server::store::{self, Location};
use anyhow::{Result, bail};
use clap::Args;
use std::path::{Path, PathBuf};

/// Arguments of `waypost server backup`.
#[derive(Args, Debug)]
pub struct BackupArgs {
    /// Where to write the copy: a new file (mode 0600; it holds the server's private keys).
    file: PathBuf,
    /// Data directory of the server to back up (the one `server run` was given).
    #[arg(long, env = "WAYPOST_DATA_DIR", default_value = "./waypost-data")]
    data_dir: PathBuf,
    /// Replace FILE if it exists.
    #[arg(long)]
    force: bool,
    /// The server's PostgreSQL URL, when it runs on one (as `server run --database`): not backed
    /// up by waypost; the `pg_dump` command to use is printed instead.
    #[arg(long, env = "WAYPOST_DATABASE_URL", value_name = "URL", value_parser = super::parse_database, hide_env_values = true)]
    database: Option<Location>,
}

/// Runs `waypost server backup`.
pub fn run(a: BackupArgs) -> Result<()> {
    if let Some(Location::Postgres(url)) = &a.database {
        bail!(
            "this server's database is PostgreSQL ({}): waypost backs up only SQLite; back it up \
             with PostgreSQL's own tool: {}",
            Location::Postgres(url.clone()).describe(),
            pg_dump_command(&a.file, url)
        );
    }
    let db = a.data_dir.join("waypost.db");
    if !db.exists() {
        if a.data_dir.join("server.json").exists() {
            // A server runs on this data dir, yet keeps no SQLite database in it.
            bail!(
                "{} has no waypost.db, but a server runs on it: it uses PostgreSQL; back that up \
                 with pg_dump (waypost server backup --database URL prints the command)",
                a.data_dir.display()
            );
        }
        bail!(
            "there is no waypost database in {} (is --data-dir, or WAYPOST_DATA_DIR, the one the \
             server was started with?)",
            a.data_dir.display()
        );
    }
    let copied = store::backup::sqlite(&db, &a.file, a.force)?;
    println!(
        "waypost: backed up {} to {} ({} bytes, schema {}, mode 0600)",
        db.display(),
        a.file.display(),
        copied.bytes,
        copied.schema
    );
    println!(
        "waypost: to restore, stop the server and copy it to DATA_DIR/waypost.db (removing any \
         waypost.db-wal and waypost.db-shm there), then start the server"
    );
    Ok(())
}

/// The `pg_dump` command line for the database at `url` into `file`, quoted for a POSIX shell.
/// The password, if the URL has one, is left out (pg_dump asks, or reads PGPASSWORD/~/.pgpass).
fn pg_dump_command(file: &Path, url: &str) -> String {
    format!(
        "pg_dump --format=custom --file {} --dbname {}",
        shell_quote(&file.to_string_lossy()),
        shell_quote(&without_password(url))
    )
}

/// `postgres://user:secret@host/db` → `postgres://user@host/db`.
fn without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{scheme}://{user}@{host}")
        }
        None => url.to_string(),
    }
}

/// `s` as one word for a POSIX shell: as it is when it has only safe characters, else in single
/// quotes.
fn shell_quote(s: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_./:@=,+%".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pg_dump_command_drops_the_password_and_quotes() {
        assert_eq!(
            pg_dump_command(
                Path::new("/backups/waypost.dump"),
                "postgres://wp:s3cret@db.example:5432/waypost?sslmode=require"
            ),
            "pg_dump --format=custom --file /backups/waypost.dump --dbname \
             'postgres://wp@db.example:5432/waypost?sslmode=require'"
        );
        assert_eq!(
            pg_dump_command(Path::new("it's.dump"), "postgres://wp@h/db"),
            r"pg_dump --format=custom --file 'it'\''s.dump' --dbname postgres://wp@h/db"
        );
    }
}
