//! Cluster-wide state on Redis, reached through the `webdis` HTTP bridge.
//!
//! Upstream Envoy's proxy-wasm cannot open a TCP connection to Redis, so each state operation is
//! one HTTP callout to webdis (an Envoy cluster): `POST /` whose body is the command in webdis's
//! path form (`SET/<key>/<value>/NX/PX/<ttl>`, arguments percent-encoded). Every claim is one
//! atomic Redis command or Lua script: no read-then-write race between gateway replicas.
//! This module builds the requests and parses the replies; the callout itself is glue.

use std::num::NonZeroU32;

use serde::Deserialize;

use crate::config::Choice;
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    /// Refuse with 503 `state_unavailable` (money routes: never forward unchecked).
    #[default]
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

/// The spellings of `backend`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum BackendKind {
    #[default]
    Local,
    Redis,
}

/// The JSON shape of a `state` section. The local backend accepts (and ignores) the Redis
/// fields, as it always did; they are checked only with `"backend": "redis"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    #[serde(default)]
    backend: Choice<BackendKind>,
    #[serde(default)]
    cluster: Option<String>,
    #[serde(default)]
    authority: Option<String>,
    #[serde(default = "default_timeout")]
    timeout_ms: u32,
    #[serde(default = "default_prefix")]
    key_prefix: String,
    #[serde(default)]
    failure_mode: Choice<FailureMode>,
}

fn default_timeout() -> u32 {
    250
}
fn default_prefix() -> String {
    "firebreak".into()
}

impl Backend {
    /// Parses `{"backend": "local"}` or `{"backend": "redis", "cluster": "...", ...}` found at
    /// `field` of a plugin configuration.
    pub fn from_value(value: Option<&serde_json::Value>, field: &str) -> Result<Backend, ConfigError> {
        let Some(value) = value else { return Ok(Backend::Local) };
        let raw = RawBackend::deserialize(value).map_err(|e| ConfigError::new(field, e.to_string()))?;
        match raw.backend.get(format!("{field}.backend"))? {
            BackendKind::Local => Ok(Backend::Local),
            BackendKind::Redis => {
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
                let failure_mode = raw.failure_mode.get(format!("{field}.failure_mode"))?;
                Ok(Backend::Redis(RedisConfig {
                    authority: raw.authority.unwrap_or_else(|| cluster.clone()),
                    cluster,
                    timeout_ms,
                    key_prefix: raw.key_prefix,
                    failure_mode,
                }))
            }
        }
    }
}

impl RedisConfig {
    /// A Redis key for a hashed record key: `<prefix>:<kind>:<hex>`.
    pub fn key(&self, kind: &str, hash: KeyHash) -> String {
        format!("{}:{}:{}", self.key_prefix, kind, hash.to_hex())
    }
}

/// Bytes a webdis path segment carries as they are: ASCII letters, digits and `- _ . ~ :`;
/// every other byte is percent-encoded (upper-case hex).
const WEBDIS_ESCAPED: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~').remove(b':');

/// A Redis command in webdis's path form, for the body of `POST /`.
pub fn webdis_command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = String::new();
    for (i, arg) in args.iter().enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.extend(percent_encoding::percent_encode(arg, WEBDIS_ESCAPED));
    }
    out.into_bytes()
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
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| RemoteError::Malformed(e.to_string()))?;
    // A script runs as `EVALSHA`, or as `EVAL` after `NOSCRIPT`: either member answers "EVAL".
    let inner = match command {
        "EVAL" | "EVALSHA" => value.get("EVALSHA").or_else(|| value.get("EVAL")),
        _ => value.get(command),
    };
    let inner = inner.ok_or_else(|| RemoteError::Malformed(format!("no `{command}` member")))?;
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

/// Atomically: replace the value of `key` only if it still equals `expected` (a CAS that checks
/// it won).
pub const COMPARE_AND_SET_SCRIPT: &str = include_str!("remote/compare_and_set.lua");

/// Atomically: delete `key` only if its value still equals `expected` (a release that cannot
/// remove a record another request wrote since).
pub const COMPARE_AND_DELETE_SCRIPT: &str = include_str!("remote/compare_and_delete.lua");

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

/// Every Lua script Firebreak runs, with its SHA-1 (hex), by which Redis keeps a script it has run
/// once. A call names the script by its SHA-1 (`EVALSHA`): the script's text goes to Redis only
/// when Redis answers `NOSCRIPT` (first use, a restarted or flushed Redis), and the callout runtime
/// ([`crate::flow::calls`]) then sends the same call once as `EVAL` ([`eval_fallback`]), which
/// loads it. Checked against the texts by a test.
pub const SCRIPTS: [(&str, &str); 6] = [
    (COMPARE_AND_SET_SCRIPT, "b9bd6f945013c281f5fca7ee11bc02132d6540bd"),
    (COMPARE_AND_DELETE_SCRIPT, "d98200e5372164fe1f360fc5f9b4635c0edda3df"),
    (CLAIM_OR_GET_WITHIN_QUOTA_SCRIPT, "2e44eb1fdcd593c0886ebea7f09b5a5ea6390f1a"),
    (SET_NX_WITHIN_QUOTA_SCRIPT, "6768f79a1859f136ac4a1957749f4d95415a2c39"),
    (crate::ratelimit::redis::MULTI_GCRA_SCRIPT, "404cbd490400f225358fc704188292560e5dbf5d"),
    (crate::amount::redis::AMOUNT_GCRA_SCRIPT, "3a16e455b2f8a95afb311e8654f5c8879975c345"),
];

/// `EVALSHA <sha1 of script> <keys.len()> keys... args...` in webdis's path form (`EVAL` with the
/// script's text for a script not in [`SCRIPTS`]).
pub fn script_command(script: &str, keys: &[&str], args: &[&str]) -> Vec<u8> {
    let count = keys.len().to_string();
    let mut parts: Vec<&[u8]> = match SCRIPTS.iter().find(|(text, _)| *text == script) {
        Some((_, sha1)) => vec![b"EVALSHA", sha1.as_bytes(), count.as_bytes()],
        None => vec![b"EVAL", script.as_bytes(), count.as_bytes()],
    };
    parts.extend(keys.iter().map(|k| k.as_bytes()));
    parts.extend(args.iter().map(|a| a.as_bytes()));
    webdis_command(&parts)
}

/// The same call with the script's text (`EVAL`), for an `EVALSHA` call Redis answered
/// `NOSCRIPT`; `None` for any other command.
pub fn eval_fallback(command: &[u8]) -> Option<Vec<u8>> {
    let rest = command.strip_prefix(b"EVALSHA/")?;
    let (sha1, args) = match rest.iter().position(|b| *b == b'/') {
        Some(at) => (rest.get(..at)?, rest.get(at..)?),
        None => (rest, &[][..]),
    };
    let (script, _) = SCRIPTS.iter().find(|(_, known)| known.as_bytes() == sha1)?;
    let mut out = webdis_command(&[b"EVAL", script.as_bytes()]);
    out.extend_from_slice(args);
    Some(out)
}

/// Whether webdis's answer is Redis's `NOSCRIPT` error to an `EVALSHA`.
pub fn is_noscript(http_status: Option<u16>, body: &[u8]) -> bool {
    matches!(parse_reply("EVALSHA", http_status, body), Err(RemoteError::Redis(message)) if message.starts_with("NOSCRIPT"))
}

/// `EVALSHA <script> 1 <key> <args...>` in webdis form ([`script_command`]).
pub fn eval_command(script: &str, key: &str, args: &[&str]) -> Vec<u8> {
    script_command(script, &[key], args)
}

/// Result of [`CLAIM_OR_GET_WITHIN_QUOTA_SCRIPT`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOrGet {
    Won,
    Held {
        value: Vec<u8>,
        ttl_ms: i64,
    },
    /// The tenant used its quota of the window; nothing was written.
    QuotaExceeded,
}

/// Claim-or-get with a per-tenant quota, in one script. KEYS[1] = the record, KEYS[2] = the
/// tenant's count of claims in its window; ARGV = value, ttl ms, limit, window ms. A held key is
/// answered `{0, value, pttl}` without touching the count; a tenant at its limit
/// gets `{2}` and nothing is written; otherwise the count goes up (created with the window as
/// its TTL; INCR keeps the TTL) and the record is written with its TTL. Every key has a TTL.
pub const CLAIM_OR_GET_WITHIN_QUOTA_SCRIPT: &str = include_str!("remote/claim_or_get_within_quota.lua");

/// `SET NX PX` with a per-tenant quota, in one script. KEYS[1] = the marker, KEYS[2] = the
/// tenant's count; ARGV = ttl ms, limit, window ms. `0`: the marker exists (count untouched);
/// `2`: the tenant is at its limit (nothing written); `1`: written.
pub const SET_NX_WITHIN_QUOTA_SCRIPT: &str = include_str!("remote/set_nx_within_quota.lua");

/// A script with `keys` ([`script_command`]).
pub fn eval_command_keys(script: &str, keys: &[&str], args: &[&str]) -> Vec<u8> {
    script_command(script, keys, args)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scripts_sha1_is_the_sha1_of_its_text() {
        use sha1::Digest;
        for (script, sha1) in SCRIPTS {
            assert_eq!(hex::encode(sha1::Sha1::digest(script.as_bytes())), sha1, "{}", script.lines().next().unwrap_or(""));
        }
    }

    #[test]
    fn only_a_known_scripts_evalsha_has_a_fallback() {
        assert_eq!(eval_fallback(b"GET/k"), None);
        assert_eq!(eval_fallback(b"EVALSHA/0000000000000000000000000000000000000000/1/k"), None);
        let call = script_command(SET_NX_WITHIN_QUOTA_SCRIPT, &["a", "b"], &["1"]);
        let eval = String::from_utf8(eval_fallback(&call).unwrap()).unwrap();
        let args: Vec<String> = eval
            .split('/')
            .map(|p| percent_encoding::percent_decode_str(p).decode_utf8().unwrap().into_owned())
            .collect();
        assert_eq!(args, ["EVAL", SET_NX_WITHIN_QUOTA_SCRIPT, "2", "a", "b", "1"]);
        assert!(is_noscript(Some(200), br#"{"EVALSHA":[false,"NOSCRIPT No matching script."]}"#));
        assert!(!is_noscript(Some(200), br#"{"EVALSHA":[false,"ERR other"]}"#));
        assert!(!is_noscript(Some(200), br#"{"EVALSHA":1}"#));
        assert_eq!(parse_reply("EVAL", Some(200), br#"{"EVALSHA":1}"#), Ok(Reply::Integer(1)));
    }

    #[test]
    fn commands_are_percent_encoded_path_segments() {
        assert_eq!(webdis_command(&[b"SET", b"a/b c", b"1"]), b"SET/a%2Fb%20c/1".to_vec());
        assert_eq!(webdis_command(&[b"SET", b"fb:n:00ff", "\u{e9}\n%~".as_bytes()]), b"SET/fb:n:00ff/%C3%A9%0A%25~".to_vec());
    }

    #[test]
    fn replies_parse_and_errors_are_errors() {
        assert_eq!(parse_reply("SET", Some(200), br#"{"SET":[true,"OK"]}"#), Ok(Reply::Status("OK".into())));
        assert_eq!(parse_reply("SET", Some(200), br#"{"SET":null}"#), Ok(Reply::Nil));
        assert_eq!(
            parse_reply("EVAL", Some(200), br#"{"EVAL":[1,2,"abc"]}"#),
            Ok(Reply::Array(vec![Reply::Integer(1), Reply::Integer(2), Reply::Text("abc".into())]))
        );
        assert!(matches!(parse_reply("SET", Some(200), br#"{"SET":[false,"ERR wrong"]}"#), Err(RemoteError::Redis(_))));
        assert!(matches!(parse_reply("SET", Some(503), b""), Err(RemoteError::Unreachable(_))));
        assert!(matches!(parse_reply("SET", None, b""), Err(RemoteError::Unreachable(_))));
        assert!(matches!(parse_reply("SET", Some(200), b"<html>"), Err(RemoteError::Malformed(_))));
        assert!(matches!(parse_reply("SET", Some(200), br#"{"GET":"x"}"#), Err(RemoteError::Malformed(_))));
    }

    #[test]
    fn script_replies() {
        assert_eq!(parse_claim_or_get(&Reply::Array(vec![Reply::Integer(1)])), Ok(ClaimOrGet::Won));
        let held = Reply::Array(vec![Reply::Integer(0), Reply::Text(encode_value(b"\x00rec")), Reply::Integer(900)]);
        assert_eq!(parse_claim_or_get(&held), Ok(ClaimOrGet::Held { value: b"\x00rec".to_vec(), ttl_ms: 900 }));
        assert!(parse_claim_or_get(&Reply::Array(vec![Reply::Integer(0), Reply::Text("%%".into()), Reply::Integer(1)])).is_err());
        assert!(parse_claim_or_get(&Reply::Nil).is_err());
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
        assert_eq!(cmd, b"EVALSHA/d98200e5372164fe1f360fc5f9b4635c0edda3df/1/fb:k/v".to_vec());
        let eval = eval_fallback(&cmd).unwrap();
        assert!(eval.starts_with(b"EVAL/if%20redis.call"));
        assert!(eval.ends_with(b"/1/fb:k/v"));
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
        // The accepted JSON is unchanged: no `backend` means local, and local ignores the Redis
        // fields (even invalid ones); the defaults are 250 ms, `firebreak`, closed.
        for v in [
            serde_json::json!({}),
            serde_json::json!({"backend": "local"}),
            serde_json::json!({"cluster": "c", "timeout_ms": 0, "failure_mode": "maybe", "key_prefix": ""}),
        ] {
            assert_eq!(Backend::from_value(Some(&v), "state"), Ok(Backend::Local), "{v}");
        }
        let v = serde_json::json!({"backend": "redis", "cluster": "c"});
        assert_eq!(
            Backend::from_value(Some(&v), "state"),
            Ok(Backend::Redis(RedisConfig {
                cluster: "c".into(),
                authority: "c".into(),
                timeout_ms: NonZeroU32::new(250).unwrap(),
                key_prefix: "firebreak".into(),
                failure_mode: FailureMode::Closed,
            }))
        );
        let v = serde_json::json!({"backend": "redis", "cluster": "c", "authority": "a", "failure_mode": "open"});
        let Backend::Redis(r) = Backend::from_value(Some(&v), "state").unwrap() else { panic!() };
        assert_eq!((r.authority.as_str(), r.failure_mode), ("a", FailureMode::Open));
        // Unknown fields and wrong types are errors of the whole section; spellings are exact.
        for v in [
            serde_json::json!({"backend": "redis", "cluster": "c", "clutser": "c"}),
            serde_json::json!({"backend": "redis", "cluster": "c", "timeout_ms": "100"}),
            serde_json::json!({"backend": 1}),
        ] {
            assert_eq!(Backend::from_value(Some(&v), "state").unwrap_err().field, "state", "{v}");
        }
        let v = serde_json::json!({"backend": "Redis", "cluster": "c"});
        assert_eq!(Backend::from_value(Some(&v), "state").unwrap_err().field, "state.backend");
        let v = serde_json::json!({"backend": "redis", "cluster": "c", "failure_mode": "OPEN"});
        assert_eq!(Backend::from_value(Some(&v), "state").unwrap_err().field, "state.failure_mode");
    }
}
