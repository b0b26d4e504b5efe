//! URL access control for the ingress: each app's rules (model/urlauth.rs) cached in memory,
//! dropped when they change (here, or on another replica: store/urlauth.rs announces it), and a
//! cache of `Authorization` headers already verified, so the slow password hash runs once per
//! credential rather than once per request. Password checks run on the blocking pool, at most
//! [`MAX_VERIFYING`] at once, so a flood of wrong passwords costs bounded CPU.

use crate::server::model::urlauth::{Decision, UrlAuth};
use crate::server::store::{self, Store};
use anyhow::Result;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a verified header is trusted without hashing it again.
const VERIFIED_FOR: Duration = Duration::from_secs(300);
/// Most verified headers remembered (all apps); beyond, the oldest are forgotten.
const MAX_VERIFIED: usize = 4096;
/// Password checks running at once.
const MAX_VERIFYING: usize = 2;

type Key = (String, [u8; 32]);

pub struct UrlAuthService {
    store: Store,
    rules: Mutex<HashMap<String, Arc<UrlAuth>>>,
    verified: Mutex<HashMap<Key, Instant>>,
    verifying: tokio::sync::Semaphore,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn key(app: &str, header: &str) -> Key {
    let d = ring::digest::digest(&ring::digest::SHA256, header.as_bytes());
    let mut k = [0u8; 32];
    k.copy_from_slice(d.as_ref());
    (app.to_string(), k)
}

impl UrlAuthService {
    pub fn new(store: Store) -> UrlAuthService {
        UrlAuthService {
            store,
            rules: Default::default(),
            verified: Default::default(),
            verifying: tokio::sync::Semaphore::new(MAX_VERIFYING),
        }
    }

    /// The app's rules (cached).
    pub async fn rules(&self, app: &str) -> Result<Arc<UrlAuth>> {
        if let Some(r) = lock(&self.rules).get(app) {
            return Ok(r.clone());
        }
        let name = app.to_string();
        let r = Arc::new(
            self.store
                .call(move |db| store::urlauth::get(db, &name))
                .await?,
        );
        lock(&self.rules).insert(app.to_string(), r.clone());
        Ok(r)
    }

    /// The app's rules changed (here or on another replica): forget them and the headers
    /// verified against them.
    pub fn invalidate(&self, app: &str) {
        lock(&self.rules).remove(app);
        lock(&self.verified).retain(|(a, _), _| a != app);
    }

    /// Every app's rules may have changed (notifications were missed): forget them all.
    pub fn invalidate_all(&self) {
        lock(&self.rules).clear();
        lock(&self.verified).clear();
    }

    /// What the ingress does with a request for `app` from `peer`.
    pub async fn decide(
        &self,
        app: &str,
        peer: IpAddr,
        authorization: Option<&str>,
    ) -> Result<Decision> {
        let rules = self.rules(app).await?;
        if rules.is_open() {
            return Ok(Decision::Allow { strip: false });
        }
        let now = Instant::now();
        let known = |h: &str| {
            lock(&self.verified)
                .get(&key(app, h))
                .is_some_and(|t| now.duration_since(*t) < VERIFIED_FOR)
        };
        // Fast answers first: a network refusal, no header, or a header verified before.
        let quick = rules.decide(peer, authorization, &|h| known(h));
        let needs_hash = matches!(quick, Decision::Unauthorized(_))
            && authorization.is_some_and(|h| {
                h.trim_start()
                    .get(..6)
                    .is_some_and(|s| s.eq_ignore_ascii_case("basic "))
            });
        let decision = if needs_hash {
            let _permit = self.verifying.acquire().await?;
            let (rules, header) = (rules.clone(), authorization.map(str::to_string));
            tokio::task::spawn_blocking(move || rules.decide(peer, header.as_deref(), &|_| false))
                .await?
        } else {
            quick
        };
        if let (Decision::Allow { strip: true }, Some(h)) = (&decision, authorization) {
            let mut v = lock(&self.verified);
            if v.len() >= MAX_VERIFIED {
                v.retain(|_, t| now.duration_since(*t) < VERIFIED_FOR);
                if v.len() >= MAX_VERIFIED {
                    v.clear();
                }
            }
            v.entry(key(app, h)).or_insert(now);
        }
        Ok(decision)
    }

    /// Changes the app's rules (see store/urlauth.rs `update`) and drops the cached copy.
    pub async fn update<R: Send + 'static>(
        &self,
        app: &str,
        f: impl FnOnce(&mut UrlAuth) -> Result<R, String> + Send + 'static,
    ) -> Result<Result<(UrlAuth, R), String>> {
        let name = app.to_string();
        let r = self
            .store
            .call(move |db| store::urlauth::update(db, &name, f))
            .await?;
        self.invalidate(app);
        Ok(r)
    }
}
