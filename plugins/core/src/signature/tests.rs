use std::num::NonZeroU64;

use base64::Engine;

use super::*;
use crate::store::MemoryStore;

const RFC_SHARED_SECRET: &str = "uzvJfB4u3N0Jy4T7NZ75MDVcr8zSTInedJtkgcu46YW4XByzNJjxBdtjUkdJPBtbmHhIDi6pcl8jsasjlTMtDQ==";
const SECRET_B64: &str = "ZGVtby1jbGllbnQtc2VjcmV0LWRvLW5vdC11c2UtaW4tcHJvZHVjdGlvbiE=";
const NOW_S: u64 = 1_700_000_000;
const NOW_MS: u64 = NOW_S * 1000;

fn b64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
}

fn policy() -> SignaturePolicy {
    let json = format!(
        r#"{{"routes":[{{"methods":["POST"],"path_prefix":"/v1/"}}],"max_age_seconds":300,"future_skew_seconds":5,
            "max_body_bytes":1024,"covered_headers_when_present":["idempotency-key"],
            "keys":[{{"id":"demo-client","secret_base64":"{SECRET_B64}"}},
                    {{"id":"retired","secret_base64":"{SECRET_B64}","not_after":{}}}]}}"#,
        NOW_S - 10
    );
    SignaturePolicy::from_json(json.as_bytes(), &|_| None).unwrap()
}

/// The RFC 9421 Appendix B.2 request.
fn rfc_headers() -> Vec<(String, String)> {
    h(&[
        ("host", "example.com"),
        ("date", "Tue, 20 Apr 2021 02:07:55 GMT"),
        ("content-type", "application/json"),
        ("content-digest", "sha-512=:WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX+TaPm+AbwAgBWnrIiYllu7BNNyealdVLvRwEmTHWXvJwew==:"),
        ("content-length", "18"),
    ])
}

#[test]
fn rfc9421_b25_hmac_sha256_example_verifies() {
    let mut headers = rfc_headers();
    headers.push((
        "signature-input".into(),
        r#"sig-b25=("date" "@authority" "content-type");created=1618884473;keyid="test-shared-secret""#.into(),
    ));
    headers.push(("signature".into(), "sig-b25=:pxcQw6G3AjtMBQjwo8XzkZf/bws5LelbaMk5rGIGtE8=:".into()));
    let request = RequestView {
        method: "POST",
        scheme: "https",
        authority: "example.com",
        path_and_query: "/foo?param=Value&Pet=dog",
        headers: &headers,
    };
    let json = format!(
        r#"{{"routes":[{{"path_prefix":"/"}}],"max_age_seconds":300,"keys":[{{"id":"test-shared-secret","secret_base64":"{RFC_SHARED_SECRET}"}}]}}"#
    );
    let mut rfc_policy = SignaturePolicy::from_json(json.as_bytes(), &|_| None).unwrap();
    // The RFC example covers neither @method nor a nonce, and dates from 2021.
    rfc_policy.require_nonce = false;
    rfc_policy.require_default_coverage = false;
    rfc_policy.max_age_seconds = NonZeroU64::new(u64::MAX / 2).unwrap();
    let verified = verify_headers(&rfc_policy, &request, 1_618_884_473_000).unwrap();
    assert_eq!(verified.key_id, "test-shared-secret");

    // One bit off in the MAC, or a changed covered header: rejected.
    let mut tampered = headers.clone();
    tampered[6].1 = "sig-b25=:pxcRw6G3AjtMBQjwo8XzkZf/bws5LelbaMk5rGIGtE8=:".into();
    let request2 = RequestView { headers: &tampered, ..request };
    assert_eq!(verify_headers(&rfc_policy, &request2, 1_618_884_473_000), Err(SigError::InvalidSignature));
    let mut tampered = headers.clone();
    tampered[2].1 = "text/plain".into();
    let request3 = RequestView { headers: &tampered, ..request };
    assert_eq!(verify_headers(&rfc_policy, &request3, 1_618_884_473_000), Err(SigError::InvalidSignature));
}

#[test]
fn rfc9421_signature_bases_match_the_examples() {
    let headers = rfc_headers();
    let request = RequestView {
        method: "POST",
        scheme: "https",
        authority: "example.com",
        path_and_query: "/foo?param=Value&Pet=dog",
        headers: &headers,
    };
    // B.2.1: minimal coverage.
    let input: sfv::Dictionary =
        sfv::Parser::new(r#"sig-b21=();created=1618884473;keyid="test-key-rsa-pss";nonce="b3k2pp5k7z-50gnwp.yemd""#)
            .parse()
            .unwrap();
    let sfv::ListEntry::InnerList(list) = &input["sig-b21"] else { panic!() };
    let params = base::serialize_signature_params(list).unwrap();
    assert_eq!(
        base::signature_base(&[], &params, &request).unwrap(),
        "\"@signature-params\": ();created=1618884473;keyid=\"test-key-rsa-pss\";nonce=\"b3k2pp5k7z-50gnwp.yemd\""
    );
    // B.2.2: selective coverage.
    let components: Vec<Component> = ["@authority", "content-digest", "@query-param"]
        .iter()
        .filter_map(|c| Component::parse(c))
        .collect();
    assert_eq!(components.len(), 2, "@query-param is refused, not half-supported");
    let expected = "\"@authority\": example.com\n\"content-digest\": sha-512=:WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX+TaPm+AbwAgBWnrIiYllu7BNNyealdVLvRwEmTHWXvJwew==:\n\"@signature-params\": (\"@authority\" \"content-digest\");created=1618884473;keyid=\"test-key-rsa-pss\"";
    let input: sfv::Dictionary =
        sfv::Parser::new(r#"sig-b22=("@authority" "content-digest");created=1618884473;keyid="test-key-rsa-pss""#)
            .parse()
            .unwrap();
    let sfv::ListEntry::InnerList(list) = &input["sig-b22"] else { panic!() };
    let params = base::serialize_signature_params(list).unwrap();
    assert_eq!(base::signature_base(&components, &params, &request).unwrap(), expected);
    // Derived components of B.2 request.
    assert_eq!(Component::Query.value(&request).unwrap(), "?param=Value&Pet=dog");
    assert_eq!(Component::TargetUri.value(&request).unwrap(), "https://example.com/foo?param=Value&Pet=dog");
    assert_eq!(Component::Path.value(&request).unwrap(), "/foo");
}

struct Req {
    method: &'static str,
    authority: &'static str,
    path: &'static str,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn signed(created: u64, nonce: &str, body: &[u8], tweak: impl FnOnce(&mut SignRequest<'_>)) -> Req {
    let secret = b64(SECRET_B64);
    let headers = h(&[("content-type", "application/json")]);
    let mut request = SignRequest {
        method: "POST",
        scheme: "http",
        authority: "127.0.0.1:10000",
        path_and_query: "/v1/transfers?dry=0",
        headers: &headers,
        body,
        key_id: "demo-client",
        secret: &secret,
        created,
        expires: None,
        nonce: Some(nonce),
        label: "sig1",
        components: None,
        extra_covered_headers: &[],
    };
    tweak(&mut request);
    let out = sign(&request).unwrap();
    let mut all = headers.clone();
    all.extend(out.pairs());
    Req { method: "POST", authority: "127.0.0.1:10000", path: "/v1/transfers?dry=0", headers: all, body: body.to_vec() }
}

/// Runs the whole pipeline as the plugin does; returns the error code or "ok".
fn check(policy: &SignaturePolicy, store: &MemoryStore, req: &Req, now_ms: u64) -> &'static str {
    let view = RequestView {
        method: req.method,
        scheme: "http",
        authority: req.authority,
        path_and_query: req.path,
        headers: &req.headers,
    };
    let result = verify_headers(policy, &view, now_ms).and_then(|v| {
        let digest = view.header_values("content-digest").next();
        verify_body(policy, &v, digest, &req.body)?;
        claim_nonce(policy, store, &v, now_ms)
    });
    match result {
        Ok(()) => "ok",
        Err(e) => e.rejection().code,
    }
}

#[test]
fn a_signed_request_passes_once() {
    let (p, store) = (policy(), MemoryStore::default());
    let req = signed(NOW_S, "n-1", br#"{"amount":10}"#, |_| {});
    assert_eq!(check(&p, &store, &req, NOW_MS), "ok");
    assert_eq!(check(&p, &store, &req, NOW_MS + 1000), "nonce_replayed");
    // Same nonce under another key id is a different nonce.
    let other = signed(NOW_S, "n-2", b"", |_| {});
    assert_eq!(check(&p, &store, &other, NOW_MS), "ok");
}

/// The `@signature-params` line is the serialization of the inner list: the received bytes when
/// canonical, else the canonical form written from what was parsed (what a signer that
/// serializes signed). A repeated parameter or label, which two verifiers could read two ways, is
/// refused.
#[test]
fn signature_params_are_the_inner_list_serialized_and_repeats_are_refused() {
    let p = policy();
    let fresh = || MemoryStore::default();
    let set = |req: &mut Req, name: &str, f: &dyn Fn(&str) -> String| {
        for (n, v) in req.headers.iter_mut() {
            if n == name {
                *v = f(v);
            }
        }
    };
    let canonical = signed(NOW_S, "n-c", br#"{"amount":10}"#, |_| {});
    assert_eq!(check(&p, &fresh(), &canonical, NOW_MS), "ok");
    // Not canonical, same inner list: verifies over the canonical form.
    for rewrite in [
        &(|v: &str| v.replacen("sig1=(", "sig1=(  ", 1)) as &dyn Fn(&str) -> String,
        &|v: &str| v.replacen("\" \"", "\"   \"", 1),
        &|v: &str| v.replace(';', "; "),
        &|v: &str| v.replacen(";created=", ";created=000", 1),
        &|v: &str| format!("  {v}  "),
    ] {
        let mut r = signed(NOW_S, "n-c", br#"{"amount":10}"#, |_| {});
        set(&mut r, "signature-input", rewrite);
        let value = r.headers.iter().find(|(n, _)| n == "signature-input").unwrap().1.clone();
        assert_eq!(check(&p, &fresh(), &r, NOW_MS), "ok", "{value}");
    }
    // A different inner list is a different line: the MAC fails.
    let mut r = signed(NOW_S, "n-c", br#"{"amount":10}"#, |_| {});
    set(&mut r, "signature-input", &|v| format!("{v};tag=\"x\""));
    assert_eq!(check(&p, &fresh(), &r, NOW_MS), "signature_invalid");
    // Repeats: refused before anything else is read.
    let mut r = signed(NOW_S, "n-c", br#"{"amount":10}"#, |_| {});
    set(&mut r, "signature-input", &|v| format!("{v};nonce=\"n-other\""));
    assert_eq!(check(&p, &fresh(), &r, NOW_MS), "signature_malformed");
    let mut r = signed(NOW_S, "n-c", br#"{"amount":10}"#, |_| {});
    set(&mut r, "signature", &|v| format!("{v}, {v}"));
    assert_eq!(check(&p, &fresh(), &r, NOW_MS), "signature_malformed");
}

#[test]
fn tampering_is_rejected() {
    let p = policy();
    let fresh = || MemoryStore::default();
    let base = signed(NOW_S, "n", br#"{"amount":10}"#, |_| {});

    let mut r = signed(NOW_S, "n", br#"{"amount":10}"#, |_| {});
    r.body = br#"{"amount":99}"#.to_vec();
    assert_eq!(check(&p, &fresh(), &r, NOW_MS), "content_digest_mismatch");

    let mut r = signed(NOW_S, "n", br#"{"amount":10}"#, |_| {});
    r.path = "/v1/transfers?dry=1";
    assert_eq!(check(&p, &fresh(), &r, NOW_MS), "signature_invalid");

    let mut r = signed(NOW_S, "n", br#"{"amount":10}"#, |_| {});
    r.path = "/v1/withdrawals?dry=0";
    assert_eq!(check(&p, &fresh(), &r, NOW_MS), "signature_invalid");

    let mut r = signed(NOW_S, "n", br#"{"amount":10}"#, |_| {});
    r.method = "PUT";
    assert_eq!(check(&p, &fresh(), &r, NOW_MS), "signature_invalid");

    let mut r = signed(NOW_S, "n", br#"{"amount":10}"#, |_| {});
    r.authority = "evil.example";
    assert_eq!(check(&p, &fresh(), &r, NOW_MS), "signature_invalid");

    // A forged digest matching the tampered body does not help: the MAC covers the digest.
    let mut r = signed(NOW_S, "n", br#"{"amount":10}"#, |_| {});
    r.body = br#"{"amount":99}"#.to_vec();
    for (n, v) in r.headers.iter_mut() {
        if n == "content-digest" {
            *v = digest::content_digest_sha256(br#"{"amount":99}"#);
        }
    }
    assert_eq!(check(&p, &fresh(), &r, NOW_MS), "signature_invalid");
    assert_eq!(check(&p, &fresh(), &base, NOW_MS), "ok");
}

#[test]
fn keys_and_time_are_enforced() {
    let p = policy();
    let fresh = || MemoryStore::default();
    let r = signed(NOW_S, "n", b"", |s| s.secret = b"another-secret-of-thirty-two-bytes!!");
    assert_eq!(check(&p, &fresh(), &r, NOW_MS), "signature_invalid");
    let r = signed(NOW_S, "n", b"", |s| s.key_id = "nobody");
    assert_eq!(check(&p, &fresh(), &r, NOW_MS), "signature_invalid", "an unknown key id is not told apart");
    let r = signed(NOW_S, "n", b"", |s| s.key_id = "retired");
    assert_eq!(check(&p, &fresh(), &r, NOW_MS), "key_not_active");
    let r = signed(NOW_S, "n", b"", |s| s.key_id = "bad key/../");
    assert_eq!(check(&p, &fresh(), &r, NOW_MS), "key_id_invalid");
    // Window edges: 300 s old passes, 301 s old is stale; 5 s ahead passes, 6 s is refused.
    assert_eq!(check(&p, &fresh(), &signed(NOW_S - 300, "n", b"", |_| {}), NOW_MS), "ok");
    assert_eq!(check(&p, &fresh(), &signed(NOW_S - 301, "n", b"", |_| {}), NOW_MS), "signature_stale");
    assert_eq!(check(&p, &fresh(), &signed(NOW_S + 5, "n", b"", |_| {}), NOW_MS), "ok");
    assert_eq!(check(&p, &fresh(), &signed(NOW_S + 6, "n", b"", |_| {}), NOW_MS), "signature_from_future");
    let r = signed(NOW_S - 10, "n", b"", |s| s.expires = Some(NOW_S));
    assert_eq!(check(&p, &fresh(), &r, NOW_MS), "signature_expired");
    let r = signed(NOW_S - 10, "n", b"", |s| s.expires = Some(NOW_S + 1));
    assert_eq!(check(&p, &fresh(), &r, NOW_MS), "ok");
    let r = signed(NOW_S, "n", b"", |s| s.expires = Some(NOW_S));
    assert_eq!(check(&p, &fresh(), &r, NOW_MS), "signature_param_invalid");
}

#[test]
fn the_policy_decides_coverage_not_the_client() {
    let p = policy();
    let fresh = || MemoryStore::default();
    let only = |c: &[&str]| Some(c.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    let r = signed(NOW_S, "n", b"", |s| s.components = only(&["@authority", "@path", "@query"]));
    assert_eq!(check(&p, &fresh(), &r, NOW_MS), "signature_coverage_insufficient");
    let r = signed(NOW_S, "n", b"", |s| s.components = only(&["@method", "@authority", "@path"]));
    assert_eq!(check(&p, &fresh(), &r, NOW_MS), "signature_coverage_insufficient", "query present, not covered");
    let r = signed(NOW_S, "n", br#"{"a":1}"#, |s| s.components = only(&["@method", "@authority", "@path", "@query"]));
    assert_eq!(check(&p, &fresh(), &r, NOW_MS), "signature_coverage_insufficient", "body without content-digest");
    let r = signed(NOW_S, "n", br#"{"a":1}"#, |s| s.components = only(&["@method", "@target-uri", "content-digest"]));
    assert_eq!(check(&p, &fresh(), &r, NOW_MS), "ok", "@target-uri covers authority, path and query");
    let r = signed(NOW_S, "n", b"", |s| s.components = only(&["@method", "@authority", "@path", "@query", "@method"]));
    assert_eq!(check(&p, &fresh(), &r, NOW_MS), "signature_malformed");
    // A present idempotency key must be covered.
    let mut r = signed(NOW_S, "n", b"", |_| {});
    r.headers.push(("idempotency-key".into(), "k1".into()));
    assert_eq!(check(&p, &fresh(), &r, NOW_MS), "signature_coverage_insufficient");
}

#[test]
fn malformed_input_is_refused_not_guessed() {
    let p = policy();
    let fresh = || MemoryStore::default();
    let good = signed(NOW_S, "n", br#"{"a":1}"#, |_| {});
    type Edit<'a> = &'a dyn Fn(&mut Vec<(String, String)>);
    let with = |f: Edit| {
        let mut r = signed(NOW_S, "n", br#"{"a":1}"#, |_| {});
        f(&mut r.headers);
        r
    };
    let set = |headers: &mut Vec<(String, String)>, name: &str, value: &str| {
        for (n, v) in headers.iter_mut() {
            if n == name {
                *v = value.to_string();
            }
        }
    };
    let sig = good.headers.iter().find(|(n, _)| n == "signature").unwrap().1.clone();
    let input = good.headers.iter().find(|(n, _)| n == "signature-input").unwrap().1.clone();
    let cases: Vec<(Req, &str)> = vec![
        (with(&|h| h.retain(|(n, _)| n != "signature")), "signature_missing"),
        (with(&|h| h.retain(|(n, _)| n != "signature-input")), "signature_missing"),
        (with(&|h| h.push(("signature".into(), sig.clone()))), "header_duplicated"),
        (with(&|h| h.push(("signature-input".into(), input.clone()))), "header_duplicated"),
        (with(&|h| h.push(("content-digest".into(), "sha-256=:AAAA:".into()))), "header_duplicated"),
        (with(&|h| h.push(("x-firebreak-principal".into(), "a".into()))), "ok"),
        (
            with(&|h| {
                h.push(("x-firebreak-principal".into(), "a".into()));
                h.push(("x-firebreak-principal".into(), "b".into()));
            }),
            "header_duplicated",
        ),
        (with(&|h| set(h, "signature", "sig1=notbytes")), "signature_malformed"),
        (with(&|h| set(h, "signature", "sig1=:!!!:")), "signature_malformed"),
        (with(&|h| set(h, "signature-input", "sig1=(\"@method\"")), "signature_malformed"),
        (with(&|h| set(h, "signature-input", &input.replace("sig1=", "other="))), "signature_malformed"),
        (with(&|h| set(h, "signature", &format!("{sig}, sig2=:AAAA:"))), "signature_malformed"),
        (
            with(&|h| set(h, "signature-input", &input.replace("\"hmac-sha256\"", "\"rsa-pss-sha512\""))),
            "signature_algorithm_unsupported",
        ),
        (with(&|h| set(h, "signature-input", &input.replace(";nonce=\"n\"", ""))), "signature_param_missing"),
        (with(&|h| set(h, "signature-input", &input.replace(";keyid=\"demo-client\"", ""))), "signature_param_missing"),
        (with(&|h| set(h, "signature-input", &input.replace("created=", "foo=1;created="))), "signature_malformed"),
        (with(&|h| set(h, "signature-input", &input.replace("\"@path\"", "\"@path\";req"))), "signature_component_unsupported"),
        (with(&|h| set(h, "signature-input", &input.replace("\"@path\"", "\"@status\""))), "signature_component_unsupported"),
        (with(&|h| set(h, "signature-input", &input.replace("\"@path\"", "@path"))), "signature_malformed"),
        (
            with(&|h| set(h, "signature-input", &input.replace("nonce=\"n\"", &format!("nonce=\"{}\"", "x".repeat(129))))),
            "signature_param_invalid",
        ),
        (with(&|h| set(h, "signature-input", &input.replace("created=", "created=-"))), "signature_param_invalid"),
        (with(&|h| set(h, "content-digest", "sha-256=:AAAA:")), "signature_invalid"),
        (with(&|h| h.retain(|(n, _)| n != "content-digest")), "signature_component_missing"),
    ];
    for (i, (req, code)) in cases.iter().enumerate() {
        assert_eq!(check(&p, &fresh(), req, NOW_MS), *code, "case {i}");
    }
}

#[test]
fn body_limits() {
    let p = policy();
    let r = signed(NOW_S, "n", &vec![b'a'; 1024], |_| {});
    assert_eq!(check(&p, &MemoryStore::default(), &r, NOW_MS), "ok");
    let r = signed(NOW_S, "n", &vec![b'a'; 1025], |_| {});
    assert_eq!(check(&p, &MemoryStore::default(), &r, NOW_MS), "body_too_large");
}

#[test]
fn nonces_are_remembered_for_the_whole_window_and_bounded() {
    let mut p = policy();
    p.nonce_table =
        crate::store::BucketTable::new("n", std::num::NonZeroU32::new(1).unwrap(), std::num::NonZeroU16::new(2).unwrap(), 0);
    let store = MemoryStore::default();
    assert_eq!(check(&p, &store, &signed(NOW_S, "a", b"", |_| {}), NOW_MS), "ok");
    assert_eq!(check(&p, &store, &signed(NOW_S, "b", b"", |_| {}), NOW_MS), "ok");
    // Full: fail closed rather than forget "a".
    assert_eq!(check(&p, &store, &signed(NOW_S, "c", b"", |_| {}), NOW_MS), "nonce_store_full");
    assert_eq!(check(&p, &store, &signed(NOW_S, "a", b"", |_| {}), NOW_MS + 299_000), "nonce_replayed");
    // Once the window has passed, the old signature is stale anyway and its slot is reused.
    assert_eq!(check(&p, &store, &signed(NOW_S, "a", b"", |_| {}), NOW_MS + 302_000), "signature_stale");
    assert_eq!(check(&p, &store, &signed(NOW_S + 302, "c", b"", |_| {}), NOW_MS + 302_000), "ok");
}

fn view(req: &Req) -> RequestView<'_> {
    RequestView { method: req.method, scheme: "http", authority: req.authority, path_and_query: req.path, headers: &req.headers }
}

#[test]
fn an_unknown_key_and_a_wrong_mac_look_the_same_to_the_client() {
    let p = policy();
    let wrong_secret = b"another-secret-of-thirty-two-bytes!!";
    let unknown = signed(NOW_S, "n", b"", |s| s.key_id = "nobody");
    let bad_mac = signed(NOW_S, "n", b"", |s| s.secret = wrong_secret);
    let unknown = verify_headers(&p, &view(&unknown), NOW_MS).unwrap_err();
    let bad_mac = verify_headers(&p, &view(&bad_mac), NOW_MS).unwrap_err();
    assert_eq!((&unknown, &bad_mac), (&SigError::UnknownKey, &SigError::InvalidSignature));
    let (u, b) = (unknown.rejection(), bad_mac.rejection());
    // Everything the client gets: status, body, headers.
    assert_eq!((u.status, u.body(), u.response_headers()), (b.status, b.body(), b.response_headers()));
    assert_eq!((u.status, u.code), (401, "signature_invalid"));
    // What the operator gets tells them apart.
    assert_ne!(u.log_line("request_signature", "ctx"), b.log_line("request_signature", "ctx"));
    assert!(u.log_line("request_signature", "ctx").contains("code=signature_invalid reason=unknown_key"));
    assert!(b.log_line("request_signature", "ctx").contains("code=signature_invalid reason=mac_mismatch"));
    assert_eq!(u.counter_names(), ["rejected.signature_invalid", "rejected.signature_invalid.unknown_key"]);
    assert_eq!(b.counter_names(), ["rejected.signature_invalid", "rejected.signature_invalid.mac_mismatch"]);

    // Nor does anything else tell a caller without the secret whether a key id exists: a retired
    // key with a wrong MAC is a wrong MAC (its validity period is told only to its holder), and
    // an unsupported `alg` is refused the same whatever the key id.
    let retired_forged = signed(NOW_S, "n", b"", |s| {
        s.key_id = "retired";
        s.secret = wrong_secret;
    });
    assert_eq!(verify_headers(&p, &view(&retired_forged), NOW_MS), Err(SigError::InvalidSignature));
    for key_id in ["demo-client", "nobody", "retired"] {
        let mut r = signed(NOW_S, "n", b"", |s| s.key_id = key_id);
        for (n, v) in r.headers.iter_mut() {
            if n == "signature-input" {
                *v = v.replace(r#"alg="hmac-sha256""#, r#"alg="rsa-v1_5-sha256""#);
            }
        }
        assert_eq!(verify_headers(&p, &view(&r), NOW_MS), Err(SigError::UnsupportedAlgorithm), "{key_id}");
    }
}

/// With Redis, replicas share the nonces but not a clock. A signature claimed on a replica whose
/// clock runs ahead by the allowed skew must still be recorded for as long as a replica whose
/// clock is right would accept it.
#[test]
fn the_redis_nonce_lifetime_covers_the_clock_skew_between_replicas() {
    let json = format!(
        r#"{{"routes":[{{"path_prefix":"/"}}],"max_age_seconds":300,"future_skew_seconds":5,"max_replica_clock_skew_seconds":30,
            "keys":[{{"id":"demo-client","secret_base64":"{SECRET_B64}"}}],
            "state":{{"backend":"redis","cluster":"redis_bridge"}}}}"#
    );
    let p = SignaturePolicy::from_json(json.as_bytes(), &|_| None).unwrap();
    let crate::remote::Backend::Redis(redis) = &p.state else { panic!() };
    let skew_ms = 30_000;
    // Real time t: the fast replica reads t + skew, the slow one reads t.
    let t_claim = NOW_MS;
    // The earliest the fast replica accepts: `created` as far in the future as it tolerates.
    let created = (t_claim + skew_ms) / 1000 + 5;
    let req = signed(created, "n-skew", b"", |_| {});
    let verified = verify_headers(&p, &view(&req), t_claim + skew_ms).unwrap();
    assert!(verify_headers(&p, &view(&req), t_claim + skew_ms - 1000).is_err(), "the earliest acceptance");
    // The nonce's TTL in the command the fast replica sends (its argument after the two keys).
    let command = String::from_utf8(nonce_claim_command(&p, redis, &verified, nonce_ttl_ms(&p)).unwrap()).unwrap();
    let ttl_ms: u64 = command.split('/').nth(5).unwrap().parse().unwrap();
    assert_eq!(ttl_ms, (300 + 5 + 30 + 1) * 1000);
    // Redis forgets the nonce at t_claim + ttl_ms (its own clock runs at the same rate). The
    // slow replica accepts the signature up to some last millisecond; the nonce outlives it.
    let last_accepted = (t_claim..t_claim + 2 * ttl_ms)
        .step_by(100)
        .filter(|&t| verify_headers(&p, &view(&req), t).is_ok())
        .last()
        .unwrap();
    assert!(last_accepted + 100 > (created + 300) * 1000, "searched up to the end of the window");
    assert!(
        last_accepted < t_claim + ttl_ms,
        "the slow replica accepts at {last_accepted}, the nonce expired at {}",
        t_claim + ttl_ms
    );
    // Not dependent on the claiming replica's clock: the same TTL whenever it claims.
    assert_eq!(nonce_ttl_ms(&p), ttl_ms);
    // The default tolerates 30 s between replicas; more than 300 s is refused.
    let default = policy();
    assert_eq!(default.max_replica_clock_skew_seconds, 30);
}

#[test]
fn every_client_spelling_of_the_principal_header_is_removed_or_refused() {
    let p = policy();
    let none: Vec<&str> = Vec::new();
    // Unprotected route: every spelling is removed (each distinct name once), nothing refused.
    let headers = h(&[
        ("x_firebreak_principal", "victim"),
        ("x-firebreak-principal", "admin"),
        ("X_Firebreak-Principal", "victim"),
        ("x_firebreak_principal", "again"),
        ("x-firebreak-principals", "not a spelling"),
    ]);
    assert_eq!(
        client_principal_copies(&p, &headers, false),
        Ok(vec!["x_firebreak_principal", "X_Firebreak-Principal", "x-firebreak-principal"])
    );
    assert_eq!(client_principal_copies(&p, &h(&[("content-type", "a")]), false), Ok(none.clone()));
    // Protected route: another spelling is an attempt to assert an identity.
    for variant in ["x_firebreak_principal", "X_Firebreak-Principal", "x-firebreak_principal", "X-FIREBREAK-PRINCIPAL"] {
        let headers = h(&[(variant, "victim")]);
        let (error, name) = client_principal_copies(&p, &headers, true).unwrap_err();
        assert_eq!((error.rejection().status, error.rejection().code, name), (400, "principal_header_spoofed", variant));
    }
    let twice = h(&[("x-firebreak-principal", "a"), ("x-firebreak-principal", "b")]);
    assert_eq!(client_principal_copies(&p, &twice, true).unwrap_err().0.rejection().code, "header_duplicated");
    // One copy under the exact name is removed (the filter sets its own once the MAC verified).
    let once = h(&[("x-firebreak-principal", "a")]);
    assert_eq!(client_principal_copies(&p, &once, true), Ok(vec!["x-firebreak-principal"]));
    assert_eq!(client_principal_copies(&p, &h(&[]), true), Ok(none));
}

/// A key id flooding fresh nonces gets its own code at its quota, other key ids are unaffected,
/// a replay is still a replay, and a refused request recorded no nonce (the same nonce is
/// accepted once, after the key id's window rolled).
#[test]
fn a_key_id_at_its_nonce_quota_is_refused_alone_and_consumes_no_nonce() {
    let json = format!(
        r#"{{"routes":[{{"methods":["POST"],"path_prefix":"/v1/"}}],"max_age_seconds":300,"future_skew_seconds":5,
            "nonce_store":{{"buckets":16,"slots_per_bucket":4,"quota_per_key_id":3}},
            "keys":[{{"id":"demo-client","secret_base64":"{SECRET_B64}"}},{{"id":"other","secret_base64":"{SECRET_B64}"}}]}}"#
    );
    let p = SignaturePolicy::from_json(json.as_bytes(), &|_| None).unwrap();
    assert_eq!(p.nonce_quota.window_ms.get(), 306_000, "max_age + skew + 1 s");
    let store = MemoryStore::default();
    for i in 0..3 {
        assert_eq!(check(&p, &store, &signed(NOW_S, &format!("n{i}"), b"", |_| {}), NOW_MS), "ok");
    }
    assert_eq!(check(&p, &store, &signed(NOW_S, "n0", b"", |_| {}), NOW_MS), "nonce_replayed", "a replay is a replay");
    assert_eq!(check(&p, &store, &signed(NOW_S, "x", b"", |_| {}), NOW_MS), "tenant_quota_exceeded");
    assert_eq!(SigError::TenantQuotaExceeded.rejection().status, 429);
    assert_eq!(check(&p, &store, &signed(NOW_S, "x", b"", |r| r.key_id = "other"), NOW_MS), "ok", "another key id");
    assert_eq!(p.nonce_table.live_records(&store, NOW_MS), Ok(4));
    // The window of demo-client rolls at NOW + 306 s: the refused nonce was never recorded.
    let later = NOW_MS + 306_000;
    assert_eq!(check(&p, &store, &signed(NOW_S + 306, "x", b"", |_| {}), later), "ok");
    assert_eq!(check(&p, &store, &signed(NOW_S + 306, "x", b"", |_| {}), later), "nonce_replayed");
    // Quota bounds: refused at configure time beyond half the capacity.
    let bad = json.replace(r#""quota_per_key_id":3"#, r#""quota_per_key_id":33"#);
    assert_eq!(SignaturePolicy::from_json(bad.as_bytes(), &|_| None).unwrap_err().field, "nonce_store.quota_per_key_id");
    assert_eq!(policy().nonce_quota.limit.get(), 8192 * 16 / 8, "default: capacity / 8");
    // Leases: 1 for a small quota, 16 at most by default, at most a sixteenth of the quota.
    assert_eq!(SignaturePolicy::from_json(json.as_bytes(), &|_| None).unwrap().nonce_quota.lease.get(), 1);
    assert_eq!(policy().nonce_quota.lease.get(), 16, "16384 / 256, capped at 16");
    let too_large = json.replace(r#""quota_per_key_id":3"#, r#""quota_per_key_id":3,"quota_lease":2"#);
    assert_eq!(SignaturePolicy::from_json(too_large.as_bytes(), &|_| None).unwrap_err().field, "nonce_store.quota_lease");
    let zero = json.replace(r#""quota_per_key_id":3"#, r#""quota_per_key_id":3,"quota_lease":0"#);
    assert_eq!(SignaturePolicy::from_json(zero.as_bytes(), &|_| None).unwrap_err().field, "nonce_store.quota_lease");
    let one = json.replace(r#""quota_per_key_id":3"#, r#""quota_per_key_id":3,"quota_lease":1"#);
    assert_eq!(SignaturePolicy::from_json(one.as_bytes(), &|_| None).unwrap().nonce_quota.lease.get(), 1);
}

/// A reload whose nonce table geometry differs is refused, naming the field; the same geometry
/// adopts the stored secret, and a recorded nonce is still refused.
#[test]
fn a_nonce_table_geometry_change_is_refused_on_reload() {
    let config = |buckets: u32, slots: u16| {
        format!(
            r#"{{"routes":[{{"path_prefix":"/v1/"}}],"max_age_seconds":300,"nonce_store":{{"buckets":{buckets},"slots_per_bucket":{slots}}},
                "keys":[{{"id":"demo-client","secret_base64":"{SECRET_B64}"}}]}}"#
        )
    };
    let store = MemoryStore::default();
    let mut a = SignaturePolicy::from_json(config(64, 4).as_bytes(), &|_| None).unwrap();
    a.bind_tables(&store, [7; 32]).unwrap();
    let req = signed(NOW_S, "once", b"", |_| {});
    assert_eq!(check(&a, &store, &req, NOW_MS), "ok");
    for (json, field) in [(config(128, 4), "nonce_store.buckets"), (config(64, 8), "nonce_store.slots_per_bucket")] {
        let mut b = SignaturePolicy::from_json(json.as_bytes(), &|_| None).unwrap();
        let err = b.bind_tables(&store, [8; 32]).unwrap_err();
        assert_eq!(err.field, field, "{err}");
    }
    let mut same = SignaturePolicy::from_json(config(64, 4).as_bytes(), &|_| None).unwrap();
    same.bind_tables(&store, [9; 32]).unwrap();
    assert_eq!(check(&same, &store, &req, NOW_MS + 1000), "nonce_replayed");
}

/// On Redis the nonce and the key id's quota are one script: its command and its answers.
#[test]
fn the_redis_nonce_claim_counts_the_key_ids_quota_in_the_same_script() {
    let json = format!(
        r#"{{"routes":[{{"path_prefix":"/"}}],"max_age_seconds":300,"nonce_store":{{"buckets":16,"slots_per_bucket":4,"quota_per_key_id":7}},
            "keys":[{{"id":"demo-client","secret_base64":"{SECRET_B64}"}}],"state":{{"backend":"redis","cluster":"bridge","key_prefix":"t"}}}}"#
    );
    let p = SignaturePolicy::from_json(json.as_bytes(), &|_| None).unwrap();
    let crate::remote::Backend::Redis(redis) = &p.state else { panic!() };
    let req = signed(NOW_S, "n-r", b"", |_| {});
    let view = RequestView {
        method: req.method,
        scheme: "http",
        authority: req.authority,
        path_and_query: req.path,
        headers: &req.headers,
    };
    let v = verify_headers(&p, &view, NOW_MS).unwrap();
    let command = String::from_utf8(nonce_claim_command(&p, redis, &v, 301_000).unwrap()).unwrap();
    let nonce = redis.key("sig:nonce", nonce_key(&p, &v).unwrap());
    let quota = redis.key("sig:quota", crate::quota::tenant(&p.key_hasher(), "key_id", "demo-client"));
    // Redis key names are SHA-256 as in earlier versions (the same on every replica, and across
    // an upgrade): not the keyed hash of the local tables.
    assert_eq!(p.key_hasher(), crate::store::KeyHasher::Sha256);
    assert_eq!(nonce_key(&p, &v), Some(crate::store::KeyHash::of(&[b"nonce", b"demo-client", b"n-r"])));
    assert!(command.starts_with("EVALSHA/6768f79a1859f136ac4a1957749f4d95415a2c39/"), "{command}");
    assert!(command.ends_with(&format!("/2/{nonce}/{quota}/301000/7/306000")), "{command}");
    assert_eq!(nonce_claim_answer(Some(200), br#"{"EVAL":1}"#), Ok(Ok(())));
    assert_eq!(nonce_claim_answer(Some(200), br#"{"EVAL":0}"#), Ok(Err(SigError::NonceReplayed)));
    assert_eq!(nonce_claim_answer(Some(200), br#"{"EVAL":2}"#), Ok(Err(SigError::TenantQuotaExceeded)));
    assert!(nonce_claim_answer(Some(200), br#"{"EVAL":3}"#).is_err());
    assert!(nonce_claim_answer(None, b"").is_err());
}
