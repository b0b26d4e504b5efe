//! `server members` and `server run --peer-addr`: replica membership against real server
//! processes.

use crate::common::*;

/// `--peer-addr` binds a listener there: port 0 takes a free port, advertised with the port bound.
const PEER: &str = "127.0.0.1:0";

/// The peer address `m` advertises: PEER's host with the port actually bound.
fn bound_peer_addr(m: &serde_json::Value, host: &str) -> String {
    let addr = m["peer_addr"].as_str().unwrap_or_else(|| panic!("{m}"));
    let port = addr
        .strip_prefix(host)
        .and_then(|p| p.strip_prefix(':'))
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or_else(|| panic!("{addr} is not {host}:PORT"));
    assert_ne!(port, 0, "the bound port is advertised, not 0");
    addr.to_string()
}

fn members(server: &Server) -> Vec<serde_json::Value> {
    let v = server.cli(&["server", "members", "-o", "json"]).ok().json();
    v["members"].as_array().expect("members array").clone()
}

/// The one member this server is (`self`).
fn me(server: &Server) -> serde_json::Value {
    let all = members(server);
    let mine: Vec<_> = all.iter().filter(|m| m["self"] == true).collect();
    assert_eq!(mine.len(), 1, "{all:?}");
    mine[0].clone()
}

#[tokio::test]
async fn a_server_lists_itself_with_its_peer_addr_and_instances() {
    let server = Server::start(&["--peer-addr", PEER]);
    let list = members(&server);
    assert_eq!(list.len(), 1, "{list:?}");
    let m = &list[0];
    assert_eq!(m["self"], true);
    let peer = bound_peer_addr(m, "127.0.0.1");
    assert_eq!(m["state"], "up");
    assert_eq!(m["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(m["instances"], 0);
    assert!(m["id"].as_str().is_some_and(|id| id.len() == 16), "{m}");

    let token = server.entrypoint_token("web", None);
    let (conn, _) = Fake::welcomed(&server, &token, &new_id()).await;
    wait_for("the instance to be counted", || {
        (me(&server)["instances"] == 1).then_some(())
    });
    drop(conn);
    wait_for("the instance to be uncounted", || {
        (me(&server)["instances"] == 0).then_some(())
    });

    // The table names the same things.
    let table = server.cli(&["server", "members"]).ok().stdout;
    assert!(
        table.contains("PEER ADDRESS") && table.contains(&peer),
        "{table}"
    );
    assert!(table.contains("(this)") && table.contains(" up"), "{table}");
}

#[test]
fn without_peer_addr_a_replica_has_none() {
    let server = Server::start(&[]);
    let m = me(&server);
    assert!(m["peer_addr"].is_null(), "{m}");
    let table = server.cli(&["server", "members"]).ok().stdout;
    assert!(
        table.lines().nth(1).is_some_and(|l| l.contains(" - ")),
        "{table}"
    );
}

#[test]
fn a_restart_replaces_the_replica_and_a_crashed_one_goes_stale() {
    let server = Server::start(&["--peer-addr", PEER]);
    let first = me(&server)["id"].clone();
    // A clean shutdown removes the row.
    let (code, env) = server.terminate();
    assert_eq!(code, Some(0));
    let server = Server::start_in(env, &["--peer-addr", PEER]);
    let list = members(&server);
    assert_eq!(list.len(), 1, "the old row is gone: {list:?}");
    let second = list[0]["id"].clone();
    let second_peer = bound_peer_addr(&list[0], "127.0.0.1");
    assert_ne!(second, first, "a new id per start");
    assert_eq!(list[0]["state"], "up");

    // A crash leaves the row behind; it turns stale once its heartbeats stop, while the new
    // replica stays up.
    let env = server.kill();
    let server = Server::start_in(env, &[]);
    let third = me(&server)["id"].clone();
    let crashed = wait_for("the crashed replica to turn stale", || {
        let list = members(&server);
        assert_eq!(list.len(), 2, "{list:?}");
        list.into_iter()
            .find(|m| m["id"] == second && m["state"] == "stale")
    });
    assert_eq!(crashed["self"], false);
    assert_eq!(crashed["peer_addr"], second_peer.as_str());
    let now = me(&server);
    assert_eq!(
        (now["id"].clone(), now["state"].clone()),
        (third, "up".into())
    );
}

#[test]
fn a_malformed_peer_addr_is_refused() {
    for bad in ["127.0.0.1", "127.0.0.1:65536", "::1:80", "bad host:80"] {
        let env = Env::new();
        let out = Run::from_output(
            env.command()
                .args(["server", "run", "--data-dir"])
                .arg(env.data_dir())
                .args(["--control-addr", "127.0.0.1:0", "--api-addr", "127.0.0.1:0"])
                .args(["--ingress-addr", "127.0.0.1:0", "--peer-addr", bad])
                .args(["--metrics-addr", "off"])
                .output()
                .unwrap(),
        );
        assert_ne!(out.code, Some(0), "{bad}: {}", out.stdout);
        assert!(
            out.stderr.contains("--peer-addr") && out.stderr.contains("HOST:PORT"),
            "{bad}: {}",
            out.stderr
        );
        assert!(!env.data_dir().exists(), "{bad}: refused before starting");
    }
    // Negative control: the same command with a good address starts; an IPv6 one (brackets)
    // where this machine has IPv6 loopback, else IPv4.
    let host = if std::net::TcpListener::bind("[::1]:0").is_ok() {
        "[::1]"
    } else {
        "127.0.0.1"
    };
    let server = Server::start(&["--peer-addr", &format!("{host}:0")]);
    bound_peer_addr(&me(&server), host);
}
