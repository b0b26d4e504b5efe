//! `waypost instances -w`: asks the API every second and shows the table again when it changed.
//! On a terminal the screen is cleared (ANSI) and the table redrawn in place, ages included;
//! piped, a table is printed (then a blank line) only when something other than the ages
//! changed, so a log of it shows changes, not the clock. Ctrl-C ends it with exit code 0.

use super::{INSTANCES_AGE_COLUMN, InstancesArgs, InstancesView, instances_view, table_text};
use crate::client::ApiClient;
use anyhow::Result;
use std::io::Write as _;
use std::time::Duration;

const EVERY: Duration = Duration::from_secs(1);
/// Cursor home, clear the screen.
const CLEAR: &str = "\x1b[H\x1b[2J";

/// What is shown for one answer: the text, and what counts as a change (the text without the
/// age column).
fn render(view: &InstancesView) -> (String, String) {
    match view {
        InstancesView::Empty(msg) => (format!("{msg}\n"), msg.clone()),
        InstancesView::Table(rows) => {
            let age = rows
                .first()
                .and_then(|h| h.iter().position(|c| c == INSTANCES_AGE_COLUMN));
            let key_rows: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    r.iter()
                        .enumerate()
                        .filter(|(i, _)| Some(*i) != age)
                        .map(|(_, c)| c.clone())
                        .collect()
                })
                .collect();
            (table_text(rows), table_text(&key_rows))
        }
    }
}

pub async fn instances(c: &ApiClient, path: &str, a: &InstancesArgs) -> Result<()> {
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    // One handler for the whole watch, so a Ctrl-C between two polls is not missed.
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut shown, mut shown_key) = (String::new(), None::<String>);
    let mut last_error = None::<String>;
    let mut stalled = false;
    loop {
        let answer = tokio::select! {
            _ = interrupt.recv() => return Ok(()),
            r = async {
                tick.tick().await;
                c.get::<serde_json::Value>(path).await
            } => r,
        };
        let v = match answer {
            Ok(v) => {
                last_error = None;
                v
            }
            // The server restarting or briefly away does not end a watch: said once, retried.
            Err(e) => {
                let msg = format!("{e:#}").replace('\n', " ");
                if last_error.as_ref() != Some(&msg) {
                    eprintln!("waypost: error: {msg} (retrying every second; Ctrl-C stops)");
                    last_error = Some(msg);
                }
                continue;
            }
        };
        // The intake warning when it starts, not every second.
        let now_stalled = v["log_intake"]["stalled"] == serde_json::json!(true);
        if now_stalled && !stalled {
            super::logs::warn_if_intake_stalled(&v["log_intake"]);
        }
        stalled = now_stalled;
        let (text, key) = render(&instances_view(&v, a)?);
        let changed = if tty {
            text != shown
        } else {
            shown_key.as_ref() != Some(&key)
        };
        if !changed {
            continue;
        }
        let out = if tty {
            format!("{CLEAR}{text}")
        } else {
            format!("{text}\n")
        };
        let mut stdout = std::io::stdout().lock();
        match stdout
            .write_all(out.as_bytes())
            .and_then(|()| stdout.flush())
        {
            // The reader went away (`| head`): done, not failed.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            r => r?,
        }
        shown = text;
        shown_key = Some(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(age: &str, state: &str) -> InstancesView {
        InstancesView::Table(vec![
            vec!["ID".into(), "STATE".into(), INSTANCES_AGE_COLUMN.into()],
            vec!["ab12".into(), state.into(), age.into()],
        ])
    }

    #[test]
    fn ages_alone_are_no_change_but_redraw_a_terminal() {
        let (t1, k1) = render(&table("5s", "running"));
        let (t2, k2) = render(&table("6s", "running"));
        let (_, k3) = render(&table("6s", "exited 1"));
        assert_ne!(t1, t2, "a terminal shows the new age");
        assert_eq!(k1, k2, "piped, the age alone is no change");
        assert_ne!(k2, k3);
        assert!(t1.contains("UP/SINCE") && !k1.contains("UP/SINCE"));
        let (t, k) = render(&InstancesView::Empty("no live instances".into()));
        assert_eq!(
            (t.as_str(), k.as_str()),
            ("no live instances\n", "no live instances")
        );
    }
}
