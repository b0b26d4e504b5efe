//! Config across replicas: two real `waypost server run` processes on one PostgreSQL database (a
//! throwaway cluster per test), a real etcd as a config source, and the real entrypoint with an
//! instance on each replica. Each replica follows the source itself (values are never stored), so
//! what is checked is that every instance ends up with the same values, restarted once per real
//! change — whichever replica holds it and whichever replica the operator talks to.

use crate::common::entrypoint::{Builder, Entrypoint};
use crate::common::{Env, Server, wait_for};
use std::time::Duration;
use waypost_testkit::etcd::Etcd;
use waypost_testkit::pg::Cluster;

const FLAGS: &[&str] = &[
    "--heartbeat-interval",
    "300ms",
    "--peer-addr",
    "127.0.0.1:0",
];

/// The child: one line per start with the values it got.
const RECORDER: &str = r#"printf '%s|%s|%s\n' "${COLOR-unset}" "${GREETING-unset}" "${SIZE-unset}" >> "$D/starts"; exec sleep 1000"#;

fn starts(e: &Entrypoint) -> Vec<String> {
    e.file("starts")
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Waits until `e`'s latest start saw `want`, and returns how many starts it has had.
fn wait_start(e: &Entrypoint, want: &str) -> usize {
    wait_for(
        &format!(
            "a start with {want} (starts: {:?})\n{}",
            starts(e),
            e.stderr()
        ),
        || {
            let s = starts(e);
            (s.last().map(String::as_str) == Some(want)).then_some(s.len())
        },
    )
}

/// Nothing more happens to `e` for a while: still `n` starts.
fn settled(e: &Entrypoint, n: usize) {
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(starts(e).len(), n, "no further restart: {:?}", starts(e));
}

#[test]
fn every_replica_follows_the_source_and_instances_restart_once_per_change() {
    let pg = Cluster::start();
    let url = pg.create_database();
    let a = Server::start_in(Env::with_database(&url), FLAGS);
    let b = Server::start_in(Env::with_database(&url), FLAGS);
    let etcd = Etcd::start();
    etcd.put("/config/web/color", "red");

    // The source is added through A; B learns of it (a dynamic variable set through B uses it).
    a.cli(&[
        "config",
        "source",
        "set",
        "kv",
        "--kind",
        "etcd",
        "--addr",
        &etcd.addr,
        "--refresh",
        "60s",
    ])
    .ok();
    let token = a.entrypoint_token("web", None);
    a.cli(&["config", "policy", "-a", "web", "--splay", "0"])
        .ok();
    wait_for("B to know the source", || {
        let r = b.cli(&[
            "config",
            "set",
            "-a",
            "web",
            "--dynamic",
            "COLOR=kv:/config/web/color",
        ]);
        (r.code == Some(0)).then_some(())
    });

    let Some(on_a) = Builder::with_token(&a, &token, RECORDER)
        .env("WAYPOST_STARTUP_TIMEOUT", "20s")
        .spawn()
    else {
        return;
    };
    let Some(on_b) = Builder::with_token(&b, &token, RECORDER)
        .env("WAYPOST_STARTUP_TIMEOUT", "20s")
        .spawn()
    else {
        return;
    };
    for e in [&on_a, &on_b] {
        assert_eq!(
            wait_start(e, "red|unset|unset"),
            1,
            "{:?}\n{}",
            starts(e),
            e.stderr()
        );
    }
    assert_ne!(
        on_a.instance(&a)["replica"],
        on_b.instance(&a)["replica"],
        "one instance on each replica"
    );

    // A put: each replica's watch sees it; each instance restarts once.
    etcd.put("/config/web/color", "blue");
    assert_eq!(wait_start(&on_a, "blue|unset|unset"), 2);
    assert_eq!(wait_start(&on_b, "blue|unset|unset"), 2);
    settled(&on_a, 2);
    settled(&on_b, 2);

    // A static change through B and a global one through A reach both, with the current dynamic
    // value (never an older one), once each.
    b.cli(&["config", "set", "-a", "web", "SIZE=large"]).ok();
    assert_eq!(wait_start(&on_a, "blue|unset|large"), 3);
    assert_eq!(wait_start(&on_b, "blue|unset|large"), 3);
    a.cli(&["config", "set", "--global", "GREETING=hi"]).ok();
    assert_eq!(wait_start(&on_a, "blue|hi|large"), 4);
    assert_eq!(wait_start(&on_b, "blue|hi|large"), 4);
    settled(&on_a, 4);
    settled(&on_b, 4);

    // The same value written again changes nothing anywhere.
    etcd.put("/config/web/color", "blue");
    settled(&on_a, 4);
    settled(&on_b, 4);

    // Both replicas list the value as current, and neither stored it.
    for s in [&a, &b] {
        let v = s
            .cli(&["config", "list", "-a", "web", "-o", "json"])
            .ok()
            .json();
        let color = v["entries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["key"] == "COLOR")
            .cloned()
            .unwrap();
        assert_eq!(color["status"], "ok", "{color}");
        assert!(
            color["value"].is_null(),
            "never shown in a listing: {color}"
        );
    }
    let stored = Env::with_database(&url)
        .query("SELECT count(*) FROM config_scopes WHERE doc LIKE '%blue%'")
        .unwrap();
    assert_eq!(
        stored.as_deref(),
        Some("0"),
        "the value is not in the database"
    );
    drop(pg);
}
