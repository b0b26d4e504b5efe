//! Reading a dotenv file for `waypost config import FILE.env`: the variables in file order, each
//! value turned into a waypost template (model/template.rs), so `${NAME}` keeps referring to
//! another variable (as in docker compose and python-dotenv) and everything else stays literal.
//!
//! The accepted format is the common subset of those tools: `# comments`, an optional
//! `export `, `KEY=VALUE` with unquoted (trimmed, ` #` starts a comment), single-quoted
//! (literal) or double-quoted (escapes, `${NAME}` references) values; quoted values may span lines.

use crate::server::model::{config, template};

/// The variables of a dotenv file, in file order (a later duplicate key replaces the earlier
/// one's value but keeps the first position), each value as a waypost template. Errors name the
/// 1-based line.
pub fn parse(text: &str) -> Result<Vec<(String, String)>, String> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    // Windows line endings: a CR before LF is part of the line break, also inside quoted values.
    let text = text.replace("\r\n", "\n");
    let lines: Vec<&str> = text.split('\n').collect();
    let mut out: Vec<(String, String)> = Vec::new();
    let mut idx = 0;
    while idx < lines.len() {
        let start = idx;
        let line_no = start + 1;
        let line = lines[idx].trim_start();
        idx += 1;
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = strip_export(line);
        let Some((key, rest)) = line.split_once('=') else {
            return Err(format!(
                "line {line_no}: expected KEY=VALUE, found {:?}",
                line.trim_end()
            ));
        };
        let key = key.trim_end();
        config::check_key(key).map_err(|e| format!("line {line_no}: {e}"))?;
        let rest = rest.trim_start();
        let value = match rest.chars().next() {
            Some(q @ ('\'' | '"')) => {
                let (value, end_line, after) =
                    quoted(q, &rest[1..], &lines, &mut idx).ok_or_else(|| {
                        format!(
                            "line {line_no}: the value of {key} opens a {} quote that is never \
                             closed",
                            if q == '"' { "double" } else { "single" }
                        )
                    })?;
                let after = after.trim();
                if !after.is_empty() && !after.starts_with('#') {
                    return Err(format!(
                        "line {end_line}: unexpected {after:?} after the closing quote of {key} \
                         (only a # comment may follow)"
                    ));
                }
                value
            }
            _ => strip_comment(rest).trim().to_owned(),
        };
        // Unquoted and double-quoted values are templates as written: check them here, where the
        // line is known, rather than have the server reject the import.
        template::parse(&value).map_err(|e| format!("line {line_no}: the value of {key}: {e}"))?;
        match out.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => out.push((key.to_owned(), value)),
        }
    }
    Ok(out)
}

/// `line` without a leading `export` keyword (followed by whitespace). A variable named
/// `export` (`export=1`, `export = 1`) is left alone.
fn strip_export(line: &str) -> &str {
    match line.strip_prefix("export") {
        Some(rest) if rest.starts_with(char::is_whitespace) => {
            let rest = rest.trim_start();
            if rest.starts_with('=') { line } else { rest }
        }
        _ => line,
    }
}

/// An unquoted value without its inline comment: `#` starts one after whitespace (so
/// `a#b` and `#b` right after `=` are values, as in docker compose).
fn strip_comment(value: &str) -> &str {
    let mut prev_ws = false;
    for (i, c) in value.char_indices() {
        if c == '#' && prev_ws {
            return &value[..i];
        }
        prev_ws = c.is_whitespace();
    }
    value
}

/// A quoted value whose opening quote `q` was just before `first` (the rest of its line). Reads
/// on through `lines[*idx..]` while the quote is open, advancing `*idx`. Returns the value as a
/// template, the 1-based line of the closing quote and the text after it; None when the quote
/// is never closed.
fn quoted<'a>(
    q: char,
    first: &'a str,
    lines: &[&'a str],
    idx: &mut usize,
) -> Option<(String, usize, &'a str)> {
    let mut raw = String::new();
    let mut line = first;
    loop {
        if let Some(end) = closing(q, line) {
            raw.push_str(&line[..end]);
            let value = if q == '\'' {
                template::escape(&raw)
            } else {
                unescape_double(&raw)
            };
            // `*idx` is the line after the current one, so it is the current line's number.
            return Some((value, *idx, &line[end + 1..]));
        }
        raw.push_str(line);
        raw.push('\n');
        line = lines.get(*idx)?;
        *idx += 1;
    }
}

/// Where the closing quote is in `line`: the first `q`, skipping backslash escapes for `"`.
fn closing(q: char, line: &str) -> Option<usize> {
    if q == '\'' {
        return line.find('\'');
    }
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => return Some(i),
            _ => {}
        }
    }
    None
}

/// The template for the inside of a double-quoted value: backslash escapes resolved, `${…}`
/// kept as written. A `\$` is a literal dollar and must stay one in the template: before `{`
/// it becomes the escape `$${`; right before a `${` reference it is written `${"$"}`, since a
/// plain `$` there would turn the reference into the escape `$${`. Unknown escapes (`\x`) stay
/// as written, as in docker compose and python-dotenv.
fn unescape_double(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.char_indices();
    while let Some((_, c)) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some((_, 'n')) => out.push('\n'),
            Some((_, 'r')) => out.push('\r'),
            Some((_, 't')) => out.push('\t'),
            Some((_, '"')) => out.push('"'),
            Some((_, '\\')) => out.push('\\'),
            Some((i, '$')) => {
                let rest = &raw[i + 1..];
                if rest.starts_with('{') {
                    chars.next();
                    out.push_str("$${");
                } else if rest.starts_with("${") {
                    out.push_str("${\"$\"}");
                } else {
                    out.push('$');
                }
            }
            Some((_, other)) => {
                out.push('\\');
                out.push(other);
            }
            // `closing` never ends a value on a backslash; kept for completeness.
            None => out.push('\\'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `text` and renders each value with the variables parsed before it (and
    /// `internal.SECRET`), as the server would, to check the templates' meaning.
    fn rendered(text: &str) -> Vec<(String, String)> {
        let vars = parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        let mut done: Vec<(String, String)> = Vec::new();
        for (k, v) in &vars {
            let t = template::parse(v).unwrap();
            let r = t
                .render(&mut |n: &template::Name| {
                    if n.internal {
                        return (n.key == "SECRET").then(|| "s3cr3t".to_owned());
                    }
                    done.iter()
                        .find(|(k, _)| *k == n.key)
                        .map(|(_, v)| v.clone())
                })
                .unwrap_or_else(|e| panic!("{k}={v:?}: {e}"));
            done.push((k.clone(), r));
        }
        done
    }

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn err(text: &str) -> String {
        match parse(text) {
            Ok(v) => panic!("{text:?} should fail, got {v:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn realistic_file() {
        let file = r#"# Database settings
  # an indented comment

export DB_HOST=db.internal   # the primary
export	DB_PORT = 5432
DB_USER='app'
DB_PASS='p@ss#word ${not a ref} $$'
DB_URL="postgres://${DB_USER}:${DB_PASS}@${DB_HOST}:${DB_PORT}/app"
GREETING="Hello,\n\t\"World\" \\ # not a comment" # a comment
CERT="-----BEGIN-----
abc
-----END-----"
MULTI='line one
line two'
EMPTY=
EMPTY_QUOTED=""
EMPTY_SINGLE=''
HASH=a#b
LEADING_HASH=#x
TOKEN=${default(internal.SECRET, "none")}
PRICE="\$5 and \${HOME} and \$${DB_PORT}"
DOLLARS=pa$$word $x
UNKNOWN_ESCAPE="a\qb"
"#;
        assert_eq!(
            rendered(file),
            pairs(&[
                ("DB_HOST", "db.internal"),
                ("DB_PORT", "5432"),
                ("DB_USER", "app"),
                ("DB_PASS", "p@ss#word ${not a ref} $$"),
                (
                    "DB_URL",
                    "postgres://app:p@ss#word ${not a ref} $$@db.internal:5432/app"
                ),
                ("GREETING", "Hello,\n\t\"World\" \\ # not a comment"),
                ("CERT", "-----BEGIN-----\nabc\n-----END-----"),
                ("MULTI", "line one\nline two"),
                ("EMPTY", ""),
                ("EMPTY_QUOTED", ""),
                ("EMPTY_SINGLE", ""),
                ("HASH", "a#b"),
                ("LEADING_HASH", "#x"),
                ("TOKEN", "s3cr3t"),
                ("PRICE", "$5 and ${HOME} and $5432"),
                ("DOLLARS", "pa$$word $x"),
                ("UNKNOWN_ESCAPE", "a\\qb"),
            ])
        );
        // The values as templates: references kept, literals escaped.
        let raw = parse(file).unwrap();
        let get = |k: &str| raw.iter().find(|(key, _)| key == k).unwrap().1.clone();
        assert_eq!(get("DB_PASS"), "p@ss#word $${not a ref} $$");
        assert_eq!(
            get("DB_URL"),
            "postgres://${DB_USER}:${DB_PASS}@${DB_HOST}:${DB_PORT}/app"
        );
        assert_eq!(get("PRICE"), "$5 and $${HOME} and ${\"$\"}${DB_PORT}");
    }

    #[test]
    fn duplicates_keep_first_position() {
        assert_eq!(
            parse("A=1\nB=2\nA=3\n").unwrap(),
            pairs(&[("A", "3"), ("B", "2")])
        );
    }

    #[test]
    fn line_endings_and_bom() {
        assert_eq!(
            parse("\u{feff}A=1\r\n# c\r\nB=\"x\r\ny\"\r\nC='p\r\nq'\r\n").unwrap(),
            pairs(&[("A", "1"), ("B", "x\ny"), ("C", "p\nq")])
        );
        assert_eq!(parse("").unwrap(), vec![]);
        assert_eq!(parse("\n\n   \n# only comments\n").unwrap(), vec![]);
        // No final newline.
        assert_eq!(parse("A=1").unwrap(), pairs(&[("A", "1")]));
    }

    #[test]
    fn export_and_spacing() {
        assert_eq!(
            parse("export  A=1\n  B  =  two words  \nexport=3\nexport = 4\nexportX=5\n").unwrap(),
            pairs(&[
                ("A", "1"),
                ("B", "two words"),
                ("export", "4"),
                ("exportX", "5")
            ])
        );
    }

    #[test]
    fn double_quote_escapes() {
        assert_eq!(
            rendered(r#"A="cr\r lf\n tab\t q\" bs\\ d\$ d\${x}" "#),
            pairs(&[("A", "cr\r lf\n tab\t q\" bs\\ d$ d${x}")])
        );
        // An escaped quote does not close the value, even at the end of a line.
        assert_eq!(
            rendered("A=\"one\\\"\ntwo\""),
            pairs(&[("A", "one\"\ntwo")])
        );
        // `\\` then a reference: the reference stays one.
        assert_eq!(
            rendered("B=v\nA=\"\\\\${B}\""),
            pairs(&[("B", "v"), ("A", "\\v")])
        );
        // `\$` then `$$`: a literal dollar followed by two.
        assert_eq!(rendered("A=\"\\$$$\""), pairs(&[("A", "$$$")]));
        // `\$\${`: two literal dollars and a brace.
        assert_eq!(rendered("A=\"\\$\\${x}\""), pairs(&[("A", "$${x}")]));
    }

    #[test]
    fn errors_name_the_line() {
        assert_eq!(
            err("A=1\n\nJUST_A_WORD\n"),
            "line 3: expected KEY=VALUE, found \"JUST_A_WORD\""
        );
        assert!(err("A=1\n1BAD=2").starts_with("line 2: invalid variable name \"1BAD\""));
        assert!(err("MY-KEY=2").starts_with("line 1: invalid variable name \"MY-KEY\""));
        assert!(err("=2").starts_with("line 1: invalid variable name \"\""));
        assert_eq!(
            err("A=1\nB=\"open\nstill open\n"),
            "line 2: the value of B opens a double quote that is never closed"
        );
        assert_eq!(
            err("B='open"),
            "line 1: the value of B opens a single quote that is never closed"
        );
        assert_eq!(
            err("A=\"x\" junk"),
            "line 1: unexpected \"junk\" after the closing quote of A (only a # comment may \
             follow)"
        );
        // The junk is reported on the line of the closing quote.
        assert!(err("A=1\nB='x\ny'z").starts_with("line 3: unexpected \"z\""));
        assert!(
            err("A=1\nB=${C").starts_with("line 2: the value of B: unterminated \"${\""),
            "{}",
            err("A=1\nB=${C")
        );
        assert!(err("B=\"${upper(A)}\"").starts_with("line 1: the value of B: unknown function"));
        // After an error-free multi-line value, line numbers keep counting.
        assert!(err("A='x\ny\nz'\nBAD\n").starts_with("line 4:"));
    }

    #[test]
    fn quoted_comment_and_after() {
        assert_eq!(
            parse("A=\"x # y\" # c\nB='#'#c\nC=\"\"\t\n").unwrap(),
            pairs(&[("A", "x # y"), ("B", "#"), ("C", "")])
        );
    }

    #[test]
    fn escape_round_trip_of_single_quotes() {
        for s in ["${X}", "$${X}", "$", "a$$b", "}{", "$\\{"] {
            let file = format!("A='{s}'");
            assert_eq!(rendered(&file), pairs(&[("A", s)]), "{file}");
        }
    }
}
