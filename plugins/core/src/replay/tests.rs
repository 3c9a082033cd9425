use std::cell::{Cell, RefCell};

use super::*;
use crate::store::{MemoryStore, SharedStore, StoreError};

const CONFIG: &str = r#"{
  "routes": [
    {"name": "payouts", "match": {"methods": ["POST"], "path_prefix": "/v1/payouts"}},
    {"name": "refunds", "match": {"methods": ["POST"], "path_prefix": "/v1/refunds"}, "on_uncertain": "release"},
    {"name": "transfers", "match": {"methods": ["POST"], "path_prefix": "/v1/transfers"},
     "idempotency_key": "optional", "collapse_window_ms": 2000},
    {"name": "signed", "match": {"methods": ["POST"], "path_prefix": "/v1/signed"}, "require_principal": true}
  ],
  "ttl_seconds": 60,
  "in_flight_timeout_ms": 10000,
  "max_stored_body_bytes": 64,
  "key_store": {"buckets": 4, "slots_per_bucket": 4, "quota_per_principal": 8}
}"#;

fn policy() -> ReplayPolicy {
    ReplayPolicy::from_json(CONFIG.as_bytes()).unwrap()
}

fn policy_with(extra: &str) -> ReplayPolicy {
    let json = CONFIG.trim_end().trim_end_matches('}').to_string() + "," + extra + "}";
    ReplayPolicy::from_json(json.as_bytes()).unwrap()
}

fn headers(key: Option<&str>) -> Vec<(String, String)> {
    let mut h = vec![(":method".to_string(), "POST".to_string()), ("content-type".into(), "application/json".into())];
    if let Some(k) = key {
        h.push(("idempotency-key".into(), k.into()));
    }
    h
}

/// One request through the whole request side against a store: the verdict and the exchange.
struct Client<'a> {
    policy: &'a ReplayPolicy,
    state: &'a dyn ReplayState,
    next_claim: Cell<u64>,
}

impl<'a> Client<'a> {
    fn new(policy: &'a ReplayPolicy, state: &'a dyn ReplayState) -> Self {
        Client { policy, state, next_claim: Cell::new(1) }
    }

    fn send(
        &self,
        path: &str,
        key: Option<&str>,
        principal: Option<&str>,
        body: &str,
        now: u64,
    ) -> (Result<Decision, ReplayError>, Option<Exchange>) {
        let h = headers(key);
        let facts = RequestFacts { method: "POST", path_and_query: path, headers: &h, principal };
        let mut exchange = match Exchange::begin(self.policy, &facts) {
            Ok(Some(e)) => e,
            Ok(None) => return (Ok(Decision::Forward), None),
            Err((error, _)) => return (Err(error), None),
        };
        let claim_id = self.next_claim.get();
        self.next_claim.set(claim_id + 1);
        let Some(claim) = exchange.claim_request(self.policy, body.as_bytes(), claim_id) else {
            return (Ok(Decision::Forward), Some(exchange));
        };
        let Answer::Now(answer) = self.state.claim(&claim, now) else { panic!("local state answers now") };
        let decision = exchange.on_claim(self.policy, answer);
        (Ok(decision), Some(exchange))
    }

    fn answer(&self, exchange: &mut Exchange, status: u16, body: &str, via_upstream: bool, now: u64) -> Option<FinishAnswer> {
        exchange.on_response_headers(
            self.policy,
            status,
            via_upstream,
            &[("content-type".into(), "application/json".into()), ("x-secret-upstream".into(), "no".into())],
        );
        exchange.on_response_body(self.policy, body.as_bytes());
        self.finish(exchange, true, now)
    }

    fn finish(&self, exchange: &mut Exchange, complete: bool, now: u64) -> Option<FinishAnswer> {
        let request = exchange.finish(self.policy, complete)?;
        let Answer::Now(answer) = self.state.finish(&request, now) else { panic!("local state answers now") };
        Some(answer.unwrap())
    }
}

fn rejected(result: &Result<Decision, ReplayError>) -> Option<ReplayError> {
    match result {
        Err(e) | Ok(Decision::Reject(e)) => Some(e.clone()),
        _ => None,
    }
}

const BODY: &str = r#"{"account":"acc-bob","amount":100,"reference":"r1"}"#;

// ---- configuration ----

#[test]
fn defaults_are_documented_values() {
    let p = ReplayPolicy::from_json(br#"{"routes":[{"name":"p","match":{"path_prefix":"/v1/"}}]}"#).unwrap();
    assert_eq!(p.ttl_ms.get(), 86_400_000);
    assert_eq!(p.in_flight_timeout_ms.get(), 60_000);
    assert_eq!(p.max_key_length, 255);
    assert_eq!(p.max_stored_body_bytes, 4096);
    assert_eq!(p.stored_headers, vec!["content-type", "location"]);
    assert_eq!(p.not_executed_statuses, DEFAULT_NOT_EXECUTED_STATUSES.to_vec());
    assert_eq!(p.replay_marker_header, "idempotent-replayed");
    assert_eq!(p.routes[0].key_mode, KeyMode::Required);
    assert_eq!(p.routes[0].on_uncertain, OnUncertain::Lock);
    assert_eq!(p.routes[0].collapse_window_ms, None);
    assert_eq!(p.key_table.capacity(), 8192);
    assert!(p.max_memory_bytes() < 64 * 1024 * 1024, "{}", p.max_memory_bytes());
}

#[test]
fn the_state_backend_is_local_by_default_and_redis_when_configured() {
    assert_eq!(policy().state, crate::remote::Backend::Local);
    let p = policy_with(r#""state": {"backend": "redis", "cluster": "redis_bridge", "timeout_ms": 100, "key_prefix": "fb"}"#);
    let crate::remote::Backend::Redis(redis) = p.state else { panic!("{:?}", p.state) };
    assert_eq!(
        (redis.cluster.as_str(), redis.timeout_ms.get(), redis.failure_mode),
        ("redis_bridge", 100, crate::remote::FailureMode::Closed)
    );
}

#[test]
fn each_bad_field_is_named() {
    let r = r#"{"name":"p","match":{"path_prefix":"/v1/"}}"#;
    let cases = [
        (r#"{"routes":[]}"#.to_string(), "routes"),
        (r#"{"routes":[{"name":"a b","match":{"path_prefix":"/"}}]}"#.to_string(), "routes[0].name"),
        (r#"{"routes":[{"name":"","match":{"path_prefix":"/"}}]}"#.to_string(), "routes[0].name"),
        (format!(r#"{{"routes":[{r},{r}]}}"#), "routes[1].name"),
        (r#"{"routes":[{"name":"p","match":{"path_prefix":"v1"}}]}"#.to_string(), "routes[0].match"),
        (r#"{"routes":[{"name":"p","match":{"methods":["post"],"path_prefix":"/"}}]}"#.to_string(), "routes[0].match.methods"),
        (
            r#"{"routes":[{"name":"p","match":{"path_prefix":"/"},"idempotency_key":"sometimes"}]}"#.to_string(),
            "routes[0].idempotency_key",
        ),
        (r#"{"routes":[{"name":"p","match":{"path_prefix":"/"},"on_uncertain":"retry"}]}"#.to_string(), "routes[0].on_uncertain"),
        (
            r#"{"routes":[{"name":"p","match":{"path_prefix":"/"},"idempotency_key":"ignored"}]}"#.to_string(),
            "routes[0].collapse_window_ms",
        ),
        (
            r#"{"routes":[{"name":"p","match":{"path_prefix":"/"},"collapse_window_ms":3600001}]}"#.to_string(),
            "routes[0].collapse_window_ms",
        ),
        (format!(r#"{{"routes":[{r}],"ttl_seconds":0}}"#), "ttl_seconds"),
        (format!(r#"{{"routes":[{r}],"ttl_seconds":2592001}}"#), "ttl_seconds"),
        (format!(r#"{{"routes":[{r}],"ttl_seconds":10,"in_flight_timeout_ms":10000}}"#), "in_flight_timeout_ms"),
        (format!(r#"{{"routes":[{r}],"in_flight_timeout_ms":0}}"#), "in_flight_timeout_ms"),
        (format!(r#"{{"routes":[{r}],"max_key_length":0}}"#), "max_key_length"),
        (format!(r#"{{"routes":[{r}],"max_key_length":1025}}"#), "max_key_length"),
        (format!(r#"{{"routes":[{r}],"max_body_bytes":0}}"#), "max_body_bytes"),
        (format!(r#"{{"routes":[{r}],"max_stored_body_bytes":1048577}}"#), "max_stored_body_bytes"),
        (format!(r#"{{"routes":[{r}],"stored_headers":["content-length"]}}"#), "stored_headers[0]"),
        (format!(r#"{{"routes":[{r}],"stored_headers":["ok","bad header"]}}"#), "stored_headers[1]"),
        (format!(r#"{{"routes":[{r}],"stored_headers":["a","A"]}}"#), "stored_headers[1]"),
        (format!(r#"{{"routes":[{r}],"not_executed_statuses":[404,503]}}"#), "not_executed_statuses[1]"),
        (format!(r#"{{"routes":[{r}],"replay_marker_header":""}}"#), "replay_marker_header"),
        (format!(r#"{{"routes":[{r}],"replay_marker_header":"content-type"}}"#), "replay_marker_header"),
        (format!(r#"{{"routes":[{r}],"key_store":{{"buckets":0,"slots_per_bucket":1}}}}"#), "key_store.buckets"),
        (format!(r#"{{"routes":[{r}],"key_store":{{"buckets":1,"slots_per_bucket":0}}}}"#), "key_store.slots_per_bucket"),
        (
            format!(r#"{{"routes":[{r}],"collapse_store":{{"buckets":1,"slots_per_bucket":257}}}}"#),
            "collapse_store.slots_per_bucket",
        ),
        (format!(r#"{{"routes":[{r}],"operator_clear":{{"path":"ops","principals":["a"]}}}}"#), "operator_clear.path"),
        (format!(r#"{{"routes":[{r}],"operator_clear":{{"path":"/v1/clear","principals":["a"]}}}}"#), "operator_clear.path"),
        (format!(r#"{{"routes":[{r}],"operator_clear":{{"path":"/ops//clear","principals":["a"]}}}}"#), "operator_clear.path"),
        (format!(r#"{{"routes":[{r}],"operator_clear":{{"path":"/ops/%63lear","principals":["a"]}}}}"#), "operator_clear.path"),
        (format!(r#"{{"routes":[{r}],"operator_clear":{{"path":"/ops/clear","principals":[]}}}}"#), "operator_clear.principals"),
        (
            format!(r#"{{"routes":[{r}],"operator_clear":{{"path":"/ops/clear","principals":["a b"]}}}}"#),
            "operator_clear.principals[0]",
        ),
        (format!(r#"{{"routes":[{r}],"state":{{"backend":"redis"}}}}"#), "state.cluster"),
        (format!(r#"{{"routes":[{r}],"state":{{"backend":"memcached"}}}}"#), "state.backend"),
        (format!(r#"{{"routes":[{r}],"state":{{"backend":"redis","cluster":"c","timeout_ms":0}}}}"#), "state.timeout_ms"),
        (format!(r#"{{"routes":[{r}],"state":{{"backend":"redis","cluster":"c","key_prefix":"a/b"}}}}"#), "state.key_prefix"),
        (
            format!(r#"{{"routes":[{r}],"state":{{"backend":"redis","cluster":"c","failure_mode":"open"}}}}"#),
            "state.failure_mode",
        ),
        (
            format!(r#"{{"routes":[{r}],"state":{{"backend":"redis","cluster":"c","failure_mode":"maybe"}}}}"#),
            "state.failure_mode",
        ),
        (format!(r#"{{"routes":[{r}],"state":{{"backend":"redis","cluster":"c","ttl":1}}}}"#), "state"),
        (format!(r#"{{"routes":[{r}],"state":"redis"}}"#), "state"),
    ];
    for (json, field) in cases {
        let err = ReplayPolicy::from_json(json.as_bytes()).unwrap_err();
        assert_eq!(err.field, field, "{json}: {err}");
    }
    let err = ReplayPolicy::from_json(br#"{"routes":[],"ttl":1}"#).unwrap_err();
    assert!(err.message.contains("ttl"), "{err}");
    let err = ReplayPolicy::from_json(b"not json").unwrap_err();
    assert_eq!(err.field, "<configuration>");
}

// ---- the Idempotency-Key header ----

#[test]
fn idempotency_key_is_an_sf_string_of_bounded_length() {
    assert_eq!(parse_idempotency_key(r#""8e03978e-40d5-43e8""#, 255), Ok("8e03978e-40d5-43e8".into()));
    assert_eq!(parse_idempotency_key(r#""a";p=1"#, 255), Ok("a".into()), "parameters are ignored");
    assert_eq!(parse_idempotency_key(r#"  "a"  "#, 255), Ok("a".into()));
    for bad in ["8e03978e", r#""""#, r#""a", "b""#, "?1", "42", ":YWJj:", r#""unterminated"#, r#""tab	x""#, "\"é\""] {
        assert!(matches!(parse_idempotency_key(bad, 255), Err(ReplayError::KeyInvalid(_))), "{bad:?} must be refused");
    }
    assert!(parse_idempotency_key(&format!("\"{}\"", "k".repeat(255)), 255).is_ok());
    assert!(parse_idempotency_key(&format!("\"{}\"", "k".repeat(256)), 255).is_err());
    assert!(parse_idempotency_key(&format!("\"{}\"", "k".repeat(100_000)), 255).is_err());
}

#[test]
fn header_checks_come_first() {
    let p = policy();
    let store = MemoryStore::default();
    let state = LocalState { policy: &p, store: &store };
    let c = Client::new(&p, &state);
    assert_eq!(rejected(&c.send("/v1/payouts", None, None, BODY, 0).0), Some(ReplayError::KeyMissing));
    assert!(matches!(rejected(&c.send("/v1/payouts", Some("bare-token"), None, BODY, 0).0), Some(ReplayError::KeyInvalid(_))));
    assert_eq!(rejected(&c.send("/v1/signed", Some("\"k\""), None, BODY, 0).0), Some(ReplayError::PrincipalRequired));
    // Repeated header.
    let mut h = headers(Some("\"a\""));
    h.push(("idempotency-key".into(), "\"b\"".into()));
    let facts = RequestFacts { method: "POST", path_and_query: "/v1/payouts", headers: &h, principal: None };
    assert_eq!(Exchange::begin(&p, &facts).unwrap_err().0, ReplayError::KeyDuplicated);
    // Too large by content-length.
    let mut h = headers(Some("\"a\""));
    h.push(("content-length".into(), "1048577".into()));
    let facts = RequestFacts { method: "POST", path_and_query: "/v1/payouts", headers: &h, principal: None };
    assert_eq!(Exchange::begin(&p, &facts).unwrap_err().0, ReplayError::BodyTooLarge);
    // Unprotected: other method or path.
    let facts = RequestFacts { method: "GET", path_and_query: "/v1/payouts", headers: &[], principal: None };
    assert!(Exchange::begin(&p, &facts).unwrap().is_none());
    // Nothing was stored by refused requests.
    assert_eq!(p.key_table.live_records(&store, 0), Ok(0));
}

#[test]
fn every_rejection_has_a_status_a_stable_code_and_json() {
    let all = [
        ReplayError::KeyMissing,
        ReplayError::KeyDuplicated,
        ReplayError::KeyInvalid("x"),
        ReplayError::PrincipalRequired,
        ReplayError::BodyTooLarge,
        ReplayError::Mismatch,
        ReplayError::InFlight,
        ReplayError::OutcomeUnknown,
        ReplayError::Duplicate,
        ReplayError::NotStored { status: 201 },
        ReplayError::StoreFull,
        ReplayError::StateUnavailable,
    ];
    let expect = [
        (400, "idempotency_key_missing"),
        (400, "idempotency_key_duplicated"),
        (400, "idempotency_key_invalid"),
        (401, "principal_required"),
        (413, "body_too_large"),
        (422, "idempotency_key_mismatch"),
        (409, "request_in_flight"),
        (409, "outcome_unknown"),
        (409, "duplicate_request"),
        (409, "response_not_stored"),
        (503, "replay_store_full"),
        (503, "replay_state_unavailable"),
    ];
    for (error, (status, code)) in all.iter().zip(expect) {
        let r = error.rejection();
        assert_eq!((r.status, r.code), (status, code));
        let v: serde_json::Value = serde_json::from_slice(&r.body()).unwrap();
        assert_eq!(v["error"], code);
    }
    assert!(ReplayError::NotStored { status: 201 }
        .rejection()
        .headers
        .contains(&(ORIGINAL_STATUS_HEADER.into(), "201".into())));
}

// ---- the key lifecycle ----

#[test]
fn incident_2_payout_retried_after_a_completed_answer_is_replayed_not_repeated() {
    let p = policy();
    let store = MemoryStore::default();
    let state = LocalState { policy: &p, store: &store };
    let c = Client::new(&p, &state);
    let (first, ex) = c.send("/v1/payouts", Some("\"k1\""), None, BODY, 1000);
    assert_eq!(first, Ok(Decision::Forward));
    let mut ex = ex.unwrap();
    assert!(ex.owns_key());

    // While in flight.
    let (second, _) = c.send("/v1/payouts", Some("\"k1\""), None, BODY, 1100);
    assert_eq!(rejected(&second), Some(ReplayError::InFlight));

    assert_eq!(c.answer(&mut ex, 201, r#"{"id":"op-1"}"#, true, 1200), Some(FinishAnswer::Completed { stored: true }));
    assert_eq!(ex.finish(&p, true), None, "finishing twice writes nothing");

    for now in [1300, 30_000, 60_999] {
        let (replay, _) = c.send("/v1/payouts", Some("\"k1\""), None, BODY, now);
        let Ok(Decision::Replay(response)) = replay else { panic!("{replay:?}") };
        assert_eq!(response.status, 201);
        assert_eq!(response.body, br#"{"id":"op-1"}"#);
        assert_eq!(
            response.headers,
            vec![("content-type".into(), "application/json".into()), ("idempotent-replayed".into(), "true".into())],
            "only the configured headers, plus the marker"
        );
    }
    // Same key, another body / path / query: 422, at any state.
    assert_eq!(rejected(&c.send("/v1/payouts", Some("\"k1\""), None, r#"{"amount":101}"#, 1400).0), Some(ReplayError::Mismatch));
    assert_eq!(rejected(&c.send("/v1/payouts?x=1", Some("\"k1\""), None, BODY, 1400).0), Some(ReplayError::Mismatch));
    assert_eq!(rejected(&c.send("/v1/payouts/batch", Some("\"k1\""), None, BODY, 1400).0), Some(ReplayError::Mismatch));
    // TTL edge: the record lives for exactly ttl from the claim.
    let (after_ttl, _) = c.send("/v1/payouts", Some("\"k1\""), None, BODY, 61_000);
    assert_eq!(after_ttl, Ok(Decision::Forward));
}

#[test]
fn keys_are_scoped_to_principal_and_route() {
    let p = policy();
    let store = MemoryStore::default();
    let state = LocalState { policy: &p, store: &store };
    let c = Client::new(&p, &state);
    assert_eq!(c.send("/v1/payouts", Some("\"k\""), Some("alice"), BODY, 0).0, Ok(Decision::Forward));
    assert_eq!(c.send("/v1/payouts", Some("\"k\""), Some("bob"), BODY, 0).0, Ok(Decision::Forward));
    assert_eq!(c.send("/v1/payouts", Some("\"k\""), None, BODY, 0).0, Ok(Decision::Forward));
    assert_eq!(c.send("/v1/refunds", Some("\"k\""), Some("alice"), BODY, 0).0, Ok(Decision::Forward));
    assert_eq!(rejected(&c.send("/v1/payouts", Some("\"k\""), Some("alice"), BODY, 1).0), Some(ReplayError::InFlight));
}

#[test]
fn incident_2_an_uncertain_answer_locks_the_key() {
    let p = policy();
    let store = MemoryStore::default();
    let state = LocalState { policy: &p, store: &store };
    let c = Client::new(&p, &state);
    // 503 from the upstream, 504 local reply (timeout), reset with no answer: all outcome_unknown.
    for (key, status, via_upstream) in
        [("\"a\"", Some(503), true), ("\"b\"", Some(504), false), ("\"c\"", None, false), ("\"d\"", Some(200), false)]
    {
        let (_, ex) = c.send("/v1/payouts", Some(key), None, BODY, 0);
        let mut ex = ex.unwrap();
        let answer = match status {
            Some(s) => c.answer(&mut ex, s, "oops", via_upstream, 10),
            None => c.finish(&mut ex, false, 10),
        };
        assert_eq!(answer, Some(FinishAnswer::OutcomeUnknown), "{key}");
        assert_eq!(rejected(&c.send("/v1/payouts", Some(key), None, BODY, 20).0), Some(ReplayError::OutcomeUnknown), "{key}");
        assert_eq!(rejected(&c.send("/v1/payouts", Some(key), None, BODY, 59_999).0), Some(ReplayError::OutcomeUnknown), "{key}");
        assert_eq!(c.send("/v1/payouts", Some(key), None, BODY, 60_000).0, Ok(Decision::Forward), "{key}: TTL ends it");
    }
}

#[test]
fn a_route_safe_to_repeat_releases_the_key_on_uncertain_answers() {
    let p = policy();
    let store = MemoryStore::default();
    let state = LocalState { policy: &p, store: &store };
    let c = Client::new(&p, &state);
    let (_, ex) = c.send("/v1/refunds", Some("\"r\""), None, BODY, 0);
    assert_eq!(c.answer(&mut ex.unwrap(), 503, "", true, 1), Some(FinishAnswer::Released));
    let (again, ex) = c.send("/v1/refunds", Some("\"r\""), None, BODY, 2);
    assert_eq!(again, Ok(Decision::Forward));
    assert_eq!(c.finish(&mut ex.unwrap(), false, 3), Some(FinishAnswer::Released));
    assert_eq!(c.send("/v1/refunds", Some("\"r\""), None, BODY, 4).0, Ok(Decision::Forward));
}

#[test]
fn answers_that_prove_nothing_executed_free_the_key_and_others_are_replayed() {
    let mut p = policy().tap_key_store(64, 8);
    // Every claim counts on the quota, released or not: this test makes 50 of them.
    p.key_quota.limit = std::num::NonZeroU32::new(1000).unwrap();
    let store = MemoryStore::default();
    let state = LocalState { policy: &p, store: &store };
    let c = Client::new(&p, &state);
    for status in DEFAULT_NOT_EXECUTED_STATUSES {
        let key = format!("\"s{status}\"");
        let (_, ex) = c.send("/v1/payouts", Some(&key), None, BODY, 0);
        assert_eq!(c.answer(&mut ex.unwrap(), status, "{}", true, 1), Some(FinishAnswer::Released), "{status}");
        assert_eq!(c.send("/v1/payouts", Some(&key), None, BODY, 2).0, Ok(Decision::Forward), "{status}");
    }
    // Other 4xx do not say the request was not applied (402 "payment required" can be a
    // processed decline, 424 a failed dependency after partial work): they are the answer.
    for status in [402, 423, 424, 451, 302, 200] {
        let key = format!("\"t{status}\"");
        let (_, ex) = c.send("/v1/payouts", Some(&key), None, BODY, 0);
        assert_eq!(c.answer(&mut ex.unwrap(), status, "{}", true, 1), Some(FinishAnswer::Completed { stored: true }), "{status}");
        let (replay, _) = c.send("/v1/payouts", Some(&key), None, BODY, 2);
        assert!(matches!(replay, Ok(Decision::Replay(ref r)) if r.status == status), "{status}: {replay:?}");
    }
    // The same statuses as local replies (not via the upstream) prove nothing.
    let (_, ex) = c.send("/v1/payouts", Some("\"local403\""), None, BODY, 0);
    assert_eq!(c.answer(&mut ex.unwrap(), 403, "{}", false, 1), Some(FinishAnswer::OutcomeUnknown));
}

/// A later Firebreak filter's refusal (amount-limit's 429, a local reply with
/// `x-firebreak-error`) was never forwarded: the key is released, a retry may go through. The same
/// header from the upstream, or Envoy's own local reply without it, proves nothing of the kind.
#[test]
fn a_later_firebreak_refusal_releases_the_key() {
    let p = policy();
    let store = MemoryStore::default();
    let state = LocalState { policy: &p, store: &store };
    let c = Client::new(&p, &state);
    let refusal = [
        ("content-type".to_string(), "application/json".to_string()),
        ("x-firebreak-error".to_string(), "amount_limited".to_string()),
    ];
    let (_, ex) = c.send("/v1/payouts", Some("\"limited\""), None, BODY, 0);
    let mut ex = ex.unwrap();
    ex.on_response_headers(&p, 429, false, &refusal);
    assert_eq!(c.finish(&mut ex, true, 1), Some(FinishAnswer::Released));
    assert!(matches!(c.send("/v1/payouts", Some("\"limited\""), None, BODY, 2).0, Ok(Decision::Forward)));
    let (_, ex) = c.send("/v1/payouts", Some("\"upstream\""), None, BODY, 0);
    let mut ex = ex.unwrap();
    ex.on_response_headers(&p, 503, true, &refusal);
    assert_eq!(c.finish(&mut ex, true, 1), Some(FinishAnswer::OutcomeUnknown));
    let (_, ex) = c.send("/v1/payouts", Some("\"timeout\""), None, BODY, 0);
    let mut ex = ex.unwrap();
    ex.on_response_headers(&p, 504, false, &refusal[..1]);
    assert_eq!(c.finish(&mut ex, true, 1), Some(FinishAnswer::OutcomeUnknown));
}

#[test]
fn a_response_too_large_to_store_completes_the_key_without_a_body() {
    let p = policy();
    let store = MemoryStore::default();
    let state = LocalState { policy: &p, store: &store };
    let c = Client::new(&p, &state);
    let (_, ex) = c.send("/v1/payouts", Some("\"big\""), None, BODY, 0);
    let mut ex = ex.unwrap();
    ex.on_response_headers(&p, 201, true, &[]);
    ex.on_response_body(&p, &[b'x'; 40]);
    assert_eq!(ex.body_room(&p), 24);
    ex.on_response_body(&p, &[b'x'; 40]);
    assert_eq!(ex.body_room(&p), 0);
    assert_eq!(c.finish(&mut ex, true, 1), Some(FinishAnswer::Completed { stored: false }));
    assert_eq!(rejected(&c.send("/v1/payouts", Some("\"big\""), None, BODY, 2).0), Some(ReplayError::NotStored { status: 201 }));

    // An answer cut short after its status: completed, body not stored.
    let (_, ex) = c.send("/v1/payouts", Some("\"cut\""), None, BODY, 0);
    let mut ex = ex.unwrap();
    ex.on_response_headers(&p, 201, true, &[]);
    ex.on_response_body(&p, b"{\"id\":");
    assert_eq!(c.finish(&mut ex, false, 1), Some(FinishAnswer::Completed { stored: false }));
    assert_eq!(rejected(&c.send("/v1/payouts", Some("\"cut\""), None, BODY, 2).0), Some(ReplayError::NotStored { status: 201 }));
}

// ---- in-flight owners that die ----

#[test]
fn an_in_flight_record_whose_owner_died_becomes_outcome_unknown_never_free() {
    let p = policy();
    let store = MemoryStore::default();
    let state = LocalState { policy: &p, store: &store };
    let c = Client::new(&p, &state);
    let (_, ex) = c.send("/v1/payouts", Some("\"dead\""), None, BODY, 0);
    let mut ex = ex.unwrap();
    assert_eq!(rejected(&c.send("/v1/payouts", Some("\"dead\""), None, BODY, 9_999).0), Some(ReplayError::InFlight));
    assert_eq!(rejected(&c.send("/v1/payouts", Some("\"dead\""), None, BODY, 10_000).0), Some(ReplayError::OutcomeUnknown));
    assert_eq!(rejected(&c.send("/v1/payouts", Some("\"dead\""), None, BODY, 59_999).0), Some(ReplayError::OutcomeUnknown));
    // The slow owner was alive after all: its answer still lands and becomes the truth.
    assert_eq!(c.answer(&mut ex, 201, "{\"ok\":1}", true, 20_000), Some(FinishAnswer::Completed { stored: true }));
    assert!(matches!(c.send("/v1/payouts", Some("\"dead\""), None, BODY, 20_001).0, Ok(Decision::Replay(_))));
}

// ---- slot reuse ----

fn tiny_policy() -> ReplayPolicy {
    policy_with(r#""collapse_store": {"buckets": 1, "slots_per_bucket": 1}"#).tap_key_store(1, 1)
}

trait TapKeyStore {
    fn tap_key_store(self, buckets: u32, slots: u16) -> Self;
}
impl TapKeyStore for ReplayPolicy {
    fn tap_key_store(mut self, buckets: u32, slots: u16) -> Self {
        self.key_table = crate::store::BucketTable::new(
            KEY_TABLE_PREFIX,
            std::num::NonZeroU32::new(buckets).unwrap(),
            std::num::NonZeroU16::new(slots).unwrap(),
            RECORD_LEN as u16,
        );
        self
    }
}

#[test]
fn a_full_table_refuses_and_an_expired_slot_is_reused() {
    let p = tiny_policy();
    let store = MemoryStore::default();
    let state = LocalState { policy: &p, store: &store };
    let c = Client::new(&p, &state);
    assert_eq!(c.send("/v1/payouts", Some("\"a\""), None, BODY, 0).0, Ok(Decision::Forward));
    assert_eq!(rejected(&c.send("/v1/payouts", Some("\"b\""), None, BODY, 1).0), Some(ReplayError::StoreFull));
    assert_eq!(rejected(&c.send("/v1/payouts", Some("\"a\""), None, BODY, 1).0), Some(ReplayError::InFlight), "a is remembered");
    assert_eq!(c.send("/v1/payouts", Some("\"b\""), None, BODY, 60_000).0, Ok(Decision::Forward), "a expired");
    assert_eq!(ReplayError::StoreFull.rejection().status, 503);
}

#[test]
fn a_stale_companion_is_never_replayed_for_the_key_that_reused_its_slot() {
    let p = tiny_policy();
    let store = MemoryStore::default();
    let state = LocalState { policy: &p, store: &store };
    let c = Client::new(&p, &state);
    // Key a completes with a stored body.
    let (_, ex) = c.send("/v1/payouts", Some("\"a\""), None, BODY, 0);
    c.answer(&mut ex.unwrap(), 201, "{\"for\":\"a\"}", true, 1);
    // Key b reuses the slot after a's TTL, same fingerprint even; its answer is too large to store.
    let (_, ex) = c.send("/v1/payouts", Some("\"b\""), None, BODY, 60_000);
    let mut ex = ex.unwrap();
    ex.on_response_headers(&p, 201, true, &[]);
    ex.on_response_body(&p, &[b'y'; 65]);
    assert_eq!(c.finish(&mut ex, true, 60_001), Some(FinishAnswer::Completed { stored: false }));
    // b's retry must not get a's body, which still sits in the companion key.
    assert_eq!(
        rejected(&c.send("/v1/payouts", Some("\"b\""), None, BODY, 60_002).0),
        Some(ReplayError::NotStored { status: 201 })
    );
}

#[test]
fn a_late_owner_whose_record_expired_cannot_overwrite_the_new_keys_answer() {
    let p = tiny_policy();
    let store = MemoryStore::default();
    let state = LocalState { policy: &p, store: &store };
    let c = Client::new(&p, &state);
    let (_, late) = c.send("/v1/payouts", Some("\"a\""), None, BODY, 0);
    let mut late = late.unwrap();
    let (_, ex) = c.send("/v1/payouts", Some("\"b\""), None, BODY, 60_000);
    assert_eq!(c.answer(&mut ex.unwrap(), 201, "{\"for\":\"b\"}", true, 60_001), Some(FinishAnswer::Completed { stored: true }));
    // a's answer arrives after its TTL: not the owner any more, writes nothing.
    assert_eq!(c.answer(&mut late, 201, "{\"for\":\"a\"}", true, 60_002), Some(FinishAnswer::NotOwner));
    let Ok(Decision::Replay(r)) = c.send("/v1/payouts", Some("\"b\""), None, BODY, 60_003).0 else { panic!() };
    assert_eq!(r.body, b"{\"for\":\"b\"}");
}

#[test]
fn a_companion_overwritten_behind_the_records_back_is_not_replayed() {
    let p = tiny_policy();
    let store = MemoryStore::default();
    let state = LocalState { policy: &p, store: &store };
    let c = Client::new(&p, &state);
    let (_, ex) = c.send("/v1/payouts", Some("\"a\""), None, BODY, 0);
    c.answer(&mut ex.unwrap(), 201, "{\"for\":\"a\"}", true, 1);
    let forged = StoredResponse { status: 200, headers: vec![], body: b"forged".to_vec() };
    store.set(&format!("{RESPONSE_PREFIX}:0:0"), &forged.encode(1).unwrap(), 0).unwrap();
    assert_eq!(rejected(&c.send("/v1/payouts", Some("\"a\""), None, BODY, 2).0), Some(ReplayError::NotStored { status: 201 }));
}

#[test]
fn corrupt_records_fail_closed() {
    let p = tiny_policy();
    let store = MemoryStore::default();
    let state = LocalState { policy: &p, store: &store };
    let c = Client::new(&p, &state);
    store.set(&format!("{KEY_TABLE_PREFIX}:0"), &[9, 9], 0).unwrap();
    assert_eq!(rejected(&c.send("/v1/payouts", Some("\"a\""), None, BODY, 0).0), Some(ReplayError::StateUnavailable));
    // A well-formed slot holding a payload this code did not write.
    let garbage = crate::store::BucketTable::new(KEY_TABLE_PREFIX, std::num::NonZeroU32::MIN, std::num::NonZeroU16::MIN, 200);
    let store = MemoryStore::default();
    let h = headers(Some("\"a\""));
    let facts = RequestFacts { method: "POST", path_and_query: "/v1/payouts", headers: &h, principal: None };
    let ex = Exchange::begin(&p, &facts).unwrap().unwrap();
    let Some(ClaimRequest::Key { key, .. }) = ex.claim_request(&p, BODY.as_bytes(), 1) else { panic!() };
    garbage
        .update(&store, key, 0, |_| crate::store::Update::Write { payload: vec![7; 10], expires_at_ms: 100, result: () })
        .unwrap();
    let state = LocalState { policy: &p, store: &store };
    let c = Client::new(&p, &state);
    assert_eq!(rejected(&c.send("/v1/payouts", Some("\"a\""), None, BODY, 0).0), Some(ReplayError::StateUnavailable));
}

#[test]
fn an_unavailable_store_fails_closed() {
    struct Down;
    impl SharedStore for Down {
        fn get(&self, _: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
            Err(StoreError::Unavailable)
        }
        fn set(&self, _: &str, _: &[u8], _: u32) -> Result<(), StoreError> {
            Err(StoreError::Unavailable)
        }
    }
    let p = policy();
    let state = LocalState { policy: &p, store: &Down };
    let c = Client::new(&p, &state);
    assert_eq!(rejected(&c.send("/v1/payouts", Some("\"a\""), None, BODY, 0).0), Some(ReplayError::StateUnavailable));
    assert_eq!(rejected(&c.send("/v1/transfers", None, None, BODY, 0).0), Some(ReplayError::StateUnavailable));
}

// ---- duplicate collapse ----

#[test]
fn incident_1_identical_requests_without_a_key_are_collapsed_within_the_window() {
    let p = policy();
    let store = MemoryStore::default();
    let state = LocalState { policy: &p, store: &store };
    let c = Client::new(&p, &state);
    assert_eq!(c.send("/v1/transfers", None, Some("alice"), BODY, 0).0, Ok(Decision::Forward));
    for now in [0, 1, 1999] {
        assert_eq!(rejected(&c.send("/v1/transfers", None, Some("alice"), BODY, now).0), Some(ReplayError::Duplicate));
    }
    assert_eq!(c.send("/v1/transfers", None, Some("bob"), BODY, 1).0, Ok(Decision::Forward), "other principal");
    assert_eq!(c.send("/v1/transfers", None, Some("alice"), "{\"amount\":2}", 1).0, Ok(Decision::Forward), "other body");
    assert_eq!(c.send("/v1/transfers", None, Some("alice"), BODY, 2000).0, Ok(Decision::Forward), "window over");
    // A keyed request on the same route follows key semantics, not the collapse window.
    assert_eq!(c.send("/v1/transfers", Some("\"k\""), Some("alice"), BODY, 2000).0, Ok(Decision::Forward));
    // Collapse records never own a key: nothing to finish.
    let (_, ex) = c.send("/v1/transfers", None, Some("carol"), BODY, 0);
    assert_eq!(c.finish(&mut ex.unwrap(), true, 1), None);
}

#[test]
fn a_full_collapse_table_fails_closed() {
    let p = tiny_policy();
    let store = MemoryStore::default();
    let state = LocalState { policy: &p, store: &store };
    let c = Client::new(&p, &state);
    assert_eq!(c.send("/v1/transfers", None, None, "1", 0).0, Ok(Decision::Forward));
    // Another tenant (its own quota) finds the one slot taken.
    assert_eq!(rejected(&c.send("/v1/transfers", None, Some("bob"), "2", 0).0), Some(ReplayError::StoreFull));
    assert_eq!(c.send("/v1/transfers", None, Some("bob"), "2", 2000).0, Ok(Decision::Forward));
}

// ---- concurrency across workers ----

/// Two workers both read the bucket as absent before either writes; Envoy inserts an absent key
/// whatever the CAS, so only the table's sentinel CAS keeps both claims from winning.
#[test]
fn two_workers_that_both_saw_the_key_absent_do_not_both_forward() {
    struct StaleOnce<'a> {
        store: &'a MemoryStore,
        stale: Cell<bool>,
    }
    impl SharedStore for StaleOnce<'_> {
        fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
            if self.stale.replace(false) {
                return Ok(None);
            }
            self.store.get(key)
        }
        fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
            self.store.set(key, value, cas)
        }
    }
    let p = policy();
    let store = MemoryStore::default();
    let worker1 = LocalState { policy: &p, store: &store };
    let late = StaleOnce { store: &store, stale: Cell::new(true) };
    let worker2 = LocalState { policy: &p, store: &late };
    assert_eq!(Client::new(&p, &worker1).send("/v1/payouts", Some("\"k\""), None, BODY, 0).0, Ok(Decision::Forward));
    assert_eq!(
        rejected(&Client::new(&p, &worker2).send("/v1/payouts", Some("\"k\""), None, BODY, 0).0),
        Some(ReplayError::InFlight)
    );
    assert!(!late.stale.get(), "the stale read happened");
}

#[test]
fn incident_1_fifty_threads_one_key_exactly_one_forward() {
    let p = policy();
    let store = MemoryStore::default();
    let forwards = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for t in 0..50u64 {
            let (p, store, forwards) = (&p, &store, &forwards);
            s.spawn(move || {
                let state = LocalState { policy: p, store };
                let c = Client::new(p, &state);
                c.next_claim.set(t * 1000 + 1);
                let (decision, _) = c.send("/v1/payouts", Some("\"same\""), None, BODY, 5);
                match decision {
                    Ok(Decision::Forward) => {
                        forwards.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    other => assert_eq!(rejected(&other), Some(ReplayError::InFlight)),
                }
                // The collapse path as well.
                let (decision, _) = c.send("/v1/transfers", None, None, BODY, 5);
                if decision == Ok(Decision::Forward) {
                    forwards.fetch_add(1000, std::sync::atomic::Ordering::SeqCst);
                }
            });
        }
    });
    assert_eq!(forwards.load(std::sync::atomic::Ordering::SeqCst), 1001);
}

// ---- a store that answers later ----

/// Queues every operation and answers only when the test says so: the decisions must not
/// depend on when the answer arrives.
struct Deferred<'a> {
    inner: LocalState<'a>,
    queue: RefCell<Vec<ClaimRequest>>,
}

impl ReplayState for Deferred<'_> {
    fn claim(&self, request: &ClaimRequest, _now_ms: u64) -> Answer<Result<ClaimAnswer, StateError>> {
        self.queue.borrow_mut().push(request.clone());
        Answer::Later
    }
    fn finish(&self, request: &FinishRequest, now_ms: u64) -> Answer<Result<FinishAnswer, StateError>> {
        self.inner.finish(request, now_ms)
    }
    fn clear(&self, key: crate::store::KeyHash, now_ms: u64) -> Answer<Result<ClearAnswer, StateError>> {
        self.inner.clear(key, now_ms)
    }
    fn peek(&self, key: crate::store::KeyHash, now_ms: u64) -> Answer<Result<Option<Record>, StateError>> {
        self.inner.peek(key, now_ms)
    }
}

#[test]
fn a_store_that_answers_later_gets_the_same_decisions() {
    let p = policy();
    let store = MemoryStore::default();
    let deferred = Deferred { inner: LocalState { policy: &p, store: &store }, queue: RefCell::new(Vec::new()) };
    let h = headers(Some("\"later\""));
    let facts = RequestFacts { method: "POST", path_and_query: "/v1/payouts", headers: &h, principal: Some("alice") };
    let mut exchanges: Vec<Exchange> = (0..3).map(|_| Exchange::begin(&p, &facts).unwrap().unwrap()).collect();
    for (i, ex) in exchanges.iter().enumerate() {
        let claim = ex.claim_request(&p, BODY.as_bytes(), i as u64 + 1).unwrap();
        assert_eq!(deferred.claim(&claim, 0), Answer::Later);
    }
    // Answers arrive in reverse order.
    let queue = deferred.queue.borrow().clone();
    let mut decisions = Vec::new();
    for (i, claim) in queue.iter().enumerate().rev() {
        let Answer::Now(answer) = deferred.inner.claim(claim, 1) else { panic!() };
        decisions.push((i, exchanges[i].on_claim(&p, answer)));
    }
    assert_eq!(decisions[0], (2, Decision::Forward));
    assert_eq!(decisions[1], (1, Decision::Reject(ReplayError::InFlight)));
    assert_eq!(decisions[2], (0, Decision::Reject(ReplayError::InFlight)));
    let owner = &mut exchanges[2];
    owner.on_response_headers(&p, 201, true, &[]);
    owner.on_response_body(&p, b"done");
    let request = owner.finish(&p, true).unwrap();
    assert_eq!(deferred.finish(&request, 2), Answer::Now(Ok(FinishAnswer::Completed { stored: true })));
}

// ---- encodings ----

/// Fuzz regression (fuzz/regressions/shared_data/record-unused-fields): the fields a state does
/// not use must be zero as written, so that every decoded record re-encodes to its bytes.
#[test]
fn a_record_with_bytes_in_its_unused_fields_is_foreign() {
    let in_flight = Record::in_flight([3; 32], 42, 99).encode();
    let digest_at = RECORD_LEN - 32;
    let status_at = digest_at - 3;
    let mut with_status = in_flight.clone();
    with_status[status_at + 1] = 5;
    assert_eq!(Record::decode(&with_status), None);
    let mut with_digest = in_flight.clone();
    with_digest[digest_at] = 1;
    assert_eq!(Record::decode(&with_digest), None);
    for state in [KeyState::OutcomeUnknown { status: 503 }, KeyState::Completed { status: 201, response: StoredBody::NotStored }]
    {
        let mut bytes = Record { state, fingerprint: [3; 32], claim_id: 1, claimed_at_ms: 2 }.encode();
        bytes[RECORD_LEN - 1] = 1;
        assert_eq!(Record::decode(&bytes), None, "{state:?}");
    }
}

#[test]
fn records_and_companions_round_trip_and_refuse_foreign_bytes() {
    let states = [
        KeyState::InFlight,
        KeyState::Completed { status: 201, response: StoredBody::Stored([7; 32]) },
        KeyState::Completed { status: 201, response: StoredBody::NotStored },
        KeyState::OutcomeUnknown { status: 0 },
    ];
    for state in states {
        let r = Record { state, fingerprint: [3; 32], claim_id: 42, claimed_at_ms: 99 };
        assert_eq!(Record::decode(&r.encode()), Some(r));
        let mut bad = r.encode();
        bad[0] = 2;
        assert_eq!(Record::decode(&bad), None);
        assert_eq!(Record::decode(&r.encode()[1..]), None);
    }
    let resp = StoredResponse { status: 201, headers: vec![("location".into(), "/x".into())], body: b"hi".to_vec() };
    let bytes = resp.encode(5).unwrap();
    let digest = record::companion_digest(&bytes);
    assert_eq!(StoredResponse::decode_for(&bytes, 5, &digest), Some(resp.clone()));
    assert_eq!(StoredResponse::decode_for(&bytes, 6, &digest), None, "other claim");
    assert_eq!(StoredResponse::decode_for(&bytes, 5, &[0; 32]), None, "other digest");
    let huge = StoredResponse { status: 200, headers: vec![("x".into(), "v".repeat(MAX_RESPONSE_HEAD_LEN))], body: vec![] };
    assert_eq!(huge.encode(1), None);
}

// ---- operators clearing outcome_unknown keys ----

fn clear_policy() -> ReplayPolicy {
    policy_with(r#""operator_clear": {"path": "/ops/replay/clear", "principals": ["ops-admin"]}"#)
}

fn clear(p: &ReplayPolicy, state: &dyn ReplayState, body: &str, now: u64) -> Result<ClearAnswer, ReplayError> {
    let (key, _) = parse_clear(p, body.as_bytes())?;
    let Answer::Now(answer) = state.clear(key, now) else { panic!() };
    Ok(answer.unwrap())
}

#[test]
fn only_configured_operators_reach_the_clear_endpoint() {
    let p = clear_policy();
    let facts = |method, path, principal| RequestFacts { method, path_and_query: path, headers: &[], principal };
    assert!(operator_request(&p, &facts("POST", "/v1/payouts", Some("ops-admin"))).is_none());
    assert_eq!(operator_request(&p, &facts("POST", "/ops/replay/clear", Some("ops-admin"))).unwrap().0, Ok(()));
    assert_eq!(operator_request(&p, &facts("POST", "/ops/replay/clear?x", Some("ops-admin"))).unwrap().0, Ok(()));
    assert_eq!(
        operator_request(&p, &facts("POST", "/ops/replay/clear", Some("demo-client"))).unwrap().0,
        Err(ReplayError::OperatorForbidden)
    );
    assert_eq!(operator_request(&p, &facts("POST", "/ops/replay/clear", None)).unwrap().0, Err(ReplayError::OperatorForbidden));
    assert!(matches!(
        operator_request(&p, &facts("GET", "/ops/replay/clear", Some("ops-admin"))).unwrap().0,
        Err(ReplayError::ClearRequestInvalid(_))
    ));
    assert!(operator_request(&policy(), &facts("POST", "/ops/replay/clear", Some("ops-admin"))).is_none(), "off by default");
    for bad in [
        "",
        "{}",
        r#"{"route":"nope","idempotency_key":"k"}"#,
        r#"{"route":"payouts","idempotency_key":""}"#,
        r#"{"route":"payouts","idempotency_key":"k","extra":1}"#,
        r#"{"route":"payouts","idempotency_key":"tab	"}"#,
    ] {
        assert!(matches!(parse_clear(&p, bad.as_bytes()), Err(ReplayError::ClearRequestInvalid(_))), "{bad}");
    }
}

#[test]
fn an_operator_clears_only_uncertain_keys() {
    let p = clear_policy();
    let store = MemoryStore::default();
    let state = LocalState { policy: &p, store: &store };
    let c = Client::new(&p, &state);
    // outcome_unknown, scoped to alice.
    let (_, ex) = c.send("/v1/payouts", Some("\"u\""), Some("alice"), BODY, 0);
    c.answer(&mut ex.unwrap(), 503, "", true, 1);
    assert_eq!(
        clear(&p, &state, r#"{"route":"payouts","idempotency_key":"u"}"#, 2),
        Ok(ClearAnswer::NotFound),
        "anonymous scope"
    );
    assert_eq!(
        clear(&p, &state, r#"{"route":"payouts","principal":"alice","idempotency_key":"u"}"#, 2),
        Ok(ClearAnswer::Cleared { stale_in_flight: false })
    );
    assert_eq!(
        c.send("/v1/payouts", Some("\"u\""), Some("alice"), BODY, 3).0,
        Ok(Decision::Forward),
        "the next request executes"
    );
    // Still in flight: refused; past the in-flight timeout: cleared.
    assert_eq!(
        clear(&p, &state, r#"{"route":"payouts","principal":"alice","idempotency_key":"u"}"#, 4),
        Ok(ClearAnswer::InFlight)
    );
    assert_eq!(
        clear(&p, &state, r#"{"route":"payouts","principal":"alice","idempotency_key":"u"}"#, 10_003),
        Ok(ClearAnswer::Cleared { stale_in_flight: true })
    );
    // Completed keys keep replaying.
    let (_, ex) = c.send("/v1/payouts", Some("\"done\""), None, BODY, 0);
    c.answer(&mut ex.unwrap(), 201, "{}", true, 1);
    assert_eq!(
        clear(&p, &state, r#"{"route":"payouts","principal":null,"idempotency_key":"done"}"#, 2),
        Ok(ClearAnswer::Completed)
    );
    assert!(matches!(c.send("/v1/payouts", Some("\"done\""), None, BODY, 3).0, Ok(Decision::Replay(_))));
}

// ---- header-time answers ----

#[test]
fn incident_3_retries_of_a_key_in_flight_are_refused_before_the_body() {
    let p = policy();
    let store = MemoryStore::default();
    let state = LocalState { policy: &p, store: &store };
    let c = Client::new(&p, &state);
    let early = |key: &str, body_principal: Option<&str>, now: u64| {
        let h = headers(Some(key));
        let facts = RequestFacts { method: "POST", path_and_query: "/v1/payouts", headers: &h, principal: body_principal };
        let ex = Exchange::begin(&p, &facts).unwrap().unwrap();
        let Answer::Now(record) = state.peek(ex.key_address(&p).unwrap(), now) else { panic!() };
        decide_early(record.unwrap().as_ref(), now, p.in_flight_timeout_ms)
    };
    assert_eq!(early("\"e\"", None, 0), None, "absent: wait for the body");
    let (_, ex) = c.send("/v1/payouts", Some("\"e\""), None, BODY, 0);
    let mut ex = ex.unwrap();
    assert_eq!(early("\"e\"", None, 1), Some(ClaimAnswer::InFlight));
    assert_eq!(early("\"e\"", Some("alice"), 1), None, "another principal's key");
    assert_eq!(early("\"e\"", None, 10_000), None, "past the in-flight timeout: the claim decides (outcome_unknown)");
    c.answer(&mut ex, 201, "{}", true, 2);
    assert_eq!(early("\"e\"", None, 3), None, "completed: the body decides replay or 422");
    // A keyless request has no address: collapse needs the body.
    let h = headers(None);
    let facts = RequestFacts { method: "POST", path_and_query: "/v1/transfers", headers: &h, principal: None };
    assert_eq!(Exchange::begin(&p, &facts).unwrap().unwrap().key_address(&p), None);
}

// ---- shared-data calls and the body digest ----

/// A new key: one read at header time, the tenant's quota (one read, one write), one write for
/// the claim (against the header-time read), one read and two writes (stored response,
/// completed record) to finish.
#[test]
fn a_new_key_costs_three_reads_and_four_writes() {
    let p = policy();
    let store = crate::store::CountingStore::default();
    let state = LocalState { policy: &p, store: &store };
    let h = headers(Some("\"n\""));
    let facts = RequestFacts { method: "POST", path_and_query: "/v1/payouts", headers: &h, principal: None };
    let mut ex = Exchange::begin(&p, &facts).unwrap().unwrap();
    let peek = state.peek_key(ex.key_address(&p).unwrap()).unwrap();
    assert!(!peek.mentions_key(), "a new key needs no clock at header time");
    let claim = ex.claim_request(&p, BODY.as_bytes(), 7).unwrap();
    let answer = state.claim_after_peek(&claim, 10, Some(peek));
    assert_eq!(ex.on_claim(&p, answer), Decision::Forward);
    assert_eq!((store.gets.get(), store.sets.get()), (2, 2), "claim");
    ex.on_response_headers(&p, 201, true, &[("content-type".into(), "application/json".into())]);
    ex.on_response_body(&p, b"{}");
    let finish = ex.finish(&p, true).unwrap();
    assert_eq!(state.finish(&finish, 20), Answer::Now(Ok(FinishAnswer::Completed { stored: true })));
    assert_eq!((store.gets.get(), store.sets.get()), (3, 4), "finish");
    // The retry is replayed from what was stored.
    let c = Client::new(&p, &state);
    assert!(matches!(c.send("/v1/payouts", Some("\"n\""), None, BODY, 30).0, Ok(Decision::Replay(_))));
}

/// The header-time read is stale by claim time (another worker claimed the key in between):
/// the claim's write fails its CAS and the claim is decided on a fresh read.
#[test]
fn a_claim_after_a_stale_peek_sees_the_winner() {
    let p = policy();
    let store = MemoryStore::default();
    let state = LocalState { policy: &p, store: &store };
    let h = headers(Some("\"race\""));
    let facts = RequestFacts { method: "POST", path_and_query: "/v1/payouts", headers: &h, principal: None };
    let ex = Exchange::begin(&p, &facts).unwrap().unwrap();
    let peek = state.peek_key(ex.key_address(&p).unwrap()).unwrap();
    assert_eq!(Client::new(&p, &state).send("/v1/payouts", Some("\"race\""), None, BODY, 0).0, Ok(Decision::Forward));
    let claim = ex.claim_request(&p, BODY.as_bytes(), 99).unwrap();
    assert_eq!(state.claim_after_peek(&claim, 1, Some(peek)), Ok(ClaimAnswer::InFlight));
}

/// The fingerprint from the body's SHA-256 (as request-signature verified it) is the
/// fingerprint from the body.
#[test]
fn the_fingerprint_from_a_verified_content_digest_is_the_fingerprint_from_the_body() {
    let p = policy();
    let h = headers(Some("\"f\""));
    let facts = RequestFacts { method: "POST", path_and_query: "/v1/payouts?x=1", headers: &h, principal: Some("alice") };
    let ex = Exchange::begin(&p, &facts).unwrap().unwrap();
    let digest = crate::signature::digest::content_digest_sha256(BODY.as_bytes());
    let from_header = body_sha256_from_content_digest(&digest).unwrap();
    assert_eq!(from_header, body_sha256(BODY.as_bytes()));
    assert_eq!(ex.fingerprint_of_body_sha256(&from_header), ex.fingerprint(BODY.as_bytes()));
    assert_eq!(ex.claim_request_of_body_sha256(&p, &from_header, 1), ex.claim_request(&p, BODY.as_bytes(), 1));
    // With sha-512 next to it, still the sha-256 member; without one, or malformed, none.
    assert_eq!(body_sha256_from_content_digest(&format!("sha-512=:AAAA:, {digest}")), Some(from_header));
    assert_eq!(body_sha256_from_content_digest("sha-512=:AAAA:"), None);
    assert_eq!(body_sha256_from_content_digest("sha-256=:AAAA:"), None, "not 32 bytes");
    assert_eq!(body_sha256_from_content_digest("sha-256=abc"), None);
}

// ---- per-tenant quotas ----

/// One principal flooding fresh keys gets its own code at its quota; other principals are
/// unaffected; a refused claim records nothing (the same key is free once the window rolls);
/// a retry of a live key is answered from its record without touching the quota.
#[test]
fn a_tenant_at_its_quota_is_refused_alone_and_consumes_nothing() {
    let p =
        policy_with(r#""collapse_store": {"buckets": 4, "slots_per_bucket": 4, "quota_per_principal": 2}"#).tap_key_store(64, 4);
    assert_eq!(p.key_quota.limit.get(), 8);
    let store = MemoryStore::default();
    let state = LocalState { policy: &p, store: &store };
    let c = Client::new(&p, &state);
    for i in 0..8 {
        let key = format!("\"a{i}\"");
        let (d, ex) = c.send("/v1/payouts", Some(&key), Some("mallory"), BODY, 0);
        assert_eq!(d, Ok(Decision::Forward), "{i}");
        c.answer(&mut ex.unwrap(), 201, "{}", true, 1);
    }
    let (d, _) = c.send("/v1/payouts", Some("\"fresh\""), Some("mallory"), BODY, 2);
    assert_eq!(rejected(&d), Some(ReplayError::TenantQuotaExceeded));
    assert_eq!(ReplayError::TenantQuotaExceeded.rejection().status, 429);
    assert_eq!(ReplayError::TenantQuotaExceeded.rejection().code, "tenant_quota_exceeded");
    // A retry of a completed key is still replayed (no quota needed).
    assert!(matches!(c.send("/v1/payouts", Some("\"a0\""), Some("mallory"), BODY, 3).0, Ok(Decision::Replay(_))));
    // Others are unaffected.
    assert_eq!(c.send("/v1/payouts", Some("\"fresh\""), Some("alice"), BODY, 3).0, Ok(Decision::Forward));
    assert_eq!(c.send("/v1/payouts", Some("\"x\""), None, BODY, 3).0, Ok(Decision::Forward), "anonymous");
    // The refused key was not recorded: once the window (ttl 60 s) rolls, it is claimed once.
    let Answer::Now(record) = state.peek(key_hash(&p.key_hasher(), "payouts", Some("mallory"), "fresh"), 60_000) else {
        panic!()
    };
    assert_eq!(record, Ok(None));
    assert_eq!(c.send("/v1/payouts", Some("\"fresh\""), Some("mallory"), BODY, 60_000).0, Ok(Decision::Forward));

    // Collapse: quota 2 per principal per longest window (2 s).
    for i in 0..2 {
        assert_eq!(c.send("/v1/transfers", None, Some("mallory"), &i.to_string(), 0).0, Ok(Decision::Forward));
    }
    assert_eq!(
        rejected(&c.send("/v1/transfers", None, Some("mallory"), "1", 1).0),
        Some(ReplayError::Duplicate),
        "a duplicate stays a duplicate"
    );
    assert_eq!(rejected(&c.send("/v1/transfers", None, Some("mallory"), "9", 1).0), Some(ReplayError::TenantQuotaExceeded));
    assert_eq!(c.send("/v1/transfers", None, Some("bob"), "9", 1).0, Ok(Decision::Forward));
    assert_eq!(c.send("/v1/transfers", None, Some("mallory"), "9", 2000).0, Ok(Decision::Forward));
}

#[test]
fn quota_fields_are_validated_against_capacity() {
    let bad = CONFIG.replace(r#""quota_per_principal": 8"#, r#""quota_per_principal": 9"#);
    assert_eq!(ReplayPolicy::from_json(bad.as_bytes()).unwrap_err().field, "key_store.quota_per_principal");
    let zero = CONFIG.replace(r#""quota_per_principal": 8"#, r#""quota_per_principal": 0"#);
    assert_eq!(ReplayPolicy::from_json(zero.as_bytes()).unwrap_err().field, "key_store.quota_per_principal");
    let default = CONFIG.replace(r#", "quota_per_principal": 8"#, "");
    assert_eq!(ReplayPolicy::from_json(default.as_bytes()).unwrap().key_quota.limit.get(), 2, "16 / 8");
    assert_eq!(policy().collapse_quota.limit.get(), 256, "256 x 8 / 8");
    assert_eq!(policy().collapse_quota.window_ms.get(), 2000, "the longest collapse window");
    assert_eq!(policy().key_quota.window_ms.get(), 60_000, "ttl");
    assert_eq!(policy().key_quota.lease.get(), 1, "a quota of 8: no lease");
    assert_eq!(policy().collapse_quota.lease.get(), 1, "256 / 256");
    let lease = CONFIG.replace(r#""quota_per_principal": 8"#, r#""quota_per_principal": 8, "quota_lease": 2"#);
    assert_eq!(ReplayPolicy::from_json(lease.as_bytes()).unwrap_err().field, "key_store.quota_lease", "at most 8 / 16");
}

/// A reload that changes a table's geometry is refused while this Envoy holds the table; the
/// same geometry adopts the stored placement secret (the records are found where they are).
#[test]
fn a_reload_that_changes_the_geometry_is_refused_and_records_survive_the_same_geometry() {
    let store = MemoryStore::default();
    let mut a = policy();
    a.bind_tables(&store, [1; 32]).unwrap();
    let state = LocalState { policy: &a, store: &store };
    let c = Client::new(&a, &state);
    let (d, ex) = c.send("/v1/payouts", Some("\"p\""), Some("alice"), BODY, 0);
    assert_eq!(d, Ok(Decision::Forward));
    c.answer(&mut ex.unwrap(), 201, "{}", true, 1);

    for (json, field) in [
        (CONFIG.replace(r#""buckets": 4, "slots_per_bucket": 4"#, r#""buckets": 8, "slots_per_bucket": 4"#), "key_store.buckets"),
        (
            CONFIG.replace(
                r#""buckets": 4, "slots_per_bucket": 4, "quota_per_principal": 8"#,
                r#""buckets": 4, "slots_per_bucket": 2"#,
            ),
            "key_store.slots_per_bucket",
        ),
        (CONFIG.replace("\n}", r#", "collapse_store": {"buckets": 2, "slots_per_bucket": 8}}"#), "collapse_store.buckets"),
    ] {
        let mut b = ReplayPolicy::from_json(json.as_bytes()).unwrap();
        let err = b.bind_tables(&store, [2; 32]).unwrap_err();
        assert_eq!(err.field, field, "{err}");
        assert!(err.message.contains("claimable again"), "{err}");
    }
    // Same geometry, other entropy: the stored secret is adopted and the record is found.
    let mut same = ReplayPolicy::from_json(CONFIG.replace("\"ttl_seconds\": 60", "\"ttl_seconds\": 61").as_bytes()).unwrap();
    same.bind_tables(&store, [3; 32]).unwrap();
    assert_eq!(same.key_table, a.key_table);
    let state = LocalState { policy: &same, store: &store };
    let c = Client::new(&same, &state);
    assert!(matches!(c.send("/v1/payouts", Some("\"p\""), Some("alice"), BODY, 2).0, Ok(Decision::Replay(_))));
}
