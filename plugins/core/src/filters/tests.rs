//! The chain's configuration: its shape, and every stage's errors named by their full path.

use super::*;

fn field_of(json: &str) -> String {
    match parse_sections(json.as_bytes()) {
        Err(error) => error.field,
        Ok(sections) => panic!("accepted {json}: {sections:?}"),
    }
}

#[test]
fn sections_keep_their_order_and_their_own_configuration() {
    let sections = parse_sections(
        br#"{"filters": [{"rate_limit": {"name": "per-ip"}}, {"request_signature": {"keys": []}}, {"rate_limit": {"name": "per-user"}}]}"#,
    )
    .unwrap();
    let filters: Vec<_> = sections.iter().map(|s| s.filter).collect();
    assert_eq!(filters, ["rate_limit", "request_signature", "rate_limit"]);
    assert_eq!(sections[1].config, br#"{"keys":[]}"#);
}

#[test]
fn a_wrong_chain_names_the_field() {
    assert_eq!(field_of("[]"), "");
    assert_eq!(field_of("not json"), "");
    assert_eq!(field_of(r#"{}"#), "filters");
    assert_eq!(field_of(r#"{"filters": []}"#), "filters");
    assert_eq!(field_of(r#"{"filters": {}}"#), "filters");
    assert_eq!(field_of(r#"{"filters": [], "extra": 1}"#), "extra");
    assert_eq!(field_of(r#"{"filters": [{"env_guard": {}}, 3]}"#), "filters[1]");
    assert_eq!(field_of(r#"{"filters": [{"env_guard": {}, "rate_limit": {}}]}"#), "filters[0]");
    assert_eq!(field_of(r#"{"filters": [{"waf": {}}]}"#), "filters[0].waf");
    assert_eq!(field_of(r#"{"filters": [{"env_guard": {}}, {"env_guard": {}}]}"#), "filters[1].env_guard");
    assert_eq!(
        field_of(r#"{"filters": [{"rate_limit": {"name": "a"}}, {"rate_limit": {"name": "a"}}]}"#),
        "filters[1].rate_limit.name"
    );
}

/// A stage's own configuration, parsed as `on_configure` parses it (the same core function),
/// its error reported under `at` as `glue::load_config` reports it (`""`: a separate module).
fn stage_error(at: &str, section: &StageSection) -> Option<ConfigError> {
    use crate::envguard::GuardPolicy;
    use crate::ratelimit::RateLimitPolicy;
    use crate::replay::ReplayPolicy;
    use crate::signature::SignaturePolicy;
    let json = section.config.as_slice();
    let error = match section.filter {
        "request_signature" => SignaturePolicy::from_json(json, &|_| None).err(),
        "replay_guard" => ReplayPolicy::from_json(json).err(),
        "rate_limit" => RateLimitPolicy::from_json(json).err(),
        "env_guard" => GuardPolicy::from_json(json).err(),
        other => panic!("no stage {other}"),
    };
    error.map(|e| e.under(at))
}

#[test]
fn every_stage_error_is_named_by_its_full_path_in_the_chain() {
    let rule = r#"{"name":"r","routes":[{"path_prefix":"/"}],"key":"ip","requests":1,"per_seconds":1,"burst":1}"#;
    let redis =
        |failure_mode: &str| format!(r#""state":{{"backend":"redis","cluster":"webdis","failure_mode":"{failure_mode}"}}"#);
    let cases = [
        (
            r#"{"request_signature":{"routes":[{"path_prefix":"/"}],"max_age_seconds":1,"keys":[{"id":"a","secret_env":"NOPE"}]}}"#
                .to_string(),
            "filters[0].request_signature.keys[0].secret_env",
        ),
        (
            format!(r#"{{"request_signature":{{"routes":[{{"path_prefix":"/"}}],"max_age_seconds":1,"keys":[{{"id":"a","secret_base64":"WlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlo="}}],{}}}}}"#, redis("open")),
            "filters[0].request_signature.state.failure_mode",
        ),
        (
            r#"{"replay_guard":{"routes":[{"name":"p","match":{"path_prefix":"/"},"on_uncertain":"retry"}]}}"#.to_string(),
            "filters[0].replay_guard.routes[0].on_uncertain",
        ),
        (
            r#"{"replay_guard":{"routes":[{"name":"p","match":{"path_prefix":"/"},"idempotency_key":"Required"}]}}"#.to_string(),
            "filters[0].replay_guard.routes[0].idempotency_key",
        ),
        (
            format!(r#"{{"rate_limit":{{"name":"a","rules":[{}]}}}}"#, rule.replace(r#""ip""#, r#""cookie""#)),
            "filters[0].rate_limit.rules[0].key",
        ),
        (
            format!(r#"{{"rate_limit":{{"name":"a","rules":[{}],{}}}}}"#, rule, redis("maybe")),
            "filters[0].rate_limit.state.failure_mode",
        ),
        (
            format!(r#"{{"rate_limit":{{"name":"a","rules":[{rule}],"state":{{"backend":"memcached"}}}}}}"#),
            "filters[0].rate_limit.state.backend",
        ),
        (
            format!(r#"{{"rate_limit":{{"name":"a","rules":[{rule}],"state":{{"backend":"redis"}}}}}}"#),
            "filters[0].rate_limit.state.cluster",
        ),
        (
            r#"{"env_guard":{"environment":"uat","production":false,"production_hosts":["a.example"],"over_limit":"allow"}}"#
                .to_string(),
            "filters[0].env_guard.over_limit",
        ),
        (r#"{"rate_limit":{"name":"a","rules":[],"bogus":1}}"#.to_string(), "filters[0].rate_limit.<configuration>"),
    ];
    let valid = format!(r#"{{"rate_limit":{{"name":"first","rules":[{rule}]}}}}"#);
    for (bad, field) in cases {
        // The bad stage second, after a valid one: its index is its place in the chain.
        let chain = format!(r#"{{"filters":[{valid},{bad}]}}"#);
        let sections = parse_sections(chain.as_bytes()).unwrap();
        assert_eq!(stage_error(&stage_section(0, sections[0].filter), &sections[0]), None, "{valid}");
        let error = stage_error(&stage_section(1, sections[1].filter), &sections[1]).expect(&chain);
        assert_eq!(error.field, field.replacen("filters[0]", "filters[1]", 1), "{chain}: {error}");
        // The same section as a separate module: the stage's own path, without the section.
        let own = field.splitn(3, '.').nth(2).unwrap();
        assert_eq!(stage_error("", &sections[1]).map(|e| e.field), Some(own.to_string()), "{chain}");
    }
}

/// A valid configuration of each filter, its routes under `/v1/`.
fn sample_config(filter: &str) -> &'static str {
    match filter {
        "env_guard" => {
            r#"{"environment": "uat", "production": false, "patterns": [{"label": "stripe-live", "prefix": "sk_live_"}],
                           "routes": [{"path_prefix": "/v1/"}], "over_limit": "block"}"#
        }
        "request_signature" => {
            r#"{"routes": [{"methods": ["POST"], "path_prefix": "/v1/"}],
                                   "keys": [{"id": "k1", "secret_base64": "ZGVtby1jbGllbnQtc2VjcmV0LWRvLW5vdC11c2UtaW4tcHJvZHVjdGlvbiE="}],
                                   "max_age_seconds": 300, "future_skew_seconds": 5, "max_body_bytes": 65536}"#
        }
        "rate_limit" => {
            r#"{"name": "t", "rules": [{"name": "per-ip", "routes": [{"path_prefix": "/v1/"}], "key": "ip",
                            "requests": 10, "per_seconds": 1, "burst": 10}], "response_headers": true}"#
        }
        "amount_limit" => {
            r#"{"rules": [{"name": "w", "routes": [{"methods": ["POST"], "path_prefix": "/v1/"}], "amount_pointer": "/amount",
                           "amount_format": "minor_units", "key": ["/account"], "budgets": {"USD": {"exponent": 2, "amount_minor": 100, "window_s": 60}}}]}"#
        }
        _ => r#"{"routes": [{"name": "transfers", "match": {"path_prefix": "/v1/"}, "idempotency_key": "required"}]}"#,
    }
}

fn event_of(kind: EventKind) -> crate::flow::Event {
    use crate::flow::{CallId, Event};
    match kind {
        EventKind::RequestHeaders => Event::RequestHeaders { end_of_stream: false },
        EventKind::RequestBody => Event::RequestBody { buffered: 2, end_of_stream: true },
        EventKind::RequestTrailers => Event::RequestTrailers,
        EventKind::ResponseHeaders => Event::ResponseHeaders { end_of_stream: false },
        EventKind::ResponseBody => Event::ResponseBody { buffered: 2, end_of_stream: true },
        EventKind::ResponseTrailers => Event::ResponseTrailers,
        EventKind::CallAnswer => Event::CallAnswer { call: CallId(1), body_size: 0 },
        EventKind::StreamEnd => Event::StreamEnd,
    }
}

/// What `events_used` leaves out is what a proxy-wasm module does not export: each such event,
/// on a fresh flow and after the request headers, must be answered `Continue` with no effect.
#[test]
fn a_filter_ignores_every_event_it_does_not_declare() {
    use crate::flow::memory::{step, MemoryEnv, MemoryRequest, MemoryUpstream};
    use crate::flow::Step;
    use crate::store::MemoryStore;

    let headers = |list: &[(&str, &str)]| list.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect::<Vec<_>>();
    let request = MemoryRequest::new(
        headers(&[(":method", "POST"), (":path", "/v1/transfers"), (":authority", "a"), ("idempotency-key", "k-1")]),
        b"{}",
    );
    let upstream =
        MemoryUpstream { headers: headers(&[(":status", "200")]), chunks: vec![b"{}".to_vec()], ..MemoryUpstream::default() };
    for filter in FILTERS {
        let used = events_used(filter).unwrap();
        let store = MemoryStore::default();
        let setup = Setup { env: &|_: &str| None, store: &store, entropy: [3; 32] };
        let factory = configure(filter, sample_config(filter).as_bytes(), &setup).unwrap();
        for kind in EventKind::ALL.iter().filter(|k| !used.contains(k)) {
            for after_headers in [false, true] {
                let mut env = MemoryEnv { now_ms: Some(1_700_000_000_000), ..MemoryEnv::default() };
                let mut flow = factory.new_flow();
                if after_headers {
                    let _ = step(flow.as_mut(), event_of(EventKind::RequestHeaders), &mut env, &request, &upstream);
                }
                let (answer, outcome) = step(flow.as_mut(), event_of(*kind), &mut env, &request, &upstream);
                let context = format!("{filter} {kind:?} after_headers={after_headers}");
                assert!(matches!(answer, Step::Continue), "{context}: {answer:?}");
                assert!(outcome.counters.is_empty(), "{context}: {:?}", outcome.counters);
                assert!(outcome.logs.is_empty(), "{context}: {:?}", outcome.logs);
                assert!(outcome.calls.is_empty(), "{context}");
                assert_eq!(outcome.client_headers, upstream.headers, "{context}");
            }
        }
    }
    assert_eq!(events_used(CHAIN), Some(&EventKind::ALL[..]));
    assert_eq!(events_used("nope"), None);
}

#[test]
fn a_chain_exports_the_fill_level_of_every_local_table_of_its_stages() {
    use crate::store::MemoryStore;
    let store = MemoryStore::default();
    let setup = Setup { env: &|_: &str| None, store: &store, entropy: [3; 32] };
    let json = format!(
        r#"{{"filters": [{{"env_guard": {}}}, {{"request_signature": {}}}, {{"rate_limit": {}}}, {{"replay_guard": {}}}]}}"#,
        sample_config("env_guard"),
        sample_config("request_signature"),
        sample_config("rate_limit"),
        sample_config("replay_guard"),
    );
    let chain = configure_chain(json.as_bytes(), &setup).unwrap();
    let stores: Vec<(String, &str, u64)> =
        chain.stores().iter().map(|s| (s.meter.prefix.to_string(), s.name, s.table.capacity())).collect();
    assert_eq!(
        stores,
        [
            ("firebreak.request_signature".to_string(), "nonces", 8192 * 16),
            ("firebreak.request_signature".to_string(), "nonce_quotas", 8192 * 16),
            ("firebreak.rate_limit.t".to_string(), "budgets", 4096 * 16),
            ("firebreak.replay_guard".to_string(), "keys", 1024 * 8),
            ("firebreak.replay_guard".to_string(), "key_quotas", 1024 * 8),
            ("firebreak.replay_guard".to_string(), "collapse", 256 * 8),
            ("firebreak.replay_guard".to_string(), "collapse_quotas", 256 * 8),
        ]
    );
    // A Redis backend has no local table to fill.
    let redis = r#"{"name": "r", "rules": [{"name": "per-ip", "routes": [{"path_prefix": "/v1/"}], "key": "ip",
        "requests": 10, "per_seconds": 1, "burst": 10}],
        "state": {"backend": "redis", "cluster": "c", "authority": "a", "failure_mode": "closed"}}"#;
    match configure("rate_limit", redis.as_bytes(), &setup) {
        Ok(factory) => assert!(factory.stores().is_empty()),
        Err(error) => panic!("{error:?}"),
    }
}
