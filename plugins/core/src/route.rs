//! Which requests a policy applies to: a set of methods and a path prefix or exact path, decided
//! once, here, on a canonical form of the path (README "Canonical paths").
//!
//! Every filter asks [`scope`] (directly or through its policy). A path in canonical form is matched
//! normally (ASCII case-insensitively unless a rule says `"case_sensitive": true`). A path that is
//! not canonical is matched, over-approximately, in every form a lenient upstream could route it to
//! (decoded up to [`MAX_DECODE_ROUNDS`] times, backslashes as slashes, `;` parameters dropped,
//! empty and dot segments resolved, trailing slash and trailing dots ignored, case folded); if any
//! of those could match a rule, the request is refused with `400 path_not_canonical`
//! ([`not_canonical_rejection`]); if none could, it is out of scope. No spelling of a protected
//! path is ever treated as unprotected.

use serde::Deserialize;

use crate::{Code, ConfigError, Rejection};

/// Raw route as written in configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Upper-case methods; empty or absent means every method.
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub path_prefix: Option<String>,
    #[serde(default)]
    pub path_exact: Option<String>,
    /// Compare canonical paths byte for byte instead of ASCII case-insensitively. Non-canonical
    /// spellings are still compared case-insensitively (over-protecting is safe).
    #[serde(default)]
    pub case_sensitive: bool,
}

/// A validated route matcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteMatch {
    methods: Vec<String>,
    path: PathMatch,
    case_sensitive: bool,
    /// The rule's path lower-cased, without its trailing `/` (the root is ""): what a lenient
    /// form has to start with to be (possibly) routed to this rule.
    lenient: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PathMatch {
    Prefix(String),
    /// Stored without a trailing `/` (except the root): canonical paths never end in one.
    Exact(String),
}

/// Which rule of a filter applies to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The path is canonical and the rule with this index (in the order given) matches.
    In(usize),
    /// No spelling of this path matches any rule: the filter does not apply.
    Out,
    /// The path is not canonical and some lenient reading of it could match a rule: refuse with
    /// [`not_canonical_rejection`].
    NotCanonical,
}

impl Scope {
    /// Whether the filter has anything to do with the request (`NotCanonical` counts: it is refused).
    pub fn applies(self) -> bool {
        !matches!(self, Scope::Out)
    }
}

/// The stable code of the rejection of a non-canonical path on a protected route.
pub const CODE_PATH_NOT_CANONICAL: &str = Code::PathNotCanonical.as_str();

/// `400 path_not_canonical`, the same in every filter.
pub fn not_canonical_rejection() -> Rejection {
    Rejection::new(Code::PathNotCanonical)
}

/// Percent-decoding rounds applied when computing lenient forms. A path still holding escapes
/// after them is refused wherever the filter has a rule for the method (fail closed).
pub const MAX_DECODE_ROUNDS: usize = 3;

impl RouteMatch {
    pub fn parse(raw: &RouteConfig, field: &str) -> Result<Self, ConfigError> {
        let path = match (&raw.path_prefix, &raw.path_exact) {
            (Some(prefix), None) => PathMatch::Prefix(prefix.clone()),
            (None, Some(exact)) => PathMatch::Exact(strip_trailing_slash(exact).to_string()),
            _ => return Err(ConfigError::new(field, "exactly one of `path_prefix` and `path_exact` is required")),
        };
        let text = match &path {
            PathMatch::Prefix(p) | PathMatch::Exact(p) => p,
        };
        if !text.starts_with('/') {
            return Err(ConfigError::new(field, "paths must start with `/`"));
        }
        if !is_canonical(strip_trailing_slash(text)) {
            return Err(ConfigError::new(
                field,
                format!("`{text}` is not a canonical path (no empty or dot segments, `%` escapes of unreserved characters or separators, `;`, `\\`, control or non-ASCII bytes): it would never match a canonical request"),
            ));
        }
        for method in &raw.methods {
            if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(ConfigError::new(format!("{field}.methods"), format!("`{method}` is not an upper-case HTTP method")));
            }
        }
        let lenient = strip_trailing_slash(text).trim_end_matches('/').to_ascii_lowercase().into_bytes();
        Ok(RouteMatch { methods: raw.methods.clone(), path, case_sensitive: raw.case_sensitive, lenient })
    }

    /// Methods compare ASCII case-insensitively (a lenient upstream may accept `post`).
    fn method_ok(&self, method: &str) -> bool {
        self.methods.is_empty() || self.methods.iter().any(|m| m.eq_ignore_ascii_case(method))
    }

    /// `path` is a canonical request path without its query (see [`scope`] for any other).
    /// A prefix rule `/v1/` also matches `/v1`; an exact rule `/v1/payouts` also matches
    /// `/v1/payouts.json` (a format suffix some frameworks route to the same handler).
    pub fn matches(&self, method: &str, path: &str) -> bool {
        if !self.method_ok(method) {
            return false;
        }
        let cs = self.case_sensitive;
        match &self.path {
            PathMatch::Prefix(prefix) => {
                starts_with(path, prefix, cs)
                    || (prefix.len() > 1 && prefix.ends_with('/') && eq(path, strip_trailing_slash(prefix), cs))
            }
            PathMatch::Exact(exact) => {
                eq(path, exact, cs)
                    || (starts_with(path, exact, cs)
                        && path.as_bytes().get(exact.len()) == Some(&b'.')
                        && !path.as_bytes().get(exact.len()..).unwrap_or_default().contains(&b'/'))
            }
        }
    }

    /// Whether a lenient form (lower-case, see [`lenient_forms`]) could be routed to this rule.
    /// Deliberately broad: a plain prefix test on the rule's path without its trailing `/`.
    fn could_match(&self, method: &str, form: &[u8]) -> bool {
        self.method_ok(method) && form.starts_with(&self.lenient)
    }
}

fn strip_trailing_slash(path: &str) -> &str {
    if path.len() > 1 {
        path.strip_suffix('/').unwrap_or(path)
    } else {
        path
    }
}

fn eq(path: &str, rule: &str, case_sensitive: bool) -> bool {
    if case_sensitive {
        path == rule
    } else {
        path.eq_ignore_ascii_case(rule)
    }
}

fn starts_with(path: &str, rule: &str, case_sensitive: bool) -> bool {
    match path.as_bytes().get(..rule.len()) {
        Some(head) if case_sensitive => head == rule.as_bytes(),
        Some(head) => head.eq_ignore_ascii_case(rule.as_bytes()),
        None => false,
    }
}

/// Parses a list of routes, naming the failing index in errors.
pub fn parse_routes(raw: &[RouteConfig], field: &str) -> Result<Vec<RouteMatch>, ConfigError> {
    raw.iter().enumerate().map(|(i, r)| RouteMatch::parse(r, &format!("{field}[{i}]"))).collect()
}

/// Splits `:path` into path and query (without the `?`).
pub fn split_path(path_and_query: &str) -> (&str, Option<&str>) {
    match path_and_query.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path_and_query, None),
    }
}

/// The one scope decision every filter makes. `path` is the raw `:path` (its query, from the
/// first `?`, is ignored); `routes` are the filter's rules in order.
pub fn scope<'r, I>(routes: I, method: &str, path: &str) -> Scope
where
    I: IntoIterator<Item = &'r RouteMatch>,
{
    let path = split_path(path).0;
    if is_canonical(path) {
        return match routes.into_iter().position(|r| r.matches(method, path)) {
            Some(index) => Scope::In(index),
            None => Scope::Out,
        };
    }
    // Only rules for this method can be meant: with none, no reading needs computing.
    let candidates: Vec<&RouteMatch> = routes.into_iter().filter(|r| r.method_ok(method)).collect();
    if candidates.is_empty() {
        return Scope::Out;
    }
    let (forms, exhausted) = lenient_forms(path);
    // Unreadable (still encoded after MAX_DECODE_ROUNDS decodings, non-ASCII, a `%` that is not
    // an escape): any rule for this method could be meant.
    if candidates.iter().any(|r| exhausted || forms.iter().any(|form| r.could_match(method, form))) {
        Scope::NotCanonical
    } else {
        Scope::Out
    }
}

/// Characters allowed literally in a canonical path besides `/`: RFC 3986 `pchar` without `;`
/// (path parameters) and `%` (handled as escapes).
fn literal_ok(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,=:@".contains(&b)
}

/// Characters a canonical path may carry percent-encoded: printable ASCII whose encoding a
/// lenient upstream cannot turn into a different route (never unreserved characters, `/`, `\`,
/// `;`, `%`, `.`, `?`, `#`, space, control or non-ASCII bytes). [`is_canonical`] also refuses
/// the escape of a character [`literal_ok`] allows, so a canonical path has one spelling.
fn escape_ok(b: u8) -> bool {
    b"!\"$&'()*+,:<=>@[]^`{|}".contains(&b)
}

/// Whether `path` (without its query) is in canonical form: starts with `/`; no empty segment
/// (`//`, or a trailing `/` after a non-root path); no `.` or `..` segment and no segment ending
/// in `.`; only `pchar` characters without `;`; `%` escapes only in upper-case hex and only of
/// characters that [`escape_ok`] allows; so no backslash, `#`, control or non-ASCII byte.
pub fn is_canonical(path: &str) -> bool {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return false;
    }
    if bytes.len() > 1 && bytes.last() == Some(&b'/') {
        return false;
    }
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                let (Some(&h), Some(&l)) = (bytes.get(i + 1), bytes.get(i + 2)) else { return false };
                if h.is_ascii_lowercase() || l.is_ascii_lowercase() {
                    return false;
                }
                let mut escaped = [0u8; 1];
                // One spelling per character: what may stand literally must not be escaped.
                if hex::decode_to_slice([h, l], &mut escaped).is_err() || !escape_ok(escaped[0]) || literal_ok(escaped[0]) {
                    return false;
                }
                i += 3;
            }
            b'/' => {
                if bytes.get(i + 1) == Some(&b'/') {
                    return false;
                }
                i += 1;
            }
            _ if literal_ok(b) => i += 1,
            _ => return false,
        }
    }
    // Segments: after the leading `/`. The root `/` has one empty segment, which is fine.
    path.len() == 1 || path.split('/').skip(1).all(|segment| !segment.ends_with('.'))
}

/// One round of percent-decoding; invalid escapes stay as they are.
fn decode_once(input: &[u8]) -> Vec<u8> {
    percent_encoding::percent_decode(input).collect()
}

/// What a lenient router makes of a (decoded) path: `\` as `/`, cut at `?` or `#`, `;params`
/// dropped from each segment, trailing dots and spaces of a segment dropped, empty and `.`
/// segments removed, `..` resolved, no trailing slash, ASCII lower case.
fn lenient_normalize(input: &[u8]) -> Vec<u8> {
    let replaced: Vec<u8> = input.iter().map(|&b| if b == b'\\' { b'/' } else { b }).collect();
    let end = replaced.iter().position(|&b| b == b'?' || b == b'#').unwrap_or(replaced.len());
    let mut segments: Vec<&[u8]> = Vec::new();
    for segment in replaced.get(..end).unwrap_or_default().split(|&b| b == b'/') {
        let segment = match segment.iter().position(|&b| b == b';') {
            Some(at) => segment.get(..at).unwrap_or_default(),
            None => segment,
        };
        let all_dots = segment.iter().all(|&b| b == b'.');
        let segment = if all_dots {
            segment
        } else {
            let keep = segment.iter().rposition(|&b| b != b'.' && b != b' ' && b != b'\t').map_or(0, |p| p + 1);
            segment.get(..keep).unwrap_or_default()
        };
        match segment {
            b"" | b"." => {}
            b".." => {
                segments.pop();
            }
            other => segments.push(other),
        }
    }
    let mut out = Vec::with_capacity(end + 1);
    for segment in &segments {
        out.push(b'/');
        out.extend_from_slice(segment);
    }
    if out.is_empty() {
        out.push(b'/');
    }
    out.make_ascii_lowercase();
    out
}

/// The readings of a non-canonical path that a lenient upstream could route on, lower-cased:
/// the raw path, each of up to [`MAX_DECODE_ROUNDS`] decodings, each of those normalized, and
/// the same after normalizing first (routers that resolve dot segments before decoding).
/// `true` when the path still holds escapes after the last round (more layers than the bound):
/// then no reading is trusted and every rule for the method counts as matched.
pub fn lenient_forms(path: &str) -> (Vec<Vec<u8>>, bool) {
    let mut raw = path.as_bytes().to_vec();
    // A second reading of a path that does not start with `/`.
    let mut relative = None;
    if raw.first() != Some(&b'/') {
        // `v1/payouts`, or an absolute form `http://host/v1/payouts`: read as a path. Something
        // that looks like an absolute form is read both ways (a router may take `;://admin/x` as
        // the relative path `/;:/admin/x`; found by the `path` fuzz target).
        let after_authority = path
            .find("://")
            .and_then(|at| path.get(at + 3..))
            .map(|rest| rest.find('/').and_then(|slash| rest.get(slash..)).unwrap_or("/"));
        let as_relative = [b"/".as_slice(), path.as_bytes()].concat();
        raw = match after_authority {
            Some(rest) => {
                relative = Some(as_relative);
                rest.as_bytes().to_vec()
            }
            None => as_relative,
        };
    }
    let mut forms: Vec<Vec<u8>> = Vec::new();
    let mut push = |form: Vec<u8>| {
        if !forms.contains(&form) {
            forms.push(form);
        }
    };
    let mut starts = vec![raw.clone(), lenient_normalize(&raw)];
    if let Some(relative) = relative {
        starts.push(lenient_normalize(&relative));
        starts.push(relative);
    }
    // `//host/v1/payouts` (also `/\host/...`): many URL parsers read the first segment as an
    // authority and route on what follows it.
    let slashes = |b: &u8| *b == b'/' || *b == b'\\';
    let leading = raw.iter().take_while(|b| slashes(b)).count();
    if leading >= 2 {
        let after_authority = raw.get(leading..).unwrap_or_default();
        let path_start = after_authority.iter().position(slashes).unwrap_or(after_authority.len());
        let rest = after_authority.get(path_start..).unwrap_or_default();
        let rest = if rest.is_empty() { b"/".to_vec() } else { rest.to_vec() };
        starts.push(lenient_normalize(&rest));
        starts.push(rest);
    }
    let mut exhausted = false;
    for start in starts {
        let mut current = start;
        for round in 0..=MAX_DECODE_ROUNDS {
            push(current.to_ascii_lowercase());
            push(lenient_normalize(&current));
            let next = decode_once(&current);
            if next == current {
                break;
            }
            if round == MAX_DECODE_ROUNDS {
                exhausted = true;
                break;
            }
            current = next;
        }
    }
    // Bytes no ASCII rule can be compared with (a router may fold `ſ` to `s` or decode an
    // overlong `/`), or a `%` that is not an escape (`%u0073`, IIS): no reading is trusted.
    let unreadable = |form: &Vec<u8>| {
        form.iter().enumerate().any(|(i, &b)| {
            !b.is_ascii()
                || (b == b'%'
                    && !(form.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                        && form.get(i + 2).is_some_and(u8::is_ascii_hexdigit)))
        })
    };
    exhausted |= forms.iter().any(unreadable);
    (forms, exhausted)
}

#[cfg(test)]
mod tests;
