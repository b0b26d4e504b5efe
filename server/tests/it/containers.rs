//! The whole product in real containers: `FROM scratch` images (static busybox + the static
//! entrypoint from `make build`) built in the test, run by podman with the entrypoint as PID 1
//! and the host network, so the entrypoint reaches a test server on loopback.
//!
//! Needs root, podman, runc and busybox-static (`.ci/run` installs them). If podman cannot start
//! even a trivial container here, each test prints one loud "SKIPPED: containers unavailable"
//! line and returns (WAYPOST_REQUIRE_CONTAINERS=1 turns that into a failure); any failure after
//! that probe is a real failure. Tests of features whose CLI is not there yet (`waypost logs`,
//! `config`, `exec`, `url`) print a loud skip line of their own.

pub(crate) mod podman;

use crate::common::*;
use podman::{Out, Podman, SCRATCH};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Does `waypost SUBCOMMAND --help` work? If not, prints the loud skip line.
fn cli_has(test: &str, sub: &[&str]) -> bool {
    let out = Command::new(waypost_bin())
        .args(sub)
        .arg("--help")
        .output()
        .unwrap();
    let ok = out.status.success();
    if !ok {
        eprintln!(
            "\n!!! SKIPPED: {test}: `waypost {}` does not exist yet (re-run once it lands) !!!\n",
            sub.join(" ")
        );
    }
    ok
}

/// `waypost token create --app APP -o env` written to a file for `podman run --env-file`: the
/// documented way to give a container its server, token and CA at run time.
fn env_file(p: &Podman, server: &Server, app: &str) -> String {
    if !server.cli(&["app", "list", "-o", "json"]).ok().json()["apps"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["name"] == app)
    {
        server.create_app(app);
    }
    let env = server
        .cli(&["token", "create", "--app", app, "-o", "env"])
        .ok()
        .stdout;
    let path = p.path(&format!("{app}.env"));
    std::fs::write(&path, env).unwrap();
    path.to_str().unwrap().to_string()
}

/// Waits for the app's live instance in `waypost instances`.
fn live_instance(server: &Server, app: &str) -> serde_json::Value {
    wait_for(&format!("a live instance of {app}"), || {
        server
            .instances(false)
            .into_iter()
            .find(|i| i["app"] == app && i["live"] == true)
    })
}

fn vm_rss_kb(status: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {status}"))
}

/// `waypost inject --entrypoint-binary EP SRC DST`.
fn inject(p: &Podman, args: &[&str]) -> Out {
    let mut c = Command::new(waypost_bin());
    c.arg("inject")
        .arg("--entrypoint-binary")
        .arg(&p.entrypoint)
        .args(args);
    podman::run_cmd(c, p.dir.path(), Duration::from_secs(60))
}

/// A base image without the entrypoint: busybox and CMD `sh -c SCRIPT`.
fn base_image(p: &Podman, file: &str, tag: &str, script: &str) -> std::path::PathBuf {
    p.build_image(
        file,
        tag,
        vec![p.busybox_layer(&[])],
        None,
        &["/bin/sh", "-c", script],
    )
}

const TRAP_TERM_EXIT_0: &str =
    "trap 'echo app-got-TERM; exit 0' TERM; echo app-ready; while :; do sleep 0.1; done";
const IGNORE_TERM: &str = "trap '' TERM; echo app-ready; while :; do sleep 0.1; done";

// ---- init duties, PID 1 in a scratch image ----------------------------------------------------

#[test]
fn podman_stop_reaches_the_app_and_exit_code_is_143() {
    let Some(p) = Podman::new() else { return };
    p.run_detached("c", &[], SCRATCH, &["sleep", "1000"]);
    let cmdline = p.pid1_cmdline("c");
    assert!(
        cmdline.starts_with("/waypost-entrypoint sleep 1000"),
        "PID 1 is {cmdline:?}"
    );
    let took = p.stop("c", 30);
    assert_eq!(
        p.exit_code("c"),
        143,
        "the app died of the SIGTERM: 128+15\n{}",
        p.logs("c")
    );
    assert!(
        took < Duration::from_secs(10),
        "stop took {took:?}: SIGTERM did not reach the app"
    );

    // Negative control: the same app as PID 1 without the entrypoint ignores SIGTERM (the
    // kernel drops signals PID 1 has no handler for), so only podman's SIGKILL ends it.
    p.run_detached(
        "control",
        &["--entrypoint", "/bin/sleep"],
        SCRATCH,
        &["1000"],
    );
    let took = p.stop("control", 2);
    assert_eq!(p.exit_code("control"), 137);
    assert!(took >= Duration::from_secs(2), "{took:?}");
}

#[test]
fn podman_stop_trapping_app_exits_0() {
    let Some(p) = Podman::new() else { return };
    p.run_detached("c", &[], SCRATCH, &["sh", "-c", TRAP_TERM_EXIT_0]);
    p.wait_log("c", "app-ready");
    p.stop("c", 30);
    assert_eq!(p.exit_code("c"), 0, "{}", p.logs("c"));
    assert!(p.logs("c").contains("app-got-TERM"));
}

#[test]
fn app_ignoring_sigterm_is_killed_at_the_stop_timeout() {
    let Some(p) = Podman::new() else { return };
    p.run_detached(
        "c",
        &["-e", "WAYPOST_STOP_TIMEOUT=1s"],
        SCRATCH,
        &["sh", "-c", IGNORE_TERM],
    );
    p.wait_log("c", "app-ready");
    // podman would wait 60 s before its own SIGKILL: ending well before proves it was the
    // entrypoint's kill at WAYPOST_STOP_TIMEOUT.
    let took = p.stop("c", 60);
    assert_eq!(p.exit_code("c"), 137, "SIGKILL: 128+9\n{}", p.logs("c"));
    assert!(
        took >= Duration::from_millis(900),
        "stopped after {took:?}, before the timeout"
    );
    assert!(
        took < Duration::from_secs(20),
        "stop took {took:?}: the entrypoint did not kill"
    );
}

/// Orphans whose parent exits get re-parented to PID 1; the entrypoint reaps them.
const MAKE_ORPHANS: &str =
    "for i in 1 2 3 4 5; do sh -c 'sleep 0.2 &'; done; echo orphans-made; exec sleep 1000";

#[test]
fn orphans_are_reaped_no_zombies() {
    let Some(p) = Podman::new() else { return };
    p.run_detached("c", &[], SCRATCH, &["sh", "-c", MAKE_ORPHANS]);
    p.wait_log("c", "orphans-made");
    // Once the five orphans have exited, only the app's `sleep 1000` is left of the sleeps: a
    // zombie would still be listed (its stat lives until it is reaped).
    let left = |procs: &[(u32, String, char)]| procs.iter().filter(|p| p.1 == "sleep").count();
    wait_for("the orphans to exit and be reaped", || {
        let procs = p.procs("c");
        (left(&procs) == 1).then_some(())
    });
    let z = p.zombies("c");
    assert!(z.is_empty(), "zombies inside the container: {z:?}");

    // Negative control: `sleep` as PID 1 reaps nothing, and the same check sees the zombies.
    p.run_detached(
        "control",
        &["--entrypoint", "/bin/sh"],
        SCRATCH,
        &["-c", MAKE_ORPHANS],
    );
    p.wait_log("control", "orphans-made");
    let z = wait_for("the control's orphans to turn into zombies", || {
        let z = p.zombies("control");
        (z.len() >= 5).then_some(z)
    });
    assert!(z.iter().all(|p| p.1 == "sleep"), "{z:?}");
}

// ---- waypost inject with real images --------------------------------------------------------

#[test]
fn injected_image_is_supervised_and_its_logs_reach_the_server() {
    let Some(p) = Podman::new() else { return };
    let base = base_image(
        &p,
        "base.tar",
        "localhost/plain-app:1",
        "echo app-started; echo app-err >&2; trap 'echo app-got-TERM; exit 7' TERM; \
         while :; do sleep 0.1; done",
    );
    let src = format!("docker-archive:{}", base.display());
    let once = p.path("once.tar");
    let out = inject(&p, &[&src, &format!("oci-archive:{}", once.display())]).ok("inject");
    assert!(out.stdout.contains("injected"), "{}", out.stdout);
    let layer = out
        .stdout
        .lines()
        .find(|l| l.contains("layer"))
        .unwrap_or_default()
        .to_string();
    eprintln!("FIGURE: entrypoint layer: {}", layer.trim());

    let name = p.load(&once);
    let inspect = p.inspect_image(&name);
    assert_eq!(
        inspect["Config"]["Entrypoint"],
        serde_json::json!(["/waypost-entrypoint"])
    );
    assert_eq!(
        inspect["Config"]["Cmd"][0], "/bin/sh",
        "CMD untouched: {}",
        inspect["Config"]
    );
    assert_eq!(inspect["RootFS"]["Layers"].as_array().unwrap().len(), 2);

    let server = Server::start(&[]);
    let envf = env_file(&p, &server, "injected");
    p.run_detached("c", &["--env-file", &envf], &name, &[]);
    p.wait_log("c", "app-started");
    let cmdline = p.pid1_cmdline("c");
    assert!(
        cmdline.starts_with("/waypost-entrypoint /bin/sh -c"),
        "PID 1 is {cmdline:?}"
    );
    let inst = live_instance(&server, "injected");
    assert!(
        inst["child_pid"].as_u64().is_some_and(|pid| pid > 1),
        "{inst}"
    );

    if cli_has("injected_image: logs", &["logs"]) {
        let logs = wait_for("the app's lines in `waypost logs`", || {
            let r = server.cli(&["logs", "--app", "injected"]);
            (r.code == Some(0) && r.stdout.contains("app-started") && r.stdout.contains("app-err"))
                .then_some(r.stdout)
        });
        assert!(logs.contains("app-started"), "{logs}");
    }

    p.stop("c", 30);
    assert_eq!(
        p.exit_code("c"),
        7,
        "the app's own exit code\n{}",
        p.logs("c")
    );
    assert!(p.logs("c").contains("app-got-TERM"));
}

#[test]
fn injecting_twice_leaves_one_entrypoint() {
    let Some(p) = Podman::new() else { return };
    // The input is what `podman save` writes, not our own writer's output.
    let base = base_image(&p, "base.tar", "localhost/plain-app:2", "exec sleep 1000");
    p.load(&base);
    let saved = p.path("saved.tar");
    p.ok(&[
        "save",
        "--format",
        "docker-archive",
        "-o",
        saved.to_str().unwrap(),
        "localhost/plain-app:2",
    ]);
    let once = p.path("once.tar");
    let twice = p.path("twice.tar");
    inject(
        &p,
        &[
            &format!("docker-archive:{}", saved.display()),
            &format!("docker-archive:{}:localhost/app:once", once.display()),
        ],
    )
    .ok("inject once");
    let out = inject(
        &p,
        &[
            &format!("docker-archive:{}", once.display()),
            &format!("docker-archive:{}", twice.display()),
        ],
    )
    .ok("inject twice");
    assert!(out.stdout.contains("already injected"), "{}", out.stdout);

    let name = p.load(&twice);
    assert!(name.contains("localhost/app:once"), "{name}");
    let inspect = p.inspect_image(&name);
    assert_eq!(
        inspect["Config"]["Entrypoint"],
        serde_json::json!(["/waypost-entrypoint"])
    );
    assert_eq!(
        inspect["RootFS"]["Layers"].as_array().unwrap().len(),
        2,
        "one layer added, once"
    );
    p.run_detached("c", &[], &name, &[]);
    assert_eq!(
        p.pid1_cmdline("c").trim(),
        "/waypost-entrypoint /bin/sh -c exec sleep 1000"
    );
    let ps = p.exec("c", &["ps", "-o", "pid,args"]).ok("ps").stdout;
    assert_eq!(ps.matches("waypost-entrypoint").count(), 1, "{ps}");
    p.stop("c", 30);
    assert_eq!(p.exit_code("c"), 143);
}

#[test]
fn injected_oci_layout_and_archive_run_directly() {
    let Some(p) = Podman::new() else { return };
    let base = base_image(
        &p,
        "base.tar",
        "localhost/plain-app:3",
        "echo ran-$WAYPOST_LOG_LEVEL; exit 3",
    );
    let src = format!("docker-archive:{}", base.display());
    let dir = p.path("layout");
    inject(
        &p,
        &[
            "--env",
            "WAYPOST_LOG_LEVEL=warn",
            &src,
            &format!("oci:{}:v1", dir.display()),
        ],
    )
    .ok("inject to oci:");
    let arch = p.path("oci.tar");
    inject(&p, &[&src, &format!("oci-archive:{}", arch.display())]).ok("inject to oci-archive:");
    // `docker save IMAGE | gzip` output is taken as it is (read through a decompressed copy).
    let gz = p.path("base.tar.gz");
    {
        use std::io::Write as _;
        let mut enc = flate2::write::GzEncoder::new(
            std::fs::File::create(&gz).unwrap(),
            flate2::Compression::fast(),
        );
        enc.write_all(&std::fs::read(&base).unwrap()).unwrap();
        enc.finish().unwrap();
    }
    let from_gz = p.path("from-gz.tar");
    let out = inject(
        &p,
        &[
            "--env",
            "WAYPOST_LOG_LEVEL=info",
            &format!("docker-archive:{}", gz.display()),
            &format!("docker-archive:{}", from_gz.display()),
        ],
    )
    .ok("inject from a gzip'd docker-archive");
    assert!(out.stderr.contains("gzip-compressed"), "{}", out.stderr);
    let loaded = p.podman(&["load", "-i", &from_gz.to_string_lossy()]);
    assert_eq!(
        loaded.code,
        Some(0),
        "podman load of the result: {loaded:?}"
    );
    // Its own name: running the oci-archive below stores that image under the archive's name.
    p.ok(&["tag", "localhost/plain-app:3", "localhost/from-gz:1"]);
    // Tokens are refused before anything is written.
    let refused = inject(
        &p,
        &[
            "--env",
            "WAYPOST_TOKEN=wpe_x",
            &src,
            &format!("oci-archive:{}", p.path("no.tar").display()),
        ],
    );
    assert_ne!(refused.code, Some(0));
    assert!(
        refused.stderr.contains("WAYPOST_TOKEN"),
        "{}",
        refused.stderr
    );
    assert!(!p.path("no.tar").exists());

    for (image, expect) in [
        (format!("oci:{}:v1", dir.display()), "ran-warn"),
        (format!("oci-archive:{}", arch.display()), "ran-"),
        // The loaded result of the gzip'd input (the un-injected base would print "ran-").
        ("localhost/from-gz:1".to_string(), "ran-info"),
    ] {
        let mut args = vec!["run", "--rm"];
        args.extend(
            podman::RUN_FLAGS
                .iter()
                .filter(|f| !f.starts_with("--pull")),
        );
        args.push(&image);
        let out = p.podman(&args);
        assert_eq!(out.code, Some(3), "{image}: the app's exit code\n{out:?}");
        assert!(out.stdout.contains(expect), "{image}: {out:?}");
    }
}

// ---- the server ----------------------------------------------------------------------------

const TICKER: &str = "echo app-pid-$$; i=0; while :; do echo tick-$i; i=$((i+1)); sleep 0.1; done";

fn ticks(logs: &str) -> usize {
    logs.lines().filter(|l| l.starts_with("tick-")).count()
}

#[test]
fn server_killed_the_app_never_notices() {
    let Some(p) = Podman::new() else { return };
    let server = Server::start(&[]);
    let envf = env_file(&p, &server, "steady");
    p.run_detached("c", &["--env-file", &envf], SCRATCH, &["sh", "-c", TICKER]);
    live_instance(&server, "steady");
    p.wait_log("c", "tick-5");

    let env = server.kill(); // SIGKILL: no goodbye to the entrypoint
    let before = ticks(&p.logs("c"));
    std::thread::sleep(Duration::from_secs(3));
    let logs = p.logs("c");
    assert!(
        p.running("c"),
        "the container died with the server:\n{logs}"
    );
    assert!(
        ticks(&logs) >= before + 10,
        "output stalled: {before} ticks then {}",
        ticks(&logs)
    );
    assert_eq!(
        logs.matches("app-pid-").count(),
        1,
        "the app was restarted:\n{logs}"
    );
    assert_eq!(logs.matches("tick-0\n").count(), 1);
    // Still supervised as before.
    p.stop("c", 30);
    assert_eq!(p.exit_code("c"), 143);
    drop(env);
}

#[test]
fn entrypoint_memory_in_the_container_with_a_session_open() {
    let Some(p) = Podman::new() else { return };
    let server = Server::start(&[]);
    let envf = env_file(&p, &server, "mem");
    p.run_detached("c", &["--env-file", &envf], SCRATCH, &["sh", "-c", TICKER]);
    live_instance(&server, "mem");
    p.wait_log("c", "tick-20");
    let status = p.pid1_status("c");
    assert!(status.contains("Name:\twaypost-entrypo"), "{status}");
    let idle = vm_rss_kb(&status);
    eprintln!("FIGURE: entrypoint VmRSS in the container, control session open: {idle} kB");
    assert!(idle < 16 * 1024, "VmRSS {idle} kB");

    if cli_has("entrypoint_memory (exec session)", &["exec"]) {
        let mut c = server.env.command();
        c.args(["exec", "--app", "mem", "--", "sleep", "4"]);
        let mut child = c
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // The exec'd sleep shows up as a child of PID 1.
        wait_for("the exec session's process", || {
            let ps = p.exec("c", &["ps", "-o", "args"]).stdout;
            ps.lines().any(|l| l.trim() == "sleep 4").then_some(())
        });
        let rss = vm_rss_kb(&p.pid1_status("c"));
        eprintln!(
            "FIGURE: entrypoint VmRSS in the container, control session + one exec session open: {rss} kB"
        );
        let _ = child.wait();
        assert!(rss < 16 * 1024, "VmRSS {rss} kB");
    }
}

#[test]
fn config_reaches_the_app_in_the_container() {
    let Some(p) = Podman::new() else { return };
    if !cli_has("config_reaches_the_app", &["config"]) {
        return;
    }
    let server = Server::start(&[]);
    server.create_app("cfg");
    let local = p.path("app.conf");
    std::fs::write(&local, "setting=from-a-config-file\n").unwrap();
    server
        .cli(&["config", "set", "--app", "cfg", "GREETING=hello"])
        .ok();
    server
        .cli(&[
            "config",
            "set",
            "--app",
            "cfg",
            "--file",
            &format!("/etc/wp/app.conf=@{}", local.display()),
        ])
        .ok();
    server
        .cli(&[
            "config",
            "policy",
            "--app",
            "cfg",
            "--on-change",
            "restart",
            "--splay",
            "0s",
        ])
        .ok();
    let envf = env_file(&p, &server, "cfg");
    let script = "echo greeting=$GREETING; cat /etc/wp/app.conf; trap 'exit 0' TERM; \
                  while :; do sleep 0.1; done";
    p.run_detached("c", &["--env-file", &envf], SCRATCH, &["sh", "-c", script]);
    let logs = p.wait_log("c", "greeting=hello");
    assert!(logs.contains("setting=from-a-config-file"), "{logs}");
    let pid1 = p.pid1_cmdline("c");

    server
        .cli(&["config", "set", "--app", "cfg", "GREETING=changed"])
        .ok();
    p.wait_log("c", "greeting=changed");
    assert!(p.running("c"));
    assert_eq!(
        p.pid1_cmdline("c"),
        pid1,
        "the child restarted, not the container"
    );
    let file = p
        .exec("c", &["cat", "/etc/wp/app.conf"])
        .ok("cat config file")
        .stdout;
    assert_eq!(file, "setting=from-a-config-file\n");
}

#[test]
fn logs_reach_the_server_from_the_container() {
    let Some(p) = Podman::new() else { return };
    if !cli_has("logs_reach_the_server", &["logs"]) {
        return;
    }
    let server = Server::start(&[]);
    let envf = env_file(&p, &server, "logs");
    p.run_detached(
        "c",
        &["--env-file", &envf],
        SCRATCH,
        &[
            "sh",
            "-c",
            "echo to-stdout; echo to-stderr >&2; exec sleep 1000",
        ],
    );
    live_instance(&server, "logs");
    let out = wait_for("both lines in `waypost logs`", || {
        let r = server.cli(&["logs", "--app", "logs"]);
        (r.stdout.contains("to-stdout") && r.stdout.contains("to-stderr")).then_some(r.stdout)
    });
    let err = server
        .cli(&["logs", "--app", "logs", "--stream", "stderr"])
        .ok()
        .stdout;
    assert!(
        err.contains("to-stderr") && !err.contains("to-stdout"),
        "{err}\n(all: {out})"
    );
    // The container's own output still has both, byte for byte.
    let local = p.logs("c");
    assert!(
        local.contains("to-stdout\n") && local.contains("to-stderr\n"),
        "{local}"
    );
}

#[test]
fn exec_with_a_pty_inside_the_scratch_container() {
    let Some(p) = Podman::new() else { return };
    if !cli_has("exec_with_a_pty", &["exec"]) {
        return;
    }
    let server = Server::start(&[]);
    let envf = env_file(&p, &server, "shell");
    p.run_detached("c", &["--env-file", &envf], SCRATCH, &["sleep", "1000"]);
    live_instance(&server, "shell");

    // Without a PTY: output and the remote exit code.
    let r = server.cli(&[
        "exec",
        "--app",
        "shell",
        "--",
        "sh",
        "-c",
        "echo out-$((6*7)); exit 3",
    ]);
    assert_eq!(r.code, Some(3), "{} {}", r.stdout, r.stderr);
    assert!(r.stdout.contains("out-42"), "{}", r.stdout);

    // With -t: `script` gives the CLI a terminal of a known size; inside the container the
    // command must see a PTY of that size.
    let cmd = format!(
        "stty rows 33 cols 101; exec {} exec --app shell -t -- sh -c 'tty; stty size; echo pid1=$(cat /proc/1/comm)'",
        waypost_bin()
    );
    let mut c = Command::new("script");
    c.args(["-q", "-e", "-c", &cmd, "/dev/null"])
        .env("WAYPOST_CONTEXT", server.env.context_path())
        .env("HOME", server.env.home())
        .env_remove("WAYPOST_ADDR")
        .env_remove("WAYPOST_ADMIN_TOKEN")
        .env_remove("WAYPOST_CA");
    let out = podman::run_cmd(c, p.dir.path(), Duration::from_secs(60));
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout.contains("/dev/pts/"),
        "no PTY in the container: {out:?}"
    );
    assert!(
        out.stdout.contains("33 101"),
        "the PTY has the terminal's size: {out:?}"
    );
    assert!(
        out.stdout.contains("pid1=waypost-entrypo"),
        "ran inside the container: {out:?}"
    );
}

#[test]
fn url_service_reaches_busybox_httpd_in_the_container() {
    let Some(p) = Podman::new() else { return };
    if !cli_has("url_service", &["url"]) {
        return;
    }
    let help = Command::new(waypost_bin())
        .args(["server", "run", "--help"])
        .output()
        .unwrap();
    let mut extra = vec![];
    if String::from_utf8_lossy(&help.stdout).contains("--ingress-addr") {
        extra = vec!["--ingress-addr", "127.0.0.1:0"];
    }
    let server = Server::start(&extra);
    let envf = env_file(&p, &server, "web");
    // A free port on the host network for httpd (the container shares it).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let port_env = format!("PORT={port}");
    p.run_detached(
        "c",
        &["--env-file", &envf, "-e", &port_env],
        SCRATCH,
        &["sh", "-c", "exec httpd -f -p 127.0.0.1:$PORT -h /www"],
    );
    live_instance(&server, "web");
    let url = server.cli(&["url", "--app", "web"]).ok().stdout;
    let url = url
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("`waypost url` printed no http:// URL: {url}"))
        .to_string();
    let hostport = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let (host, port) = hostport.rsplit_once(':').unwrap();
    let body = wait_for("httpd's page through the ingress", || {
        let resp = http_get(&format!("127.0.0.1:{port}"), host, "/index.html")?;
        resp.contains("hello from busybox httpd").then_some(resp)
    });
    assert!(
        body.starts_with("HTTP/1.1 200") || body.starts_with("HTTP/1.0 200"),
        "{body}"
    );
}

/// A plain HTTP/1.1 GET with a Host header; the whole response, or None on any error.
fn http_get(addr: &str, host: &str, path: &str) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    while start.elapsed() < Duration::from_secs(5) {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(_) => break,
        }
    }
    (!out.is_empty()).then_some(out)
}

// ---- the inject CLI's refusals (no podman needed) --------------------------------------------

#[test]
fn inject_cli_refusals_are_one_clear_line() {
    let t = tempfile::tempdir().unwrap();
    // A synthetic source image (no podman involved).
    let cfg = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": { "Cmd": ["/app"] },
    });
    let layer = waypost::oci::layer::single_file_tar("app", 0o755, b"#!/bin/sh\n").unwrap();
    let img =
        waypost::oci::Image::from_parts(cfg, &[layer], true, waypost::oci::Flavor::Oci).unwrap();
    let src = format!("oci-archive:{}", t.path().join("src.tar").display());
    waypost::oci::write(&img, &waypost::oci::ImageRef::parse(&src).unwrap()).unwrap();
    let dst = format!("oci-archive:{}", t.path().join("dst.tar").display());
    let run = |args: &[&str]| {
        Run::from_output(
            Command::new(waypost_bin())
                .arg("inject")
                .args(args)
                .current_dir(t.path())
                .output()
                .unwrap(),
        )
    };

    let r = run(&["--env", "WAYPOST_TOKEN=wpe_secret", &src, &dst]).fails();
    assert!(
        r.stderr.contains("refusing to bake WAYPOST_TOKEN"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("wpe_secret"), "{}", r.stderr);
    let r = run(&["--env", "WAYPOINT_CEB_INVITE_TOKEN=x", &src, &dst]).fails();
    assert!(
        r.stderr.contains("WAYPOINT_CEB_INVITE_TOKEN"),
        "{}",
        r.stderr
    );
    let r = run(&[&src, &src]).fails();
    assert!(
        r.stderr.contains("never modifies its source"),
        "{}",
        r.stderr
    );
    let r = run(&["docker://alpine", &dst]).fails();
    assert!(r.stderr.contains("skopeo copy"), "{}", r.stderr);
    // The (dynamically linked) waypost binary itself is not a usable entrypoint.
    let r = run(&["--entrypoint-binary", waypost_bin(), &src, &dst]).fails();
    assert!(r.stderr.contains("dynamically linked"), "{}", r.stderr);
    let r = run(&[
        "--entrypoint-binary",
        "/nonexistent/waypost-entrypoint",
        &src,
        &dst,
    ])
    .fails();
    assert!(
        r.stderr.contains("/nonexistent/waypost-entrypoint"),
        "{}",
        r.stderr
    );
    assert!(
        !t.path().join("dst.tar").exists(),
        "nothing written on refusal"
    );

    // A static binary is accepted (busybox stands in for the entrypoint here, if installed).
    if podman::is_static(Path::new("/bin/busybox")).is_ok() {
        let r = run(&["--entrypoint-binary", "/bin/busybox", &src, &dst]).ok();
        assert!(r.stdout.contains("injected"), "{}", r.stdout);
        let r = run(&[
            "--entrypoint-binary",
            "/bin/busybox",
            &dst,
            &format!("oci:{}", t.path().join("again").display()),
        ])
        .ok();
        assert!(r.stdout.contains("already injected"), "{}", r.stdout);
    }
}
