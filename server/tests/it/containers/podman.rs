//! The podman harness of the container tests: every test gets its own podman storage
//! (`--root`/`--runroot`/`--tmpdir` under its temp dir, so tests never collide and leave nothing
//! behind), images are built in the test (busybox-static + the static entrypoint, written as a
//! docker-archive by `waypost::oci`, no Dockerfile, no daemon), and every container and image
//! is removed on drop.

use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use waypost::oci::{self, Flavor, Image, ImageRef};

/// Upper bound for one podman command (a load of a few MB on vfs takes well under a second;
/// this only catches a hung podman).
const PODMAN_TIMEOUT: Duration = Duration::from_secs(120);

/// The image with the entrypoint, built as a hand-written `FROM scratch` Dockerfile would:
/// busybox layer, entrypoint layer, `ENTRYPOINT ["/waypost-entrypoint"]`.
pub const SCRATCH: &str = "localhost/wp-scratch:test";

/// Flags every `podman run` gets: `--ulimit`s avoid a setrlimit the host refuses, the host
/// network reaches the test server on loopback, k8s-file makes `podman logs` work without
/// journald, and images are never pulled.
pub const RUN_FLAGS: &[&str] = &[
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=1024:1024",
    "--network=host",
    "--log-driver=k8s-file",
    "--pull=never",
];

/// Busybox applets linked into /bin of the test images.
const APPLETS: &[&str] = &[
    "sh", "ash", "sleep", "cat", "echo", "ps", "httpd", "kill", "tty", "stty", "env", "ls",
    "mkdir", "true", "false", "wget", "grep", "wc", "tr", "head", "printf", "id", "seq", "test",
];

/// The result of one command.
#[derive(Debug)]
pub struct Out {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn ok(self, what: &str) -> Out {
        assert_eq!(
            self.code,
            Some(0),
            "{what} failed:\nstdout: {}\nstderr: {}",
            self.stdout,
            self.stderr
        );
        self
    }
}

/// Runs `cmd` with a deadline; output goes through files (no pipe can fill up and block).
pub fn run_cmd(mut cmd: Command, dir: &Path, timeout: Duration) -> Out {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (o, e) = (
        dir.join(format!("cmd-{n}.out")),
        dir.join(format!("cmd-{n}.err")),
    );
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&o).unwrap())
        .stderr(std::fs::File::create(&e).unwrap())
        .spawn()
        .unwrap_or_else(|err| panic!("spawning {desc}: {err}"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{desc} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = Out {
        code: status.code(),
        stdout: std::fs::read_to_string(&o).unwrap_or_default(),
        stderr: std::fs::read_to_string(&e).unwrap_or_default(),
    };
    let _ = std::fs::remove_file(o);
    let _ = std::fs::remove_file(e);
    out
}

/// Returns None after the one loud skip line (or panics when WAYPOST_REQUIRE_CONTAINERS=1).
fn skip<T>(why: &str) -> Option<T> {
    if std::env::var("WAYPOST_REQUIRE_CONTAINERS").is_ok_and(|v| v == "1") {
        panic!("WAYPOST_REQUIRE_CONTAINERS=1 but containers are unavailable: {why}");
    }
    eprintln!("\n!!! SKIPPED: containers unavailable: {why} !!!\n");
    None
}

pub fn is_static(p: &Path) -> Result<(), String> {
    let b = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
    oci::elf::check_static(&b)
        .map(|_| ())
        .map_err(|e| format!("{}: {e}", p.display()))
}

/// The static entrypoint from `make build`: $WAYPOST_ENTRYPOINT_BIN if it is static, else the
/// musl build in the workspace.
pub fn static_entrypoint() -> Result<PathBuf, String> {
    let mut tried = Vec::new();
    if let Some(p) = std::env::var_os("WAYPOST_ENTRYPOINT_BIN").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        match is_static(&p) {
            Ok(()) => return Ok(p),
            Err(e) => tried.push(e),
        }
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/x86_64-unknown-linux-musl/min/waypost-entrypoint");
    match is_static(&p) {
        Ok(()) => Ok(p),
        Err(e) => {
            tried.push(e);
            Err(format!(
                "no static waypost-entrypoint (run `make build`): {}",
                tried.join("; ")
            ))
        }
    }
}

fn static_busybox() -> Result<PathBuf, String> {
    for p in ["/bin/busybox", "/usr/bin/busybox"] {
        if is_static(Path::new(p)).is_ok() {
            return Ok(PathBuf::from(p));
        }
    }
    Err("no static busybox at /bin/busybox (apt-get install busybox-static)".into())
}

pub struct Podman {
    pub dir: tempfile::TempDir,
    pub entrypoint: PathBuf,
    pub busybox: PathBuf,
}

impl Podman {
    /// A podman with its own storage, proven able to start a trivial container, and the
    /// [`SCRATCH`] image loaded. None (after one loud line) if this machine cannot run
    /// containers; any failure after that probe is a test failure.
    pub fn new() -> Option<Podman> {
        let entrypoint = match static_entrypoint() {
            Ok(p) => p,
            Err(e) => return skip(&e),
        };
        let busybox = match static_busybox() {
            Ok(p) => p,
            Err(e) => return skip(&e),
        };
        for (bin, pkg) in [("podman", "podman"), ("runc", "runc")] {
            if Command::new(bin)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_err()
            {
                return skip(&format!("{bin} is not installed (apt-get install {pkg})"));
            }
        }
        // All lowercase: podman names an image run from `oci:DIR` after DIR, and image names
        // must be lowercase (tempfile's random suffix is not).
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir = tempfile::Builder::new()
            .prefix(&format!(
                "wpc-{}-{}-{nanos}",
                std::process::id(),
                N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ))
            .rand_bytes(0)
            .tempdir()
            .unwrap();
        let p = Podman {
            dir,
            entrypoint,
            busybox,
        };
        // The probe uses only podman itself (import of a plain rootfs tar), so a bug in our
        // image writer can never turn into a skip.
        let rootfs = p.path("probe-rootfs.tar");
        std::fs::write(&rootfs, p.busybox_layer(&[])).unwrap();
        let r = p.podman(&["import", rootfs.to_str().unwrap(), "localhost/wp-probe:1"]);
        if r.code != Some(0) {
            return skip(&format!("`podman import` failed: {}", last_line(&r.stderr)));
        }
        let mut args = vec!["run", "--rm"];
        args.extend(RUN_FLAGS);
        args.extend(["localhost/wp-probe:1", "/bin/busybox", "true"]);
        let r = p.podman(&args);
        if r.code != Some(0) {
            return skip(&format!(
                "podman cannot start a trivial container (exit {:?}): {}",
                r.code,
                last_line(&r.stderr)
            ));
        }
        // From here on everything must work.
        let img = p.build_image(
            "scratch.tar",
            SCRATCH,
            vec![p.busybox_layer(&[]), p.entrypoint_layer()],
            Some(&["/waypost-entrypoint"]),
            &["/bin/sh"],
        );
        p.load(&img);
        Some(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn command(&self) -> Command {
        let d = self.dir.path();
        let mut c = Command::new("podman");
        c.arg("--root")
            .arg(d.join("storage"))
            .arg("--runroot")
            .arg(d.join("run"))
            .arg("--tmpdir")
            .arg(d.join("tmp"))
            .args([
                "--storage-driver=vfs",
                "--runtime=runc",
                "--cgroup-manager=cgroupfs",
                "--events-backend=none",
            ]);
        c
    }

    /// `podman ARGS` (not checked).
    pub fn podman(&self, args: &[&str]) -> Out {
        let mut c = self.command();
        c.args(args);
        run_cmd(c, self.dir.path(), PODMAN_TIMEOUT)
    }

    /// `podman ARGS`, which must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        self.podman(args)
            .ok(&format!("podman {}", args.join(" ")))
            .stdout
    }

    // ---- images ------------------------------------------------------------------------

    /// A rootfs layer: static busybox at /bin/busybox with applet symlinks, the usual empty
    /// directories, /etc/passwd, /www/index.html, plus `extra` (path, mode, contents).
    pub fn busybox_layer(&self, extra: &[(&str, u32, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let hdr = |ty: tar::EntryType, mode: u32, size: u64| {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(ty);
            h.set_mode(mode);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_size(size);
            h
        };
        for (d, mode) in [
            ("bin", 0o755),
            ("dev", 0o755),
            ("etc", 0o755),
            ("proc", 0o555),
            ("root", 0o700),
            ("sys", 0o555),
            ("tmp", 0o1777),
            ("www", 0o755),
        ] {
            b.append_data(
                &mut hdr(tar::EntryType::Directory, mode, 0),
                format!("{d}/"),
                std::io::empty(),
            )
            .unwrap();
        }
        let bb = std::fs::read(&self.busybox).unwrap();
        b.append_data(
            &mut hdr(tar::EntryType::Regular, 0o755, bb.len() as u64),
            "bin/busybox",
            &bb[..],
        )
        .unwrap();
        for a in APPLETS {
            b.append_link(
                &mut hdr(tar::EntryType::Symlink, 0o777, 0),
                format!("bin/{a}"),
                "busybox",
            )
            .unwrap();
        }
        let files: Vec<(&str, u32, &[u8])> = vec![
            ("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n"),
            ("etc/group", 0o644, b"root:x:0:\n"),
            (
                "www/index.html",
                0o644,
                b"hello from busybox httpd in a scratch image\n",
            ),
        ];
        for (path, mode, content) in files.into_iter().chain(extra.iter().copied()) {
            b.append_data(
                &mut hdr(tar::EntryType::Regular, mode, content.len() as u64),
                path,
                content,
            )
            .unwrap();
        }
        b.into_inner().unwrap()
    }

    /// `COPY waypost-entrypoint /waypost-entrypoint` as a layer.
    pub fn entrypoint_layer(&self) -> Vec<u8> {
        oci::layer::single_file_tar(
            "waypost-entrypoint",
            0o755,
            &std::fs::read(&self.entrypoint).unwrap(),
        )
        .unwrap()
    }

    /// Writes a docker-archive image named `tag` into the test dir; returns its path.
    pub fn build_image(
        &self,
        file: &str,
        tag: &str,
        layers: Vec<Vec<u8>>,
        entrypoint: Option<&[&str]>,
        cmd: &[&str],
    ) -> PathBuf {
        let history: Vec<Value> = (0..layers.len())
            .map(|i| json!({ "created_by": format!("test layer {i}") }))
            .collect();
        let config = json!({
            "architecture": "amd64",
            "os": "linux",
            "created": "2024-01-01T00:00:00Z",
            "config": {
                "Env": ["PATH=/bin"],
                "Entrypoint": entrypoint,
                "Cmd": cmd,
                "WorkingDir": "/",
            },
            "history": history,
        });
        let img = Image::from_parts(config, &layers, false, Flavor::Oci).unwrap();
        let path = self.path(file);
        let r = ImageRef::parse(&format!("docker-archive:{}:{tag}", path.display())).unwrap();
        oci::write(&img, &r).unwrap();
        path
    }

    /// `podman load -i FILE`; returns what it loaded (its "Loaded image:" line).
    pub fn load(&self, archive: &Path) -> String {
        let out = self.ok(&["load", "-i", archive.to_str().unwrap()]);
        out.lines()
            .find_map(|l| {
                l.strip_prefix("Loaded image: ")
                    .or_else(|| l.strip_prefix("Loaded image(s): "))
            })
            .unwrap_or_else(|| panic!("podman load printed no image name: {out}"))
            .trim()
            .to_string()
    }

    /// `podman image inspect` as JSON.
    pub fn inspect_image(&self, image: &str) -> Value {
        let v: Value = serde_json::from_str(&self.ok(&["image", "inspect", image])).unwrap();
        v[0].clone()
    }

    // ---- containers --------------------------------------------------------------------

    /// `podman run -d --name NAME [RUN_FLAGS] EXTRA... IMAGE CMD...`.
    pub fn run_detached(&self, name: &str, extra: &[&str], image: &str, cmd: &[&str]) {
        let mut args = vec!["run", "-d", "--name", name];
        args.extend(RUN_FLAGS);
        args.extend(extra);
        args.push(image);
        args.extend(cmd);
        self.ok(&args);
    }

    /// stdout and stderr of the container so far.
    pub fn logs(&self, name: &str) -> String {
        let o = self.podman(&["logs", name]);
        format!("{}{}", o.stdout, o.stderr)
    }

    /// Waits until the container's output contains `needle`.
    pub fn wait_log(&self, name: &str, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let l = self.logs(name);
            if l.contains(needle) {
                return l;
            }
            if Instant::now() > deadline {
                panic!("container {name} never printed {needle:?}; its output:\n{l}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `podman stop -t T NAME`; returns how long it took.
    pub fn stop(&self, name: &str, timeout_s: u32) -> Duration {
        let t = Instant::now();
        self.ok(&["stop", "-t", &timeout_s.to_string(), name]);
        t.elapsed()
    }

    /// The exit code of a container (waits for it to exit).
    pub fn exit_code(&self, name: &str) -> i32 {
        let out = self.ok(&["wait", name]);
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("podman wait printed {out:?}"))
    }

    pub fn running(&self, name: &str) -> bool {
        self.ok(&["inspect", "--format", "{{.State.Running}}", name])
            .trim()
            == "true"
    }

    /// `podman exec NAME ARGS...`.
    pub fn exec(&self, name: &str, args: &[&str]) -> Out {
        let mut a = vec!["exec", name];
        a.extend(args);
        self.podman(&a)
    }

    /// /proc/1/status inside the container.
    pub fn pid1_status(&self, name: &str) -> String {
        self.exec(name, &["cat", "/proc/1/status"])
            .ok("cat /proc/1/status")
            .stdout
    }

    /// /proc/1/cmdline inside the container, NULs as spaces.
    pub fn pid1_cmdline(&self, name: &str) -> String {
        self.exec(name, &["cat", "/proc/1/cmdline"])
            .ok("cat /proc/1/cmdline")
            .stdout
            .replace('\0', " ")
    }

    /// Every process inside the container: (pid, command name, state letter), from
    /// /proc/*/stat (zombies included: their stat lives until they are reaped). A process may
    /// vanish between the glob and the read (orphans exiting is the point), so cat's complaint
    /// about it is ignored.
    pub fn procs(&self, name: &str) -> Vec<(u32, String, char)> {
        let out = self
            .exec(
                name,
                &["sh", "-c", "cat /proc/[0-9]*/stat 2>/dev/null; exit 0"],
            )
            .ok("reading /proc/*/stat")
            .stdout;
        out.lines()
            .filter_map(|l| {
                let (pid, rest) = l.split_once(" (")?;
                let (comm, rest) = rest.rsplit_once(") ")?;
                Some((pid.parse().ok()?, comm.to_string(), rest.chars().next()?))
            })
            .collect()
    }

    /// The zombie processes inside the container.
    pub fn zombies(&self, name: &str) -> Vec<(u32, String, char)> {
        self.procs(name)
            .into_iter()
            .filter(|p| p.2 == 'Z')
            .collect()
    }
}

fn last_line(s: &str) -> String {
    s.trim_end()
        .lines()
        .last()
        .unwrap_or("(no output)")
        .to_string()
}

/// Anything mounted under `dir` (a container's shm, a leftover overlay) is unmounted.
fn unmount_under(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| Path::new(m).starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for m in points {
        let _ = Command::new("umount")
            .args(["-l", m])
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let d = self.dir.path().to_path_buf();
        let mut c = self.command();
        c.args(["rm", "--all", "--force", "--time", "0"]);
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_cmd(c, &d, PODMAN_TIMEOUT)
        }));
        let mut c = self.command();
        c.args(["rmi", "--all", "--force"]);
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_cmd(c, &d, PODMAN_TIMEOUT)
        }));
        unmount_under(&d);
    }
}
