//! The replay-guard plugin's configuration: raw JSON shape, and the validated policy.

use std::num::{NonZeroU16, NonZeroU32, NonZeroU64};

use serde::Deserialize;

use crate::config::Choice;
use crate::quota::{self, TenantQuota};
use crate::remote::{Backend, FailureMode};
use crate::route::{RouteConfig, RouteMatch};
use crate::store::{BucketTable, SharedStore};
use crate::{ConfigError, Mode};

use super::record::RECORD_LEN;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    routes: Vec<RawRoute>,
    #[serde(default = "default_ttl")]
    ttl_seconds: u64,
    #[serde(default = "default_in_flight_timeout")]
    in_flight_timeout_ms: u64,
    #[serde(default = "default_max_key_length")]
    max_key_length: usize,
    #[serde(default = "default_max_body")]
    max_body_bytes: u64,
    #[serde(default = "default_max_stored_body")]
    max_stored_body_bytes: u32,
    #[serde(default = "default_stored_headers")]
    stored_headers: Vec<String>,
    #[serde(default = "default_not_executed")]
    not_executed_statuses: Vec<u16>,
    #[serde(default = "default_marker")]
    replay_marker_header: String,
    #[serde(default = "default_key_store")]
    key_store: RawTable,
    #[serde(default = "default_collapse_store")]
    collapse_store: RawTable,
    #[serde(default)]
    operator_clear: Option<RawOperatorClear>,
    /// Where records live: `{"backend": "local"}` (default) or `{"backend": "redis", ...}`.
    #[serde(default)]
    state: Option<serde_json::Value>,
    /// `enforce` (default) or `report_only` ([`crate::Mode`]).
    #[serde(default)]
    mode: Choice<Mode>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOperatorClear {
    path: String,
    principals: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: String,
    #[serde(rename = "match")]
    matcher: RouteConfig,
    #[serde(default)]
    idempotency_key: Choice<KeyMode>,
    #[serde(default)]
    collapse_window_ms: u64,
    #[serde(default)]
    on_uncertain: Choice<OnUncertain>,
    #[serde(default)]
    require_principal: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    buckets: u32,
    slots_per_bucket: u16,
    /// Records one principal (or, without one, one route's anonymous requests) may claim per
    /// window (see [`crate::quota`]); default capacity / 8.
    #[serde(default)]
    quota_per_principal: Option<u64>,
    /// Units of a tenant's quota one worker takes at once (see [`crate::quota`]); default
    /// `quota_per_principal / 256`, between 1 and 16.
    #[serde(default)]
    quota_lease: Option<u64>,
}

fn default_ttl() -> u64 {
    86_400
}
fn default_in_flight_timeout() -> u64 {
    60_000
}
fn default_max_key_length() -> usize {
    255
}
fn default_max_body() -> u64 {
    1024 * 1024
}
fn default_max_stored_body() -> u32 {
    4096
}
fn default_stored_headers() -> Vec<String> {
    vec!["content-type".into(), "location".into()]
}
/// Answers that say the upstream refused this request without applying it (HTTP semantics of each
/// status; see the README for the reasoning and for the 4xx that are left out).
pub const DEFAULT_NOT_EXECUTED_STATUSES: [u16; 20] =
    [400, 401, 403, 404, 405, 406, 408, 409, 410, 411, 412, 413, 414, 415, 421, 422, 425, 428, 429, 431];
fn default_not_executed() -> Vec<u16> {
    DEFAULT_NOT_EXECUTED_STATUSES.to_vec()
}
fn default_marker() -> String {
    "idempotent-replayed".into()
}
fn default_key_store() -> RawTable {
    RawTable { buckets: 1024, slots_per_bucket: 8, quota_per_principal: None, quota_lease: None }
}
fn default_collapse_store() -> RawTable {
    RawTable { buckets: 256, slots_per_bucket: 8, quota_per_principal: None, quota_lease: None }
}

/// Limits that are not configurable (they bound memory whatever the configuration says).
pub const MAX_KEY_LENGTH_LIMIT: usize = 1024;
pub const MAX_STORED_BODY_LIMIT: u32 = 1024 * 1024;
pub const MAX_TTL_SECONDS: u64 = 30 * 86_400;
pub const MAX_COLLAPSE_WINDOW_MS: u64 = 3_600_000;
pub const MAX_STORED_HEADERS: usize = 16;
pub const MAX_ROUTE_NAME_LEN: usize = 64;

/// What the `Idempotency-Key` header means on a route (`idempotency_key`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyMode {
    /// A request without a key is refused (400 `idempotency_key_missing`). The default.
    #[default]
    Required,
    /// A key is honoured when present; requests without one fall back to duplicate collapse.
    Optional,
    /// The header is not looked at (duplicate collapse only).
    Ignored,
}

/// What an answer that does not prove the outcome (5xx, timeout, reset, local reply) does to a key
/// (`on_uncertain`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnUncertain {
    /// The key becomes `outcome_unknown`: retries get 409 until the TTL ends. The default.
    #[default]
    Lock,
    /// The key is released: a retry is forwarded (only for operations safe to repeat).
    Release,
}

/// A validated protected route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayRoute {
    /// Names the route in logs and scopes its keys (renaming a route forgets its keys).
    pub name: String,
    pub matcher: RouteMatch,
    pub key_mode: KeyMode,
    /// Requests without a key and with identical fingerprints inside this window are refused
    /// (409 `duplicate_request`); `None` turns collapse off.
    pub collapse_window_ms: Option<NonZeroU64>,
    pub on_uncertain: OnUncertain,
    /// Refuse requests without a verified principal (401 `principal_required`).
    pub require_principal: bool,
}

/// Who may clear an `outcome_unknown` key, and where (see the README, "Operating it").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorClear {
    /// Exact path of the clear endpoint (`POST`), answered by the filter, never forwarded.
    pub path: String,
    /// Principals verified by request-signature that may clear keys.
    pub principals: Vec<String>,
}

/// The validated policy of the replay-guard plugin.
#[derive(Debug, Clone)]
pub struct ReplayPolicy {
    pub routes: Vec<ReplayRoute>,
    pub ttl_ms: NonZeroU64,
    pub in_flight_timeout_ms: NonZeroU64,
    pub max_key_length: usize,
    pub max_body_bytes: u64,
    pub max_stored_body_bytes: u32,
    /// Lower-case names of the response headers stored and replayed.
    pub stored_headers: Vec<String>,
    pub not_executed_statuses: Vec<u16>,
    /// Lower-case name of the header added to a replayed response (value `true`).
    pub replay_marker_header: String,
    pub key_table: BucketTable,
    pub collapse_table: BucketTable,
    /// Idempotency keys per tenant per `ttl_seconds` (a key's life).
    pub key_quota: TenantQuota,
    /// Collapse records per tenant per longest `collapse_window_ms`.
    pub collapse_quota: TenantQuota,
    /// Prefix of the companion keys holding stored responses (one per key-table slot).
    pub response_prefix: String,
    pub operator_clear: Option<OperatorClear>,
    /// Where records live. A Redis backend always fails closed (see [`ReplayPolicy::from_json`]).
    pub state: Backend,
    /// Enforce: a duplicate is refused or replayed. Report-only: it is counted and logged
    /// (`would_reject.<code>`, `would_replay`) and forwarded; only a request that owns its key
    /// records its outcome.
    pub mode: Mode,
}

/// Shared-data key prefixes (distinct per table, see the brief).
pub const KEY_TABLE_PREFIX: &str = "firebreak.replay.key";
pub const COLLAPSE_TABLE_PREFIX: &str = "firebreak.replay.dup";
pub const RESPONSE_PREFIX: &str = "firebreak.replay.resp";

impl ReplayPolicy {
    pub fn from_json(json: &[u8]) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_json::from_slice(json).map_err(ConfigError::from_json)?;
        if raw.routes.is_empty() {
            return Err(ConfigError::new("routes", "at least one route is required"));
        }
        let mut routes: Vec<ReplayRoute> = Vec::with_capacity(raw.routes.len());
        for (i, route) in raw.routes.iter().enumerate() {
            let route = parse_route(route, &format!("routes[{i}]"))?;
            if routes.iter().any(|r| r.name == route.name) {
                return Err(ConfigError::new(format!("routes[{i}].name"), format!("duplicate route name `{}`", route.name)));
            }
            routes.push(route);
        }
        let ttl_seconds = Some(raw.ttl_seconds)
            .filter(|t| (1..=MAX_TTL_SECONDS).contains(t))
            .ok_or_else(|| ConfigError::new("ttl_seconds", format!("must be between 1 and {MAX_TTL_SECONDS}")))?;
        let ttl_ms = NonZeroU64::new(ttl_seconds * 1000).ok_or_else(|| ConfigError::new("ttl_seconds", "must be > 0"))?;
        let in_flight_timeout_ms = NonZeroU64::new(raw.in_flight_timeout_ms)
            .filter(|t| t.get() < ttl_ms.get())
            .ok_or_else(|| ConfigError::new("in_flight_timeout_ms", "must be greater than 0 and shorter than ttl_seconds"))?;
        if raw.max_key_length == 0 || raw.max_key_length > MAX_KEY_LENGTH_LIMIT {
            return Err(ConfigError::new("max_key_length", format!("must be between 1 and {MAX_KEY_LENGTH_LIMIT}")));
        }
        if raw.max_body_bytes == 0 || raw.max_body_bytes > 64 * 1024 * 1024 {
            return Err(ConfigError::new("max_body_bytes", "must be between 1 and 67108864"));
        }
        if raw.max_stored_body_bytes > MAX_STORED_BODY_LIMIT {
            return Err(ConfigError::new("max_stored_body_bytes", format!("must be at most {MAX_STORED_BODY_LIMIT}")));
        }
        if raw.stored_headers.len() > MAX_STORED_HEADERS {
            return Err(ConfigError::new("stored_headers", format!("at most {MAX_STORED_HEADERS} headers")));
        }
        let mut stored_headers = Vec::new();
        for (i, name) in raw.stored_headers.iter().enumerate() {
            let lower = name.to_ascii_lowercase();
            let field = format!("stored_headers[{i}]");
            if !crate::headers::valid_header_name(&lower) {
                return Err(ConfigError::new(field, "not a valid header name"));
            }
            if matches!(
                lower.as_str(),
                "content-length"
                    | "transfer-encoding"
                    | "connection"
                    | "keep-alive"
                    | "upgrade"
                    | "te"
                    | "trailer"
                    | "proxy-connection"
            ) {
                return Err(ConfigError::new(field, format!("`{lower}` is computed by Envoy and cannot be replayed")));
            }
            if stored_headers.contains(&lower) {
                return Err(ConfigError::new(field, format!("duplicate header `{lower}`")));
            }
            stored_headers.push(lower);
        }
        let mut not_executed = Vec::new();
        for (i, status) in raw.not_executed_statuses.iter().enumerate() {
            if !(400..=499).contains(status) {
                return Err(ConfigError::new(
                    format!("not_executed_statuses[{i}]"),
                    "only 4xx statuses can prove that an operation did not execute",
                ));
            }
            if !not_executed.contains(status) {
                not_executed.push(*status);
            }
        }
        let marker = raw.replay_marker_header.to_ascii_lowercase();
        if !crate::headers::valid_header_name(&marker) {
            return Err(ConfigError::new("replay_marker_header", "not a valid header name"));
        }
        if stored_headers.contains(&marker) {
            return Err(ConfigError::new("replay_marker_header", "must not be one of stored_headers"));
        }
        let key_table = parse_table(&raw.key_store, "key_store", KEY_TABLE_PREFIX, RECORD_LEN)?;
        let collapse_table = parse_table(&raw.collapse_store, "collapse_store", COLLAPSE_TABLE_PREFIX, 0)?;
        let key_quota = parse_quota(&raw.key_store, "key_store", &key_table, ttl_ms)?;
        let longest_window = routes.iter().filter_map(|r| r.collapse_window_ms).max().unwrap_or(NonZeroU64::MIN);
        let collapse_quota = parse_quota(&raw.collapse_store, "collapse_store", &collapse_table, longest_window)?;
        let operator_clear = match &raw.operator_clear {
            None => None,
            Some(op) => {
                if !op.path.starts_with('/') || op.path.contains('?') || op.path.len() > 256 {
                    return Err(ConfigError::new("operator_clear.path", "an absolute path without a query"));
                }
                // Compared byte for byte with the request path: only its canonical spelling can
                // ever match (another spelling is forwarded like any request).
                if !crate::route::is_canonical(&op.path) {
                    return Err(ConfigError::new(
                        "operator_clear.path",
                        "must be a canonical path (see README, Canonical paths)",
                    ));
                }
                if routes.iter().any(|r| r.matcher.matches("POST", &op.path)) {
                    return Err(ConfigError::new("operator_clear.path", "must not be a protected route"));
                }
                if op.principals.is_empty() {
                    return Err(ConfigError::new("operator_clear.principals", "at least one principal is required"));
                }
                for (i, p) in op.principals.iter().enumerate() {
                    if !crate::signature::valid_key_id(p) {
                        return Err(ConfigError::new(
                            format!("operator_clear.principals[{i}]"),
                            "not a valid principal (a request-signature key id)",
                        ));
                    }
                }
                Some(OperatorClear { path: op.path.clone(), principals: op.principals.clone() })
            }
        };
        let state = Backend::from_value(raw.state.as_ref(), "state")?;
        if let Backend::Redis(redis) = &state {
            // Forwarding a money operation whose claim could not be made is exactly the double
            // execution this filter exists to prevent: there is no safe "open" for a claim.
            if redis.failure_mode == FailureMode::Open {
                return Err(ConfigError::new(
                    "state.failure_mode",
                    "replay-guard always fails closed: forwarding a request whose idempotency claim could not be made may execute it twice",
                ));
            }
        }
        let mode = raw.mode.get("mode")?;
        Ok(ReplayPolicy {
            mode,
            routes,
            ttl_ms,
            in_flight_timeout_ms,
            max_key_length: raw.max_key_length,
            max_body_bytes: raw.max_body_bytes,
            max_stored_body_bytes: raw.max_stored_body_bytes,
            stored_headers,
            not_executed_statuses: not_executed,
            replay_marker_header: marker,
            key_table,
            collapse_table,
            key_quota,
            collapse_quota,
            response_prefix: RESPONSE_PREFIX.to_string(),
            operator_clear,
            state,
        })
    }

    /// The hasher of this filter's record keys (idempotency keys, duplicate fingerprints,
    /// tenants): keyed, from the key table's secret, with the local backend; SHA-256 with Redis
    /// (key names the same on every replica). See [`crate::store::KeyHasher`].
    pub fn key_hasher(&self) -> crate::store::KeyHasher {
        match &self.state {
            Backend::Local => self.key_table.key_hasher(),
            _ => crate::store::KeyHasher::Sha256,
        }
    }

    /// Binds the local tables to this Envoy's shared data (configure time; see
    /// [`BucketTable::bind`]): secret placement, and a refusal if a table's geometry changed.
    /// A Redis backend has no local tables.
    pub fn bind_tables(&mut self, store: &dyn SharedStore, entropy: [u8; 32]) -> Result<(), ConfigError> {
        if self.state != Backend::Local {
            return Ok(());
        }
        self.key_table.bind(store, entropy).map_err(|e| e.config_error("key_store"))?;
        self.key_quota.bind(store, entropy).map_err(|e| e.config_error("key_store"))?;
        self.collapse_table.bind(store, entropy).map_err(|e| e.config_error("collapse_store"))?;
        self.collapse_quota.bind(store, entropy).map_err(|e| e.config_error("collapse_store"))
    }

    /// The first route that protects this request, on the canonical scope (crate::route;
    /// `path` is the raw `:path`): `NotCanonical` is refused with `400 path_not_canonical`.
    pub fn route_for(&self, method: &str, path: &str) -> crate::route::Scope {
        crate::route::scope(self.routes.iter().map(|r| &r.matcher), method, path)
    }

    /// Worst-case shared-data bytes: record tables, one stored response per key-table slot, and
    /// the quota tables.
    pub fn max_memory_bytes(&self) -> u64 {
        let response = u64::from(self.max_stored_body_bytes) + super::record::MAX_RESPONSE_HEAD_LEN as u64;
        self.key_table.max_bytes()
            + self.collapse_table.max_bytes()
            + self.key_table.capacity() * response
            + self.key_quota.table.max_bytes()
            + self.collapse_quota.table.max_bytes()
    }
}

fn parse_route(raw: &RawRoute, field: &str) -> Result<ReplayRoute, ConfigError> {
    if raw.name.is_empty()
        || raw.name.len() > MAX_ROUTE_NAME_LEN
        || !raw.name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(ConfigError::new(
            format!("{field}.name"),
            format!("1 to {MAX_ROUTE_NAME_LEN} characters of A-Z a-z 0-9 - _ ."),
        ));
    }
    let matcher = RouteMatch::parse(&raw.matcher, &format!("{field}.match"))?;
    let key_mode = raw.idempotency_key.get(format!("{field}.idempotency_key"))?;
    let on_uncertain = raw.on_uncertain.get(format!("{field}.on_uncertain"))?;
    if raw.collapse_window_ms > MAX_COLLAPSE_WINDOW_MS {
        return Err(ConfigError::new(format!("{field}.collapse_window_ms"), format!("must be at most {MAX_COLLAPSE_WINDOW_MS}")));
    }
    let collapse_window_ms = NonZeroU64::new(raw.collapse_window_ms);
    if key_mode == KeyMode::Ignored && collapse_window_ms.is_none() {
        return Err(ConfigError::new(
            format!("{field}.collapse_window_ms"),
            "a route that ignores idempotency keys must collapse duplicates (set collapse_window_ms), else it protects nothing",
        ));
    }
    Ok(ReplayRoute {
        name: raw.name.clone(),
        matcher,
        key_mode,
        collapse_window_ms,
        on_uncertain,
        require_principal: raw.require_principal,
    })
}

fn parse_table(raw: &RawTable, field: &str, prefix: &str, payload: usize) -> Result<BucketTable, ConfigError> {
    let buckets = NonZeroU32::new(raw.buckets)
        .filter(|b| b.get() <= 1 << 20)
        .ok_or_else(|| ConfigError::new(format!("{field}.buckets"), "must be between 1 and 1048576"))?;
    let slots = NonZeroU16::new(raw.slots_per_bucket)
        .filter(|s| s.get() <= 256)
        .ok_or_else(|| ConfigError::new(format!("{field}.slots_per_bucket"), "must be between 1 and 256"))?;
    let payload = u16::try_from(payload).map_err(|_| ConfigError::new(field, "record too large"))?;
    Ok(BucketTable::new(prefix, buckets, slots, payload))
}

fn parse_quota(raw: &RawTable, field: &str, table: &BucketTable, window_ms: NonZeroU64) -> Result<TenantQuota, ConfigError> {
    let capacity = table.capacity();
    let limit = raw.quota_per_principal.unwrap_or_else(|| u64::from(quota::default_limit(capacity)));
    let limit = quota::validate_limit(limit, capacity, &format!("{field}.quota_per_principal"))?;
    let lease = quota::lease(raw.quota_lease, limit, &format!("{field}.quota_lease"))?;
    Ok(TenantQuota::for_table(table, limit, window_ms).with_lease(lease))
}
