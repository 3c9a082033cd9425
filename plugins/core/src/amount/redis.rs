//! amount-limit's budgets on Redis (through webdis), shared by every Envoy instance that uses the
//! same Redis: ONE Lua script ([`AMOUNT_GCRA_SCRIPT`]) decides a request over the keys of every
//! rule that applies, on Redis's clock (`TIME`, whole seconds), with the arithmetic of
//! [`super::budget`]. It reads every key, and writes only if every enforced rule admits: no
//! read-then-write race between workers or instances, and a refusal costs nothing elsewhere.
//!
//! Every number the script handles is an integer below 2^53 (the configuration bounds each
//! horizon by 2^52, and a cost above the horizon is sent as `horizon + 1`), so Lua's doubles
//! compute it exactly; divisions are done as `(x - x % y) / y`, exact for such integers.

use crate::remote::{self, RedisConfig, RemoteError, Reply};
use crate::store::KeyHash;

/// Weighted GCRA over several keys, on Redis's clock (`TIME`: whole seconds for the budgets,
/// milliseconds for the quota windows), within the tenant's quota of records per quota window
/// (module [`super`], "The tenant quota").
///
/// KEYS: one per rule, enforced rules first, then the tenant's quota count
/// (`<prefix>:amt:quota:<tenant hash>`). ARGV: `enforced` (how many of the rule keys are
/// enforced), then per rule key its budget (minor units per window), its window (seconds) and
/// the request's cost (`amount * window`, at most `horizon + 1`), then the quota's limit (records
/// per quota window) and its window (ms). A record is `<t0>:<debt>:<counted_until_ms>`, the last
/// field the end of the tenant's quota window it was last counted in; a record of the previous
/// version (`<t0>:<debt>`) is read as counted in no window. The count is `<window end ms>:<count>`,
/// expiring at the window's end (`PEXPIREAT`); a count of the previous version (`<count>`, with
/// its `PTTL`) is read with the end `now + PTTL`. If any enforced key does not fit, nothing is
/// written. Otherwise every key that fits takes its cost; a key whose record is not counted in
/// the running window (absent, expired, of the previous version, or `counted_until_ms <= now`)
/// costs a unit of the tenant's quota and is stamped with the window's end: an enforced key over
/// the limit refuses the whole request with nothing written (quota `1`); a report-only key over
/// the limit is not written, the rest is (quota `2`). A record counted in the running window is
/// charged without the quota. Returns the quota flag (`0`: within the quota or not consulted),
/// then per rule key `{fits, taken, remaining, reset_s, retry_after_s}`. A record or count this
/// code (or the previous version) did not write is an error (never read as a fresh key). Every
/// number stays an exact integer below 2^53 (milliseconds of the epoch are below 2^43).
pub const AMOUNT_GCRA_SCRIPT: &str = include_str!("amount_gcra.lua");

/// The Redis key kind of a tenant's count of records per quota window (`<prefix>:amt:quota:<tenant hash>`).
pub const QUOTA_KIND: &str = "amt:quota";

/// The Redis key of a rule's key hash.
pub fn redis_key(redis: &RedisConfig, hash: KeyHash) -> String {
    redis.key("amt", hash)
}

/// The Redis key of a tenant's count of records per quota window (the tenant's hash, never its name).
pub fn quota_key(redis: &RedisConfig, tenant: KeyHash) -> String {
    redis.key(QUOTA_KIND, tenant)
}

/// One key of a request: (hash, enforced, budget, window, cost).
pub struct ScriptKey {
    pub hash: KeyHash,
    pub budget: u64,
    pub window_s: u64,
    pub cost: u64,
}

/// The request's tenant and its quota of records per quota window.
pub struct ScriptQuota {
    pub tenant: KeyHash,
    /// Records counted per quota window.
    pub limit: u32,
    pub window_ms: u64,
}

/// The webdis command (`enforced` of `keys` are enforced, and come first).
pub fn command(redis: &RedisConfig, keys: &[ScriptKey], enforced: usize, quota: &ScriptQuota) -> Vec<u8> {
    let mut names: Vec<String> = keys.iter().map(|k| redis_key(redis, k.hash)).collect();
    names.push(quota_key(redis, quota.tenant));
    let mut args = vec![enforced.to_string()];
    for k in keys {
        let horizon = k.budget.saturating_mul(k.window_s);
        args.push(k.budget.to_string());
        args.push(k.window_s.to_string());
        args.push(k.cost.min(horizon.saturating_add(1)).to_string());
    }
    args.push(quota.limit.to_string());
    args.push(quota.window_ms.to_string());
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    remote::script_command(AMOUNT_GCRA_SCRIPT, &names, &args)
}

/// What the script answered for one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// The amount fits this key's budget (whether or not it was taken).
    pub fits: bool,
    pub taken: bool,
    pub remaining: u64,
    pub reset_s: u64,
    pub retry_after_s: u64,
}

/// The tenant's quota of records per quota window, as the script applied it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaAnswer {
    /// Within the quota, or not consulted (no record to count, or an enforced key refused).
    Within,
    /// An enforced key whose record needs a unit would take the tenant over its quota: nothing was written.
    Exceeded,
    /// The enforced keys were written; the report-only keys that fit and were not taken are the
    /// records the quota left out.
    ReportOnlyOver,
}

/// The script's whole answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub quota: QuotaAnswer,
    /// One per key, in the command's order.
    pub keys: Vec<Answer>,
}

/// Parses the script's reply for `keys` keys of which the first `enforced` are enforced, and
/// checks that the answers agree with each other and with the quota flag (a reply that does not
/// is not one this script sent).
pub fn parse(reply: &Reply, keys: usize, enforced: usize) -> Result<Decision, RemoteError> {
    let malformed = |what: &str| RemoteError::Malformed(format!("amount-limit reply: {what}"));
    let Reply::Array(items) = reply else {
        return Err(RemoteError::Malformed(format!("unexpected amount-limit reply: {reply:?}")));
    };
    if items.len() != 1 + keys * 5 || enforced > keys {
        return Err(RemoteError::Malformed(format!("{} values for {keys} keys", items.len())));
    }
    let number = |item: &Reply| match item {
        Reply::Integer(v) => u64::try_from(*v).map_err(|_| RemoteError::Malformed("negative value".into())),
        other => Err(RemoteError::Malformed(format!("not an integer: {other:?}"))),
    };
    let flag = |item: &Reply| match number(item)? {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(RemoteError::Malformed(format!("not a flag: {other}"))),
    };
    let (quota, rest) = items.split_first().ok_or_else(|| malformed("empty"))?;
    let quota = match number(quota)? {
        0 => QuotaAnswer::Within,
        1 => QuotaAnswer::Exceeded,
        2 => QuotaAnswer::ReportOnlyOver,
        other => return Err(RemoteError::Malformed(format!("not a quota flag: {other}"))),
    };
    let answers = rest
        .chunks(5)
        .map(|chunk| match chunk {
            [fits, taken, remaining, reset, retry] => Ok(Answer {
                fits: flag(fits)?,
                taken: flag(taken)?,
                remaining: number(remaining)?,
                reset_s: number(reset)?,
                retry_after_s: number(retry)?,
            }),
            _ => Err(RemoteError::Malformed("short reply".into())),
        })
        .collect::<Result<Vec<Answer>, RemoteError>>()?;
    if answers.iter().any(|a| a.taken && !a.fits) {
        return Err(malformed("a key taken that does not fit"));
    }
    let (enforced_answers, report_only) = answers.split_at_checked(enforced).ok_or_else(|| malformed("too few keys"))?;
    let admitted = enforced_answers.iter().all(|a| a.fits);
    let consistent = match quota {
        // An enforced key (there is one) needs a unit of the quota; every enforced key fits, and
        // nothing was taken.
        QuotaAnswer::Exceeded => enforced > 0 && admitted && !answers.iter().any(|a| a.taken),
        // The enforced keys were taken; a report-only key that fits was left out.
        QuotaAnswer::ReportOnlyOver => enforced_answers.iter().all(|a| a.taken) && report_only.iter().any(|a| a.fits && !a.taken),
        // Admitted: every key that fits was taken; refused: none was.
        QuotaAnswer::Within => answers.iter().all(|a| a.taken == (admitted && a.fits)),
    };
    if !consistent {
        return Err(malformed("the quota flag and the keys' answers disagree"));
    }
    Ok(Decision { quota, keys: answers })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::Backend;

    fn redis() -> RedisConfig {
        let Backend::Redis(redis) =
            Backend::from_value(Some(&serde_json::json!({"backend":"redis","cluster":"bridge","key_prefix":"t"})), "state")
                .unwrap()
        else {
            panic!()
        };
        redis
    }

    #[test]
    fn the_command_names_every_key_and_the_tenants_count_and_bounds_the_cost() {
        let keys = [
            ScriptKey { hash: KeyHash::of(&[b"a"]), budget: 20, window_s: 10, cost: 50 },
            ScriptKey { hash: KeyHash::of(&[b"b"]), budget: 20, window_s: 10, cost: u64::MAX },
        ];
        let tenant = KeyHash::of(&[b"tenant"]);
        let command =
            String::from_utf8(command(&redis(), &keys, 1, &ScriptQuota { tenant, limit: 7, window_ms: 11_000 })).unwrap();
        assert!(command.starts_with("EVALSHA/"), "{command}");
        let quota = quota_key(&redis(), tenant);
        assert!(quota.starts_with("t:amt:quota:"), "{quota}");
        assert!(command.contains(&format!(
            "/3/{}/{}/{quota}/",
            redis_key(&redis(), keys[0].hash),
            redis_key(&redis(), keys[1].hash)
        )));
        assert!(command.ends_with("/1/20/10/50/20/10/201/7/11000"), "{command}");
    }

    fn reply(values: &[i64]) -> Reply {
        Reply::Array(values.iter().map(|v| Reply::Integer(*v)).collect())
    }

    #[test]
    fn replies_are_parsed_strictly() {
        let taken = Answer { fits: true, taken: true, remaining: 3, reset_s: 9, retry_after_s: 0 };
        let ok = reply(&[0, 1, 1, 3, 9, 0]);
        assert_eq!(parse(&ok, 1, 1).unwrap(), Decision { quota: QuotaAnswer::Within, keys: vec![taken] });
        assert!(parse(&ok, 2, 1).is_err());
        assert!(parse(&ok, 1, 2).is_err());
        // The old shape (no quota flag) is not this script's.
        assert!(parse(&reply(&[1, 1, 3, 9, 0]), 1, 1).is_err());
        assert!(parse(&reply(&[0, 2, 1, 3, 9, 0]), 1, 1).is_err(), "not a flag");
        assert!(parse(&reply(&[0, 1, 1, -3, 9, 0]), 1, 1).is_err(), "negative");
        assert!(parse(&reply(&[3, 1, 0, 3, 9, 0]), 1, 1).is_err(), "not a quota flag");
        assert!(parse(&reply(&[0, 0, 1, 3, 9, 0]), 1, 1).is_err(), "taken without fitting");
        assert!(parse(&Reply::Integer(1), 1, 1).is_err());
        // Refused by a budget: nothing taken.
        let refused = reply(&[0, 0, 0, 0, 20, 5, 1, 0, 3, 9, 0]);
        assert_eq!(parse(&refused, 2, 1).unwrap().keys.iter().map(|a| a.taken).collect::<Vec<_>>(), [false, false]);
        assert!(parse(&reply(&[0, 0, 0, 0, 20, 5, 1, 1, 3, 9, 0]), 2, 1).is_err(), "taken although refused");
        assert!(parse(&reply(&[0, 1, 1, 0, 20, 5, 1, 0, 3, 9, 0]), 2, 1).is_err(), "a fitting key left out");
    }

    #[test]
    fn the_quota_flag_is_distinct_and_must_agree_with_the_keys() {
        // Exceeded: every enforced key fits and nothing was taken.
        let exceeded = reply(&[1, 1, 0, 20, 0, 0, 1, 0, 20, 0, 0]);
        assert_eq!(parse(&exceeded, 2, 1).unwrap().quota, QuotaAnswer::Exceeded);
        assert!(parse(&reply(&[1, 1, 1, 19, 1, 0, 1, 0, 20, 0, 0]), 2, 1).is_err(), "exceeded yet written");
        assert!(parse(&reply(&[1, 0, 0, 20, 0, 5, 1, 0, 20, 0, 0]), 2, 1).is_err(), "exceeded yet refused by a budget");
        // Report-only over: the enforced keys taken, a report-only key that fits left out.
        let over = reply(&[2, 1, 1, 19, 1, 0, 1, 0, 20, 0, 0]);
        let decision = parse(&over, 2, 1).unwrap();
        assert_eq!(decision.quota, QuotaAnswer::ReportOnlyOver);
        assert_eq!((decision.keys[1].fits, decision.keys[1].taken), (true, false));
        assert!(parse(&reply(&[2, 1, 1, 19, 1, 0, 1, 1, 19, 1, 0]), 2, 1).is_err(), "nothing left out");
        assert!(parse(&reply(&[2, 1, 0, 20, 0, 0, 1, 0, 20, 0, 0]), 2, 1).is_err(), "an enforced key left out");
        assert!(parse(&reply(&[2, 1, 1, 19, 1, 0]), 1, 1).is_err(), "no report-only key");
        assert!(parse(&reply(&[1, 1, 0, 20, 0, 0]), 1, 0).is_err(), "exceeded by report-only keys alone");
    }
}
