//! Labels of instances and tokens (`k=v,k2=v2`), and label selectors (`config set --where`).
//!
//! An instance describes itself with `WAYPOST_LABELS` (sent in its Hello); its entrypoint token
//! may carry labels too (`token create --label`), and those win on a conflict: the token comes
//! from the operator, the Hello from the instance itself. The rules are the entrypoint's
//! (src/settings.rs `parse_labels`), so a value the entrypoint accepts is never dropped here:
//! a key is 1–63 characters of `A-Z a-z 0-9 . _ / -` starting with a letter or digit, a value
//! 0–63 characters of those and `:`, at most [`MAX_LABELS`] labels, no key twice.
//!
//! Stored as text in the canonical form [`format`] gives (sorted by key; '' for none), which
//! [`parse`] reads back.

use super::Labels;

/// Most labels an instance or a token may carry (the entrypoint's cap too).
pub const MAX_LABELS: usize = 16;

/// Longest key, and longest value, in bytes.
pub const MAX_LEN: usize = 63;

/// `k=v,k2=v2` → labels. An empty string (or only spaces) is no labels; spaces around an entry
/// are ignored. Errors name the offending label.
pub fn parse(s: &str) -> Result<Labels, String> {
    let mut labels = Labels::new();
    if s.trim().is_empty() {
        return Ok(labels);
    }
    let n = s.split(',').count();
    if n > MAX_LABELS {
        return Err(format!(
            "{n} labels given; at most {MAX_LABELS} are allowed"
        ));
    }
    for (i, entry) in s.split(',').map(str::trim).enumerate() {
        let Some((k, v)) = entry.split_once('=') else {
            return Err(if entry.is_empty() {
                format!("label {} of {s:?} is empty (a stray comma?)", i + 1)
            } else {
                format!("label {entry:?} is not key=value")
            });
        };
        check(k, v)?;
        if labels.insert(k.to_string(), v.to_string()).is_some() {
            return Err(format!(
                "label {entry:?} repeats the key of an earlier label"
            ));
        }
    }
    Ok(labels)
}

/// Whether one label follows the rules; the error names it.
pub fn check(k: &str, v: &str) -> Result<(), String> {
    let key_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-');
    // The wording of the entrypoint's messages (src/settings.rs).
    let why = if k.is_empty() {
        "has an empty key"
    } else if k.len() > MAX_LEN {
        "has a key longer than 63 characters"
    } else if !k.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        "has a key that does not start with a letter or digit"
    } else if !k.chars().all(key_char) {
        "has a key with characters other than letters, digits and . _ / -"
    } else if v.len() > MAX_LEN {
        "has a value longer than 63 characters"
    } else if !v.chars().all(|c| key_char(c) || c == ':') {
        "has a value with characters other than letters, digits and . _ : / -"
    } else {
        return Ok(());
    };
    Err(format!("label {:?} {why}", format!("{k}={v}")))
}

/// Every label checked, and no more than [`MAX_LABELS`]: the first error, naming its label.
pub fn check_all(labels: &Labels) -> Result<(), String> {
    if labels.len() > MAX_LABELS {
        return Err(format!(
            "{} labels given; at most {MAX_LABELS} are allowed",
            labels.len()
        ));
    }
    labels.iter().try_for_each(|(k, v)| check(k, v))
}

/// The canonical text: `k=v,k2=v2`, sorted by key ('' for none). [`parse`] reads it back.
pub fn format(labels: &Labels) -> String {
    let mut out = String::new();
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    out
}

/// The labels of an instance: its own (`entrypoint`, from the Hello) overridden key by key by
/// its token's (`token`), which the operator set.
pub fn merge(entrypoint: &Labels, token: &Labels) -> Labels {
    let mut out = entrypoint.clone();
    out.extend(token.iter().map(|(k, v)| (k.clone(), v.clone())));
    out
}

/// The labels of a Hello that follow the rules, and one message per label dropped (the first
/// [`MAX_LABELS`] valid ones are kept, in key order). The instance is never refused for its
/// labels: they are its self-description, and an entrypoint checks them before it starts.
pub fn from_hello(hello: &Labels) -> (Labels, Vec<String>) {
    let mut kept = Labels::new();
    let mut dropped = Vec::new();
    for (k, v) in hello {
        match check(k, v) {
            Err(why) => dropped.push(why),
            Ok(()) if kept.len() == MAX_LABELS => dropped.push(format!(
                "label {:?} is one more than the {MAX_LABELS} allowed",
                format!("{k}={v}")
            )),
            Ok(()) => {
                kept.insert(k.clone(), v.clone());
            }
        }
    }
    (kept, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parse_and_format_round_trip() {
        assert_eq!(parse(""), Ok(Labels::new()));
        assert_eq!(parse("  "), Ok(Labels::new()));
        let l = parse(" tier=web, env=prod ,empty=").unwrap();
        assert_eq!(
            l,
            labels(&[("env", "prod"), ("tier", "web"), ("empty", "")])
        );
        // Canonical: sorted by key, no spaces.
        assert_eq!(format(&l), "empty=,env=prod,tier=web");
        assert_eq!(parse(&format(&l)), Ok(l));
        assert_eq!(format(&Labels::new()), "");
        // Every allowed character, at the longest lengths.
        let key = format!("a.b_c/d-E9{}", "k".repeat(MAX_LEN - 10));
        let value = format!("x.y_z:/-Q0{}", "v".repeat(MAX_LEN - 10));
        let one = parse(&format!("{key}={value}")).unwrap();
        assert_eq!(one, labels(&[(&key, &value)]));
        let max: Vec<String> = (0..MAX_LABELS).map(|i| format!("k{i}=v")).collect();
        assert_eq!(parse(&max.join(",")).unwrap().len(), MAX_LABELS);
    }

    #[test]
    fn bad_labels_are_named() {
        let seventeen: Vec<String> = (0..=MAX_LABELS).map(|i| format!("k{i}=v")).collect();
        for (bad, why) in [
            ("env", "label \"env\" is not key=value"),
            ("a=b,=c", "label \"=c\" has an empty key"),
            (
                "a=b,a=c",
                "label \"a=c\" repeats the key of an earlier label",
            ),
            (&seventeen.join(","), "17 labels given; at most 16"),
            ("a=b,", "label 2 of \"a=b,\" is empty"),
            (
                "-a=b",
                "label \"-a=b\" has a key that does not start with a letter or digit",
            ),
            (
                "a b=c",
                "label \"a b=c\" has a key with characters other than",
            ),
            ("a:b=c", "has a key with characters other than"),
            (
                "a=b c",
                "label \"a=b c\" has a value with characters other than",
            ),
            ("a=b=c", "has a value with characters other than"),
            ("a=é", "has a value with characters other than"),
            (&format!("{}=v", "k".repeat(64)), "has a key longer than 63"),
            (
                &format!("k={}", "v".repeat(64)),
                "has a value longer than 63",
            ),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        assert!(
            check("é", "v").is_err(),
            "non-ASCII letters are not letters here"
        );
        assert_eq!(check("k", ""), Ok(()));
    }

    #[test]
    fn check_all_applies_the_cap_and_the_rules() {
        assert_eq!(check_all(&labels(&[("a", "1"), ("b", "")])), Ok(()));
        let e = check_all(&labels(&[("a", "1"), ("b c", "2")])).unwrap_err();
        assert!(e.contains("\"b c=2\""), "{e}");
        let many: Labels = (0..=MAX_LABELS)
            .map(|i| (format!("k{i}"), String::new()))
            .collect();
        assert!(check_all(&many).unwrap_err().contains("at most 16"));
    }

    #[test]
    fn the_token_wins_a_conflict() {
        let entrypoint = labels(&[("env", "prod"), ("tier", "web")]);
        let token = labels(&[("tier", "api"), ("team", "x")]);
        assert_eq!(
            merge(&entrypoint, &token),
            labels(&[("env", "prod"), ("team", "x"), ("tier", "api")])
        );
        assert_eq!(merge(&entrypoint, &Labels::new()), entrypoint);
        assert_eq!(merge(&Labels::new(), &token), token);
    }

    #[test]
    fn invalid_hello_labels_are_dropped_one_by_one() {
        let hello = labels(&[("env", "prod"), ("bad key", "x"), ("tier", "a b")]);
        let (kept, dropped) = from_hello(&hello);
        assert_eq!(kept, labels(&[("env", "prod")]));
        assert_eq!(dropped.len(), 2, "{dropped:?}");
        assert!(dropped.iter().any(|d| d.contains("\"bad key=x\"")));
        assert!(dropped.iter().any(|d| d.contains("\"tier=a b\"")));
        // Beyond the cap: the first 16 in key order stay.
        let many: Labels = (10..30).map(|i| (format!("k{i}"), String::new())).collect();
        let (kept, dropped) = from_hello(&many);
        assert_eq!(kept.len(), MAX_LABELS);
        assert!(kept.contains_key("k10") && !kept.contains_key("k26"));
        assert_eq!(dropped.len(), 4);
    }
}
