//! replay-guard's flow driven through the in-memory host: replies, replays, counters, log lines,
//! what is held and read, the Redis calls made and what their failures do, host faults.

use std::collections::BTreeMap;
use std::rc::Rc;

use crate::filters::{configure, Setup};
use crate::flow::chain::Chain;
use crate::flow::memory::{exchange, step, MemoryEnv, MemoryRequest, MemoryUpstream, Outcome};
use crate::flow::{CallAnswer, Event, Flow, FlowFactory, Headers, Host, Level, Step};
use crate::{Code, Rejection};

use super::fake_redis::FakeRedis;
use super::flow::{ClaimIds, COUNTERS, PLUGIN};
use super::{body_sha256, ORIGINAL_STATUS_HEADER};

const ROUTES: &str = r#""routes": [
    {"name": "payouts", "match": {"methods": ["POST"], "path_prefix": "/v1/payouts"}},
    {"name": "refunds", "match": {"methods": ["POST"], "path_prefix": "/v1/refunds"}, "on_uncertain": "release"},
    {"name": "transfers", "match": {"methods": ["POST"], "path_prefix": "/v1/transfers"},
     "idempotency_key": "optional", "collapse_window_ms": 2000},
    {"name": "notes", "match": {"methods": ["POST"], "path_prefix": "/v1/notes"}, "idempotency_key": "optional"}
  ],
  "ttl_seconds": 60, "in_flight_timeout_ms": 10000, "max_body_bytes": 64, "max_stored_body_bytes": 32,
  "operator_clear": {"path": "/ops/replay/clear", "principals": ["ops-admin"]}"#;

const REDIS: &str = r#""state": {"backend": "redis", "cluster": "bridge", "key_prefix": "t"}"#;

/// replay-guard configured on a memory environment; with Redis, the fake behind the bridge.
struct Guard {
    factory: std::sync::Arc<dyn FlowFactory>,
    env: MemoryEnv,
    redis: Rc<FakeRedis>,
}

fn configure_in(env: &MemoryEnv, json: &str) -> Result<std::sync::Arc<dyn FlowFactory>, crate::ConfigError> {
    configure("replay_guard", json.as_bytes(), &Setup { env: &|_| None, store: &env.store, entropy: [7; 32] })
}

fn local(extra: &str) -> Guard {
    let env = MemoryEnv::default();
    let factory = configure_in(&env, &format!("{{{ROUTES}{extra}}}")).unwrap();
    Guard { factory, env, redis: Rc::default() }
}

fn remote(extra: &str) -> Guard {
    let mut env = MemoryEnv::default();
    let factory = configure_in(&env, &format!("{{{ROUTES},{REDIS}{extra}}}")).unwrap();
    let redis: Rc<FakeRedis> = Rc::default();
    let fake = redis.clone();
    env.redis = Some(Box::new(move |command| fake.answer(command)));
    Guard { factory, env, redis }
}

impl Guard {
    fn send(&mut self, request: &MemoryRequest, upstream: &MemoryUpstream) -> Outcome {
        exchange(&mut *self.factory.new_flow(), &mut self.env, request, upstream)
    }

    /// The request behind a stage that verified `principal` (and, given, the body's SHA-256).
    fn send_signed(
        &mut self,
        principal: &str,
        digest: Option<[u8; 32]>,
        request: &MemoryRequest,
        upstream: &MemoryUpstream,
    ) -> Outcome {
        let signer = Signer { principal: principal.to_string(), digest };
        let mut chain = Chain::new(vec![Box::new(signer), self.factory.new_flow()]);
        exchange(&mut chain, &mut self.env, request, upstream)
    }

    /// Answers every Redis call with `answer`: given the call's number (from 1), the command and
    /// the fake (which applies a command it is asked to answer).
    fn redis_answers(&mut self, mut answer: impl FnMut(usize, &[u8], &FakeRedis) -> CallAnswer + 'static) {
        let fake = self.redis.clone();
        let mut calls = 0;
        self.env.redis = Some(Box::new(move |command| {
            calls += 1;
            answer(calls, command, &fake)
        }));
    }

    /// Records of idempotency keys in the fake Redis (quota counts left out).
    fn redis_records(&self) -> usize {
        self.redis.data.borrow().keys().filter(|k| k.starts_with("t:replay:key:")).count()
    }
}

/// A stage before replay-guard that hands over a verified principal (as request-signature does).
struct Signer {
    principal: String,
    digest: Option<[u8; 32]>,
}

impl Flow for Signer {
    fn on_event(&mut self, event: Event, host: &mut dyn Host) -> Step {
        match event {
            Event::RequestHeaders { .. } => {
                let _ = host.set_principal(&self.principal);
            }
            Event::RequestBody { buffered, end_of_stream: true } => {
                if let Some(digest) = &self.digest {
                    host.set_body_sha256(digest, buffered);
                }
            }
            _ => {}
        }
        Step::Continue
    }
}

/// A stage after replay-guard that refuses the answer (so replay-guard never sees it).
struct AnswerRefuser;

impl Flow for AnswerRefuser {
    fn on_event(&mut self, event: Event, _host: &mut dyn Host) -> Step {
        match event {
            Event::ResponseHeaders { .. } => Step::Reply(Rejection::new(Code::StateUnavailable)),
            _ => Step::Continue,
        }
    }
}

fn headers(method: &str, path: &str, key: Option<&str>) -> Headers {
    let mut h = vec![(":method".to_string(), method.to_string()), (":path".to_string(), path.to_string())];
    if let Some(key) = key {
        h.push(("idempotency-key".to_string(), key.to_string()));
    }
    h
}

fn post(path: &str, key: Option<&str>, body: &str) -> MemoryRequest {
    MemoryRequest::new(headers("POST", path, key), body.as_bytes())
}

fn chunked(path: &str, key: Option<&str>, chunks: &[&str], trailers: bool) -> MemoryRequest {
    MemoryRequest {
        headers: headers("POST", path, key),
        chunks: chunks.iter().map(|c| c.as_bytes().to_vec()).collect(),
        trailers: trailers.then(|| vec![("x-checksum".to_string(), "1".to_string())]),
        ..MemoryRequest::default()
    }
}

fn upstream(status: u16, body: &str) -> MemoryUpstream {
    MemoryUpstream {
        status,
        headers: vec![("content-type".to_string(), "application/json".to_string())],
        chunks: if body.is_empty() { Vec::new() } else { vec![body.as_bytes().to_vec()] },
        ..MemoryUpstream::default()
    }
}

fn created() -> MemoryUpstream {
    upstream(201, r#"{"id":"op-1"}"#)
}

/// Counters without the `firebreak.replay_guard.` prefix.
fn counters(outcome: &Outcome) -> BTreeMap<String, u64> {
    outcome
        .counters
        .iter()
        .map(|(name, n)| (name.strip_prefix("firebreak.replay_guard.").unwrap_or(name).to_string(), *n))
        .collect()
}

fn counted(names: &[&str]) -> BTreeMap<String, u64> {
    let mut map = BTreeMap::new();
    for name in names {
        *map.entry(name.to_string()).or_insert(0) += 1;
    }
    map
}

fn code(outcome: &Outcome) -> Option<&'static str> {
    outcome.reply.as_ref().map(|r| r.code)
}

fn has_log(outcome: &Outcome, level: Level, part: &str) -> bool {
    outcome.logs.iter().any(|(l, line)| *l == level && line.contains(part))
}

#[test]
fn configure_defines_the_counters_and_logs_the_tables_or_the_backend() {
    let g = local("");
    assert_eq!(g.factory.meter().prefix.as_ref(), "firebreak.replay_guard");
    assert_eq!(g.factory.counters(), COUNTERS.iter().map(|c| c.to_string()).collect::<Vec<_>>());
    let lines = g.factory.configured();
    assert_eq!(lines.len(), 1);
    assert!(lines[0].1.starts_with(&format!("firebreak {PLUGIN} tables keys=")), "{lines:?}");
    let r = remote("");
    let lines = r.factory.configured();
    assert_eq!(
        lines,
        vec![(
            Level::Info,
            "firebreak replay_guard state backend=redis cluster=bridge timeout_ms=250 key_prefix=t failure_mode=closed"
                .to_string()
        )]
    );
    // Errors name the field.
    let env = MemoryEnv::default();
    let error = configure_in(&env, r#"{"routes": [], "ttl_seconds": 0}"#).err().unwrap();
    assert!(!error.field.is_empty(), "{error:?}");
}

/// One row: a request on a fresh local guard, the code it gets (`None`: forwarded), every
/// counter it moves.
struct Row {
    name: &'static str,
    request: MemoryRequest,
    code: Option<&'static str>,
    counters: &'static [&'static str],
}

#[test]
fn table_of_requests_codes_and_counters() {
    let rows = vec![
        Row {
            name: "not a protected route",
            request: MemoryRequest::new(headers("GET", "/v1/payouts", None), b""),
            code: None,
            counters: &["passed_unprotected"],
        },
        Row {
            name: "a new key: forwarded, its answer stored",
            request: post("/v1/payouts", Some("\"k-1\""), "{}"),
            code: None,
            counters: &["forwarded", "completed"],
        },
        Row {
            name: "no key on a route that requires one",
            request: post("/v1/payouts", None, "{}"),
            code: Some("idempotency_key_missing"),
            counters: &["rejected.idempotency_key_missing"],
        },
        Row {
            name: "a key that is not an sf-string",
            request: post("/v1/payouts", Some("k-1"), "{}"),
            code: Some("idempotency_key_invalid"),
            counters: &["rejected.idempotency_key_invalid"],
        },
        Row {
            name: "a path that is not canonical",
            request: post("/v1/x/../payouts", Some("\"k\""), "{}"),
            code: Some("path_not_canonical"),
            counters: &["rejected.path_not_canonical"],
        },
        Row {
            name: "a content-length over max_body_bytes",
            request: MemoryRequest::new(
                [headers("POST", "/v1/payouts", Some("\"k\"")), vec![("content-length".into(), "65".into())]].concat(),
                b"{}",
            ),
            code: Some("body_too_large"),
            counters: &["rejected.body_too_large"],
        },
        Row {
            name: "a body over max_body_bytes, in chunks",
            request: chunked("/v1/payouts", Some("\"k\""), &[&"x".repeat(40), &"y".repeat(40)], false),
            code: Some("body_too_large"),
            counters: &["rejected.body_too_large"],
        },
        Row {
            name: "no key, collapse on: first of its fingerprint",
            request: post("/v1/transfers", None, "{}"),
            code: None,
            counters: &["forwarded_first_of_fingerprint"],
        },
        Row {
            name: "no key, collapse off: nothing to claim",
            request: post("/v1/notes", None, "{}"),
            code: None,
            counters: &["forwarded_unguarded"],
        },
        Row {
            name: "the operator endpoint without a principal",
            request: post("/ops/replay/clear", None, "{}"),
            code: Some("operator_forbidden"),
            counters: &["rejected.operator_forbidden"],
        },
    ];
    for row in rows {
        let mut g = local("");
        let outcome = g.send(&row.request, &created());
        assert_eq!(code(&outcome), row.code, "{}: {:?}", row.name, outcome.logs);
        assert_eq!(outcome.passed(), row.code.is_none(), "{}", row.name);
        assert_eq!(counters(&outcome), counted(row.counters), "{}", row.name);
        assert!(outcome.calls.is_empty(), "{}: the local store makes no call", row.name);
        if row.code.is_none() {
            assert_eq!(outcome.forwarded_body, row.request.chunks.concat(), "{}", row.name);
            assert!(outcome.logs.is_empty(), "{}: accepted requests log at debug only: {:?}", row.name, outcome.logs);
        } else {
            assert!(has_log(&outcome, Level::Warn, &format!("firebreak {PLUGIN} reject")), "{}: {:?}", row.name, outcome.logs);
        }
    }
}

#[test]
fn a_retry_is_replayed_a_changed_body_is_a_mismatch_and_a_duplicate_is_collapsed() {
    let mut g = local("");
    let first = g.send(&post("/v1/payouts", Some("\"k-1\""), r#"{"amount":1}"#), &created());
    assert!(first.passed());
    assert_eq!(first.client_body, br#"{"id":"op-1"}"#);
    // The retry never reaches the upstream: the stored answer, with the marker header.
    let retry = g.send(&post("/v1/payouts", Some("\"k-1\""), r#"{"amount":1}"#), &upstream(500, "must not be seen"));
    let response = retry.responded.clone().expect("replayed");
    assert!(!retry.forwarded);
    assert_eq!((response.status, response.body.as_slice()), (201, br#"{"id":"op-1"}"#.as_slice()));
    assert!(response.headers.iter().any(|(n, _)| n == "content-type"), "{:?}", response.headers);
    assert_eq!(counters(&retry), counted(&["replayed"]));
    assert!(has_log(&retry, Level::Info, "firebreak replay_guard replayed status=201 route=payouts"));
    // Same key, another body.
    let other = g.send(&post("/v1/payouts", Some("\"k-1\""), r#"{"amount":2}"#), &created());
    assert_eq!(code(&other), Some("idempotency_key_mismatch"));
    assert_eq!(other.reply.as_ref().unwrap().status, 422);
    // No key, collapse window: the identical request is a duplicate.
    assert!(g.send(&post("/v1/transfers", None, "{}"), &created()).passed());
    let dup = g.send(&post("/v1/transfers", None, "{}"), &created());
    assert_eq!(code(&dup), Some("duplicate_request"));
    assert_eq!(counters(&dup), counted(&["rejected.duplicate_request"]));
}

#[test]
fn chunked_bodies_and_trailers_are_held_until_complete_and_give_the_same_fingerprint() {
    let mut g = local("");
    // Each chunk but the last is held; the body is read once, when complete.
    let mut flow = g.factory.new_flow();
    let request = chunked("/v1/payouts", Some("\"c-1\""), &[r#"{"amo"#, r#"unt":1}"#], false);
    let (first, _) = step(&mut *flow, Event::RequestHeaders { end_of_stream: false }, &mut g.env, &request, &created());
    assert_eq!(first, Step::Continue);
    let (held, o) = step(&mut *flow, Event::RequestBody { buffered: 5, end_of_stream: false }, &mut g.env, &request, &created());
    assert_eq!((held, o.reads.body), (Step::Hold, 0));
    let sent = g.send(&request, &created());
    assert!(sent.passed());
    assert_eq!(sent.reads.body, 1);
    assert_eq!(sent.forwarded_body, br#"{"amount":1}"#);
    // The same body in one chunk is the same request: replayed.
    let whole = g.send(&post("/v1/payouts", Some("\"c-1\""), r#"{"amount":1}"#), &created());
    assert!(whole.responded.is_some(), "{:?}", whole.reply);
    // Trailers end the body.
    let trailed = g.send(&chunked("/v1/payouts", Some("\"c-2\""), &[r#"{"amount":1}"#], true), &created());
    assert!(trailed.passed(), "{:?}", trailed.reply);
    assert_eq!(counters(&trailed), counted(&["forwarded", "completed"]));
    let again = g.send(&post("/v1/payouts", Some("\"c-2\""), r#"{"amount":1}"#), &created());
    assert!(again.responded.is_some());
    // A body over the bound before its trailers: refused at the trailers (read with one byte more).
    let big = g.send(&chunked("/v1/payouts", Some("\"c-3\""), &[&"z".repeat(60), "zzzzz"], true), &created());
    assert_eq!(code(&big), Some("body_too_large"));
}

#[test]
fn a_key_in_flight_is_refused_at_the_headers_without_reading_the_body() {
    let mut g = local("");
    let request = post("/v1/payouts", Some("\"f-1\""), "{}");
    // The first request is claimed and forwarded; its answer has not come.
    let mut first = g.factory.new_flow();
    step(&mut *first, Event::RequestHeaders { end_of_stream: false }, &mut g.env, &request, &created());
    let (forwarded, o) =
        step(&mut *first, Event::RequestBody { buffered: 2, end_of_stream: true }, &mut g.env, &request, &created());
    assert_eq!(forwarded, Step::Continue);
    assert_eq!(counters(&o), counted(&["forwarded"]));
    let retry = g.send(&request, &created());
    assert_eq!(code(&retry), Some("request_in_flight"));
    assert_eq!(retry.reads.body, 0);
    assert_eq!(counters(&retry), counted(&["decided_at_headers", "rejected.request_in_flight"]));
    assert!(retry.reply.as_ref().unwrap().headers.iter().any(|(n, v)| n == "retry-after" && v == "1"));
    // The first one's stream ends without an answer: the key is outcome_unknown, never free.
    let (_, end) = step(&mut *first, Event::StreamEnd, &mut g.env, &request, &created());
    assert_eq!(counters(&end), counted(&["outcome_unknown_recorded"]));
    assert!(has_log(&end, Level::Warn, "outcome_unknown_recorded status=0 complete=false route=payouts"), "{:?}", end.logs);
    let later = g.send(&request, &created());
    assert_eq!(code(&later), Some("outcome_unknown"));
}

#[test]
fn answers_that_prove_nothing_lock_or_free_the_key_and_large_answers_are_not_stored() {
    let mut g = local("");
    let unknown = g.send(&post("/v1/payouts", Some("\"u-1\""), "{}"), &upstream(503, "{}"));
    assert_eq!(counters(&unknown), counted(&["forwarded", "outcome_unknown_recorded"]));
    assert_eq!(code(&g.send(&post("/v1/payouts", Some("\"u-1\""), "{}"), &created())), Some("outcome_unknown"));
    // A local reply (not via the upstream) proves nothing either.
    let reset = MemoryUpstream { via_upstream: false, ..created() };
    let o = g.send(&post("/v1/payouts", Some("\"u-2\""), "{}"), &reset);
    assert_eq!(counters(&o), counted(&["forwarded", "outcome_unknown_recorded"]));
    // A route safe to repeat releases the key.
    let o = g.send(&post("/v1/refunds", Some("\"r-1\""), "{}"), &upstream(503, "{}"));
    assert_eq!(counters(&o), counted(&["forwarded", "released"]));
    assert!(g.send(&post("/v1/refunds", Some("\"r-1\""), "{}"), &created()).passed());
    // An answer over max_stored_body_bytes completes the key without its body, in chunks too.
    let mut large = upstream(201, "");
    large.chunks = vec![vec![b'a'; 20], vec![b'b'; 20]];
    let o = g.send(&post("/v1/payouts", Some("\"l-1\""), "{}"), &large);
    assert_eq!(o.client_body.len(), 40);
    assert_eq!(counters(&o), counted(&["forwarded", "completed_not_stored"]));
    let retry = g.send(&post("/v1/payouts", Some("\"l-1\""), "{}"), &created());
    assert_eq!(code(&retry), Some("response_not_stored"));
    assert!(retry.reply.as_ref().unwrap().headers.iter().any(|(n, v)| n == ORIGINAL_STATUS_HEADER && v == "201"));
    // An answer that never reached replay-guard (refused after it): finished at the stream's end.
    let mut chain = Chain::new(vec![g.factory.new_flow(), Box::new(AnswerRefuser)]);
    let o = exchange(&mut chain, &mut g.env, &post("/v1/payouts", Some("\"e-1\""), "{}"), &created());
    assert_eq!(counters(&o), counted(&["forwarded", "outcome_unknown_recorded"]));
}

#[test]
fn host_faults_fail_closed() {
    let request = post("/v1/payouts", Some("\"h-1\""), "{}");
    let mut g = local("");
    g.env.faults.request_headers = true;
    assert_eq!(code(&g.send(&request, &created())), Some("request_headers_invalid"));
    let mut g = local("");
    g.env.faults.principal = true;
    let o = g.send(&request, &created());
    assert_eq!(code(&o), Some("replay_state_unavailable"));
    assert!(has_log(&o, Level::Warn, "principal_unreadable=HostFailed"), "{:?}", o.logs);
    let mut g = local("");
    g.env.faults.request_body = true;
    let o = g.send(&request, &created());
    assert_eq!(code(&o), Some("replay_state_unavailable"));
    assert!(!o.forwarded);
    let mut g = local("");
    g.env.now_ms = None;
    let o = g.send(&request, &created());
    assert_eq!(code(&o), Some("replay_state_unavailable"));
    assert_eq!(counters(&o), counted(&["rejected.replay_state_unavailable"]));
}

#[test]
fn a_verified_body_sha256_is_the_fingerprint_and_the_body_is_not_read() {
    let mut g = local("");
    let body = r#"{"amount":7}"#;
    let signed = g.send_signed("alice", None, &post("/v1/payouts", Some("\"s-1\""), body), &created());
    assert!(signed.passed());
    assert_eq!(signed.reads.body, 1);
    // The digest handed over: not read, same fingerprint (replayed, not 422).
    let digest = body_sha256(body.as_bytes());
    let retry = g.send_signed("alice", Some(digest), &post("/v1/payouts", Some("\"s-1\""), body), &created());
    assert!(retry.responded.is_some(), "{:?}", retry.reply);
    assert_eq!(retry.reads.body, 0);
    // Another digest for the key is a mismatch; keys are scoped to the principal.
    let other = g.send_signed("alice", Some(body_sha256(b"x")), &post("/v1/payouts", Some("\"s-1\""), body), &created());
    assert_eq!(code(&other), Some("idempotency_key_mismatch"));
    assert!(g.send_signed("bob", None, &post("/v1/payouts", Some("\"s-1\""), body), &created()).passed());
    // Without a principal the hand-over is not looked at.
    assert!(g.send(&post("/v1/payouts", Some("\"s-1\""), body), &created()).passed());
}

/// The host lends the body in the chunks Envoy holds it in: the fingerprint hashes them in
/// order, so one body cut anywhere is the same request, and an operator's clear request (JSON)
/// is parsed whole.
#[test]
fn the_fingerprint_and_a_clear_request_do_not_depend_on_the_chunks() {
    let mut g = local("");
    let body = r#"{"amount":12345}"#;
    assert!(g.send(&post("/v1/payouts", Some("\"s-1\""), body), &created()).passed());
    for at in 1..body.len() {
        let retry = g.send(&post("/v1/payouts", Some("\"s-1\""), body).split_at(&[at, at + 1]), &created());
        assert!(retry.responded.is_some(), "split at {at}: {:?}", retry.reply);
        assert_eq!(retry.reads.body, 1);
    }
    let changed = r#"{"amount":12346}"#;
    let other = g.send(&post("/v1/payouts", Some("\"s-1\""), changed).split_at(&[3, 14]), &created());
    assert_eq!(code(&other), Some("idempotency_key_mismatch"));

    g.send(&post("/v1/payouts", Some("\"o-9\""), "{}"), &upstream(503, "{}"));
    let clear = clear_body("o-9");
    let split = post("/ops/replay/clear", None, &clear).split_at(&[1, 10, clear.len() - 3]);
    assert_eq!(split.chunks.len(), 4);
    let cleared = g.send_signed("ops-admin", None, &split, &created());
    assert_eq!(counters(&cleared), counted(&["operator_cleared"]), "{:?}", cleared.reply);
}

fn clear_body(key: &str) -> String {
    format!(r#"{{"route":"payouts","idempotency_key":"{key}"}}"#)
}

#[test]
fn an_operator_clears_an_outcome_unknown_key_locally() {
    let mut g = local("");
    g.send(&post("/v1/payouts", Some("\"o-1\""), "{}"), &upstream(503, "{}"));
    let clear = post("/ops/replay/clear", None, &clear_body("o-1"));
    let forbidden = g.send_signed("demo-client", None, &clear, &created());
    assert_eq!(code(&forbidden), Some("operator_forbidden"));
    let cleared = g.send_signed("ops-admin", None, &clear, &created());
    let response = cleared.responded.clone().expect("answered");
    assert_eq!((response.status, response.body.as_slice()), (200, br#"{"cleared":true,"stale_in_flight":false}"#.as_slice()));
    assert!(!cleared.forwarded);
    assert_eq!(counters(&cleared), counted(&["operator_cleared"]));
    assert!(has_log(
        &cleared,
        Level::Warn,
        "operator_cleared stale_in_flight=false operator_clear method=POST operator=ops-admin route=payouts principal=- key="
    ));
    assert!(g.send(&post("/v1/payouts", Some("\"o-1\""), "{}"), &created()).passed());
    // Completed and absent keys are not cleared; a request without a body is refused.
    assert_eq!(code(&g.send_signed("ops-admin", None, &clear, &created())), Some("key_not_clearable"));
    assert_eq!(
        code(&g.send_signed("ops-admin", None, &post("/ops/replay/clear", None, &clear_body("nope")), &created())),
        Some("key_not_found")
    );
    assert_eq!(
        code(&g.send_signed("ops-admin", None, &post("/ops/replay/clear", None, ""), &created())),
        Some("clear_request_invalid")
    );
    let big = post("/ops/replay/clear", None, &"x".repeat(5000));
    assert_eq!(code(&g.send_signed("ops-admin", None, &big, &created())), Some("clear_request_invalid"));
}

// ---- Redis ----

#[test]
fn redis_one_call_per_claim_and_per_finish_and_the_answer_is_held_until_written() {
    let mut g = remote("");
    let mut answer = created();
    answer.chunks = vec![br#"{"id":"#.to_vec(), br#""op-1"}"#.to_vec()];
    let first = g.send(&post("/v1/payouts", Some("\"k-1\""), "{}"), &answer);
    assert!(first.passed(), "{:?} {:?}", first.reply, first.logs);
    assert!(!first.stalled);
    assert_eq!(first.client_body, br#"{"id":"op-1"}"#);
    assert_eq!(first.calls.len(), 2, "the claim, the finish");
    assert!(first.calls.iter().all(|c| c.starts_with(b"EVALSHA/")));
    assert_eq!(counters(&first), counted(&["forwarded", "finish_paused_response", "completed"]));
    assert_eq!(g.redis_records(), 1);
    // The retry: one call, replayed from Redis.
    let retry = g.send(&post("/v1/payouts", Some("\"k-1\""), "{}"), &created());
    assert_eq!(retry.calls.len(), 1);
    assert_eq!(retry.responded.as_ref().map(|r| r.body.clone()), Some(br#"{"id":"op-1"}"#.to_vec()));
    assert_eq!(counters(&retry), counted(&["replayed"]));
    // Collapse on Redis, and an answer without a body (finished at the response headers).
    assert!(g.send(&post("/v1/transfers", None, "{}"), &created()).passed());
    assert_eq!(code(&g.send(&post("/v1/transfers", None, "{}"), &created())), Some("duplicate_request"));
    let empty = g.send(&post("/v1/payouts", Some("\"k-2\""), "{}"), &upstream(204, ""));
    assert!(empty.passed() && !empty.stalled);
    assert_eq!(counters(&empty), counted(&["forwarded", "finish_paused_response", "completed"]));
}

#[test]
fn redis_a_key_in_flight_is_refused_by_the_claim() {
    let mut g = remote("");
    let request = post("/v1/payouts", Some("\"f-1\""), "{}");
    let mut first = g.factory.new_flow();
    step(&mut *first, Event::RequestHeaders { end_of_stream: false }, &mut g.env, &request, &created());
    let (held, o) = step(&mut *first, Event::RequestBody { buffered: 2, end_of_stream: true }, &mut g.env, &request, &created());
    assert_eq!(held, Step::Hold, "waiting for the claim");
    assert_eq!(o.calls.len(), 1);
    g.redis.answer(&o.calls[0]);
    let retry = g.send(&request, &created());
    assert_eq!(code(&retry), Some("request_in_flight"));
    assert_eq!(counters(&retry), counted(&["rejected.request_in_flight"]), "no header-time read with Redis");
    assert_eq!(retry.reads.body, 1);
}

#[test]
fn redis_a_claim_whose_answer_was_lost_is_unwound_before_the_503() {
    let mut g = remote("");
    // Redis applies the claim; its answer never comes back.
    g.redis_answers(|call, command, fake| {
        let answer = fake.answer(command);
        if call == 1 {
            CallAnswer { status: None, body: Vec::new() }
        } else {
            answer
        }
    });
    let request = post("/v1/payouts", Some("\"k-1\""), "{}");
    let o = g.send(&request, &created());
    assert_eq!(code(&o), Some("state_unavailable"));
    assert!(!o.forwarded);
    assert_eq!(o.calls.len(), 2, "the claim, its unwind");
    assert_eq!(counters(&o), counted(&["remote_error", "claim_unwound", "rejected.state_unavailable"]));
    let store_error = "store_error=\"state store unreachable: no answer (timeout or connection failure)\"";
    assert!(has_log(&o, Level::Error, &format!("remote_error op=claim {store_error} route=payouts")), "{:?}", o.logs);
    assert!(has_log(&o, Level::Warn, "firebreak replay_guard claim_unwound route=payouts"), "{:?}", o.logs);
    assert!(has_log(&o, Level::Warn, "code=state_unavailable route=payouts"), "{:?}", o.logs);
    assert_eq!(g.redis_records(), 0, "the key is free again");
    assert!(g.send(&request, &created()).passed());
}

#[test]
fn redis_an_unwind_that_fails_leaves_the_claim_and_the_key_reads_in_flight() {
    let mut g = remote("");
    g.redis_answers(|call, command, fake| {
        if call == 1 {
            // Applied, its answer lost.
            fake.answer(command);
        }
        // The unwind never reaches Redis.
        CallAnswer { status: Some(504), body: Vec::new() }
    });
    let request = post("/v1/payouts", Some("\"k-1\""), "{}");
    let o = g.send(&request, &created());
    assert_eq!(code(&o), Some("state_unavailable"));
    assert_eq!(counters(&o), counted(&["remote_error", "claim_unwind_failed", "rejected.state_unavailable"]));
    assert!(
        has_log(&o, Level::Error, "claim_unwind_failed route=payouts method=POST path=\"/v1/payouts\" principal=- key="),
        "{:?}",
        o.logs
    );
    assert!(has_log(&o, Level::Error, "store_error=\"state store unreachable: bridge answered HTTP 504\""));
    g.redis_answers(|_, command, fake| fake.answer(command));
    assert_eq!(code(&g.send(&request, &created())), Some("request_in_flight"));
}

#[test]
fn redis_no_bridge_or_an_answer_too_large_fails_closed() {
    let mut g = remote("");
    g.env.redis = None;
    let o = g.send(&post("/v1/payouts", Some("\"k-1\""), "{}"), &created());
    assert_eq!(code(&o), Some("state_unavailable"));
    assert!(o.calls.is_empty());
    assert_eq!(counters(&o), counted(&["remote_error", "rejected.state_unavailable"]));
    assert!(has_log(&o, Level::Error, "remote_error op=claim store_error=\"dispatch failed\""), "{:?}", o.logs);
    // An answer larger than any this code writes is not read.
    let mut g = remote("");
    g.redis_answers(|_, _, _| CallAnswer { status: Some(200), body: vec![b' '; 200_000] });
    let o = g.send(&post("/v1/payouts", Some("\"k-1\""), "{}"), &created());
    assert_eq!(code(&o), Some("state_unavailable"));
    assert_eq!(o.calls.len(), 2, "the claim, its unwind");
    assert_eq!(counters(&o), counted(&["remote_error", "claim_unwind_failed", "rejected.state_unavailable"]));
    assert!(has_log(&o, Level::Error, "store_error=\"reply of 200000 bytes exceeds "), "{:?}", o.logs);
    // A collapse claim has nothing to unwind.
    let o = g.send(&post("/v1/transfers", None, "{}"), &created());
    assert_eq!(o.calls.len(), 1);
    assert_eq!(counters(&o), counted(&["remote_error", "rejected.state_unavailable"]));
}

#[test]
fn redis_a_finish_write_that_fails_still_delivers_the_answer_and_the_key_stays_in_flight() {
    let mut g = remote("");
    g.redis_answers(|call, command, fake| {
        if call == 2 {
            // The finish never reaches Redis.
            CallAnswer { status: None, body: Vec::new() }
        } else {
            fake.answer(command)
        }
    });
    let request = post("/v1/payouts", Some("\"k-1\""), "{}");
    let o = g.send(&request, &created());
    assert!(o.passed() && !o.stalled);
    assert_eq!(o.client_body, br#"{"id":"op-1"}"#);
    assert_eq!(counters(&o), counted(&["forwarded", "finish_paused_response", "finish_failed", "remote_error"]));
    assert!(has_log(&o, Level::Error, "finish_failed status=201 complete=true route=payouts"), "{:?}", o.logs);
    assert_eq!(code(&g.send(&request, &created())), Some("request_in_flight"));
}

#[test]
fn redis_the_finish_at_the_streams_end_is_sent_without_waiting() {
    let mut g = remote("");
    let mut chain = Chain::new(vec![g.factory.new_flow(), Box::new(AnswerRefuser)]);
    let request = post("/v1/payouts", Some("\"e-1\""), "{}");
    let o = exchange(&mut chain, &mut g.env, &request, &created());
    assert_eq!(o.calls.len(), 2, "the claim, the finish at the end");
    assert_eq!(counters(&o), counted(&["forwarded"]), "the finish's answer goes nowhere");
    assert_eq!(code(&g.send(&request, &created())), Some("outcome_unknown"));
    // StreamEnd never asks the host to resume anything.
    let mut flow = g.factory.new_flow();
    let (end, _) = step(&mut *flow, Event::StreamEnd, &mut g.env, &request, &created());
    assert_eq!(end, Step::Hold);
}

#[test]
fn redis_an_operator_clear_reads_then_deletes_what_it_read() {
    let mut g = remote("");
    g.send(&post("/v1/payouts", Some("\"o-1\""), "{}"), &upstream(503, "{}"));
    let clear = post("/ops/replay/clear", None, &clear_body("o-1"));
    let cleared = g.send_signed("ops-admin", None, &clear, &created());
    assert_eq!(cleared.calls.len(), 2, "GET, compare-and-delete");
    assert!(cleared.calls[0].starts_with(b"GET/"));
    assert_eq!(cleared.responded.as_ref().map(|r| r.status), Some(200));
    assert_eq!(counters(&cleared), counted(&["operator_cleared"]));
    assert_eq!(g.redis_records(), 0);
    assert_eq!(code(&g.send_signed("ops-admin", None, &clear, &created())), Some("key_not_found"));
    // Changed between the read and the delete: refused, the operator retries.
    g.send(&post("/v1/payouts", Some("\"o-2\""), "{}"), &upstream(503, "{}"));
    g.redis_answers(|_, command, fake| {
        let answer = fake.answer(command);
        if command.starts_with(b"GET/") {
            let key = fake.data.borrow().keys().find(|k| k.starts_with("t:replay:key:")).cloned().unwrap();
            fake.data.borrow_mut().insert(key, "changed".into());
        }
        answer
    });
    let o = g.send_signed("ops-admin", None, &post("/ops/replay/clear", None, &clear_body("o-2")), &created());
    assert_eq!(code(&o), Some("key_not_clearable"));
    assert!(has_log(&o, Level::Warn, "changing (retry the clear)"), "{:?}", o.logs);
    // The bridge unreachable.
    g.env.redis = None;
    let o = g.send_signed("ops-admin", None, &post("/ops/replay/clear", None, &clear_body("o-2")), &created());
    assert_eq!(code(&o), Some("state_unavailable"));
    assert_eq!(counters(&o), counted(&["remote_error", "rejected.state_unavailable"]));
    assert!(has_log(&o, Level::Warn, "store_error=\"dispatch failed\""), "{:?}", o.logs);
}

#[test]
fn claim_ids_are_distinct_and_seeded_per_configuration() {
    let ids = ClaimIds::new([1; 32]);
    let (a, b) = (ids.next(1_000), ids.next(1_000));
    assert_ne!(a, b);
    let same_seed = ClaimIds::new([1; 32]);
    assert_eq!(same_seed.next(1_000), a, "deterministic for one seed");
    assert_ne!(ClaimIds::new([2; 32]).next(1_000), a);
}

const REPORT_ONLY: &str = r#","mode":"report_only""#;

/// The guard reconfigured on the same shared data (or the same fake Redis): a mode switch.
fn switch(g: &Guard, json: &str) -> std::sync::Arc<dyn FlowFactory> {
    configure_in(&g.env, json).unwrap()
}

fn op(id: &str) -> MemoryUpstream {
    upstream(201, &format!(r#"{{"id":"{id}"}}"#))
}

/// Report-only: a retry is forwarded (not replayed), a changed body or a duplicate is forwarded
/// (not refused), each counted and logged; the key keeps its first request's record, so the
/// same retry is replayed once the guard enforces.
#[test]
fn report_only_forwards_duplicates_and_keeps_the_first_record_local_and_redis() {
    for redis in [false, true] {
        let mut g = if redis { remote(REPORT_ONLY) } else { local(REPORT_ONLY) };
        let what = if redis { "redis" } else { "local" };
        let request = post("/v1/payouts", Some("\"k-1\""), r#"{"amount":1}"#);
        let first = g.send(&request, &op("op-1"));
        assert!(first.passed(), "{what}");
        let mut want = vec!["forwarded", "completed"];
        if redis {
            want.push("finish_paused_response");
        }
        assert_eq!(counters(&first), counted(&want), "{what}");

        // The retry reaches the upstream; what would have been replayed is counted and logged.
        let retry = g.send(&request, &op("op-2"));
        assert!(retry.passed(), "{what}: {:?}", retry.logs);
        assert_eq!(retry.client_body, br#"{"id":"op-2"}"#, "{what}");
        assert_eq!(counters(&retry), counted(&["would_replay"]), "{what}");
        assert!(has_log(&retry, Level::Warn, "firebreak replay_guard would_replay status=201 route=payouts"), "{what}");
        assert!(!retry.client_headers.iter().any(|(n, _)| n == "x-idempotent-replay"), "{what}");

        // Another body with the same key: forwarded, counted.
        let other = g.send(&post("/v1/payouts", Some("\"k-1\""), r#"{"amount":2}"#), &op("op-3"));
        assert!(other.passed(), "{what}");
        assert_eq!(counters(&other), counted(&["would_reject.idempotency_key_mismatch"]), "{what}");
        assert!(has_log(&other, Level::Warn, "would_reject status=422 code=idempotency_key_mismatch route=payouts"), "{what}");

        // No key, collapse window: the identical request is forwarded, counted.
        assert!(g.send(&post("/v1/transfers", None, "{}"), &created()).passed(), "{what}");
        let dup = g.send(&post("/v1/transfers", None, "{}"), &created());
        assert!(dup.passed(), "{what}");
        assert_eq!(counters(&dup), counted(&["would_reject.duplicate_request"]), "{what}");

        // A header-time refusal: forwarded unguarded.
        let missing = g.send(&post("/v1/payouts", None, "{}"), &created());
        assert!(missing.passed(), "{what}");
        assert_eq!(counters(&missing), counted(&["would_reject.idempotency_key_missing"]), "{what}");

        // Switched to enforce: the first request's answer is still the key's.
        let json = if redis { format!("{{{ROUTES},{REDIS}}}") } else { format!("{{{ROUTES}}}") };
        let enforce = switch(&g, &json);
        let replayed = exchange(&mut *enforce.new_flow(), &mut g.env, &request, &op("op-4"));
        let response = replayed.responded.expect(what);
        assert_eq!(response.body, br#"{"id":"op-1"}"#, "{what}");
        let other = exchange(&mut *enforce.new_flow(), &mut g.env, &post("/v1/payouts", Some("\"k-1\""), "{}"), &created());
        assert_eq!(code(&other), Some("idempotency_key_mismatch"), "{what}");
        let missing = exchange(&mut *enforce.new_flow(), &mut g.env, &post("/v1/payouts", None, "{}"), &created());
        assert_eq!(code(&missing), Some("idempotency_key_missing"), "{what}");
    }
}

/// Report-only, a key in flight and a key whose outcome is unknown: the retries are forwarded
/// and counted, their answers are not recorded, and the first request's outcome is.
#[test]
fn report_only_in_flight_and_outcome_unknown_retries_go_on_and_record_nothing() {
    for redis in [false, true] {
        let mut g = if redis { remote(REPORT_ONLY) } else { local(REPORT_ONLY) };
        let what = if redis { "redis" } else { "local" };
        let request = post("/v1/payouts", Some("\"f-1\""), "{}");
        // The first request is claimed and forwarded; its answer has not come.
        let mut first = g.factory.new_flow();
        step(&mut *first, Event::RequestHeaders { end_of_stream: false }, &mut g.env, &request, &created());
        let (claimed, o) =
            step(&mut *first, Event::RequestBody { buffered: 2, end_of_stream: true }, &mut g.env, &request, &created());
        if redis {
            assert_eq!(claimed, Step::Hold, "{what}");
            g.redis.answer(&o.calls[0]);
        } else {
            assert_eq!(claimed, Step::Continue, "{what}");
        }
        let retry = g.send(&request, &op("op-retry"));
        assert!(retry.passed(), "{what}: {:?}", retry.logs);
        assert!(!retry.stalled, "{what}");
        let mut want = vec!["would_reject.request_in_flight"];
        if !redis {
            want.push("decided_at_headers");
        }
        assert_eq!(counters(&retry), counted(&want), "{what}");
        assert!(has_log(&retry, Level::Warn, "would_reject status=409 code=request_in_flight route=payouts"), "{what}");

        // A key whose first answer proved nothing (503): outcome unknown.
        let unknown = post("/v1/payouts", Some("\"u-1\""), "{}");
        let first = g.send(&unknown, &upstream(503, "{}"));
        assert_eq!(first.counter("firebreak.replay_guard.outcome_unknown_recorded"), 1, "{what}");
        let later = g.send(&unknown, &op("op-later"));
        assert!(later.passed(), "{what}");
        assert_eq!(counters(&later), counted(&["would_reject.outcome_unknown"]), "{what}");
        // Its 201 did not complete the key: enforce still reads it outcome_unknown, and the
        // retry of the key in flight is still refused.
        let json = if redis { format!("{{{ROUTES},{REDIS}}}") } else { format!("{{{ROUTES}}}") };
        let enforce = switch(&g, &json);
        let refused = exchange(&mut *enforce.new_flow(), &mut g.env, &unknown, &created());
        assert_eq!(code(&refused), Some("outcome_unknown"), "{what}");
        let refused = exchange(&mut *enforce.new_flow(), &mut g.env, &request, &created());
        assert_eq!(code(&refused), Some("request_in_flight"), "{what}");
    }
}

#[test]
fn report_only_a_store_that_cannot_answer_forwards_the_request_unrecorded() {
    // No bridge at all.
    let mut g = remote(REPORT_ONLY);
    g.env.redis = None;
    let o = g.send(&post("/v1/payouts", Some("\"k-1\""), "{}"), &created());
    assert!(o.passed());
    assert_eq!(counters(&o), counted(&["remote_error", "would_reject.state_unavailable"]));
    // A claim Redis applied whose answer was lost: unwound, then forwarded (not stalled).
    let mut g = remote(REPORT_ONLY);
    g.redis_answers(|call, command, fake| {
        let answer = fake.answer(command);
        if call == 1 {
            CallAnswer { status: None, body: Vec::new() }
        } else {
            answer
        }
    });
    let request = post("/v1/payouts", Some("\"k-2\""), "{}");
    let o = g.send(&request, &created());
    assert!(o.passed(), "{:?}", o.logs);
    assert!(!o.stalled);
    assert_eq!(counters(&o), counted(&["remote_error", "claim_unwound", "would_reject.state_unavailable"]));
    assert_eq!(g.redis_records(), 0, "nothing recorded for a request that owns no key");
    // Enforce: the same failure refuses.
    let mut g = remote("");
    g.env.redis = None;
    assert_eq!(code(&g.send(&post("/v1/payouts", Some("\"k-1\""), "{}"), &created())), Some("state_unavailable"));
}

#[test]
fn report_only_declares_its_counters_and_leaves_the_operator_endpoint_enforced() {
    let g = local(REPORT_ONLY);
    let names = g.factory.counters();
    for name in ["would_replay", "would_reject.request_in_flight", "would_reject.idempotency_key_mismatch"] {
        assert!(names.contains(&name.to_string()), "{name}");
    }
    assert!(!local("").factory.counters().iter().any(|n| n.starts_with("would_")));
    assert!(g
        .factory
        .configured()
        .iter()
        .any(|(_, line)| line == "firebreak replay_guard mode=report_only nothing_refused_or_replayed"));
    // An operator's clear request is answered by the filter in either mode, never forwarded.
    let mut g = local(REPORT_ONLY);
    let o = g.send(&post("/ops/replay/clear", None, &clear_body("nope")), &created());
    assert_eq!(code(&o), Some("operator_forbidden"));
    assert!(!o.forwarded);
    let error = configure_in(&MemoryEnv::default(), &format!("{{{ROUTES},\"mode\":\"shadow\"}}")).err().unwrap();
    assert_eq!(error.field, "mode");
}

#[test]
fn report_only_a_claim_the_store_refuses_is_counted_and_forwarded_unrecorded() {
    let tiny = r#","key_store":{"buckets":1,"slots_per_bucket":2,"quota_per_principal":1}"#;
    let mut g = local(&format!("{tiny}{REPORT_ONLY}"));
    assert_eq!(counters(&g.send(&post("/v1/payouts", Some("\"q-1\""), "{}"), &created())), counted(&["forwarded", "completed"]));
    let over = g.send(&post("/v1/payouts", Some("\"q-2\""), "{}"), &created());
    assert!(over.passed());
    assert_eq!(counters(&over), counted(&["would_reject.tenant_quota_exceeded"]));
    // Nothing was recorded for it: enforce mode refuses the same request for the same reason.
    let enforce = switch(&g, &format!("{{{ROUTES}{tiny}}}"));
    let refused = exchange(&mut *enforce.new_flow(), &mut g.env, &post("/v1/payouts", Some("\"q-2\""), "{}"), &created());
    assert_eq!(code(&refused), Some("tenant_quota_exceeded"));
}
