//! Rate limiting with GCRA on shared data: per client network, per verified user, or both.
//!
//! [`check`] decides one request: which rules apply, what each counts against, and whether
//! the most restrictive of them admits it. Every budget lives in the instance's
//! [`BucketTable`](crate::store::BucketTable), so all workers of an Envoy share one budget per
//! key. Nothing here imports proxy-wasm; `now_ms` is an argument.
//!
//! Semantics the tests pin down:
//! - Each rule admits at most `burst + floor(d * requests / per)` requests of one key in any
//!   interval of length `d`, and exactly that many under sustained overload ([`gcra`]).
//! - Several rules may apply; the request is admitted only if every enforced rule admits it.
//!   With more than one enforced rule, all are first read without writing, so a request refused
//!   by one rule costs nothing in the others; only then are the admissions written. Two workers
//!   that race between the read and the write can make a later rule refuse a request an earlier
//!   rule already charged: the error is towards refusing, never towards admitting.
//! - A record whose TAT is in the past equals a fresh key, so its slot expires at the TAT: the
//!   table only ever holds keys that are currently in debt. When a key's bucket is full of
//!   those, the rule fails closed (503 `rate_limit_store_full`) unless it says `fail_open`.

pub mod client;
pub mod config;
pub mod flow;
pub mod gcra;
pub mod lease;
pub mod redis;

/// Every rejection code rate-limit can send (its README's table lists exactly these).
pub const CODES: &[crate::Code] = {
    use crate::Code::*;
    &[
        PathNotCanonical,
        RateLimited,
        RateLimitUnauthenticated,
        RateLimitStoreFull,
        RateLimitUnavailable,
        RequestHeadersInvalid,
        RateLimitClientUnknown,
        StateUnavailable,
    ]
};

#[cfg(test)]
mod flow_tests;
#[cfg(test)]
mod tests;

use std::net::IpAddr;

pub use config::{KeyBy, MissingUser, RateLimitPolicy, Reconcile, Rule, UserSource};
pub use gcra::{Outcome, Quota};

use crate::store::{KeyHash, SharedStore, TableError, Update};
use crate::{Code, Rejection};

/// What the plugin knows about a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    pub method: &'a str,
    /// Without the query.
    pub path: &'a str,
    /// The downstream address Envoy computed (`source.address`); `None` if unknown.
    pub client_ip: Option<IpAddr>,
    /// The verified user (see [`resolve_user`]).
    pub user: Option<&'a str>,
}

/// The user of a request per the configured source. A trusted header is read only under its
/// exact (lower-case, dashed) name, and only when the request carries it once and in no other
/// spelling (`x_edge_user`, which an upstream may read as `x-edge-user` and the trusted hop may
/// not have stripped); otherwise, or when empty, it yields no user.
pub fn resolve_user(source: &UserSource, principal: Option<String>, headers: &[(String, String)]) -> Option<String> {
    user_of(source, principal.as_deref(), headers).map(str::to_string)
}

/// [`resolve_user`], borrowed from its inputs (no copy of the user).
pub fn user_of<'a>(source: &UserSource, principal: Option<&'a str>, headers: &'a [(String, String)]) -> Option<&'a str> {
    match source {
        UserSource::Principal => principal.filter(|p| !p.is_empty()),
        UserSource::TrustedHeader(name) => {
            let found = crate::headers::spellings(headers, name);
            if found.count != 1 || !found.variants.is_empty() {
                return None;
            }
            let value = headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.trim())?;
            (!value.is_empty()).then_some(value)
        }
    }
}

/// The host could not give what the decision needs (the request headers, the verified
/// principal): `503 rate_limit_unavailable`, never forwarded unchecked; `reason` is logged and
/// counted (`rejected.rate_limit_unavailable.<reason>`), not sent.
pub fn host_failure(reason: &'static str) -> Rejection {
    Rejection::new(Code::RateLimitUnavailable).with_detail(reason)
}

/// Why one rule could not be evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleError {
    /// A user-keyed rule and no verified user (and `missing_user: reject`).
    NoUser,
    /// An IP-keyed rule and Envoy gave no usable client address.
    NoClientIp,
    /// The key's bucket holds only keys in debt.
    StoreFull,
    /// The shared store failed, stayed contended, or held bytes this code did not write.
    StoreUnavailable,
    /// The cluster-wide store (Redis through its bridge) did not answer usably.
    StateUnavailable,
}

impl RuleError {
    /// The rejection code (status, code string, default message: [`Code`]).
    pub fn rejection_code(self) -> Code {
        match self {
            RuleError::NoUser => Code::RateLimitUnauthenticated,
            RuleError::NoClientIp => Code::RateLimitClientUnknown,
            RuleError::StoreFull => Code::RateLimitStoreFull,
            RuleError::StoreUnavailable => Code::RateLimitUnavailable,
            RuleError::StateUnavailable => Code::StateUnavailable,
        }
    }

    pub fn rejection(self, rule: &str) -> Rejection {
        let message = match self {
            RuleError::NoUser => format!("rule `{rule}` limits per verified user and the request has none"),
            RuleError::NoClientIp => format!("rule `{rule}`: the client address is unknown"),
            RuleError::StoreFull => format!("rule `{rule}`: rate-limit table is full; refusing rather than forgetting"),
            RuleError::StoreUnavailable => format!("rule `{rule}`: rate-limit state is unavailable"),
            RuleError::StateUnavailable => format!(
                "rule `{rule}`: the cluster-wide rate-limit state is unavailable; refusing rather than forwarding unchecked"
            ),
        };
        Rejection::new(self.rejection_code()).with_message(message)
    }

    fn from_table(error: TableError) -> Self {
        match error {
            TableError::Full => RuleError::StoreFull,
            _ => RuleError::StoreUnavailable,
        }
    }

    pub const ALL: [RuleError; 5] = [
        RuleError::NoUser,
        RuleError::NoClientIp,
        RuleError::StoreFull,
        RuleError::StoreUnavailable,
        RuleError::StateUnavailable,
    ];

    pub fn code(self) -> &'static str {
        match self {
            RuleError::NoUser => "no_user",
            RuleError::NoClientIp => "no_client_ip",
            RuleError::StoreFull => "store_full",
            RuleError::StoreUnavailable => "store_unavailable",
            RuleError::StateUnavailable => "state_unavailable",
        }
    }
}

/// Something the plugin counts (`rule.<rule>.<what>`) and, except `Allowed`, logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Allowed {
        rule: String,
    },
    /// The rule refused the request (the request is rejected).
    Limited {
        rule: String,
        key: String,
        retry_after_ms: u64,
    },
    /// A report-only rule would have refused it.
    WouldLimit {
        rule: String,
        key: String,
        retry_after_ms: u64,
    },
    /// The rule could not be evaluated; `blocked` says whether that refused the request.
    Error {
        rule: String,
        error: RuleError,
        blocked: bool,
    },
}

/// The decision for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// `None`: forward the request.
    pub rejection: Option<Rejection>,
    /// RateLimit-Policy / RateLimit for the response of a forwarded request (when configured).
    pub response_headers: Vec<(String, String)>,
    pub events: Vec<Event>,
}

impl Decision {
    fn allow(events: Vec<Event>) -> Self {
        Decision { rejection: None, response_headers: Vec::new(), events }
    }
}

/// A rule with its resolved key for this request.
#[derive(Clone, Copy)]
struct Keyed<'a> {
    rule: &'a Rule,
    key: &'a str,
    hash: KeyHash,
}

fn rule_key(policy: &RateLimitPolicy, rule: &Rule, facts: &RequestFacts<'_>) -> Result<String, RuleError> {
    let ip = || {
        facts
            .client_ip
            .map(|ip| client::group(ip, policy.ipv4_prefix, policy.ipv6_prefix))
            .ok_or(RuleError::NoClientIp)
    };
    // Users from a trusted header can hold anything: quote them so log lines stay one field.
    // The key is written once, in place (no string per part).
    let user = facts.user.filter(|u| !u.is_empty());
    let plain = |u: &str| u.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'@'));
    let write_user = |key: &mut String, u: &str| {
        use std::fmt::Write;
        key.push_str("user=");
        if plain(u) {
            key.push_str(u);
        } else {
            let _ = write!(key, "{u:?}");
        }
    };
    let write_ip = |key: &mut String| -> Result<(), RuleError> {
        key.push_str("ip=");
        key.push_str(&ip()?);
        Ok(())
    };
    let mut key = String::with_capacity(8 + user.map_or(0, str::len) + if rule.key == KeyBy::User { 0 } else { 48 });
    match (rule.key, user, rule.missing_user) {
        (KeyBy::Ip, _, _) => write_ip(&mut key)?,
        (KeyBy::User, Some(user), _) => write_user(&mut key, user),
        (KeyBy::IpAndUser, Some(user), _) => {
            write_ip(&mut key)?;
            key.push(' ');
            write_user(&mut key, user);
        }
        (_, None, MissingUser::ByIp) => write_ip(&mut key)?,
        (_, None, MissingUser::Reject) => return Err(RuleError::NoUser),
    }
    Ok(key)
}

fn key_hash(policy: &RateLimitPolicy, rule: &Rule, key: &str) -> KeyHash {
    // The quota is part of the key: a changed quota starts from fresh records instead of
    // reading ticks of another scale.
    let q = rule.quota;
    let (r, p, b) = (q.requests.get().to_be_bytes(), q.period_ms.get().to_be_bytes(), q.burst.get().to_be_bytes());
    let quota = [r[0], r[1], r[2], r[3], p[0], p[1], p[2], p[3], b[0], b[1], b[2], b[3]];
    policy.key_hasher().of(&[policy.name.as_bytes(), rule.name.as_bytes(), &quota, key.as_bytes()])
}

/// Reads a key's outcome without writing.
fn peek(policy: &RateLimitPolicy, store: &dyn SharedStore, keyed: &Keyed<'_>, now_ms: u64) -> Result<Outcome, RuleError> {
    let record = policy.table.get(store, keyed.hash, now_ms).map_err(RuleError::from_table)?;
    let tat = match record {
        Some((payload, _, _)) => Some(gcra::decode_tat(&payload).ok_or(RuleError::StoreUnavailable)?),
        None => None,
    };
    Ok(keyed.rule.quota.decide(tat, now_ms))
}

/// Decides and, when admitted, records one request for one key, atomically.
fn commit(policy: &RateLimitPolicy, store: &dyn SharedStore, keyed: &Keyed<'_>, now_ms: u64) -> Result<Outcome, RuleError> {
    let quota = keyed.rule.quota;
    let (result, _) = policy
        .table
        .update(store, keyed.hash, now_ms, |current| {
            let tat = match current {
                Some(payload) => match gcra::decode_tat(payload) {
                    Some(tat) => Some(tat),
                    None => return Update::Keep(Err(RuleError::StoreUnavailable)),
                },
                None => None,
            };
            let outcome = quota.decide(tat, now_ms);
            if outcome.allowed {
                Update::Write {
                    payload: gcra::encode_tat(outcome.tat),
                    expires_at_ms: quota.expires_at_ms(outcome.tat),
                    result: Ok(outcome),
                }
            } else {
                Update::Keep(Ok(outcome))
            }
        })
        .map_err(RuleError::from_table)?;
    result
}

fn seconds_ceil(ms: u64) -> u64 {
    ms.div_ceil(1000)
}

/// `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers) for the given
/// rules and outcomes.
fn ratelimit_headers(items: &[(&Rule, Outcome)]) -> Vec<(String, String)> {
    if items.is_empty() {
        return Vec::new();
    }
    let policy = items.iter().map(|(rule, _)| rule.policy_item()).collect::<Vec<_>>().join(", ");
    let state = items
        .iter()
        .map(|(rule, o)| format!("\"{}\";r={};t={}", rule.name, o.remaining, seconds_ceil(o.reset_ms)))
        .collect::<Vec<_>>()
        .join(", ");
    vec![("ratelimit-policy".to_string(), policy), ("ratelimit".to_string(), state)]
}

fn limited(rule: &Rule, key: &str, outcome: &Outcome, items: &[(&Rule, Outcome)], events: Vec<Event>) -> Decision {
    let retry_after = seconds_ceil(outcome.retry_after_ms).max(1);
    let mut rejection = Rejection::new(Code::RateLimited)
        .with_message(format!("rate limit `{}` exceeded; retry in {retry_after} s", rule.name))
        .with_header("retry-after", retry_after.to_string());
    for (name, value) in ratelimit_headers(items) {
        rejection = rejection.with_header(name, value);
    }
    let mut events = events;
    events.push(Event::Limited { rule: rule.name.clone(), key: key.to_string(), retry_after_ms: outcome.retry_after_ms });
    Decision { rejection: Some(rejection), response_headers: Vec::new(), events }
}

/// A rule that applies to a request, with its resolved key. Owns its data (the rule is named by
/// its index in the policy) so a plan can wait for a remote answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedRule {
    pub index: usize,
    pub key: String,
    pub hash: KeyHash,
    pub report_only: bool,
}

/// What has to be decided for one request: the keyed rules (enforced ones first) and the
/// events of rules that could not be keyed but did not block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub rules: Vec<PlannedRule>,
    pub events: Vec<Event>,
}

/// Either the request is already decided (no rule applies, or a rule cannot be keyed and blocks),
/// or a [`Plan`] to evaluate against a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Planned {
    Decided(Decision),
    Evaluate(Plan),
}

/// Resolves which rules apply and what each counts against. Touches no state.
pub fn plan(policy: &RateLimitPolicy, facts: &RequestFacts<'_>) -> Planned {
    let mut events = Vec::new();
    let mut rules = Vec::new();
    for (index, rule) in policy.rules.iter().enumerate().filter(|(_, r)| r.applies_to(facts.method, facts.path)) {
        match rule_key(policy, rule, facts) {
            Ok(key) => {
                let hash = key_hash(policy, rule, &key);
                rules.push(PlannedRule { index, key, hash, report_only: rule.report_only() });
            }
            Err(error) => {
                let blocked = !rule.report_only() && !rule.fail_open;
                events.push(Event::Error { rule: rule.name.clone(), error, blocked });
                if blocked {
                    return Planned::Decided(Decision {
                        rejection: Some(error.rejection(&rule.name)),
                        response_headers: Vec::new(),
                        events,
                    });
                }
            }
        }
    }
    if rules.is_empty() {
        return Planned::Decided(Decision::allow(events));
    }
    // Enforced rules first: a request they refuse is never charged to a report-only rule.
    rules.sort_by_key(|r| r.report_only);
    Planned::Evaluate(Plan { rules, events })
}

/// Decides one request at `now_ms` against the instance-local store.
pub fn check(policy: &RateLimitPolicy, store: &dyn SharedStore, facts: &RequestFacts<'_>, now_ms: u64) -> Decision {
    match plan(policy, facts) {
        Planned::Decided(decision) => decision,
        Planned::Evaluate(plan) => check_planned(policy, store, plan, now_ms),
    }
}

/// Evaluates a plan against the instance-local store (the `local` backend).
pub fn check_planned(policy: &RateLimitPolicy, store: &dyn SharedStore, plan: Plan, now_ms: u64) -> Decision {
    let Plan { mut rules, mut events } = plan;
    // The plan's rules, borrowed (no second list).
    let keyed_of = |p: &PlannedRule| policy.rules.get(p.index).map(|rule| (rule, p.hash));

    // Several enforced rules: read them all first so that a refusal costs nothing elsewhere.
    let mut skipped: Vec<String> = Vec::new();
    let enforced =
        |rules: &[PlannedRule]| -> usize { rules.iter().filter_map(keyed_of).filter(|(rule, _)| !rule.report_only()).count() };
    if enforced(&rules) > 1 {
        let mut peeked: Vec<(&Rule, Outcome)> = Vec::new();
        let mut refusal: Option<(Keyed<'_>, Outcome)> = None;
        for p in &rules {
            let Some((rule, hash)) = keyed_of(p) else { continue };
            if rule.report_only() {
                continue;
            }
            let k = Keyed { rule, key: &p.key, hash };
            match peek(policy, store, &k, now_ms) {
                Ok(outcome) => {
                    peeked.push((k.rule, outcome));
                    // The most restrictive refusal: the one that lasts longest.
                    if !outcome.allowed && refusal.is_none_or(|(_, r)| outcome.retry_after_ms > r.retry_after_ms) {
                        refusal = Some((k, outcome));
                    }
                }
                Err(error) if k.rule.fail_open => {
                    events.push(Event::Error { rule: k.rule.name.clone(), error, blocked: false });
                    skipped.push(k.rule.name.clone());
                }
                Err(error) => {
                    events.push(Event::Error { rule: k.rule.name.clone(), error, blocked: true });
                    return Decision { rejection: Some(error.rejection(&k.rule.name)), response_headers: Vec::new(), events };
                }
            }
        }
        if let Some((k, outcome)) = refusal {
            return limited(k.rule, k.key, &outcome, &peeked, events);
        }
    }
    // A fail-open rule whose store already failed on the read is not tried (or counted) twice.
    if !skipped.is_empty() {
        rules.retain(|p| keyed_of(p).is_none_or(|(rule, _)| !skipped.contains(&rule.name)));
    }

    // The enforced rules that admitted the request, for the RateLimit headers: of the response
    // (when configured) or of a refusal by a later rule (none after the last one).
    let mut committed: Vec<(&Rule, Outcome)> = Vec::new();
    for (i, p) in rules.iter().enumerate() {
        let Some((rule, hash)) = keyed_of(p) else { continue };
        let k = Keyed { rule, key: &p.key, hash };
        let report_only = k.rule.report_only();
        let later = i + 1 < rules.len();
        match commit(policy, store, &k, now_ms) {
            Ok(outcome) if outcome.allowed => {
                events.push(Event::Allowed { rule: k.rule.name.clone() });
                if !report_only && (policy.response_headers || later) {
                    committed.push((k.rule, outcome));
                }
            }
            Ok(outcome) if report_only => events.push(Event::WouldLimit {
                rule: k.rule.name.clone(),
                key: k.key.to_string(),
                retry_after_ms: outcome.retry_after_ms,
            }),
            Ok(outcome) => {
                committed.push((k.rule, outcome));
                return limited(k.rule, k.key, &outcome, &committed, events);
            }
            Err(error) if report_only || k.rule.fail_open => {
                events.push(Event::Error { rule: k.rule.name.clone(), error, blocked: false })
            }
            Err(error) => {
                events.push(Event::Error { rule: k.rule.name.clone(), error, blocked: true });
                return Decision { rejection: Some(error.rejection(&k.rule.name)), response_headers: Vec::new(), events };
            }
        }
    }
    let response_headers = if policy.response_headers { ratelimit_headers(&committed) } else { Vec::new() };
    Decision { rejection: None, response_headers, events }
}
