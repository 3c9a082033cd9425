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

/// Envoy's real clock may move on during a file while the host's fake one stands still: a
/// countdown (Retry-After, RateLimit's `t=`, `retry in N s`) may be lower in Envoy by the seconds
/// it moved, never higher, and nothing else may differ.
#[test]
fn countdowns_may_lag_by_the_seconds_envoy_s_clock_moved() {
    let refusal = |retry: &str, t: &str, remain: &str| {
        let mut o = host();
        o.status = 429;
        o.forwarded = false;
        o.response_headers =
            pairs(&[(":status", "429"), ("retry-after", retry), ("ratelimit", &format!("\"per-account.CNY\";r={remain};t={t}"))]);
        o.response_body =
            format!("{{\"error\":\"amount_limited\",\"message\":\"{remain} minor units remain; retry in {retry} s\"}}")
                .into_bytes();
        o
    };
    let h = refusal("21600", "86400", "0");
    let mut late = refusal("21599", "86399", "0");
    assert_eq!(h.disagreements(&late, false).len(), 3, "no second moved: every countdown differs");
    late.clock_moved_s = 1;
    assert_eq!(h.disagreements(&late, false), Vec::<String>::new());
    let mut ahead = refusal("21601", "86401", "0");
    ahead.clock_moved_s = 5;
    assert_eq!(h.disagreements(&ahead, false).len(), 3, "a countdown never runs up");
    let mut too_late = refusal("21597", "86397", "0");
    too_late.clock_moved_s = 2;
    assert_eq!(h.disagreements(&too_late, false).len(), 3, "nor down by more than the clock moved");
    // A number that is not a countdown (RateLimit's r=, the units remaining) is compared
    // exactly, even when it went down by no more than the clock moved.
    let h1 = refusal("21600", "86400", "1");
    let mut other_number = refusal("21599", "86399", "0");
    other_number.clock_moved_s = 1;
    assert_eq!(h1.disagreements(&other_number, false).len(), 2, "r= and the body's remaining units");
}

/// Numbers are compared as text, except a countdown within the clock's slack; a countdown is
/// only where the header's syntax puts one.
#[test]
fn only_countdowns_are_compared_as_numbers() {
    use firebreak_host_tests::scenario::{countdowns_agree, Countdowns};
    let after = Countdowns::After(&[";t=", "retry in "]);
    assert!(!countdowns_agree("id=007", "id=7", 0, after), "a number is compared as text");
    assert!(!countdowns_agree("amount=500", "amount=499", 1, after), "`t=` ending a word is no countdown");
    assert!(!countdowns_agree("limit=20", "limit=19", 1, after));
    assert!(countdowns_agree("\"r\";r=0;t=60", "\"r\";r=0;t=59", 1, after));
    assert!(!countdowns_agree("\"r\";r=0;t=60", "\"r\";r=0;t=059", 1, after), "a countdown's text is a number");
    assert!(!countdowns_agree("5", "4", 1, after), "a whole number is a countdown only where the header says so");
    assert!(countdowns_agree("5", "4", 1, Countdowns::Whole));
    assert!(!countdowns_agree("5", "4", 0, Countdowns::Whole));
}

/// A forwarded (or replayed) body is compared byte for byte, whatever moved.
#[test]
fn a_forwarded_body_is_never_a_countdown() {
    let mut h = host();
    h.response_body = b"retry in 10 s".to_vec();
    let mut e = envoy();
    e.response_body = b"retry in 9 s".to_vec();
    e.clock_moved_s = 5;
    assert_eq!(h.disagreements(&e, false).len(), 1);
}
