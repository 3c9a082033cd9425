//! The request-level decisions: where in a request to look, and the rejection for each finding.

use crate::route::split_path;
use crate::Rejection;

use super::body::{decode, parse_codings, Coding, DecodeError};
use super::config::{GuardPolicy, OverLimit};
use super::detect::{base64_decoded_max, Detector, Hit};

/// Stable error codes.
pub const CODE_CREDENTIAL: &str = "production_credential_in_non_production";
pub const CODE_HOST: &str = "production_host_in_non_production";
pub const CODE_ENCODING: &str = "content_encoding_not_inspectable";
pub const CODE_UNDECODABLE: &str = "body_not_decodable";
pub const CODE_TOO_LARGE: &str = "body_too_large_to_inspect";
pub const CODE_UNREADABLE: &str = "request_not_inspectable";

/// Headers whose values are never inspected for credentials (names lower-case, as Envoy and the
/// test host give them). Each either cannot carry a credential or is a structure whose bytes are
/// not chosen by whoever configures a client:
/// - `:method`, `:scheme`: a token from a short fixed set;
/// - `signature`, `signature-input` (RFC 9421): a MAC over the request (derived from a key, never
///   the key) and its parameters; when request-signature runs first they are already verified;
/// - `content-digest` (RFC 9530): a hash of the body, which is inspected itself;
/// - `idempotency-key`: a per-request unique value the client generates.
///
/// `:path` (its query string) is inspected; `:authority` and `host` are checked against the
/// production-only hosts (not as credential candidates).
pub const UNINSPECTED_HEADERS: &[&str] = &[":method", ":scheme", "signature", "signature-input", "content-digest", "idempotency-key"];

/// Where in a request a finding was made (the `<where>` of the `detected.<label>.<where>` counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    Header,
    Path,
    Query,
    Body,
    Host,
}

impl Place {
    pub fn name(self) -> &'static str {
        match self {
            Place::Header => "header",
            Place::Path => "path",
            Place::Query => "query",
            Place::Body => "body",
            Place::Host => "host",
        }
    }
}

/// Why env-guard refuses a request. Mapped to a [`Rejection`] in one place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuardError {
    /// A protected credential: its label and where it was found (never the value).
    Credential { label: String, place: Place, location: String },
    /// A production-only destination.
    ProductionHost { rule: String },
    /// A Content-Encoding the guard cannot look through.
    UnsupportedEncoding { coding: String },
    /// The body does not decode as its Content-Encoding says.
    Undecodable { coding: &'static str },
    /// Larger than `max_body_bytes` / `max_decoded_bytes` with `over_limit: block`.
    TooLarge { decoded: bool },
    /// Request headers or body could not be read (e.g. a header value that is not UTF-8).
    Unreadable(&'static str),
}

impl GuardError {
    pub fn code(&self) -> &'static str {
        match self {
            GuardError::Credential { .. } => CODE_CREDENTIAL,
            GuardError::ProductionHost { .. } => CODE_HOST,
            GuardError::UnsupportedEncoding { .. } => CODE_ENCODING,
            GuardError::Undecodable { .. } => CODE_UNDECODABLE,
            GuardError::TooLarge { .. } => CODE_TOO_LARGE,
            GuardError::Unreadable(_) => CODE_UNREADABLE,
        }
    }

    pub fn rejection(&self, environment: &str) -> Rejection {
        match self {
            GuardError::Credential { label, location, .. } => Rejection::new(
                403,
                CODE_CREDENTIAL,
                format!("production credential `{label}` found in {location}; environment `{environment}` is not production"),
            ),
            GuardError::ProductionHost { rule } => Rejection::new(
                403,
                CODE_HOST,
                format!("destination matches production-only host `{rule}`; environment `{environment}` is not production"),
            ),
            GuardError::UnsupportedEncoding { coding } => Rejection::new(
                415,
                CODE_ENCODING,
                format!("content-encoding `{coding}` cannot be inspected; send identity, gzip or deflate"),
            ),
            GuardError::Undecodable { coding } => {
                Rejection::new(400, CODE_UNDECODABLE, format!("body is not valid {coding} data"))
            }
            GuardError::TooLarge { decoded } => Rejection::new(
                413,
                CODE_TOO_LARGE,
                if *decoded {
                    "decoded body exceeds max_decoded_bytes; it cannot be inspected".to_string()
                } else {
                    "body exceeds max_body_bytes; it cannot be inspected".to_string()
                },
            ),
            GuardError::Unreadable(what) => Rejection::new(400, CODE_UNREADABLE, format!("{what} cannot be inspected")),
        }
    }

    /// `label=.. where=..` for the log line (never a value).
    pub fn log_context(&self) -> String {
        match self {
            GuardError::Credential { label, place, location } => {
                format!("label={label} where={} location={location:?}", place.name())
            }
            GuardError::ProductionHost { rule } => format!("label=production_host where=host host={rule:?}"),
            _ => String::new(),
        }
    }

    /// The `detected.<label>.<where>` counter for a finding.
    pub fn detection_counter(&self) -> Option<String> {
        match self {
            GuardError::Credential { label, place, .. } => Some(format!("detected.{label}.{}", place.name())),
            GuardError::ProductionHost { .. } => Some("detected.production_host.host".to_string()),
            _ => None,
        }
    }
}

/// What the body needs, decided from the headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyPlan {
    pub codings: Vec<Coding>,
    pub kind: BodyKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Json,
    Form,
    Text,
}

/// A body that was inspected, or let through uninspected because of `over_limit: pass`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyOutcome {
    Clean,
    Uninspected,
}

/// A name (header, parameter, JSON key) printed in a message only when it is short, tame, and
/// not itself a credential.
fn safe_name(detector: &Detector, name: &str) -> String {
    let tame = !name.is_empty()
        && name.len() <= 48
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    if tame && detector.scan(name.as_bytes(), &[]).is_none() {
        name.to_string()
    } else {
        "?".to_string()
    }
}

fn found(hit: Hit, place: Place, location: String) -> GuardError {
    let location = format!("{location}{}", hit.how_suffix());
    GuardError::Credential { label: hit.label, place, location }
}

/// Checks everything known at header time: destination host, every header (Authorization
/// schemes decoded), path, query parameters, Content-Encoding. `headers` includes pseudo-headers.
/// Returns how to treat the body.
pub fn check_headers(policy: &GuardPolicy, headers: &[(String, String)]) -> Result<BodyPlan, GuardError> {
    let detector = &policy.detector;
    let value = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
    let authority = value(":authority").or_else(|| value("host")).unwrap_or("");
    if let Some(rule) = detector.production_host(authority) {
        return Err(GuardError::ProductionHost { rule: rule.text() });
    }
    for (name, value) in headers {
        match name.as_str() {
            ":path" => check_path(detector, value)?,
            ":authority" | "host" => {}
            skipped if UNINSPECTED_HEADERS.contains(&skipped) => {}
            "authorization" | "proxy-authorization" => {
                if let Some(hit) = authorization(detector, value) {
                    return Err(found(hit, Place::Header, format!("header {name}")));
                }
            }
            _ => {
                if let Some(hit) = detector.scan(value.as_bytes(), &[]) {
                    return Err(found(hit, Place::Header, format!("header {}", safe_name(detector, name))));
                }
            }
        }
    }
    let codings = parse_codings(headers.iter().filter(|(n, _)| n == "content-encoding").map(|(_, v)| v.as_str()))
        .map_err(|coding| GuardError::UnsupportedEncoding { coding })?;
    let content_type = value("content-type").unwrap_or("").to_ascii_lowercase();
    let media = content_type.split(';').next().unwrap_or("").trim();
    let kind = if media == "application/json" || media.ends_with("+json") {
        BodyKind::Json
    } else if media == "application/x-www-form-urlencoded" {
        BodyKind::Form
    } else {
        BodyKind::Text
    };
    Ok(BodyPlan { codings, kind })
}

/// `Authorization: Bearer <token>` / `Basic <base64(user:pass)>` decoded, then the whole value.
fn authorization(detector: &Detector, value: &str) -> Option<Hit> {
    let trimmed = value.trim();
    let (scheme, rest) = trimmed.split_once(' ').unwrap_or((trimmed, ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        if let Some(hit) = detector.scan(rest.as_bytes(), &["bearer"]) {
            return Some(hit);
        }
    } else if scheme.eq_ignore_ascii_case("basic") && base64_decoded_max(rest.len()) >= detector.shortest_match() {
        use base64::Engine as _;
        if let Ok(pair) = base64::engine::general_purpose::STANDARD.decode(rest) {
            if let Some(hit) = detector.exact(&pair, &["basic"]) {
                return Some(hit);
            }
            if let Some(at) = pair.iter().position(|b| *b == b':') {
                let user = pair.get(..at).unwrap_or_default();
                let password = pair.get(at + 1..).unwrap_or_default();
                if let Some(hit) = detector.scan(password, &["basic password"]) {
                    return Some(hit);
                }
                if let Some(hit) = detector.exact(user, &["basic user"]) {
                    return Some(hit);
                }
            }
            if let Some(hit) = detector.scan(&pair, &["basic"]) {
                return Some(hit);
            }
        }
    }
    detector.scan(value.as_bytes(), &[])
}

fn check_path(detector: &Detector, path_and_query: &str) -> Result<(), GuardError> {
    let (path, query) = split_path(path_and_query);
    if let Some(query) = query {
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            if let Some(hit) = detector.scan(value.as_bytes(), &[]) {
                return Err(found(hit, Place::Query, format!("query param {}", safe_name(detector, &name))));
            }
            if let Some(hit) = detector.exact(name.as_bytes(), &[]) {
                return Err(found(hit, Place::Query, "query param name".to_string()));
            }
        }
        if let Some(hit) = detector.scan(query.as_bytes(), &[]) {
            return Err(found(hit, Place::Query, "query string".to_string()));
        }
    }
    if let Some(hit) = detector.scan(path.as_bytes(), &[]) {
        return Err(found(hit, Place::Path, "path".to_string()));
    }
    Ok(())
}

/// Request trailers (HTTP/2, chunked HTTP/1.1): every value as a candidate, except the
/// [`UNINSPECTED_HEADERS`] (a `signature` or `content-digest` may come as a trailer).
pub fn check_trailers(policy: &GuardPolicy, trailers: &[(String, String)]) -> Result<(), GuardError> {
    let detector = &policy.detector;
    for (name, value) in trailers {
        if UNINSPECTED_HEADERS.contains(&name.as_str()) {
            continue;
        }
        if let Some(hit) = detector.scan(value.as_bytes(), &[]) {
            return Err(found(hit, Place::Header, format!("trailer {}", safe_name(detector, name))));
        }
    }
    Ok(())
}

/// What to do when the body is (or will be) larger than `max_body_bytes`.
pub fn over_limit(policy: &GuardPolicy) -> Result<BodyOutcome, GuardError> {
    match policy.over_limit {
        OverLimit::Block => Err(GuardError::TooLarge { decoded: false }),
        OverLimit::Pass => Ok(BodyOutcome::Uninspected),
    }
}

/// Inspects the complete body: decodes its Content-Encoding (bounded), then looks at JSON string
/// values at any depth, form fields, or raw text.
pub fn check_body(policy: &GuardPolicy, plan: &BodyPlan, body: &[u8]) -> Result<BodyOutcome, GuardError> {
    if body.is_empty() {
        return Ok(BodyOutcome::Clean);
    }
    if body.len() > policy.max_body_bytes.get() {
        return over_limit(policy);
    }
    let decoded;
    let data = if plan.codings.is_empty() {
        body
    } else {
        match decode(body, &plan.codings, policy.max_decoded_bytes.get()) {
            Ok(d) => {
                decoded = d;
                decoded.as_slice()
            }
            Err(DecodeError::TooLarge) => {
                return match policy.over_limit {
                    OverLimit::Block => Err(GuardError::TooLarge { decoded: true }),
                    OverLimit::Pass => Ok(BodyOutcome::Uninspected),
                }
            }
            Err(DecodeError::Invalid(coding)) => return Err(GuardError::Undecodable { coding: coding.name() }),
        }
    };
    let how: Vec<&'static str> = plan.codings.iter().rev().map(|c| c.name()).collect();
    let detector = &policy.detector;
    match plan.kind {
        BodyKind::Json => {
            if let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) {
                return match json_walk(detector, &value, &how) {
                    Some((hit, steps)) => {
                        let at = json_location(detector, &steps);
                        Err(found(hit, Place::Body, format!("body json {at}")))
                    }
                    None => Ok(BodyOutcome::Clean),
                };
            }
        }
        BodyKind::Form => {
            for (name, value) in form_urlencoded::parse(data) {
                if let Some(hit) = detector.scan(value.as_bytes(), &how) {
                    return Err(found(hit, Place::Body, format!("body form field {}", safe_name(detector, &name))));
                }
            }
        }
        BodyKind::Text => {}
    }
    // Text, and the fall-back for JSON that does not parse and for form bodies.
    match detector.scan(data, &how) {
        Some(hit) => Err(found(hit, Place::Body, "body text".to_string())),
        None => Ok(BodyOutcome::Clean),
    }
}

/// One step from a JSON document's root to a finding.
enum JsonStep<'a> {
    Index(usize),
    Key(&'a str),
    /// The finding is the key itself (the last step).
    TheKey,
}

/// Every string (and key) of a JSON document; returns the hit and the steps to it, innermost
/// first (built only for a finding: a clean document costs no location strings).
fn json_walk<'a>(detector: &Detector, value: &'a serde_json::Value, how: &[&'static str]) -> Option<(Hit, Vec<JsonStep<'a>>)> {
    match value {
        serde_json::Value::String(s) => detector.scan(s.as_bytes(), how).map(|hit| (hit, Vec::new())),
        serde_json::Value::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
            json_walk(detector, item, how).map(|(hit, mut steps)| {
                steps.push(JsonStep::Index(i));
                (hit, steps)
            })
        }),
        serde_json::Value::Object(map) => map.iter().find_map(|(key, item)| {
            if let Some(hit) = detector.exact(key.as_bytes(), how) {
                return Some((hit, vec![JsonStep::TheKey]));
            }
            json_walk(detector, item, how).map(|(hit, mut steps)| {
                steps.push(JsonStep::Key(key));
                (hit, steps)
            })
        }),
        _ => None,
    }
}

/// `$.push.targets[0].key`, from [`json_walk`]'s steps (innermost first); a key that is not a
/// tame name is printed as `["?"]`.
fn json_location(detector: &Detector, steps: &[JsonStep]) -> String {
    let mut at = String::from("$");
    for step in steps.iter().rev() {
        match step {
            JsonStep::Index(i) => at.push_str(&format!("[{i}]")),
            JsonStep::Key(key) => {
                let name = safe_name(detector, key);
                if name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                    at.push('.');
                    at.push_str(&name);
                } else {
                    at.push_str(&format!("[{name:?}]"));
                }
            }
            JsonStep::TheKey => at.push_str(" (a key)"),
        }
    }
    at
}
