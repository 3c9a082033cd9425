//! replay-guard's host calls per request, call by call, and the body SHA-256 hand-over from
//! request-signature (filter-state property `firebreak.body_sha256`). Needs the product modules
//! (`bash scripts/build.sh`).

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use firebreak_core::replay::body_sha256;
use firebreak_host_tests::{workspace_root, Host, Module, Request, Upstream};

fn replay_guard() -> Arc<Module> {
    let wasm = workspace_root().join("target/wasm32-wasip1/release/replay_guard.wasm");
    assert!(wasm.exists(), "{} is missing: run `bash scripts/build.sh` first", wasm.display());
    Module::load(&wasm).expect("replay_guard.wasm compiles")
}

const CONFIG: &str = r#"{
  "routes": [{"name": "payouts", "match": {"methods": ["POST"], "path_prefix": "/v1/payouts"}}],
  "ttl_seconds": 3600
}"#;

fn host() -> Host {
    Host::builder(&replay_guard())
        .config(CONFIG)
        .upstream(Upstream {
            status: 201,
            headers: vec![("content-type".into(), "application/json".into())],
            body: br#"{"id":"op-1"}"#.to_vec(),
            ..Upstream::default()
        })
        .start()
        .expect("replay-guard starts")
}

fn calls(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(name, n)| (name.to_string(), *n)).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A request with a new key, forwarded, its answer stored: every host call accounted for
/// (sixteen: seventeen before the local finish stopped reading the clock; fifteen before the
/// per-tenant quota added its read and write).
#[test]
fn an_accepted_request_makes_sixteen_host_calls() {
    let mut h = host();
    let v = h.send(Request::post("/v1/payouts").header("idempotency-key", "\"k-1\"").body(r#"{"amount":1}"#));
    assert_eq!(v.status, 201);
    assert!(v.forwarded());
    let expected = calls(&[
        // request headers, response headers
        ("proxy_get_header_map_pairs", 2),
        // firebreak.principal (absent here), response.code_details
        ("proxy_get_property", 2),
        // request body, response body
        ("proxy_get_buffer_bytes", 2),
        // the claim (the header-time read finds no record of the key: no clock); the local
        // finish works at the claim's time (the record expires with its claim)
        ("proxy_get_current_time_nanoseconds", 1),
        // header-time read of the key's bucket (the claim commits against it); the tenant's
        // quota record; finish's read
        ("proxy_get_shared_data", 3),
        // the tenant's quota record; claim; stored response; completed record
        ("proxy_set_shared_data", 4),
        // forwarded, completed
        ("proxy_increment_metric", 2),
        // No log line: "forwarded" and "completed" are logged at debug level only, and the test
        // host reports info, as Envoy does with `wasm:info`.
    ]);
    assert_eq!(v.host_calls, expected, "host calls of an accepted request");
    // The retry is replayed from the stored answer.
    let again = h.send(Request::post("/v1/payouts").header("idempotency-key", "\"k-1\"").body(r#"{"amount":1}"#));
    assert_eq!(again.status, 201);
    assert!(!again.forwarded());
    assert_eq!(again.response_body, br#"{"id":"op-1"}"#);
    // A second new key of the same tenant spends a unit of the lease the first claim took from
    // its quota record (default quota 1,024, leases of 4: core::quota): fourteen host calls, no
    // quota read or write.
    let second = h.send(Request::post("/v1/payouts").header("idempotency-key", "\"k-2\"").body(r#"{"amount":2}"#));
    assert_eq!(second.status, 201);
    assert!(second.forwarded());
    let mut leased = expected.clone();
    leased.insert("proxy_get_shared_data".into(), 2);
    leased.insert("proxy_set_shared_data".into(), 3);
    assert_eq!(second.host_calls, leased, "host calls of an accepted request on a leased quota");
}

/// A body of 1 KiB or more whose SHA-256 request-signature verified is not read nor hashed
/// again; the fingerprint is the same as from the body itself.
#[test]
fn a_verified_body_sha256_replaces_reading_the_body_and_gives_the_same_fingerprint() {
    let mut h = host();
    let body = vec![b'x'; 2048];
    let digest = body_sha256(&body);
    let request = |key: &str| {
        Request::post("/v1/payouts")
            .header("idempotency-key", key)
            .property("firebreak.principal", "alice")
            .body(&body)
    };
    // Computed from the body (no hand-over).
    let first = h.send(request("\"k-a\""));
    assert_eq!(first.status, 201);
    assert_eq!(first.host_calls.get("proxy_get_buffer_bytes"), Some(&2), "request body read");
    // The retry with the digest handed over: same fingerprint, so it is replayed (not 422).
    let retry = h.send(request("\"k-a\"").property("firebreak.body_sha256", hex(&digest)));
    assert_eq!(retry.status, 201, "{:?}", retry.error_code());
    assert!(!retry.forwarded());
    assert_eq!(retry.response_body, br#"{"id":"op-1"}"#);
    assert_eq!(retry.host_calls.get("proxy_get_buffer_bytes"), None, "request body not read");
    // A new key with the hand-over: the request body is not read; the answer is.
    let fresh = h.send(request("\"k-b\"").property("firebreak.body_sha256", hex(&digest)));
    assert_eq!(fresh.status, 201);
    assert!(fresh.forwarded());
    assert_eq!(fresh.upstream_body(), Some(&body[..]));
    assert_eq!(fresh.host_calls.get("proxy_get_buffer_bytes"), Some(&1), "only the response body");
    // The digest is what the fingerprint uses: another digest for the same key is a mismatch.
    let other = h.send(request("\"k-b\"").property("firebreak.body_sha256", hex(&body_sha256(b"other"))));
    assert_eq!(other.status, 422);
    assert_eq!(other.error_code().as_deref(), Some("idempotency_key_mismatch"));
}

/// The hand-over is used only with a verified principal (request-signature ran) and a body of at
/// least 1 KiB; anything malformed counts as absent and the body is hashed here.
#[test]
fn the_body_sha256_is_ignored_without_a_principal_for_small_bodies_and_when_malformed() {
    let mut h = host();
    let big = vec![b'y'; 2048];
    let wrong = hex(&body_sha256(b"not the body"));
    // No principal: not read at all (an unsigned request never has it).
    let v = h.send(
        Request::post("/v1/payouts")
            .header("idempotency-key", "\"n-1\"")
            .property("firebreak.body_sha256", &wrong)
            .body(&big),
    );
    assert_eq!(v.status, 201);
    assert_eq!(v.host_calls.get("proxy_get_buffer_bytes"), Some(&2));
    let same = h.send(Request::post("/v1/payouts").header("idempotency-key", "\"n-1\"").body(&big));
    assert!(!same.forwarded(), "replayed: the first fingerprint was of the body, not of the property");
    assert_eq!(same.status, 201);
    // A small body: hashed here.
    let small = h.send(
        Request::post("/v1/payouts")
            .header("idempotency-key", "\"n-2\"")
            .property("firebreak.principal", "alice")
            .property("firebreak.body_sha256", &wrong)
            .body("{}"),
    );
    assert_eq!(small.status, 201);
    assert_eq!(small.host_calls.get("proxy_get_property"), Some(&2), "principal and code_details only");
    // Malformed: hashed here.
    let malformed = h.send(
        Request::post("/v1/payouts")
            .header("idempotency-key", "\"n-3\"")
            .property("firebreak.principal", "alice")
            .property("firebreak.body_sha256", "zz")
            .body(&big),
    );
    assert_eq!(malformed.status, 201);
    assert_eq!(malformed.host_calls.get("proxy_get_buffer_bytes"), Some(&2));
}
