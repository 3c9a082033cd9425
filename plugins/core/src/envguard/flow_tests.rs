//! env-guard's flow driven through the in-memory host: replies, counters, log lines, what is
//! held and what is read. (The scenario files run the same flow natively too:
//! `host-tests/tests/env_guard_native.rs`.)

use crate::flow::memory::{drive, step, Faults, MemoryEnv, MemoryRequest, MemoryUpstream, Outcome, Reads};
use crate::flow::{Event, Level, Step};

use super::flow::{configured, GuardFlow};
use super::*;

const PROD: &str = "fake-apns-prod-key-0123456789abcdef";

fn policy(production: bool, extra: &str) -> std::sync::Arc<GuardPolicy> {
    let json = format!(
        r#"{{"environment":"uat","production":{production},
            "protected_credentials":[{{"label":"apns-prod","sha256":"{}","length":{}}}],
            "production_hosts":["api.push.apple.com"],"routes":[{{"path_prefix":"/v1/"}}],
            "max_body_bytes":64{extra}}}"#,
        fingerprint(PROD.as_bytes()),
        PROD.len()
    );
    std::sync::Arc::new(GuardPolicy::from_json(json.as_bytes()).unwrap())
}

fn headers(method: &str, path: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut h = vec![
        (":method".to_string(), method.to_string()),
        (":path".to_string(), path.to_string()),
        (":authority".to_string(), "uat-api.example.com".to_string()),
    ];
    h.extend(extra.iter().map(|(n, v)| (n.to_string(), v.to_string())));
    h
}

fn run(policy: &std::sync::Arc<GuardPolicy>, request: MemoryRequest) -> Outcome {
    drive(&mut GuardFlow::new(policy.clone()), &request)
}

fn chunked(headers: Vec<(String, String)>, chunks: &[&str], trailers: Option<&[(&str, &str)]>) -> MemoryRequest {
    MemoryRequest {
        headers,
        chunks: chunks.iter().map(|c| c.as_bytes().to_vec()).collect(),
        trailers: trailers.map(|t| t.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()),
        ..MemoryRequest::default()
    }
}

/// One row: a request, the code it gets (`None`: forwarded), and every counter it moves.
struct Row {
    name: &'static str,
    production: bool,
    extra: &'static str,
    request: MemoryRequest,
    code: Option<&'static str>,
    counters: &'static [&'static str],
}

#[test]
fn table_of_requests_replies_and_counters() {
    let key_json = format!(r#"{{"key":"{PROD}"}}"#);
    let big = "x".repeat(65);
    let rows = vec![
        Row {
            name: "production environment: everything passes, nothing read",
            production: true,
            extra: "",
            request: MemoryRequest::new(headers("POST", "/v1/push", &[("x-key", PROD)]), key_json.as_bytes()),
            code: None,
            counters: &["passed_production"],
        },
        Row {
            name: "outside the routes",
            production: false,
            extra: "",
            request: MemoryRequest::new(headers("POST", "/other", &[("x-key", PROD)]), key_json.as_bytes()),
            code: None,
            counters: &["passed_unguarded"],
        },
        Row {
            name: "a path that is not canonical",
            production: false,
            extra: "",
            request: MemoryRequest::new(headers("GET", "/v1/../v1/push", &[]), b""),
            code: Some("path_not_canonical"),
            counters: &["rejected.path_not_canonical"],
        },
        Row {
            name: "the key in a header",
            production: false,
            extra: "",
            request: MemoryRequest::new(headers("GET", "/v1/push", &[("x-key", PROD)]), b""),
            code: Some("production_credential_in_non_production"),
            counters: &["detected.apns-prod.header", "rejected.production_credential_in_non_production"],
        },
        Row {
            name: "the key in the body",
            production: false,
            extra: "",
            request: MemoryRequest::new(
                headers("POST", "/v1/push", &[("content-type", "application/json")]),
                key_json.as_bytes(),
            ),
            code: Some("production_credential_in_non_production"),
            counters: &["detected.apns-prod.body", "rejected.production_credential_in_non_production"],
        },
        Row {
            name: "the key split over two chunks",
            production: false,
            extra: "",
            request: chunked(headers("POST", "/v1/push", &[]), &[&PROD[..10], &PROD[10..]], None),
            code: Some("production_credential_in_non_production"),
            counters: &["detected.apns-prod.body", "rejected.production_credential_in_non_production"],
        },
        Row {
            name: "the key in a trailer",
            production: false,
            extra: "",
            request: chunked(headers("POST", "/v1/push", &[]), &["{}"], Some(&[("x-key", PROD)])),
            code: Some("production_credential_in_non_production"),
            counters: &["detected.apns-prod.header", "rejected.production_credential_in_non_production"],
        },
        Row {
            name: "a production host",
            production: false,
            extra: "",
            request: MemoryRequest::new(
                vec![
                    (":method".into(), "GET".into()),
                    (":path".into(), "/v1/push".into()),
                    (":authority".into(), "api.push.apple.com".into()),
                ],
                b"",
            ),
            code: Some("production_host_in_non_production"),
            counters: &["detected.production_host.host", "rejected.production_host_in_non_production"],
        },
        Row {
            name: "a clean body",
            production: false,
            extra: "",
            request: MemoryRequest::new(headers("POST", "/v1/push", &[]), b"{\"alert\":\"hi\"}"),
            code: None,
            counters: &["passed"],
        },
        Row {
            name: "no body",
            production: false,
            extra: "",
            request: MemoryRequest::new(headers("GET", "/v1/push", &[]), b""),
            code: None,
            counters: &["passed"],
        },
        Row {
            name: "content-length over max_body_bytes, over_limit block",
            production: false,
            extra: "",
            request: MemoryRequest::new(headers("POST", "/v1/push", &[("content-length", "65")]), big.as_bytes()),
            code: Some("body_too_large_to_inspect"),
            counters: &["rejected.body_too_large_to_inspect"],
        },
        Row {
            name: "content-length over max_body_bytes, over_limit pass",
            production: false,
            extra: r#","over_limit":"pass""#,
            request: MemoryRequest::new(headers("POST", "/v1/push", &[("content-length", "65")]), big.as_bytes()),
            code: None,
            counters: &["passed_uninspected_over_limit"],
        },
        Row {
            name: "a body over max_body_bytes without content-length, over_limit block",
            production: false,
            extra: "",
            request: chunked(headers("POST", "/v1/push", &[]), &[&big[..40], &big[40..]], None),
            code: Some("body_too_large_to_inspect"),
            counters: &["rejected.body_too_large_to_inspect"],
        },
        Row {
            name: "a content-length that is not a number",
            production: false,
            extra: "",
            request: MemoryRequest::new(headers("POST", "/v1/push", &[("content-length", "ten")]), b"{}"),
            code: Some("request_not_inspectable"),
            counters: &["rejected.request_not_inspectable"],
        },
    ];
    for row in rows {
        let outcome = run(&policy(row.production, row.extra), row.request);
        let code = outcome.reply.as_ref().map(|r| r.code);
        assert_eq!(code, row.code, "{}", row.name);
        let mut counters: Vec<&str> = outcome.counters.keys().filter_map(|k| k.strip_prefix("firebreak.env_guard.")).collect();
        counters.sort_unstable();
        let mut want = row.counters.to_vec();
        want.sort_unstable();
        assert_eq!(counters, want, "{}", row.name);
        assert!(outcome.counters.values().all(|n| *n == 1), "{}: {:?}", row.name, outcome.counters);
        if row.code.is_none() {
            assert!(outcome.passed(), "{}", row.name);
        } else {
            assert!(outcome.forwarded_body.is_empty(), "{}: nothing reaches the upstream", row.name);
        }
    }
}

#[test]
fn the_body_is_held_until_its_end_then_forwarded_whole() {
    let policy = policy(false, "");
    let outcome = run(&policy, chunked(headers("POST", "/v1/push", &[]), &["{\"a\":", "\"b\"", "}"], None));
    assert!(outcome.passed());
    assert_eq!(outcome.forwarded_body, b"{\"a\":\"b\"}");
    // The body is read once, at its end; the headers once.
    assert_eq!(outcome.reads, Reads { headers: 1, body: 1, trailers: 0 });

    // Step by step: the headers continue (a paused header callback would stop the body), the
    // chunks before the last are held.
    let mut flow = GuardFlow::new(policy.clone());
    let request = chunked(headers("POST", "/v1/push", &[]), &[], None);
    let mut env = MemoryEnv::default();
    let upstream = MemoryUpstream::default();
    let mut event = |event| step(&mut flow, event, &mut env, &request, &upstream).0;
    assert_eq!(event(Event::RequestHeaders { end_of_stream: false }), Step::Continue);
    assert_eq!(event(Event::RequestBody { buffered: 3, end_of_stream: false }), Step::Hold);
    assert_eq!(event(Event::RequestBody { buffered: 6, end_of_stream: false }), Step::Hold);
}

#[test]
fn production_and_unguarded_requests_read_nothing_more() {
    let production = run(&policy(true, ""), MemoryRequest::new(headers("POST", "/v1/push", &[]), b"{}"));
    assert_eq!(production.reads, Reads::default());
    let unguarded = run(&policy(false, ""), MemoryRequest::new(headers("POST", "/other", &[]), b"{}"));
    assert_eq!(unguarded.reads, Reads { headers: 1, body: 0, trailers: 0 });
    let over = run(
        &policy(false, r#","over_limit":"pass""#),
        MemoryRequest::new(headers("POST", "/v1/push", &[("content-length", "100")]), &[b'x'; 100]),
    );
    assert_eq!(over.reads, Reads { headers: 1, body: 0, trailers: 0 });
}

#[test]
fn log_lines_name_the_finding_never_the_value() {
    let outcome = run(&policy(false, ""), MemoryRequest::new(headers("GET", &format!("/v1/{PROD}"), &[]), b""));
    assert!(outcome.reply.is_some());
    assert_eq!(outcome.logs.len(), 1);
    let (level, line) = &outcome.logs[0];
    assert_eq!(*level, Level::Error);
    // A path carrying the credential is never logged.
    assert!(line.contains(" environment=uat method=GET label=apns-prod where=path location=\"path\" msg="), "{line}");
    assert!(line.starts_with("firebreak env_guard reject status=403 code=production_credential_in_non_production"), "{line}");
    assert!(!line.contains(PROD), "{line}");

    let outcome = run(
        &policy(false, r#","over_limit":"pass""#),
        MemoryRequest::new(headers("POST", "/v1/push", &[("content-length", "100")]), &[b'x'; 100]),
    );
    assert_eq!(
        outcome.logs,
        vec![(Level::Warn, "firebreak env_guard pass_uninspected reason=over_limit environment=uat".to_string())]
    );
}

#[test]
fn unreadable_headers_body_and_trailers_are_refused() {
    let broken = Faults { request_headers: true, request_body: true, request_trailers: true, ..Faults::default() };
    let upstream = MemoryUpstream::default();
    for (what, event, message) in [
        ("headers", Event::RequestHeaders { end_of_stream: true }, "request headers (not UTF-8) cannot be inspected"),
        ("body", Event::RequestBody { buffered: 2, end_of_stream: true }, "request body cannot be inspected"),
        ("trailers", Event::RequestTrailers, "request trailers cannot be inspected"),
    ] {
        let mut flow = GuardFlow::new(policy(false, ""));
        let request = MemoryRequest::new(headers("POST", "/v1/push", &[]), b"");
        if what != "headers" {
            let (first, _) =
                step(&mut flow, Event::RequestHeaders { end_of_stream: false }, &mut MemoryEnv::default(), &request, &upstream);
            assert_eq!(first, Step::Continue);
        }
        let mut env = MemoryEnv { faults: broken, ..MemoryEnv::default() };
        let (answer, outcome) = step(&mut flow, event, &mut env, &request, &upstream);
        let Step::Reply(rejection) = answer else { panic!("{what}: {answer:?}") };
        assert_eq!(rejection.code, "request_not_inspectable", "{what}");
        assert_eq!(rejection.message, message, "{what}");
        assert_eq!(outcome.logs.len(), 1, "{what}");
        assert_eq!(outcome.logs[0].0, Level::Warn, "{what}");
        assert_eq!(
            outcome.counters.keys().collect::<Vec<_>>(),
            ["firebreak.env_guard.rejected.request_not_inspectable"],
            "{what}"
        );
        // After a reply the flow lets whatever still comes through untouched.
        assert_eq!(step(&mut flow, Event::RequestTrailers, &mut env, &request, &upstream).0, Step::Continue, "{what}");
    }
}

#[test]
fn configuration_log_lines() {
    assert_eq!(
        configured(&policy(false, "")),
        vec![(Level::Info, "firebreak env_guard environment=uat production=false mode=blocking".to_string())]
    );
    assert_eq!(configured(&policy(true, ""))[0].1, "firebreak env_guard environment=uat production=true mode=pass-through");
    let without_length = GuardPolicy::from_json(
        format!(
            r#"{{"environment":"uat","production":false,"protected_credentials":[{{"label":"a","sha256":"{}"}}]}}"#,
            fingerprint(PROD.as_bytes())
        )
        .as_bytes(),
    )
    .unwrap();
    let lines = configured(&without_length);
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1].0, Level::Warn);
}

/// The same requests: refused in enforce mode; in report-only mode counted
/// (`would_reject.<code>`, and the detection as always), logged once, and forwarded unmodified;
/// refused again once the configuration says `enforce`.
#[test]
fn report_only_counts_logs_and_forwards_what_enforce_refuses() {
    let key_json = format!(r#"{{"key":"{PROD}"}}"#);
    let requests = || {
        vec![
            ("body", MemoryRequest::new(headers("POST", "/v1/push", &[]), key_json.as_bytes()), "detected.apns-prod.body"),
            ("header", MemoryRequest::new(headers("POST", "/v1/push", &[("x-key", PROD)]), b"{}"), "detected.apns-prod.header"),
            (
                "chunked body",
                chunked(headers("POST", "/v1/push", &[]), &["{\"key\":\"", PROD, "\"}"], None),
                "detected.apns-prod.body",
            ),
        ]
    };
    let code = "production_credential_in_non_production";
    for (what, request, detected) in requests() {
        let refused = run(&policy(false, r#","mode":"enforce""#), request.clone());
        assert_eq!(refused.reply.as_ref().map(|r| r.code), Some(code), "{what}");

        let reported = run(&policy(false, r#","mode":"report_only""#), request.clone());
        assert!(reported.passed(), "{what}");
        assert_eq!(reported.upstream_headers, request.headers, "{what}: the headers go on unmodified");
        assert_eq!(reported.forwarded_body, request.chunks.concat(), "{what}: the body goes on unmodified");
        let counters: Vec<&str> = reported.counters.keys().filter_map(|k| k.strip_prefix("firebreak.env_guard.")).collect();
        assert_eq!(counters, [detected, &format!("would_reject.{code}")], "{what}");
        assert_eq!(reported.logs.len(), 1, "{what}");
        let (level, line) = &reported.logs[0];
        assert_eq!(*level, Level::Error, "{what}");
        assert!(line.starts_with(&format!("firebreak env_guard would_reject status=403 code={code} environment=uat")), "{line}");
        assert!(!line.contains(PROD), "{line}");

        // Switching back is a configuration change: the same request is refused.
        let refused = run(&policy(false, ""), request);
        assert_eq!(refused.reply.as_ref().map(|r| r.code), Some(code), "{what}");
    }
    // Every refusal of the table, not only credentials: a path that is not canonical.
    let odd = run(&policy(false, r#","mode":"report_only""#), MemoryRequest::new(headers("GET", "/v1/../v1/x", &[]), b""));
    assert!(odd.passed());
    assert_eq!(odd.counter("firebreak.env_guard.would_reject.path_not_canonical"), 1);
}

#[test]
fn report_only_mode_is_configured_declared_and_logged() {
    let policy = policy(false, r#","mode":"report_only""#);
    assert_eq!(policy.mode, crate::Mode::ReportOnly);
    assert_eq!(configured(&policy)[0].1, "firebreak env_guard environment=uat production=false mode=report_only");
    let factory = super::flow::GuardFactory { policy: policy.clone() };
    assert!(crate::flow::FlowFactory::counters(&factory)
        .contains(&"would_reject.production_credential_in_non_production".to_string()));
    let enforce = super::flow::GuardFactory { policy: self::policy(false, "") };
    assert!(!crate::flow::FlowFactory::counters(&enforce).iter().any(|c| c.starts_with("would_reject.")));
    let json = format!(
        r#"{{"environment":"uat","production":false,"mode":"audit","protected_credentials":[{{"label":"a","sha256":"{}"}}]}}"#,
        fingerprint(PROD.as_bytes())
    );
    let error = GuardPolicy::from_json(json.as_bytes()).unwrap_err();
    assert_eq!(error.field, "mode");
}

/// The host lends the body in the chunks Envoy holds it in: a credential (a fingerprinted key,
/// a prefix pattern, a regex pattern, a base64-encoded key) split at any point, into two or
/// three chunks, is still found, and a clean body split the same way still passes.
#[test]
fn a_credential_split_across_chunks_at_any_point_is_found() {
    use base64::Engine;
    let json = format!(
        r#"{{"environment":"uat","production":false,
            "protected_credentials":[{{"label":"apns-prod","sha256":"{}","length":{}}}],
            "patterns":[{{"label":"stripe-live","prefix":"sk_live_"}},{{"label":"aws-prod-key","regex":"AKIA[0-9A-Z]{{16}}"}}],
            "routes":[{{"path_prefix":"/v1/"}}],"max_body_bytes":4096}}"#,
        fingerprint(PROD.as_bytes()),
        PROD.len()
    );
    let policy = std::sync::Arc::new(GuardPolicy::from_json(json.as_bytes()).unwrap());
    let encoded = base64::engine::general_purpose::STANDARD.encode(PROD);
    let cases: Vec<(&str, &str, String, &str)> = vec![
        // (label, content-type, secret, body template: `@` is where the secret goes)
        ("apns-prod", "text/plain", PROD.to_string(), "note: the key is @ (keep it)"),
        ("apns-prod", "application/json", PROD.to_string(), r#"{"a":[1,{"key":"@"}],"b":"c"}"#),
        ("apns-prod", "application/x-www-form-urlencoded", PROD.to_string(), "a=1&key=@&b=2"),
        ("apns-prod", "application/json", encoded, r#"{"blob":"@"}"#),
        ("stripe-live", "text/plain", "sk_live_0123456789abcdefXYZ".to_string(), "charge with @ now"),
        ("aws-prod-key", "application/json", "AKIAABCDEFGHIJKLMNOP".to_string(), r#"{"id":"@"}"#),
    ];
    for (label, content_type, secret, template) in &cases {
        let (before, after) = template.split_once('@').unwrap();
        let body = format!("{before}{secret}{after}");
        let clean = format!("{before}{}{after}", "z".repeat(secret.len()));
        let (start, end) = (before.len(), before.len() + secret.len());
        let mut splits: Vec<Vec<usize>> = (start..=end).map(|at| vec![at]).collect();
        splits.extend((start + 1..end).map(|at| vec![start + 1, at]));
        splits.push((0..body.len()).collect()); // one byte per chunk
        let detected = format!("detected.{label}.body");
        for offsets in &splits {
            let request = |body: &str| {
                MemoryRequest::new(headers("POST", "/v1/push", &[("content-type", content_type)]), body.as_bytes())
                    .split_at(offsets)
            };
            let split = request(&body);
            let cuts: std::collections::BTreeSet<_> = offsets.iter().filter(|at| **at > 0 && **at < body.len()).collect();
            assert_eq!(split.chunks.len(), cuts.len() + 1);
            let outcome = run(&policy, split);
            let code = outcome.reply.as_ref().map(|r| r.code);
            assert_eq!(code, Some("production_credential_in_non_production"), "{label} {content_type} split at {offsets:?}");
            assert_eq!(outcome.counter(&format!("firebreak.env_guard.{detected}")), 1, "{label} split at {offsets:?}");
            assert!(outcome.forwarded_body.is_empty());
            assert_eq!(outcome.reads.body, 1, "the body is read once, at its end");

            let outcome = run(&policy, request(&clean));
            assert!(outcome.passed(), "{label} {content_type} clean, split at {offsets:?}: {:?}", outcome.reply);
            assert_eq!(outcome.forwarded_body, clean.as_bytes(), "every chunk reaches the upstream, in order");
        }
    }
}
