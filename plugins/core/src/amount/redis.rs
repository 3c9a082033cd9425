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

/// Weighted GCRA over several keys, on Redis's clock (seconds).
///
/// KEYS: one per rule, enforced rules first. ARGV: `enforced` (how many of KEYS are enforced),
/// then per key its budget (minor units per window), its window (seconds) and the request's cost
/// (`amount * window`, at most `horizon + 1`). A record is `<t0>:<debt>`. If any enforced key
/// does not fit, nothing is written. Otherwise every key that fits takes its cost. Returns per
/// key `{fits, taken, remaining, reset_s, retry_after_s}`. A record this code did not write is
/// an error (never read as a fresh key).
pub const AMOUNT_GCRA_SCRIPT: &str = include_str!("amount_gcra.lua");

/// The Redis key of a rule's key hash.
pub fn redis_key(redis: &RedisConfig, hash: KeyHash) -> String {
    redis.key("amt", hash)
}

/// One key of a request: (hash, enforced, budget, window, cost).
pub struct ScriptKey {
    pub hash: KeyHash,
    pub budget: u64,
    pub window_s: u64,
    pub cost: u64,
}

/// The webdis command (`enforced` of `keys` are enforced, and come first).
pub fn command(redis: &RedisConfig, keys: &[ScriptKey], enforced: usize) -> Vec<u8> {
    let names: Vec<String> = keys.iter().map(|k| redis_key(redis, k.hash)).collect();
    let mut args = vec![enforced.to_string()];
    for k in keys {
        let horizon = k.budget.saturating_mul(k.window_s);
        args.push(k.budget.to_string());
        args.push(k.window_s.to_string());
        args.push(k.cost.min(horizon.saturating_add(1)).to_string());
    }
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

/// Parses the script's reply for `keys` keys.
pub fn parse(reply: &Reply, keys: usize) -> Result<Vec<Answer>, RemoteError> {
    let Reply::Array(items) = reply else {
        return Err(RemoteError::Malformed(format!("unexpected amount-limit reply: {reply:?}")));
    };
    if items.len() != keys * 5 {
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
    items
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
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::Backend;

    #[test]
    fn the_command_names_every_key_and_bounds_the_cost() {
        let Backend::Redis(redis) =
            Backend::from_value(Some(&serde_json::json!({"backend":"redis","cluster":"bridge","key_prefix":"t"})), "state")
                .unwrap()
        else {
            panic!()
        };
        let keys = [
            ScriptKey { hash: KeyHash::of(&[b"a"]), budget: 20, window_s: 10, cost: 50 },
            ScriptKey { hash: KeyHash::of(&[b"b"]), budget: 20, window_s: 10, cost: u64::MAX },
        ];
        let command = String::from_utf8(command(&redis, &keys, 1)).unwrap();
        assert!(command.starts_with("EVALSHA/"), "{command}");
        assert!(command.ends_with("/1/20/10/50/20/10/201"), "{command}");
        assert!(command.contains(&redis_key(&redis, KeyHash::of(&[b"a"]))));
    }

    #[test]
    fn replies_are_parsed_strictly() {
        let ok =
            Reply::Array(vec![Reply::Integer(1), Reply::Integer(1), Reply::Integer(3), Reply::Integer(9), Reply::Integer(0)]);
        assert_eq!(parse(&ok, 1).unwrap(), [Answer { fits: true, taken: true, remaining: 3, reset_s: 9, retry_after_s: 0 }]);
        assert!(parse(&ok, 2).is_err());
        let bad =
            Reply::Array(vec![Reply::Integer(2), Reply::Integer(1), Reply::Integer(3), Reply::Integer(9), Reply::Integer(0)]);
        assert!(parse(&bad, 1).is_err());
        let negative =
            Reply::Array(vec![Reply::Integer(1), Reply::Integer(1), Reply::Integer(-3), Reply::Integer(9), Reply::Integer(0)]);
        assert!(parse(&negative, 1).is_err());
        assert!(parse(&Reply::Integer(1), 1).is_err());
    }
}
