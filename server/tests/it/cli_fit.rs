//! The CLI fitting the hand (issue #19): shell completion, man pages, `app delete`,
//! `instances -w`, `WAYPOST_ADDR=https://…`, NO_COLOR and the note on an empty `logs` — against a
//! real server (and the real entrypoint where an instance is needed).

use crate::common::entrypoint::Builder;
use crate::common::*;
use std::io::Read as _;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// An app that says hello and stays up.
const HELLO: &str = r#"echo "hello from the app"; while [ ! -e "$D/stop" ]; do sleep 0.05; done"#;

#[test]
fn completion_scripts_load_in_bash_and_name_the_commands() {
    let script = format!(
        "source <('{}' completion bash) && complete -p waypost",
        waypost_bin()
    );
    let out = Command::new("bash").args(["-c", &script]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("complete ") && stdout.trim_end().ends_with(" waypost"),
        "{stdout}"
    );
    for shell in ["zsh", "fish"] {
        let out = Command::new(waypost_bin())
            .args(["completion", shell])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && !text.is_empty(), "{shell}: {text}");
        for cmd in ["instances", "config", "completion", "delete"] {
            assert!(text.contains(cmd), "{shell} script lacks {cmd}");
        }
        assert!(
            !text.contains("__man"),
            "{shell}: hidden commands are not offered"
        );
    }
    let bad = Command::new(waypost_bin())
        .args(["completion", "tcsh"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("bash, zsh, fish"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

#[test]
fn man_pages_are_generated_per_command_and_render() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("man");
    let r = Command::new(waypost_bin())
        .arg("__man")
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    for page in [
        "waypost.1",
        "waypost-config.1",
        "waypost-app-delete.1",
        "waypost-logs.1",
    ] {
        let text =
            std::fs::read_to_string(out_dir.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        for section in [".TH ", ".SH NAME", ".SH SYNOPSIS"] {
            assert!(text.contains(section), "{page} lacks {section}");
        }
    }
    // Rendered by man itself where it is installed (Debian: man-db with groff).
    let Ok(man) = Command::new("man").arg("--version").output() else {
        eprintln!("SKIPPED rendering: no `man` on PATH");
        return;
    };
    assert!(man.status.success());
    let r = Command::new("man")
        .arg("-l")
        .arg(out_dir.join("waypost-app-delete.1"))
        .env("MANPAGER", "cat")
        .env("PAGER", "cat")
        .env("MANWIDTH", "100")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(
        r.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&r.stderr)
    );
    // Formatted (no roff requests left), with the flag and its help.
    assert!(text.contains("NAME") && text.contains("SYNOPSIS"), "{text}");
    assert!(text.contains("--force") && text.contains("live"), "{text}");
    assert!(!text.contains(".SH"), "{text}");
}

/// The list under `key` in the JSON that `waypost ARGS` prints.
fn rows(server: &Server, args: &[&str], key: &str) -> Vec<serde_json::Value> {
    server.cli(args).ok().json()[key]
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn app_delete_refuses_while_live_then_force_disconnects_and_a_new_app_starts_empty() {
    let server = Server::start(&["--heartbeat-interval", "300ms"]);
    server.create_app("web");
    server.create_app("other");
    let token = server.entrypoint_token("web", None);
    server
        .cli(&["config", "set", "--app", "web", "FOO=secret-of-the-old-app"])
        .ok();
    server
        .cli(&["app", "set", "web", "--log-lines", "1000"])
        .ok();
    let Some(ep) = Builder::with_token(&server, &token, HELLO).spawn() else {
        return;
    };
    let inst = ep.instance(&server);
    wait_for("the app's line in the logs", || {
        server
            .cli(&["logs", "--app", "web"])
            .ok()
            .stdout
            .contains("hello from the app")
            .then_some(())
    });

    // Refused while live: says how many and how to force it; nothing is deleted.
    let refused = server.cli(&["app", "delete", "web"]).fails();
    assert!(
        refused.stderr.contains("1 live instance") && refused.stderr.contains("--force"),
        "{}",
        refused.stderr
    );
    assert!(server.instance_is_live(&inst));
    assert!(
        server
            .cli(&["logs", "--app", "web"])
            .ok()
            .stdout
            .contains("hello")
    );

    // Forced: the connection is closed (as for a revoked token), and the app is gone.
    let done = server.cli(&["app", "delete", "web", "--force"]).ok();
    assert!(
        done.stdout.contains("deleted app web")
            && done.stdout.contains("disconnected 1 live instance"),
        "{}",
        done.stdout
    );
    wait_for("the entrypoint to be told", || {
        ep.stderr().contains("token revoked").then_some(())
    });
    let apps = rows(&server, &["app", "list", "-o", "json"], "apps");
    assert!(apps.iter().all(|a| a["name"] != "web"), "{apps:?}");
    assert!(apps.iter().any(|a| a["name"] == "other"), "{apps:?}");
    let gone = server.cli(&["logs", "--app", "web"]).fails();
    assert!(gone.stderr.contains("no app named web"), "{}", gone.stderr);
    let gone = server.cli(&["config", "list", "--app", "web"]).fails();
    assert!(gone.stderr.contains("web"), "{}", gone.stderr);
    let tokens = rows(&server, &["token", "list", "-o", "json"], "tokens");
    assert!(tokens.iter().all(|t| t["app"] != "web"), "{tokens:?}");
    assert!(
        rows(&server, &["instances", "--all", "-o", "json"], "instances")
            .iter()
            .all(|i| i["app"] != "web")
    );
    // Its token no longer connects: the entrypoint's reconnects are refused.
    wait_for("a refused reconnect", || {
        server.logs().contains("invalid token").then_some(())
    });
    let again = server.cli(&["app", "delete", "web"]).fails();
    assert!(
        again.stderr.contains("no app named web"),
        "{}",
        again.stderr
    );

    // Created again under the same name: nothing of the old one comes back — and the old
    // token stays refused.
    server.create_app("web");
    let cfg = server
        .cli(&["config", "list", "--app", "web", "-o", "json"])
        .ok()
        .stdout;
    assert!(!cfg.contains("FOO") && !cfg.contains("secret"), "{cfg}");
    let value = server.cli(&["config", "get", "--app", "web", "FOO"]);
    assert_ne!(value.code, Some(0), "{}", value.stdout);
    let history = server
        .cli(&["config", "history", "--app", "web", "-o", "json"])
        .ok()
        .stdout;
    assert!(!history.contains("FOO"), "{history}");
    let logs = server.cli(&["logs", "--app", "web", "-o", "json"]).ok();
    assert_eq!(logs.stdout, "", "old logs came back");
    let stats = server
        .cli(&["logs", "--app", "web", "--stats", "-o", "json"])
        .ok()
        .json();
    assert_eq!(stats["usage"]["lines"], 0, "{stats}");
    assert_eq!(stats["retention"]["max_lines"], 2_000_000, "{stats}");
    assert!(
        rows(
            &server,
            &["token", "list", "--app", "web", "-o", "json"],
            "tokens"
        )
        .is_empty()
    );
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        rows(
            &server,
            &["instances", "--all", "--app", "web", "-o", "json"],
            "instances"
        )
        .is_empty(),
        "the old token got back in"
    );
    assert_eq!(
        server
            .env
            .query("SELECT COUNT(*) FROM log_chunks WHERE app = 'web'")
            .unwrap()
            .as_deref(),
        Some("0")
    );
    // A new token for the new app works as usual.
    let Some(fresh) = Builder::new(&server, "web", HELLO).spawn() else {
        return;
    };
    fresh.instance(&server);
}

impl Server {
    fn instance_is_live(&self, inst: &serde_json::Value) -> bool {
        self.instances(false).iter().any(|i| i["id"] == inst["id"])
    }
}

#[test]
fn instances_watch_shows_an_instance_that_connects_and_ctrl_c_exits_0() {
    let server = Server::start(&["--heartbeat-interval", "300ms"]);
    server.create_app("web");
    let token = server.entrypoint_token("web", None);
    let mut watch = server
        .env
        .command()
        .args(["instances", "-w", "--app", "web"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = Arc::new(Mutex::new(String::new()));
    let mut pipe = watch.stdout.take().unwrap();
    let reader = {
        let out = out.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                out.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    let seen = |s: &str| out.lock().unwrap().contains(s);
    wait_for("the first (empty) table", || {
        seen("no live instances of app web").then_some(())
    });
    let Some(ep) = Builder::with_token(&server, &token, HELLO).spawn() else {
        let _ = watch.kill();
        let _ = watch.wait();
        return;
    };
    let id: String = ep.instance(&server)["id"]
        .as_str()
        .unwrap()
        .chars()
        .take(8)
        .collect();
    let started = Instant::now();
    wait_for("the instance in the watched table", || {
        seen(&id).then_some(())
    });
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "polls every second"
    );
    let text = out.lock().unwrap().clone();
    assert!(text.contains("ID") && text.contains("STATE"), "{text}");
    assert!(!text.contains('\x1b'), "no ANSI when piped: {text:?}");
    // SAFETY: kill(2) on our own unreaped child.
    unsafe { libc::kill(watch.id() as i32, libc::SIGINT) };
    let status = wait_for("the watch to end on Ctrl-C", || watch.try_wait().unwrap());
    assert_eq!(status.code(), Some(0), "Ctrl-C ends a watch with 0");
    reader.join().unwrap();
    let conflict = server.cli(&["instances", "-w", "-o", "json"]);
    assert_ne!(conflict.code, Some(0));
}

#[test]
fn waypost_addr_takes_an_https_url_and_refuses_http() {
    let server = Server::start(&[]);
    server.create_app("web");
    let run = |addr: &str| {
        Run::from_output(
            server
                .env
                .command()
                .env("WAYPOST_ADDR", addr)
                .args(["app", "list"])
                .output()
                .unwrap(),
        )
    };
    for addr in [
        format!("https://{}", server.api_addr),
        format!("https://{}/", server.api_addr),
        format!("HTTPS://{}", server.api_addr),
        server.api_addr.clone(),
    ] {
        let r = run(&addr).ok();
        assert!(r.stdout.contains("web"), "{addr}: {}", r.stdout);
    }
    let r = run(&format!("http://{}", server.api_addr)).fails();
    assert!(
        r.stderr.contains("HTTPS only") && r.stderr.contains("https://"),
        "{}",
        r.stderr
    );
    let r = run(&format!("https://{}/v1/apps", server.api_addr)).fails();
    assert!(r.stderr.contains("no path"), "{}", r.stderr);
}

/// `waypost ARGS` on a pseudo-terminal (util-linux `script`), with the server's environment;
/// what the terminal showed (stdout and stderr together). None if `script` is missing.
fn on_terminal(server: &Server, args: &str, extra_env: &[(&str, &str)]) -> Option<String> {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("SKIPPED the terminal half: no `script` (util-linux) on PATH");
        return None;
    }
    let mut c = Command::new("script");
    c.args(["-q", "-e", "-c"])
        .arg(format!("'{}' {args}", waypost_bin()))
        .arg("/dev/null")
        .env("WAYPOST_CONTEXT", server.env.context_path())
        .env("HOME", server.env.home())
        .env_remove("WAYPOST_ADDR")
        .env_remove("WAYPOST_ADMIN_TOKEN")
        .env_remove("WAYPOST_CA")
        .env_remove("WAYPOST_APP")
        .env_remove("NO_COLOR")
        .envs(extra_env.iter().copied())
        .stdin(Stdio::null());
    let out = c.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{args}: {text}");
    Some(text)
}

#[test]
fn empty_logs_say_so_on_a_terminal_only_and_no_color_turns_colors_off() {
    let server = Server::start(&[]);
    server.create_app("web");
    // Piped: empty stays empty, on both streams.
    let piped = server.cli(&["logs", "--app", "web"]).ok();
    assert_eq!((piped.stdout.as_str(), piped.stderr.as_str()), ("", ""));
    let Some(tty) = on_terminal(&server, "logs --app web", &[]) else {
        return;
    };
    assert!(tty.contains("no log lines for app web (yet)"), "{tty:?}");
    let filtered = on_terminal(&server, "logs --app web --since 1m", &[]).unwrap();
    assert!(filtered.contains("match"), "{filtered:?}");

    // With a line: colored on a terminal, not with NO_COLOR, never when piped.
    let Some(_ep) = Builder::new(&server, "web", HELLO).spawn() else {
        return;
    };
    wait_for("the app's line in the logs", || {
        server
            .cli(&["logs", "--app", "web"])
            .ok()
            .stdout
            .contains("hello from the app")
            .then_some(())
    });
    let piped = server.cli(&["logs", "--app", "web"]).ok();
    assert!(!piped.stdout.contains('\x1b'), "{:?}", piped.stdout);
    let colored = on_terminal(&server, "logs --app web", &[]).unwrap();
    assert!(colored.contains("hello from the app"), "{colored:?}");
    assert!(
        colored.contains("\x1b["),
        "colors on a terminal: {colored:?}"
    );
    assert!(!colored.contains("no log lines"), "{colored:?}");
    let plain = on_terminal(&server, "logs --app web", &[("NO_COLOR", "1")]).unwrap();
    assert!(plain.contains("hello from the app"), "{plain:?}");
    assert!(!plain.contains('\x1b'), "NO_COLOR: {plain:?}");
}
