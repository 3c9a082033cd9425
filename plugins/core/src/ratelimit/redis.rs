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
//! Lua numbers are doubles: exact to the microsecond while `now + burst * interval` stays below
//! 2^53 us (any quota whose refill time `burst * per_seconds / requests` is under ~200 years
//! from 2026); beyond that the arithmetic rounds to a few microseconds.
//!
//! The leases of the reconciled mode live in [`super::lease`]. Accuracy of the reconciled mode
//! (tests: `lease_*` below, e2e
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
pub const MULTI_GCRA_SCRIPT: &str = include_str!("multi_gcra.lua");

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
    let enforced = enforced.to_string();
    let lease = lease.max(1).to_string();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let mut argv: Vec<&str> = vec![&enforced, &lease];
    argv.extend(args.iter().map(String::as_str));
    remote::script_command(MULTI_GCRA_SCRIPT, &keys, &argv)
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
    let refusal = enforced.iter().filter(|(_, _, o)| !o.allowed).max_by_key(|(_, _, o)| o.retry_after_ms);
    if let Some((rule, key, o)) = refusal {
        return limited(rule, key, o, &items, events);
    }
    for ((rule, key, report_only), grant) in resolved.iter().zip(&grants) {
        if !report_only || grant.taken > 0 {
            events.push(Event::Allowed { rule: rule.name.clone() });
        } else {
            events.push(Event::WouldLimit { rule: rule.name.clone(), key: key.clone(), retry_after_ms: grant.retry_after_ms });
        }
    }
    let response_headers = if policy.response_headers { ratelimit_headers(&items) } else { Vec::new() };
    Decision { rejection: None, response_headers, events }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::ratelimit::lease::{spend_leases, store_leases, Lease, LeaseStep};
    use crate::ratelimit::{check, plan, Planned, RequestFacts};
    use crate::remote::Backend;
    use crate::store::{KeyHash, MemoryStore, Update};

    const T0: u64 = 1_700_000_000_000;

    fn rule(name: &str, requests: u32, per_seconds: u32, burst: u32, extra: &str) -> String {
        format!(
            r#"{{"name":"{name}","routes":[{{"methods":["POST"],"path_prefix":"/v1/"}}],"key":"user","requests":{requests},"per_seconds":{per_seconds},"burst":{burst}{extra}}}"#
        )
    }

    fn policy(rules: &[String], extra: &str) -> RateLimitPolicy {
        let json = format!(
            r#"{{"name":"p","rules":[{}],"state":{{"backend":"redis","cluster":"bridge","key_prefix":"t"}}{extra}}}"#,
            rules.join(",")
        );
        RateLimitPolicy::from_json(json.as_bytes()).unwrap()
    }

    fn redis(p: &RateLimitPolicy) -> RedisConfig {
        match &p.state {
            Backend::Redis(r) => r.clone(),
            Backend::Local => panic!("local"),
        }
    }

    fn plan_for(p: &RateLimitPolicy, user: &str) -> Plan {
        let facts = RequestFacts { method: "POST", path: "/v1/transfers", client_ip: None, user: Some(user) };
        match plan(p, &facts) {
            Planned::Evaluate(plan) => plan,
            Planned::Decided(d) => panic!("decided without state: {d:?}"),
        }
    }

    /// [`MULTI_GCRA_SCRIPT`] in Rust, on a fake Redis clock (microseconds): the reference the
    /// lease accounting is tested against (the script itself runs in the end-to-end tests).
    #[derive(Default)]
    struct FakeRedis {
        tat: HashMap<String, i128>,
        calls: usize,
    }

    impl FakeRedis {
        fn eval(&mut self, p: &RateLimitPolicy, plan: &Plan, lease: u32, now_ms: u64) -> Vec<Grant> {
            self.calls += 1;
            let now = i128::from(now_ms) * 1000;
            let keys: Vec<(KeyHash, bool, i128, i128)> = plan
                .rules
                .iter()
                .map(|r| {
                    let (iv, hz) = micros(&p.rules[r.index].quota);
                    (r.hash, r.report_only, i128::from(iv), i128::from(hz))
                })
                .collect();
            let mut tat: Vec<i128> = keys.iter().map(|k| self.tat.get(&k.0.to_hex()).copied().unwrap_or(0).max(now)).collect();
            let avail = |tat: i128, iv: i128, hz: i128| (hz - (tat - now)).div_euclid(iv);
            let refused = keys.iter().zip(&tat).any(|(k, t)| !k.1 && avail(*t, k.2, k.3) < 1);
            let mut out = Vec::new();
            for (i, (hash, _, iv, hz)) in keys.iter().enumerate() {
                let mut take = 0;
                if !refused {
                    let a = avail(tat[i], *iv, *hz);
                    if a >= 1 {
                        take = a.min(i128::from(lease));
                    }
                }
                if take > 0 {
                    tat[i] += take * iv;
                    self.tat.insert(hash.to_hex(), tat[i]);
                }
                let debt = tat[i] - now;
                let rem = avail(tat[i], *iv, *hz).max(0);
                let retry = if rem < 1 { (debt + iv - hz + 999).div_euclid(1000) } else { 0 };
                out.push(Grant {
                    taken: take as u32,
                    remaining: rem as u32,
                    reset_ms: ((debt + 999).div_euclid(1000)) as u64,
                    retry_after_ms: retry as u64,
                });
            }
            out
        }
    }

    /// One Envoy instance in reconciled mode: its own shared data, Redis in common.
    fn leased_request(p: &RateLimitPolicy, store: &MemoryStore, redis: &mut FakeRedis, user: &str, now: u64) -> bool {
        let reconcile = p.reconcile.unwrap();
        match spend_leases(p, store, plan_for(p, user), now) {
            LeaseStep::Decided(d) => d.rejection.is_none(),
            LeaseStep::Remote(plan) => {
                let grants = redis.eval(p, &plan, reconcile.lease_tokens.get(), now);
                let seen = store_leases(p, store, &plan, &grants, reconcile.lease_ms.get(), now);
                decide(p, plan, Ok(seen), FailureMode::Closed).rejection.is_none()
            }
        }
    }

    fn direct_request(p: &RateLimitPolicy, redis: &mut FakeRedis, user: &str, now: u64) -> Decision {
        let plan = plan_for(p, user);
        let grants = redis.eval(p, &plan, 1, now);
        decide(p, plan, Ok(grants), FailureMode::Closed)
    }

    #[test]
    fn state_and_reconcile_configuration() {
        let p = policy(&[rule("r", 1, 60, 5, "")], r#","reconcile":{"lease_tokens":4,"lease_ms":500}"#);
        assert_eq!(redis(&p).cluster, "bridge");
        assert_eq!(p.reconcile.map(|r| (r.lease_tokens.get(), r.lease_ms.get())), Some((4, 500)));
        let local =
            RateLimitPolicy::from_json(format!(r#"{{"name":"p","rules":[{}]}}"#, rule("r", 1, 60, 5, "")).as_bytes()).unwrap();
        assert_eq!((local.state, local.reconcile), (Backend::Local, None));
        let r = rule("r", 1, 60, 5, "");
        for (json, field) in [
            (format!(r#"{{"name":"p","rules":[{r}],"reconcile":{{"lease_tokens":4,"lease_ms":500}}}}"#), "reconcile"),
            (format!(r#"{{"name":"p","rules":[{r}],"state":{{"backend":"redis"}}}}"#), "state.cluster"),
            (format!(r#"{{"name":"p","rules":[{r}],"state":{{"backend":"etcd"}}}}"#), "state.backend"),
            (
                format!(
                    r#"{{"name":"p","rules":[{r}],"state":{{"backend":"redis","cluster":"c"}},"reconcile":{{"lease_tokens":0,"lease_ms":500}}}}"#
                ),
                "reconcile.lease_tokens",
            ),
            (
                format!(
                    r#"{{"name":"p","rules":[{r}],"state":{{"backend":"redis","cluster":"c"}},"reconcile":{{"lease_tokens":10001,"lease_ms":500}}}}"#
                ),
                "reconcile.lease_tokens",
            ),
            (
                format!(
                    r#"{{"name":"p","rules":[{r}],"state":{{"backend":"redis","cluster":"c"}},"reconcile":{{"lease_tokens":3}}}}"#
                ),
                "reconcile.lease_ms",
            ),
            (
                format!(
                    r#"{{"name":"p","rules":[{r}],"state":{{"backend":"redis","cluster":"c"}},"reconcile":{{"lease_tokens":3,"lease_ms":60001}}}}"#
                ),
                "reconcile.lease_ms",
            ),
        ] {
            assert_eq!(RateLimitPolicy::from_json(json.as_bytes()).unwrap_err().field, field, "{json}");
        }
        let e = RateLimitPolicy::from_json(
            format!(r#"{{"name":"p","rules":[{r}],"state":{{"backend":"redis","cluster":"c"}},"reconcile":{{"lease_tokens":3,"lease_ms":5,"x":1}}}}"#).as_bytes(),
        )
        .unwrap_err();
        assert!(e.message.contains('x'), "{e}");
    }

    #[test]
    fn intervals_round_up_to_whole_microseconds() {
        let p = policy(&[rule("a", 3, 1, 2, ""), rule("b", 10, 60, 5, "")], "");
        assert_eq!(micros(&p.rules[0].quota), (333_334, 666_668));
        assert_eq!(micros(&p.rules[1].quota), (6_000_000, 30_000_000));
    }

    #[test]
    fn one_command_carries_every_key_enforced_first() {
        let p =
            policy(&[rule("shadow", 1, 60, 5, r#","mode":"report_only""#), rule("a", 1, 60, 5, ""), rule("b", 2, 1, 3, "")], "");
        let plan = plan_for(&p, "alice");
        assert_eq!(plan.rules.iter().map(|r| r.report_only).collect::<Vec<_>>(), [false, false, true]);
        let cmd = String::from_utf8(command(&p, &plan, &redis(&p), 1)).unwrap();
        assert!(cmd.starts_with("EVALSHA/404cbd490400f225358fc704188292560e5dbf5d/3/"), "{cmd}");
        let eval = String::from_utf8(crate::remote::eval_fallback(cmd.as_bytes()).unwrap()).unwrap();
        assert!(eval.starts_with("EVAL/local%20t%20%3D%20redis.call"), "{eval}");
        let tail: Vec<&str> = cmd.rsplit('/').take(12).collect::<Vec<_>>().into_iter().rev().collect();
        let keys: Vec<String> = plan.rules.iter().map(|r| format!("t:rl:{}", r.hash.to_hex())).collect();
        assert_eq!(tail[0], "3", "{cmd}");
        assert_eq!(&tail[1..4], keys.iter().map(String::as_str).collect::<Vec<_>>().as_slice());
        // 2 enforced, lease 1, then (interval, horizon) per key in microseconds.
        assert_eq!(&tail[4..], ["2", "1", "60000000", "300000000", "500000", "1500000", "60000000", "300000000"]);
        assert!(String::from_utf8(command(&p, &plan, &redis(&p), 7)).unwrap().contains("/2/7/60000000/"));
    }

    #[test]
    fn grants_parse_and_anything_else_is_an_error() {
        let ints = |v: &[i64]| Reply::Array(v.iter().map(|i| Reply::Integer(*i)).collect());
        assert_eq!(
            parse_grants(&ints(&[1, 4, 12000, 0, 0, 0, 3, 2500]), 2),
            Ok(vec![
                Grant { taken: 1, remaining: 4, reset_ms: 12000, retry_after_ms: 0 },
                Grant { taken: 0, remaining: 0, reset_ms: 3, retry_after_ms: 2500 }
            ])
        );
        assert!(parse_grants(&ints(&[1, 4, 12000, 0]), 2).is_err(), "one key short");
        assert!(parse_grants(&ints(&[1, 4, 12000, 0, 1]), 1).is_err());
        assert!(parse_grants(&ints(&[1, -4, 12000, 0]), 1).is_err());
        assert!(parse_grants(
            &Reply::Array(vec![Reply::Integer(1), Reply::Text("4".into()), Reply::Integer(1), Reply::Integer(0)]),
            1
        )
        .is_err());
        assert!(parse_grants(&Reply::Nil, 1).is_err());
        assert!(parse_grants(&Reply::Integer(1), 1).is_err());
    }

    #[test]
    fn the_redis_backend_decides_like_the_local_one() {
        // Same rules, same request sequence: the local backend and the script agree on every
        // admission, refusal and header (the clock is whole seconds, so rounding cannot differ).
        let rules =
            [rule("narrow", 1, 10, 2, ""), rule("wide", 1, 10, 5, ""), rule("shadow", 1, 10, 3, r#","mode":"report_only""#)];
        let remote_p = policy(&rules, r#","response_headers":true"#);
        let local_p = RateLimitPolicy::from_json(
            format!(r#"{{"name":"p","response_headers":true,"rules":[{}]}}"#, rules.join(",")).as_bytes(),
        )
        .unwrap();
        let store = MemoryStore::default();
        let mut fake = FakeRedis::default();
        let facts = RequestFacts { method: "POST", path: "/v1/transfers", client_ip: None, user: Some("alice") };
        for step in 0..40u64 {
            let now = T0 + step * 3000;
            let local = check(&local_p, &store, &facts, now);
            let remote = direct_request(&remote_p, &mut fake, "alice", now);
            assert_eq!(local.rejection.is_none(), remote.rejection.is_none(), "step {step}");
            assert_eq!(local.events, remote.events, "step {step}");
            assert_eq!(local.response_headers, remote.response_headers, "step {step}");
            if let (Some(l), Some(r)) = (&local.rejection, &remote.rejection) {
                assert_eq!((l.status, l.code, &l.message), (r.status, r.code, &r.message), "step {step}");
                let header = |rej: &crate::Rejection, name: &str| {
                    rej.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone()).unwrap()
                };
                assert_eq!(header(l, "retry-after"), header(r, "retry-after"), "step {step}");
                assert_eq!(header(l, "ratelimit-policy"), header(r, "ratelimit-policy"), "step {step}");
                // The refusing rule's state is the same. (The other rules: the local backend
                // reports them as if admitted, Redis as they are, since nothing was charged.)
                let first = |v: String| v.split(", ").find(|i| i.contains("r=0")).map(str::to_string);
                assert_eq!(first(header(l, "ratelimit")), first(header(r, "ratelimit")), "step {step}");
            }
        }
    }

    #[test]
    fn an_unreachable_store_fails_closed_unless_configured_open() {
        let p = policy(&[rule("money", 1, 60, 5, ""), rule("shadow", 1, 60, 5, r#","mode":"report_only""#)], "");
        let down = || Err(RemoteError::Unreachable("no answer".into()));
        let d = decide(&p, plan_for(&p, "alice"), down(), FailureMode::Closed);
        let r = d.rejection.expect("fails closed");
        assert_eq!((r.status, r.code), (503, "state_unavailable"));
        assert_eq!(
            d.events,
            [
                Event::Error { rule: "money".into(), error: RuleError::StateUnavailable, blocked: true },
                Event::Error { rule: "shadow".into(), error: RuleError::StateUnavailable, blocked: false },
            ]
        );
        // A reply that does not fit the plan is no answer either.
        let d = decide(
            &p,
            plan_for(&p, "alice"),
            Ok(vec![Grant { taken: 1, remaining: 0, reset_ms: 0, retry_after_ms: 0 }]),
            FailureMode::Closed,
        );
        assert_eq!(d.rejection.map(|r| r.code), Some("state_unavailable"));
        // The state's failure_mode: open passes every rule, with the events to count and log.
        let d = decide(&p, plan_for(&p, "alice"), down(), FailureMode::Open);
        assert!(d.rejection.is_none());
        assert!(d.events.iter().all(|e| matches!(e, Event::Error { blocked: false, .. })));
        // A rule's own fail_open passes only that rule.
        let p = policy(&[rule("reads", 1, 60, 5, r#","fail_open":true"#), rule("money", 1, 60, 5, "")], "");
        let d = decide(&p, plan_for(&p, "alice"), down(), FailureMode::Closed);
        assert_eq!(d.rejection.map(|r| r.message.contains("`money`")), Some(true));
        let p = policy(&[rule("reads", 1, 60, 5, r#","fail_open":true"#)], "");
        assert!(decide(&p, plan_for(&p, "alice"), down(), FailureMode::Closed).rejection.is_none());
    }

    #[test]
    fn leases_never_admit_more_than_the_burst_across_instances() {
        // Burst 10, lease 3, no refill within the test, two instances taking turns in pairs.
        let p = policy(&[rule("r", 1, 3600, 10, "")], r#","reconcile":{"lease_tokens":3,"lease_ms":60000}"#);
        let (a, b) = (MemoryStore::default(), MemoryStore::default());
        let mut fake = FakeRedis::default();
        let admitted: Vec<bool> = (0..30u64)
            .map(|i| leased_request(&p, if (i / 2) % 2 == 0 { &a } else { &b }, &mut fake, "alice", T0 + i))
            .collect();
        assert_eq!(admitted.iter().filter(|x| **x).count(), 10);
        assert!(admitted[..10].iter().all(|x| *x) && admitted[10..].iter().all(|x| !x));
        // 6 round trips for 30 requests: leases, the last token, then each instance's refusal
        // is remembered until its Retry-After.
        assert_eq!(fake.calls, 6);
        // Another user is not affected by alice's leases.
        assert!(leased_request(&p, &a, &mut fake, "bob", T0 + 40));
    }

    #[test]
    fn stranded_leases_under_admit_by_at_most_instances_times_lease_minus_one() {
        // Instance a takes a lease of 4 and spends 1; b then gets what is left.
        let p = policy(&[rule("r", 1, 3600, 10, "")], r#","reconcile":{"lease_tokens":4,"lease_ms":60000}"#);
        let (a, b) = (MemoryStore::default(), MemoryStore::default());
        let mut fake = FakeRedis::default();
        assert!(leased_request(&p, &a, &mut fake, "alice", T0));
        let on_b = (0..20).filter(|i| leased_request(&p, &b, &mut fake, "alice", T0 + 1 + i)).count();
        // b took 4 + 2 of Redis's remaining 6; a's 3 unspent tokens are stranded on a.
        assert_eq!(on_b, 6);
        assert!(1 + on_b >= 10 - 2 * (4 - 1));
        // They are still a's to spend, and no more.
        let on_a = (0..10).filter(|i| leased_request(&p, &a, &mut fake, "alice", T0 + 30 + i)).count();
        assert_eq!(1 + on_b + on_a, 10);
    }

    #[test]
    fn leases_bound_any_window_by_burst_plus_rate_times_window_plus_lease() {
        // 10 per second, burst 5, leases of 4 for 300 ms; three instances offered 20/s each for
        // ten simulated minutes.
        let p = policy(&[rule("r", 10, 1, 5, "")], r#","reconcile":{"lease_tokens":4,"lease_ms":300}"#);
        let stores = [MemoryStore::default(), MemoryStore::default(), MemoryStore::default()];
        let mut fake = FakeRedis::default();
        let mut times = Vec::new();
        let total_ms = 600_000u64;
        for step in 0..(total_ms / 50) {
            for (i, store) in stores.iter().enumerate() {
                let now = T0 + step * 50 + i as u64 * 17;
                if leased_request(&p, store, &mut fake, "alice", now) {
                    times.push(now);
                }
            }
        }
        let admitted = times.len() as u64;
        let ceiling = 5 + 10 * total_ms / 1000;
        assert!(admitted <= ceiling, "{admitted} > {ceiling}");
        // Lapsed leases: at most instances * (lease - 1) per lease period.
        let floor = ceiling.saturating_sub(3 * 3 * (total_ms / 300 + 1));
        assert!(admitted >= floor, "{admitted} < {floor}");
        // Any window of d = 1 s: at most burst + rate * (d + lease_ms) = 5 + 13.
        for (i, start) in times.iter().enumerate() {
            let in_window = times[i..].iter().take_while(|t| **t < start + 1000).count();
            assert!(in_window <= 5 + 13, "{in_window} admitted in 1 s from {start}");
        }
        // Under sustained overload a key's budget refills one token per interval, so leases
        // shrink to one token and most admissions cost a round trip (refusals are answered
        // locally until their Retry-After): leases save round trips while budget is plentiful.
        assert!(fake.calls < 36_000, "{} round trips for 36,000 requests", fake.calls);
    }

    #[test]
    fn a_lease_is_spent_once_and_its_last_token_ends_it() {
        let p = policy(&[rule("r", 1, 3600, 10, "")], r#","reconcile":{"lease_tokens":3,"lease_ms":1000}"#);
        let store = MemoryStore::default();
        let plan = plan_for(&p, "alice");
        let hash = plan.rules[0].hash;
        let grant = Grant { taken: 3, remaining: 7, reset_ms: 10_800_000, retry_after_ms: 0 };
        let seen = store_leases(&p, &store, &plan, &[grant], 1000, T0);
        assert_eq!(seen[0].remaining, 9, "the unspent lease counts as remaining for the headers");
        // Two workers storing at once: tokens add up, never overwrite.
        store_leases(&p, &store, &plan, &[grant], 1000, T0);
        let lease = |now| p.lease_table.get(&store, hash, now).unwrap().and_then(|(b, _, _)| Lease::decode(&b));
        assert_eq!(lease(T0).map(|l| l.tokens), Some(4));
        for _ in 0..4 {
            assert!(
                matches!(spend_leases(&p, &store, plan_for(&p, "alice"), T0 + 1), LeaseStep::Decided(d) if d.rejection.is_none())
            );
        }
        assert_eq!(lease(T0 + 1), None, "spent: the next request asks Redis, it is not refused");
        assert!(matches!(spend_leases(&p, &store, plan_for(&p, "alice"), T0 + 1), LeaseStep::Remote(_)));
        // An unspent lease lapses after lease_ms.
        store_leases(&p, &store, &plan, &[grant], 1000, T0 + 2);
        assert!(matches!(spend_leases(&p, &store, plan_for(&p, "alice"), T0 + 1001), LeaseStep::Decided(_)));
        assert!(matches!(spend_leases(&p, &store, plan_for(&p, "alice"), T0 + 1002), LeaseStep::Remote(_)));
    }

    #[test]
    fn a_refusal_is_remembered_until_its_retry_after() {
        let p = policy(&[rule("r", 1, 60, 2, "")], r#","reconcile":{"lease_tokens":2,"lease_ms":1000}"#);
        let store = MemoryStore::default();
        let plan = plan_for(&p, "alice");
        let refused = Grant { taken: 0, remaining: 0, reset_ms: 90_000, retry_after_ms: 30_000 };
        let seen = store_leases(&p, &store, &plan, &[refused], 1000, T0);
        assert!(decide(&p, plan.clone(), Ok(seen), FailureMode::Closed).rejection.is_some());
        let LeaseStep::Decided(d) = spend_leases(&p, &store, plan_for(&p, "alice"), T0 + 10_000) else {
            panic!("refused locally")
        };
        let r = d.rejection.expect("refused");
        assert_eq!((r.status, r.code), (429, "rate_limited"));
        assert!(r.headers.contains(&("retry-after".to_string(), "20".to_string())), "{:?}", r.headers);
        assert!(matches!(&d.events[..], [Event::Limited { retry_after_ms: 20_000, .. }]));
        assert!(matches!(spend_leases(&p, &store, plan_for(&p, "alice"), T0 + 30_000), LeaseStep::Remote(_)));
        // A key that was only not evaluated (taken 0, no Retry-After) is not remembered as refused.
        let other = plan_for(&p, "bob");
        store_leases(&p, &store, &other, &[Grant { taken: 0, remaining: 2, reset_ms: 0, retry_after_ms: 0 }], 1000, T0);
        assert!(matches!(spend_leases(&p, &store, plan_for(&p, "bob"), T0), LeaseStep::Remote(_)));
    }

    #[test]
    fn foreign_lease_bytes_are_not_a_lease() {
        assert_eq!(Lease::decode(&[0; 19]), None);
        assert_eq!(Lease::decode(&[0; 21]), None);
        let l = Lease { tokens: 3, until_ms: 7, reset_at_ms: 9 };
        assert_eq!(Lease::decode(&l.encode()), Some(l));
        let p = policy(&[rule("r", 1, 60, 2, "")], r#","reconcile":{"lease_tokens":2,"lease_ms":1000}"#);
        let store = MemoryStore::default();
        let plan = plan_for(&p, "alice");
        p.lease_table
            .update(&store, plan.rules[0].hash, T0, |_| Update::Write {
                payload: vec![1, 2, 3],
                expires_at_ms: T0 + 500,
                result: (),
            })
            .unwrap();
        assert!(matches!(spend_leases(&p, &store, plan, T0), LeaseStep::Remote(_)), "Redis decides");
    }
}
