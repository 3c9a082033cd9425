//! The request-signature plugin's configuration: raw JSON shape, and the validated policy.

use std::num::{NonZeroU16, NonZeroU32, NonZeroU64};

use base64::Engine;
use serde::Deserialize;

use crate::config::Choice;
use crate::quota::{self, TenantQuota};
use crate::route::{self, parse_routes, RouteConfig, RouteMatch, Scope};
use crate::store::{BucketTable, SharedStore};
use crate::{ConfigError, Mode};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// Requests that must be signed; others pass through untouched.
    #[serde(default)]
    routes: Vec<RouteConfig>,
    /// Protected by default: every request with an unsafe method (anything but GET, HEAD,
    /// OPTIONS, TRACE) on every path must be signed, except `exemptions`.
    #[serde(default)]
    unsafe_methods_require_signature: bool,
    /// Routes exempt from `unsafe_methods_require_signature` (never from `routes`).
    #[serde(default)]
    exemptions: Vec<RouteConfig>,
    keys: Vec<RawKey>,
    /// Oldest acceptable `created`, in seconds before now. Required, non-zero.
    max_age_seconds: Option<u64>,
    #[serde(default = "default_future_skew")]
    future_skew_seconds: u64,
    /// Redis only: the largest clock difference between gateway replicas sharing the nonces.
    #[serde(default = "default_replica_skew")]
    max_replica_clock_skew_seconds: u64,
    #[serde(default = "default_max_body")]
    max_body_bytes: u64,
    #[serde(default = "default_principal_header")]
    principal_header: String,
    /// Use this `Signature-Input` label; by default exactly one signature must be present.
    #[serde(default)]
    label: Option<String>,
    /// Headers that must be covered whenever the request carries them (e.g. `idempotency-key`).
    #[serde(default)]
    covered_headers_when_present: Vec<String>,
    #[serde(default)]
    nonce_store: RawNonceStore,
    /// Where nonces live: `{"backend": "local"}` (default) or `{"backend": "redis", ...}`.
    #[serde(default)]
    state: Option<serde_json::Value>,
    /// `enforce` (default) or `report_only` ([`crate::Mode`]).
    #[serde(default)]
    mode: Choice<Mode>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    id: String,
    #[serde(default)]
    secret_base64: Option<String>,
    /// Name of an environment variable (passed to the VM) holding the base64 secret.
    #[serde(default)]
    secret_env: Option<String>,
    #[serde(default = "default_algorithm")]
    algorithm: String,
    /// Unix seconds before which the key is not accepted.
    #[serde(default)]
    not_before: Option<u64>,
    /// Unix seconds after which the key is not accepted.
    #[serde(default)]
    not_after: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNonceStore {
    #[serde(default = "default_buckets")]
    buckets: u32,
    #[serde(default = "default_slots")]
    slots_per_bucket: u16,
    /// Nonces one key id may record per window (see [`crate::quota`]); default capacity / 8.
    #[serde(default)]
    quota_per_key_id: Option<u64>,
    /// Units of a key id's quota one worker takes at once (see [`crate::quota`]); default
    /// `quota_per_key_id / 256`, between 1 and 16.
    #[serde(default)]
    quota_lease: Option<u64>,
}

impl Default for RawNonceStore {
    fn default() -> Self {
        RawNonceStore { buckets: default_buckets(), slots_per_bucket: default_slots(), quota_per_key_id: None, quota_lease: None }
    }
}

fn default_future_skew() -> u64 {
    5
}
fn default_replica_skew() -> u64 {
    30
}
fn default_max_body() -> u64 {
    1024 * 1024
}
fn default_principal_header() -> String {
    "x-firebreak-principal".to_string()
}
fn default_algorithm() -> String {
    "hmac-sha256".to_string()
}
fn default_buckets() -> u32 {
    8192
}
fn default_slots() -> u16 {
    16
}

/// Shared-data prefix of the nonce table (its quota table is `<prefix>.quota`).
pub const NONCE_TABLE_PREFIX: &str = "firebreak.sig.nonce";

/// Longest key id accepted, in config and on the wire.
pub const MAX_KEY_ID_LEN: usize = 64;

pub fn valid_key_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_KEY_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// Algorithms a key can be pinned to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    HmacSha256,
}

impl Algorithm {
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::HmacSha256 => "hmac-sha256",
        }
    }

    /// The algorithm an `alg` parameter (or a key's `algorithm`) names, if it is supported.
    pub fn from_name(name: &str) -> Option<Algorithm> {
        match name {
            "hmac-sha256" => Some(Algorithm::HmacSha256),
            _ => None,
        }
    }
}

/// Largest accepted `max_replica_clock_skew_seconds`.
pub const MAX_REPLICA_CLOCK_SKEW_SECONDS: u64 = 300;

/// A verification key. The secret is only ever used to build MACs; it is never printed.
#[derive(Clone)]
pub struct Key {
    pub id: String,
    pub algorithm: Algorithm,
    pub not_before: Option<u64>,
    pub not_after: Option<u64>,
    pub(crate) mac: hmac::Hmac<sha2::Sha256>,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("id", &self.id)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

/// The validated policy of the request-signature plugin.
#[derive(Debug, Clone)]
pub struct SignaturePolicy {
    pub routes: Vec<RouteMatch>,
    /// Every unsafe method on every path needs a signature, except `exemptions`.
    pub unsafe_methods_require_signature: bool,
    pub exemptions: Vec<RouteMatch>,
    pub keys: Vec<Key>,
    pub max_age_seconds: NonZeroU64,
    pub future_skew_seconds: u64,
    /// With Redis: how far apart the clocks of the replicas sharing the nonces may be. The
    /// lifetime of a nonce on Redis covers it (see [`crate::signature::nonce_ttl_ms`]).
    pub max_replica_clock_skew_seconds: u64,
    pub max_body_bytes: u64,
    pub principal_header: String,
    pub label: Option<String>,
    pub covered_headers_when_present: Vec<String>,
    /// Require `nonce` (and record it). Always true from configuration; RFC vector tests turn it off.
    pub require_nonce: bool,
    /// Require the default coverage (@method, @authority, @path, @query, content-digest).
    pub require_default_coverage: bool,
    pub nonce_table: BucketTable,
    /// Nonces per key id per window (`max_age_seconds + future_skew_seconds + 1`, a nonce's
    /// longest life): a key id holds at most twice this many nonces.
    pub nonce_quota: TenantQuota,
    pub state: crate::remote::Backend,
    /// The key a MAC is computed with when the key id is unknown, so that an unknown key id costs
    /// the same work as a wrong MAC (never accepted: the request is refused either way).
    pub(crate) decoy_key: Key,
    /// Enforce: a failure is refused. Report-only: it is counted (`would_reject.<code>`) and
    /// logged, and the request goes on without a principal.
    pub mode: Mode,
}

impl SignaturePolicy {
    /// Parses and validates the plugin configuration. `env` reads the VM's environment variables.
    pub fn from_json(json: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_json::from_slice(json).map_err(ConfigError::from_json)?;
        let routes = parse_routes(&raw.routes, "routes")?;
        let exemptions = parse_routes(&raw.exemptions, "exemptions")?;
        if routes.is_empty() && !raw.unsafe_methods_require_signature {
            return Err(ConfigError::new(
                "routes",
                "at least one route is required (or `unsafe_methods_require_signature: true`)",
            ));
        }
        if !exemptions.is_empty() && !raw.unsafe_methods_require_signature {
            return Err(ConfigError::new(
                "exemptions",
                "only meaningful with `unsafe_methods_require_signature: true` (list the protected `routes` instead)",
            ));
        }
        let max_age_seconds = raw
            .max_age_seconds
            .and_then(NonZeroU64::new)
            .ok_or_else(|| ConfigError::new("max_age_seconds", "required and must be greater than 0"))?;
        if raw.future_skew_seconds > 300 {
            return Err(ConfigError::new("future_skew_seconds", "must be at most 300"));
        }
        if raw.max_replica_clock_skew_seconds > MAX_REPLICA_CLOCK_SKEW_SECONDS {
            return Err(ConfigError::new(
                "max_replica_clock_skew_seconds",
                format!("must be at most {MAX_REPLICA_CLOCK_SKEW_SECONDS}"),
            ));
        }
        if raw.max_body_bytes == 0 || raw.max_body_bytes > 64 * 1024 * 1024 {
            return Err(ConfigError::new("max_body_bytes", "must be between 1 and 67108864"));
        }
        let principal_header = raw.principal_header.to_ascii_lowercase();
        if !crate::headers::valid_identity_header_name(&principal_header) {
            return Err(ConfigError::new(
                "principal_header",
                "not a valid header name: letters, digits and `-` (many upstreams read `_` as `-`)",
            ));
        }
        if let Some(label) = &raw.label {
            if sfv::KeyRef::from_str(label).is_err() {
                return Err(ConfigError::new("label", "not a valid structured-field key"));
            }
        }
        let mut covered = Vec::new();
        for (i, name) in raw.covered_headers_when_present.iter().enumerate() {
            let lower = name.to_ascii_lowercase();
            if !crate::headers::valid_header_name(&lower) {
                return Err(ConfigError::new(format!("covered_headers_when_present[{i}]"), "not a valid header name"));
            }
            covered.push(lower);
        }
        if raw.keys.is_empty() {
            return Err(ConfigError::new("keys", "at least one key is required"));
        }
        let mut keys: Vec<Key> = Vec::new();
        for (i, raw_key) in raw.keys.iter().enumerate() {
            let key = parse_key(raw_key, &format!("keys[{i}]"), env)?;
            if keys.iter().any(|k| k.id == key.id) {
                return Err(ConfigError::new(format!("keys[{i}].id"), format!("duplicate key id `{}`", key.id)));
            }
            keys.push(key);
        }
        let buckets = NonZeroU32::new(raw.nonce_store.buckets)
            .filter(|b| b.get() <= 1 << 20)
            .ok_or_else(|| ConfigError::new("nonce_store.buckets", "must be between 1 and 1048576"))?;
        let slots = NonZeroU16::new(raw.nonce_store.slots_per_bucket)
            .filter(|s| s.get() <= 256)
            .ok_or_else(|| ConfigError::new("nonce_store.slots_per_bucket", "must be between 1 and 256"))?;
        let state = crate::remote::Backend::from_value(raw.state.as_ref(), "state")?;
        if let crate::remote::Backend::Redis(redis) = &state {
            // A nonce that could not be recorded is a replay that cannot be refused: there is no
            // safe "open" for it (replay-guard refuses it for the same reason).
            if redis.failure_mode == crate::remote::FailureMode::Open {
                return Err(ConfigError::new(
                    "state.failure_mode",
                    "request-signature always fails closed: forwarding a request whose nonce could not be recorded lets a captured signature be replayed",
                ));
            }
        }
        let decoy_key = parse_key(
            &RawKey {
                id: "decoy".into(),
                secret_base64: Some(base64::engine::general_purpose::STANDARD.encode([0x5a_u8; 32])),
                secret_env: None,
                algorithm: default_algorithm(),
                not_before: None,
                not_after: None,
            },
            "decoy",
            env,
        )?;
        let nonce_table = BucketTable::new(NONCE_TABLE_PREFIX, buckets, slots, 0);
        let quota_limit = quota::validate_limit(
            raw.nonce_store
                .quota_per_key_id
                .unwrap_or_else(|| u64::from(quota::default_limit(nonce_table.capacity()))),
            nonce_table.capacity(),
            "nonce_store.quota_per_key_id",
        )?;
        let window_ms =
            NonZeroU64::new(max_age_seconds.get().saturating_add(raw.future_skew_seconds).saturating_add(1).saturating_mul(1000))
                .unwrap_or(NonZeroU64::MIN);
        let lease = quota::lease(raw.nonce_store.quota_lease, quota_limit, "nonce_store.quota_lease")?;
        let nonce_quota = TenantQuota::for_table(&nonce_table, quota_limit, window_ms).with_lease(lease);
        let mode = raw.mode.get("mode")?;
        Ok(SignaturePolicy {
            mode,
            routes,
            unsafe_methods_require_signature: raw.unsafe_methods_require_signature,
            exemptions,
            keys,
            max_age_seconds,
            future_skew_seconds: raw.future_skew_seconds,
            max_replica_clock_skew_seconds: raw.max_replica_clock_skew_seconds,
            max_body_bytes: raw.max_body_bytes,
            principal_header,
            label: raw.label,
            covered_headers_when_present: covered,
            require_nonce: true,
            require_default_coverage: true,
            nonce_table,
            nonce_quota,
            state,
            decoy_key,
        })
    }

    /// The hasher of this filter's record keys (nonces, key ids' quotas): keyed, from the nonce
    /// table's secret, for the local tables; SHA-256 for Redis key names (the same on every
    /// replica). See [`crate::store::KeyHasher`].
    pub fn key_hasher(&self) -> crate::store::KeyHasher {
        match &self.state {
            crate::remote::Backend::Local => self.nonce_table.key_hasher(),
            crate::remote::Backend::Redis(_) => crate::store::KeyHasher::Sha256,
        }
    }

    /// Binds the local nonce tables to this Envoy's shared data (configure time; see
    /// [`BucketTable::bind`]): secret placement, and a refusal if their geometry changed. A
    /// Redis backend has no local tables.
    pub fn bind_tables(&mut self, store: &dyn SharedStore, entropy: [u8; 32]) -> Result<(), ConfigError> {
        if self.state != crate::remote::Backend::Local {
            return Ok(());
        }
        self.nonce_table.bind(store, entropy).map_err(|e| e.config_error("nonce_store"))?;
        self.nonce_quota.bind(store, entropy).map_err(|e| e.config_error("nonce_store"))
    }

    /// Whether this request must be signed (`path` is the raw `:path`), on the canonical scope
    /// (crate::route). A listed route always applies; with `unsafe_methods_require_signature`
    /// every unsafe method applies unless a canonical path matches an exemption (the catch-all
    /// matches every spelling, so a non-canonical path with an unsafe method is `NotCanonical`).
    pub fn scope(&self, method: &str, path: &str) -> Scope {
        match route::scope(&self.routes, method, path) {
            Scope::Out => {}
            decided => return decided,
        }
        if !self.unsafe_methods_require_signature || is_safe_method(method) {
            return Scope::Out;
        }
        match route::scope(&self.exemptions, method, path) {
            Scope::In(_) => Scope::Out,
            _ if route::is_canonical(route::split_path(path).0) => Scope::In(self.routes.len()),
            _ => Scope::NotCanonical,
        }
    }

    pub fn key(&self, id: &str) -> Option<&Key> {
        self.keys.iter().find(|k| k.id == id)
    }
}

/// GET, HEAD, OPTIONS and TRACE (ASCII case-insensitively); every other method is unsafe,
/// extension methods included.
pub fn is_safe_method(method: &str) -> bool {
    ["GET", "HEAD", "OPTIONS", "TRACE"].iter().any(|m| m.eq_ignore_ascii_case(method))
}

fn parse_key(raw: &RawKey, field: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Key, ConfigError> {
    if !valid_key_id(&raw.id) {
        return Err(ConfigError::new(format!("{field}.id"), format!("1 to {MAX_KEY_ID_LEN} characters of A-Z a-z 0-9 - _ . :")));
    }
    let Some(algorithm) = Algorithm::from_name(&raw.algorithm) else {
        return Err(ConfigError::new(format!("{field}.algorithm"), format!("unsupported algorithm `{}`", raw.algorithm)));
    };
    let (encoded, source_field) = match (&raw.secret_base64, &raw.secret_env) {
        (Some(inline), None) => (inline.clone(), format!("{field}.secret_base64")),
        (None, Some(var)) => {
            let value = env(var).ok_or_else(|| {
                ConfigError::new(format!("{field}.secret_env"), format!("environment variable `{var}` is not set in the VM"))
            })?;
            (value, format!("{field}.secret_env"))
        }
        _ => return Err(ConfigError::new(field, "exactly one of `secret_base64` and `secret_env` is required")),
    };
    let secret = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| ConfigError::new(&source_field, "not valid base64"))?;
    if secret.len() < 32 {
        return Err(ConfigError::new(&source_field, "an HMAC-SHA256 secret needs at least 32 bytes"));
    }
    if let (Some(nb), Some(na)) = (raw.not_before, raw.not_after) {
        if nb >= na {
            return Err(ConfigError::new(format!("{field}.not_after"), "must be after not_before"));
        }
    }
    use hmac::Mac;
    let mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&secret).map_err(|_| ConfigError::new(&source_field, "unusable key"))?;
    Ok(Key { id: raw.id.clone(), algorithm, not_before: raw.not_before, not_after: raw.not_after, mac })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "ZGVtby1jbGllbnQtc2VjcmV0LWRvLW5vdC11c2UtaW4tcHJvZHVjdGlvbiE=";

    fn parse(json: &str) -> Result<SignaturePolicy, ConfigError> {
        SignaturePolicy::from_json(json.as_bytes(), &|name| (name == "KEY").then(|| SECRET.to_string()))
    }

    #[test]
    fn minimal_config() {
        let p = parse(&format!(
            r#"{{"routes":[{{"path_prefix":"/v1/"}}],"max_age_seconds":300,"keys":[{{"id":"a","secret_base64":"{SECRET}"}},{{"id":"b","secret_env":"KEY"}}]}}"#
        ))
        .unwrap();
        assert_eq!(p.keys.len(), 2);
        assert_eq!(p.future_skew_seconds, 5);
        assert_eq!(p.scope("POST", "/v1/transfers"), Scope::In(0));
        assert!(!format!("{:?}", p.keys[0]).contains(SECRET));
    }

    #[test]
    fn unsafe_methods_require_a_signature_except_exemptions() {
        let p = parse(&format!(
            r#"{{"unsafe_methods_require_signature":true,"routes":[{{"methods":["GET"],"path_prefix":"/v1/accounts/"}}],
                "exemptions":[{{"methods":["POST"],"path_exact":"/hooks/psp"}},{{"path_prefix":"/v1/accounts/"}}],
                "max_age_seconds":300,"keys":[{{"id":"a","secret_base64":"{SECRET}"}}]}}"#
        ))
        .unwrap();
        for method in ["POST", "put", "Patch", "DELETE", "PROPPATCH", "FOO"] {
            assert_eq!(p.scope(method, "/anything/at/all"), Scope::In(1), "{method}");
            assert_eq!(p.scope(method, "/"), Scope::In(1), "{method}");
        }
        for method in ["GET", "head", "OPTIONS", "TRACE"] {
            assert_eq!(p.scope(method, "/anything"), Scope::Out, "{method}");
        }
        // Exemptions match on the canonical scope, case-insensitively; non-canonical spellings of
        // anything are refused for unsafe methods.
        assert_eq!(p.scope("POST", "/hooks/psp"), Scope::Out);
        assert_eq!(p.scope("post", "/HOOKS/PSP?x=1"), Scope::Out);
        assert_eq!(p.scope("PUT", "/hooks/psp"), Scope::In(1));
        assert_eq!(p.scope("POST", "/hooks//psp"), Scope::NotCanonical);
        assert_eq!(p.scope("POST", "/v1//payouts"), Scope::NotCanonical);
        assert_eq!(p.scope("GET", "/v1//payouts"), Scope::Out);
        // A listed route always applies, exemption or not.
        assert_eq!(p.scope("GET", "/v1/accounts/x"), Scope::In(0));
        assert_eq!(p.scope("DELETE", "/v1/accounts/x"), Scope::Out);
        assert_eq!(p.scope("GET", "/v1/accounts//x"), Scope::NotCanonical);
    }

    #[test]
    fn each_bad_field_is_named() {
        let key = format!(r#"{{"id":"a","secret_base64":"{SECRET}"}}"#);
        let cases = [
            (format!(r#"{{"routes":[{{"path_prefix":"/"}}],"keys":[{key}]}}"#), "max_age_seconds"),
            (format!(r#"{{"routes":[{{"path_prefix":"/"}}],"max_age_seconds":0,"keys":[{key}]}}"#), "max_age_seconds"),
            (format!(r#"{{"routes":[],"max_age_seconds":1,"keys":[{key}]}}"#), "routes"),
            (r#"{"routes":[{"path_prefix":"/"}],"max_age_seconds":1,"keys":[]}"#.to_string(), "keys"),
            (
                r#"{"routes":[{"path_prefix":"/"}],"max_age_seconds":1,"keys":[{"id":"a","secret_base64":"c2hvcnQ="}]}"#
                    .to_string(),
                "keys[0].secret_base64",
            ),
            (
                r#"{"routes":[{"path_prefix":"/"}],"max_age_seconds":1,"keys":[{"id":"a","secret_env":"NOPE"}]}"#.to_string(),
                "keys[0].secret_env",
            ),
            (
                format!(
                    r#"{{"routes":[{{"path_prefix":"/"}}],"max_age_seconds":1,"keys":[{{"id":"a b","secret_base64":"{SECRET}"}}]}}"#
                ),
                "keys[0].id",
            ),
            (format!(r#"{{"routes":[{{"path_prefix":"/"}}],"max_age_seconds":1,"keys":[{key},{key}]}}"#), "keys[1].id"),
            (
                format!(
                    r#"{{"routes":[{{"path_prefix":"/"}}],"max_age_seconds":1,"keys":[{{"id":"a","secret_base64":"{SECRET}","algorithm":"rsa"}}]}}"#
                ),
                "keys[0].algorithm",
            ),
            (
                format!(
                    r#"{{"routes":[{{"path_prefix":"/"}}],"max_age_seconds":1,"keys":[{key}],"nonce_store":{{"buckets":0}}}}"#
                ),
                "nonce_store.buckets",
            ),
            (
                format!(r#"{{"routes":[{{"path_prefix":"/"}}],"max_age_seconds":1,"keys":[{key}],"max_body_bytes":0}}"#),
                "max_body_bytes",
            ),
            (
                format!(
                    r#"{{"routes":[{{"path_prefix":"/"}}],"max_age_seconds":1,"keys":[{key}],"principal_header":"x_principal"}}"#
                ),
                "principal_header",
            ),
            (
                format!(
                    r#"{{"routes":[{{"path_prefix":"/"}}],"max_age_seconds":1,"keys":[{key}],"max_replica_clock_skew_seconds":301}}"#
                ),
                "max_replica_clock_skew_seconds",
            ),
            (
                format!(
                    r#"{{"routes":[{{"path_prefix":"/"}}],"max_age_seconds":1,"keys":[{key}],"state":{{"backend":"redis","cluster":"c","failure_mode":"open"}}}}"#
                ),
                "state.failure_mode",
            ),
        ];
        for (json, field) in cases {
            let err = parse(&json).unwrap_err();
            assert_eq!(err.field, field, "{json}: {err}");
        }
        let cases = [
            (format!(r#"{{"max_age_seconds":1,"keys":[{key}]}}"#), "routes"),
            (
                format!(
                    r#"{{"routes":[{{"path_prefix":"/"}}],"exemptions":[{{"path_exact":"/hooks"}}],"max_age_seconds":1,"keys":[{key}]}}"#
                ),
                "exemptions",
            ),
            (
                format!(
                    r#"{{"unsafe_methods_require_signature":true,"exemptions":[{{"path_exact":"/hooks"}},{{"path_exact":"hooks"}}],"max_age_seconds":1,"keys":[{key}]}}"#
                ),
                "exemptions[1]",
            ),
        ];
        for (json, field) in cases {
            let err = parse(&json).unwrap_err();
            assert_eq!(err.field, field, "{json}: {err}");
        }
        let err = parse(r#"{"routes":[],"bogus":1}"#).unwrap_err();
        assert!(err.message.contains("bogus"), "{err}");
    }
}
