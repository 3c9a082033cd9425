//! The env-guard configuration: raw JSON shape, and the validated policy.
//!
//! The configuration never holds a secret: protected credentials are given as the SHA-256 of
//! their exact bytes and their length (`firebreak fingerprint` prints both). The length lets the
//! filter hash only candidates of that length; without it every candidate is hashed.

use std::num::NonZeroUsize;

use serde::Deserialize;

use crate::config::Choice;
use crate::route::{self, parse_routes, RouteConfig, RouteMatch, Scope};
use crate::{ConfigError, Mode};

use super::detect::{Detector, Fingerprint, HostRule, Pattern, PatternMatcher};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// This environment's name, e.g. `uat`. Required.
    environment: Option<String>,
    /// Whether this environment is production. Required: no default, on purpose ("production and
    /// test differed by one parameter").
    production: Option<bool>,
    #[serde(default)]
    protected_credentials: Vec<RawCredential>,
    #[serde(default)]
    patterns: Vec<RawPattern>,
    #[serde(default)]
    production_hosts: Vec<String>,
    /// Requests the guard inspects; absent means every request.
    #[serde(default)]
    routes: Option<Vec<RouteConfig>>,
    #[serde(default = "default_max_body")]
    max_body_bytes: u64,
    #[serde(default = "default_max_decoded")]
    max_decoded_bytes: u64,
    #[serde(default)]
    over_limit: Choice<OverLimit>,
    /// `enforce` (default) or `report_only` ([`crate::Mode`]).
    #[serde(default)]
    mode: Choice<Mode>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredential {
    label: String,
    sha256: String,
    /// Byte length of the secret. Optional for backward compatibility (absent: every candidate
    /// is hashed, whatever its length).
    #[serde(default)]
    length: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPattern {
    label: String,
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    regex: Option<String>,
}

fn default_max_body() -> u64 {
    1024 * 1024
}
fn default_max_decoded() -> u64 {
    4 * 1024 * 1024
}

/// Upper bound of `max_body_bytes` and `max_decoded_bytes`.
pub const MAX_LIMIT_BYTES: u64 = 64 * 1024 * 1024;
/// Shortest accepted `prefix` pattern: a shorter one would match ordinary words.
pub const MIN_PREFIX_LEN: usize = 4;
/// Longest accepted label.
pub const MAX_LABEL_LEN: usize = 64;
/// Longest accepted `protected_credentials[].length` (a PEM private key is a few KiB).
pub const MAX_CREDENTIAL_LEN: u64 = 65536;

/// What to do with a body larger than the inspection limits (`over_limit`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OverLimit {
    /// Refuse it (413 `body_too_large_to_inspect`). The default.
    #[default]
    Block,
    /// Forward it uninspected (headers, query and host are still checked) and count it.
    Pass,
}

/// The validated env-guard policy.
#[derive(Debug, Clone)]
pub struct GuardPolicy {
    pub environment: String,
    pub production: bool,
    /// `None`: every request is guarded.
    pub routes: Option<Vec<RouteMatch>>,
    pub max_body_bytes: NonZeroUsize,
    pub max_decoded_bytes: NonZeroUsize,
    pub over_limit: OverLimit,
    pub detector: Detector,
    /// Enforce: a finding is refused. Report-only: it is counted (`would_reject.<code>`, and
    /// `detected.<label>.<place>` as always) and logged, and the request goes on unmodified.
    pub mode: Mode,
}

/// Labels become part of stats names (`detected.<label>.<where>`): keep them tame.
pub fn valid_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= MAX_LABEL_LEN
        && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Parses `<64 hex>` into the 32 bytes of a SHA-256.
pub fn parse_fingerprint(hex: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex.trim(), &mut out).ok()?;
    Some(out)
}

impl GuardPolicy {
    /// Parses and validates the plugin configuration (JSON).
    pub fn from_json(json: &[u8]) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_json::from_slice(json).map_err(ConfigError::from_json)?;
        Self::from_raw(raw)
    }

    /// Parses a configuration already read into a JSON value (the CLI reads YAML too).
    pub fn from_value(value: serde_json::Value) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_json::from_value(value).map_err(ConfigError::from_json)?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: RawConfig) -> Result<Self, ConfigError> {
        let environment = raw.environment.ok_or_else(|| ConfigError::new("environment", "required"))?;
        if environment.is_empty()
            || environment.len() > MAX_LABEL_LEN
            || !environment.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(ConfigError::new("environment", "1 to 64 characters of A-Z a-z 0-9 - _ ."));
        }
        let production = raw.production.ok_or_else(|| {
            ConfigError::new("production", "required (true or false): say explicitly whether this environment is production")
        })?;

        let mut labels: Vec<String> = Vec::new();
        let mut fingerprints: Vec<Fingerprint> = Vec::new();
        for (i, cred) in raw.protected_credentials.iter().enumerate() {
            let field = format!("protected_credentials[{i}]");
            if !valid_label(&cred.label) {
                return Err(ConfigError::new(format!("{field}.label"), "1 to 64 characters of A-Z a-z 0-9 - _"));
            }
            let fp = parse_fingerprint(&cred.sha256).ok_or_else(|| {
                ConfigError::new(
                    format!("{field}.sha256"),
                    "must be 64 hex characters: the SHA-256 of the secret (`firebreak fingerprint`), never the secret",
                )
            })?;
            if fingerprints.iter().any(|f| f.sha256 == fp) {
                return Err(ConfigError::new(format!("{field}.sha256"), "duplicate fingerprint"));
            }
            let length = match cred.length {
                None => None,
                Some(n) if (1..=MAX_CREDENTIAL_LEN).contains(&n) => usize::try_from(n).ok(),
                Some(_) => {
                    return Err(ConfigError::new(
                        format!("{field}.length"),
                        format!("the secret's length in bytes, 1 to {MAX_CREDENTIAL_LEN} (`firebreak fingerprint` prints it)"),
                    ))
                }
            };
            let label = label_index(&mut labels, &cred.label);
            fingerprints.push(Fingerprint { sha256: fp, length, label });
        }

        let mut patterns = Vec::new();
        for (i, pat) in raw.patterns.iter().enumerate() {
            let field = format!("patterns[{i}]");
            if !valid_label(&pat.label) {
                return Err(ConfigError::new(format!("{field}.label"), "1 to 64 characters of A-Z a-z 0-9 - _"));
            }
            let matcher = match (&pat.prefix, &pat.regex) {
                (Some(prefix), None) => {
                    if prefix.len() < MIN_PREFIX_LEN || prefix.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
                        return Err(ConfigError::new(
                            format!("{field}.prefix"),
                            format!("at least {MIN_PREFIX_LEN} characters, no whitespace"),
                        ));
                    }
                    PatternMatcher::Prefix(prefix.as_bytes().to_vec())
                }
                (None, Some(source)) => {
                    // ASCII only: the regex engine is built without Unicode tables (module size),
                    // and credentials are ASCII; `\d`, `\w`, `\s`, `(?i)` are the ASCII classes.
                    if !source.is_ascii() {
                        return Err(ConfigError::new(
                            format!("{field}.regex"),
                            "must be ASCII (escape other bytes as \\xNN); classes like \\d \\w \\s are ASCII-only",
                        ));
                    }
                    let regex = regex::bytes::RegexBuilder::new(source)
                        .unicode(false)
                        .size_limit(1 << 20)
                        .dfa_size_limit(1 << 20)
                        .build()
                        .map_err(|e| ConfigError::new(format!("{field}.regex"), format!("invalid regex: {e}")))?;
                    if regex.is_match(b"") {
                        return Err(ConfigError::new(
                            format!("{field}.regex"),
                            "matches the empty string (would match everything)",
                        ));
                    }
                    PatternMatcher::Regex(regex)
                }
                _ => return Err(ConfigError::new(field, "exactly one of `prefix` and `regex` is required")),
            };
            patterns.push(Pattern { label: label_index(&mut labels, &pat.label), matcher });
        }

        let mut hosts = Vec::new();
        for (i, host) in raw.production_hosts.iter().enumerate() {
            let field = format!("production_hosts[{i}]");
            let rule = HostRule::parse(host).ok_or_else(|| {
                ConfigError::new(
                    field,
                    "a host name (lower-case letters, digits, `-`, `.`), optionally `*.` + a suffix; no port, no scheme",
                )
            })?;
            hosts.push(rule);
        }

        if !production && fingerprints.is_empty() && patterns.is_empty() && hosts.is_empty() {
            return Err(ConfigError::new(
                "protected_credentials",
                "nothing to guard: give at least one of protected_credentials, patterns, production_hosts",
            ));
        }

        let routes = match &raw.routes {
            None => None,
            Some(list) if list.is_empty() => {
                return Err(ConfigError::new("routes", "empty: omit `routes` to guard every request"))
            }
            Some(list) => Some(parse_routes(list, "routes")?),
        };
        let max_body_bytes = limit(raw.max_body_bytes, "max_body_bytes")?;
        let max_decoded_bytes = limit(raw.max_decoded_bytes, "max_decoded_bytes")?;
        let over_limit = raw.over_limit.get("over_limit")?;
        let mode = raw.mode.get("mode")?;
        Ok(GuardPolicy {
            mode,
            environment,
            production,
            routes,
            max_body_bytes,
            max_decoded_bytes,
            over_limit,
            detector: Detector::new(labels, fingerprints, patterns, hosts),
        })
    }

    /// Whether this request is inspected (production environments inspect nothing), on the
    /// canonical scope (crate::route; `path` is the raw `:path`). Without `routes` every request
    /// is inspected, whatever its spelling (`In(0)`); `NotCanonical` is refused with
    /// `400 path_not_canonical`.
    pub fn guards(&self, method: &str, path: &str) -> Scope {
        match &self.routes {
            None => Scope::In(0),
            Some(routes) => route::scope(routes, method, path),
        }
    }
}

fn label_index(labels: &mut Vec<String>, label: &str) -> usize {
    match labels.iter().position(|l| l == label) {
        Some(i) => i,
        None => {
            labels.push(label.to_string());
            labels.len() - 1
        }
    }
}

fn limit(value: u64, field: &str) -> Result<NonZeroUsize, ConfigError> {
    if value == 0 || value > MAX_LIMIT_BYTES {
        return Err(ConfigError::new(field, format!("must be between 1 and {MAX_LIMIT_BYTES}")));
    }
    usize::try_from(value)
        .ok()
        .and_then(NonZeroUsize::new)
        .ok_or_else(|| ConfigError::new(field, "too large for this platform"))
}
