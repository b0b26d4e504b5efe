use super::*;
use std::sync::Arc;

pub(crate) fn set(kv: &[(&str, &str)]) -> Change {
    Change {
        set: kv
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

fn labels(s: &str) -> Labels {
    crate::server::model::labels::parse(s).unwrap()
}

/// Applies `ch` to `cur` in `scope` with `global` and `apps` around it, every source existing.
fn apply(
    ch: &Change,
    cur: &ScopeConfig,
    scope: &str,
    global: &ScopeConfig,
    apps: &[(String, Arc<ScopeConfig>)],
) -> Result<ScopeConfig, String> {
    let has = |s: &str| s == "bao" || s == "etcd";
    let ctx = Context {
        scope,
        global: (scope != GLOBAL).then_some(global),
        apps,
        has_source: &has,
    };
    ch.apply_to(cur, &ctx)
}

fn app_change(ch: &Change, cur: &ScopeConfig, global: &ScopeConfig) -> Result<ScopeConfig, String> {
    apply(ch, cur, "web", global, &[])
}

fn no_dynamic(_: &str, _: &DynRef) -> Option<Vec<u8>> {
    None
}

fn env(global: &ScopeConfig, app: &ScopeConfig, dep: &str, l: &str) -> BTreeMap<String, String> {
    View {
        global,
        app_name: "web",
        app,
    }
    .snapshot(dep, &labels(l), &no_dynamic)
    .config
    .env
}

#[test]
fn names_paths_signals() {
    for ok in ["A", "_x", "FOO_BAR1", "a"] {
        assert!(check_key(ok).is_ok(), "{ok}");
    }
    for bad in ["", "1A", "A-B", "A B", "É", "A=B"] {
        assert!(check_key(bad).is_err(), "{bad}");
    }
    assert!(check_path("/etc/app.conf").is_ok());
    for bad in ["etc/x", "./x", "/", "/a/../b", "/a//b", "/a/", "/a/./b", ""] {
        assert!(check_path(bad).is_err(), "{bad}");
    }
    assert!(check_path("etc/x").unwrap_err().contains("relative"));
    assert_eq!(normalize_signal("hup").unwrap(), "SIGHUP");
    assert_eq!(normalize_signal("SIGUSR2").unwrap(), "SIGUSR2");
    assert_eq!(normalize_signal("10").unwrap(), "SIGUSR1");
    assert_eq!(normalize_signal("40").unwrap(), "40");
    assert!(normalize_signal("SIGNOPE").is_err());
    assert!(normalize_signal("0").is_err());
    assert_eq!(
        parse_on_change("signal:SIGHUP").unwrap(),
        (Action::Signal, "SIGHUP".to_string())
    );
    assert_eq!(parse_on_change("restart").unwrap().0, Action::Restart);
    assert_eq!(parse_on_change("NONE").unwrap().0, Action::None);
    assert!(parse_on_change("signal:").is_err());
    assert!(parse_on_change("reload").is_err());
    assert_eq!(on_change_text(Action::Signal, "SIGHUP"), "signal:SIGHUP");
}

#[test]
fn dynamic_references_parse() {
    let r = DynRef::parse("bao:secret/data/web#password").unwrap();
    assert_eq!(
        (r.source.as_str(), r.path.as_str(), r.field.as_deref()),
        ("bao", "secret/data/web", Some("password"))
    );
    assert_eq!(r.to_string(), "bao:secret/data/web#password");
    let r = DynRef::parse("etcd:/config/web/port").unwrap();
    assert_eq!((r.path.as_str(), r.field), ("/config/web/port", None));
    let q = DynRef::parse("bao:pki/issue/web?common_name=a.b&ttl=10s#certificate").unwrap();
    assert_eq!(q.path, "pki/issue/web?common_name=a.b&ttl=10s");
    for bad in [
        "nosource", ":x", "bao:", "bao:/", "bao:x#", "b a:x", "bao:a b",
    ] {
        assert!(DynRef::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn bad_changes_are_refused_whole() {
    let cur = ScopeConfig::default();
    let g = ScopeConfig::default();
    let mut ch = set(&[("GOOD", "1"), ("1BAD", "2")]);
    assert!(
        app_change(&ch, &cur, &g)
            .unwrap_err()
            .contains("invalid variable name")
    );
    ch = Change {
        files: vec![FileSet {
            path: "etc/x".into(),
            mode: None,
            contents_b64: Some(String::new()),
            dynamic: None,
            template: false,
            secret: false,
        }],
        ..Default::default()
    };
    assert!(app_change(&ch, &cur, &g).unwrap_err().contains("relative"));
    ch = Change {
        policy: Some(PolicyChange {
            on_change: Some("signal:SIGNOPE".into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    assert!(
        app_change(&ch, &cur, &g)
            .unwrap_err()
            .contains("unknown signal")
    );
    let big = "x".repeat(proto::MAX_FRAME);
    assert!(
        app_change(&set(&[("BIG", &big)]), &cur, &g)
            .unwrap_err()
            .contains("limit")
    );
    // Just under the limit is fine.
    let fits = "x".repeat(proto::MAX_FRAME - 2 * WELCOME_RESERVE);
    assert!(app_change(&set(&[("BIG", &fits)]), &cur, &g).is_ok());
    // Names the entrypoint keeps for itself.
    let e = app_change(&set(&[("WAYPOST_TOKEN", "x")]), &cur, &g).unwrap_err();
    assert!(e.contains("belong to the entrypoint"), "{e}");
    assert!(app_change(&set(&[("WAYPOINT_X", "x")]), &cur, &g).is_err());
    assert!(app_change(&set(&[("WAYPOST_LOG_LEVEL", "INFO")]), &cur, &g).is_ok());
    // A source that does not exist.
    let mut ch = Change::default();
    ch.dynamic.insert("P".into(), "nope:secret/data/x#p".into());
    let e = app_change(&ch, &cur, &g).unwrap_err();
    assert!(e.contains("no config source named \"nope\""), "{e}");
    // --deployment and --where together; a policy or a deployment in the global scope.
    let mut ch = set(&[("A", "1")]);
    ch.deployment = Some("blue".into());
    ch.selector = Some(labels("env=prod"));
    assert!(app_change(&ch, &cur, &g).is_err());
    let mut ch = set(&[("A", "1")]);
    ch.deployment = Some("blue".into());
    assert!(apply(&ch, &cur, GLOBAL, &g, &[]).is_err());
    let ch = Change {
        policy: Some(PolicyChange::default()),
        ..Default::default()
    };
    assert!(apply(&ch, &cur, GLOBAL, &g, &[]).is_err());
}

#[test]
fn narrower_definitions_win() {
    // global < app < app where env=prod < app where env=prod,tier=web < deployment.
    let g = apply(
        &set(&[("A", "global"), ("ONLY_GLOBAL", "g")]),
        &ScopeConfig::default(),
        GLOBAL,
        &ScopeConfig::default(),
        &[],
    )
    .unwrap();
    let mut gw = set(&[("B", "global-prod")]);
    gw.selector = Some(labels("env=prod"));
    let g = apply(&gw, &g, GLOBAL, &ScopeConfig::default(), &[]).unwrap();
    let a = app_change(
        &set(&[("A", "app"), ("B", "app")]),
        &ScopeConfig::default(),
        &g,
    )
    .unwrap();
    let mut w = set(&[("A", "prod")]);
    w.selector = Some(labels("env=prod"));
    let a = app_change(&w, &a, &g).unwrap();
    let mut w2 = set(&[("A", "prod-web")]);
    w2.selector = Some(labels("env=prod,tier=web"));
    let a = app_change(&w2, &a, &g).unwrap();
    let mut d = set(&[("A", "blue")]);
    d.deployment = Some("blue".into());
    let a = app_change(&d, &a, &g).unwrap();

    let e = env(&g, &a, "", "");
    assert_eq!(e["A"], "app");
    assert_eq!(e["ONLY_GLOBAL"], "g");
    assert_eq!(
        e["B"], "app",
        "the app's unrestricted value beats a global selector"
    );
    assert_eq!(env(&g, &a, "", "env=prod")["A"], "prod");
    assert_eq!(env(&g, &a, "", "env=dev")["A"], "app");
    assert_eq!(env(&g, &a, "", "env=prod,tier=web")["A"], "prod-web");
    assert_eq!(env(&g, &a, "blue", "env=prod,tier=web")["A"], "blue");
    // Without an app definition, the global selector applies.
    let e = env(&g, &ScopeConfig::default(), "", "env=prod");
    assert_eq!(e["B"], "global-prod");
    assert_eq!(env(&g, &ScopeConfig::default(), "", "")["A"], "global");

    // Unsetting the selected value brings the wider one back.
    let mut u = Change {
        unset: vec!["A".into()],
        ..Default::default()
    };
    u.selector = Some(labels("env=prod"));
    let a2 = app_change(&u, &a, &g).unwrap();
    assert_eq!(env(&g, &a2, "", "env=prod")["A"], "app");
    assert_eq!(a2.version, a.version + 1);
}

#[test]
fn templates_compose_and_internal_variables_stay_inside() {
    let g = ScopeConfig::default();
    let mut i = set(&[("DB_USER", "app"), ("DB_HOST", "db.internal")]);
    i.internal = true;
    let a = app_change(&i, &ScopeConfig::default(), &g).unwrap();
    let a = app_change(
        &set(&[
            (
                "DATABASE_URL",
                "postgres://${internal.DB_USER}:${DB_PASS}@${internal.DB_HOST}/${default(internal.DB_NAME, \"web\")}",
            ),
            ("DB_PASS", "s3cret"),
            ("LITERAL", "cost: $${HOME} and $5"),
            ("B64", "${base64(DB_PASS)}"),
            ("J", "{\"p\": ${json(DB_PASS)}}"),
        ]),
        &a,
        &g,
    )
    .unwrap();
    let e = env(&g, &a, "", "");
    assert_eq!(e["DATABASE_URL"], "postgres://app:s3cret@db.internal/web");
    let view = View {
        global: &g,
        app_name: "web",
        app: &a,
    };
    let name = |k: &str| Name {
        internal: false,
        key: k.into(),
    };
    let none = Labels::new();
    assert!(!view.is_secret(&name("DATABASE_URL"), "", &none));
    assert!(!view.is_secret(&name("LITERAL"), "", &none));
    assert_eq!(e["LITERAL"], "cost: ${HOME} and $5");
    assert_eq!(e["B64"], util::base64_encode(b"s3cret"));
    assert_eq!(e["J"], "{\"p\": \"s3cret\"}");
    assert!(!e.contains_key("DB_USER") && !e.contains_key("DB_HOST"));

    // A cycle is refused, naming it; so is an unknown reference; nothing changes.
    let err = app_change(&set(&[("X", "${Y}"), ("Y", "a${X}")]), &a, &g).unwrap_err();
    assert!(
        err.contains("cycle") && err.contains('X') && err.contains('Y'),
        "{err}"
    );
    let err = app_change(&set(&[("X", "${internal.X}")]), &a, &g);
    assert!(err.unwrap_err().contains("not defined"));
    let mut self_ref = set(&[("Z", "${internal.Z}")]);
    self_ref.internal = true;
    assert!(app_change(&self_ref, &a, &g).unwrap_err().contains("cycle"));
    let err = app_change(&set(&[("X", "${NOPE}")]), &a, &g).unwrap_err();
    assert!(err.contains("NOPE") && err.contains("not defined"), "{err}");
    let err = app_change(&set(&[("X", "${")]), &a, &g).unwrap_err();
    assert!(err.contains("unterminated"), "{err}");
    // Unsetting something a template needs is refused too.
    let u = Change {
        unset: vec!["DB_USER".into()],
        internal: true,
        ..Default::default()
    };
    assert!(app_change(&u, &a, &g).unwrap_err().contains("not defined"));
}

#[test]
fn global_changes_are_checked_against_every_app() {
    let g = apply(
        &set(&[("DOMAIN", "example.com")]),
        &ScopeConfig::default(),
        GLOBAL,
        &ScopeConfig::default(),
        &[],
    )
    .unwrap();
    let a = app_change(
        &set(&[("URL", "https://web.${DOMAIN}")]),
        &ScopeConfig::default(),
        &g,
    )
    .unwrap();
    assert_eq!(env(&g, &a, "", "")["URL"], "https://web.example.com");
    let apps = vec![("web".to_string(), Arc::new(a.clone()))];
    let unset = Change {
        unset: vec!["DOMAIN".into()],
        ..Default::default()
    };
    let err = apply(&unset, &g, GLOBAL, &ScopeConfig::default(), &apps).unwrap_err();
    assert!(err.contains("app web"), "{err}");
    // A global template refers to global names only.
    let err = apply(
        &set(&[("G", "${URL}")]),
        &g,
        GLOBAL,
        &ScopeConfig::default(),
        &apps,
    )
    .unwrap_err();
    assert!(err.contains("not defined in the global config"), "{err}");
    // The app's definition of a name a global template uses is what the template sees.
    let g2 = apply(
        &set(&[("HOST", "${DOMAIN}")]),
        &g,
        GLOBAL,
        &ScopeConfig::default(),
        &apps,
    )
    .unwrap();
    let a2 = app_change(&set(&[("DOMAIN", "web.test")]), &a, &g2).unwrap();
    assert_eq!(env(&g2, &a2, "", "")["HOST"], "web.test");
    // … and a cycle through both scopes is refused.
    let err = app_change(&set(&[("DOMAIN", "${HOST}")]), &a2, &g2).unwrap_err();
    assert!(err.contains("cycle"), "{err}");
}

#[test]
fn dynamic_values_come_from_the_resolver_and_missing_ones_are_left_out() {
    let g = ScopeConfig::default();
    let mut ch = Change::default();
    ch.dynamic
        .insert("DB_PASS".into(), "bao:secret/data/web#password".into());
    ch.secret = true;
    let a = app_change(&ch, &ScopeConfig::default(), &g).unwrap();
    let a = app_change(
        &set(&[
            ("URL", "pg://u:${DB_PASS}@h"),
            ("U2", "${URL}"),
            ("P", "plain"),
        ]),
        &a,
        &g,
    )
    .unwrap();
    {
        let view = View {
            global: &g,
            app_name: "web",
            app: &a,
        };
        let n = |k: &str| Name {
            internal: false,
            key: k.into(),
        };
        let none = Labels::new();
        // A template over a secret is secret, through other templates too.
        assert!(view.is_secret(&n("DB_PASS"), "", &none));
        assert!(view.is_secret(&n("URL"), "", &none));
        assert!(view.is_secret(&n("U2"), "", &none));
        assert!(!view.is_secret(&n("P"), "", &none));
    }
    let a = app_change(
        &Change {
            files: vec![FileSet {
                path: "/etc/tls/key.pem".into(),
                mode: None,
                contents_b64: None,
                dynamic: Some("bao:pki/issue/web#private_key".into()),
                template: false,
                secret: false,
            }],
            ..Default::default()
        },
        &a,
        &g,
    )
    .unwrap();
    assert_eq!(
        a.files["/etc/tls/key.pem"].mode, 0o600,
        "dynamic files default to 0600"
    );
    let view = View {
        global: &g,
        app_name: "web",
        app: &a,
    };
    let none = view.snapshot("", &Labels::new(), &no_dynamic);
    assert!(none.missing_dynamic);
    assert!(!none.config.env.contains_key("DB_PASS"));
    assert!(
        !none.config.env.contains_key("URL"),
        "a template over a missing value is left out"
    );
    assert!(none.config.files.is_empty());
    let dynamic = |scope: &str, r: &DynRef| -> Option<Vec<u8>> {
        assert_eq!(scope, "web");
        match r.field.as_deref() {
            Some("password") => Some(b"pw".to_vec()),
            Some("private_key") => Some(b"KEY".to_vec()),
            _ => None,
        }
    };
    let full = view.snapshot("", &Labels::new(), &dynamic);
    assert!(!full.missing_dynamic);
    assert_eq!(full.config.env["DB_PASS"], "pw");
    assert_eq!(full.config.env["URL"], "pg://u:pw@h");
    assert_eq!(full.config.files[0].contents, b"KEY");
    assert_eq!(full.config.files[0].mode, 0o600);
    assert_eq!(
        view.value_of(
            &Name {
                internal: false,
                key: "URL".into()
            },
            "",
            &Labels::new(),
            &dynamic
        )
        .as_deref(),
        Some("pg://u:pw@h")
    );
}

#[test]
fn documents_round_trip_and_versions_add_up() {
    let g = ScopeConfig::default();
    let mut ch = set(&[("A", "1"), ("T", "${A}")]);
    ch.secret = true;
    let mut a = app_change(&ch, &ScopeConfig::default(), &g).unwrap();
    let mut d = Change::default();
    d.dynamic.insert("D".into(), "etcd:/k".into());
    d.selector = Some(labels("env=prod"));
    a = app_change(&d, &a, &g).unwrap();
    a = app_change(
        &Change {
            files: vec![FileSet {
                path: "/etc/x".into(),
                mode: Some(ModeJson::Octal("0640".into())),
                contents_b64: Some(util::base64_encode(b"hi\xff")),
                dynamic: None,
                template: false,
                secret: false,
            }],
            policy: Some(PolicyChange {
                on_change: Some("signal:hup".into()),
                splay_ms: Some(0),
                stop_grace_ms: None,
            }),
            ..Default::default()
        },
        &a,
        &g,
    )
    .unwrap();
    assert_eq!(a.version, 3);
    let back = ScopeConfig::from_doc(a.version, 7, &a.to_doc()).unwrap();
    assert!(back.same_definitions(&a));
    assert_eq!((back.version, back.epoch), (3, 7));
    // The same change again: same definitions, same version.
    let again = app_change(&d, &a, &g).unwrap();
    assert_eq!(again.version, 3);
    assert!(ScopeConfig::from_doc(1, 0, "not json").is_err());

    let mut g2 = g.clone();
    g2.version = 2;
    g2.epoch = 5;
    let mut a2 = back.clone();
    a2.epoch = 1;
    let v = View {
        global: &g2,
        app_name: "web",
        app: &a2,
    };
    assert_eq!(v.version(), 2 + 5 + 3 + 1);
    let snap = v.snapshot("", &Labels::new(), &no_dynamic);
    assert_eq!(snap.config.version, v.version());
    assert_eq!(snap.config.files[0].contents, b"hi\xff");
    assert_eq!(snap.config.on_change.as_ref().unwrap().signal, "SIGHUP");
    assert_eq!(snap.config.restart_splay_ms, 0);

    let s = summary(&ScopeConfig::default(), &a);
    assert!(
        s.contains("set A") && s.contains("D (where env=prod)") && s.contains("file /etc/x"),
        "{s}"
    );
    assert!(!s.contains('1'), "never a value: {s}");
}
