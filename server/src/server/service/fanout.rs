//! Config fan-out across replicas: a change made on any replica reaches the instances held by
//! every replica. The writer announces it in the same transaction (PostgreSQL `NOTIFY` on
//! [`store::CONFIG_CHANNEL`], payload the app's name; store/config.rs); each replica keeps one
//! connection that `LISTEN`s, on a thread of its own (the client blocks while it waits), and
//! hands what it hears to the config service ([`Reload`]), which reloads that app and pushes if
//! the version moved. A replica also hears its own changes: the reload finds the version it
//! already has and pushes nothing.
//!
//! Notifications are not stored: those sent while the listening connection was down are lost.
//! So every (re)connection starts with [`Reload::All`], which reloads every cached app.
//! SQLite (one server) has nothing to listen to and starts no thread.

use crate::server::store::{self, Location};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;

/// What the config service should reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    /// This app changed on some replica.
    App(String),
    /// Anything may have changed (the listener was (re)connected).
    All,
}

/// How long one wait for notifications lasts: also how soon the thread sees the stop flag.
const WAIT: Duration = Duration::from_millis(500);
/// Pause before reconnecting after the listening connection failed.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// Starts the listener for `location`. None on SQLite. Dropping the receiver, or setting `stop`,
/// ends the thread within [`WAIT`].
pub fn start(
    location: &Location,
    stop: Arc<AtomicBool>,
) -> Option<mpsc::UnboundedReceiver<Reload>> {
    let Location::Postgres(_) = location else {
        return None;
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let location = location.clone();
    let spawned = std::thread::Builder::new()
        .name("waypost-listen".into())
        .spawn(move || listen_loop(&location, &tx, &stop));
    if let Err(e) = spawned {
        tracing::error!(error = %e, "could not start the config listener; changes made on other replicas reach this one's instances only when they reconnect");
        return None;
    }
    Some(rx)
}

fn listen_loop(location: &Location, tx: &mpsc::UnboundedSender<Reload>, stop: &AtomicBool) {
    let mut failing = false;
    while !stop.load(Ordering::Relaxed) && !tx.is_closed() {
        let db = match store::connect(location)
            .and_then(|db| store::listen(&db, store::CONFIG_CHANNEL).map(|_| db))
        {
            Ok(db) => db,
            Err(e) => {
                if !failing {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "config listener: cannot reach the database; retrying"
                    );
                    failing = true;
                }
                std::thread::sleep(RECONNECT_AFTER);
                continue;
            }
        };
        if failing {
            tracing::info!("config listener: connected again");
            failing = false;
        }
        // Whatever was announced while not listening is lost: reload everything once.
        if tx.send(Reload::All).is_err() {
            return;
        }
        while !stop.load(Ordering::Relaxed) {
            match store::wait_notifications(&db, WAIT) {
                Ok(apps) => {
                    for app in apps {
                        if tx.send(Reload::App(app)).is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "config listener: connection lost; reconnecting"
                    );
                    failing = true;
                    std::thread::sleep(RECONNECT_AFTER);
                    break;
                }
            }
        }
    }
}
