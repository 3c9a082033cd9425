//! The cluster-wide replay store: records in Redis, reached through the webdis bridge
//! ([`crate::remote`]). Every claim and every update is ONE atomic Redis operation:
//!
//! - keyed claim: [`CLAIM_OR_GET_WITHIN_QUOTA_SCRIPT`](remote::CLAIM_OR_GET_WITHIN_QUOTA_SCRIPT)
//!   (the record that holds the key; else, within the tenant's quota, the in-flight record
//!   written with its TTL and the tenant's count raised); the held record then goes through the
//!   same [`decide_claim`] as the local store;
//! - collapse claim: [`SET_NX_WITHIN_QUOTA_SCRIPT`](remote::SET_NX_WITHIN_QUOTA_SCRIPT)
//!   (`SET NX PX <window>` within the tenant's quota);
//! - finish: [`decide_finish`] on the in-flight record this request wrote, applied with
//!   [`COMPARE_AND_SET_SCRIPT`](remote::COMPARE_AND_SET_SCRIPT) (or
//!   [`COMPARE_AND_DELETE_SCRIPT`](remote::COMPARE_AND_DELETE_SCRIPT) for a release) against
//!   exactly that record: a record that expired, was cleared or was re-claimed is never touched;
//! - operator clear: `GET`, [`decide_clear`], then compare-and-delete against the value read.
//!
//! A value is base64 (webdis renders replies as JSON strings) of the record's bytes, followed for
//! a completed key by its stored response (the local store's companion value): one key per
//! idempotency key, expiring with the record (`PX` = claim time + TTL - now). Sizes are bounded
//! by `max_stored_body_bytes` + [`MAX_RESPONSE_HEAD_LEN`].
//!
//! This module builds the commands and reads the answers; the filter dispatches the callouts.

use crate::remote::{self, ClaimOrGet, RedisConfig, RemoteError};
use crate::store::KeyHash;

use super::config::ReplayPolicy;
use super::record::{companion_digest, KeyState, Record, StoredBody, StoredResponse, MAX_RESPONSE_HEAD_LEN, RECORD_LEN};
use super::state::{
    decide_claim, decide_clear, decide_finish, ClaimAnswer, ClaimRequest, ClaimVerdict, ClearAnswer, FinishAnswer, FinishRequest,
    FinishWrite, Outcome, Owner, StateError,
};

/// Redis key kinds (`<key_prefix>:<kind>:<hex>`).
pub const KEY_KIND: &str = "replay:key";
pub const COLLAPSE_KIND: &str = "replay:dup";
/// Per-tenant claim counts (see [`crate::quota`]): `<prefix>:replay:quota:key:<tenant hash>`.
pub const KEY_QUOTA_KIND: &str = "replay:quota:key";
pub const COLLAPSE_QUOTA_KIND: &str = "replay:quota:dup";

/// A command for the bridge and the webdis reply member its answer comes under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteCommand {
    pub verb: &'static str,
    pub body: Vec<u8>,
}

/// The largest callout answer worth reading: a record plus the largest stored response, base64,
/// in webdis's JSON. A larger answer is not one this code wrote (fails closed).
pub fn max_reply_bytes(policy: &ReplayPolicy) -> usize {
    let value =
        RECORD_LEN + 1 + 8 + 2 + MAX_RESPONSE_HEAD_LEN + 4 + usize::try_from(policy.max_stored_body_bytes).unwrap_or(usize::MAX);
    // base64 is 4/3 of the bytes; the rest is room for JSON escapes (`\/`) and the reply's frame.
    value.saturating_mul(3) / 2 + 1024
}

fn parse(command: &RemoteCommand, http_status: Option<u16>, body: &[u8]) -> Result<remote::Reply, StateError> {
    remote::parse_reply(command.verb, http_status, body).map_err(|_| StateError::Remote)
}

/// Why a callout failed, for the log line (never a value).
pub fn describe(command: &RemoteCommand, http_status: Option<u16>, body: &[u8]) -> String {
    match remote::parse_reply(command.verb, http_status, body) {
        Ok(_) => "ok".to_string(),
        Err(RemoteError::Redis(message)) => format!("state store error: {}", message.chars().take(120).collect::<String>()),
        Err(error) => error.to_string(),
    }
}

/// Splits a stored value into its record and what follows it (a completed key's response).
fn split_value(bytes: &[u8]) -> Option<(Record, &[u8])> {
    let head = bytes.get(..RECORD_LEN)?;
    let rest = bytes.get(RECORD_LEN..)?;
    Some((Record::decode(head)?, rest))
}

/// A claim sent to Redis, kept by the filter until its answer arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingClaim {
    pub command: RemoteCommand,
    request: ClaimRequest,
    now_ms: u64,
}

/// The claim as one atomic command.
pub fn claim(policy: &ReplayPolicy, redis: &RedisConfig, request: &ClaimRequest, now_ms: u64) -> PendingClaim {
    let command = match request {
        ClaimRequest::Collapse { key, window_ms, tenant } => {
            let quota = &policy.collapse_quota;
            RemoteCommand {
                verb: "EVAL",
                body: remote::eval_command_keys(
                    remote::SET_NX_WITHIN_QUOTA_SCRIPT,
                    &[&redis.key(COLLAPSE_KIND, *key), &redis.key(COLLAPSE_QUOTA_KIND, *tenant)],
                    &[&window_ms.get().to_string(), &quota.limit.get().to_string(), &quota.window_ms.get().to_string()],
                ),
            }
        }
        ClaimRequest::Key { key, fingerprint, claim_id, tenant } => {
            let record = Record::in_flight(*fingerprint, *claim_id, now_ms);
            let value = remote::encode_value(&record.encode());
            let ttl = policy.ttl_ms.get().to_string();
            let quota = &policy.key_quota;
            RemoteCommand {
                verb: "EVAL",
                body: remote::eval_command_keys(
                    remote::CLAIM_OR_GET_WITHIN_QUOTA_SCRIPT,
                    &[&redis.key(KEY_KIND, *key), &redis.key(KEY_QUOTA_KIND, *tenant)],
                    &[&value, &ttl, &quota.limit.get().to_string(), &quota.window_ms.get().to_string()],
                ),
            }
        }
    };
    PendingClaim { command, request: request.clone(), now_ms }
}

impl PendingClaim {
    /// The bridge's answer (`http_status` `None`: no answer in time) becomes the claim answer,
    /// decided by the same [`decide_claim`] as the local store.
    pub fn answer(&self, policy: &ReplayPolicy, http_status: Option<u16>, body: &[u8]) -> Result<ClaimAnswer, StateError> {
        let reply = parse(&self.command, http_status, body)?;
        match &self.request {
            ClaimRequest::Collapse { .. } => match reply {
                remote::Reply::Integer(1) => Ok(ClaimAnswer::Forward { owner: None }),
                remote::Reply::Integer(0) => Ok(ClaimAnswer::Duplicate),
                remote::Reply::Integer(2) => Err(StateError::QuotaExceeded),
                _ => Err(StateError::Remote),
            },
            ClaimRequest::Key { key, fingerprint, claim_id, .. } => {
                let held = match remote::parse_claim_or_get(&reply) {
                    Ok(ClaimOrGet::Won) => {
                        let record = Record::in_flight(*fingerprint, *claim_id, self.now_ms);
                        return Ok(ClaimAnswer::Forward {
                            owner: Some(Owner { key: *key, claim_id: *claim_id, slot: None, record }),
                        });
                    }
                    Ok(ClaimOrGet::Held { value, .. }) => value,
                    Ok(ClaimOrGet::QuotaExceeded) => return Err(StateError::QuotaExceeded),
                    // A held value that is not base64 was not written by this code; any other
                    // unreadable answer is the bridge's.
                    Err(_) if held_shape(&reply) => return Err(StateError::Unavailable),
                    Err(_) => return Err(StateError::Remote),
                };
                held_claim_answer(policy, &held, *fingerprint, *claim_id, self.now_ms)
            }
        }
    }
}

fn held_shape(reply: &remote::Reply) -> bool {
    use remote::Reply;
    matches!(reply, Reply::Array(items) if matches!(items.as_slice(), [Reply::Integer(0), Reply::Text(_), Reply::Integer(_)]))
}

impl PendingClaim {
    /// After a claim whose answer was lost (timeout, bridge error): the command that deletes
    /// this claim's in-flight record if Redis did apply it. The request was not forwarded, so
    /// freeing the key is safe; otherwise the key would read `outcome_unknown` for the whole TTL
    /// although nothing executed. `None` for a collapse claim (its marker expires with the window).
    pub fn unwind(&self, redis: &RedisConfig) -> Option<RemoteCommand> {
        let ClaimRequest::Key { key, fingerprint, claim_id, .. } = &self.request else { return None };
        let record = Record::in_flight(*fingerprint, *claim_id, self.now_ms);
        Some(RemoteCommand {
            verb: "EVAL",
            body: remote::eval_command(
                remote::COMPARE_AND_DELETE_SCRIPT,
                &redis.key(KEY_KIND, *key),
                &[&remote::encode_value(&record.encode())],
            ),
        })
    }
}

/// Whether an unwind deleted the claim (`Ok(false)`: Redis had not applied it, or it was gone).
pub fn unwind_answer(command: &RemoteCommand, http_status: Option<u16>, body: &[u8]) -> Result<bool, StateError> {
    let reply = parse(command, http_status, body)?;
    remote::parse_compare_and_set(&reply).map_err(|_| StateError::Remote)
}

/// Pure: what a keyed claim gets when Redis already holds `held` for the key.
pub fn held_claim_answer(
    policy: &ReplayPolicy,
    held: &[u8],
    fingerprint: [u8; 32],
    claim_id: u64,
    now_ms: u64,
) -> Result<ClaimAnswer, StateError> {
    let (record, response) = split_value(held).ok_or(StateError::Unavailable)?;
    let (verdict, write) = decide_claim(Some(&record), fingerprint, claim_id, now_ms, policy.in_flight_timeout_ms);
    if write.is_some() {
        // decide_claim only writes to an absent key; the script already said it is held.
        return Err(StateError::Unavailable);
    }
    Ok(match verdict {
        ClaimVerdict::Forward => return Err(StateError::Unavailable),
        ClaimVerdict::InFlight => ClaimAnswer::InFlight,
        ClaimVerdict::OutcomeUnknown { stale_in_flight } => ClaimAnswer::OutcomeUnknown { stale_in_flight },
        ClaimVerdict::Mismatch => ClaimAnswer::Mismatch,
        ClaimVerdict::Completed { status, response: StoredBody::NotStored, .. } => ClaimAnswer::NotStored { status },
        ClaimVerdict::Completed { status, response: StoredBody::Stored(digest), claim_id } => {
            match StoredResponse::decode_for(response, claim_id, &digest) {
                Some(stored) => ClaimAnswer::Replay(stored),
                // Never replay bytes that do not match what the record committed.
                None => ClaimAnswer::NotStored { status },
            }
        }
    })
}

/// What finishing a request does in Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishPlan {
    /// Nothing to send (the request does not own an in-flight record).
    Done(FinishAnswer),
    /// Send `command`; a successful compare-and-set means `on_success`, a failed one `NotOwner`.
    Send { command: RemoteCommand, on_success: FinishAnswer },
}

/// The finish as one compare-and-set against the in-flight record this request wrote.
pub fn finish(policy: &ReplayPolicy, redis: &RedisConfig, request: &FinishRequest, now_ms: u64) -> FinishPlan {
    let owner = &request.owner;
    let mut companion = None;
    if let Outcome::Completed { response: Some(response), .. } = &request.outcome {
        companion = response.encode(owner.claim_id);
    }
    let digest = companion.as_deref().map(companion_digest);
    let (answer, write) = decide_finish(Some(&owner.record), owner.claim_id, &request.outcome, digest);
    let key = redis.key(KEY_KIND, owner.key);
    let expected = remote::encode_value(&owner.record.encode());
    let command = match write {
        None => return FinishPlan::Done(answer),
        Some(FinishWrite::Release) => {
            RemoteCommand { verb: "EVAL", body: remote::eval_command(remote::COMPARE_AND_DELETE_SCRIPT, &key, &[&expected]) }
        }
        Some(FinishWrite::Replace(record)) => {
            let mut value = record.encode();
            if let (KeyState::Completed { response: StoredBody::Stored(_), .. }, Some(bytes)) = (record.state, &companion) {
                value.extend_from_slice(bytes);
            }
            // The record keeps the expiry of its claim: claim time + TTL.
            let expires_at = owner.record.claimed_at_ms.saturating_add(policy.ttl_ms.get());
            let ttl = expires_at.saturating_sub(now_ms).max(1).to_string();
            RemoteCommand {
                verb: "EVAL",
                body: remote::eval_command(
                    remote::COMPARE_AND_SET_SCRIPT,
                    &key,
                    &[&expected, &remote::encode_value(&value), &ttl],
                ),
            }
        }
    };
    FinishPlan::Send { command, on_success: answer }
}

/// The answer to a finish command.
pub fn finish_answer(
    command: &RemoteCommand,
    on_success: FinishAnswer,
    http_status: Option<u16>,
    body: &[u8],
) -> Result<FinishAnswer, StateError> {
    let reply = parse(command, http_status, body)?;
    match remote::parse_compare_and_set(&reply) {
        Ok(true) => Ok(on_success),
        Ok(false) => Ok(FinishAnswer::NotOwner),
        Err(_) => Err(StateError::Remote),
    }
}

/// Step one of an operator clear: read the key's record.
pub fn clear_read(redis: &RedisConfig, key: KeyHash) -> RemoteCommand {
    RemoteCommand { verb: "GET", body: remote::get_command(&redis.key(KEY_KIND, key)) }
}

/// After the read: done, or delete exactly the value read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClearStep {
    Done(ClearAnswer),
    Delete { command: RemoteCommand, on_success: ClearAnswer },
}

/// Step two: [`decide_clear`] on what was read.
pub fn clear_after_read(
    policy: &ReplayPolicy,
    redis: &RedisConfig,
    key: KeyHash,
    now_ms: u64,
    read: &RemoteCommand,
    http_status: Option<u16>,
    body: &[u8],
) -> Result<ClearStep, StateError> {
    let reply = parse(read, http_status, body)?;
    let (text, bytes) = match remote::parse_get(&reply) {
        Ok(Some(found)) => found,
        Ok(None) => return Ok(ClearStep::Done(ClearAnswer::NotFound)),
        Err(_) => return Err(StateError::Unavailable),
    };
    let (record, _) = split_value(&bytes).ok_or(StateError::Unavailable)?;
    match decide_clear(Some(&record), now_ms, policy.in_flight_timeout_ms) {
        answer @ ClearAnswer::Cleared { .. } => Ok(ClearStep::Delete {
            command: RemoteCommand {
                verb: "EVAL",
                body: remote::eval_command(remote::COMPARE_AND_DELETE_SCRIPT, &redis.key(KEY_KIND, key), &[&text]),
            },
            on_success: answer,
        }),
        answer => Ok(ClearStep::Done(answer)),
    }
}

/// Step three: the compare-and-delete's answer. A record that changed between the read and the
/// delete (its late answer landed, or it expired) is not cleared: the operator retries.
pub fn clear_answer(
    command: &RemoteCommand,
    on_success: ClearAnswer,
    http_status: Option<u16>,
    body: &[u8],
) -> Result<Option<ClearAnswer>, StateError> {
    let reply = parse(command, http_status, body)?;
    match remote::parse_compare_and_set(&reply) {
        Ok(true) => Ok(Some(on_success)),
        Ok(false) => Ok(None),
        Err(_) => Err(StateError::Remote),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::Backend;
    use crate::replay::fake_redis::FakeRedis;
    use crate::replay::{Exchange, ReplayError, RequestFacts};

    const CONFIG: &str = r#"{"routes": [
        {"name": "payouts", "match": {"methods": ["POST"], "path_prefix": "/v1/payouts"}},
        {"name": "refunds", "match": {"methods": ["POST"], "path_prefix": "/v1/refunds"}, "on_uncertain": "release"},
        {"name": "transfers", "match": {"methods": ["POST"], "path_prefix": "/v1/transfers"}, "idempotency_key": "optional", "collapse_window_ms": 2000}],
        "ttl_seconds": 60, "in_flight_timeout_ms": 10000, "max_stored_body_bytes": 64}"#;

    fn policy() -> ReplayPolicy {
        ReplayPolicy::from_json(CONFIG.as_bytes()).unwrap()
    }

    fn redis() -> RedisConfig {
        let v = serde_json::json!({"backend": "redis", "cluster": "bridge", "key_prefix": "t"});
        match Backend::from_value(Some(&v), "state").unwrap() {
            Backend::Redis(r) => r,
            Backend::Local => unreachable!(),
        }
    }

    fn exchange(policy: &ReplayPolicy, path: &str, key: Option<&str>) -> Exchange {
        let mut h = vec![(":method".to_string(), "POST".to_string())];
        if let Some(k) = key {
            h.push(("idempotency-key".into(), k.into()));
        }
        let facts = RequestFacts { method: "POST", path_and_query: path, headers: &h, principal: Some("alice") };
        Exchange::begin(policy, &facts).unwrap().unwrap()
    }

    fn claim_on(
        redis_: &FakeRedis,
        policy: &ReplayPolicy,
        e: &Exchange,
        body: &str,
        claim_id: u64,
        now: u64,
    ) -> Result<ClaimAnswer, StateError> {
        let request = e.claim_request(policy, body.as_bytes(), claim_id).unwrap();
        let pending = claim(policy, &redis(), &request, now);
        let (status, reply) = redis_.run(&pending.command);
        pending.answer(policy, status, &reply)
    }

    fn finish_on(
        redis_: &FakeRedis,
        policy: &ReplayPolicy,
        request: &FinishRequest,
        now: u64,
    ) -> Result<FinishAnswer, StateError> {
        match finish(policy, &redis(), request, now) {
            FinishPlan::Done(answer) => Ok(answer),
            FinishPlan::Send { command, on_success } => {
                let (status, reply) = redis_.run(&command);
                finish_answer(&command, on_success, status, &reply)
            }
        }
    }

    fn owner_of(answer: Result<ClaimAnswer, StateError>) -> Owner {
        match answer {
            Ok(ClaimAnswer::Forward { owner: Some(owner) }) => owner,
            other => panic!("expected a forward with an owner, got {other:?}"),
        }
    }

    fn completed(owner: Owner, status: u16, body: &[u8]) -> FinishRequest {
        FinishRequest {
            owner,
            outcome: Outcome::Completed {
                status,
                response: Some(StoredResponse {
                    status,
                    headers: vec![("content-type".into(), "application/json".into())],
                    body: body.to_vec(),
                }),
            },
        }
    }

    #[test]
    fn one_claim_wins_then_in_flight_then_replay_with_the_stored_response() {
        let (p, r) = (policy(), FakeRedis::default());
        let e = exchange(&p, "/v1/payouts", Some("\"k1\""));
        let owner = owner_of(claim_on(&r, &p, &e, "{}", 1, 1_000));
        assert_eq!(owner.record, Record::in_flight(e.fingerprint(b"{}"), 1, 1_000));
        assert_eq!(claim_on(&r, &p, &e, "{}", 2, 1_001), Ok(ClaimAnswer::InFlight));
        assert_eq!(claim_on(&r, &p, &e, "{\"x\":1}", 3, 1_001), Ok(ClaimAnswer::Mismatch));
        // The stored value is base64 of the record; it expires with the TTL.
        let key = redis().key(KEY_KIND, e.key_address(&p).unwrap());
        assert_eq!(r.ttl.borrow()[&key], 60_000);
        assert_eq!(finish_on(&r, &p, &completed(owner, 201, b"{\"id\":7}"), 2_000), Ok(FinishAnswer::Completed { stored: true }));
        // The completed record keeps the claim's expiry (claim time + TTL).
        assert_eq!(r.ttl.borrow()[&key], 59_000);
        match claim_on(&r, &p, &e, "{}", 4, 3_000) {
            Ok(ClaimAnswer::Replay(response)) => {
                assert_eq!((response.status, response.body.as_slice()), (201, b"{\"id\":7}".as_slice()));
                assert_eq!(response.headers, vec![("content-type".to_string(), "application/json".to_string())]);
            }
            other => panic!("{other:?}"),
        }
        // A second finish by the same owner no longer finds its in-flight record.
        assert_eq!(finish_on(&r, &p, &completed(owner, 201, b"x"), 3_000), Ok(FinishAnswer::NotOwner));
    }

    #[test]
    fn finish_is_compare_and_set_against_this_claims_record() {
        let (p, r) = (policy(), FakeRedis::default());
        let e = exchange(&p, "/v1/payouts", Some("\"k2\""));
        let owner = owner_of(claim_on(&r, &p, &e, "{}", 1, 1_000));
        // The key was cleared and re-claimed by another request meanwhile: the late finish of the
        // first must not overwrite the second's record.
        r.data.borrow_mut().clear();
        let second = owner_of(claim_on(&r, &p, &e, "{}", 2, 2_000));
        assert_eq!(finish_on(&r, &p, &completed(owner, 201, b"first"), 2_100), Ok(FinishAnswer::NotOwner));
        assert_eq!(claim_on(&r, &p, &e, "{}", 3, 2_200), Ok(ClaimAnswer::InFlight));
        let unknown = FinishRequest { owner: second, outcome: Outcome::Unknown { status: 503 } };
        assert_eq!(finish_on(&r, &p, &unknown, 2_300), Ok(FinishAnswer::OutcomeUnknown));
        assert_eq!(claim_on(&r, &p, &e, "{}", 4, 2_400), Ok(ClaimAnswer::OutcomeUnknown { stale_in_flight: false }));
    }

    #[test]
    fn stale_in_flight_is_outcome_unknown_and_release_frees_only_its_own_record() {
        let (p, r) = (policy(), FakeRedis::default());
        let e = exchange(&p, "/v1/refunds", Some("\"k3\""));
        let owner = owner_of(claim_on(&r, &p, &e, "{}", 1, 1_000));
        assert_eq!(claim_on(&r, &p, &e, "{}", 2, 1_000 + 10_000), Ok(ClaimAnswer::OutcomeUnknown { stale_in_flight: true }));
        let release = FinishRequest { owner, outcome: Outcome::Release };
        assert_eq!(finish_on(&r, &p, &release, 12_000), Ok(FinishAnswer::Released));
        let records = || r.data.borrow().keys().filter(|k| !k.contains(":replay:quota:")).count();
        assert_eq!(records(), 0);
        owner_of(claim_on(&r, &p, &e, "{}", 3, 12_001));
        assert_eq!(finish_on(&r, &p, &release, 12_002), Ok(FinishAnswer::NotOwner));
        assert_eq!(records(), 1);
    }

    #[test]
    fn a_response_too_large_or_tampered_is_not_replayed() {
        let (p, r) = (policy(), FakeRedis::default());
        let e = exchange(&p, "/v1/payouts", Some("\"k4\""));
        let owner = owner_of(claim_on(&r, &p, &e, "{}", 1, 1_000));
        let not_stored = FinishRequest { owner, outcome: Outcome::Completed { status: 201, response: None } };
        assert_eq!(finish_on(&r, &p, &not_stored, 1_100), Ok(FinishAnswer::Completed { stored: false }));
        assert_eq!(claim_on(&r, &p, &e, "{}", 2, 1_200), Ok(ClaimAnswer::NotStored { status: 201 }));

        let e = exchange(&p, "/v1/payouts", Some("\"k5\""));
        let owner = owner_of(claim_on(&r, &p, &e, "{}", 3, 1_000));
        finish_on(&r, &p, &completed(owner, 200, b"paid"), 1_100).unwrap();
        let key = redis().key(KEY_KIND, e.key_address(&p).unwrap());
        let mut bytes = remote::decode_value(&r.data.borrow()[&key]).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        r.data.borrow_mut().insert(key.clone(), remote::encode_value(&bytes));
        assert_eq!(claim_on(&r, &p, &e, "{}", 4, 1_200), Ok(ClaimAnswer::NotStored { status: 200 }));
        // Bytes this code did not write fail closed.
        r.data.borrow_mut().insert(key.clone(), remote::encode_value(b"short"));
        assert_eq!(claim_on(&r, &p, &e, "{}", 5, 1_200), Err(StateError::Unavailable));
        r.data.borrow_mut().insert(key, "*not base64*".into());
        assert_eq!(claim_on(&r, &p, &e, "{}", 6, 1_200), Err(StateError::Unavailable));
    }

    #[test]
    fn a_claim_whose_answer_was_lost_is_unwound_only_if_it_is_still_this_claims_record() {
        let (p, r) = (policy(), FakeRedis::default());
        let e = exchange(&p, "/v1/payouts", Some("\"k9\""));
        let request = e.claim_request(&p, b"{}", 1).unwrap();
        let lost = claim(&p, &redis(), &request, 1_000);
        let _ = r.run(&lost.command); // Redis applied it; the answer never came back.
        assert_eq!(claim_on(&r, &p, &e, "{}", 2, 1_100), Ok(ClaimAnswer::InFlight));
        let unwind = lost.unwind(&redis()).unwrap();
        let (status, reply) = r.run(&unwind);
        assert_eq!(unwind_answer(&unwind, status, &reply), Ok(true));
        // Free again: the next claim is forwarded.
        let owner = owner_of(claim_on(&r, &p, &e, "{}", 3, 1_200));
        // Unwinding again never touches the new owner's record.
        let (status, reply) = r.run(&unwind);
        assert_eq!(unwind_answer(&unwind, status, &reply), Ok(false));
        assert_eq!(finish_on(&r, &p, &completed(owner, 201, b"ok"), 1_300), Ok(FinishAnswer::Completed { stored: true }));
        assert_eq!(unwind_answer(&unwind, None, b""), Err(StateError::Remote));
        let dup = e.claim_request(&p, b"{}", 4).unwrap();
        assert!(claim(&p, &redis(), &dup, 1).unwind(&redis()).is_some());
        let keyless = exchange(&p, "/v1/transfers", None).claim_request(&p, b"{}", 5).unwrap();
        assert_eq!(claim(&p, &redis(), &keyless, 1).unwind(&redis()), None);
    }

    /// The per-tenant quota on Redis: in the claim's script, counted only for a free key, a
    /// refused claim writes nothing, other tenants are unaffected, and every key has a TTL.
    #[test]
    fn a_tenant_at_its_quota_is_refused_on_redis_and_writes_nothing() {
        let mut p = policy();
        p.key_quota.limit = std::num::NonZeroU32::new(2).unwrap();
        p.collapse_quota.limit = std::num::NonZeroU32::new(1).unwrap();
        let r = FakeRedis::default();
        for (i, key) in ["\"q1\"", "\"q2\""].iter().enumerate() {
            owner_of(claim_on(&r, &p, &exchange(&p, "/v1/payouts", Some(key)), "{}", i as u64 + 1, 1_000));
        }
        let before = r.data.borrow().len();
        let e = exchange(&p, "/v1/payouts", Some("\"q3\""));
        assert_eq!(claim_on(&r, &p, &e, "{}", 3, 1_001), Err(StateError::QuotaExceeded));
        assert_eq!(r.data.borrow().len(), before, "nothing written");
        assert_eq!(ReplayError::from(StateError::QuotaExceeded).rejection().code, "tenant_quota_exceeded");
        // A retry of a held key is answered from its record (the count is not consulted).
        assert_eq!(claim_on(&r, &p, &exchange(&p, "/v1/payouts", Some("\"q1\"")), "{}", 4, 1_002), Ok(ClaimAnswer::InFlight));
        // Collapse: one record per window for alice; a duplicate stays a duplicate.
        let t = exchange(&p, "/v1/transfers", None);
        assert_eq!(claim_on(&r, &p, &t, "{}", 5, 1_000), Ok(ClaimAnswer::Forward { owner: None }));
        assert_eq!(claim_on(&r, &p, &t, "{}", 6, 1_000), Ok(ClaimAnswer::Duplicate));
        assert_eq!(claim_on(&r, &p, &t, "{\"b\":2}", 7, 1_000), Err(StateError::QuotaExceeded));
        // Every key written has a TTL: records, markers and counts.
        let (data, ttl) = (r.data.borrow(), r.ttl.borrow());
        assert!(data.keys().all(|k| ttl.contains_key(k)), "{:?} / {:?}", data.keys().collect::<Vec<_>>(), ttl);
        assert_eq!(
            ttl.iter()
                .filter(|(k, _)| k.starts_with("t:replay:quota:key:"))
                .map(|(_, t)| *t)
                .collect::<Vec<_>>(),
            vec![60_000]
        );
    }

    #[test]
    fn collapse_is_set_nx_for_the_window() {
        let (p, r) = (policy(), FakeRedis::default());
        let e = exchange(&p, "/v1/transfers", None);
        assert_eq!(claim_on(&r, &p, &e, "{}", 1, 1_000), Ok(ClaimAnswer::Forward { owner: None }));
        assert_eq!(claim_on(&r, &p, &e, "{}", 2, 1_001), Ok(ClaimAnswer::Duplicate));
        assert_eq!(claim_on(&r, &p, &e, "{\"other\":1}", 3, 1_001), Ok(ClaimAnswer::Forward { owner: None }));
        assert!(r.ttl.borrow().values().all(|t| *t == 2_000));
    }

    #[test]
    fn no_answer_or_an_unreadable_answer_is_remote_unavailable() {
        let p = policy();
        let e = exchange(&p, "/v1/payouts", Some("\"k6\""));
        let request = e.claim_request(&p, b"{}", 1).unwrap();
        let pending = claim(&p, &redis(), &request, 1_000);
        assert_eq!(pending.answer(&p, None, b""), Err(StateError::Remote));
        assert_eq!(pending.answer(&p, Some(503), b"{}"), Err(StateError::Remote));
        assert_eq!(pending.answer(&p, Some(200), b"<html>"), Err(StateError::Remote));
        assert_eq!(pending.answer(&p, Some(200), br#"{"EVAL":[false,"NOSCRIPT"]}"#), Err(StateError::Remote));
        assert_eq!(pending.answer(&p, Some(200), br#"{"EVAL":"OK"}"#), Err(StateError::Remote));
        let dup = claim(&p, &redis(), &exchange(&p, "/v1/transfers", None).claim_request(&p, b"{}", 1).unwrap(), 1_000);
        assert_eq!(dup.answer(&p, Some(200), br#"{"SET":7}"#), Err(StateError::Remote));
        let owner = owner_of(Ok(ClaimAnswer::Forward {
            owner: Some(Owner {
                key: e.key_address(&p).unwrap(),
                claim_id: 1,
                slot: None,
                record: Record::in_flight([0; 32], 1, 1_000),
            }),
        }));
        let FinishPlan::Send { command, on_success } = finish(&p, &redis(), &completed(owner, 201, b""), 1_100) else { panic!() };
        assert_eq!(finish_answer(&command, on_success, None, b""), Err(StateError::Remote));
        assert_eq!(finish_answer(&command, on_success, Some(200), br#"{"EVAL":"x"}"#), Err(StateError::Remote));
        assert!(describe(&command, None, b"").contains("no answer"));
        assert!(describe(&command, Some(200), br#"{"EVAL":[false,"ERR boom"]}"#).contains("ERR boom"));
    }

    #[test]
    fn operator_clear_reads_decides_and_deletes_only_what_it_read() {
        let (p, r) = (policy(), FakeRedis::default());
        let e = exchange(&p, "/v1/payouts", Some("\"k7\""));
        let key = e.key_address(&p).unwrap();
        let clear = |now: u64| -> Result<Option<ClearAnswer>, StateError> {
            let read = clear_read(&redis(), key);
            let (status, reply) = r.run(&read);
            match clear_after_read(&p, &redis(), key, now, &read, status, &reply)? {
                ClearStep::Done(answer) => Ok(Some(answer)),
                ClearStep::Delete { command, on_success } => {
                    let (status, reply) = r.run(&command);
                    clear_answer(&command, on_success, status, &reply)
                }
            }
        };
        assert_eq!(clear(1_000), Ok(Some(ClearAnswer::NotFound)));
        let owner = owner_of(claim_on(&r, &p, &e, "{}", 1, 1_000));
        assert_eq!(clear(1_100), Ok(Some(ClearAnswer::InFlight)));
        assert_eq!(clear(11_000), Ok(Some(ClearAnswer::Cleared { stale_in_flight: true })));
        let owner2 = owner_of(claim_on(&r, &p, &e, "{}", 2, 12_000));
        finish_on(&r, &p, &FinishRequest { owner: owner2, outcome: Outcome::Unknown { status: 0 } }, 12_100).unwrap();
        assert_eq!(clear(12_200), Ok(Some(ClearAnswer::Cleared { stale_in_flight: false })));
        owner_of(claim_on(&r, &p, &e, "{}", 3, 13_000));
        let _ = owner;
        // Changed between the read and the delete: not cleared.
        let read = clear_read(&redis(), key);
        let (status, reply) = r.run(&read);
        let step = clear_after_read(&p, &redis(), key, 30_000, &read, status, &reply).unwrap();
        let ClearStep::Delete { command, on_success } = step else { panic!("{step:?}") };
        r.data.borrow_mut().clear();
        owner_of(claim_on(&r, &p, &e, "{}", 4, 30_001));
        let (status, reply) = r.run(&command);
        assert_eq!(clear_answer(&command, on_success, status, &reply), Ok(None));
        let read = clear_read(&redis(), key);
        assert_eq!(clear_after_read(&p, &redis(), key, 1, &read, None, b""), Err(StateError::Remote));
    }

    #[test]
    fn reply_bound_covers_the_largest_stored_response() {
        let p = policy();
        let (r, e) = (FakeRedis::default(), exchange(&p, "/v1/payouts", Some("\"k8\"")));
        let owner = owner_of(claim_on(&r, &p, &e, "{}", 1, 1_000));
        let big = FinishRequest {
            owner,
            outcome: Outcome::Completed {
                status: 201,
                response: Some(StoredResponse {
                    status: 201,
                    headers: vec![("location".into(), "x".repeat(2000))],
                    body: vec![0xff; 64],
                }),
            },
        };
        finish_on(&r, &p, &big, 1_100).unwrap();
        let request = e.claim_request(&p, b"{}", 2).unwrap();
        let pending = claim(&p, &redis(), &request, 1_200);
        let (_, reply) = r.run(&pending.command);
        assert!(reply.len() <= max_reply_bytes(&p), "{} > {}", reply.len(), max_reply_bytes(&p));
        assert!(matches!(pending.answer(&p, Some(200), &reply), Ok(ClaimAnswer::Replay(_))));
    }
}
