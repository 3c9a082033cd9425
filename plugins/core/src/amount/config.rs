//! amount-limit's configuration: the raw JSON shape, and the validated policy.

use std::collections::BTreeMap;
use std::num::{NonZeroU16, NonZeroU32, NonZeroU64, NonZeroUsize};

use serde::Deserialize;

use super::budget::{Budget, MAX_HORIZON};
use super::extract::{AmountFormat, Pointer};
use crate::config::Choice;
use crate::quota::{self, TenantQuota};
use crate::ratelimit::config::valid_name;
use crate::remote::Backend;
use crate::route::{self, parse_routes, RouteConfig, RouteMatch, Scope};
use crate::store::{BucketTable, SharedStore};
use crate::{ConfigError, Mode};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    rules: Vec<RawRule>,
    #[serde(default = "default_max_body")]
    max_body_bytes: u64,
    #[serde(default)]
    table: RawTable,
    #[serde(default)]
    state: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    routes: Vec<RouteConfig>,
    amount_pointer: String,
    amount_format: Choice<AmountFormat>,
    #[serde(default)]
    currency_pointer: Option<String>,
    #[serde(default)]
    currency_when_absent: Option<String>,
    key: Vec<String>,
    budgets: BTreeMap<String, RawBudget>,
    #[serde(default)]
    mode: Choice<Mode>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBudget {
    exponent: Option<u8>,
    amount_minor: Option<u64>,
    window_s: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    #[serde(default = "default_buckets")]
    buckets: u32,
    #[serde(default = "default_slots")]
    slots_per_bucket: u16,
    /// Debt records one tenant (verified principal, else client address) may charge per quota
    /// window, new or existing (see [`super`], "The tenant quota"), on either backend; default
    /// capacity / 8.
    #[serde(default)]
    quota_per_tenant: Option<u64>,
    /// Units of a tenant's quota one worker takes at once (see [`crate::quota`]); default
    /// `quota_per_tenant / 256`, between 1 and 16. Local backend only (on Redis every charge is
    /// one script call that counts the quota itself).
    #[serde(default)]
    quota_lease: Option<u64>,
}

impl Default for RawTable {
    fn default() -> Self {
        RawTable { buckets: default_buckets(), slots_per_bucket: default_slots(), quota_per_tenant: None, quota_lease: None }
    }
}

fn default_max_body() -> u64 {
    64 * 1024
}
fn default_buckets() -> u32 {
    4096
}
fn default_slots() -> u16 {
    16
}

/// Largest `max_body_bytes`: 1 MiB (the body is held and parsed whole).
pub const MAX_BODY_BYTES: u64 = 1 << 20;
/// Longest window: 31 days.
pub const MAX_WINDOW_S: u64 = 31 * 86_400;
/// Most fractional digits a currency may have.
pub const MAX_EXPONENT: u8 = 18;
/// Longest key field value (bytes).
pub const MAX_KEY_BYTES: usize = 256;

/// One part of a rule's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPart {
    /// The principal request-signature verified (`"principal"`).
    Principal,
    /// A string in the body (a JSON Pointer).
    Field(Pointer),
}

/// Where the currency comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CurrencySource {
    /// A string in the body, one of the budgets' currency codes; when the field is absent, the
    /// currency the upstream assumes then (`currency_when_absent`), if configured.
    Field(Pointer, Option<String>),
    /// The rule's only currency (no `currency_pointer`).
    Fixed(String),
}

/// One currency's budget with its minor-unit exponent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CurrencyBudget {
    pub exponent: u8,
    pub budget: Budget,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    pub routes: Vec<RouteMatch>,
    pub amount: Pointer,
    pub format: AmountFormat,
    pub currency: CurrencySource,
    pub key: Vec<KeyPart>,
    /// By ISO 4217 code.
    pub budgets: BTreeMap<String, CurrencyBudget>,
    pub mode: Mode,
}

impl Rule {
    pub fn applies_to(&self, method: &str, path: &str) -> bool {
        matches!(route::scope(&self.routes, method, path), Scope::In(_))
    }

    pub fn keys_on_principal(&self) -> bool {
        self.key.contains(&KeyPart::Principal)
    }
}

/// The validated policy of amount-limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmountPolicy {
    pub rules: Vec<Rule>,
    pub max_body_bytes: NonZeroUsize,
    /// The debts of the local backend (shared data: every worker of one Envoy).
    pub table: BucketTable,
    /// How many distinct debt records one tenant may charge per quota window (the longest budget
    /// window and a second; see [`super`], "The tenant quota"): no tenant can fill the table (or,
    /// on Redis, the memory) that every other tenant needs. On Redis only its `limit` and
    /// `window_ms` are used (counted in the budget script).
    pub quota: TenantQuota,
    pub state: Backend,
}

/// The table's prefix in shared data.
pub const TABLE_PREFIX: &str = "firebreak.amt";

impl AmountPolicy {
    pub fn from_json(json: &[u8]) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_json::from_slice(json).map_err(ConfigError::from_json)?;
        if raw.rules.is_empty() {
            return Err(ConfigError::new("rules", "at least one rule is required"));
        }
        let mut rules: Vec<Rule> = Vec::new();
        for (i, raw_rule) in raw.rules.iter().enumerate() {
            let rule = parse_rule(raw_rule, &format!("rules[{i}]"))?;
            if rules.iter().any(|r| r.name == rule.name) {
                return Err(ConfigError::new(format!("rules[{i}].name"), format!("duplicate rule name `{}`", rule.name)));
            }
            rules.push(rule);
        }
        let max_body_bytes = usize::try_from(raw.max_body_bytes)
            .ok()
            .and_then(NonZeroUsize::new)
            .filter(|m| m.get() as u64 <= MAX_BODY_BYTES)
            .ok_or_else(|| ConfigError::new("max_body_bytes", format!("must be between 1 and {MAX_BODY_BYTES}")))?;
        let buckets = NonZeroU32::new(raw.table.buckets)
            .filter(|b| b.get() <= 1 << 20)
            .ok_or_else(|| ConfigError::new("table.buckets", "must be between 1 and 1048576"))?;
        let slots = NonZeroU16::new(raw.table.slots_per_bucket)
            .filter(|s| s.get() <= 256)
            .ok_or_else(|| ConfigError::new("table.slots_per_bucket", "must be between 1 and 256"))?;
        let state = Backend::from_value(raw.state.as_ref(), "state")?;
        let table = BucketTable::new(TABLE_PREFIX, buckets, slots, super::budget::RECORD_LEN);
        let capacity = table.capacity();
        let limit = raw.table.quota_per_tenant.unwrap_or_else(|| u64::from(quota::default_limit(capacity)));
        let limit = match &state {
            Backend::Local => quota::validate_limit(limit, capacity, "table.quota_per_tenant")?,
            // No table on Redis to be filled: the bound is the tenant's own (any count from 1).
            Backend::Redis(_) => u32::try_from(limit).ok().and_then(NonZeroU32::new).ok_or_else(|| {
                ConfigError::new(
                    "table.quota_per_tenant",
                    format!("must be between 1 and {} (debt records one tenant may charge per window on Redis)", u32::MAX),
                )
            })?,
        };
        // A record lives until its debt has drained: at most the longest window (and a second).
        let longest = rules.iter().flat_map(|r| r.budgets.values()).map(|b| b.budget.window_s.get()).max().unwrap_or(1);
        let window_ms = NonZeroU64::new(longest.saturating_add(1).saturating_mul(1000)).unwrap_or(NonZeroU64::MIN);
        let lease = quota::lease(raw.table.quota_lease, limit, "table.quota_lease")?;
        let quota = TenantQuota::for_table(&table, limit, window_ms).with_lease(lease);
        Ok(AmountPolicy { rules, max_body_bytes, table, quota, state })
    }

    /// Binds the local table to this Envoy's shared data (see [`BucketTable::bind`]).
    pub fn bind_tables(&mut self, store: &dyn SharedStore, entropy: [u8; 32]) -> Result<(), ConfigError> {
        if self.state == Backend::Local {
            self.table.bind(store, entropy).map_err(|e| e.config_error("table"))?;
            self.quota.bind(store, entropy).map_err(|e| e.config_error("table"))?;
        }
        Ok(())
    }

    /// Whether any rule applies, on the canonical scope over every rule's routes.
    pub fn scope(&self, method: &str, path: &str) -> Scope {
        route::scope(self.rules.iter().flat_map(|r| r.routes.iter()), method, path)
    }

    /// Report-only when every rule is: a refusal that concerns the request as a whole (a path
    /// that is not canonical) is then reported, not sent.
    /// The hasher of this instance's record keys: keyed, from the budget table's secret, with the
    /// local backend; SHA-256 with Redis (key names the same on every replica). See
    /// [`crate::store::KeyHasher`].
    pub fn key_hasher(&self) -> crate::store::KeyHasher {
        match &self.state {
            Backend::Local => self.table.key_hasher(),
            Backend::Redis(_) => crate::store::KeyHasher::Sha256,
        }
    }

    pub fn mode(&self) -> Mode {
        if self.rules.iter().all(|r| r.mode == Mode::ReportOnly) {
            Mode::ReportOnly
        } else {
            Mode::Enforce
        }
    }
}

fn pointer(text: &str, field: &str) -> Result<Pointer, ConfigError> {
    Pointer::parse(text).map_err(|m| ConfigError::new(field, m))
}

/// An ISO 4217 code: three upper-case letters.
pub fn valid_currency(code: &str) -> bool {
    code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase())
}

fn parse_rule(raw: &RawRule, field: &str) -> Result<Rule, ConfigError> {
    if !valid_name(&raw.name) {
        return Err(ConfigError::new(format!("{field}.name"), "1 to 64 characters of A-Z a-z 0-9 - _"));
    }
    let routes = parse_routes(&raw.routes, &format!("{field}.routes"))?;
    if routes.is_empty() {
        return Err(ConfigError::new(format!("{field}.routes"), "at least one route is required"));
    }
    let amount = pointer(&raw.amount_pointer, &format!("{field}.amount_pointer"))?;
    let format = raw.amount_format.get(format!("{field}.amount_format"))?;
    if raw.budgets.is_empty() {
        return Err(ConfigError::new(format!("{field}.budgets"), "at least one currency's budget is required"));
    }
    let mut budgets = BTreeMap::new();
    for (code, b) in &raw.budgets {
        let at = format!("{field}.budgets.{code}");
        if !valid_currency(code) {
            return Err(ConfigError::new(at, "a currency code is three upper-case letters (ISO 4217)"));
        }
        let exponent = b.exponent.filter(|e| *e <= MAX_EXPONENT).ok_or_else(|| {
            ConfigError::new(format!("{at}.exponent"), format!("required: the currency's minor-unit digits, 0 to {MAX_EXPONENT}"))
        })?;
        let amount = b
            .amount_minor
            .and_then(NonZeroU64::new)
            .ok_or_else(|| ConfigError::new(format!("{at}.amount_minor"), "required: at least 1 (minor units per window)"))?;
        let window_s = b
            .window_s
            .and_then(NonZeroU64::new)
            .filter(|w| w.get() <= MAX_WINDOW_S)
            .ok_or_else(|| ConfigError::new(format!("{at}.window_s"), format!("required, between 1 and {MAX_WINDOW_S}")))?;
        if amount.get().checked_mul(window_s.get()).is_none_or(|h| h > MAX_HORIZON) {
            return Err(ConfigError::new(
                format!("{at}.amount_minor"),
                format!(
                    "amount_minor * window_s must be at most 2^52 ({MAX_HORIZON}) so the budget arithmetic stays exact on Redis"
                ),
            ));
        }
        budgets.insert(code.clone(), CurrencyBudget { exponent, budget: Budget { amount, window_s } });
    }
    let currency = match &raw.currency_pointer {
        Some(text) => {
            let when_absent = match &raw.currency_when_absent {
                Some(code) if budgets.contains_key(code) => Some(code.clone()),
                Some(_) => {
                    return Err(ConfigError::new(
                        format!("{field}.currency_when_absent"),
                        "must be one of the rule's budgets' currencies",
                    ))
                }
                None => None,
            };
            CurrencySource::Field(pointer(text, &format!("{field}.currency_pointer"))?, when_absent)
        }
        None if raw.currency_when_absent.is_some() => {
            return Err(ConfigError::new(format!("{field}.currency_when_absent"), "only meaningful with currency_pointer"))
        }
        None => match budgets.keys().next() {
            Some(code) if budgets.len() == 1 => CurrencySource::Fixed(code.clone()),
            _ => {
                return Err(ConfigError::new(
                    format!("{field}.currency_pointer"),
                    "required when the rule has budgets in more than one currency",
                ))
            }
        },
    };
    if raw.key.is_empty() {
        return Err(ConfigError::new(format!("{field}.key"), "at least one part: \"principal\" or a JSON Pointer"));
    }
    let mut key = Vec::new();
    for (i, part) in raw.key.iter().enumerate() {
        let at = format!("{field}.key[{i}]");
        let part = if part == "principal" { KeyPart::Principal } else { KeyPart::Field(pointer(part, &at)?) };
        if key.contains(&part) {
            return Err(ConfigError::new(at, "repeated key part"));
        }
        key.push(part);
    }
    Ok(Rule {
        name: raw.name.clone(),
        routes,
        amount,
        format,
        currency,
        key,
        budgets,
        mode: raw.mode.get(format!("{field}.mode"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub const RULE: &str = r#"{"name":"withdrawals","routes":[{"methods":["POST"],"path_exact":"/v1/withdrawals"}],"amount_pointer":"/amount","amount_format":"minor_units","currency_pointer":"/currency","key":["/account"],"budgets":{"USD":{"exponent":2,"amount_minor":2000,"window_s":86400}}}"#;

    fn parse(json: &str) -> Result<AmountPolicy, ConfigError> {
        AmountPolicy::from_json(json.as_bytes())
    }

    #[test]
    fn minimal_config_and_defaults() {
        let p = parse(&format!(r#"{{"rules":[{RULE}]}}"#)).unwrap();
        assert_eq!(p.max_body_bytes.get(), 65536);
        assert_eq!(p.state, Backend::Local);
        let r = &p.rules[0];
        assert_eq!(r.mode, Mode::Enforce);
        assert_eq!(r.format, AmountFormat::MinorUnits);
        assert_eq!(r.budgets["USD"].exponent, 2);
        assert_eq!(r.budgets["USD"].budget.horizon(), 2000 * 86400);
        assert_eq!(p.scope("POST", "/v1/withdrawals"), Scope::In(0));
        assert_eq!(p.scope("POST", "/v1/withdrawals/%2e"), Scope::NotCanonical);
        assert_eq!(p.mode(), Mode::Enforce);
        let one = RULE.replace(r#""currency_pointer":"/currency","#, "");
        let p = parse(&format!(r#"{{"rules":[{one}]}}"#)).unwrap();
        assert_eq!(p.rules[0].currency, CurrencySource::Fixed("USD".into()));
        let ro = RULE.replace(r#""key""#, r#""mode":"report_only","key""#);
        assert_eq!(parse(&format!(r#"{{"rules":[{ro}]}}"#)).unwrap().mode(), Mode::ReportOnly);
    }

    const REDIS: &str = r#"{"backend":"redis","cluster":"bridge","key_prefix":"t"}"#;

    /// The tenant quota applies on both backends: the same setting and default; on Redis no
    /// table bounds it (any count from 1), the longest window and a second is its window.
    #[test]
    fn the_tenant_quota_applies_on_redis_too() {
        let local = parse(&format!(r#"{{"rules":[{RULE}]}}"#)).unwrap();
        let redis = parse(&format!(r#"{{"state":{REDIS},"rules":[{RULE}]}}"#)).unwrap();
        assert_eq!(local.quota.limit.get(), 8192);
        assert_eq!(redis.quota.limit, local.quota.limit);
        assert_eq!(redis.quota.window_ms.get(), 86_401_000);
        let big = format!(r#"{{"table":{{"quota_per_tenant":1000000}},"state":{REDIS},"rules":[{RULE}]}}"#);
        assert_eq!(parse(&big).unwrap().quota.limit.get(), 1_000_000);
        let error = parse(&big.replace(&format!(r#","state":{REDIS}"#), "")).unwrap_err();
        assert_eq!(error.field, "table.quota_per_tenant");
    }

    #[test]
    fn each_bad_field_is_named() {
        let with = |rule: String| format!(r#"{{"rules":[{rule}]}}"#);
        let two = RULE.replace(
            r#""USD":{"exponent":2,"amount_minor":2000,"window_s":86400}"#,
            r#""USD":{"exponent":2,"amount_minor":2000,"window_s":86400},"EUR":{"exponent":2,"amount_minor":1,"window_s":1}"#,
        );
        let cases: Vec<(String, &str)> = vec![
            (r#"{"rules":[]}"#.into(), "rules"),
            (with(RULE.replace("withdrawals\",\"routes", "a b\",\"routes")), "rules[0].name"),
            (with(format!("{RULE},{RULE}").replacen("", "", 1)), "rules[1].name"),
            (with(RULE.replace(r#""/amount""#, r#""amount""#)), "rules[0].amount_pointer"),
            (with(RULE.replace(r#""/amount""#, r#""/a~2""#)), "rules[0].amount_pointer"),
            (with(RULE.replace("minor_units", "float")), "rules[0].amount_format"),
            (with(RULE.replace(r#""/currency""#, r#""currency""#)), "rules[0].currency_pointer"),
            (with(two.replace(r#""currency_pointer":"/currency","#, "")), "rules[0].currency_pointer"),
            (with(RULE.replace(r#"["/account"]"#, "[]")), "rules[0].key"),
            (with(RULE.replace(r#""key""#, r#""currency_when_absent":"EUR","key""#)), "rules[0].currency_when_absent"),
            (
                with(RULE.replace(r#""currency_pointer":"/currency","#, r#""currency_when_absent":"USD","#)),
                "rules[0].currency_when_absent",
            ),
            (with(RULE.replace(r#"["/account"]"#, r#"["account"]"#)), "rules[0].key[0]"),
            (with(RULE.replace(r#"["/account"]"#, r#"["principal","principal"]"#)), "rules[0].key[1]"),
            (with(RULE.replace("\"USD\"", "\"usd\"")), "rules[0].budgets.usd"),
            (with(RULE.replace("\"exponent\":2,", "")), "rules[0].budgets.USD.exponent"),
            (with(RULE.replace("\"exponent\":2", "\"exponent\":19")), "rules[0].budgets.USD.exponent"),
            (with(RULE.replace("\"amount_minor\":2000", "\"amount_minor\":0")), "rules[0].budgets.USD.amount_minor"),
            (with(RULE.replace("\"window_s\":86400", "\"window_s\":0")), "rules[0].budgets.USD.window_s"),
            (with(RULE.replace("\"window_s\":86400", "\"window_s\":2678401")), "rules[0].budgets.USD.window_s"),
            (with(RULE.replace("\"amount_minor\":2000", "\"amount_minor\":100000000000")), "rules[0].budgets.USD.amount_minor"),
            (with(RULE.replace(r#"{"USD":{"exponent":2,"amount_minor":2000,"window_s":86400}}"#, "{}")), "rules[0].budgets"),
            (with(RULE.replace(r#""key""#, r#""mode":"report","key""#)), "rules[0].mode"),
            (with(RULE.replace(r#""path_exact":"/v1/withdrawals""#, r#""path_exact":"v1""#)), "rules[0].routes[0]"),
            (format!(r#"{{"max_body_bytes":0,"rules":[{RULE}]}}"#), "max_body_bytes"),
            (format!(r#"{{"max_body_bytes":1048577,"rules":[{RULE}]}}"#), "max_body_bytes"),
            (format!(r#"{{"table":{{"buckets":0}},"rules":[{RULE}]}}"#), "table.buckets"),
            (
                format!(r#"{{"table":{{"buckets":1,"slots_per_bucket":4,"quota_per_tenant":3}},"rules":[{RULE}]}}"#),
                "table.quota_per_tenant",
            ),
            (format!(r#"{{"table":{{"quota_per_tenant":0}},"rules":[{RULE}]}}"#), "table.quota_per_tenant"),
            (format!(r#"{{"table":{{"quota_per_tenant":64,"quota_lease":5}},"rules":[{RULE}]}}"#), "table.quota_lease"),
            (format!(r#"{{"state":{{"backend":"redis"}},"rules":[{RULE}]}}"#), "state.cluster"),
            (format!(r#"{{"table":{{"quota_per_tenant":0}},"state":{REDIS},"rules":[{RULE}]}}"#), "table.quota_per_tenant"),
            (
                format!(r#"{{"table":{{"quota_per_tenant":4294967296}},"state":{REDIS},"rules":[{RULE}]}}"#),
                "table.quota_per_tenant",
            ),
        ];
        for (json, field) in cases {
            let error = parse(&json).expect_err(&json);
            assert_eq!(error.field, field, "{json}: {error}");
        }
        assert!(parse(&with(RULE.replace("\"exponent\"", "\"exponant\""))).is_err());
        assert!(parse(&format!(r#"{{"rule":[{RULE}]}}"#)).is_err());
        assert!(parse("").is_err());
    }
}
