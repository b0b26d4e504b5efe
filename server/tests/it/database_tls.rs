//! TLS to PostgreSQL (`--database postgres://…?sslmode=require`, `WAYPOST_DATABASE_CA`): a real
//! cluster with `ssl = on` and a certificate made here with `openssl`, a real server process.
//! The server's connections are encrypted (checked in `pg_stat_ssl`); a certificate from another
//! CA, a certificate for another name, and a cluster without TLS are each refused at start with
//! an error that says why.

use crate::common::{Env, Run, Server};
use std::path::Path;
use std::process::Command;
use waypost_testkit::pg::Cluster;

/// Makes a CA and a server certificate for `san` (e.g. `IP:127.0.0.1`) signed by it, in `dir`:
/// `{name}-ca.pem`, `{name}-server.crt`, `{name}-server.key`. None if openssl is missing.
fn make_certs(dir: &Path, name: &str, san: &str) -> Option<()> {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .ok()?;
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(())
    };
    let (ca_key, ca) = (format!("{name}-ca.key"), format!("{name}-ca.pem"));
    let (key, csr, crt) = (
        format!("{name}-server.key"),
        format!("{name}-server.csr"),
        format!("{name}-server.crt"),
    );
    run(&[
        "ecparam",
        "-genkey",
        "-name",
        "prime256v1",
        "-noout",
        "-out",
        &ca_key,
    ])?;
    run(&[
        "req",
        "-x509",
        "-new",
        "-key",
        &ca_key,
        "-subj",
        "/CN=test database CA",
        "-days",
        "2",
        "-out",
        &ca,
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
    ])?;
    run(&[
        "ecparam",
        "-genkey",
        "-name",
        "prime256v1",
        "-noout",
        "-out",
        &key,
    ])?;
    run(&[
        "req",
        "-new",
        "-key",
        &key,
        "-subj",
        "/CN=database",
        "-out",
        &csr,
    ])?;
    std::fs::write(
        dir.join(format!("{name}.ext")),
        format!("subjectAltName={san}\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n"),
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &ca,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-days",
        "2",
        "-out",
        &crt,
        "-extfile",
        &format!("{name}.ext"),
    ])?;
    Some(())
}

/// Turns TLS on in `cluster` with the certificate `name` made by [`make_certs`].
fn enable_tls(cluster: &Cluster, certs: &Path, name: &str) {
    let data = cluster.data_dir();
    for (from, to) in [("server.crt", "server.crt"), ("server.key", "server.key")] {
        let dst = data.join(to);
        std::fs::copy(certs.join(format!("{name}-{from}")), &dst).unwrap();
        if let Some(user) = cluster.os_user() {
            assert!(
                Command::new("chown")
                    .arg(user)
                    .arg(&dst)
                    .status()
                    .unwrap()
                    .success()
            );
        }
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    psql(cluster, &cluster.url(), "ALTER SYSTEM SET ssl = 'on'");
    psql(cluster, &cluster.url(), "SELECT pg_reload_conf()");
}

fn psql(cluster: &Cluster, url: &str, sql: &str) -> String {
    let out = Command::new(cluster.bin_dir().join("psql"))
        .args([
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            url,
            "-c",
            sql,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `server run` on `url` with `WAYPOST_DATABASE_CA=ca`, expected to fail at start: its output.
fn refused_start(url: &str, ca: &Path) -> Run {
    let mut env = Env::with_database(url);
    env.set_var("WAYPOST_DATABASE_CA", ca);
    let out = Run::from_output(
        env.command()
            .args(["server", "run", "--data-dir"])
            .arg(env.data_dir())
            .args(["--control-addr", "127.0.0.1:0", "--api-addr", "127.0.0.1:0"])
            .args(["--ingress-addr", "127.0.0.1:0", "--database", url])
            .args(["--metrics-addr", "off"])
            .output()
            .unwrap(),
    );
    assert_ne!(out.code, Some(0), "started: {}", out.stdout);
    out
}

#[test]
fn the_database_connection_is_encrypted_and_verified() {
    let cluster = Cluster::start();
    let certs = tempfile::tempdir().unwrap();
    if make_certs(certs.path(), "good", "IP:127.0.0.1").is_none()
        || make_certs(certs.path(), "other", "IP:127.0.0.1").is_none()
    {
        eprintln!("SKIPPED: openssl is not installed");
        return;
    }
    let plain_url = cluster.create_database();

    // Without TLS on the cluster, sslmode=require refuses to start (and says so).
    let require = format!("{plain_url}?sslmode=require");
    let out = refused_start(&require, &certs.path().join("good-ca.pem"));
    assert!(
        out.stderr.contains("TLS") || out.stderr.contains("SSL"),
        "{}",
        out.stderr
    );

    enable_tls(&cluster, certs.path(), "good");
    let good_ca = certs.path().join("good-ca.pem");

    // The right CA: the server runs, and every connection it holds is encrypted.
    let mut env = Env::with_database(&plain_url);
    env.set_var("WAYPOST_DATABASE_CA", &good_ca);
    let server = Server::start_in(env, &["--database", &require]);
    server.create_app("web");
    let apps = server.cli(&["app", "list", "-o", "json"]).ok().json();
    assert_eq!(apps["apps"][0]["name"], "web");
    let counts = psql(
        &cluster,
        &cluster.url(),
        "SELECT count(*) FILTER (WHERE s.ssl), count(*) FROM pg_stat_ssl s
         JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'waypost'",
    );
    let (tls, all) = counts.split_once('|').unwrap();
    assert!(
        all.parse::<u32>().unwrap() >= 4,
        "the server's pool: {counts}"
    );
    assert_eq!(tls, all, "every connection of the server is TLS: {counts}");
    drop(server);

    // Another CA's certificate: refused, naming the certificate problem.
    let other_ca = certs.path().join("other-ca.pem");
    let out = refused_start(&require, &other_ca);
    assert!(out.stderr.contains("certificate"), "{}", out.stderr);
    // A name the certificate does not carry (it is for 127.0.0.1, not localhost).
    let by_name = require.replace("127.0.0.1", "localhost");
    let out = refused_start(&by_name, &good_ca);
    assert!(out.stderr.contains("certificate"), "{}", out.stderr);
    // A CA file that holds no certificate is a clear error, not a silent fallback.
    let empty = certs.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let out = refused_start(&require, &empty);
    assert!(out.stderr.contains("WAYPOST_DATABASE_CA"), "{}", out.stderr);
}
