//! `waypost inject`: put the static entrypoint into a container image — one new layer with
//! `/waypost-entrypoint`, the image's Entrypoint prefixed with it — without a container daemon.
//! The image manipulation itself is in [`crate::oci`].

use crate::oci::{self, ImageRef, InjectOptions, Outcome};
use crate::util;
use anyhow::{Context as _, Result, bail};
use clap::Args;
use std::path::{Path, PathBuf};

const ENTRYPOINT: &str = "waypost-entrypoint";
/// Where `make build` puts the static entrypoint, relative to the repository root.
const MUSL_BUILD: &str = "target/x86_64-unknown-linux-musl/min/waypost-entrypoint";

#[derive(Args, Debug)]
#[command(after_help = "\
SRC and DST use skopeo's transport syntax:
  oci:DIR[:TAG]                    an OCI image layout directory (skopeo copy ... oci:DIR)
  oci-archive:FILE[:TAG]           a tarball of one (podman save --format oci-archive)
  docker-archive:FILE[:NAME:TAG]   docker save / podman save output
DST is written fresh in its own format (never over SRC); SRC is never modified.
Injecting an already-injected image adds nothing: DST is then an unchanged copy (plus any
--env change). Tokens are never baked in: give WAYPOST_TOKEN to the container at run time.

Example:
  podman save -o app.tar localhost/app:1
  waypost inject docker-archive:app.tar docker-archive:app-wp.tar:localhost/app:1-wp
  waypost token create --app app -o env > app.env     # server, token, CA: given at run time
  podman load -i app-wp.tar && podman run --env-file app.env localhost/app:1-wp")]
pub struct InjectArgs {
    /// Bake a non-secret setting into the image's Env (repeatable; replaces an existing KEY),
    /// e.g. WAYPOST_SERVER=host:9701. WAYPOST_TOKEN is refused.
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// The static entrypoint binary (default: waypost-entrypoint next to this waypost, else
    /// ./target/x86_64-unknown-linux-musl/min/waypost-entrypoint).
    #[arg(long, value_name = "PATH")]
    entrypoint_binary: Option<PathBuf>,
    /// The image to read.
    #[arg(value_name = "SRC")]
    src: String,
    /// Where to write the result.
    #[arg(value_name = "DST")]
    dst: String,
}

/// Reads `p` and checks that it is a static ELF executable.
fn load_static(p: &Path) -> Result<(Vec<u8>, oci::elf::ElfInfo), String> {
    let b = std::fs::read(p).map_err(|e| e.to_string())?;
    let info = oci::elf::check_static(&b)?;
    Ok((b, info))
}

/// --entrypoint-binary, else next to this executable, else the musl build under the current
/// directory. A candidate found by lookup that is not static (e.g. the debug build next to a
/// debug `waypost`) is skipped, and named in the error if nothing else is found.
fn find_entrypoint(explicit: Option<&Path>) -> Result<(PathBuf, Vec<u8>, oci::elf::ElfInfo)> {
    if let Some(p) = explicit {
        let (b, info) = load_static(p)
            .map_err(|e| anyhow::anyhow!("--entrypoint-binary {}: {e}", p.display()))?;
        return Ok((p.to_path_buf(), b, info));
    }
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        candidates.push(dir.join(ENTRYPOINT));
    }
    candidates.push(PathBuf::from(MUSL_BUILD));
    let mut skipped = Vec::new();
    for c in candidates {
        if !c.is_file() {
            continue;
        }
        match load_static(&c) {
            Ok((b, info)) => return Ok((c, b, info)),
            Err(e) => skipped.push(format!("{} ({e})", c.display())),
        }
    }
    let mut msg = format!(
        "cannot find a static {ENTRYPOINT}: build it with `make build` ({MUSL_BUILD}), put it next \
         to waypost, or pass --entrypoint-binary PATH"
    );
    if !skipped.is_empty() {
        msg.push_str(&format!("; skipped: {}", skipped.join("; ")));
    }
    bail!(msg)
}

fn json_list(v: &[String]) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

pub fn run(a: InjectArgs) -> Result<i32> {
    // Everything that can be refused is refused before any file is read or written.
    let env = a
        .env
        .iter()
        .map(|kv| oci::parse_env(kv))
        .collect::<Result<Vec<_>>>()?;
    for (k, _) in &env {
        let upper = k.to_ascii_uppercase();
        if ["TOKEN", "SECRET", "PASSWORD", "PRIVATE_KEY"]
            .iter()
            .any(|w| upper.contains(w))
        {
            eprintln!(
                "waypost: warning: {k} looks like a secret; anyone who can pull the image can read \
                 its Env, so secrets belong in the container's environment at run time"
            );
        }
    }
    let src = ImageRef::parse(&a.src)?;
    let dst = ImageRef::parse(&a.dst)?;
    oci::check_destination(&src, &dst)?;
    let (bin_path, binary, elf) = find_entrypoint(a.entrypoint_binary.as_deref())?;

    let mut img = oci::read(&src, elf.arch)?;
    let outcome = oci::inject(
        &mut img,
        &InjectOptions {
            binary: &binary,
            env: &env,
        },
    )
    .with_context(|| format!("injecting into {src}"))?;
    oci::write(&img, &dst)?;

    for n in &img.notes {
        eprintln!("waypost: note: {n}");
    }
    let baked = || {
        env.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    match outcome {
        Outcome::Injected {
            layer_digest,
            compressed,
            uncompressed,
            entrypoint,
            cmd,
            ..
        } => {
            println!("injected {} into {dst}", bin_path.display());
            println!(
                "  layer       {layer_digest} (+{} compressed, {} uncompressed)",
                util::fmt_bytes(compressed),
                util::fmt_bytes(uncompressed)
            );
            println!("  config      {}", img.config_digest());
            println!("  Entrypoint  {}", json_list(&entrypoint));
            println!(
                "  Cmd         {}",
                if cmd.is_empty() {
                    "(none)".to_string()
                } else {
                    json_list(&cmd)
                }
            );
            if !env.is_empty() {
                println!("  Env baked   {}", baked());
            }
            if cmd.is_empty() && entrypoint.len() == 1 {
                eprintln!(
                    "waypost: warning: the image has neither Entrypoint nor Cmd; give the command \
                     to run when starting the container"
                );
            }
            println!(
                "Give the container WAYPOST_TOKEN (and WAYPOST_CA) at run time, e.g. \
                 `waypost token create --app APP -o env > app.env` and `--env-file app.env`."
            );
        }
        Outcome::AlreadyInjected {
            by_waypost,
            env_changed,
        } => {
            let why = if by_waypost {
                "already injected (Entrypoint[0] is /waypost-entrypoint and the waypost-inject \
                 history entry is present)"
            } else {
                "the image already runs /waypost-entrypoint (hand-built: Entrypoint[0] is \
                 /waypost-entrypoint)"
            };
            if env_changed {
                println!(
                    "{why}: no layer added; updated Env only ({}) and wrote {dst} (config {})",
                    baked(),
                    img.config_digest()
                );
            } else {
                println!("{why}: nothing to change; wrote an unchanged copy to {dst}");
            }
        }
    }
    Ok(0)
}
