//! Cluster-wide state on Redis, reached through the `webdis` HTTP bridge.
//!
//! Upstream Envoy's proxy-wasm cannot open a TCP connection to Redis, so each state operation is
//! one HTTP callout to webdis (an Envoy cluster): `POST /` whose body is the command in webdis's
//! path form (`SET/<key>/<value>/NX/PX/<ttl>`, arguments percent-encoded). Every claim is one
//! atomic Redis command or Lua script: no read-then-write race between gateway replicas.
//! This module builds the requests and parses the replies; the callout itself is glue.

use std::num::NonZeroU32;

use serde::Deserialize;

use crate::store::KeyHash;
use crate::ConfigError;

/// Where shared state lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// proxy-wasm shared data: one Envoy instance, every worker.
    Local,
    /// Redis through webdis: every Envoy instance that uses the same Redis.
    Redis(RedisConfig),
}

/// What to do when Redis or the bridge does not answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureMode {
    /// Refuse with 503 `state_unavailable` (money routes: never forward unchecked).
    Closed,
    /// Forward without the check, with a counter and a log line.
    Open,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// The Envoy cluster that reaches webdis.
    pub cluster: String,
    /// `:authority` of the callout.
    pub authority: String,
    pub timeout_ms: NonZeroU32,
    pub key_prefix: String,
    pub failure_mode: FailureMode,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    #[serde(default = "default_backend")]
    backend: String,
    #[serde(default)]
    cluster: Option<String>,
    #[serde(default)]
    authority: Option<String>,
    #[serde(default = "default_timeout")]
    timeout_ms: u32,
    #[serde(default = "default_prefix")]
    key_prefix: String,
    #[serde(default = "default_failure_mode")]
    failure_mode: String,
}

fn default_backend() -> String {
    "local".into()
}
fn default_timeout() -> u32 {
    250
}
fn default_prefix() -> String {
    "firebreak".into()
}
fn default_failure_mode() -> String {
    "closed".into()
}

impl Backend {
    /// Parses `{"backend": "local"}` or `{"backend": "redis", "cluster": "...", ...}` found at
    /// `field` of a plugin configuration.
    pub fn from_value(value: Option<&serde_json::Value>, field: &str) -> Result<Backend, ConfigError> {
        let Some(value) = value else { return Ok(Backend::Local) };
        let raw: RawBackend = serde_json::from_value(value.clone())
            .map_err(|e| ConfigError::new(field, e.to_string()))?;
        match raw.backend.as_str() {
            "local" => Ok(Backend::Local),
            "redis" => {
                let cluster = raw
                    .cluster
                    .filter(|c| !c.is_empty())
                    .ok_or_else(|| ConfigError::new(format!("{field}.cluster"), "required for the redis backend"))?;
                let timeout_ms = NonZeroU32::new(raw.timeout_ms)
                    .filter(|t| t.get() <= 10_000)
                    .ok_or_else(|| ConfigError::new(format!("{field}.timeout_ms"), "must be between 1 and 10000"))?;
                if raw.key_prefix.is_empty()
                    || !raw.key_prefix.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
                {
                    return Err(ConfigError::new(format!("{field}.key_prefix"), "1+ characters of A-Z a-z 0-9 - _ . :"));
                }
                let failure_mode = match raw.failure_mode.as_str() {
                    "closed" => FailureMode::Closed,
                    "open" => FailureMode::Open,
                    other => {
                        return Err(ConfigError::new(
                            format!("{field}.failure_mode"),
                            format!("`{other}`: expected `closed` or `open`"),
                        ))
                    }
                };
                Ok(Backend::Redis(RedisConfig {
                    authority: raw.authority.unwrap_or_else(|| cluster.clone()),
                    cluster,
                    timeout_ms,
                    key_prefix: raw.key_prefix,
                    failure_mode,
                }))
            }
            other => Err(ConfigError::new(format!("{field}.backend"), format!("`{other}`: expected `local` or `redis`"))),
        }
    }
}

impl RedisConfig {
    /// A Redis key for a hashed record key: `<prefix>:<kind>:<hex>`.
    pub fn key(&self, kind: &str, hash: KeyHash) -> String {
        format!("{}:{}:{}", self.key_prefix, kind, hash.to_hex())
    }
}

/// A Redis command in webdis's path form, for the body of `POST /`.
pub fn webdis_command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, arg) in args.iter().enumerate() {
        if i > 0 {
            out.push(b'/');
        }
        for &b in arg.iter() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b':') {
                out.push(b);
            } else {
                out.extend_from_slice(format!("%{b:02X}").as_bytes());
            }
        }
    }
    out
}

/// `SET key 1 NX PX ttl`: claims `key` for `ttl_ms` unless someone holds it.
pub fn claim_command(key: &str, ttl_ms: u64) -> Vec<u8> {
    let ttl = ttl_ms.max(1).to_string();
    webdis_command(&[b"SET", key.as_bytes(), b"1", b"NX", b"PX", ttl.as_bytes()])
}

/// A Redis reply as webdis renders it in JSON.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Nil,
    /// A status reply (`[true, "OK"]`).
    Status(String),
    Integer(i64),
    Text(String),
    Array(Vec<Reply>),
    /// A Redis error (`[false, "ERR ..."]`).
    Error(String),
}

/// Why a callout did not yield a usable reply. All of them mean "state unavailable".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteError {
    /// No answer in time, connection failure, or a non-200 status from the bridge.
    Unreachable(String),
    /// An answer this code cannot read.
    Malformed(String),
    /// Redis answered with an error.
    Redis(String),
}

impl std::fmt::Display for RemoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RemoteError::Unreachable(m) => write!(f, "state store unreachable: {m}"),
            RemoteError::Malformed(m) => write!(f, "state store answered something unreadable: {m}"),
            RemoteError::Redis(m) => write!(f, "state store error: {m}"),
        }
    }
}

/// Parses webdis's JSON answer to `command` (`{"SET": [true, "OK"]}`, `{"SET": null}`, ...).
pub fn parse_reply(command: &str, http_status: Option<u16>, body: &[u8]) -> Result<Reply, RemoteError> {
    match http_status {
        Some(200) => {}
        Some(other) => return Err(RemoteError::Unreachable(format!("bridge answered HTTP {other}"))),
        None => return Err(RemoteError::Unreachable("no answer (timeout or connection failure)".into())),
    }
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| RemoteError::Malformed(e.to_string()))?;
    let inner = value
        .get(command)
        .ok_or_else(|| RemoteError::Malformed(format!("no `{command}` member")))?;
    let reply = convert(inner)?;
    if let Reply::Error(message) = reply {
        return Err(RemoteError::Redis(message));
    }
    Ok(reply)
}

fn convert(value: &serde_json::Value) -> Result<Reply, RemoteError> {
    use serde_json::Value;
    Ok(match value {
        Value::Null => Reply::Nil,
        Value::Number(n) => Reply::Integer(n.as_i64().ok_or_else(|| RemoteError::Malformed("non-integer".into()))?),
        Value::String(s) => Reply::Text(s.clone()),
        Value::Array(items) => match items.as_slice() {
            [Value::Bool(true), Value::String(s)] => Reply::Status(s.clone()),
            [Value::Bool(false), Value::String(s)] => Reply::Error(s.clone()),
            _ => Reply::Array(items.iter().map(convert).collect::<Result<_, _>>()?),
        },
        Value::Bool(_) | Value::Object(_) => return Err(RemoteError::Malformed("unexpected JSON type".into())),
    })
}

/// Outcome of a `SET NX` claim.
pub fn claim_won(reply: &Reply) -> Result<bool, RemoteError> {
    match reply {
        Reply::Status(s) if s == "OK" => Ok(true),
        Reply::Nil => Ok(false),
        other => Err(RemoteError::Malformed(format!("unexpected reply to SET NX: {other:?}"))),
    }
}

/// Values stored in Redis are base64 (webdis renders replies as JSON strings, which must be
/// valid UTF-8 whatever the record's bytes).
pub fn encode_value(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes)
}

pub fn decode_value(text: &str) -> Result<Vec<u8>, RemoteError> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(text)
        .map_err(|_| RemoteError::Malformed("stored value is not base64".into()))
}

/// Atomically: store `value` under `key` for `ttl_ms` unless the key exists; otherwise return
/// the existing value and its remaining time to live.
pub const CLAIM_OR_GET_SCRIPT: &str = "local ok = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) \
if ok then return {1} end \
return {0, redis.call('GET', KEYS[1]) or '', redis.call('PTTL', KEYS[1])}";

/// Atomically: replace the value of `key` only if it still equals `expected` (a CAS that checks
/// it won).
pub const COMPARE_AND_SET_SCRIPT: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) return 1 end return 0";

/// Atomically: delete `key` only if its value still equals `expected` (a release that cannot
/// remove a record another request wrote since).
pub const COMPARE_AND_DELETE_SCRIPT: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
return redis.call('DEL', KEYS[1]) end return 0";

/// Result of [`COMPARE_AND_SET_SCRIPT`] / [`COMPARE_AND_DELETE_SCRIPT`]: `true` when the value was
/// still the expected one and was replaced (deleted).
pub fn parse_compare_and_set(reply: &Reply) -> Result<bool, RemoteError> {
    match reply {
        Reply::Integer(1) => Ok(true),
        Reply::Integer(0) => Ok(false),
        other => Err(RemoteError::Malformed(format!("unexpected compare-and-set reply: {other:?}"))),
    }
}

/// `GET key` in webdis form.
pub fn get_command(key: &str) -> Vec<u8> {
    webdis_command(&[b"GET", key.as_bytes()])
}

/// Result of `GET` on a base64 value: `None` when the key does not exist; the value's text too
/// (to compare-and-set against exactly what was read).
pub fn parse_get(reply: &Reply) -> Result<Option<(String, Vec<u8>)>, RemoteError> {
    match reply {
        Reply::Nil => Ok(None),
        Reply::Text(text) => Ok(Some((text.clone(), decode_value(text)?))),
        other => Err(RemoteError::Malformed(format!("unexpected GET reply: {other:?}"))),
    }
}

/// GCRA on Redis's own clock (microseconds), so that every gateway replica shares one time base.
/// ARGV: emission interval (us), horizon = burst x interval (us). Returns
/// {allowed, remaining, reset_ms, retry_after_ms}. The key expires when the budget is full again.
pub const GCRA_SCRIPT: &str = "local t = redis.call('TIME') \
local now = tonumber(t[1]) * 1000000 + tonumber(t[2]) \
local interval = tonumber(ARGV[1]) local horizon = tonumber(ARGV[2]) \
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') \
if tat < now then tat = now end \
local candidate = tat + interval local debt = candidate - now \
if debt <= horizon then \
redis.call('SET', KEYS[1], string.format('%d', candidate), 'PX', math.ceil(debt / 1000) + 1) \
return {1, math.floor((horizon - debt) / interval), math.ceil(debt / 1000), 0} end \
return {0, 0, math.ceil((tat - now) / 1000), math.ceil((debt - horizon) / 1000)}";

/// `EVAL <script> 1 <key> <args...>` in webdis form.
pub fn eval_command(script: &str, key: &str, args: &[&str]) -> Vec<u8> {
    let mut parts: Vec<&[u8]> = vec![b"EVAL", script.as_bytes(), b"1", key.as_bytes()];
    parts.extend(args.iter().map(|a| a.as_bytes()));
    webdis_command(&parts)
}

/// Result of [`CLAIM_OR_GET_SCRIPT`] / [`CLAIM_OR_GET_WITHIN_QUOTA_SCRIPT`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOrGet {
    Won,
    Held { value: Vec<u8>, ttl_ms: i64 },
    /// The tenant used its quota of the window; nothing was written.
    QuotaExceeded,
}

/// [`CLAIM_OR_GET_SCRIPT`] with a per-tenant quota, in one script. KEYS[1] = the record, KEYS[2]
/// = the tenant's count of claims in its window; ARGV = value, ttl ms, limit, window ms. A held
/// key is answered as by `CLAIM_OR_GET_SCRIPT` without touching the count; a tenant at its limit
/// gets `{2}` and nothing is written; otherwise the count goes up (created with the window as
/// its TTL; INCR keeps the TTL) and the record is written with its TTL. Every key has a TTL.
pub const CLAIM_OR_GET_WITHIN_QUOTA_SCRIPT: &str = "local held = redis.call('GET', KEYS[1]) \
if held then return {0, held, redis.call('PTTL', KEYS[1])} end \
local n = tonumber(redis.call('GET', KEYS[2]) or '0') \
if n >= tonumber(ARGV[3]) then return {2} end \
if n == 0 then redis.call('SET', KEYS[2], '1', 'PX', ARGV[4]) else redis.call('INCR', KEYS[2]) end \
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) \
return {1}";

/// `SET NX PX` with a per-tenant quota, in one script. KEYS[1] = the marker, KEYS[2] = the
/// tenant's count; ARGV = ttl ms, limit, window ms. `0`: the marker exists (count untouched);
/// `2`: the tenant is at its limit (nothing written); `1`: written.
pub const SET_NX_WITHIN_QUOTA_SCRIPT: &str = "if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end \
local n = tonumber(redis.call('GET', KEYS[2]) or '0') \
if n >= tonumber(ARGV[2]) then return 2 end \
if n == 0 then redis.call('SET', KEYS[2], '1', 'PX', ARGV[3]) else redis.call('INCR', KEYS[2]) end \
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1]) \
return 1";

/// `EVAL script <keys.len()> keys... args...` in webdis's path form.
pub fn eval_command_keys(script: &str, keys: &[&str], args: &[&str]) -> Vec<u8> {
    let count = keys.len().to_string();
    let mut parts: Vec<&[u8]> = vec![b"EVAL", script.as_bytes(), count.as_bytes()];
    parts.extend(keys.iter().map(|k| k.as_bytes()));
    parts.extend(args.iter().map(|a| a.as_bytes()));
    webdis_command(&parts)
}

pub fn parse_claim_or_get(reply: &Reply) -> Result<ClaimOrGet, RemoteError> {
    match reply {
        Reply::Array(items) => match items.as_slice() {
            [Reply::Integer(1)] => Ok(ClaimOrGet::Won),
            [Reply::Integer(2)] => Ok(ClaimOrGet::QuotaExceeded),
            [Reply::Integer(0), Reply::Text(value), Reply::Integer(ttl)] => {
                Ok(ClaimOrGet::Held { value: decode_value(value)?, ttl_ms: *ttl })
            }
            _ => Err(RemoteError::Malformed(format!("unexpected claim reply: {reply:?}"))),
        },
        _ => Err(RemoteError::Malformed(format!("unexpected claim reply: {reply:?}"))),
    }
}

/// Result of [`GCRA_SCRIPT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteRateDecision {
    pub allowed: bool,
    pub remaining: u32,
    pub reset_ms: u64,
    pub retry_after_ms: u64,
}

pub fn parse_gcra(reply: &Reply) -> Result<RemoteRateDecision, RemoteError> {
    let Reply::Array(items) = reply else {
        return Err(RemoteError::Malformed(format!("unexpected GCRA reply: {reply:?}")));
    };
    let [Reply::Integer(allowed), Reply::Integer(remaining), Reply::Integer(reset), Reply::Integer(retry)] =
        items.as_slice()
    else {
        return Err(RemoteError::Malformed(format!("unexpected GCRA reply: {reply:?}")));
    };
    let non_negative = |v: i64| u64::try_from(v).map_err(|_| RemoteError::Malformed("negative value".into()));
    Ok(RemoteRateDecision {
        allowed: *allowed == 1,
        remaining: u32::try_from(*remaining).unwrap_or(0),
        reset_ms: non_negative(*reset)?,
        retry_after_ms: non_negative(*retry)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_percent_encoded_path_segments() {
        assert_eq!(webdis_command(&[b"SET", b"a/b c", b"1"]), b"SET/a%2Fb%20c/1".to_vec());
        assert_eq!(claim_command("fb:n:00ff", 1500), b"SET/fb:n:00ff/1/NX/PX/1500".to_vec());
    }

    #[test]
    fn replies_parse_and_errors_are_errors() {
        assert_eq!(parse_reply("SET", Some(200), br#"{"SET":[true,"OK"]}"#), Ok(Reply::Status("OK".into())));
        assert_eq!(parse_reply("SET", Some(200), br#"{"SET":null}"#), Ok(Reply::Nil));
        assert_eq!(parse_reply("EVAL", Some(200), br#"{"EVAL":[1,2,"abc"]}"#),
            Ok(Reply::Array(vec![Reply::Integer(1), Reply::Integer(2), Reply::Text("abc".into())])));
        assert!(matches!(parse_reply("SET", Some(200), br#"{"SET":[false,"ERR wrong"]}"#), Err(RemoteError::Redis(_))));
        assert!(matches!(parse_reply("SET", Some(503), b""), Err(RemoteError::Unreachable(_))));
        assert!(matches!(parse_reply("SET", None, b""), Err(RemoteError::Unreachable(_))));
        assert!(matches!(parse_reply("SET", Some(200), b"<html>"), Err(RemoteError::Malformed(_))));
        assert!(matches!(parse_reply("SET", Some(200), br#"{"GET":"x"}"#), Err(RemoteError::Malformed(_))));
        assert_eq!(claim_won(&Reply::Status("OK".into())), Ok(true));
        assert_eq!(claim_won(&Reply::Nil), Ok(false));
        assert!(claim_won(&Reply::Integer(1)).is_err());
    }

    #[test]
    fn script_replies() {
        assert_eq!(parse_claim_or_get(&Reply::Array(vec![Reply::Integer(1)])), Ok(ClaimOrGet::Won));
        let held = Reply::Array(vec![Reply::Integer(0), Reply::Text(encode_value(b"\x00rec")), Reply::Integer(900)]);
        assert_eq!(parse_claim_or_get(&held), Ok(ClaimOrGet::Held { value: b"\x00rec".to_vec(), ttl_ms: 900 }));
        assert!(parse_claim_or_get(&Reply::Array(vec![Reply::Integer(0), Reply::Text("%%".into()), Reply::Integer(1)])).is_err());
        assert!(parse_claim_or_get(&Reply::Nil).is_err());
        let d = parse_gcra(&Reply::Array(vec![Reply::Integer(0), Reply::Integer(0), Reply::Integer(120), Reply::Integer(20)])).unwrap();
        assert_eq!((d.allowed, d.retry_after_ms), (false, 20));
        assert!(parse_gcra(&Reply::Array(vec![Reply::Integer(1)])).is_err());
        assert!(parse_gcra(&Reply::Array(vec![Reply::Integer(1), Reply::Integer(0), Reply::Integer(-5), Reply::Integer(0)])).is_err());
    }

    #[test]
    fn compare_and_set_and_get_replies() {
        assert_eq!(parse_compare_and_set(&Reply::Integer(1)), Ok(true));
        assert_eq!(parse_compare_and_set(&Reply::Integer(0)), Ok(false));
        assert!(parse_compare_and_set(&Reply::Integer(2)).is_err());
        assert!(parse_compare_and_set(&Reply::Nil).is_err());
        assert!(parse_compare_and_set(&Reply::Status("OK".into())).is_err());
        assert_eq!(get_command("fb:k:01"), b"GET/fb:k:01".to_vec());
        assert_eq!(parse_get(&Reply::Nil), Ok(None));
        let text = encode_value(b"\xffabc");
        assert_eq!(parse_get(&Reply::Text(text.clone())), Ok(Some((text, b"\xffabc".to_vec()))));
        assert!(parse_get(&Reply::Text("not base64!".into())).is_err());
        assert!(parse_get(&Reply::Integer(3)).is_err());
        let cmd = eval_command(COMPARE_AND_DELETE_SCRIPT, "fb:k", &["v"]);
        assert!(cmd.starts_with(b"EVAL/if%20redis.call"));
        assert!(cmd.ends_with(b"/1/fb:k/v"));
    }

    #[test]
    fn backend_config() {
        assert_eq!(Backend::from_value(None, "state"), Ok(Backend::Local));
        let v = serde_json::json!({"backend": "redis", "cluster": "redis_bridge", "timeout_ms": 100});
        let Backend::Redis(r) = Backend::from_value(Some(&v), "state").unwrap() else { panic!() };
        assert_eq!((r.cluster.as_str(), r.timeout_ms.get(), r.failure_mode), ("redis_bridge", 100, FailureMode::Closed));
        for (v, field) in [
            (serde_json::json!({"backend": "redis"}), "state.cluster"),
            (serde_json::json!({"backend": "redis", "cluster": "c", "timeout_ms": 0}), "state.timeout_ms"),
            (serde_json::json!({"backend": "redis", "cluster": "c", "failure_mode": "maybe"}), "state.failure_mode"),
            (serde_json::json!({"backend": "memcached"}), "state.backend"),
            (serde_json::json!({"backend": "redis", "cluster": "c", "key_prefix": "a b"}), "state.key_prefix"),
        ] {
            assert_eq!(Backend::from_value(Some(&v), "state").unwrap_err().field, field);
        }
    }
}
