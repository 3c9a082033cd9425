//! The rate-limit plugin's configuration: raw JSON shape, and the validated policy.

use std::num::{NonZeroU16, NonZeroU32};

use serde::Deserialize;

use super::gcra::Quota;
use crate::config::Choice;
use crate::remote::Backend;
use crate::route::{self, parse_routes, RouteConfig, RouteMatch, Scope};
use crate::store::{BucketTable, SharedStore};
use crate::{ConfigError, Mode};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// Names this instance: its shared-data table and its stats. Two instances with different
    /// names never share a budget, even in one VM.
    name: Option<String>,
    rules: Vec<RawRule>,
    #[serde(default = "default_ipv4_prefix")]
    ipv4_prefix: u8,
    #[serde(default = "default_ipv6_prefix")]
    ipv6_prefix: u8,
    /// Read the user from this request header instead of the verified principal. Only for a
    /// header that a trusted hop sets (and strips from clients).
    #[serde(default)]
    trusted_user_header: Option<String>,
    /// Also send RateLimit-Policy / RateLimit on responses that were not limited.
    #[serde(default)]
    response_headers: bool,
    #[serde(default)]
    table: RawTable,
    /// Where budgets live: `{"backend": "local"}` (default) or `{"backend": "redis", ...}`
    /// (see `crate::remote::Backend`).
    #[serde(default)]
    state: Option<serde_json::Value>,
    /// Redis only: keep a local lease of each key's budget instead of one round trip per request.
    #[serde(default)]
    reconcile: Option<RawReconcile>,
    /// `enforce` (default) or `report_only`: the mode of the instance's own refusals and of
    /// every rule that does not set its own.
    #[serde(default)]
    mode: Choice<Mode>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReconcile {
    lease_tokens: Option<u32>,
    lease_ms: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    routes: Vec<RouteConfig>,
    key: Choice<KeyBy>,
    requests: Option<u32>,
    per_seconds: Option<u32>,
    burst: Option<u32>,
    /// `enforce` or `report_only`; absent: the instance's `mode`.
    #[serde(default)]
    mode: Option<Choice<Mode>>,
    #[serde(default)]
    missing_user: Option<Choice<MissingUser>>,
    #[serde(default)]
    fail_open: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    #[serde(default = "default_buckets")]
    buckets: u32,
    #[serde(default = "default_slots")]
    slots_per_bucket: u16,
}

impl Default for RawTable {
    fn default() -> Self {
        RawTable { buckets: default_buckets(), slots_per_bucket: default_slots() }
    }
}

fn default_ipv4_prefix() -> u8 {
    32
}
fn default_ipv6_prefix() -> u8 {
    64
}
fn default_buckets() -> u32 {
    4096
}
fn default_slots() -> u16 {
    16
}

/// Largest `requests` and `burst` accepted.
pub const MAX_REQUESTS: u32 = 1_000_000;
/// Longest period accepted: one day.
pub const MAX_PER_SECONDS: u32 = 86_400;

/// What a rule counts requests against (`key`: `ip`, `user` or `ip_and_user`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyBy {
    /// The client address Envoy computed, grouped by prefix.
    Ip,
    /// The verified user.
    User,
    /// The pair (client network, user).
    IpAndUser,
}

/// What a user-keyed rule does with a request that carries no verified user (`missing_user`:
/// `reject` or `by_ip`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissingUser {
    /// 401 `rate_limit_unauthenticated` (the default: a per-user limit cannot be applied).
    #[default]
    Reject,
    /// Count the request against its client network instead.
    ByIp,
}

/// Where the user comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserSource {
    /// The principal the request-signature filter verified (filter state `firebreak.principal`).
    Principal,
    /// A header set by a trusted hop, named explicitly in the configuration.
    TrustedHeader(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    pub routes: Vec<RouteMatch>,
    pub key: KeyBy,
    pub quota: Quota,
    /// The rule's `mode`, else the instance's.
    pub mode: Mode,
    pub missing_user: MissingUser,
    pub fail_open: bool,
}

impl Rule {
    /// A report-only rule never blocks: what it would refuse is counted and logged.
    pub fn report_only(&self) -> bool {
        self.mode == Mode::ReportOnly
    }

    /// On the canonical scope (crate::route): a non-canonical path never applies here (the
    /// policy refuses it first, see [`RateLimitPolicy::scope`]).
    pub fn applies_to(&self, method: &str, path: &str) -> bool {
        matches!(route::scope(&self.routes, method, path), Scope::In(_))
    }

    /// Seconds to refill the whole burst: the `w` of this rule's RateLimit-Policy item.
    pub fn window_seconds(&self) -> u64 {
        let ms = u64::from(self.quota.burst.get()) * u64::from(self.quota.period_ms.get());
        ms.div_ceil(u64::from(self.quota.requests.get())).div_ceil(1000).max(1)
    }

    /// `"<name>";q=<burst>;w=<seconds to refill it>` (draft-ietf-httpapi-ratelimit-headers).
    pub fn policy_item(&self) -> String {
        format!("\"{}\";q={};w={}", self.name, self.quota.burst, self.window_seconds())
    }
}

/// Largest lease accepted.
pub const MAX_LEASE_TOKENS: u32 = 10_000;
/// Longest lease accepted: one minute.
pub const MAX_LEASE_MS: u32 = 60_000;

/// Redis budgets spent locally: each instance takes up to `lease_tokens` of a key's budget from
/// Redis in one atomic script, spends them from shared data, and takes a new lease when they are
/// spent or `lease_ms` after it took them (unspent tokens then lapse, they are never returned).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reconcile {
    pub lease_tokens: NonZeroU32,
    pub lease_ms: NonZeroU32,
}

/// The validated policy of one rate-limit instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitPolicy {
    pub name: String,
    pub rules: Vec<Rule>,
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    pub user_source: UserSource,
    pub response_headers: bool,
    pub table: BucketTable,
    /// Where the budgets live.
    pub state: Backend,
    /// Redis budgets spent through local leases (`None`: one Redis script per request).
    pub reconcile: Option<Reconcile>,
    /// The leases of `reconcile` (same geometry as `table`).
    pub lease_table: BucketTable,
    /// The mode of the instance's own refusals (a path that is not canonical, unreadable
    /// headers, no clock) and of the rules that do not set one.
    pub mode: Mode,
}

/// Names of instances and rules: they appear in stats, table keys and quoted header strings.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

const NAME_RULE: &str = "1 to 64 characters of A-Z a-z 0-9 - _";

impl RateLimitPolicy {
    /// The hasher of this instance's record keys: keyed, from the budget table's secret, with the
    /// local backend; SHA-256 with Redis (key names the same on every replica; the lease table
    /// of `reconcile` then uses them too). See [`crate::store::KeyHasher`].
    pub fn key_hasher(&self) -> crate::store::KeyHasher {
        match &self.state {
            Backend::Local => self.table.key_hasher(),
            Backend::Redis(_) => crate::store::KeyHasher::Sha256,
        }
    }

    /// Binds the local tables to this Envoy's shared data (configure time; see
    /// [`BucketTable::bind`]): secret placement, and a refusal if the geometry changed (a reload
    /// that moved budgets to other buckets would reset them). The budget table is local only
    /// with the local backend, the lease table only with `reconcile`.
    pub fn bind_tables(&mut self, store: &dyn SharedStore, entropy: [u8; 32]) -> Result<(), ConfigError> {
        if self.state == Backend::Local {
            self.table.bind(store, entropy).map_err(|e| e.config_error("table"))?;
        }
        if self.reconcile.is_some() {
            self.lease_table.bind(store, entropy).map_err(|e| e.config_error("table"))?;
        }
        Ok(())
    }

    pub fn from_json(json: &[u8]) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_json::from_slice(json).map_err(ConfigError::from_json)?;
        let name = raw
            .name
            .ok_or_else(|| ConfigError::new("name", "required: names this instance's table and stats"))?;
        if !valid_name(&name) {
            return Err(ConfigError::new("name", NAME_RULE));
        }
        if raw.rules.is_empty() {
            return Err(ConfigError::new("rules", "at least one rule is required"));
        }
        let mode = raw.mode.get("mode")?;
        let mut rules: Vec<Rule> = Vec::new();
        for (i, raw_rule) in raw.rules.iter().enumerate() {
            let rule = parse_rule(raw_rule, &format!("rules[{i}]"), mode)?;
            if rules.iter().any(|r| r.name == rule.name) {
                return Err(ConfigError::new(format!("rules[{i}].name"), format!("duplicate rule name `{}`", rule.name)));
            }
            rules.push(rule);
        }
        if raw.ipv4_prefix == 0 || raw.ipv4_prefix > 32 {
            return Err(ConfigError::new("ipv4_prefix", "must be between 1 and 32"));
        }
        if raw.ipv6_prefix == 0 || raw.ipv6_prefix > 128 {
            return Err(ConfigError::new("ipv6_prefix", "must be between 1 and 128"));
        }
        let user_source = match raw.trusted_user_header {
            None => UserSource::Principal,
            Some(header) => {
                let lower = header.to_ascii_lowercase();
                if !crate::headers::valid_identity_header_name(&lower) {
                    return Err(ConfigError::new(
                        "trusted_user_header",
                        "not a valid header name: letters, digits and `-` (many upstreams read `_` as `-`)",
                    ));
                }
                UserSource::TrustedHeader(lower)
            }
        };
        let buckets = NonZeroU32::new(raw.table.buckets)
            .filter(|b| b.get() <= 1 << 20)
            .ok_or_else(|| ConfigError::new("table.buckets", "must be between 1 and 1048576"))?;
        let slots = NonZeroU16::new(raw.table.slots_per_bucket)
            .filter(|s| s.get() <= 256)
            .ok_or_else(|| ConfigError::new("table.slots_per_bucket", "must be between 1 and 256"))?;
        let state = Backend::from_value(raw.state.as_ref(), "state")?;
        let reconcile = match (raw.reconcile, &state) {
            (None, _) => None,
            (Some(_), Backend::Local) => {
                return Err(ConfigError::new("reconcile", "only meaningful with the redis backend (`state`)"))
            }
            (Some(r), Backend::Redis(_)) => {
                let lease_tokens =
                    r.lease_tokens.and_then(NonZeroU32::new).filter(|t| t.get() <= MAX_LEASE_TOKENS).ok_or_else(|| {
                        ConfigError::new("reconcile.lease_tokens", format!("required, between 1 and {MAX_LEASE_TOKENS}"))
                    })?;
                let lease_ms =
                    r.lease_ms.and_then(NonZeroU32::new).filter(|t| t.get() <= MAX_LEASE_MS).ok_or_else(|| {
                        ConfigError::new("reconcile.lease_ms", format!("required, between 1 and {MAX_LEASE_MS}"))
                    })?;
                Some(Reconcile { lease_tokens, lease_ms })
            }
        };
        Ok(RateLimitPolicy {
            mode,
            table: BucketTable::new(format!("firebreak.rl.{name}"), buckets, slots, 16),
            lease_table: BucketTable::new(format!("firebreak.rll.{name}"), buckets, slots, 24),
            state,
            reconcile,
            name,
            rules,
            ipv4_prefix: raw.ipv4_prefix,
            ipv6_prefix: raw.ipv6_prefix,
            user_source,
            response_headers: raw.response_headers,
        })
    }

    /// Whether any rule applies (`path` is the raw `:path`), on the canonical scope over every
    /// rule's routes: `NotCanonical` is refused with `400 path_not_canonical`.
    pub fn scope(&self, method: &str, path: &str) -> Scope {
        route::scope(self.rules.iter().flat_map(|r| r.routes.iter()), method, path)
    }
}

fn parse_rule(raw: &RawRule, field: &str, instance_mode: Mode) -> Result<Rule, ConfigError> {
    if !valid_name(&raw.name) {
        return Err(ConfigError::new(format!("{field}.name"), NAME_RULE));
    }
    let routes = parse_routes(&raw.routes, &format!("{field}.routes"))?;
    if routes.is_empty() {
        return Err(ConfigError::new(format!("{field}.routes"), "at least one route is required"));
    }
    let key = raw.key.get(format!("{field}.key"))?;
    let bounded = |value: Option<u32>, name: &str, max: u32| {
        value
            .and_then(NonZeroU32::new)
            .filter(|v| v.get() <= max)
            .ok_or_else(|| ConfigError::new(format!("{field}.{name}"), format!("required, between 1 and {max}")))
    };
    let requests = bounded(raw.requests, "requests", MAX_REQUESTS)?;
    let per_seconds = bounded(raw.per_seconds, "per_seconds", MAX_PER_SECONDS)?;
    let burst = bounded(raw.burst, "burst", MAX_REQUESTS)?;
    let period_ms = NonZeroU32::new(per_seconds.get() * 1000)
        .ok_or_else(|| ConfigError::new(format!("{field}.per_seconds"), "out of range"))?;
    let missing_user = raw
        .missing_user
        .as_ref()
        .map(|m| m.get(format!("{field}.missing_user")))
        .transpose()?
        .unwrap_or_default();
    let mode = match &raw.mode {
        Some(mode) => mode.get(format!("{field}.mode"))?,
        None => instance_mode,
    };
    if (missing_user, key) == (MissingUser::ByIp, KeyBy::Ip) {
        return Err(ConfigError::new(format!("{field}.missing_user"), "only meaningful for rules keyed by user"));
    }
    Ok(Rule {
        name: raw.name.clone(),
        routes,
        key,
        quota: Quota { requests, period_ms, burst },
        mode,
        missing_user,
        fail_open: raw.fail_open,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<RateLimitPolicy, ConfigError> {
        RateLimitPolicy::from_json(json.as_bytes())
    }

    const RULE: &str = r#"{"name":"r","routes":[{"path_prefix":"/v1/"}],"key":"ip","requests":10,"per_seconds":60,"burst":5}"#;

    #[test]
    fn minimal_config_and_defaults() {
        let p = parse(&format!(r#"{{"name":"edge","rules":[{RULE}]}}"#)).unwrap();
        assert_eq!(p.ipv4_prefix, 32);
        assert_eq!(p.ipv6_prefix, 64);
        assert_eq!(p.user_source, UserSource::Principal);
        assert!(!p.response_headers);
        assert_eq!(p.table.capacity(), 4096 * 16);
        let r = &p.rules[0];
        assert_eq!(r.missing_user, MissingUser::Reject);
        assert!(r.mode == Mode::Enforce && !r.fail_open);
        assert_eq!(r.policy_item(), "\"r\";q=5;w=30");
        assert_eq!(p.scope("GET", "/v1/x"), Scope::In(0));
        assert_eq!(p.scope("GET", "/v2/x"), Scope::Out);
        assert_eq!(p.scope("GET", "/V1/%2e/x"), Scope::NotCanonical);
    }

    #[test]
    fn each_bad_field_is_named() {
        let rule = |patch: &str| RULE.replacen('{', &format!("{{{patch},"), 1).replace(",,", ",");
        let with = |rules: String| format!(r#"{{"name":"edge","rules":[{rules}]}}"#);
        let cases: Vec<(String, &str)> = vec![
            (format!(r#"{{"rules":[{RULE}]}}"#), "name"),
            (format!(r#"{{"name":"a b","rules":[{RULE}]}}"#), "name"),
            (r#"{"name":"e","rules":[]}"#.into(), "rules"),
            (with(RULE.replace("\"r\"", "\"\"")), "rules[0].name"),
            (with(format!("{RULE},{RULE}")), "rules[1].name"),
            (with(RULE.replace("\"ip\"", "\"cookie\"")), "rules[0].key"),
            (with(RULE.replace("\"requests\":10", "\"requests\":0")), "rules[0].requests"),
            (with(RULE.replace(",\"requests\":10", "")), "rules[0].requests"),
            (with(RULE.replace("\"per_seconds\":60", "\"per_seconds\":86401")), "rules[0].per_seconds"),
            (with(RULE.replace("\"burst\":5", "\"burst\":0")), "rules[0].burst"),
            (with(RULE.replace("\"path_prefix\":\"/v1/\"", "\"path_prefix\":\"v1\"")), "rules[0].routes[0]"),
            (with(RULE.replace("[{\"path_prefix\":\"/v1/\"}]", "[]")), "rules[0].routes"),
            (with(rule("\"missing_user\":\"by_ip\"")), "rules[0].missing_user"),
            (with(rule("\"missing_user\":\"allow\"").replace("\"ip\"", "\"user\"")), "rules[0].missing_user"),
            (with(rule("\"missing_user\":\"allow\"")), "rules[0].missing_user"),
            (with(RULE.replace("\"ip\"", "\"IP\"")), "rules[0].key"),
            (with(RULE.replace("\"ip\"", "\"ip_and_user\"").replace("\"burst\":5", "\"burst\":0")), "rules[0].burst"),
            (format!(r#"{{"name":"e","ipv6_prefix":0,"rules":[{RULE}]}}"#), "ipv6_prefix"),
            (format!(r#"{{"name":"e","ipv6_prefix":129,"rules":[{RULE}]}}"#), "ipv6_prefix"),
            (format!(r#"{{"name":"e","ipv4_prefix":33,"rules":[{RULE}]}}"#), "ipv4_prefix"),
            (format!(r#"{{"name":"e","trusted_user_header":"x user","rules":[{RULE}]}}"#), "trusted_user_header"),
            (format!(r#"{{"name":"e","trusted_user_header":"x_user","rules":[{RULE}]}}"#), "trusted_user_header"),
            (format!(r#"{{"name":"e","table":{{"buckets":0}},"rules":[{RULE}]}}"#), "table.buckets"),
            (format!(r#"{{"name":"e","table":{{"slots_per_bucket":0}},"rules":[{RULE}]}}"#), "table.slots_per_bucket"),
            (format!(r#"{{"name":"e","mode":"report","rules":[{RULE}]}}"#), "mode"),
            (with(format!("{RULE},{}", rule("\"mode\":\"Report_Only\"").replace("\"r\"", "\"s\""))), "rules[1].mode"),
        ];
        for (json, field) in cases {
            let error = parse(&json).expect_err(&json);
            assert_eq!(error.field, field, "{json}: {error}");
        }
        // Unknown fields and wrong types are refused (serde names them in the message).
        let e = parse(&format!(r#"{{"name":"e","rule":[{RULE}]}}"#)).unwrap_err();
        assert!(e.message.contains("rule"), "{e}");
        let e = parse(&with(RULE.replace("\"burst\":5", "\"burst\":5,\"brust\":1"))).unwrap_err();
        assert!(e.message.contains("brust"), "{e}");
        assert!(parse(&with(RULE.replace("\"burst\":5", "\"burst\":-5"))).is_err());
        // `report_only` is gone: `"mode": "report_only"` says it.
        let e = parse(&with(rule("\"report_only\":true"))).unwrap_err();
        assert!(e.message.contains("report_only"), "{e}");
        assert!(parse("not json").is_err());
        assert!(parse("").is_err());
    }

    #[test]
    fn a_rule_takes_its_own_mode_or_the_instances() {
        let rule = |name: &str, mode: &str| RULE.replace("\"r\"", &format!("\"{name}\"")).replacen('{', mode, 1);
        let rules =
            [rule("own", "{\"mode\":\"enforce\","), rule("inherits", "{"), rule("trial", "{\"mode\":\"report_only\",")].join(",");
        let modes = |instance: &str| {
            let p = parse(&format!(r#"{{"name":"e",{instance}"rules":[{rules}]}}"#)).unwrap();
            (p.mode, p.rules.iter().map(|r| r.mode).collect::<Vec<_>>())
        };
        use Mode::{Enforce, ReportOnly};
        assert_eq!(modes(""), (Enforce, vec![Enforce, Enforce, ReportOnly]));
        assert_eq!(modes(r#""mode":"enforce","#), (Enforce, vec![Enforce, Enforce, ReportOnly]));
        assert_eq!(modes(r#""mode":"report_only","#), (ReportOnly, vec![Enforce, ReportOnly, ReportOnly]));
    }

    #[test]
    fn trusted_header_and_by_ip() {
        let rule = RULE.replace("\"ip\"", "\"user\"").replacen('{', "{\"missing_user\":\"by_ip\",", 1);
        let p = parse(&format!(r#"{{"name":"e","trusted_user_header":"X-User","rules":[{rule}]}}"#)).unwrap();
        assert_eq!(p.user_source, UserSource::TrustedHeader("x-user".into()));
        assert_eq!(p.rules[0].missing_user, MissingUser::ByIp);
        assert_eq!(p.rules[0].key, KeyBy::User);
        for (key, by) in [("ip", KeyBy::Ip), ("user", KeyBy::User), ("ip_and_user", KeyBy::IpAndUser)] {
            let spellings = [
                ("", MissingUser::Reject),
                (r#""missing_user":null,"#, MissingUser::Reject),
                (r#""missing_user":"reject","#, MissingUser::Reject),
            ];
            for (missing, expected) in spellings {
                let rule = RULE.replace("\"ip\"", &format!("\"{key}\"")).replacen('{', &format!("{{{missing}"), 1);
                let p = parse(&format!(r#"{{"name":"e","rules":[{rule}]}}"#)).unwrap();
                assert_eq!((p.rules[0].key, p.rules[0].missing_user), (by, expected));
            }
        }
    }
}
