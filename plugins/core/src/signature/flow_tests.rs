//! request-signature's flow driven through the in-memory host: replies, counters, log lines, the
//! principal and body digest handed on, what is held and read, the nonce claimed in the shared
//! data or on a fake Redis bridge (answering the webdis JSON the real bridge answers), host
//! faults and call failures.

use std::cell::RefCell;
use std::collections::HashSet;
use std::rc::Rc;

use crate::filters::{configure, Setup};
use crate::flow::memory::{exchange, step, FakeRedis, Faults, MemoryEnv, MemoryRequest, MemoryUpstream, Outcome, Reads};
use crate::flow::{CallAnswer, CallId, Event, Flow, FlowFactory, HostFailed, Level, Step};

use super::flow::{meter, SignatureFlow, COUNTERS};
use super::{sign, SignRequest};

const SECRET: &[u8] = b"0123456789012345678901234567890!";
const NOW_S: u64 = 1_700_000_000;
const PREFIX: &str = "firebreak.request_signature.";

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn config(extra: &str) -> String {
    format!(
        r#"{{"routes":[{{"methods":["POST","PUT"],"path_prefix":"/v1/"}}],"max_age_seconds":300,"future_skew_seconds":5,
            "max_body_bytes":64,"covered_headers_when_present":["idempotency-key"],
            "keys":[{{"id":"client-a","secret_base64":"{}"}}]{extra}}}"#,
        b64(SECRET)
    )
}

const REDIS: &str = r#","state":{"backend":"redis","cluster":"bridge","key_prefix":"t"}"#;

/// The factory as every host gets it: configured by name, its tables bound in `env`'s store.
fn make(env: &MemoryEnv, extra: &str) -> std::sync::Arc<dyn FlowFactory> {
    let setup = Setup { env: &|_| None, store: &env.store, entropy: [7; 32] };
    match configure("request_signature", config(extra).as_bytes(), &setup) {
        Ok(factory) => factory,
        Err(error) => panic!("{error}"),
    }
}

fn headers(method: &str, path: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut h = vec![
        (":method".to_string(), method.to_string()),
        (":scheme".to_string(), "http".to_string()),
        (":authority".to_string(), "api.example.com".to_string()),
        (":path".to_string(), path.to_string()),
    ];
    h.extend(extra.iter().map(|(n, v)| (n.to_string(), v.to_string())));
    h
}

/// A request signed by `client-a` (created `offset` seconds from the host's now), its body in
/// one chunk.
fn signed(method: &str, path: &str, extra: &[(&str, &str)], body: &[u8], nonce: &str) -> MemoryRequest {
    signed_with(method, path, extra, body, nonce, 0, body)
}

fn signed_with(
    method: &str,
    path: &str,
    extra: &[(&str, &str)],
    body: &[u8],
    nonce: &str,
    offset: i64,
    signed_body: &[u8],
) -> MemoryRequest {
    let mut h = headers(method, path, extra);
    let created = NOW_S.checked_add_signed(offset).unwrap();
    let out = sign(&SignRequest {
        method,
        scheme: "http",
        authority: "api.example.com",
        path_and_query: path,
        headers: &h,
        body: signed_body,
        key_id: "client-a",
        secret: SECRET,
        created,
        expires: None,
        nonce: Some(nonce),
        label: "sig1",
        components: None,
        extra_covered_headers: &[],
    })
    .unwrap();
    h.extend(out.pairs());
    MemoryRequest::new(h, body)
}

fn chunked(mut request: MemoryRequest, chunks: &[&[u8]], trailers: Option<&[(&str, &str)]>) -> MemoryRequest {
    request.chunks = chunks.iter().map(|c| c.to_vec()).collect();
    request.trailers = trailers.map(|t| t.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect());
    request
}

fn run(factory: &std::sync::Arc<dyn FlowFactory>, env: &mut MemoryEnv, request: &MemoryRequest) -> Outcome {
    exchange(&mut *factory.new_flow(), env, request, &MemoryUpstream::default())
}

/// The counters an outcome moved, without the prefix, sorted.
fn counters(outcome: &Outcome) -> Vec<String> {
    outcome.counters.keys().map(|k| k.strip_prefix(PREFIX).unwrap_or(k).to_string()).collect()
}

fn code(outcome: &Outcome) -> Option<&'static str> {
    outcome.reply.as_ref().map(|r| r.code)
}

/// A fake webdis bridge in front of Redis: the nonce script records each nonce key once
/// (`{"EVAL":1}`), answers a replay `{"EVAL":0}`, and refuses a key id past `quota` claims
/// (`{"EVAL":2}`).
fn fake_redis(quota: usize) -> (FakeRedis, Rc<RefCell<Vec<String>>>) {
    let seen = Rc::new(RefCell::new(Vec::new()));
    let log = seen.clone();
    let mut nonces = HashSet::new();
    let redis = Box::new(move |command: &[u8]| {
        let command = String::from_utf8(command.to_vec()).unwrap();
        log.borrow_mut().push(command.clone());
        let parts: Vec<&str> = command.split('/').collect();
        assert_eq!(parts[0], "EVALSHA", "{command}");
        let nonce_key = parts[parts.len() - 5].to_string();
        let answer = if nonces.contains(&nonce_key) {
            0
        } else if nonces.len() >= quota {
            2
        } else {
            nonces.insert(nonce_key);
            1
        };
        CallAnswer { status: Some(200), body: format!(r#"{{"EVAL":{answer}}}"#).into_bytes() }
    });
    (redis, seen)
}

/// One row: a request, the code it gets (`None`: forwarded), and every counter it moves.
struct Row {
    name: &'static str,
    request: MemoryRequest,
    code: Option<&'static str>,
    counters: &'static [&'static str],
}

#[test]
fn table_of_requests_replies_and_counters() {
    let body: &[u8] = br#"{"amount":1}"#;
    let big = [b'x'; 65];
    let rows = vec![
        Row {
            name: "a signed transfer",
            request: signed("POST", "/v1/transfers", &[], body, "n-1"),
            code: None,
            counters: &["accepted"],
        },
        Row {
            name: "the same signature again is a replay",
            request: signed("POST", "/v1/transfers", &[], body, "n-1"),
            code: Some("nonce_replayed"),
            counters: &["rejected.nonce_replayed"],
        },
        Row {
            name: "a signed request without a body",
            request: signed("POST", "/v1/transfers", &[], b"", "n-2"),
            code: None,
            counters: &["accepted"],
        },
        Row {
            name: "unsigned",
            request: MemoryRequest::new(headers("POST", "/v1/transfers", &[]), body),
            code: Some("signature_missing"),
            counters: &["rejected.signature_missing"],
        },
        Row {
            name: "a method outside the protected ones",
            request: MemoryRequest::new(headers("GET", "/v1/accounts", &[]), b""),
            code: None,
            counters: &["passed_unprotected"],
        },
        Row {
            name: "a client principal on an unprotected route is stripped",
            request: MemoryRequest::new(headers("GET", "/health", &[("x-firebreak-principal", "admin")]), b""),
            code: None,
            counters: &["passed_unprotected"],
        },
        Row {
            name: "another spelling of the principal on a protected route",
            request: signed("POST", "/v1/transfers", &[("x_firebreak_principal", "victim")], body, "n-3"),
            code: Some("principal_header_spoofed"),
            counters: &["rejected.principal_header_spoofed"],
        },
        Row {
            name: "two copies of the principal on a protected route",
            request: signed(
                "POST",
                "/v1/transfers",
                &[("x-firebreak-principal", "a"), ("x-firebreak-principal", "b")],
                body,
                "n-4",
            ),
            code: Some("header_duplicated"),
            counters: &["rejected.header_duplicated"],
        },
        Row {
            name: "a path that is not canonical",
            request: signed("POST", "/v1/../v1/transfers", &[], body, "n-5"),
            code: Some("path_not_canonical"),
            counters: &["rejected.path_not_canonical"],
        },
        Row {
            name: "a content-length over max_body_bytes",
            request: signed("POST", "/v1/transfers", &[("content-length", "65")], &big, "n-6"),
            code: Some("body_too_large"),
            counters: &["rejected.body_too_large"],
        },
        Row {
            name: "a content-length that is not a number",
            request: signed("POST", "/v1/transfers", &[("content-length", "ten")], body, "n-7"),
            code: Some("signature_malformed"),
            counters: &["rejected.signature_malformed"],
        },
        Row {
            name: "a body over max_body_bytes in chunks, without content-length",
            request: chunked(signed("POST", "/v1/transfers", &[], &big, "n-8"), &[&big[..40], &big[40..]], None),
            code: Some("body_too_large"),
            counters: &["rejected.body_too_large"],
        },
        Row {
            name: "a tampered body",
            request: signed_with("POST", "/v1/transfers", &[], br#"{"amount":9}"#, "n-9", 0, body),
            code: Some("content_digest_mismatch"),
            counters: &["rejected.content_digest_mismatch"],
        },
        Row {
            name: "a stale signature",
            request: signed_with("POST", "/v1/transfers", &[], body, "n-10", -1000, body),
            code: Some("signature_stale"),
            counters: &["rejected.signature_stale"],
        },
        Row {
            name: "a signature from the future",
            request: signed_with("POST", "/v1/transfers", &[], body, "n-11", 60, body),
            code: Some("signature_from_future"),
            counters: &["rejected.signature_from_future"],
        },
    ];
    let mut env = MemoryEnv::default();
    let factory = make(&env, "");
    for row in rows {
        let outcome = run(&factory, &mut env, &row.request);
        assert_eq!(code(&outcome), row.code, "{}: {:?}", row.name, outcome.logs);
        assert_eq!(counters(&outcome), row.counters, "{}", row.name);
        assert!(outcome.counters.values().all(|n| *n == 1), "{}: {:?}", row.name, outcome.counters);
        assert!(outcome.calls.is_empty(), "{}: the local backend calls nobody", row.name);
        if row.code.is_none() {
            assert!(outcome.passed(), "{}", row.name);
            assert_eq!(outcome.forwarded_body, row.request.chunks.concat(), "{}", row.name);
            assert!(outcome.logs.is_empty(), "{}: no log line without debug: {:?}", row.name, outcome.logs);
        } else {
            assert!(!outcome.forwarded, "{}", row.name);
            assert!(outcome.forwarded_body.is_empty(), "{}: nothing reaches the upstream", row.name);
            assert_eq!(outcome.logs.len(), 1, "{}", row.name);
            assert_eq!(outcome.logs[0].0, Level::Warn, "{}", row.name);
        }
    }
}

#[test]
fn the_principal_is_the_filters_only() {
    let mut env = MemoryEnv::default();
    let factory = make(&env, "");
    let outcome =
        run(&factory, &mut env, &signed("POST", "/v1/transfers", &[("x-firebreak-principal", "victim")], b"{}", "n-own"));
    assert!(outcome.passed());
    assert_eq!(outcome.principal.as_deref(), Some("client-a"));
    let principal: Vec<_> = outcome.upstream_headers.iter().filter(|(n, _)| n == "x-firebreak-principal").collect();
    assert_eq!(principal, [&("x-firebreak-principal".to_string(), "client-a".to_string())]);

    // Unprotected: every spelling goes, nothing is asserted.
    let outcome = run(
        &factory,
        &mut env,
        &MemoryRequest::new(
            headers(
                "GET",
                "/health",
                &[("x_firebreak_principal", "v"), ("X-Firebreak_Principal", "v"), ("x-firebreak-principal", "a")],
            ),
            b"",
        ),
    );
    assert!(outcome.passed());
    assert_eq!(outcome.principal, None);
    assert!(
        outcome.upstream_headers.iter().all(|(n, _)| !n.to_ascii_lowercase().contains("firebreak")),
        "{:?}",
        outcome.upstream_headers
    );
    assert_eq!(outcome.reads, Reads { headers: 1, body: 0, trailers: 0 });
}

#[test]
fn the_verified_body_digest_is_handed_on_only_when_the_signature_covers_it() {
    let mut env = MemoryEnv::default();
    let factory = make(&env, "");
    let body = br#"{"amount":5}"#;
    let outcome = run(&factory, &mut env, &signed("POST", "/v1/transfers", &[], body, "n-digest"));
    assert!(outcome.passed());
    use sha2::Digest as _;
    let want: [u8; 32] = sha2::Sha256::digest(body).into();
    assert_eq!(outcome.body_sha256, Some(want));

    // No body: no Content-Digest, nothing handed on.
    let outcome = run(&factory, &mut env, &signed("POST", "/v1/transfers", &[], b"", "n-empty"));
    assert!(outcome.passed());
    assert_eq!(outcome.body_sha256, None);
    assert_eq!(outcome.reads, Reads { headers: 1, body: 0, trailers: 0 });
}

/// The body a signed Content-Digest covers, stripped in transit: the request ends with its
/// headers (decided in the header callback, local nonce table) and is refused, never forwarded.
#[test]
fn a_signed_body_stripped_from_the_request_is_refused_at_its_headers() {
    let mut env = MemoryEnv::default();
    let factory = make(&env, "");
    let outcome = run(&factory, &mut env, &signed_with("POST", "/v1/transfers", &[], b"", "n-stripped", 0, br#"{"amount":5}"#));
    assert_eq!(code(&outcome), Some("content_digest_mismatch"), "{:?}", outcome.logs);
    assert!(!outcome.passed());
    assert_eq!(outcome.reads, Reads { headers: 1, body: 0, trailers: 0 });
}

#[test]
fn the_body_is_held_until_its_end_then_checked_whole() {
    let mut env = MemoryEnv::default();
    let factory = make(&env, "");
    let body = br#"{"amount":12345}"#;
    let request = chunked(signed("POST", "/v1/transfers", &[], body, "n-chunks"), &[&body[..4], &body[4..9], &body[9..]], None);
    let outcome = run(&factory, &mut env, &request);
    assert!(outcome.passed(), "{:?}", outcome.logs);
    assert_eq!(outcome.forwarded_body, body);
    assert_eq!(outcome.reads, Reads { headers: 1, body: 1, trailers: 0 });

    // The Content-Digest is checked over the chunks as the host holds them, cut anywhere.
    for at in 1..body.len() {
        let request = signed("POST", "/v1/transfers", &[], body, &format!("n-split-{at}")).split_at(&[at]);
        assert_eq!(request.chunks.len(), 2);
        assert!(run(&factory, &mut env, &request).passed(), "split at {at}");
        let fresh = signed("POST", "/v1/transfers", &[], body, &format!("n-tampered-{at}"));
        let tampered = chunked(fresh, &[&body[..at], b"X", &body[at + 1..]], None);
        assert_eq!(code(&run(&factory, &mut env, &tampered)), Some("content_digest_mismatch"), "split at {at}");
    }

    // Trailers end the body: what was buffered is checked (the trailers are not read).
    let request =
        chunked(signed("POST", "/v1/transfers", &[], body, "n-trailers"), &[&body[..4], &body[4..]], Some(&[("x-trailer", "1")]));
    let outcome = run(&factory, &mut env, &request);
    assert!(outcome.passed(), "{:?}", outcome.logs);
    assert_eq!(outcome.forwarded_body, body);
    assert_eq!(outcome.reads, Reads { headers: 1, body: 1, trailers: 0 });
    let request = chunked(
        signed_with("POST", "/v1/transfers", &[], body, "n-trailers-2", 0, b"{}"),
        &[&body[..4], &body[4..]],
        Some(&[("x-trailer", "1")]),
    );
    assert_eq!(code(&run(&factory, &mut env, &request)), Some("content_digest_mismatch"));

    // Step by step: the headers continue (a paused header callback would stop the body), the
    // chunks before the last are held, the last is checked.
    let request = signed("POST", "/v1/transfers", &[], body, "n-steps");
    let mut flow = factory.new_flow();
    let upstream = MemoryUpstream::default();
    let mut event = |event| step(&mut *flow, event, &mut env, &request, &upstream).0;
    assert_eq!(event(Event::RequestHeaders { end_of_stream: false }), Step::Continue);
    assert_eq!(event(Event::RequestBody { buffered: 3, end_of_stream: false }), Step::Hold);
    assert_eq!(event(Event::RequestBody { buffered: 10, end_of_stream: false }), Step::Hold);
    assert_eq!(event(Event::RequestBody { buffered: body.len(), end_of_stream: true }), Step::Continue);
    // Once finished, whatever comes passes untouched.
    assert_eq!(event(Event::RequestTrailers), Step::Continue);
    assert_eq!(event(Event::ResponseHeaders { end_of_stream: true }), Step::Continue);
    assert_eq!(event(Event::StreamEnd), Step::Continue);
}

#[test]
fn log_lines_name_the_request_and_the_claimed_key_never_a_secret() {
    let mut env = MemoryEnv::default();
    let factory = make(&env, "");
    let outcome = run(&factory, &mut env, &signed_with("POST", "/v1/transfers?x=1", &[], b"{}", "n-log", -1000, b"{}"));
    assert_eq!(
        outcome.logs,
        vec![(
            Level::Warn,
            r#"firebreak request_signature reject status=401 code=signature_stale method=POST path="/v1/transfers" keyid=client-a msg="created is older than the acceptance window""#
                .to_string()
        )]
    );
    let mut request = signed("POST", "/v1/transfers", &[], b"{}", "n-log-2");
    for (name, value) in &mut request.headers {
        if name == "signature" {
            *value = "sig1=:AAAA:".into();
        }
    }
    let outcome = run(&factory, &mut env, &request);
    assert_eq!(code(&outcome), Some("signature_invalid"));
    assert_eq!(counters(&outcome), ["rejected.signature_invalid", "rejected.signature_invalid.mac_mismatch"]);
    let line = &outcome.logs[0].1;
    assert!(line.contains(" reason=mac_mismatch method=POST path=\"/v1/transfers\" keyid=client-a msg="), "{line}");

    // An unreadable key id is never logged.
    let mut request = MemoryRequest::new(headers("POST", "/v1/transfers", &[("signature-input", r#"sig1=();keyid="a b""#)]), b"");
    request.headers.push(("signature".into(), "sig1=:AAAA:".into()));
    let outcome = run(&factory, &mut env, &request);
    assert!(outcome.logs[0].1.contains(" keyid=- msg="), "{:?}", outcome.logs);

    // Accepted: one debug line, only when debug lines are written.
    env.debug = true;
    let outcome = run(&factory, &mut env, &signed("POST", "/v1/transfers", &[], b"{}", "n-debug"));
    assert!(outcome.passed());
    assert_eq!(
        outcome.logs,
        vec![(Level::Debug, r#"firebreak request_signature accept method=POST path="/v1/transfers" keyid=client-a"#.to_string())]
    );
}

#[test]
fn host_faults_fail_closed() {
    let body: &[u8] = b"{}";
    let cases: Vec<(&str, Faults, MemoryRequest, &str)> = vec![
        (
            "unreadable headers",
            Faults { request_headers: true, ..Faults::default() },
            signed("POST", "/v1/transfers", &[], body, "f-1"),
            "signature_malformed",
        ),
        (
            "the principal cannot be published",
            Faults { writes: true, ..Faults::default() },
            signed("POST", "/v1/transfers", &[], body, "f-2"),
            "state_unavailable",
        ),
        (
            "a client principal cannot be removed (unprotected route)",
            Faults { writes: true, ..Faults::default() },
            MemoryRequest::new(headers("GET", "/health", &[("x-firebreak-principal", "admin")]), b""),
            "state_unavailable",
        ),
        (
            "the body cannot be read",
            Faults { request_body: true, ..Faults::default() },
            signed("POST", "/v1/transfers", &[], body, "f-3"),
            "state_unavailable",
        ),
    ];
    for (name, faults, request, want) in cases {
        let mut env = MemoryEnv { faults, ..MemoryEnv::default() };
        let factory = make(&env, "");
        let outcome = run(&factory, &mut env, &request);
        assert_eq!(code(&outcome), Some(want), "{name}");
        assert!(!outcome.forwarded, "{name}");
        assert_eq!(outcome.logs.len(), 1, "{name}");
    }
    let mut env = MemoryEnv { faults: Faults { request_headers: true, ..Faults::default() }, ..MemoryEnv::default() };
    let factory = make(&env, "");
    let outcome = run(&factory, &mut env, &signed("POST", "/v1/transfers", &[], body, "f-4"));
    assert_eq!(outcome.reply.unwrap().message, "malformed request headers (not UTF-8)");

    // No clock: the signature's age cannot be told.
    let mut env = MemoryEnv { now_ms: None, ..MemoryEnv::default() };
    let factory = make(&env, "");
    let outcome = run(&factory, &mut env, &signed("POST", "/v1/transfers", &[], body, "f-5"));
    assert_eq!(code(&outcome), Some("state_unavailable"));
    assert!(
        outcome.logs[0].1.contains(r#"method=POST path="/v1/transfers" msg="replay state is unavailable""#),
        "{:?}",
        outcome.logs
    );
}

#[test]
fn the_local_nonce_table_is_shared_by_every_flow_and_bounded_per_key_id() {
    let mut env = MemoryEnv::default();
    let factory = make(&env, r#","nonce_store":{"buckets":16,"slots_per_bucket":4,"quota_per_key_id":2}"#);
    let first = run(&factory, &mut env, &signed("POST", "/v1/transfers", &[], b"{}", "q-1"));
    assert!(first.passed());
    assert!(run(&factory, &mut env, &signed("POST", "/v1/transfers", &[], b"{}", "q-2")).passed());
    let third = run(&factory, &mut env, &signed("POST", "/v1/transfers", &[], b"{}", "q-3"));
    assert_eq!(code(&third), Some("tenant_quota_exceeded"));
    assert_eq!(counters(&third), ["rejected.tenant_quota_exceeded"]);
}

#[test]
fn the_redis_claim_holds_the_request_until_its_answer() {
    let (redis, commands) = fake_redis(2);
    let mut env = MemoryEnv { redis: Some(redis), ..MemoryEnv::default() };
    let factory = make(&env, REDIS);
    let body: &[u8] = br#"{"amount":3}"#;
    let accepted = run(&factory, &mut env, &signed("POST", "/v1/transfers", &[], body, "r-1"));
    assert!(accepted.passed(), "{:?}", accepted.logs);
    assert_eq!(counters(&accepted), ["accepted"]);
    assert_eq!(accepted.calls.len(), 1);
    assert_eq!(accepted.principal.as_deref(), Some("client-a"));
    assert_eq!(accepted.forwarded_body, body);
    assert!(commands.borrow()[0].starts_with("EVALSHA/"), "{:?}", commands.borrow());

    let replay = run(&factory, &mut env, &signed("POST", "/v1/transfers", &[], body, "r-1"));
    assert_eq!(code(&replay), Some("nonce_replayed"));
    assert_eq!(replay.principal, None);
    assert!(run(&factory, &mut env, &signed("POST", "/v1/transfers", &[], b"", "r-2")).passed());
    let over = run(&factory, &mut env, &signed("POST", "/v1/transfers", &[], body, "r-3"));
    assert_eq!(code(&over), Some("tenant_quota_exceeded"));
    assert_eq!(commands.borrow().len(), 4);

    // Step by step: the headers are held while the claim is in flight; a body chunk that comes
    // meanwhile is held too; the answer resumes the request, and the body is then checked.
    let (redis, _) = fake_redis(10);
    let mut env = MemoryEnv { redis: Some(redis), ..MemoryEnv::default() };
    let factory = make(&env, REDIS);
    let request = signed("POST", "/v1/transfers", &[], body, "r-steps");
    let mut flow = factory.new_flow();
    let upstream = MemoryUpstream::default();
    let (held, outcome) = step(&mut *flow, Event::RequestHeaders { end_of_stream: false }, &mut env, &request, &upstream);
    assert_eq!(held, Step::Hold);
    assert_eq!(outcome.calls.len(), 1);
    assert_eq!(outcome.principal, None, "nothing is published before the nonce is recorded");
    let chunk = Event::RequestBody { buffered: body.len(), end_of_stream: true };
    assert_eq!(step(&mut *flow, chunk, &mut env, &request, &upstream).0, Step::Hold);
    // Another call's answer is not this flow's.
    let (other, host) = answer(&mut *flow, CallId(99), br#"{"EVAL":1}"#);
    assert_eq!(other, Step::Hold);
    assert_eq!(host.reads, 0, "not read");
    assert!(host.logs.is_empty() && host.counters.is_empty());
    let (resumed, host) = answer(&mut *flow, CallId(1), br#"{"EVAL":1}"#);
    assert_eq!(resumed, Step::Continue);
    assert_eq!(host.reads, 1);
    assert_eq!(host.principal.as_deref(), Some("client-a"));
    assert_eq!(host.headers_set, [("x-firebreak-principal".to_string(), Some("client-a".to_string()))]);
    assert!(host.counters.is_empty(), "accepted only once the body verified");
    // The flow waits for the body's end (as Envoy delivers it after the resume).
    assert_eq!(step(&mut *flow, chunk, &mut env, &request, &upstream).0, Step::Continue);
}

/// The host of one call answer: `step` never answers a call, so the answer is delivered here.
/// It records what the flow did meanwhile.
#[derive(Default)]
struct AnswerHost {
    answer: Option<CallAnswer>,
    reads: usize,
    principal: Option<String>,
    headers_set: Vec<(String, Option<String>)>,
    counters: Vec<String>,
    logs: Vec<(Level, String)>,
    store: crate::store::MemoryStore,
}

impl crate::flow::Host for AnswerHost {
    fn now_ms(&mut self) -> Option<u64> {
        Some(NOW_S * 1000)
    }
    fn request_headers(&mut self) -> Result<std::rc::Rc<crate::flow::Headers>, crate::flow::ReadError> {
        Err(crate::flow::ReadError::HostFailed)
    }

    fn request_headers_lossy(&mut self) -> Result<std::rc::Rc<crate::flow::Headers>, HostFailed> {
        Err(HostFailed)
    }
    fn with_request_body(&mut self, _: usize, _: &mut dyn FnMut(crate::flow::BodyChunks<'_>)) -> Result<(), HostFailed> {
        Err(HostFailed)
    }
    fn request_trailers_raw(&mut self) -> Result<crate::flow::RawHeaders, HostFailed> {
        Err(HostFailed)
    }
    fn set_request_header(&mut self, name: &str, value: Option<&str>) -> Result<(), HostFailed> {
        self.headers_set.push((name.to_string(), value.map(str::to_string)));
        Ok(())
    }
    fn response_headers_raw(&mut self) -> Result<crate::flow::RawHeaders, HostFailed> {
        Err(HostFailed)
    }
    fn response_body(&mut self, _size: usize) -> Result<Vec<u8>, HostFailed> {
        Err(HostFailed)
    }
    fn add_response_header(&mut self, _name: &str, _value: &str) -> Result<(), HostFailed> {
        Err(HostFailed)
    }
    fn response_from_upstream(&mut self) -> bool {
        false
    }
    fn source_address(&mut self) -> Option<String> {
        None
    }
    fn principal(&mut self) -> Result<Option<String>, HostFailed> {
        Ok(self.principal.clone())
    }
    fn set_principal(&mut self, principal: &str) -> Result<(), HostFailed> {
        self.principal = Some(principal.to_string());
        Ok(())
    }
    fn body_sha256(&mut self, _body_len: usize) -> Option<[u8; 32]> {
        None
    }
    fn set_body_sha256(&mut self, _digest: &[u8; 32], _body_len: usize) {}
    fn store(&self) -> &dyn crate::store::SharedStore {
        &self.store
    }
    fn call_redis(&mut self, _redis: &crate::remote::RedisConfig, _command: &[u8]) -> Result<CallId, HostFailed> {
        Err(HostFailed)
    }
    fn call_answer(&mut self, body_size: usize, max_bytes: usize) -> Option<CallAnswer> {
        self.reads += 1;
        (body_size <= max_bytes).then(|| self.answer.clone()).flatten()
    }
    fn count(&mut self, meter: &crate::flow::Meter, name: &str) {
        self.counters.push(format!("{}.{name}", meter.prefix));
    }
    fn count_passed(&mut self, meter: &crate::flow::Meter, name: &str) {
        self.count(meter, name);
    }
    fn logs_debug(&self) -> bool {
        false
    }
    fn log(&mut self, level: Level, line: &str) {
        self.logs.push((level, line.to_string()));
    }
}

/// Delivers a bridge answer (`200`, `body`) to `flow` as call `call`.
fn answer(flow: &mut dyn Flow, call: CallId, body: &[u8]) -> (Step, AnswerHost) {
    let answer = CallAnswer { status: Some(200), body: body.to_vec() };
    let mut host = AnswerHost { answer: Some(answer), ..AnswerHost::default() };
    let step = flow.on_event(Event::CallAnswer { call, body_size: body.len() }, &mut host);
    (step, host)
}

#[test]
fn an_unusable_redis_answer_fails_closed() {
    let body: &[u8] = b"{}";
    let cases: Vec<(&str, Option<FakeRedis>, &str)> = vec![
        ("no bridge: the dispatch fails", None, r#"store_error="dispatch failed""#),
        (
            "the bridge answers 503",
            Some(Box::new(|_: &[u8]| CallAnswer { status: Some(503), body: Vec::new() })),
            r#"store_error="state store unreachable: bridge answered HTTP 503""#,
        ),
        (
            "no answer (timeout)",
            Some(Box::new(|_: &[u8]| CallAnswer { status: None, body: Vec::new() })),
            r#"store_error="state store unreachable: no answer (timeout or connection failure)""#,
        ),
        (
            "a Redis error",
            Some(Box::new(|_: &[u8]| CallAnswer { status: Some(200), body: br#"{"EVAL":[false,"NOSCRIPT"]}"#.to_vec() })),
            r#"store_error="state store error"#,
        ),
        (
            "an answer the script never gives",
            Some(Box::new(|_: &[u8]| CallAnswer { status: Some(200), body: br#"{"EVAL":7}"#.to_vec() })),
            "unexpected nonce claim reply",
        ),
        (
            "not JSON",
            Some(Box::new(|_: &[u8]| CallAnswer { status: Some(200), body: b"<html>".to_vec() })),
            r#"store_error="state store answered something unreadable"#,
        ),
    ];
    for (name, redis, log) in cases {
        let mut env = MemoryEnv { redis, ..MemoryEnv::default() };
        let factory = make(&env, REDIS);
        let outcome = run(&factory, &mut env, &signed("POST", "/v1/transfers", &[], body, "u-1"));
        assert_eq!(code(&outcome), Some("state_unavailable"), "{name}");
        assert_eq!(counters(&outcome), ["rejected.state_unavailable"], "{name}");
        assert!(!outcome.forwarded, "{name}");
        assert_eq!(outcome.principal, None, "{name}");
        assert_eq!(outcome.logs.len(), 1, "{name}");
        let line = &outcome.logs[0].1;
        assert!(line.contains(log), "{name}: {line}");
        assert!(line.contains(r#"path="/v1/transfers" keyid=client-a store_error="#), "{name}: {line}");
    }
}

#[test]
fn a_body_refused_while_the_claim_is_in_flight_ignores_the_answer() {
    let (redis, _) = fake_redis(10);
    let mut env = MemoryEnv { redis: Some(redis), ..MemoryEnv::default() };
    let factory = make(&env, REDIS);
    let request = signed("POST", "/v1/transfers", &[], b"{}", "r-big");
    let mut flow = factory.new_flow();
    let upstream = MemoryUpstream::default();
    assert_eq!(step(&mut *flow, Event::RequestHeaders { end_of_stream: false }, &mut env, &request, &upstream).0, Step::Hold);
    let (refused, outcome) =
        step(&mut *flow, Event::RequestBody { buffered: 65, end_of_stream: false }, &mut env, &request, &upstream);
    let Step::Reply(rejection) = refused else { panic!("{refused:?}") };
    assert_eq!(rejection.code, "body_too_large");
    assert_eq!(counters(&outcome), ["rejected.body_too_large"]);
    // The answer goes to nobody: not read, nothing resumed, nothing published.
    let (late, host) = answer(&mut *flow, CallId(1), br#"{"EVAL":1}"#);
    assert_eq!(late, Step::Hold);
    assert_eq!(host.reads, 0);
    assert_eq!(host.principal, None);
    assert!(host.logs.is_empty() && host.counters.is_empty() && host.headers_set.is_empty());
}

#[test]
fn the_factory_defines_the_counters_and_the_meter() {
    let env = MemoryEnv::default();
    let factory = make(&env, "");
    assert_eq!(factory.meter(), meter());
    assert_eq!(&*factory.meter().prefix, "firebreak.request_signature");
    assert_eq!(factory.counters(), COUNTERS.iter().map(|c| c.to_string()).collect::<Vec<_>>());
    assert_eq!(factory.counters(), ["accepted", "passed_unprotected", "rejected.tenant_quota_exceeded"]);
    let configured = factory.configured();
    assert_eq!(configured.len(), 1, "{configured:?}");
    assert!(configured
        .iter()
        .all(|(level, line)| *level == Level::Info && line.contains(" nonce_quota per_key_id=")));

    // Errors name the field; the secret comes from the environment; the tables are bound.
    let setup = Setup { env: &|_| None, store: &env.store, entropy: [7; 32] };
    let error = configure(
        "request_signature",
        br#"{"routes":[{"path_prefix":"/"}],"max_age_seconds":1,"keys":[{"id":"a","secret_env":"NOPE"}]}"#,
        &setup,
    )
    .err()
    .unwrap();
    assert_eq!(error.field, "keys[0].secret_env");
    let with_env = |name: &str| (name == "KEY").then(|| b64(SECRET));
    let setup = Setup { env: &with_env, store: &env.store, entropy: [7; 32] };
    assert!(configure(
        "request_signature",
        br#"{"routes":[{"path_prefix":"/"}],"max_age_seconds":1,"keys":[{"id":"a","secret_env":"KEY"}]}"#,
        &setup
    )
    .is_ok());
    let other = config(r#","nonce_store":{"buckets":32,"slots_per_bucket":4}"#);
    let setup = Setup { env: &|_| None, store: &env.store, entropy: [7; 32] };
    let error = configure("request_signature", other.as_bytes(), &setup).err().unwrap();
    assert_eq!(error.field, "nonce_store.buckets", "a table already bound with another geometry");
    let _ = SignatureFlow::new;
}

/// A Redis that does not hold the script yet answers the `EVALSHA` with `NOSCRIPT`: the callout
/// runtime sends the same call once with the script's text (`EVAL`, which loads it) and the
/// request goes on with that answer; the next request's `EVALSHA` finds the script.
#[test]
fn noscript_is_answered_by_sending_the_script_once() {
    let loaded = Rc::new(RefCell::new(false));
    let seen = loaded.clone();
    let redis = Box::new(move |command: &[u8]| {
        if command.starts_with(b"EVALSHA/") && !*seen.borrow() {
            return CallAnswer {
                status: Some(200),
                body: br#"{"EVALSHA":[false,"NOSCRIPT No matching script. Please use EVAL."]}"#.to_vec(),
            };
        }
        if command.starts_with(b"EVAL/") {
            *seen.borrow_mut() = true;
            return CallAnswer { status: Some(200), body: br#"{"EVAL":1}"#.to_vec() };
        }
        CallAnswer { status: Some(200), body: br#"{"EVALSHA":1}"#.to_vec() }
    });
    let mut env = MemoryEnv { redis: Some(redis), ..MemoryEnv::default() };
    let factory = make(&env, REDIS);
    let first = run(&factory, &mut env, &signed("POST", "/v1/transfers", &[], b"{}", "n-1"));
    assert!(first.passed(), "{:?}", first.reply);
    let verbs: Vec<&[u8]> = first.calls.iter().map(|c| c.split(|b| *b == b'/').next().unwrap()).collect();
    assert_eq!(verbs, [&b"EVALSHA"[..], &b"EVAL"[..]]);
    assert!(first.calls[1].len() > first.calls[0].len(), "the fallback carries the script");
    let second = run(&factory, &mut env, &signed("POST", "/v1/transfers", &[], b"{}", "n-2"));
    assert!(second.passed(), "{:?}", second.reply);
    assert_eq!(second.calls.len(), 1);
    assert!(second.calls[0].starts_with(b"EVALSHA/"));
}

const REPORT_ONLY: &str = r#","mode":"report_only""#;

/// The same requests: refused in enforce mode; in report-only mode counted
/// (`would_reject.<code>`), logged once, and forwarded as requests this filter did not verify (no
/// principal handed on, the client's principal copies removed, nothing else changed); refused
/// again once the configuration says `enforce`.
#[test]
fn report_only_counts_logs_and_forwards_without_a_principal_what_enforce_refuses() {
    let body: &[u8] = br#"{"amount":3}"#;
    let cases: Vec<(&str, MemoryRequest, &str)> = vec![
        (
            "unsigned",
            MemoryRequest::new(headers("POST", "/v1/transfers", &[("content-type", "application/json")]), body),
            "signature_missing",
        ),
        ("stale", signed_with("POST", "/v1/transfers", &[], body, "n-old", -3600, body), "signature_stale"),
        (
            "body changed",
            signed_with("POST", "/v1/transfers", &[], b"{\"amount\":9}", "n-body", 0, body),
            "content_digest_mismatch",
        ),
        (
            "spoofed principal",
            signed(
                "POST",
                "/v1/transfers",
                &[("x_firebreak_principal", "victim"), ("x-firebreak-principal", "victim")],
                body,
                "n-spoof",
            ),
            "principal_header_spoofed",
        ),
        (
            "not canonical",
            MemoryRequest::new(headers("POST", "/v1/../v1/transfers", &[("x-firebreak-principal", "victim")]), body),
            "path_not_canonical",
        ),
    ];
    for (what, request, want) in cases {
        let mut env = MemoryEnv::default();
        let enforce = run(&make(&env, ""), &mut env, &request);
        let Some(code) = code(&enforce) else { panic!("{what}: passed in enforce mode") };

        let mut env = MemoryEnv::default();
        let reported = run(&make(&env, REPORT_ONLY), &mut env, &request);
        assert!(reported.passed(), "{what}: {:?}", reported.logs);
        assert_eq!(code, want, "{what}");
        assert_eq!(counters(&reported), [format!("would_reject.{code}")], "{what}");
        assert_eq!(reported.logs.len(), 1, "{what}");
        assert!(reported.logs[0].1.starts_with("firebreak request_signature would_reject status="), "{what}");
        assert!(reported.logs[0].1.contains(&format!(" code={code}")), "{what}");
        assert_eq!(reported.forwarded_body, request.chunks.concat(), "{what}");
        // No client copy of the principal reaches the upstream; the rest goes on unchanged.
        let client_copies = |h: &(String, String)| h.0.to_ascii_lowercase().replace('_', "-") == "x-firebreak-principal";
        let sent: Vec<_> = request.headers.iter().filter(|h| !client_copies(h)).cloned().collect();
        if what == "body changed" {
            // The headers verified (MAC, time, nonce) and the principal went on with them
            // before the body could be checked (README: report-only and the body).
            assert_eq!(reported.principal.as_deref(), Some("client-a"), "{what}");
        } else {
            assert_eq!(reported.principal, None, "{what}");
            assert_eq!(reported.upstream_headers, sent, "{what}");
        }

        // Switching is a configuration change: the same request is refused.
        let mut env = MemoryEnv::default();
        assert_eq!(self::code(&run(&make(&env, r#","mode":"enforce""#), &mut env, &request)), Some(code), "{what}");
    }
}

#[test]
fn report_only_a_replayed_nonce_is_counted_and_forwarded_without_a_principal() {
    let body: &[u8] = br#"{"amount":3}"#;
    let request = signed("POST", "/v1/transfers", &[], body, "n-twice");
    // Local nonces.
    let mut env = MemoryEnv::default();
    let factory = make(&env, REPORT_ONLY);
    let first = run(&factory, &mut env, &request);
    assert!(first.passed());
    assert_eq!(first.principal.as_deref(), Some("client-a"));
    assert_eq!(counters(&first), ["accepted"]);
    let again = run(&factory, &mut env, &request);
    assert!(again.passed());
    assert_eq!(again.principal, None);
    assert_eq!(counters(&again), ["would_reject.nonce_replayed"]);
    assert_eq!(self::code(&run(&make(&env, ""), &mut env, &request)), Some("nonce_replayed"));
    // Nonces on Redis: the claim's refusal resumes the held request.
    let (redis, _) = fake_redis(10);
    let mut env = MemoryEnv { redis: Some(redis), ..MemoryEnv::default() };
    let factory = make(&env, &format!("{REDIS}{REPORT_ONLY}"));
    assert!(run(&factory, &mut env, &request).passed());
    let again = run(&factory, &mut env, &request);
    assert!(again.passed(), "{:?}", again.logs);
    assert!(!again.stalled);
    assert_eq!(again.principal, None);
    assert_eq!(counters(&again), ["would_reject.nonce_replayed"]);
    assert_eq!(again.forwarded_body, body);
    let enforce = make(&env, REDIS);
    assert_eq!(self::code(&run(&enforce, &mut env, &request)), Some("nonce_replayed"));
}

#[test]
fn report_only_still_refuses_what_would_leave_a_clients_principal_or_half_of_ours() {
    // A failed header write: a client's principal copy cannot be removed.
    let mut env = MemoryEnv { faults: Faults { writes: true, ..Faults::default() }, ..MemoryEnv::default() };
    let factory = make(&env, REPORT_ONLY);
    let request = signed("POST", "/v1/transfers", &[("x-firebreak-principal", "victim")], b"{}", "n-w");
    let outcome = run(&factory, &mut env, &request);
    assert_eq!(code(&outcome), Some("state_unavailable"), "{:?}", outcome.logs);
    let declared = factory.counters();
    assert!(declared.contains(&"would_reject.signature_invalid".to_string()));
    assert!(!make(&env, "").counters().iter().any(|c| c.starts_with("would_reject.")));
    assert!(factory
        .configured()
        .iter()
        .any(|(level, line)| *level == Level::Warn && line == "firebreak request_signature mode=report_only nothing_refused"));
}

#[test]
fn the_mode_is_read_at_configure_time_and_a_bad_one_names_its_field() {
    let env = MemoryEnv::default();
    let setup = Setup { env: &|_| None, store: &env.store, entropy: [7; 32] };
    for bad in [r#","mode":"Report_Only""#, r#","mode":"audit""#] {
        let Err(error) = configure("request_signature", config(bad).as_bytes(), &setup) else { panic!("{bad}") };
        assert_eq!(error.field, "mode", "{bad}");
    }
    assert!(configure("request_signature", config(r#","mode":true"#).as_bytes(), &setup).is_err());
    assert!(!make(&env, r#","mode":"enforce""#).configured().iter().any(|(_, line)| line.contains("report_only")));
}

/// The operator reads at configure time what one key id may sustain before its nonce quota
/// refuses it (window: max_age 300 + skew 5 + 1 s).
#[test]
fn the_configured_lines_say_what_one_key_id_can_sustain() {
    let env = MemoryEnv::default();
    let factory = make(&env, r#","nonce_store":{"quota_per_key_id":30600}"#);
    let lines: Vec<String> = factory.configured().into_iter().map(|(_, line)| line).collect();
    assert!(
        lines.contains(
            &"firebreak request_signature nonce_quota per_key_id=30600 window_s=306 sustained_per_key_id_per_s=100 lease=16"
                .to_string()
        ),
        "{lines:?}"
    );
}
