//! `waypost up`, with the real entrypoint binary, and the demo app.

use crate::common::*;
use std::path::PathBuf;

fn entrypoint_or_skip(test: &str) -> Option<PathBuf> {
    let bin = entrypoint_bin();
    if bin.is_none() {
        eprintln!(
            "\n!!! SKIPPING {test}: no entrypoint binary (set WAYPOST_ENTRYPOINT_BIN or build \
             target/debug/waypost-entrypoint) !!!\n"
        );
    }
    bin
}

#[test]
fn up_runs_cmd_and_exits_with_its_code() {
    let Some(ep) = entrypoint_or_skip("up_runs_cmd_and_exits_with_its_code") else {
        return;
    };
    let server = Server::start(&[]);
    let out = server
        .env
        .command()
        .args(["up", "--app", "quick", "--entrypoint-binary"])
        .arg(&ep)
        .args(["--", "sh", "-c", "echo from-the-app; exit 3"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "stderr: {stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("from-the-app"));
    assert!(stderr.contains("waypost instances --app quick"), "{stderr}");
    // The app was created (and a second `up` reuses it).
    let apps = server.cli(&["app", "list", "-o", "json"]).ok().json();
    assert!(
        apps["apps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["name"] == "quick")
    );
    let out = server
        .env
        .command()
        .args(["up", "--app", "quick", "--entrypoint-binary"])
        .arg(&ep)
        .args(["--", "true"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn up_delivers_sigterm_to_the_app() {
    let Some(ep) = entrypoint_or_skip("up_delivers_sigterm_to_the_app") else {
        return;
    };
    let server = Server::start(&[]);
    let marker = server.env.root.path().join("app-started");
    let script = format!(
        "trap 'echo got-term; exit 42' TERM; touch {}; sleep 60 & wait",
        marker.display()
    );
    let up = server
        .env
        .command()
        .args(["up", "--app", "sig", "--entrypoint-binary"])
        .arg(&ep)
        .args(["--", "sh", "-c", &script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the app to start", || marker.exists().then_some(()));
    // SAFETY: kill(2) on our own unreaped child (`waypost up`, now the entrypoint itself).
    unsafe { libc::kill(up.id() as i32, libc::SIGTERM) };
    let out = up.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(42),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Exactly once: the app's trap ran one time.
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .matches("got-term")
            .count(),
        1
    );
}

/// Kills the server `waypost up` started in the background (found through server.json).
struct KillOnDrop(PathBuf);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(text) = std::fs::read_to_string(self.0.join("server.json")) {
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            if let Some(pid) = v["pid"].as_i64() {
                // SAFETY: kill(2) with a pid read from the server we started.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
}

#[test]
fn up_starts_a_server_when_none_answers() {
    let Some(ep) = entrypoint_or_skip("up_starts_a_server_when_none_answers") else {
        return;
    };
    let env = Env::new();
    let data = env.data_dir();
    let _guard = KillOnDrop(data.clone());
    // The directory name becomes the app name.
    let project = env.root.path().join("My Project");
    std::fs::create_dir(&project).unwrap();
    let mut up = env.command();
    // `up` has no --database: the server it starts takes the database from the environment.
    if let Some(url) = env.database_url() {
        up.env("WAYPOST_DATABASE_URL", url);
    }
    let out = up
        .current_dir(&project)
        .args([
            "up",
            "--control-addr",
            "127.0.0.1:0",
            "--api-addr",
            "127.0.0.1:0",
            "--ingress-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(&data)
        .arg("--entrypoint-binary")
        .arg(&ep)
        .args(["--", "sh", "-c", "exit 7"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "stderr: {stderr}");
    assert!(stderr.contains("started a server"), "{stderr}");
    assert!(data.join("server.log").exists());
    assert_eq!(
        data.join("waypost.db").exists(),
        env.database_url().is_none(),
        "SQLite in the data dir only without a database URL"
    );

    // The server keeps running after `up` exits, and the CLI finds it through the context.
    let apps = Run::from_output(
        env.command()
            .args(["app", "list", "-o", "json"])
            .output()
            .unwrap(),
    )
    .ok()
    .json();
    assert!(
        apps["apps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["name"] == "my-project"),
        "{apps}"
    );
}

#[test]
fn up_without_an_entrypoint_fails_clearly() {
    let env = Env::new();
    let out = env
        .command()
        .env("PATH", "/usr/bin:/bin")
        .args([
            "up",
            "--entrypoint-binary",
            "/nonexistent/waypost-entrypoint",
            "--",
            "true",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("--entrypoint-binary"), "{err}");
    assert!(!env.data_dir().exists(), "no server may be started");
}

#[test]
fn demo_app_serves_pages() {
    use std::io::{BufRead as _, Read as _, Write as _};
    let port = {
        // Reserve a free port, release it, hand it to the demo (PORT is how the entrypoint and
        // the URL service tell an app where to listen).
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut demo = std::process::Command::new(env!("CARGO_BIN_EXE_waypost-demo"))
        .env("PORT", port.to_string())
        .env("GREETING", "hi <there>")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stream = wait_for("the demo to listen", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    stream
        .write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut resp = String::new();
    stream.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("hi &lt;there&gt;"), "{resp}");
    let mut stdout = std::io::BufReader::new(demo.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "GET /hello 200");
    // SIGTERM: the demo dies of it (std has no signal handling; documented).
    // SAFETY: kill(2) on our own unreaped child.
    unsafe { libc::kill(demo.id() as i32, libc::SIGTERM) };
    let status = wait_for("the demo to exit", || demo.try_wait().unwrap());
    use std::os::unix::process::ExitStatusExt as _;
    assert_eq!(status.signal(), Some(libc::SIGTERM));
}
