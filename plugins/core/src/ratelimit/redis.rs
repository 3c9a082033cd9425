//! Rate-limit budgets on Redis (through webdis), shared by every Envoy instance that uses the
//! same Redis.
//!
//! - **Direct** (`state.backend: redis`, no `reconcile`): every request that a rule applies to is
//!   decided by ONE Lua script ([`MULTI_GCRA_SCRIPT`]) over the keys of every rule that applies:
//!   it reads all of them, and writes only if every enforced rule admits. No read-then-write race,
//!   between workers or between instances; the same decision semantics as the local backend (a
//!   refusal by one rule costs nothing in the others; report-only rules are charged only for
//!   requests the enforced ones admit), minus the local backend's benign race.
//! - **Reconciled** (`reconcile`): the same script takes up to `lease_tokens` of each key's
//!   budget at once; the instance spends them locally from shared data (one CAS per request, no
//!   round trip), and asks Redis again when they are spent or `lease_ms` after it took them.
//!   A key Redis refused is refused locally until its `Retry-After`.
//!
//! Time is Redis's own clock (`TIME`, microseconds), so instances share one time base. The
//! emission interval is `period / requests` rounded UP to a whole microsecond (towards admitting
//! less; at most 1 us per request, e.g. 3 per second admits 2,999,997 per 10^6 s instead of 3e6).
//!
//! Accuracy of the reconciled mode (tests: `lease_*` below, e2e
//! `test_reconciled_mode_stays_within_its_bound_across_two_instances`):
//! - It never admits more than Redis granted: over any long run at most
//!   `burst + rate * elapsed` cluster-wide, like the direct mode.
//! - A token is spent at most `lease_ms` after Redis granted it, so in ANY interval of length `d`
//!   at most `burst + rate * (d + lease_ms)` requests are admitted (the direct mode: `d`).
//! - Leased tokens an instance does not spend lapse after `lease_ms` (never returned): at most
//!   `instances * (lease_tokens - 1)` tokens per key per `lease_ms` are lost, so the cluster can
//!   under-admit by that much (e.g. a burst of 10, lease 3, two instances: 6 to 10 of the first
//!   10 requests are admitted, depending on how they spread over the instances).

use crate::remote::{self, FailureMode, RedisConfig, RemoteError, Reply};
use crate::store::{SharedStore, Update};

use super::gcra::{Outcome, Quota};
use super::{limited, ratelimit_headers, Decision, Event, Plan, RateLimitPolicy, Rule, RuleError};

/// Multi-key GCRA with leases, on Redis's clock (microseconds).
///
/// KEYS: one per rule, enforced rules first. ARGV: `enforced` (how many of KEYS are enforced),
/// `lease` (tokens to take per key, >= 1), then per key its emission interval and its horizon
/// (`burst * interval`), in microseconds. For each key `avail = floor((horizon - (tat - now)) /
/// interval)` requests could be admitted now. If any enforced key has none, nothing is written.
/// Otherwise each enforced key takes `min(lease, avail)`, and each report-only key that has any
/// does the same. Returns per key `{taken, remaining, reset_ms, retry_after_ms}`. A stored value
/// that is not a number is an error (never read as a fresh key).
pub const MULTI_GCRA_SCRIPT: &str = "local t = redis.call('TIME') \
local now = tonumber(t[1]) * 1000000 + tonumber(t[2]) \
local enforced = tonumber(ARGV[1]) local lease = tonumber(ARGV[2]) \
local n = #KEYS local tat, iv, hz = {}, {}, {} \
for i = 1, n do \
iv[i] = tonumber(ARGV[1 + 2 * i]) hz[i] = tonumber(ARGV[2 + 2 * i]) \
local v = redis.call('GET', KEYS[i]) \
if v then v = tonumber(v) if not v then return redis.error_reply('firebreak: foreign rate-limit record') end else v = 0 end \
if v < now then v = now end tat[i] = v end \
local function avail(i) return math.floor((hz[i] - (tat[i] - now)) / iv[i]) end \
local refused = false \
for i = 1, enforced do if avail(i) < 1 then refused = true end end \
local out = {} \
for i = 1, n do \
local take = 0 \
if not refused then local a = avail(i) if a >= 1 then take = math.min(lease, a) end end \
if take > 0 then tat[i] = tat[i] + take * iv[i] \
redis.call('SET', KEYS[i], string.format('%d', tat[i]), 'PX', math.ceil((tat[i] - now) / 1000) + 1) end \
local debt = tat[i] - now local rem = avail(i) if rem < 0 then rem = 0 end \
local retry = 0 if rem < 1 then retry = math.ceil((debt + iv[i] - hz[i]) / 1000) end \
out[#out + 1] = take out[#out + 1] = rem out[#out + 1] = math.ceil(debt / 1000) out[#out + 1] = retry end \
return out";

/// A quota in Redis's microseconds: (emission interval rounded up, horizon).
pub fn micros(quota: &Quota) -> (u64, u64) {
    let interval = (u64::from(quota.period_ms.get()) * 1000).div_ceil(u64::from(quota.requests.get()));
    (interval, interval.saturating_mul(u64::from(quota.burst.get())))
}

/// The Redis key of one planned rule.
pub fn redis_key(redis: &RedisConfig, hash: crate::store::KeyHash) -> String {
    redis.key("rl", hash)
}

/// The webdis command that decides `plan` (taking `lease` tokens per admitted key).
pub fn command(policy: &RateLimitPolicy, plan: &Plan, redis: &RedisConfig, lease: u32) -> Vec<u8> {
    let mut keys = Vec::new();
    let mut args = Vec::new();
    let mut enforced = 0usize;
    for planned in &plan.rules {
        let Some(rule) = policy.rules.get(planned.index) else { continue };
        if !planned.report_only {
            enforced += 1;
        }
        keys.push(redis_key(redis, planned.hash));
        let (interval, horizon) = micros(&rule.quota);
        args.push(interval.to_string());
        args.push(horizon.to_string());
    }
    let count = keys.len().to_string();
    let enforced = enforced.to_string();
    let lease = lease.max(1).to_string();
    let mut parts: Vec<&[u8]> = vec![b"EVAL", MULTI_GCRA_SCRIPT.as_bytes(), count.as_bytes()];
    parts.extend(keys.iter().map(|k| k.as_bytes()));
    parts.push(enforced.as_bytes());
    parts.push(lease.as_bytes());
    parts.extend(args.iter().map(|a| a.as_bytes()));
    remote::webdis_command(&parts)
}

/// What the script answered for one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Tokens taken (0: refused, or not evaluated because an enforced rule refused).
    pub taken: u32,
    pub remaining: u32,
    pub reset_ms: u64,
    pub retry_after_ms: u64,
}

/// Parses the script's reply for a plan of `rules` keys.
pub fn parse_grants(reply: &Reply, rules: usize) -> Result<Vec<Grant>, RemoteError> {
    let Reply::Array(items) = reply else {
        return Err(RemoteError::Malformed(format!("unexpected rate-limit reply: {reply:?}")));
    };
    if items.len() != rules * 4 {
        return Err(RemoteError::Malformed(format!("{} values for {rules} keys", items.len())));
    }
    let number = |item: &Reply| match item {
        Reply::Integer(v) => u64::try_from(*v).map_err(|_| RemoteError::Malformed("negative value".into())),
        other => Err(RemoteError::Malformed(format!("not an integer: {other:?}"))),
    };
    items
        .chunks(4)
        .map(|chunk| match chunk {
            [taken, remaining, reset, retry] => Ok(Grant {
                taken: u32::try_from(number(taken)?).unwrap_or(u32::MAX),
                remaining: u32::try_from(number(remaining)?).unwrap_or(u32::MAX),
                reset_ms: number(reset)?,
                retry_after_ms: number(retry)?,
            }),
            _ => Err(RemoteError::Malformed("short reply".into())),
        })
        .collect()
}

fn outcome(grant: &Grant) -> Outcome {
    Outcome {
        allowed: grant.taken > 0,
        tat: 0,
        remaining: grant.remaining,
        reset_ms: grant.reset_ms,
        retry_after_ms: grant.retry_after_ms,
    }
}

/// Decides a plan from the script's answer, or from its failure (`failure_mode`: the state's;
/// a rule's own `fail_open` also lets it pass). Every rule that applied gets an event.
pub fn decide(
    policy: &RateLimitPolicy,
    plan: Plan,
    result: Result<Vec<Grant>, RemoteError>,
    failure_mode: FailureMode,
) -> Decision {
    let Plan { rules, mut events } = plan;
    let resolved: Vec<(&Rule, String, bool)> = rules
        .into_iter()
        .filter_map(|p| policy.rules.get(p.index).map(|rule| (rule, p.key, p.report_only)))
        .collect();
    let grants = match result {
        Ok(grants) if grants.len() == resolved.len() => grants,
        _ => {
            let mut blocking: Option<&Rule> = None;
            for (rule, _, report_only) in &resolved {
                let blocked = !report_only && !rule.fail_open && failure_mode == FailureMode::Closed;
                events.push(Event::Error { rule: rule.name.clone(), error: RuleError::StateUnavailable, blocked });
                if blocked && blocking.is_none() {
                    blocking = Some(rule);
                }
            }
            return match blocking {
                Some(rule) => Decision {
                    rejection: Some(RuleError::StateUnavailable.rejection(&rule.name)),
                    response_headers: Vec::new(),
                    events,
                },
                None => Decision::allow(events),
            };
        }
    };
    let enforced: Vec<(&Rule, &str, Outcome)> = resolved
        .iter()
        .zip(&grants)
        .filter(|((_, _, report_only), _)| !report_only)
        .map(|((rule, key, _), grant)| (*rule, key.as_str(), outcome(grant)))
        .collect();
    let items: Vec<(&Rule, Outcome)> = enforced.iter().map(|(rule, _, o)| (*rule, *o)).collect();
    // The most restrictive refusal: the one that lasts longest.
    let refusal = enforced
        .iter()
        .filter(|(_, _, o)| !o.allowed)
        .max_by_key(|(_, _, o)| o.retry_after_ms);
    if let Some((rule, key, o)) = refusal {
        return limited(rule, key, o, &items, events);
    }
    for ((rule, key, report_only), grant) in resolved.iter().zip(&grants) {
        if !report_only || grant.taken > 0 {
            events.push(Event::Allowed { rule: rule.name.clone() });
        } else {
            events.push(Event::WouldLimit {
                rule: rule.name.clone(),
                key: key.clone(),
                retry_after_ms: grant.retry_after_ms,
            });
        }
    }
    let response_headers = if policy.response_headers { ratelimit_headers(&items) } else { Vec::new() };
    Decision { rejection: None, response_headers, events }
}

/// A key's local lease: `tokens` still to spend until `until_ms`; `tokens == 0` means Redis
/// refused the key and it is refused locally until `until_ms` (its Retry-After).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub tokens: u32,
    pub until_ms: u64,
    /// When the key's whole burst is available again, as Redis said when it granted the lease.
    pub reset_at_ms: u64,
}

impl Lease {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(20);
        out.extend_from_slice(&self.tokens.to_be_bytes());
        out.extend_from_slice(&self.until_ms.to_be_bytes());
        out.extend_from_slice(&self.reset_at_ms.to_be_bytes());
        out
    }

    /// `None` for bytes this code did not write.
    pub fn decode(bytes: &[u8]) -> Option<Lease> {
        let tokens: [u8; 4] = bytes.get(0..4)?.try_into().ok()?;
        let until: [u8; 8] = bytes.get(4..12)?.try_into().ok()?;
        let reset: [u8; 8] = bytes.get(12..20)?.try_into().ok()?;
        if bytes.len() != 20 {
            return None;
        }
        Some(Lease {
            tokens: u32::from_be_bytes(tokens),
            until_ms: u64::from_be_bytes(until),
            reset_at_ms: u64::from_be_bytes(reset),
        })
    }

    fn outcome(&self, now_ms: u64) -> Outcome {
        let left = self.until_ms.saturating_sub(now_ms);
        Outcome {
            allowed: self.tokens > 0,
            tat: 0,
            remaining: self.tokens.saturating_sub(1),
            reset_ms: self.reset_at_ms.saturating_sub(now_ms).max(if self.tokens == 0 { left } else { 0 }),
            retry_after_ms: if self.tokens == 0 { left } else { 0 },
        }
    }
}

/// What the local leases decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseStep {
    /// Decided without Redis.
    Decided(Decision),
    /// Some key has no usable lease: ask Redis (take new leases) with this plan.
    Remote(Plan),
}

/// Reconciled mode, first step: decide from the instance's leases when every rule has one.
/// Spending is a CAS on shared data, so workers never spend one token twice. A lease that
/// cannot be read is treated as absent (Redis decides).
pub fn spend_leases(policy: &RateLimitPolicy, store: &dyn SharedStore, plan: Plan, now_ms: u64) -> LeaseStep {
    let leases: Vec<Option<Lease>> = plan
        .rules
        .iter()
        .map(|p| match policy.lease_table.get(store, p.hash, now_ms) {
            Ok(Some((payload, _, _))) => Lease::decode(&payload).filter(|l| l.until_ms > now_ms),
            _ => None,
        })
        .collect();
    let resolved: Vec<(&Rule, &super::PlannedRule, Option<Lease>)> = plan
        .rules
        .iter()
        .zip(&leases)
        .filter_map(|(p, l)| policy.rules.get(p.index).map(|rule| (rule, p, *l)))
        .collect();
    // A key Redis refused stays refused locally until its Retry-After.
    let enforced_refusal = resolved
        .iter()
        .filter(|(_, p, l)| !p.report_only && matches!(l, Some(lease) if lease.tokens == 0))
        .max_by_key(|(_, _, l)| l.map_or(0, |l| l.until_ms));
    if let Some((rule, p, Some(lease))) = enforced_refusal {
        let items: Vec<(&Rule, Outcome)> = resolved
            .iter()
            .filter(|(_, p, _)| !p.report_only)
            .filter_map(|(r, _, l)| l.map(|l| (*r, l.outcome(now_ms))))
            .collect();
        return LeaseStep::Decided(limited(rule, &p.key, &lease.outcome(now_ms), &items, plan.events.clone()));
    }
    if resolved.iter().any(|(_, _, l)| l.is_none()) {
        return LeaseStep::Remote(plan);
    }
    let mut events = plan.events.clone();
    let mut items: Vec<(&Rule, Outcome)> = Vec::new();
    for (rule, p, lease) in &resolved {
        let Some(lease) = lease else { return LeaseStep::Remote(plan) };
        if lease.tokens == 0 {
            // Only report-only rules reach here with a refusal.
            events.push(Event::WouldLimit {
                rule: rule.name.clone(),
                key: p.key.clone(),
                retry_after_ms: lease.until_ms.saturating_sub(now_ms),
            });
            continue;
        }
        let spent = policy.lease_table.update(store, p.hash, now_ms, |current| {
            match current.and_then(Lease::decode).filter(|l| l.tokens > 0 && l.until_ms > now_ms) {
                Some(l) => {
                    // The last token spent ends the lease (expired now: the next request asks
                    // Redis); a lease of 0 tokens would read as a refusal.
                    let until_ms = if l.tokens > 1 { l.until_ms } else { now_ms };
                    let after = Lease { tokens: l.tokens - 1, until_ms, ..l };
                    Update::Write { payload: after.encode(), expires_at_ms: until_ms, result: Some(l) }
                }
                None => Update::Keep(None),
            }
        });
        match spent {
            Ok((Some(before), _)) => {
                events.push(Event::Allowed { rule: rule.name.clone() });
                if !p.report_only {
                    items.push((rule, before.outcome(now_ms)));
                }
            }
            // Another worker spent the last token (or the store failed): Redis decides. Tokens
            // this request already took from earlier rules lapse (towards refusing).
            _ => return LeaseStep::Remote(plan),
        }
    }
    let response_headers = if policy.response_headers { ratelimit_headers(&items) } else { Vec::new() };
    LeaseStep::Decided(Decision { rejection: None, response_headers, events })
}

/// Reconciled mode, after Redis answered: keeps what this request did not spend as the keys'
/// leases (added to any lease another worker stored meanwhile), and remembers refusals until
/// their Retry-After. Returns the grants as the request sees them (the unspent lease counts as
/// remaining). A lease that cannot be stored lapses (towards refusing).
pub fn store_leases(
    policy: &RateLimitPolicy,
    store: &dyn SharedStore,
    plan: &Plan,
    grants: &[Grant],
    lease_ms: u32,
    now_ms: u64,
) -> Vec<Grant> {
    let until_ms = now_ms.saturating_add(u64::from(lease_ms));
    let mut seen = Vec::new();
    for (p, grant) in plan.rules.iter().zip(grants) {
        let reset_at_ms = now_ms.saturating_add(grant.reset_ms);
        let unspent = grant.taken.saturating_sub(1);
        let _ = policy.lease_table.update(store, p.hash, now_ms, |current| {
            let current = current.and_then(Lease::decode).filter(|l| l.until_ms > now_ms);
            let held = current.map_or(0, |l| l.tokens);
            if grant.taken > 0 && unspent + held > 0 {
                let lease = Lease { tokens: unspent.saturating_add(held), until_ms, reset_at_ms };
                Update::Write { payload: lease.encode(), expires_at_ms: until_ms, result: () }
            } else if grant.taken == 0 && grant.retry_after_ms > 0 && held == 0 {
                let until = now_ms.saturating_add(grant.retry_after_ms);
                let lease = Lease { tokens: 0, until_ms: until, reset_at_ms };
                Update::Write { payload: lease.encode(), expires_at_ms: until, result: () }
            } else {
                Update::Keep(())
            }
        });
        seen.push(Grant { remaining: grant.remaining.saturating_add(unspent), ..*grant });
    }
    seen
}
