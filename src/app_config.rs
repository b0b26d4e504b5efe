//! Application configuration from the server, sans-IO: which snapshot is in force, what a new
//! one means for the running child (nothing, a restart, a signal), and when (the splay).
//!
//! Rules (see docs/protocol.md): an identical snapshot changes nothing; changed env restarts the
//! child (its env is fixed at exec); changed files alone follow the app's policy — restart, a
//! signal, or nothing. Files are written before the child starts or is signalled. A restart or
//! signal waits a random delay within the splay, so a fleet never restarts at once. Variables named
//! `WAYPOST_*` configure the entrypoint itself (only `WAYPOST_LOG_LEVEL`, live) and are never
//! given to the child nor a reason to restart it.

use std::time::{Duration, Instant};
use waypost_proto::{Config, ConfigFile, on_change};

/// What the reactor must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Write these files (atomically, parents created, mode set) and remove the paths no longer
    /// configured, then report the outcome with [`ConfigCore::handle_applied`].
    Apply {
        version: u64,
        write: Vec<ConfigFile>,
        remove: Vec<String>,
    },
    /// Restart the child (the new env is in [`ConfigCore::child_env`]).
    Restart,
    /// Send this signal to the child.
    Signal(i32),
    /// The entrypoint's own log level changed.
    LogLevel(crate::logger::Level),
}

/// What the new snapshot does to a running child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    Restart,
    Signal(i32),
}

#[derive(Debug)]
struct Pending {
    config: Config,
    effect: Option<Effect>,
    at: Instant,
}

pub struct ConfigCore {
    /// The snapshot in force: files written, env given (or to be given) to the child.
    current: Option<Config>,
    /// A snapshot decided but waiting for its splay delay.
    pending: Option<Pending>,
    /// Snapshot being written by the reactor (between Step::Apply and handle_applied).
    applying: Option<(Config, Option<Effect>)>,
    steps: Vec<Step>,
    rng: u64,
}

/// The effective child environment of a snapshot: its variables minus the entrypoint's own.
fn child_vars(c: &Config) -> impl Iterator<Item = (&String, &String)> {
    c.env.iter().filter(|(k, _)| !k.starts_with("WAYPOST_"))
}

fn same_env(a: &Config, b: &Config) -> bool {
    child_vars(a).eq(child_vars(b))
}

/// The same files (path, mode, contents), in any order.
fn same_files(a: &[ConfigFile], b: &[ConfigFile]) -> bool {
    a.len() == b.len() && a.iter().all(|f| b.contains(f))
}

impl ConfigCore {
    pub fn new(seed: u64) -> ConfigCore {
        ConfigCore {
            current: None,
            pending: None,
            applying: None,
            steps: Vec::new(),
            rng: seed | 1,
        }
    }

    /// Version of the snapshot in force (0: none), for Hello and Status.
    pub fn version(&self) -> u64 {
        self.current.as_ref().map_or(0, |c| c.version)
    }

    /// The stop grace the server configured for restarts (`None`: WAYPOST_STOP_TIMEOUT).
    pub fn stop_grace(&self) -> Option<Duration> {
        self.current
            .as_ref()
            .map(|c| c.stop_grace_ms)
            .filter(|&ms| ms > 0)
            .map(|ms| Duration::from_millis(u64::from(ms)))
    }

    /// Variables the child gets on top of the container's environment.
    pub fn child_env(&self) -> impl Iterator<Item = (&String, &String)> {
        self.current.iter().flat_map(child_vars)
    }

    /// A snapshot arrived. `running`: whether a child is running now (else it only matters for
    /// the next start, and takes effect at once).
    pub fn handle_config(&mut self, config: Config, running: bool, now: Instant) {
        // What we compare against: the newest snapshot already decided on.
        let base = self
            .pending
            .as_ref()
            .map(|p| &p.config)
            .or(self.applying.as_ref().map(|a| &a.0))
            .or(self.current.as_ref());
        if base.is_some_and(|b| config.version <= b.version) {
            return; // old news (e.g. a resend after reconnect)
        }
        // A child that started without any config (fail-open) ran with an empty one.
        let empty = Config::default();
        let effect = if running {
            effect_of(self.current.as_ref().unwrap_or(&empty), &config)
        } else {
            None
        };
        let splay = Duration::from_millis(u64::from(config.restart_splay_ms));
        let delay = if effect.is_some() && !splay.is_zero() {
            Duration::from_millis(
                waypost_proto::rand::next(&mut self.rng) % splay.as_millis().max(1) as u64,
            )
        } else {
            Duration::ZERO
        };
        self.pending = Some(Pending {
            config,
            effect,
            at: now + delay,
        });
        if delay.is_zero() {
            self.apply_due(now);
        }
    }

    /// When a snapshot waiting for its splay delay is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.applying.is_some() {
            None
        } else {
            self.pending.as_ref().map(|p| p.at)
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.apply_due(now);
    }

    fn apply_due(&mut self, now: Instant) {
        if self.applying.is_some() || self.pending.as_ref().is_none_or(|p| p.at > now) {
            return;
        }
        let Pending { config, effect, .. } = self.pending.take().expect("checked above");
        let old: &[ConfigFile] = self.current.as_ref().map_or(&[], |c| &c.files);
        let write: Vec<ConfigFile> = config
            .files
            .iter()
            .filter(|f| !old.contains(f))
            .cloned()
            .collect();
        let remove: Vec<String> = old
            .iter()
            .filter(|o| !config.files.iter().any(|f| f.path == o.path))
            .map(|o| o.path.clone())
            .collect();
        if let Some(level) = config
            .env
            .get("WAYPOST_LOG_LEVEL")
            .and_then(|v| crate::logger::Level::parse(v))
        {
            let was = self
                .current
                .as_ref()
                .and_then(|c| c.env.get("WAYPOST_LOG_LEVEL"))
                .and_then(|v| crate::logger::Level::parse(v));
            if was != Some(level) {
                self.steps.push(Step::LogLevel(level));
            }
        }
        self.steps.push(Step::Apply {
            version: config.version,
            write,
            remove,
        });
        self.applying = Some((config, effect));
    }

    /// The reactor wrote (or failed to write) the files of the snapshot being applied. On
    /// success it is in force and the child is restarted or signalled as decided.
    pub fn handle_applied(&mut self, ok: bool) {
        let Some((config, effect)) = self.applying.take() else {
            return;
        };
        if !ok {
            // Keep the old snapshot in force; a later version will be tried afresh.
            return;
        }
        self.current = Some(config);
        match effect {
            Some(Effect::Restart) => self.steps.push(Step::Restart),
            Some(Effect::Signal(sig)) => self.steps.push(Step::Signal(sig)),
            None => {}
        }
    }

    pub fn poll_step(&mut self) -> Option<Step> {
        if self.steps.is_empty() {
            None
        } else {
            Some(self.steps.remove(0))
        }
    }
}

/// What replacing `cur` by `new` does to a running child.
fn effect_of(cur: &Config, new: &Config) -> Option<Effect> {
    let env_changed = !same_env(cur, new);
    let files_changed = !same_files(&cur.files, &new.files);
    let policy = new.on_change.clone().unwrap_or_default();
    match on_change::Action::try_from(policy.action).unwrap_or(on_change::Action::Restart) {
        on_change::Action::None => None,
        _ if env_changed => Some(Effect::Restart),
        on_change::Action::Restart if files_changed => Some(Effect::Restart),
        on_change::Action::Signal if files_changed => {
            match crate::sys::signals::from_name(&policy.signal) {
                Some(sig) => Some(Effect::Signal(sig)),
                None => {
                    crate::warn!(
                        "config policy names an unknown signal {:?}; restarting instead",
                        policy.signal
                    );
                    Some(Effect::Restart)
                }
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use waypost_proto::OnChange;

    fn cfg(
        version: u64,
        env: &[(&str, &str)],
        files: &[(&str, &str)],
        policy: on_change::Action,
        signal: &str,
        splay_ms: u32,
    ) -> Config {
        Config {
            version,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            files: files
                .iter()
                .map(|(p, c)| ConfigFile {
                    path: p.to_string(),
                    mode: 0o644,
                    contents: c.as_bytes().to_vec(),
                })
                .collect(),
            on_change: Some(OnChange {
                action: policy as i32,
                signal: signal.into(),
            }),
            stop_grace_ms: 0,
            restart_splay_ms: splay_ms,
        }
    }

    fn steps(c: &mut ConfigCore) -> Vec<Step> {
        std::iter::from_fn(|| c.poll_step()).collect()
    }

    /// Applies whatever is due and confirms the write.
    fn settle(c: &mut ConfigCore) -> Vec<Step> {
        let mut out = steps(c);
        if out.iter().any(|s| matches!(s, Step::Apply { .. })) {
            c.handle_applied(true);
            out.extend(steps(c));
        }
        out
    }

    use on_change::Action::{None as Nothing, Restart, Signal};

    #[test]
    fn first_snapshot_before_start_applies_at_once() {
        let t0 = Instant::now();
        let mut c = ConfigCore::new(1);
        c.handle_config(
            cfg(
                1,
                &[("A", "1"), ("WAYPOST_LOG_LEVEL", "info")],
                &[("/etc/a", "x")],
                Restart,
                "",
                10_000,
            ),
            false,
            t0,
        );
        let s = settle(&mut c);
        assert_eq!(s[0], Step::LogLevel(crate::logger::Level::Info));
        assert!(
            matches!(&s[1], Step::Apply { version: 1, write, remove } if write.len() == 1 && remove.is_empty())
        );
        assert_eq!(
            s.len(),
            2,
            "no restart: nothing runs yet; no splay before the first start"
        );
        assert_eq!(c.version(), 1);
        let env: Vec<_> = c.child_env().collect();
        assert_eq!(
            env,
            [(&"A".to_string(), &"1".to_string())],
            "WAYPOST_* stays with the entrypoint"
        );
    }

    #[test]
    fn first_config_after_a_fail_open_start_restarts_the_child() {
        let t0 = Instant::now();
        let mut c = ConfigCore::new(1);
        // The child started without config (server unreachable); now the first one arrives.
        c.handle_config(cfg(1, &[("A", "1")], &[], Restart, "", 0), true, t0);
        assert_eq!(settle(&mut c).last(), Some(&Step::Restart));
        // An empty first config changes nothing for a running child.
        let mut c = ConfigCore::new(1);
        c.handle_config(cfg(1, &[], &[], Restart, "", 0), true, t0);
        assert!(!settle(&mut c).contains(&Step::Restart));
    }

    #[test]
    fn identical_snapshot_changes_nothing() {
        let t0 = Instant::now();
        let mut c = ConfigCore::new(1);
        c.handle_config(
            cfg(1, &[("A", "1")], &[("/etc/a", "x")], Restart, "", 0),
            false,
            t0,
        );
        settle(&mut c);
        c.handle_config(
            cfg(2, &[("A", "1")], &[("/etc/a", "x")], Restart, "", 0),
            true,
            t0,
        );
        let s = settle(&mut c);
        assert_eq!(
            s,
            [Step::Apply {
                version: 2,
                write: vec![],
                remove: vec![]
            }],
            "acked, nothing written, no restart"
        );
        assert_eq!(c.version(), 2);
        // Old or repeated versions are ignored entirely.
        c.handle_config(cfg(2, &[("A", "9")], &[], Restart, "", 0), true, t0);
        c.handle_config(cfg(1, &[("A", "9")], &[], Restart, "", 0), true, t0);
        assert_eq!(settle(&mut c), []);
    }

    #[test]
    fn env_change_restarts_whatever_the_file_policy() {
        for policy in [Restart, Signal] {
            let t0 = Instant::now();
            let mut c = ConfigCore::new(1);
            c.handle_config(cfg(1, &[("A", "1")], &[], policy, "HUP", 0), false, t0);
            settle(&mut c);
            c.handle_config(cfg(2, &[("A", "2")], &[], policy, "HUP", 0), true, t0);
            let s = settle(&mut c);
            assert_eq!(s.last(), Some(&Step::Restart), "{policy:?}");
            assert_eq!(
                c.child_env().next(),
                Some((&"A".to_string(), &"2".to_string()))
            );
        }
    }

    #[test]
    fn files_only_follow_the_policy() {
        let t0 = Instant::now();
        for (policy, expect) in [
            (Restart, Some(Step::Restart)),
            (Signal, Some(Step::Signal(libc::SIGHUP))),
            (Nothing, None),
        ] {
            let mut c = ConfigCore::new(1);
            c.handle_config(
                cfg(
                    1,
                    &[("A", "1")],
                    &[("/etc/a", "x"), ("/etc/b", "y")],
                    policy,
                    "SIGHUP",
                    0,
                ),
                false,
                t0,
            );
            settle(&mut c);
            c.handle_config(
                cfg(
                    2,
                    &[("A", "1")],
                    &[("/etc/a", "changed")],
                    policy,
                    "SIGHUP",
                    0,
                ),
                true,
                t0,
            );
            let s = settle(&mut c);
            let Step::Apply { write, remove, .. } = &s[0] else {
                panic!("{s:?}")
            };
            assert_eq!(write.len(), 1);
            assert_eq!(write[0].contents, b"changed");
            assert_eq!(remove, &["/etc/b".to_string()]);
            assert_eq!(s.get(1).cloned(), expect, "{policy:?}");
        }
    }

    #[test]
    fn policy_none_keeps_the_child_and_uses_the_env_next_time() {
        let t0 = Instant::now();
        let mut c = ConfigCore::new(1);
        c.handle_config(cfg(1, &[("A", "1")], &[], Nothing, "", 0), false, t0);
        settle(&mut c);
        c.handle_config(cfg(2, &[("A", "2")], &[], Nothing, "", 0), true, t0);
        let s = settle(&mut c);
        assert_eq!(s.len(), 1, "applied, no restart: {s:?}");
        assert_eq!(c.child_env().next().unwrap().1, "2");
    }

    #[test]
    fn log_level_alone_is_no_reason_to_restart() {
        let t0 = Instant::now();
        let mut c = ConfigCore::new(1);
        c.handle_config(cfg(1, &[("A", "1")], &[], Restart, "", 0), false, t0);
        settle(&mut c);
        c.handle_config(
            cfg(
                2,
                &[("A", "1"), ("WAYPOST_LOG_LEVEL", "error")],
                &[],
                Restart,
                "",
                0,
            ),
            true,
            t0,
        );
        let s = settle(&mut c);
        assert_eq!(s[0], Step::LogLevel(crate::logger::Level::Error));
        assert!(!s.contains(&Step::Restart), "{s:?}");
    }

    #[test]
    fn splay_delays_within_its_bound_and_differs_between_instances() {
        let t0 = Instant::now();
        let mut delays = Vec::new();
        for seed in 1..=20u64 {
            let mut c = ConfigCore::new(seed * 7919);
            c.handle_config(cfg(1, &[("A", "1")], &[], Restart, "", 10_000), false, t0);
            settle(&mut c);
            c.handle_config(cfg(2, &[("A", "2")], &[], Restart, "", 10_000), true, t0);
            let at = c.poll_timeout().expect("a restart waits for its splay");
            assert!(at < t0 + Duration::from_secs(10));
            assert_eq!(steps(&mut c), [], "nothing before the delay");
            assert_eq!(c.version(), 1, "still the old version until applied");
            c.handle_timeout(at);
            assert_eq!(settle(&mut c).last(), Some(&Step::Restart));
            delays.push(at - t0);
        }
        delays.sort();
        delays.dedup();
        assert!(delays.len() > 10, "spread out: {delays:?}");
    }

    #[test]
    fn a_newer_snapshot_during_the_splay_replaces_the_pending_one() {
        let t0 = Instant::now();
        let mut c = ConfigCore::new(3);
        c.handle_config(cfg(1, &[("A", "1")], &[], Restart, "", 0), false, t0);
        settle(&mut c);
        c.handle_config(cfg(2, &[("A", "2")], &[], Restart, "", 60_000), true, t0);
        c.handle_config(cfg(3, &[("A", "1")], &[], Restart, "", 0), true, t0);
        // Back to what runs: applied at once, no restart.
        let s = settle(&mut c);
        assert_eq!(
            s,
            [Step::Apply {
                version: 3,
                write: vec![],
                remove: vec![]
            }]
        );
        assert_eq!(c.poll_timeout(), None);
    }

    #[test]
    fn failed_write_keeps_the_old_snapshot() {
        let t0 = Instant::now();
        let mut c = ConfigCore::new(3);
        c.handle_config(cfg(1, &[("A", "1")], &[], Restart, "", 0), false, t0);
        settle(&mut c);
        c.handle_config(
            cfg(2, &[("A", "2")], &[("/x", "y")], Restart, "", 0),
            true,
            t0,
        );
        assert!(matches!(steps(&mut c)[..], [Step::Apply { .. }]));
        c.handle_applied(false);
        assert_eq!(steps(&mut c), []);
        assert_eq!(c.version(), 1);
    }

    #[test]
    fn unknown_signal_falls_back_to_restart() {
        let t0 = Instant::now();
        let mut c = ConfigCore::new(3);
        c.handle_config(cfg(1, &[], &[("/a", "1")], Signal, "SIGNOPE", 0), false, t0);
        settle(&mut c);
        c.handle_config(cfg(2, &[], &[("/a", "2")], Signal, "SIGNOPE", 0), true, t0);
        assert_eq!(settle(&mut c).last(), Some(&Step::Restart));
    }
}
