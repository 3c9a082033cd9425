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
