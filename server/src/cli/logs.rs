//! `waypost logs` (reads the NDJSON stream of `GET /v1/apps/{app}/logs`, following it with -f)
//! and `waypost app set` (log retention).

use crate::util;
use anyhow::{Context as _, Result, bail};
use clap::{Args, ValueEnum};
use http_body_util::BodyExt as _;
use hyper::Method;
use serde_json::{Value, json};
use std::io::Write as _;

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum StreamArg {
    Stdout,
    Stderr,
    Entrypoint,
}

impl StreamArg {
    fn as_str(self) -> &'static str {
        match self {
            StreamArg::Stdout => "stdout",
            StreamArg::Stderr => "stderr",
            StreamArg::Entrypoint => "entrypoint",
        }
    }
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Output {
    /// timestamp, short instance id, stream, line
    Text,
    /// one JSON object per line: exact bytes in data_b64, a lossy UTF-8 `text`
    Json,
}

#[derive(Args)]
pub struct LogsArgs {
    #[arg(short = 'a', long, env = "WAYPOST_APP")]
    app: String,
    /// Only this instance: its hex id or any unique prefix of it.
    #[arg(long, value_name = "ID")]
    instance: Option<String>,
    /// Keep printing new lines as they arrive, including from instances that start later.
    #[arg(short = 'f', long)]
    follow: bool,
    /// Only lines newer than this: a duration (10m, 2h) or an RFC 3339 time.
    #[arg(long, value_name = "DURATION|TIME")]
    since: Option<String>,
    /// Only the last N lines (of those within --since); with -f, then follow.
    #[arg(long, value_name = "N")]
    tail: Option<u64>,
    /// Only this stream.
    #[arg(long, value_enum)]
    stream: Option<StreamArg>,
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Text)]
    output: Output,
    /// Print the app's log retention, usage and per-instance loss counts instead of lines.
    #[arg(long, conflicts_with_all = ["follow", "since", "tail", "stream", "instance"])]
    stats: bool,
}

#[derive(Args)]
pub struct AppSetArgs {
    name: String,
    /// Keep at most this many log lines of the app (oldest pruned first; 0 = the default,
    /// 2000000).
    #[arg(long, value_name = "N")]
    log_lines: Option<u64>,
    /// Keep at most this many bytes of log lines, e.g. 512MiB (0 = the default, 512MiB).
    #[arg(long, value_name = "SIZE")]
    log_bytes: Option<String>,
}

pub async fn app_set(a: AppSetArgs) -> Result<()> {
    if !util::valid_app_name(&a.name) {
        bail!("invalid app name {:?}", a.name);
    }
    if a.log_lines.is_none() && a.log_bytes.is_none() {
        bail!("nothing to set: give --log-lines and/or --log-bytes");
    }
    let bytes = a
        .log_bytes
        .as_deref()
        .map(|v| waypost_proto::parse_size(v).map_err(anyhow::Error::msg))
        .transpose()?;
    let c = super::client_for(&super::resolve_target()?)?;
    let v: Value = c
        .call(
            Method::PATCH,
            &format!("/v1/apps/{}/logs/retention", a.name),
            Some(&json!({ "max_lines": a.log_lines, "max_bytes": bytes })),
        )
        .await?;
    println!(
        "app {}: logs keep at most {} lines and {} (now {} lines, {})",
        a.name,
        v["retention"]["max_lines"],
        util::fmt_bytes(v["retention"]["max_bytes"].as_u64().unwrap_or(0)),
        v["usage"]["lines"],
        util::fmt_bytes(v["usage"]["bytes"].as_u64().unwrap_or(0)),
    );
    Ok(())
}

/// Percent-encodes a query value.
fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Bytes as text: valid UTF-8 as it is, other bytes as `\xNN`.
pub fn escape_bytes(data: &[u8]) -> String {
    let mut s = String::with_capacity(data.len());
    for chunk in data.utf8_chunks() {
        s.push_str(chunk.valid());
        for b in chunk.invalid() {
            s.push_str(&format!("\\x{b:02x}"));
        }
    }
    s
}

struct Printer {
    json: bool,
    color: bool,
    /// Rows written (markers included), for the note on an empty result.
    rows: u64,
    out: std::io::BufWriter<std::io::StdoutLock<'static>>,
}

const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

impl Printer {
    fn stream_color(stream: &str) -> &'static str {
        match stream {
            "stderr" => "\x1b[31m",
            "entrypoint" => "\x1b[36m",
            _ => "\x1b[32m",
        }
    }

    fn instance_color(id: &str) -> &'static str {
        const C: [&str; 6] = [
            "\x1b[33m", "\x1b[34m", "\x1b[35m", "\x1b[36m", "\x1b[93m", "\x1b[94m",
        ];
        let h = id
            .bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize));
        C[h % C.len()]
    }

    /// One row of the stream (`raw`: the server's JSON line, `v`: parsed). Err: stdout is gone
    /// (e.g. `| head`).
    fn row(&mut self, raw: &[u8], v: &Value) -> std::io::Result<()> {
        self.rows += 1;
        if self.json {
            self.out.write_all(raw)?;
            return self.out.write_all(b"\n");
        }
        let ts = v["ts"].as_str().unwrap_or("");
        // Milliseconds are enough on a terminal.
        let ts = match (ts.len(), ts.ends_with('Z')) {
            (27, true) => format!("{}Z", &ts[..23]),
            _ => ts.to_string(),
        };
        let inst: String = v["instance"]
            .as_str()
            .unwrap_or("")
            .chars()
            .take(8)
            .collect();
        let (c_ts, c_inst, reset) = if self.color {
            (DIM, Self::instance_color(&inst), RESET)
        } else {
            ("", "", "")
        };
        if let Some(n) = v["dropped"].as_u64() {
            let (c, r) = if self.color {
                ("\x1b[1;33m", RESET)
            } else {
                ("", "")
            };
            return writeln!(
                self.out,
                "{c_ts}{ts}{reset} {c_inst}{inst}{reset} {:<10} {c}[{n} line{} dropped]{r}",
                "-",
                if n == 1 { "" } else { "s" }
            );
        }
        let stream = v["stream"].as_str().unwrap_or("stdout");
        let data = v["data_b64"]
            .as_str()
            .and_then(util::base64_decode)
            .unwrap_or_default();
        let c_stream = if self.color {
            Self::stream_color(stream)
        } else {
            ""
        };
        let more = if v["truncated"] == json!(true) {
            "…"
        } else {
            ""
        };
        writeln!(
            self.out,
            "{c_ts}{ts}{reset} {c_inst}{inst}{reset} {c_stream}{stream:<10}{reset} {}{more}",
            escape_bytes(&data)
        )
    }
}

/// One warning line on stderr when the server's log intake state (`{"stalled": true, "since",
/// "error"}`, from `/v1/instances`, the logs endpoint's header or a follower's notice) says it
/// cannot store logs: otherwise a full disk looks like an app that went quiet. Stdout (tables,
/// JSON) is left as it is, so it stays parseable.
pub fn warn_if_intake_stalled(state: &Value) {
    if state["stalled"] == json!(true) {
        eprintln!(
            "waypost: warning: the server cannot store logs since {}: {} (new lines wait in \
             the instances' buffers until it can)",
            state["since"].as_str().unwrap_or("?"),
            state["error"].as_str().unwrap_or("unknown error")
        );
    }
}

fn stdout_is_terminal() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stdout())
}

/// Colors only on a terminal, and never with `NO_COLOR` set to anything but empty
/// (https://no-color.org). The only colors the CLI prints are these log lines'.
fn color_wanted(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

pub async fn run(a: LogsArgs) -> Result<()> {
    if !util::valid_app_name(&a.app) {
        bail!("invalid app name {:?}", a.app);
    }
    let c = super::client_for(&super::resolve_target()?)?;
    if a.stats {
        let v: Value = c.get(&format!("/v1/apps/{}/logs/stats", a.app)).await?;
        if a.output == Output::Json {
            println!("{}", serde_json::to_string_pretty(&v)?);
            return Ok(());
        }
        println!(
            "app {}: {} lines, {} stored; keeps at most {} lines and {}",
            a.app,
            v["usage"]["lines"],
            util::fmt_bytes(v["usage"]["bytes"].as_u64().unwrap_or(0)),
            v["retention"]["max_lines"],
            util::fmt_bytes(v["retention"]["max_bytes"].as_u64().unwrap_or(0)),
        );
        let mut rows = vec![vec![
            "INSTANCE".to_string(),
            "ENTRIES".into(),
            "LOST".into(),
        ]];
        for i in v["instances"].as_array().into_iter().flatten() {
            rows.push(vec![
                i["instance"]
                    .as_str()
                    .unwrap_or("")
                    .chars()
                    .take(8)
                    .collect(),
                i["next_seq"].to_string(),
                i["lost"].to_string(),
            ]);
        }
        if rows.len() > 1 {
            super::print_table(&rows);
        }
        return Ok(());
    }
    if let Some(i) = &a.instance {
        if i.is_empty() || i.len() > 32 || !i.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("invalid --instance {i:?}: give its hex id or a unique prefix of it");
        }
    }
    if let Some(s) = &a.since {
        if util::parse_rfc3339(s).is_none() && util::parse_duration(s).is_err() {
            bail!("invalid --since {s:?}: give a duration (10m, 2h) or an RFC 3339 time");
        }
    }
    let mut path = format!("/v1/apps/{}/logs?follow={}", a.app, a.follow);
    if let Some(i) = &a.instance {
        path.push_str(&format!("&instance={}", enc(i)));
    }
    if let Some(s) = &a.since {
        path.push_str(&format!("&since={}", enc(s)));
    }
    if let Some(t) = a.tail {
        path.push_str(&format!("&tail={t}"));
    }
    if let Some(s) = a.stream {
        path.push_str(&format!("&stream={}", s.as_str()));
    }
    let resp = c.send(Method::GET, &path, None).await?;
    let status = resp.status();
    let intake = resp
        .headers()
        .get(crate::server::logs::INTAKE_HEADER)
        .and_then(|v| serde_json::from_slice::<Value>(v.as_bytes()).ok());
    let mut body = resp.into_body();
    if !status.is_success() {
        let bytes = body
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading the API response: {e}"))?
            .to_bytes();
        let msg = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).trim().to_string());
        return Err(crate::client::ApiError {
            status,
            message: msg,
        }
        .into());
    }
    if let Some(state) = &intake {
        warn_if_intake_stalled(state);
    }
    let mut p = Printer {
        json: a.output == Output::Json,
        color: a.output == Output::Text
            && color_wanted(
                stdout_is_terminal(),
                std::env::var_os("NO_COLOR").as_deref(),
            ),
        rows: 0,
        out: std::io::BufWriter::new(std::io::stdout().lock()),
    };
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let frame = match body.frame().await {
            None => break,
            Some(Err(e)) => {
                let _ = p.out.flush();
                return Err(anyhow::anyhow!("the log stream broke off: {e}"));
            }
            Some(Ok(f)) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        let mut start = 0;
        while let Some(nl) = pending[start..].iter().position(|&b| b == b'\n') {
            let line = &pending[start..start + nl];
            start += nl + 1;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue; // keep-alive
            }
            let v: Value =
                serde_json::from_slice(line).context("unexpected log stream from the server")?;
            if let Some(e) = v.get("error").and_then(Value::as_str) {
                let _ = p.out.flush();
                bail!("{e}");
            }
            // A follower's notice that intake stalled or resumed: stderr, never a row.
            if let Some(state) = v.get("log_intake") {
                let _ = p.out.flush();
                if state["stalled"] == json!(true) {
                    warn_if_intake_stalled(state);
                } else {
                    eprintln!("waypost: the server stores logs again");
                }
                continue;
            }
            if let Err(e) = p.row(line, &v) {
                if e.kind() == std::io::ErrorKind::BrokenPipe {
                    return Ok(());
                }
                return Err(e.into());
            }
        }
        pending.drain(..start);
        // Lines show up as they arrive (follow), without flushing per line in bulk reads.
        match p.out.flush() {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            r => r?,
        }
    }
    match p.out.flush() {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
        r => r?,
    }
    if a.follow {
        bail!("the server ended the log stream (it is shutting down or restarting)");
    }
    // Nothing at all looks like a hang or a wrong app on a terminal; piped, empty stays empty.
    if p.rows == 0 && stdout_is_terminal() {
        let filtered = a.instance.is_some() || a.since.is_some() || a.stream.is_some();
        if filtered {
            eprintln!(
                "no log lines of app {} match --instance/--since/--stream",
                a.app
            );
        } else {
            eprintln!("no log lines for app {} (yet)", a.app);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn color_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(color_wanted(true, None));
        assert!(
            color_wanted(true, Some(OsStr::new(""))),
            "empty NO_COLOR is unset"
        );
        assert!(!color_wanted(true, Some(OsStr::new("1"))));
        assert!(!color_wanted(false, None));
    }

    #[test]
    fn escapes() {
        assert_eq!(escape_bytes(b"ok \xff\xfe \xc3\xa9"), "ok \\xff\\xfe é");
        assert_eq!(enc("2026-01-01T00:00:00Z"), "2026-01-01T00%3A00%3A00Z");
    }
}
