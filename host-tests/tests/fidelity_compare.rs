//! `--mode both` compares everything the host and Envoy both observe, except the documented
//! headers Envoy adds on its own (`scenario::UPSTREAM_HEADERS_NOT_COMPARED`, ...).

use firebreak_host_tests::scenario::{Observed, RESPONSE_HEADERS_NOT_COMPARED, UPSTREAM_HEADERS_NOT_COMPARED};

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn host() -> Observed {
    Observed {
        status: 200,
        forwarded: true,
        upstream_headers: pairs(&[
            (":method", "GET"),
            (":scheme", "http"),
            ("x-request-id", "a"),
            ("x-dup", "1"),
            ("x-dup", "2"),
        ]),
        upstream_body: Some(b"up".to_vec()),
        response_headers: pairs(&[(":status", "200"), ("content-length", "2")]),
        response_body: b"ok".to_vec(),
        ..Observed::default()
    }
}

/// What Envoy adds on its own is not a disagreement.
fn envoy() -> Observed {
    Observed {
        upstream_headers: pairs(&[
            (":method", "GET"),
            ("x-dup", "1"),
            ("x-dup", "2"),
            ("x-request-id", "b"),
            ("x-envoy-expected-rq-timeout-ms", "5000"),
        ]),
        response_headers: pairs(&[
            (":status", "200"),
            ("content-length", "2"),
            ("date", "Sun, 06 Dec 2026 06:00:00 GMT"),
            ("server", "envoy"),
            ("x-envoy-upstream-service-time", "1"),
            ("connection", "close"),
        ]),
        ..host()
    }
}

#[test]
fn envoy_s_own_headers_are_not_disagreements() {
    assert_eq!(host().disagreements(&envoy(), false), Vec::<String>::new());
    for name in ["x-request-id", ":scheme", "x-envoy-expected-rq-timeout-ms"] {
        assert!(UPSTREAM_HEADERS_NOT_COMPARED.iter().any(|(n, _)| *n == name), "{name}");
    }
    for name in ["date", "server", "x-envoy-upstream-service-time", "connection"] {
        assert!(RESPONSE_HEADERS_NOT_COMPARED.iter().any(|(n, _)| *n == name), "{name}");
    }
}

/// Headers and bodies no expectation names are compared too, every value of a repeated header.
#[test]
fn every_field_is_compared() {
    let mut e = envoy();
    e.upstream_headers.push(("x-added".into(), "1".into()));
    e.upstream_headers.retain(|(k, v)| !(k == "x-dup" && v == "2"));
    e.upstream_body = Some(b"changed".to_vec());
    e.response_headers.push(("x-other".into(), "1".into()));
    e.response_body = b"no".to_vec();
    let d = host().disagreements(&e, false);
    assert_eq!(
        d,
        vec![
            r#"upstream header x-added host=[] envoy=["1"]"#.to_string(),
            r#"upstream header x-dup host=["1", "2"] envoy=["1"]"#.to_string(),
            r#"upstream body host=Some("up") envoy=Some("changed")"#.to_string(),
            r#"response header x-other host=[] envoy=["1"]"#.to_string(),
            r#"response body host="ok" envoy="no""#.to_string(),
        ]
    );
}

/// The signature headers differ only when the runner signed the request (each runtime's clock).
#[test]
fn signature_headers_are_compared_unless_the_runner_signed() {
    let mut e = envoy();
    e.upstream_headers.push(("signature".into(), "sig1=:b:".into()));
    let mut h = host();
    h.upstream_headers.push(("signature".into(), "sig1=:a:".into()));
    assert_eq!(h.disagreements(&e, false).len(), 1);
    assert!(h.disagreements(&e, true).is_empty());
}

/// A stream reset in both has no response to compare.
#[test]
fn a_reset_in_both_compares_no_response() {
    let mut h = host();
    h.status = 0;
    h.response_headers = pairs(&[(":status", "200")]);
    let mut e = envoy();
    e.status = 0;
    e.response_headers.clear();
    e.response_body.clear();
    assert!(h.disagreements(&e, false).is_empty());
}
