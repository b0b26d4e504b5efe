//! What the app can reach of the entrypoint that runs it: the token in the entrypoint's own
//! `/proc/PID/environ` (blanked after parsing, and the process non-dumpable), and config files
//! written into a directory the app can write (a planted symlink never redirects the write).
//!
//! Real server, real entrypoint, real `sh` children. The tests run as root in CI: root can read
//! any process's environ, so the root variants prove the token's bytes are gone, and the variants
//! run as `nobody` (via setpriv) prove a same-user app is refused outright.

use crate::common::entrypoint::{Builder, Entrypoint, binary};
use crate::common::{Server, wait_for};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _, symlink};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A legacy token variable, also a secret of the entrypoint's.
const LEGACY: (&str, &str) = ("WAYPOINT_CEB_INVITE_TOKEN", "legacy-invite-5b9e0c7d");

/// The entrypoint's environ as `NAME=value` lines.
fn lines(environ: &[u8]) -> Vec<String> {
    environ
        .split(|&b| b == 0)
        .filter(|l| !l.is_empty())
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect()
}

/// Which of `secrets` occur anywhere in `text`.
fn leaked<'a>(text: &str, secrets: &[&'a str]) -> Vec<&'a str> {
    secrets
        .iter()
        .copied()
        .filter(|s| text.contains(s))
        .collect()
}

#[test]
fn token_bytes_are_gone_from_every_environ_the_app_and_exec_can_read() {
    let server = Server::start(&[]);
    let token = server.entrypoint_token("sec", None);
    // `own` is complete before `parent` appears (the test waits for `parent` only).
    let script = r#"cat /proc/self/environ > "$D/own.tmp" && mv "$D/own.tmp" "$D/own"
cat /proc/$PPID/environ > "$D/parent.tmp" && mv "$D/parent.tmp" "$D/parent"
exec sleep 1000"#;
    let Some(ep) = Builder::with_token(&server, &token, script)
        .env("WAYPOST_LOG_LEVEL", "DEBUG")
        .env(LEGACY.0, LEGACY.1)
        .env("APP_SETTING", "kept")
        .spawn()
    else {
        return;
    };
    // Connected with the token, so it was read before it was blanked.
    ep.instance(&server);
    let secrets = [token.as_str(), "WAYPOST_TOKEN=", LEGACY.1, LEGACY.0];

    let parent = wait_for("the app to read its parent's environ", || {
        std::fs::read(ep.dir.join("parent")).ok()
    });
    let ours = std::fs::read(format!("/proc/{}/environ", ep.pid())).unwrap();
    for (what, environ) in [("read by the app", &parent), ("read by the test", &ours)] {
        let env = lines(environ);
        // Negative control: the block is read, and what is not a secret is still there.
        assert!(
            env.iter().any(|l| l == "WAYPOST_LOG_LEVEL=DEBUG")
                && env.iter().any(|l| l == "APP_SETTING=kept"),
            "the entrypoint's environ {what}: {env:?}"
        );
        let text = String::from_utf8_lossy(environ);
        assert_eq!(
            leaked(&text, &secrets),
            Vec::<&str>::new(),
            "the entrypoint's environ {what} shows secrets: {env:?}"
        );
    }
    let own = std::fs::read(ep.dir.join("own")).unwrap();
    let own = String::from_utf8_lossy(&own);
    assert!(own.contains("APP_SETTING=kept"), "{own}");
    assert_eq!(
        leaked(&own, &secrets),
        Vec::<&str>::new(),
        "the app's own environ"
    );

    // An exec session: its own environment and its view of the entrypoint's (its parent).
    let run = server
        .cli(&[
            "exec",
            "--app",
            "sec",
            "--",
            "sh",
            "-c",
            "tr '\\0' '\\n' < /proc/$PPID/environ; echo; echo =SPLIT=; env",
        ])
        .ok();
    let (theirs, env) = run.stdout.split_once("=SPLIT=\n").expect("both parts");
    assert!(
        theirs.lines().any(|l| l == "WAYPOST_LOG_LEVEL=DEBUG"),
        "the exec session reads the entrypoint's environ: {theirs}"
    );
    assert!(env.lines().any(|l| l == "APP_SETTING=kept"), "{env}");
    assert_eq!(
        leaked(&run.stdout, &secrets),
        Vec::<&str>::new(),
        "exec session: {}",
        run.stdout
    );
    drop(ep);
}

// ---- an entrypoint of our own making: as another user, under a given umask -----------------

/// An entrypoint started here, since the shared builder runs it as the test's user and umask.
/// Killed (SIGTERM, then SIGKILL) on drop.
struct Ep {
    child: Child,
    dir: PathBuf,
    stderr: PathBuf,
    _tmp: tempfile::TempDir,
}

#[derive(Default)]
struct Opts<'a> {
    /// Run as nobody (65534) via setpriv.
    nobody: bool,
    /// The umask it starts with.
    umask: Option<u32>,
    env: &'a [(&'a str, &'a str)],
}

/// The setpriv prefix for nobody, or None (with a loud skip line) when that cannot work here.
fn as_nobody() -> Option<[&'static str; 5]> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let setpriv = Command::new("setpriv")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !root || !setpriv {
        eprintln!("SKIPPED: running the entrypoint as nobody needs root and setpriv(1)");
        return None;
    }
    Some([
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--",
    ])
}

impl Ep {
    fn start(server: &Server, token: &str, script: &str, opts: Opts) -> Option<Ep> {
        let bin = binary()?;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut argv: Vec<String> = Vec::new();
        if opts.nobody {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
            argv.extend(as_nobody()?.map(String::from));
        }
        // A copy anyone can run (the build tree may be out of reach for nobody).
        let copy = dir.join("waypost-entrypoint");
        std::fs::copy(&bin, &copy).unwrap();
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
        if let Some(mask) = opts.umask {
            argv.extend(
                [
                    "sh",
                    "-c",
                    &format!("umask {mask:03o} && exec \"$0\" \"$@\""),
                ]
                .map(String::from),
            );
        }
        argv.push(copy.display().to_string());
        argv.extend(["sh", "-c", script].map(String::from));
        let stderr = dir.join("stderr");
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .env_clear()
            .env(
                "PATH",
                std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()),
            )
            .env("D", &dir)
            .env("WAYPOST_SERVER", &server.control_addr)
            .env("WAYPOST_TOKEN", token)
            .env("WAYPOST_CA", server.ca_pem())
            .envs(opts.env.iter().copied())
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("stdout")).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("spawning the entrypoint");
        Some(Ep {
            child,
            dir,
            stderr,
            _tmp: tmp,
        })
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits for `$D/name` (written by the app) and returns it trimmed.
    fn result(&self, name: &str) -> String {
        let path = self.dir.join(name);
        wait_for(&format!("{name} from the app\n{}", self.stderr()), || {
            std::fs::read_to_string(&path).ok()
        })
        .trim()
        .to_string()
    }
}

impl Drop for Ep {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let t0 = Instant::now();
            while self.child.try_wait().ok().flatten().is_none()
                && t0.elapsed() < Duration::from_secs(5)
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- entrypoint stderr ---\n{}", self.stderr());
        }
    }
}

/// The app writes `$D/can_read.sh PID`: whether the caller can read `/proc/PID/environ`, and
/// who owns that file ("readable 65534", "denied 0").
const CAN_READ: &str = r#"cat > "$D/can_read.sh" <<'END'
if cat /proc/$1/environ > /dev/null 2>&1; then r=readable; else r=denied; fi
echo "$r $(stat -c %u /proc/$1/environ)"
END
"#;

#[test]
fn an_app_and_its_exec_sessions_of_the_same_user_cannot_inspect_the_entrypoint() {
    if as_nobody().is_none() {
        return;
    }
    let server = Server::start(&[]);
    let token = server.entrypoint_token("nobody", None);
    let script = format!(
        r#"{CAN_READ}
sh "$D/can_read.sh" $PPID > "$D/parent.tmp" && mv "$D/parent.tmp" "$D/parent"
sh "$D/can_read.sh" self > "$D/self.tmp" && mv "$D/self.tmp" "$D/self"
id -u > "$D/me.tmp" && mv "$D/me.tmp" "$D/me"
exec sleep 1000"#
    );
    let opts = Opts {
        nobody: true,
        ..Default::default()
    };
    let Some(ep) = Ep::start(&server, &token, &script, opts) else {
        return;
    };
    assert_eq!(ep.result("me"), "65534", "premise: the app runs as nobody");
    // Non-dumpable: its /proc files belong to root, and reading them is refused.
    assert_eq!(
        ep.result("parent"),
        "denied 0",
        "the app reads the entrypoint's environ"
    );
    // The app itself is dumpable again after its own execve: debugging it works as usual.
    assert_eq!(ep.result("self"), "readable 65534");

    // An exec session: refused the same way; yet the same session reads the environ of a
    // same-user parent that is a plain shell (the negative control). `; true` keeps each shell
    // from exec-ing its last command, so the parents are what they seem.
    let run = server
        .cli(&[
            "exec",
            "--app",
            "nobody",
            "--",
            "sh",
            "-c",
            r#"sh "$D/can_read.sh" $PPID; sh "$D/can_read.sh" self; sh -c 'sh "$D/can_read.sh" $PPID; true'; true"#,
        ])
        .ok();
    let got: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(
        got,
        ["denied 0", "readable 65534", "readable 65534"],
        "exec session reading: the entrypoint, itself, a plain same-user parent"
    );
}

// ---- config files and planted symlinks -----------------------------------------------------

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

/// Pushes `local`'s contents as the config file `path` of `app` with `mode`.
fn set_file(server: &Server, app: &str, path: &Path, local: &Path, mode: &str) {
    let arg = format!(
        "{}={}",
        path.display(),
        format_args!("@{}", local.display())
    );
    server
        .cli(&[
            "config", "set", "--app", app, "--file", &arg, "--mode", mode,
        ])
        .ok();
}

#[test]
fn a_config_file_write_never_follows_a_planted_symlink() {
    let server = Server::start(&[]);
    let token = server.entrypoint_token("cfg", None);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let conf = root.join("conf");
    std::fs::create_dir(&conf).unwrap();
    let target = conf.join("app.conf");
    // Two victims: one behind the fixed temp name an older entrypoint used, one behind the
    // target name itself.
    let (victim_tmp, victim_target) = (root.join("victim-tmp"), root.join("victim-target"));
    std::fs::write(&victim_tmp, "victim one\n").unwrap();
    std::fs::write(&victim_target, "victim two\n").unwrap();
    let victim_modes = (mode(&victim_tmp), mode(&victim_target));
    symlink(&victim_tmp, conf.join(".app.conf.waypost-tmp")).unwrap();
    symlink(&victim_target, &target).unwrap();
    let local = root.join("local.conf");
    std::fs::write(&local, "color=red\n").unwrap();
    set_file(&server, "cfg", &target, &local, "0640");

    let Some(ep) = Builder::with_token(&server, &token, "exec sleep 1000").spawn() else {
        return;
    };
    wait_for(
        &format!("the config file to be written\n{}", ep.stderr()),
        || {
            std::fs::symlink_metadata(&target)
                .is_ok_and(|m| m.file_type().is_file())
                .then_some(())
        },
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "color=red\n");
    assert_eq!(mode(&target), 0o640);
    assert_eq!(
        std::fs::read_to_string(&victim_tmp).unwrap(),
        "victim one\n"
    );
    assert_eq!(
        std::fs::read_to_string(&victim_target).unwrap(),
        "victim two\n"
    );
    assert_eq!((mode(&victim_tmp), mode(&victim_target)), victim_modes);
    let left: Vec<String> = std::fs::read_dir(&conf)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != "app.conf" && n != ".app.conf.waypost-tmp")
        .collect();
    assert!(left.is_empty(), "no temp file left behind: {left:?}");
    drop(ep);
}

#[test]
fn a_config_directory_that_is_a_symlink_is_refused_with_a_clear_error() {
    let server = Server::start(&[]);
    let token = server.entrypoint_token("cfglink", None);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let real = root.join("elsewhere");
    std::fs::create_dir(&real).unwrap();
    let victim = real.join("app.conf");
    std::fs::write(&victim, "victim\n").unwrap();
    let linked = root.join("conf");
    symlink(&real, &linked).unwrap();
    let target = linked.join("app.conf");
    let local = root.join("local.conf");
    std::fs::write(&local, "color=red\n").unwrap();
    set_file(&server, "cfglink", &target, &local, "0644");

    let Some(ep): Option<Entrypoint> =
        Builder::with_token(&server, &token, "exec sleep 1000").spawn()
    else {
        return;
    };
    let line = wait_for("the refusal in the entrypoint's log", || {
        ep.stderr()
            .lines()
            .find(|l| l.contains("symbolic link"))
            .map(str::to_string)
    });
    assert!(
        line.contains(&target.display().to_string()) && line.contains(" ERROR "),
        "one clear error line naming the file: {line}"
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "victim\n");
    assert_eq!(
        std::fs::read_dir(&real).unwrap().count(),
        1,
        "nothing else written there"
    );
}

#[test]
fn config_file_modes_are_exact_under_umask_022_and_077() {
    let server = Server::start(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let local = tmp.path().join("local.conf");
    std::fs::write(&local, "x=1\n").unwrap();
    for umask in [0o022, 0o077] {
        let app = format!("umask{umask:03o}");
        let token = server.entrypoint_token(&app, None);
        let dir = tmp.path().join(&app);
        let files = [
            ("open.conf", "0644", 0o644),
            ("group.conf", "0660", 0o660),
            ("private.conf", "0600", 0o600),
            ("tool", "0755", 0o755),
        ];
        for (name, m, _) in files {
            set_file(&server, &app, &dir.join(name), &local, m);
        }
        let opts = Opts {
            umask: Some(umask),
            ..Default::default()
        };
        let Some(ep) = Ep::start(
            &server,
            &token,
            // Through a temp file, as the other results: the redirection creates the file
            // before umask writes to it.
            "umask > \"$D/umask.tmp\" && mv \"$D/umask.tmp\" \"$D/umask\"; exec sleep 1000",
            opts,
        ) else {
            return;
        };
        assert_eq!(
            ep.result("umask"),
            format!("{umask:04o}"),
            "premise: the umask took"
        );
        for (name, _, want) in files {
            let path = dir.join(name);
            wait_for(
                &format!("{} to be written\n{}", path.display(), ep.stderr()),
                || path.exists().then_some(()),
            );
            assert_eq!(
                mode(&path),
                want,
                "{} under umask {umask:03o}",
                path.display()
            );
            assert_eq!(std::fs::read_to_string(&path).unwrap(), "x=1\n");
        }
    }
}
