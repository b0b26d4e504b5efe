//! waypost-entrypoint: runs an application as its child — a complete init (signal forwarding,
//! reaping, exit codes) that, given a waypost server, also ships the app's logs and takes its
//! configuration, exec sessions and URL traffic over one outbound TLS connection.
//!
//! Layout (docs/architecture.md): `reactor` is the one event loop and the only place doing I/O or
//! reading the clock; `agent` is the one sans-IO core it drives, which owns the other policy
//! cores (`session`, `supervisor`, `logs`, `app_config`, `exec`, `tunnel`); `sys` holds all raw
//! system calls that need it.
#![deny(unsafe_code)]

pub mod logger;
pub mod logs;

pub mod agent;
pub mod app_config;
pub mod error;
pub mod exec;
pub mod flow;
pub mod reactor;
pub mod relay;
pub mod session;
pub mod settings;
pub mod supervisor;
pub mod sys;
pub mod tls;
pub mod tunnel;
pub mod wire;

use std::ffi::OsString;

/// Printed by `--help`.
const HELP: &str = "\
waypost-entrypoint: run an app as a supervised child (init + waypost agent)

Usage:
  waypost-entrypoint [--] CMD [ARG...]
  waypost-entrypoint --version | --help

CMD is looked up on PATH. Signals are forwarded to it, orphans are reaped, and the exit code is
CMD's (128+N if it died of signal N; 127 not found, 126 not executable, 2 bad usage/config).

Configured by environment variables:
  WAYPOST_SERVER           host:port of the waypost control server, or a comma-separated
                           list of replicas (unset: plain init)
  WAYPOST_TOKEN            entrypoint token (removed from the app's environment)
  WAYPOST_CA               CA certificate: a PEM file path, the PEM text, or base64 of it
  WAYPOST_TLS_SKIP_VERIFY  1: do not verify the server (development only)
  WAYPOST_DISABLE          1: init duties only, no server, no output capture
  WAYPOST_DISABLE_CONFIG / _LOGS / _EXEC / _URL   1: switch one feature off
  WAYPOST_EXEC_ALLOW       comma-separated programs exec may run (default: any)
  WAYPOST_SERVER_REQUIRED  1: do not start CMD until the server sent its config
  WAYPOST_STARTUP_TIMEOUT  wait this long for config before starting anyway (default 5s)
  WAYPOST_STOP_TIMEOUT     SIGKILL this long after a forwarded SIGTERM/SIGINT/SIGQUIT (default 30s)
  WAYPOST_SIGNAL_GROUP     1: forward signals to CMD's whole process group
  WAYPOST_LOG_LEVEL        TRACE DEBUG INFO WARN ERROR (default DEBUG)
  WAYPOST_LOG_BUFFER       log bytes kept while the server is unreachable (default 1MiB, min 64KiB)
  WAYPOST_LOG_MODE         drop (default: never block the app) or block (its writes wait)
  WAYPOST_FLUSH_TIMEOUT    after CMD exits, time to hand the server its last logs (default 2s)
  WAYPOST_CAPTURE          1: capture CMD's output even when stdout is a terminal
  WAYPOST_URL_HOLD         0: do not hold URL visitors during a config restart (default 1)
  WAYPOST_URL_PORTS        ports on 127.0.0.1 the URL service may reach besides PORT,
                           comma-separated, or * for any (default: PORT only)
  WAYPOST_LABELS           k=v,k2=v2: this instance's labels, for config selectors and filters
  PORT                     the app's port for the URL service (default: CMD gets PORT=5000)
  HTTPS_PROXY / NO_PROXY   reach the server through an HTTP CONNECT proxy
";

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Cli {
    Help,
    Version,
    Run(Vec<OsString>),
}

/// `[--] CMD [ARG...]`, `--version`, `--help`. Everything after CMD belongs to CMD.
pub fn parse_args(args: Vec<OsString>) -> Result<Cli, error::Error> {
    let Some(first) = args.first() else {
        return Err(error::Error::Usage(
            "no command given (usage: waypost-entrypoint [--] CMD [ARG...])".into(),
        ));
    };
    match first.to_str() {
        Some("--help" | "-h") => Ok(Cli::Help),
        Some("--version" | "-V") => Ok(Cli::Version),
        Some("--") if args.len() == 1 => {
            Err(error::Error::Usage("no command given after --".into()))
        }
        Some("--") => Ok(Cli::Run(args[1..].to_vec())),
        Some(opt) if opt.starts_with('-') && opt.len() > 1 => Err(error::Error::Usage(format!(
            "unknown option {opt} (usage: waypost-entrypoint [--] CMD [ARG...])"
        ))),
        _ => Ok(Cli::Run(args)),
    }
}

/// The whole program; returns the exit code.
pub fn main() -> i32 {
    let argv = match parse_args(std::env::args_os().skip(1).collect()) {
        Ok(Cli::Help) => {
            print!("{HELP}");
            return 0;
        }
        Ok(Cli::Version) => {
            println!("waypost-entrypoint {}", env!("CARGO_PKG_VERSION"));
            return 0;
        }
        Ok(Cli::Run(argv)) => argv,
        Err(e) => return reactor::fail_early(&e),
    };
    let settings = match settings::Settings::from_vars(std::env::vars_os()) {
        Ok(s) => s,
        Err(e) => return reactor::fail_early(&e),
    };
    logger::set_level(settings.log_level);
    // The settings hold the token now. Before any thread, child or connection exists, blank our
    // own copy in the environment block (the app, running as our user, could read it in
    // /proc/PID/environ) and close /proc/PID/mem and ptrace to our user. The child's environment
    // is built from what is left, minus the same names.
    sys::environ::scrub(&settings::SECRET_VARS);
    if let Err(e) = sys::environ::forbid_inspection() {
        crate::warn!(
            "cannot mark the entrypoint non-dumpable (its memory stays readable by the app's user): {e}"
        );
    }
    reactor::run(settings, argv)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    #[test]
    fn help_names_every_variable_the_entrypoint_reads() {
        // The DISABLE_* family is written once as `WAYPOST_DISABLE_CONFIG / _LOGS / ...`.
        for name in settings::KNOWN {
            let short = name
                .strip_prefix("WAYPOST_DISABLE")
                .filter(|r| !r.is_empty());
            let listed = match short {
                Some(rest) => HELP.contains(rest),
                None => HELP.contains(name),
            };
            assert!(
                listed || name == "WAYPOST_DATA_DIR",
                "--help does not mention {name}"
            );
        }
    }

    #[test]
    fn command_lines() {
        assert_eq!(parse_args(args(&["--help"])).unwrap(), Cli::Help);
        assert_eq!(parse_args(args(&["--version"])).unwrap(), Cli::Version);
        assert_eq!(
            parse_args(args(&["sh", "-c", "x"])).unwrap(),
            Cli::Run(args(&["sh", "-c", "x"]))
        );
        assert_eq!(
            parse_args(args(&["--", "-weird"])).unwrap(),
            Cli::Run(args(&["-weird"]))
        );
        assert_eq!(
            parse_args(args(&["app", "--version"])).unwrap(),
            Cli::Run(args(&["app", "--version"]))
        );
        for bad in [
            &[][..],
            &["--"][..],
            &["--frobnicate"][..],
            &["-x", "sh"][..],
        ] {
            let e = parse_args(args(bad)).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad:?}");
        }
    }
}
