//! replay-guard: the `Idempotency-Key` header, where a key lives, and the request fingerprint.
//!
//! Properties:
//! - a parsed key is 1 to `max_key_length` characters, and parsing its canonical spelling
//!   (`"<key>"`, escaped) gives the same key;
//! - `key_hash` separates its parts: two different (route, principal, key) triples never share a
//!   record address (length-prefixed parts; a collision would be a SHA-256 collision);
//! - the fingerprint is the same from the body and from its SHA-256 (the Content-Digest shortcut),
//!   and differs for a different body, method, path or principal;
//! - every refusal at header time is a documented replay-guard code.
#![no_main]

use arbitrary::Arbitrary;
use firebreak_core::replay::{body_sha256, key_hash, parse_idempotency_key, Exchange, ReplayPolicy, RequestFacts};
use firebreak_core::store::KeyHasher;
use firebreak_fuzz::{check_rejection, codes_of};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    header: String,
    max_len: u8,
    route: (String, String),
    principal: (Option<String>, Option<String>),
    key: (String, String),
    method: u8,
    path: String,
    headers: Vec<(String, String)>,
    body: (Vec<u8>, Vec<u8>),
}

fn policy() -> &'static ReplayPolicy {
    static POLICY: std::sync::OnceLock<ReplayPolicy> = std::sync::OnceLock::new();
    POLICY.get_or_init(|| {
        ReplayPolicy::from_json(
            br#"{"routes":[
                {"name":"payouts","match":{"methods":["POST"],"path_exact":"/v1/payouts"},"idempotency_key":"required"},
                {"name":"transfers","match":{"methods":["POST"],"path_prefix":"/v1/transfers"},"idempotency_key":"optional","collapse_window_ms":10000}],
                "ttl_seconds":3600,"in_flight_timeout_ms":30000}"#,
        )
        .expect("the fuzz policy configures")
    })
}

fuzz_target!(|input: Input| {
    let max_len = usize::from(input.max_len.max(1));
    if let Ok(key) = parse_idempotency_key(&input.header, max_len) {
        assert!(!key.is_empty() && key.len() <= max_len);
        let canonical = format!("\"{}\"", key.replace('\\', "\\\\").replace('"', "\\\""));
        assert_eq!(parse_idempotency_key(&canonical, max_len).as_deref(), Ok(key.as_str()));
    }

    let a = (&input.route.0, input.principal.0.as_deref(), &input.key.0);
    let b = (&input.route.1, input.principal.1.as_deref(), &input.key.1);
    if a != b {
        // Both hashers: the keyed one of local tables and SHA-256 of Redis names.
        for hasher in [KeyHasher::Keyed([7; 16]), KeyHasher::Sha256] {
            assert_ne!(key_hash(&hasher, a.0, a.1, a.2), key_hash(&hasher, b.0, b.1, b.2), "two keys share a record: {a:?} {b:?}");
        }
    }

    let policy = policy();
    let method = ["POST", "PUT", "GET", "post"][usize::from(input.method) % 4];
    let mut headers = input.headers;
    headers.push(("idempotency-key".into(), input.header.clone()));
    for principal in [None, input.principal.0.as_deref()] {
        let facts = RequestFacts { method, path_and_query: &input.path, headers: &headers, principal };
        match Exchange::begin(policy, &facts) {
            Ok(Some(exchange)) => {
                let (one, two) = (&input.body.0, &input.body.1);
                let f1 = exchange.fingerprint(one);
                assert_eq!(f1, exchange.fingerprint_of_body_sha256(&body_sha256(one)));
                if one != two {
                    assert_ne!(f1, exchange.fingerprint(two));
                }
                // Another method or path or principal is another request.
                let other_path = format!("{}x", input.path);
                let other = RequestFacts { method, path_and_query: &other_path, headers: &headers, principal };
                if let Ok(Some(other)) = Exchange::begin(policy, &other) {
                    assert_ne!(f1, other.fingerprint(one));
                }
                let other_principal = format!("{}-other", principal.unwrap_or(""));
                let other =
                    RequestFacts { method, path_and_query: &input.path, headers: &headers, principal: Some(&other_principal) };
                if let Ok(Some(other)) = Exchange::begin(policy, &other) {
                    assert_ne!(f1, other.fingerprint(one));
                }
            }
            Ok(None) => {}
            Err((error, _context)) => {
                let rejection = error.rejection();
                check_rejection(&rejection);
                assert!(codes_of("replay_guard").contains(rejection.code));
            }
        }
    }
});
