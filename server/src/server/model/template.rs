//! The config template language: a variable's value (or an opted-in file) may refer to the other
//! variables of the same snapshot, and the server renders it before the snapshot goes out.
//!
//! Syntax: literal text, where `$${` is an escaped literal `${` (nothing else is an escape: `$$`
//! and a lone `$` stay as they are, so ordinary values with dollars need no quoting), and
//! `${EXPR}` where EXPR is a name (`NAME` or `internal.NAME`), a string literal `"..."` (escapes
//! `\"`, `\\`, `\n`, `\t`) or a call `FUNC(ARG, ...)` of one of [`FUNCTIONS`]. Whitespace may
//! surround tokens inside `${ }`. Everything here is pure: parsing and rendering take strings and
//! a lookup function; where values come from is the service's business.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// The function names, in the order error messages list them.
const FUNCTIONS: &str = "base64, base64decode, json, trim, default";
/// Longest piece of a template quoted in an error message: values can be whole files, and an
/// error should point at the spot, not repeat the file.
const SNIPPET_MAX: usize = 80;
/// Deepest nesting of calls accepted: parsing, rendering and dropping recurse, and a value is
/// user input (`trim(trim(…))` a megabyte deep must be an error, not a stack overflow).
const MAX_DEPTH: usize = 32;

/// A variable a template refers to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name {
    /// An internal variable: usable in templates only, never exported to the app's environment.
    pub internal: bool,
    pub key: String,
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.internal {
            write!(f, "internal.{}", self.key)
        } else {
            f.write_str(&self.key)
        }
    }
}

/// A parsed template: literal text and `${…}` expressions, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// Never two `Text`s in a row and never an empty `Text`, so equal texts parse to equal values.
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    /// Literal text, already unescaped.
    Text(String),
    Expr(Expr),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Expr {
    Name(Name),
    Str(String),
    Call(Func, Vec<Expr>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Func {
    Base64,
    Base64Decode,
    Json,
    Trim,
    Default,
}

impl Func {
    fn from_name(name: &str) -> Option<Func> {
        Some(match name {
            "base64" => Func::Base64,
            "base64decode" => Func::Base64Decode,
            "json" => Func::Json,
            "trim" => Func::Trim,
            "default" => Func::Default,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Func::Base64 => "base64",
            Func::Base64Decode => "base64decode",
            Func::Json => "json",
            Func::Trim => "trim",
            Func::Default => "default",
        }
    }

    fn arity(self) -> usize {
        match self {
            Func::Default => 2,
            _ => 1,
        }
    }
}

/// Why a template could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RenderError {
    /// A required name has no value.
    Missing(Name),
    /// A function failed on its argument (e.g. `base64decode` of something that is not base64).
    Function(String),
}

impl fmt::Display for RenderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RenderError::Missing(name) => write!(
                f,
                "the template refers to {name}, which is not set (use ${{default({name}, \"…\")}} \
                 if it may be missing)"
            ),
            RenderError::Function(msg) => f.write_str(msg),
        }
    }
}

/// Parses a template; the error is a sentence naming the position and the offending text.
pub fn parse(text: &str) -> Result<Template, String> {
    let bytes = text.as_bytes();
    let mut parts = Vec::new();
    let mut lit = String::new();
    // Literal text is copied in slices: `lit_start..i` is pending. `$` and `{` are ASCII, so
    // every index where we cut is a char boundary.
    let (mut i, mut lit_start) = (0, 0);
    while i < bytes.len() {
        if bytes[i] == b'$' && bytes[i + 1..].starts_with(b"${") {
            lit.push_str(&text[lit_start..i]);
            lit.push_str("${");
            i += 3;
            lit_start = i;
        } else if bytes[i] == b'$' && bytes.get(i + 1) == Some(&b'{') {
            lit.push_str(&text[lit_start..i]);
            if !lit.is_empty() {
                parts.push(Part::Text(std::mem::take(&mut lit)));
            }
            let (expr, end) = Parser::new(text, i).dollar_expr()?;
            parts.push(Part::Expr(expr));
            i = end;
            lit_start = i;
        } else {
            i += 1;
        }
    }
    lit.push_str(&text[lit_start..]);
    if !lit.is_empty() {
        parts.push(Part::Text(lit));
    }
    Ok(Template { parts })
}

/// `text` with every `${` escaped as `$${`, so parse(escape(t)) renders to t exactly.
pub fn escape(text: &str) -> String {
    text.replace("${", "$${")
}

/// A cycle in a graph of names (each name → the names its definitions refer to), if any: the
/// names along it, first repeated at the end (e.g. [A, B, A]); deterministic (smallest start).
///
/// Names that are only targets (not keys of the graph) have no outgoing edges. The search visits
/// roots and neighbours in sorted order, and the cycle found is rotated to start at its smallest
/// name, so the same graph always reports the same cycle.
pub fn find_cycle(graph: &BTreeMap<Name, Vec<Name>>) -> Option<Vec<Name>> {
    /// A name on the current path, and its neighbours (sorted, each once) still to visit.
    struct Frame<'a> {
        name: &'a Name,
        next: std::vec::IntoIter<&'a Name>,
    }
    fn frame<'a>(graph: &'a BTreeMap<Name, Vec<Name>>, name: &'a Name) -> Frame<'a> {
        let next: BTreeSet<&Name> = graph.get(name).into_iter().flatten().collect();
        Frame {
            name,
            next: next.into_iter().collect::<Vec<_>>().into_iter(),
        }
    }
    // Names fully explored (no cycle through them); those on `path` are being explored.
    let mut done: BTreeSet<&Name> = BTreeSet::new();
    let mut on_path: BTreeSet<&Name> = BTreeSet::new();
    for root in graph.keys() {
        if done.contains(root) {
            continue;
        }
        let mut path = vec![frame(graph, root)];
        on_path.insert(root);
        // Iterative depth-first search: values can refer to each other in long chains, and a
        // chain must not be able to overflow the stack.
        while let Some(top) = path.last_mut() {
            let Some(next) = top.next.next() else {
                done.insert(top.name);
                on_path.remove(top.name);
                path.pop();
                continue;
            };
            if on_path.contains(next) {
                let from = path.iter().position(|f| f.name == next).unwrap_or(0);
                let mut cycle: Vec<Name> = path[from..].iter().map(|f| f.name.clone()).collect();
                let smallest = (0..cycle.len()).min_by_key(|&i| &cycle[i]).unwrap_or(0);
                cycle.rotate_left(smallest);
                cycle.push(cycle[0].clone());
                return Some(cycle);
            }
            if !done.contains(next) {
                on_path.insert(next);
                path.push(frame(graph, next));
            }
        }
    }
    None
}

/// Walks an expression for [`Template::refs`]: `required` is false inside the first argument
/// of `default()`.
fn collect_refs(expr: &Expr, required: bool, out: &mut BTreeMap<Name, bool>) {
    match expr {
        Expr::Name(n) => {
            let r = out.entry(n.clone()).or_insert(false);
            *r |= required;
        }
        Expr::Str(_) => {}
        Expr::Call(Func::Default, args) => {
            collect_refs(&args[0], false, out);
            collect_refs(&args[1], required, out);
        }
        Expr::Call(_, args) => {
            for a in args {
                collect_refs(a, required, out);
            }
        }
    }
}

/// Evaluates an expression. With `optional`, a missing name makes the result `None` (and so
/// every call around it, up to the `default()` that allowed it) instead of an error.
fn eval(
    expr: &Expr,
    optional: bool,
    lookup: &mut dyn FnMut(&Name) -> Option<String>,
) -> Result<Option<String>, RenderError> {
    match expr {
        Expr::Name(n) => match lookup(n) {
            Some(v) => Ok(Some(v)),
            None if optional => Ok(None),
            None => Err(RenderError::Missing(n.clone())),
        },
        Expr::Str(s) => Ok(Some(s.clone())),
        Expr::Call(Func::Default, args) => match eval(&args[0], true, lookup)? {
            Some(v) if !v.is_empty() => Ok(Some(v)),
            _ => eval(&args[1], optional, lookup),
        },
        Expr::Call(func, args) => {
            let Some(x) = eval(&args[0], optional, lookup)? else {
                return Ok(None);
            };
            apply(*func, x).map(Some)
        }
    }
}

/// A one-argument function on its (present) argument.
fn apply(func: Func, x: String) -> Result<String, RenderError> {
    Ok(match func {
        Func::Base64 => crate::util::base64_encode(x.as_bytes()),
        Func::Base64Decode => {
            let bytes = crate::util::base64_decode(&x).ok_or_else(|| {
                RenderError::Function(format!(
                    "base64decode: {:?} is not valid base64",
                    snippet(&x)
                ))
            })?;
            String::from_utf8(bytes).map_err(|_| {
                RenderError::Function(format!(
                    "base64decode: {:?} decodes to bytes that are not UTF-8 text",
                    snippet(&x)
                ))
            })?
        }
        // Serialising a String cannot fail; the fallback only avoids an unwrap.
        Func::Json => serde_json::to_string(&x).unwrap_or_default(),
        Func::Trim => x.trim().to_owned(),
        Func::Default => unreachable!("default() is evaluated lazily in eval"),
    })
}

impl Template {
    /// Every name referenced, each once, sorted, with whether it is *required* (false when every
    /// occurrence is inside the first argument of default(), where a missing name is allowed).
    pub fn refs(&self) -> Vec<(Name, bool)> {
        let mut out = BTreeMap::new();
        for part in &self.parts {
            if let Part::Expr(e) = part {
                collect_refs(e, true, &mut out);
            }
        }
        out.into_iter().collect()
    }

    /// True when the template has no `${…}` at all (its text is literal after unescaping).
    pub fn is_literal(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Text(_)))
    }

    /// Renders with `lookup` giving each name's value (None: missing/unresolved). A missing
    /// required name → Err(RenderError::Missing(name)); a function failure (bad base64) →
    /// Err(RenderError::Function(message)).
    pub fn render(
        &self,
        lookup: &mut dyn FnMut(&Name) -> Option<String>,
    ) -> Result<String, RenderError> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                // Top level is required: `optional` is false, so None never comes back.
                Part::Expr(e) => out.push_str(&eval(e, false, lookup)?.unwrap_or_default()),
            }
        }
        Ok(out)
    }
}

// ---- the parser of one `${…}` --------------------------------------------------------------

/// `s` cut to at most [`SNIPPET_MAX`] bytes (on a char boundary), with `…` when cut.
fn snippet(s: &str) -> String {
    if s.len() <= SNIPPET_MAX {
        return s.to_owned();
    }
    let mut end = SNIPPET_MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn is_key(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

/// Bytes of a name or function token; a bad token (`1A`, `a.b`) is read whole so the error
/// quotes all of it.
fn is_word_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'.'
}

/// Recursive descent over one `${…}` starting at `start` (the `$`).
struct Parser<'a> {
    text: &'a str,
    start: usize,
    pos: usize,
    /// Calls open around the current position.
    depth: usize,
}

impl<'a> Parser<'a> {
    fn new(text: &'a str, start: usize) -> Self {
        Parser {
            text,
            start,
            pos: start + 2,
            depth: 0,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    /// The whole `${…}` for error messages: up to the first `}` outside a string literal, or to
    /// the end of the text when there is none.
    fn snippet(&self) -> String {
        let rest = &self.text[self.start..];
        let (mut in_str, mut escaped) = (false, false);
        for (i, c) in rest.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if in_str => escaped = true,
                '"' => in_str = !in_str,
                '}' if !in_str => return snippet(&rest[..=i]),
                _ => {}
            }
        }
        snippet(rest)
    }

    fn unterminated(&self) -> String {
        format!(
            "unterminated \"${{\" at byte {} in {:?} (no closing \"}}\")",
            self.start,
            snippet(self.text)
        )
    }

    /// The token at the current position (a whole word, else one character).
    fn found(&self) -> &'a str {
        let rest = &self.text[self.pos..];
        let word = rest.bytes().take_while(|&c| is_word_byte(c)).count();
        if word > 0 {
            &rest[..word]
        } else {
            rest.chars().next().map_or("", |c| &rest[..c.len_utf8()])
        }
    }

    fn unexpected(&self, expected: &str) -> String {
        format!(
            "unexpected {:?} at byte {} in {}: expected {expected}",
            snippet(self.found()),
            self.pos,
            self.snippet()
        )
    }

    /// Parses `${ EXPR }` and returns it with the index just after the `}`.
    fn dollar_expr(mut self) -> Result<(Expr, usize), String> {
        self.skip_ws();
        if self.peek() == Some(b'}') {
            return Err(format!(
                "empty \"${{}}\" at byte {}: put a variable name, a \"string\" or a function call \
                 inside (write $${{ for a literal \"${{\")",
                self.start
            ));
        }
        let expr = self.expr()?;
        self.skip_ws();
        match self.peek() {
            Some(b'}') => Ok((expr, self.pos + 1)),
            None => Err(self.unterminated()),
            Some(_) => Err(self.unexpected("\"}\"")),
        }
    }

    fn expr(&mut self) -> Result<Expr, String> {
        self.skip_ws();
        match self.peek() {
            None => Err(self.unterminated()),
            Some(b'"') => self.string().map(Expr::Str),
            Some(c) if is_word_byte(c) => self.name_or_call(),
            Some(_) => Err(self.unexpected("a name, a \"string\" or a function call")),
        }
    }

    fn name_or_call(&mut self) -> Result<Expr, String> {
        let at = self.pos;
        let word = self.found();
        self.pos += word.len();
        self.skip_ws();
        if self.peek() == Some(b'(') {
            let Some(func) = Func::from_name(word) else {
                return Err(format!(
                    "unknown function {:?} in {} (functions: {FUNCTIONS})",
                    snippet(word),
                    self.snippet()
                ));
            };
            if self.depth == MAX_DEPTH {
                return Err(format!(
                    "calls nested more than {MAX_DEPTH} deep at byte {at} in {}",
                    self.snippet()
                ));
            }
            self.pos += 1;
            self.depth += 1;
            let args = self.args()?;
            self.depth -= 1;
            if args.len() != func.arity() {
                let s = if func.arity() == 1 { "" } else { "s" };
                return Err(format!(
                    "{} takes {} argument{s}, got {} in {}",
                    func.name(),
                    func.arity(),
                    args.len(),
                    self.snippet()
                ));
            }
            return Ok(Expr::Call(func, args));
        }
        let (internal, key) = match word.strip_prefix("internal.") {
            Some(key) => (true, key),
            None => (false, word),
        };
        if !is_key(key) {
            return Err(format!(
                "invalid name {:?} at byte {at} in {}: a name is NAME or internal.NAME, with \
                 NAME made of letters, digits and '_', not starting with a digit",
                snippet(word),
                self.snippet()
            ));
        }
        Ok(Expr::Name(Name {
            internal,
            key: key.to_owned(),
        }))
    }

    /// The arguments after `(`, through the closing `)`.
    fn args(&mut self) -> Result<Vec<Expr>, String> {
        let mut args = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b')') {
            self.pos += 1;
            return Ok(args);
        }
        loop {
            args.push(self.expr()?);
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b')') => {
                    self.pos += 1;
                    return Ok(args);
                }
                None => return Err(self.unterminated()),
                Some(_) => return Err(self.unexpected("\",\" or \")\"")),
            }
        }
    }

    /// A string literal at the current `"`.
    fn string(&mut self) -> Result<String, String> {
        let open = self.pos;
        self.pos += 1;
        let mut out = String::new();
        let mut chars = self.text[self.pos..].chars();
        while let Some(c) = chars.next() {
            self.pos += c.len_utf8();
            match c {
                '"' => return Ok(out),
                '\\' => {
                    let Some(e) = chars.next() else { break };
                    self.pos += e.len_utf8();
                    out.push(match e {
                        '"' => '"',
                        '\\' => '\\',
                        'n' => '\n',
                        't' => '\t',
                        _ => {
                            return Err(format!(
                                "unknown escape \"\\{e}\" in the string at byte {open} in {} \
                                 (escapes: \\\" \\\\ \\n \\t)",
                                self.snippet()
                            ));
                        }
                    });
                }
                c => out.push(c),
            }
        }
        Err(format!(
            "unterminated string at byte {open} in {:?} (no closing '\"')",
            snippet(&self.text[self.start..])
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(key: &str) -> Name {
        Name {
            internal: false,
            key: key.to_owned(),
        }
    }

    fn i(key: &str) -> Name {
        Name {
            internal: true,
            key: key.to_owned(),
        }
    }

    /// Renders `text` with the given (name, value) pairs, `internal.X` written as such.
    fn render(text: &str, vars: &[(&str, &str)]) -> Result<String, RenderError> {
        let t = parse(text).unwrap_or_else(|e| panic!("{text:?} should parse: {e}"));
        t.render(&mut |name: &Name| {
            vars.iter()
                .find(|(k, _)| *k == name.to_string())
                .map(|(_, v)| (*v).to_owned())
        })
    }

    fn ok(text: &str, vars: &[(&str, &str)]) -> String {
        render(text, vars).unwrap_or_else(|e| panic!("{text:?} should render: {e}"))
    }

    fn err(text: &str) -> String {
        match parse(text) {
            Ok(t) => panic!("{text:?} should not parse, got {t:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn literals() {
        for text in [
            "",
            "plain",
            "a } b",
            "{x}",
            "$X",
            "é ü 日本",
            "a\nb",
            "$ {A}",
            "x$",
        ] {
            let t = parse(text).unwrap();
            assert!(t.is_literal(), "{text:?}");
            assert_eq!(t.refs(), vec![]);
            assert_eq!(ok(text, &[]), text);
        }
        assert!(!parse("${A}").unwrap().is_literal());
        assert!(!parse("x${\"s\"}").unwrap().is_literal());
    }

    #[test]
    fn escapes() {
        assert_eq!(ok("$${X}", &[("X", "no")]), "${X}");
        assert!(parse("$${X}").unwrap().is_literal());
        assert_eq!(ok("a$$b", &[]), "a$$b");
        assert_eq!(ok("$$", &[]), "$$");
        assert_eq!(ok("trailing $", &[]), "trailing $");
        assert_eq!(ok("$", &[]), "$");
        assert_eq!(ok("pa$$word$", &[]), "pa$$word$");
        // `$$${X}`: a lone `$`, then the escape `$${`; `$$$${X}`: `$$` then the escape.
        assert_eq!(ok("$$${X}", &[]), "$${X}");
        assert_eq!(ok("$$$${X}", &[]), "$$${X}");
        assert_eq!(ok("$${X}${X}", &[("X", "v")]), "${X}v");
        assert_eq!(ok("$$${A}", &[("A", "v")]), "$${A}");
        // The escape is only `$${`: `$$` before anything else is two dollars.
        assert_eq!(ok("$$A ${A}", &[("A", "v")]), "$$A v");
    }

    #[test]
    fn names_and_strings() {
        let vars = [("A", "1"), ("internal.A", "secret"), ("_b9", "x")];
        assert_eq!(ok("${A}", &vars), "1");
        assert_eq!(
            ok("pre-${A}-${internal.A}-${_b9}-post", &vars),
            "pre-1-secret-x-post"
        );
        assert_eq!(ok("${ \t\n A \n}", &vars), "1");
        assert_eq!(ok(r#"${"lit"}"#, &[]), "lit");
        assert_eq!(ok(r#"${"q\"b\\n\nt\t}"}"#, &[]), "q\"b\\n\nt\t}");
        assert_eq!(ok(r#"${""}"#, &[]), "");
        assert_eq!(ok(r#"${"日本 ${X}"}"#, &[]), "日本 ${X}");
    }

    #[test]
    fn functions() {
        let vars = [("U", "user:pw"), ("S", "  padded \n"), ("E", "")];
        assert_eq!(ok("${base64(U)}", &vars), "dXNlcjpwdw==");
        assert_eq!(ok(r#"${base64("a")}"#, &[]), "YQ==");
        assert_eq!(ok(r#"${base64("")}"#, &[]), "");
        assert_eq!(ok(r#"${base64decode("dXNlcjpwdw==")}"#, &[]), "user:pw");
        assert_eq!(ok(r#"${base64decode("w6k=")}"#, &[]), "é");
        assert_eq!(
            render(r#"${base64decode("not base64!")}"#, &[]),
            Err(RenderError::Function(
                "base64decode: \"not base64!\" is not valid base64".into()
            ))
        );
        // 0xff is not UTF-8.
        let e = render(r#"${base64decode("/w==")}"#, &[]).unwrap_err();
        assert!(
            matches!(&e, RenderError::Function(m) if m.contains("not UTF-8")),
            "{e}"
        );
        assert_eq!(ok(r#"${json("a\"b\n")}"#, &[]), r#""a\"b\n""#);
        assert_eq!(ok("${json(E)}", &vars), r#""""#);
        assert_eq!(ok("${trim(S)}", &vars), "padded");
        assert_eq!(ok("[${trim(E)}]", &vars), "[]");
        assert_eq!(ok(r#"${default(U, "d")}"#, &vars), "user:pw");
        assert_eq!(ok(r#"${default(E, "d")}"#, &vars), "d");
        assert_eq!(ok(r#"${default(NOPE, "d")}"#, &vars), "d");
        assert_eq!(ok("${default(NOPE, U)}", &vars), "user:pw");
        assert_eq!(ok(r#"${ default ( NOPE , "d" ) }"#, &vars), "d");
    }

    #[test]
    fn nesting() {
        let t = r#"${base64(default(internal.X, "d"))}"#;
        assert_eq!(ok(t, &[]), "ZA==");
        assert_eq!(ok(t, &[("internal.X", "x")]), "eA==");
        assert_eq!(ok(t, &[("internal.X", "")]), "ZA==");
        assert_eq!(ok("${trim(base64decode(base64(U)))}", &[("U", " v ")]), "v");
        // A missing name inside a call in default's first argument makes the whole argument
        // missing, and an empty result after trim counts as empty.
        assert_eq!(ok(r#"${default(trim(A), "d")}"#, &[]), "d");
        assert_eq!(ok(r#"${default(trim(A), "d")}"#, &[("A", "  ")]), "d");
        assert_eq!(ok(r#"${default(default(A, B), "c")}"#, &[("B", "b")]), "b");
        assert_eq!(ok(r#"${default(default(A, B), "c")}"#, &[]), "c");
        assert_eq!(
            ok(
                r#"{"auth": ${json(default(internal.T, "none"))}}"#,
                &[("internal.T", "t\"")]
            ),
            r#"{"auth": "t\""}"#
        );
    }

    #[test]
    fn refs_required_flags() {
        let t = parse(r#"${B} ${default(A, C)} ${default(internal.X, "d")} ${trim(B)}"#).unwrap();
        assert_eq!(
            t.refs(),
            vec![
                (n("A"), false),
                (n("B"), true),
                (n("C"), true),
                (i("X"), false)
            ]
        );
        // Required wherever one occurrence is required.
        let t = parse("${default(A, B)}${A}").unwrap();
        assert_eq!(t.refs(), vec![(n("A"), true), (n("B"), true)]);
        // Nested defaults: everything in an outer first argument is optional.
        let t = parse("${default(default(A, B), C)}").unwrap();
        assert_eq!(
            t.refs(),
            vec![(n("A"), false), (n("B"), false), (n("C"), true)]
        );
        // default(x, y) as the second argument keeps y's requiredness.
        let t = parse("${default(A, default(B, C))}").unwrap();
        assert_eq!(
            t.refs(),
            vec![(n("A"), false), (n("B"), false), (n("C"), true)]
        );
        // Sorted: exported names before internal ones (the derive orders `internal` first).
        let t = parse("${internal.A}${Z}${A}").unwrap();
        assert_eq!(
            t.refs(),
            vec![(n("A"), true), (n("Z"), true), (i("A"), true)]
        );
    }

    #[test]
    fn render_missing() {
        assert_eq!(render("x${A}", &[]), Err(RenderError::Missing(n("A"))));
        assert_eq!(
            render("${internal.K}", &[("K", "exported, not internal")]),
            Err(RenderError::Missing(i("K")))
        );
        assert_eq!(
            render("${base64(A)}", &[]),
            Err(RenderError::Missing(n("A")))
        );
        // default's fallback is required when the default itself is.
        assert_eq!(
            render("${default(A, B)}", &[]),
            Err(RenderError::Missing(n("B")))
        );
        assert_eq!(
            RenderError::Missing(i("K")).to_string(),
            "the template refers to internal.K, which is not set (use ${default(internal.K, \"…\")} \
             if it may be missing)"
        );
        // The lookup is asked only for what rendering needs: default's fallback is lazy.
        let t = parse("${default(A, B)}").unwrap();
        let mut asked = Vec::new();
        let out = t.render(&mut |name: &Name| {
            asked.push(name.clone());
            Some("a".to_owned())
        });
        assert_eq!(out, Ok("a".to_owned()));
        assert_eq!(asked, vec![n("A")]);
    }

    #[test]
    fn name_display() {
        assert_eq!(n("A_1").to_string(), "A_1");
        assert_eq!(i("K").to_string(), "internal.K");
    }

    #[test]
    fn parse_errors() {
        assert_eq!(
            err("a ${B"),
            "unterminated \"${\" at byte 2 in \"a ${B\" (no closing \"}\")"
        );
        assert!(err("${").starts_with("unterminated \"${\" at byte 0"));
        assert!(err("${base64(A)").starts_with("unterminated \"${\""));
        assert!(err("${base64(A,").starts_with("unterminated \"${\""));
        assert!(err("x ${}").starts_with("empty \"${}\" at byte 2"));
        assert!(err("${  }").starts_with("empty \"${}\""));
        assert!(
            err("${1A}").starts_with("invalid name \"1A\" at byte 2 in ${1A}: a name is"),
            "{}",
            err("${1A}")
        );
        assert!(err("${a.b}").starts_with("invalid name \"a.b\""));
        assert!(err("${internal.}").starts_with("invalid name \"internal.\""));
        assert!(err("${internal.1}").starts_with("invalid name \"internal.1\""));
        assert_eq!(
            err("${upper(A)}"),
            "unknown function \"upper\" in ${upper(A)} (functions: base64, base64decode, json, \
             trim, default)"
        );
        assert_eq!(
            err("${default(A)}"),
            "default takes 2 arguments, got 1 in ${default(A)}"
        );
        assert_eq!(
            err("${trim()}"),
            "trim takes 1 argument, got 0 in ${trim()}"
        );
        assert_eq!(
            err("${json(A, B)}"),
            "json takes 1 argument, got 2 in ${json(A, B)}"
        );
        assert_eq!(
            err("${default(A, B, C)}"),
            "default takes 2 arguments, got 3 in ${default(A, B, C)}"
        );
        assert_eq!(
            err(r#"x ${"abc}"#),
            r#"unterminated string at byte 4 in "${\"abc}" (no closing '"')"#
        );
        assert!(err(r#"${"a\"#).starts_with("unterminated string"));
        assert!(err(r#"${"a\x"}"#).starts_with(r#"unknown escape "\x" in the string at byte 2"#));
        assert_eq!(
            err("${A B}"),
            "unexpected \"B\" at byte 4 in ${A B}: expected \"}\""
        );
        assert!(err("${A}${B C}").starts_with("unexpected \"C\" at byte 8 in ${B C}"));
        assert!(err(r#"${"a" "b"}"#).starts_with("unexpected \"\\\"\" at byte 6"));
        assert!(err("${trim(A B)}").ends_with("expected \",\" or \")\""));
        assert!(err("${trim(,)}").starts_with("unexpected \",\""));
        assert!(err("${-}").starts_with("unexpected \"-\" at byte 2"));
        assert!(err("${é}").starts_with("unexpected \"é\" at byte 2"));
        assert!(err("${A${B}}").starts_with("unexpected \"$\""));
        let deep = |n: usize| format!("${{{}A{}}}", "trim(".repeat(n), ")".repeat(n));
        assert_eq!(ok(&deep(MAX_DEPTH), &[("A", " a ")]), "a");
        assert!(err(&deep(MAX_DEPTH + 1)).starts_with("calls nested more than 32 deep at byte"));
        assert!(err(&deep(1_000_000)).starts_with("calls nested more than 32 deep"));
        // A long template is quoted only in part.
        let long = format!("${{A B{}}}", "x".repeat(500));
        assert!(err(&long).len() < 250, "{}", err(&long));
    }

    /// Strings over an alphabet of the characters that matter, deterministically enumerated.
    fn tricky_strings() -> Vec<String> {
        let alphabet = ["$", "{", "}", "A", "$$", "${", " ", "é", "\\", "\""];
        let mut out = vec![String::new()];
        let mut frontier = vec![String::new()];
        for _ in 0..4 {
            let mut next = Vec::new();
            for s in &frontier {
                for a in alphabet {
                    next.push(format!("{s}{a}"));
                }
            }
            out.extend(next.iter().cloned());
            frontier = next;
        }
        out
    }

    #[test]
    fn escape_round_trip() {
        let mut count = 0;
        for t in tricky_strings()
            .into_iter()
            .chain(["${A}", "$${A}", "$$${A}", "a${b}c${", "}${", "$"].map(String::from))
        {
            let escaped = escape(&t);
            let parsed = parse(&escaped).unwrap_or_else(|e| panic!("escape({t:?}): {e}"));
            assert!(parsed.is_literal(), "{t:?} → {escaped:?}");
            assert_eq!(parsed.render(&mut |_| None), Ok(t.clone()), "{escaped:?}");
            count += 1;
        }
        assert!(count > 10_000);
        assert_eq!(escape("a${B}$$"), "a$${B}$$");
    }

    #[test]
    fn never_panics() {
        let tricky = [
            r#"a${base64(default(internal.X, "d\"}"))}b$${c}$$"#,
            r#"${default( trim(json("é\\")) , base64decode("w6k="))}${"日本"}"#,
            "${internal.1}${ }${1}${a.b}${f(}${\"\\",
            "€${€}$€{€}${\"€\\€\"}",
        ];
        for s in tricky {
            for (cut, _) in s.char_indices().chain([(s.len(), ' ')]) {
                for piece in [&s[..cut], &s[cut..]] {
                    if let Ok(t) = parse(piece) {
                        let _ = t.refs();
                        let _ = t.render(&mut |n| Some(n.key.clone()));
                        let _ = t.render(&mut |_| None);
                    }
                }
            }
        }
        for s in tricky_strings() {
            if let Ok(t) = parse(&s) {
                let _ = t.render(&mut |_| Some("x".into()));
            }
        }
    }

    fn graph(edges: &[(&str, &[&str])]) -> BTreeMap<Name, Vec<Name>> {
        edges
            .iter()
            .map(|(k, vs)| (n(k), vs.iter().map(|v| n(v)).collect()))
            .collect()
    }

    fn names(keys: &[&str]) -> Vec<Name> {
        keys.iter().map(|k| n(k)).collect()
    }

    #[test]
    fn cycles() {
        assert_eq!(find_cycle(&BTreeMap::new()), None);
        // Acyclic, with a diamond and a name reached twice.
        let g = graph(&[("A", &["B", "C"]), ("B", &["D"]), ("C", &["D"]), ("D", &[])]);
        assert_eq!(find_cycle(&g), None);
        // Edges to names that are not in the graph are leaves, not cycles.
        let g = graph(&[("A", &["X", "Y"]), ("B", &["X", "A"])]);
        assert_eq!(find_cycle(&g), None);
        // Self-loop.
        let g = graph(&[("A", &[]), ("S", &["S"])]);
        assert_eq!(find_cycle(&g), Some(names(&["S", "S"])));
        // Two-cycle.
        let g = graph(&[("A", &["B"]), ("B", &["A"])]);
        assert_eq!(find_cycle(&g), Some(names(&["A", "B", "A"])));
        // A three-cycle among acyclic nodes, entered from a bigger name: reported from its
        // smallest member.
        let g = graph(&[
            ("A", &["Z"]),
            ("B", &["A", "Q"]),
            ("Z", &["Q"]),
            ("Q", &["R"]),
            ("R", &["P", "X"]),
            ("P", &["Q"]),
            ("X", &[]),
        ]);
        assert_eq!(find_cycle(&g), Some(names(&["P", "Q", "R", "P"])));
        // Duplicate edges and internal names.
        let mut g = graph(&[("A", &["A"])]);
        g.insert(n("A"), vec![i("A"), i("A")]);
        g.insert(i("A"), vec![n("B")]);
        g.insert(n("B"), vec![n("A")]);
        assert_eq!(find_cycle(&g), Some(vec![n("A"), i("A"), n("B"), n("A")]));
        // A long chain does not overflow the stack.
        let mut g = BTreeMap::new();
        for k in 0..100_000 {
            g.insert(n(&format!("K{k}")), vec![n(&format!("K{}", k + 1))]);
        }
        assert_eq!(find_cycle(&g), None);
        g.insert(n("K100000"), vec![n("K0")]);
        assert_eq!(find_cycle(&g).map(|c| c.len()), Some(100_002));
    }
}
