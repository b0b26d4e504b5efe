//! Config templates, scopes, secrets, history, dotenv import and config sources end to end: the
//! real server, the real entrypoint, and `sh` children that record their whole environment
//! (`env -0`) at every start into `$D/env.N`.

use crate::common::entrypoint::{Builder, Entrypoint};
use crate::common::*;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;

/// The child: counts its starts in `$D/starts` and writes its environment (NUL-separated, so
/// values with newlines survive) to `$D/env.N` at its N-th start, atomically; then waits.
const RECORDER: &str = r#"echo x >> "$D/starts"; n=$(($(wc -l < "$D/starts"))); env -0 > "$D/env.tmp" && mv "$D/env.tmp" "$D/env.$n"; exec sleep 1000"#;

fn spawn(b: Builder) -> Option<Entrypoint> {
    b.env("WAYPOST_STARTUP_TIMEOUT", "20s").spawn()
}

/// How many times the child has started so far.
fn starts(ep: &Entrypoint) -> usize {
    ep.file("starts").unwrap_or_default().lines().count()
}

/// The environment the child had at its `n`-th start (waits for that start).
fn child_env(ep: &Entrypoint, n: usize) -> BTreeMap<String, String> {
    let text = wait_for(
        &format!(
            "start {n} of the child (it has started {} times)\n{}",
            starts(ep),
            ep.stderr()
        ),
        || ep.file(&format!("env.{n}")),
    );
    text.split('\0')
        .filter(|e| !e.is_empty())
        .filter_map(|e| e.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `config list -o json` of an app, or of the global scope (`app` None).
fn list_json(server: &Server, app: Option<&str>) -> Value {
    let mut args = vec!["config", "list", "-o", "json"];
    match app {
        Some(a) => args.extend(["-a", a]),
        None => args.push("--global"),
    }
    server.cli(&args).ok().json()
}

/// The version the app's instances see (global and app together).
fn version(server: &Server, app: &str) -> u64 {
    list_json(server, Some(app))["version"].as_u64().unwrap()
}

/// Waits until the instance reports (at least) config version `v` applied.
fn wait_applied(server: &Server, ep: &Entrypoint, v: u64) {
    let pid = ep.pid();
    wait_for(
        &format!("the instance to apply config version {v}\n{}", ep.stderr()),
        || {
            server
                .instances(false)
                .into_iter()
                .find(|i| i["entrypoint_pid"] == pid)
                .filter(|i| i["config_version"].as_u64() >= Some(v))
        },
    );
}

/// `config get` of one name, printed value (trimmed of the final newline).
fn get(server: &Server, args: &[&str]) -> String {
    let mut all = vec!["config", "get"];
    all.extend(args);
    let out = server.cli(&all).ok().stdout;
    out.strip_suffix('\n').unwrap_or(&out).to_string()
}

/// The entry for `key` (not internal) in a `config list -o json` answer with this scope and
/// `where`, if any.
fn entry<'v>(list: &'v Value, key: &str, scope: &str, selector: Option<&str>) -> Option<&'v Value> {
    list["entries"].as_array().unwrap().iter().find(|e| {
        e["key"] == key
            && e["internal"] == false
            && e["scope"] == scope
            && e["where"].as_str() == selector
            && e["deployment"].is_null()
    })
}

/// A CLI command for `server` with no default app in its environment either.
fn cli_without_app(server: &Server, args: &[&str]) -> Run {
    let mut c = server.env.command();
    c.env_remove("WAYPOST_APP").args(args);
    Run::from_output(c.output().unwrap())
}

#[test]
fn a_template_composes_database_url_from_internal_variables() {
    let server = Server::start(&[]);
    let token = server.entrypoint_token("web", None);
    server
        .cli(&["config", "policy", "-a", "web", "--splay", "0"])
        .ok();
    let internal = server
        .cli(&[
            "config",
            "set",
            "-a",
            "web",
            "--internal",
            "DB_USER=app",
            "DB_HOST=db.internal",
        ])
        .ok();
    assert!(internal.stdout.contains("internal"), "{}", internal.stdout);
    server
        .cli(&["config", "set", "-a", "web", "--secret", "DB_PASS=pw"])
        .ok();
    server
        .cli(&[
            "config",
            "set",
            "-a",
            "web",
            "DATABASE_URL=postgres://${internal.DB_USER}:${DB_PASS}@${internal.DB_HOST}/web",
            "PLAIN=${base64(internal.DB_USER)}",
        ])
        .ok();
    let Some(ep) = spawn(Builder::with_token(&server, &token, RECORDER)) else {
        return;
    };

    let env = child_env(&ep, 1);
    assert_eq!(
        env.get("DATABASE_URL").map(String::as_str),
        Some("postgres://app:pw@db.internal/web"),
        "{env:?}"
    );
    assert_eq!(env.get("DB_PASS").map(String::as_str), Some("pw"));
    // A template function over an internal variable: base64("app").
    assert_eq!(env.get("PLAIN").map(String::as_str), Some("YXBw"));
    // Internal variables feed templates only; they never reach the app.
    for k in ["DB_USER", "DB_HOST", "internal.DB_USER"] {
        assert!(!env.contains_key(k), "{k} leaked into the child: {env:?}");
    }
    assert!(
        !env.values().any(|v| v == "db.internal"),
        "an internal value reached the child on its own: {env:?}"
    );

    // Listings mask the secret in the table and in JSON, and never print it.
    let table = server.cli(&["config", "list", "-a", "web"]).ok().stdout;
    let row = table
        .lines()
        .find(|l| l.starts_with("DB_PASS"))
        .unwrap_or_else(|| panic!("no DB_PASS row:\n{table}"));
    assert!(row.contains("(secret)"), "{table}");
    assert!(
        table.contains("internal.DB_USER") && table.contains("internal.DB_HOST"),
        "{table}"
    );
    assert!(!table.contains("pw"), "the secret in the table:\n{table}");
    let list = list_json(&server, Some("web"));
    let pass = entry(&list, "DB_PASS", "app", None).expect("a DB_PASS entry");
    assert_eq!(pass["value"], "(secret)", "{list}");
    assert_eq!(pass["secret"], true, "{list}");
    let text = list.to_string();
    assert!(!text.contains("\"pw\"") && !text.contains(":pw@"), "{text}");
    let user = list["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["key"] == "DB_USER")
        .expect("a DB_USER entry");
    assert_eq!(user["internal"], true, "{list}");
    assert_eq!(user["value"], "app", "{list}");

    // `config get`: masked unless --reveal; internal names with the `internal.` prefix.
    assert_eq!(get(&server, &["-a", "web", "DB_PASS"]), "(secret)");
    assert_eq!(get(&server, &["-a", "web", "DB_PASS", "--reveal"]), "pw");
    assert_eq!(get(&server, &["-a", "web", "internal.DB_USER"]), "app");
    assert_eq!(
        get(&server, &["-a", "web", "internal.DB_HOST"]),
        "db.internal"
    );
    // A template that renders a secret into its value carries the secret: masked the same way
    // (secrets leave the API only when asked for with --reveal), rendered with --reveal.
    assert_eq!(get(&server, &["-a", "web", "DATABASE_URL"]), "(secret)");
    assert_eq!(
        get(&server, &["-a", "web", "DATABASE_URL", "--reveal"]),
        "postgres://app:pw@db.internal/web"
    );
    // Internal names are not variables of the app: without the prefix there is nothing.
    let r = server
        .cli(&["config", "get", "-a", "web", "DB_USER"])
        .fails();
    assert!(r.stderr.contains("not set"), "{}", r.stderr);
}

#[test]
fn cycles_and_unknown_references_are_refused_and_change_nothing() {
    let server = Server::start(&[]);
    let token = server.entrypoint_token("web", None);
    server
        .cli(&["config", "policy", "-a", "web", "--splay", "0"])
        .ok();
    server
        .cli(&["config", "set", "-a", "web", "--internal", "U=user"])
        .ok();
    server
        .cli(&[
            "config",
            "set",
            "-a",
            "web",
            "X=$${NOPE}",
            "Y=${internal.U}",
            "Z=${default(NOPE, \"fallback\")}",
            "P=${default(R, \"r\")}",
        ])
        .ok();
    let before = list_json(&server, Some("web"));
    let v = before["version"].as_u64().unwrap();
    assert_eq!(v, 3, "{before}");

    let refused: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["config", "set", "-a", "web", "A=${B}", "B=${A}"],
            vec!["cycle", "A", "B", "nothing was changed"],
        ),
        // A cycle through an existing variable: P already uses R (with a default), so an R
        // that uses P closes the loop.
        (
            vec!["config", "set", "-a", "web", "R=x${P}"],
            vec!["cycle", "P", "R"],
        ),
        (
            vec!["config", "set", "-a", "web", "X=${NOPE}"],
            vec!["NOPE", "not defined"],
        ),
        (
            vec!["config", "set", "-a", "web", "Q=${internal.NOPE}"],
            vec!["internal.NOPE", "not defined", "--internal"],
        ),
        // Y uses internal.U: removing U would break it.
        (
            vec!["config", "unset", "-a", "web", "--internal", "U"],
            vec!["internal.U", "not defined"],
        ),
        (
            vec!["config", "set", "-a", "web", "WAYPOST_TOKEN=x"],
            vec!["WAYPOST_TOKEN", "belong to the entrypoint"],
        ),
        (
            vec!["config", "set", "-a", "web", "WAYPOINT_X=x"],
            vec!["WAYPOINT_X", "belong to the entrypoint"],
        ),
        (vec!["config", "set", "X=1"], vec!["which app", "--global"]),
        (vec!["config", "unset", "X"], vec!["which app"]),
    ];
    for (args, wants) in &refused {
        let r = cli_without_app(&server, args).fails();
        for want in wants {
            assert!(
                r.stderr.contains(want),
                "{args:?}: expected {want:?} in {:?}",
                r.stderr
            );
        }
    }
    let after = list_json(&server, Some("web"));
    assert_eq!(after["version"], before["version"], "{after}");
    assert_eq!(after["entries"], before["entries"], "nothing changed");

    // The accepted forms: `$${` is a literal `${`; default() covers an undefined name.
    let Some(ep) = spawn(Builder::with_token(&server, &token, RECORDER)) else {
        return;
    };
    let env = child_env(&ep, 1);
    assert_eq!(env.get("X").map(String::as_str), Some("${NOPE}"), "{env:?}");
    assert_eq!(env.get("Y").map(String::as_str), Some("user"), "{env:?}");
    assert_eq!(
        env.get("Z").map(String::as_str),
        Some("fallback"),
        "{env:?}"
    );
    assert_eq!(env.get("P").map(String::as_str), Some("r"), "{env:?}");
    for k in ["A", "B", "R", "Q", "WAYPOST_TOKEN", "WAYPOINT_X", "U"] {
        assert!(!env.contains_key(k), "{k} in the child: {env:?}");
    }
    wait_applied(&server, &ep, v);

    // Once nothing uses it any more, the internal variable can go (the positive control for
    // the refused unset above), and the child restarts without Y.
    server.cli(&["config", "unset", "-a", "web", "Y"]).ok();
    server
        .cli(&["config", "unset", "-a", "web", "--internal", "U"])
        .ok();
    let env = wait_for("a start without Y", || {
        (2..=starts(&ep))
            .rev()
            .map(|n| child_env(&ep, n))
            .find(|e| !e.contains_key("Y"))
    });
    assert_eq!(env.get("X").map(String::as_str), Some("${NOPE}"), "{env:?}");
    assert_eq!(version(&server, "web"), v + 2);
}

#[test]
fn global_app_and_label_scopes_on_two_instances() {
    let server = Server::start(&[]);
    let token = server.entrypoint_token("web", None);
    server
        .cli(&["config", "policy", "-a", "web", "--splay", "0"])
        .ok();
    server
        .cli(&["config", "set", "--global", "COLOR=global", "GREETING=hi"])
        .ok();
    server
        .cli(&["config", "set", "-a", "web", "COLOR=app"])
        .ok();
    server
        .cli(&[
            "config",
            "set",
            "-a",
            "web",
            "--where",
            "env=prod",
            "COLOR=prod",
        ])
        .ok();
    // Narrower selectors and a deployment, for `config get` below: more labels beat fewer, a
    // deployment beats any selector.
    server
        .cli(&[
            "config",
            "set",
            "-a",
            "web",
            "--where",
            "env=prod,zone=a",
            "COLOR=prod-a",
        ])
        .ok();
    server
        .cli(&[
            "config",
            "set",
            "-a",
            "web",
            "--deployment",
            "blue",
            "COLOR=blue",
        ])
        .ok();

    let Some(prod) =
        spawn(Builder::with_token(&server, &token, RECORDER).env("WAYPOST_LABELS", "env=prod"))
    else {
        return;
    };
    let Some(dev) =
        spawn(Builder::with_token(&server, &token, RECORDER).env("WAYPOST_LABELS", "env=dev"))
    else {
        return;
    };
    let (p, d) = (child_env(&prod, 1), child_env(&dev, 1));
    assert_eq!(p.get("COLOR").map(String::as_str), Some("prod"), "{p:?}");
    assert_eq!(d.get("COLOR").map(String::as_str), Some("app"), "{d:?}");
    assert_eq!(p.get("GREETING").map(String::as_str), Some("hi"), "{p:?}");
    assert_eq!(d.get("GREETING").map(String::as_str), Some("hi"), "{d:?}");
    assert!(!p.contains_key("WAYPOST_LABELS"), "{p:?}");

    // The instances and their labels in `config list`.
    let list = wait_for("both instances in `config list`", || {
        let v = list_json(&server, Some("web"));
        (v["instances"].as_array().unwrap().len() == 2).then_some(v)
    });
    let mut labels: Vec<Value> = list["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["labels"].clone())
        .collect();
    labels.sort_by_key(|l| l.to_string());
    assert_eq!(
        labels,
        [json!({"env": "dev"}), json!({"env": "prod"})],
        "{list}"
    );
    let sel = entry(&list, "COLOR", "app", Some("env=prod")).expect("the env=prod entry");
    assert_eq!(sel["value"], "prod", "{list}");
    let table = server.cli(&["config", "list", "-a", "web"]).ok().stdout;
    assert!(
        table.contains("where env=prod") && table.contains("env=dev"),
        "{table}"
    );

    // What an instance with given labels or deployment would get.
    let color = |extra: &[&str]| {
        let mut args = vec!["-a", "web", "COLOR"];
        args.extend(extra);
        get(&server, &args)
    };
    assert_eq!(color(&[]), "app");
    assert_eq!(color(&["--labels", "env=prod"]), "prod");
    assert_eq!(color(&["--labels", "env=prod,zone=a"]), "prod-a");
    assert_eq!(color(&["--labels", "env=dev,zone=a"]), "app");
    assert_eq!(
        color(&["--deployment", "blue", "--labels", "env=prod,zone=a"]),
        "blue"
    );

    let v = version(&server, "web");
    wait_applied(&server, &prod, v);
    wait_applied(&server, &dev, v);

    // Without the app's unrestricted value, dev falls back to the global one; prod keeps its
    // selector's value and is not restarted.
    server.cli(&["config", "unset", "-a", "web", "COLOR"]).ok();
    let d = child_env(&dev, 2);
    assert_eq!(d.get("COLOR").map(String::as_str), Some("global"), "{d:?}");
    wait_applied(&server, &prod, v + 1);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        starts(&prod),
        1,
        "prod's environment did not change: no restart"
    );
    assert_eq!(color(&[]), "global");

    // A global change reaches both (and restarts prod: the control for the count above).
    server
        .cli(&["config", "set", "--global", "GREETING=hello"])
        .ok();
    let (p, d) = (child_env(&prod, 2), child_env(&dev, 3));
    assert_eq!(
        p.get("GREETING").map(String::as_str),
        Some("hello"),
        "{p:?}"
    );
    assert_eq!(p.get("COLOR").map(String::as_str), Some("prod"), "{p:?}");
    assert_eq!(
        d.get("GREETING").map(String::as_str),
        Some("hello"),
        "{d:?}"
    );
    assert_eq!(d.get("COLOR").map(String::as_str), Some("global"), "{d:?}");
    assert_eq!(version(&server, "web"), v + 2);

    // The global scope lists its own entries only.
    let g = list_json(&server, None);
    let keys: Vec<&str> = g["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys.len(), 2, "{g}");
    assert!(keys.contains(&"COLOR") && keys.contains(&"GREETING"), "{g}");
}

/// `config history -o json` of an app.
fn history(server: &Server, app: &str) -> Value {
    server
        .cli(&["config", "history", "-a", app, "-o", "json"])
        .ok()
        .json()
}

fn history_versions(h: &Value) -> Vec<u64> {
    h["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_u64().unwrap())
        .collect()
}

#[test]
fn history_lists_versions_and_rollback_restores_a_snapshot() {
    let server = Server::start(&[]);
    let token = server.entrypoint_token("web", None);
    // 1: the snapshot rolled back to below (with the default policy).
    server
        .cli(&["config", "set", "-a", "web", "A=alpha1", "B=beta1"])
        .ok();
    // 2..5
    server
        .cli(&["config", "policy", "-a", "web", "--splay", "0"])
        .ok();
    server.cli(&["config", "set", "-a", "web", "A=alpha3"]).ok();
    server
        .cli(&["config", "set", "-a", "web", "--secret", "S=hunter2"])
        .ok();
    server.cli(&["config", "unset", "-a", "web", "B"]).ok();

    let h = history(&server, "web");
    assert_eq!(h["current"], 5, "{h}");
    assert_eq!(history_versions(&h), [5, 4, 3, 2, 1], "newest first: {h}");
    let summaries: Vec<&str> = h["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["summary"].as_str().unwrap())
        .collect();
    assert!(summaries[0].contains("unset B"), "{h}");
    assert!(summaries[1].contains('S'), "{h}");
    assert!(
        summaries[2].contains('A') && !summaries[2].contains('B'),
        "{h}"
    );
    assert!(summaries[3].contains("policy"), "{h}");
    assert!(
        summaries[4].contains('A') && summaries[4].contains('B'),
        "{h}"
    );
    for v in h["versions"].as_array().unwrap() {
        assert!(v["at"].as_str().is_some_and(|a| !a.is_empty()), "{h}");
    }
    let text = h.to_string();
    for value in ["alpha", "beta", "hunter2"] {
        assert!(!text.contains(value), "a value in the history: {text}");
    }
    let table = server.cli(&["config", "history", "-a", "web"]).ok().stdout;
    let first = table.lines().nth(1).unwrap_or_default();
    assert!(first.starts_with("5 (current)"), "{table}");
    assert!(
        !table.contains("hunter2") && !table.contains("alpha"),
        "{table}"
    );

    let Some(ep) = spawn(Builder::with_token(&server, &token, RECORDER)) else {
        return;
    };
    let env = child_env(&ep, 1);
    assert_eq!(env.get("A").map(String::as_str), Some("alpha3"), "{env:?}");
    assert_eq!(env.get("S").map(String::as_str), Some("hunter2"), "{env:?}");
    assert!(!env.contains_key("B"), "{env:?}");
    wait_applied(&server, &ep, 5);

    // Rolling back to version 1: a new version 6 with version 1's definitions (its default 5s
    // splay included), and the child restarted with its values.
    let r = server.cli(&["config", "rollback", "-a", "web", "1"]).ok();
    assert!(
        r.stdout.contains("rolled back to version 1") && r.stdout.contains("config version 6"),
        "{}",
        r.stdout
    );
    let env = child_env(&ep, 2);
    assert_eq!(env.get("A").map(String::as_str), Some("alpha1"), "{env:?}");
    assert_eq!(env.get("B").map(String::as_str), Some("beta1"), "{env:?}");
    assert!(!env.contains_key("S"), "{env:?}");
    let h = history(&server, "web");
    assert_eq!(h["current"], 6, "{h}");
    assert_eq!(history_versions(&h)[0], 6, "{h}");
    let list = list_json(&server, Some("web"));
    assert_eq!(list["policy"]["splay_default"], true, "{list}");
    let table = server.cli(&["config", "history", "-a", "web"]).ok().stdout;
    assert!(
        table
            .lines()
            .nth(1)
            .unwrap_or_default()
            .starts_with("6 (current)"),
        "{table}"
    );

    // Rolling back to what is already current changes nothing.
    let same = server.cli(&["config", "rollback", "-a", "web", "1"]).ok();
    assert!(same.stdout.contains("nothing changed"), "{}", same.stdout);
    assert_eq!(history(&server, "web")["current"], 6);

    // A version that never existed is refused, clearly.
    for bad in ["0", "99"] {
        let r = server
            .cli(&["config", "rollback", "-a", "web", bad])
            .fails();
        assert!(
            r.stderr.contains(&format!("no version {bad}")) && r.stderr.contains("history"),
            "{}",
            r.stderr
        );
        assert!(!r.stderr.contains("  "), "a clean sentence: {:?}", r.stderr);
    }

    // Older versions are pruned (the newest HISTORY_KEPT = 100 stay): after 100 more changes
    // version 6 is gone and cannot be restored, version 7 is the oldest kept and can.
    let api = server.api(Some(&server.admin_token()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for i in 0..100 {
            let body = json!({"set": {"N": i.to_string()}});
            let (status, v) = api
                .request(hyper::Method::PATCH, "/v1/apps/web/config", Some(&body))
                .await
                .unwrap();
            assert_eq!(status, 200, "{v}");
        }
    });
    let h = history(&server, "web");
    assert_eq!(h["current"], 106, "{h}");
    let versions = history_versions(&h);
    assert_eq!(versions.len(), 100, "{h}");
    assert_eq!(versions.first(), Some(&106));
    assert_eq!(versions.last(), Some(&7));
    for pruned in ["1", "6"] {
        let r = server
            .cli(&["config", "rollback", "-a", "web", pruned])
            .fails();
        assert!(
            r.stderr.contains(&format!("no version {pruned}")) && r.stderr.contains("100"),
            "{}",
            r.stderr
        );
    }
    assert_eq!(
        history(&server, "web")["current"],
        106,
        "refusals change nothing"
    );
    let r = server.cli(&["config", "rollback", "-a", "web", "7"]).ok();
    assert!(r.stdout.contains("config version"), "{}", r.stdout);
    assert_eq!(history(&server, "web")["current"], 107);
    assert_eq!(get(&server, &["-a", "web", "N"]), "0", "version 7 set N=0");
}

#[test]
fn import_reads_a_dotenv_file() {
    let server = Server::start(&[]);
    let token = server.entrypoint_token("web", None);
    server
        .cli(&["config", "policy", "-a", "web", "--splay", "0"])
        .ok();
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("app.env");
    std::fs::write(
        &file,
        r#"# the app's settings
export PLAIN=hello
SINGLE='literal ${X} and $HOME stay'
DOUBLE="line1\nline2 \"quoted\""
INLINE=value with spaces # a comment
HASH=a#b
   # an indented comment

BASE=base
REF=${BASE}/sub
QUOTED_REF="<${BASE}>"
EMPTY=
"#,
    )
    .unwrap();
    let path = file.display().to_string();
    let r = server.cli(&["config", "import", "-a", "web", &path]).ok();
    assert!(r.stdout.contains("imported 9 variables"), "{}", r.stdout);

    let Some(ep) = spawn(Builder::with_token(&server, &token, RECORDER)) else {
        return;
    };
    let env = child_env(&ep, 1);
    let want = [
        ("PLAIN", "hello"),
        ("SINGLE", "literal ${X} and $HOME stay"),
        ("DOUBLE", "line1\nline2 \"quoted\""),
        ("INLINE", "value with spaces"),
        ("HASH", "a#b"),
        ("BASE", "base"),
        ("REF", "base/sub"),
        ("QUOTED_REF", "<base>"),
        ("EMPTY", ""),
    ];
    for (k, v) in want {
        assert_eq!(env.get(k).map(String::as_str), Some(v), "{k}: {env:?}");
    }
    assert!(!env.contains_key("export"), "{env:?}");
    let before = list_json(&server, Some("web"));

    // A malformed file: refused naming the line, nothing imported (not even the good lines).
    // A line without `=`, an unclosed quote, a reference to a name defined nowhere: each refused,
    // naming what is wrong.
    for (name, text, want) in [
        (
            "bad.env",
            "# ok so far\nGOOD=1\nthis line has no equals sign\nLATER=2\n",
            &["line 3", "this line has no equals sign"][..],
        ),
        (
            "unclosed.env",
            "GOOD=1\nOPEN=\"never closed\nMORE=2\n",
            &["line 2", "never closed"][..],
        ),
        (
            "undefined.env",
            "GOOD=1\nURL=${NOWHERE}/x\n",
            &["NOWHERE"][..],
        ),
    ] {
        let file = tmp.path().join(name);
        std::fs::write(&file, text).unwrap();
        let r = server
            .cli(&["config", "import", "-a", "web", &file.display().to_string()])
            .fails();
        for w in want {
            assert!(r.stderr.contains(w), "{name}: {}", r.stderr);
        }
    }
    let after = list_json(&server, Some("web"));
    assert_eq!(after["version"], before["version"], "{after}");
    assert_eq!(after["entries"], before["entries"], "nothing changed");

    // --secret: the imported values are masked.
    let secret = tmp.path().join("secret.env");
    std::fs::write(&secret, "TOKEN=s3cr3t-value\n").unwrap();
    server
        .cli(&[
            "config",
            "import",
            "-a",
            "web",
            "--secret",
            &secret.display().to_string(),
        ])
        .ok();
    let table = server.cli(&["config", "list", "-a", "web"]).ok().stdout;
    assert!(!table.contains("s3cr3t-value"), "{table}");
    assert_eq!(get(&server, &["-a", "web", "TOKEN"]), "(secret)");
    let env = child_env(&ep, 2);
    assert_eq!(env.get("TOKEN").map(String::as_str), Some("s3cr3t-value"));
}

#[test]
fn a_source_in_use_cannot_be_removed() {
    let server = Server::start(&[]);
    server.create_app("web");
    // Nothing listens on port 1: the source cannot be read, which is all this test needs.
    server
        .cli(&[
            "config",
            "source",
            "set",
            "kv",
            "--kind",
            "etcd",
            "--addr",
            "http://127.0.0.1:1",
        ])
        .ok();
    server
        .cli(&["config", "set", "-a", "web", "--dynamic", "X=kv:/k"])
        .ok();

    let r = server.cli(&["config", "source", "unset", "kv"]).fails();
    assert!(
        r.stderr.contains("X") && r.stderr.contains("app web") && r.stderr.contains("kv"),
        "{}",
        r.stderr
    );
    let sources = server
        .cli(&["config", "source", "list", "-o", "json"])
        .ok()
        .json();
    assert!(
        sources["sources"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "kv"),
        "still there: {sources}"
    );

    // A dynamic value from a source that does not exist is refused.
    let r = server
        .cli(&["config", "set", "-a", "web", "--dynamic", "Y=nope:/k"])
        .fails();
    assert!(
        r.stderr.contains("Y") && r.stderr.contains("no config source named \"nope\""),
        "{}",
        r.stderr
    );

    // The value cannot be read: `config list` says so (once the resolver has tried).
    let list = wait_for("X to be marked as unreadable", || {
        let v = list_json(&server, Some("web"));
        let e = entry(&v, "X", "app", None)?;
        (e["status"] != "pending" && e["status"].is_string()).then(|| v.clone())
    });
    let x = entry(&list, "X", "app", None).unwrap();
    assert_ne!(x["status"], "ok", "{list}");
    // As written: for etcd the leading / is part of the key.
    assert_eq!(x["dynamic"], "kv:/k", "{list}");
    assert!(x["value"].is_null(), "{list}");
    assert!(x["error"].as_str().is_some_and(|e| !e.is_empty()), "{list}");
    let table = server.cli(&["config", "list", "-a", "web"]).ok().stdout;
    assert!(table.contains("cannot be read"), "{table}");
    let row = table
        .lines()
        .find(|l| l.starts_with('X'))
        .unwrap_or_else(|| panic!("no X row:\n{table}"));
    assert!(row.contains("<kv:/k>"), "{table}");

    // Once nothing reads from it, the source can go.
    server.cli(&["config", "unset", "-a", "web", "X"]).ok();
    let r = server.cli(&["config", "source", "unset", "kv"]).ok();
    assert!(r.stdout.contains("kv removed"), "{}", r.stdout);
    let sources = server
        .cli(&["config", "source", "list", "-o", "json"])
        .ok()
        .json();
    assert_eq!(sources["sources"], json!([]), "{sources}");
    // And with it gone, a dynamic value naming it is refused again.
    server
        .cli(&["config", "set", "-a", "web", "--dynamic", "X=kv:/k"])
        .fails();
}
