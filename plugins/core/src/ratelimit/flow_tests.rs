//! rate-limit's flow driven through the in-memory host: replies, counters, log lines, response
//! headers, what the host is asked for, the Redis callout (a fake bridge answering webdis JSON
//! the way [`super::redis::MULTI_GCRA_SCRIPT`] does) and its failures.

use std::cell::Cell;
use std::collections::HashMap;
use std::rc::Rc;

use crate::filters::{configure, Setup};
use crate::flow::memory::{exchange, step, Faults, MemoryEnv, MemoryRequest, MemoryUpstream, Outcome};
use crate::flow::{CallAnswer, CallId, Event, Flow, FlowFactory, Host, HostFailed, Level, Meter, Step};
use crate::remote::RedisConfig;

const T0: u64 = 1_700_000_000_000;
const PREFIX: &str = "firebreak.rate_limit.rl.";

/// A rule on GET and POST under `/v1/`: `burst` requests, then one per hour.
fn rule(name: &str, key: &str, burst: u32, extra: &str) -> String {
    format!(
        r#"{{"name":"{name}","routes":[{{"methods":["GET","POST"],"path_prefix":"/v1/"}}],"key":"{key}","requests":1,"per_seconds":3600,"burst":{burst}{extra}}}"#
    )
}

fn config(rules: &[String], extra: &str) -> String {
    format!(r#"{{"name":"rl","rules":[{}]{extra}}}"#, rules.join(","))
}

fn redis_state(failure_mode: &str) -> String {
    format!(r#","state":{{"backend":"redis","cluster":"bridge","key_prefix":"t","failure_mode":"{failure_mode}"}}"#)
}

/// Configures rate-limit as every host does, its tables bound to `env`'s shared data.
fn instance(json: &str, env: &MemoryEnv) -> std::sync::Arc<dyn FlowFactory> {
    let setup = Setup { env: &|_| None, store: &env.store, entropy: [7; 32] };
    match configure("rate_limit", json.as_bytes(), &setup) {
        Ok(factory) => factory,
        Err(error) => panic!("{json}: {error:?}"),
    }
}

fn request(method: &str, path: &str, extra: &[(&str, &str)]) -> MemoryRequest {
    let mut headers = vec![
        (":method".to_string(), method.to_string()),
        (":path".to_string(), path.to_string()),
        (":authority".to_string(), "api.example.com".to_string()),
    ];
    headers.extend(extra.iter().map(|(n, v)| (n.to_string(), v.to_string())));
    MemoryRequest::new(headers, b"")
}

fn get(path: &str) -> MemoryRequest {
    request("GET", path, &[])
}

fn send(factory: &std::sync::Arc<dyn FlowFactory>, env: &mut MemoryEnv, request: &MemoryRequest) -> Outcome {
    exchange(&mut *factory.new_flow(), env, request, &MemoryUpstream::default())
}

/// The counters an exchange moved, without the instance's prefix, sorted.
fn counters(outcome: &Outcome) -> Vec<String> {
    let mut names: Vec<String> = outcome
        .counters
        .keys()
        .map(|k| k.strip_prefix(PREFIX).map_or_else(|| format!("<{k}>"), str::to_string))
        .collect();
    names.sort_unstable();
    names
}

fn code(outcome: &Outcome) -> Option<&'static str> {
    outcome.reply.as_ref().map(|r| r.code)
}

/// An earlier filter of the stream (request-signature) that verified `principal`.
struct Verified {
    principal: &'static str,
    inner: Box<dyn Flow>,
}

impl Flow for Verified {
    fn on_event(&mut self, event: Event, host: &mut dyn Host) -> Step {
        if let Event::RequestHeaders { .. } = event {
            assert_eq!(host.set_principal(self.principal), Ok(()));
        }
        self.inner.on_event(event, host)
    }
}

fn send_as(
    principal: &'static str,
    factory: &std::sync::Arc<dyn FlowFactory>,
    env: &mut MemoryEnv,
    request: &MemoryRequest,
) -> Outcome {
    let mut flow = Verified { principal, inner: factory.new_flow() };
    exchange(&mut flow, env, request, &MemoryUpstream::default())
}

/// One row: a configuration, a request, the code it gets (`None`: forwarded), every counter it
/// moves, and the log lines besides a refusal's.
struct Row {
    name: &'static str,
    config: String,
    request: MemoryRequest,
    principal: Option<&'static str>,
    code: Option<&'static str>,
    counters: &'static [&'static str],
    logs: &'static [&'static str],
}

#[test]
fn table_of_requests_replies_and_counters() {
    let per_ip = config(&[rule("per-ip", "ip", 3, "")], "");
    let per_user = config(&[rule("per-user", "user", 3, "")], "");
    let no_source = MemoryRequest { source_address: None, ..get("/v1/a") };
    let rows = vec![
        Row {
            name: "outside every rule: untouched, nothing counted",
            config: per_ip.clone(),
            request: get("/healthz"),
            principal: None,
            code: None,
            counters: &[],
            logs: &[],
        },
        Row {
            name: "a path that is not canonical",
            config: per_ip.clone(),
            request: get("/v1/../v1/a"),
            principal: None,
            code: Some("path_not_canonical"),
            counters: &["rejected.path_not_canonical"],
            logs: &[],
        },
        Row {
            name: "a method that is not UTF-8 (read as empty)",
            config: per_ip.clone(),
            request: request("", "/v1/a", &[]),
            principal: None,
            code: Some("request_headers_invalid"),
            counters: &["rejected.request_headers_invalid"],
            logs: &[],
        },
        Row {
            name: "per ip, admitted",
            config: per_ip.clone(),
            request: get("/v1/a"),
            principal: None,
            code: None,
            counters: &["allowed", "rule.per-ip.allowed"],
            logs: &[],
        },
        Row {
            name: "per ip, no client address",
            config: per_ip.clone(),
            request: no_source.clone(),
            principal: None,
            code: Some("rate_limit_client_unknown"),
            counters: &["rejected.rate_limit_client_unknown", "rule.per-ip.error.no_client_ip"],
            logs: &[],
        },
        Row {
            name: "per ip, no client address, the rule fails open",
            config: config(&[rule("per-ip", "ip", 3, r#","fail_open":true"#)], ""),
            request: no_source,
            principal: None,
            code: None,
            counters: &["allowed", "rule.per-ip.error.no_client_ip"],
            logs: &["firebreak rate_limit pass_on_error instance=rl rule=per-ip error=no_client_ip instance=rl method=GET path=\"/v1/a\""],
        },
        Row {
            name: "per user, no verified user",
            config: per_user.clone(),
            request: get("/v1/a"),
            principal: None,
            code: Some("rate_limit_unauthenticated"),
            counters: &["rejected.rate_limit_unauthenticated", "rule.per-user.error.no_user"],
            logs: &[],
        },
        Row {
            name: "per user, verified",
            config: per_user.clone(),
            request: get("/v1/a"),
            principal: Some("alice"),
            code: None,
            counters: &["allowed", "rule.per-user.allowed"],
            logs: &[],
        },
        Row {
            name: "per user or ip, no user, an ip rule beside it: counted by ip",
            config: config(&[rule("per-user", "user", 3, r#","missing_user":"by_ip""#), rule("per-ip", "ip", 3, "")], ""),
            request: get("/v1/a"),
            principal: None,
            code: None,
            counters: &["allowed", "rule.per-ip.allowed", "rule.per-user.allowed"],
            logs: &[],
        },
        // Kept as the proxy-wasm adapter did it (reported, not changed here): the client address
        // is read only when some rule's `key` is `ip` or `ip_and_user`, so a `user` rule with
        // `missing_user: by_ip` alone finds no address for a request without a user.
        Row {
            name: "per user or ip, no user, no ip rule: the address is not read",
            config: config(&[rule("per-user", "user", 3, r#","missing_user":"by_ip""#)], ""),
            request: get("/v1/a"),
            principal: None,
            code: Some("rate_limit_client_unknown"),
            counters: &["rejected.rate_limit_client_unknown", "rule.per-user.error.no_client_ip"],
            logs: &[],
        },
        Row {
            name: "report-only rule within its budget",
            config: config(&[rule("trial", "ip", 1, r#","mode":"report_only""#)], ""),
            request: get("/v1/a"),
            principal: None,
            code: None,
            counters: &["allowed", "rule.trial.allowed"],
            logs: &[],
        },
        Row {
            name: "trusted header user",
            config: config(&[rule("per-user", "user", 3, "")], r#","trusted_user_header":"X-Edge-User""#),
            request: request("POST", "/v1/a", &[("x-edge-user", "bob")]),
            principal: None,
            code: None,
            counters: &["allowed", "rule.per-user.allowed"],
            logs: &[],
        },
        Row {
            name: "trusted header in two spellings: no user",
            config: config(&[rule("per-user", "user", 3, "")], r#","trusted_user_header":"X-Edge-User""#),
            request: request("POST", "/v1/a", &[("x-edge-user", "bob"), ("x_edge_user", "eve")]),
            principal: None,
            code: Some("rate_limit_unauthenticated"),
            counters: &["rejected.rate_limit_unauthenticated", "rule.per-user.error.no_user"],
            logs: &[],
        },
    ];
    for row in rows {
        let mut env = MemoryEnv::default();
        let factory = instance(&row.config, &env);
        let outcome = match row.principal {
            Some(principal) => send_as(principal, &factory, &mut env, &row.request),
            None => send(&factory, &mut env, &row.request),
        };
        assert_eq!(code(&outcome), row.code, "{}", row.name);
        let mut want: Vec<String> = row.counters.iter().map(|c| c.to_string()).collect();
        want.sort_unstable();
        assert_eq!(counters(&outcome), want, "{}", row.name);
        assert!(outcome.counters.values().all(|n| *n == 1), "{}: {:?}", row.name, outcome.counters);
        let others: Vec<&str> = outcome.logs.iter().map(|(_, l)| l.as_str()).filter(|l| !l.contains(" reject ")).collect();
        assert_eq!(others, row.logs, "{}", row.name);
        if row.code.is_some() {
            assert!(!outcome.forwarded, "{}", row.name);
            // One refusal line, at warn level.
            let refusals: Vec<_> = outcome.logs.iter().filter(|(_, l)| l.contains(" reject ")).collect();
            assert_eq!(refusals.len(), 1, "{}", row.name);
            assert_eq!(refusals[0].0, Level::Warn, "{}", row.name);
        } else {
            assert!(outcome.passed(), "{}", row.name);
        }
    }
}

#[test]
fn a_spent_burst_is_refused_with_its_headers_and_admitted_responses_carry_them() {
    let mut env = MemoryEnv::default();
    let factory = instance(&config(&[rule("per-ip", "ip", 2, "")], r#","response_headers":true"#), &env);
    let first = send(&factory, &mut env, &get("/v1/a"));
    assert!(first.passed());
    assert_eq!(
        first.client_headers,
        vec![
            ("ratelimit-policy".to_string(), "\"per-ip\";q=2;w=7200".to_string()),
            ("ratelimit".to_string(), "\"per-ip\";r=1;t=3600".to_string()),
        ]
    );
    assert!(send(&factory, &mut env, &request("POST", "/v1/b", &[])).passed());
    let refused = send(&factory, &mut env, &get("/v1/a"));
    let rejection = refused.reply.as_ref().unwrap();
    assert_eq!((rejection.status, rejection.code), (429, "rate_limited"));
    assert_eq!(rejection.message, "rate limit `per-ip` exceeded; retry in 3600 s");
    assert_eq!(
        rejection.headers,
        vec![
            ("retry-after".to_string(), "3600".to_string()),
            ("ratelimit-policy".to_string(), "\"per-ip\";q=2;w=7200".to_string()),
            ("ratelimit".to_string(), "\"per-ip\";r=0;t=7200".to_string()),
        ]
    );
    assert_eq!(counters(&refused), ["rejected.rate_limited", "rule.per-ip.limited"]);
    assert_eq!(
        refused.logs,
        vec![(
            Level::Warn,
            "firebreak rate_limit reject status=429 code=rate_limited instance=rl method=GET path=\"/v1/a\" rule=per-ip ip=127.0.0.1/32 msg=\"rate limit `per-ip` exceeded; retry in 3600 s\"".to_string()
        )]
    );
    // Another client has its own budget; other routes are not limited.
    let other = MemoryRequest { source_address: Some("[2001:db8::1]:5000".into()), ..get("/v1/a") };
    assert!(send(&factory, &mut env, &other).passed());
    assert!(send(&factory, &mut env, &get("/healthz")).passed());
    // A failed header write only leaves the response without it.
    let mut broken = MemoryEnv { faults: Faults { writes: true, ..Faults::default() }, ..MemoryEnv::default() };
    let factory = instance(&config(&[rule("per-ip", "ip", 2, "")], r#","response_headers":true"#), &broken);
    let outcome = send(&factory, &mut broken, &get("/v1/a"));
    assert!(outcome.passed());
    assert!(outcome.client_headers.is_empty());
    // Without `response_headers`, admitted responses are untouched.
    let mut env = MemoryEnv::default();
    let factory = instance(&config(&[rule("per-ip", "ip", 2, "")], ""), &env);
    assert!(send(&factory, &mut env, &get("/v1/a")).client_headers.is_empty());
}

#[test]
fn several_rules_refusal_costs_nothing_in_the_others_and_report_only_logs() {
    let mut env = MemoryEnv::default();
    let rules = [rule("tight", "ip", 1, ""), rule("loose", "ip", 5, ""), rule("trial", "ip", 1, r#","mode":"report_only""#)];
    let factory = instance(&config(&rules, ""), &env);
    let first = send(&factory, &mut env, &get("/v1/a"));
    assert!(first.passed());
    assert_eq!(counters(&first), ["allowed", "rule.loose.allowed", "rule.tight.allowed", "rule.trial.allowed"]);
    let second = send(&factory, &mut env, &get("/v1/a"));
    assert_eq!(code(&second), Some("rate_limited"));
    assert_eq!(counters(&second), ["rejected.rate_limited", "rule.tight.limited"]);
    // Only the report-only rule refuses: it is logged and counted, the request passes.
    let mut env = MemoryEnv::default();
    let factory = instance(&config(&[rule("loose", "ip", 5, ""), rule("trial", "ip", 1, r#","mode":"report_only""#)], ""), &env);
    assert!(send(&factory, &mut env, &get("/v1/a")).passed());
    let second = send(&factory, &mut env, &get("/v1/a"));
    assert!(second.passed());
    assert_eq!(counters(&second), ["allowed", "rule.loose.allowed", "rule.trial.would_limit", "would_reject.rate_limited"]);
    assert_eq!(
        second.logs,
        vec![(
            Level::Warn,
            "firebreak rate_limit would_reject status=429 code=rate_limited instance=rl method=GET path=\"/v1/a\" rule=trial ip=127.0.0.1/32 retry_after_ms=3600000 msg=\"rate limit `trial` exceeded; retry in 3600 s\"".to_string()
        )]
    );
}

/// The same second request: refused in enforce mode; in report-only mode (the instance's, or
/// the rule's own) counted, logged and passed untouched; refused again once switched back.
#[test]
fn report_only_instance_or_rule_passes_what_enforce_refuses_and_switching_back_refuses_it() {
    let enforce = config(&[rule("per-ip", "ip", 1, "")], "");
    let by_instance = config(&[rule("per-ip", "ip", 1, "")], r#","mode":"report_only""#);
    let by_rule = config(&[rule("per-ip", "ip", 1, r#","mode":"report_only""#)], "");
    let second_of = |json: &str| {
        let mut env = MemoryEnv::default();
        let factory = instance(json, &env);
        assert!(send(&factory, &mut env, &get("/v1/a")).passed());
        send(&factory, &mut env, &get("/v1/a"))
    };
    let refused = second_of(&enforce);
    assert_eq!(code(&refused), Some("rate_limited"));
    assert_eq!(counters(&refused), ["rejected.rate_limited", "rule.per-ip.limited"]);
    for json in [&by_instance, &by_rule] {
        let passed = second_of(json);
        assert!(passed.passed(), "{json}");
        assert!(passed.forwarded && passed.client_headers.is_empty(), "{json}");
        assert_eq!(counters(&passed), ["allowed", "rule.per-ip.would_limit", "would_reject.rate_limited"], "{json}");
        assert_eq!(passed.logs.len(), 1);
        assert!(passed.logs[0].1.starts_with("firebreak rate_limit would_reject status=429 code=rate_limited "));
    }
    // A rule's own mode wins over the instance's.
    let rule_enforces = config(&[rule("per-ip", "ip", 1, r#","mode":"enforce""#)], r#","mode":"report_only""#);
    assert_eq!(code(&second_of(&rule_enforces)), Some("rate_limited"));
    // Switching is a configuration change: the same table (same shared data), reconfigured.
    let mut env = MemoryEnv::default();
    let trial = instance(&by_instance, &env);
    assert!(send(&trial, &mut env, &get("/v1/a")).passed());
    assert!(send(&trial, &mut env, &get("/v1/a")).passed());
    let enforced = instance(&enforce, &env);
    assert_eq!(code(&send(&enforced, &mut env, &get("/v1/a"))), Some("rate_limited"));
}

#[test]
fn report_only_instance_refusals_of_its_own_are_counted_and_pass() {
    let mut env = MemoryEnv::default();
    let factory = instance(&config(&[rule("per-ip", "ip", 1, "")], r#","mode":"report_only""#), &env);
    let outcome = send(&factory, &mut env, &get("/v1/../v1/a"));
    assert!(outcome.passed());
    assert_eq!(counters(&outcome), ["would_reject.path_not_canonical"]);
    assert!(outcome.logs[0]
        .1
        .starts_with("firebreak rate_limit would_reject status=400 code=path_not_canonical"));
    let factory = instance(&config(&[rule("per-ip", "ip", 1, "")], ""), &env);
    assert_eq!(code(&send(&factory, &mut env, &get("/v1/../v1/a"))), Some("path_not_canonical"));
}

#[test]
fn the_would_reject_counters_are_declared_only_when_something_reports() {
    let env = MemoryEnv::default();
    let declared = |json: &str| instance(json, &env).counters();
    assert!(!declared(&config(&[rule("per-ip", "ip", 1, "")], "")).iter().any(|c| c.starts_with("would_reject.")));
    for json in [
        config(&[rule("per-ip", "ip", 1, "")], r#","mode":"report_only""#),
        config(&[rule("per-ip", "ip", 1, r#","mode":"report_only""#)], ""),
    ] {
        let names = declared(&json);
        for code in ["rate_limited", "path_not_canonical", "rate_limit_unauthenticated", "state_unavailable"] {
            assert!(names.contains(&format!("would_reject.{code}")), "{json}: {code}");
        }
    }
}

/// What a flow asked its host for, besides the stream itself.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Asked {
    headers: usize,
    clock: usize,
    principal: usize,
    source_address: usize,
    calls: usize,
}

/// A host that counts what the flow asks, on top of the memory host.
struct Counting<'a> {
    inner: &'a mut dyn Host,
    asked: &'a Cell<Asked>,
}

impl Counting<'_> {
    fn ask(&self, f: impl FnOnce(&mut Asked)) {
        let mut asked = self.asked.get();
        f(&mut asked);
        self.asked.set(asked);
    }
}

impl Host for Counting<'_> {
    forward_to_inner!(
        with_request_body,
        request_trailers_raw,
        set_request_header,
        response_headers_raw,
        response_body,
        add_response_header,
        response_from_upstream,
        set_principal,
        body_sha256,
        set_body_sha256,
        store,
        call_answer,
        count,
        count_passed,
        logs_debug,
        log
    );

    fn now_ms(&mut self) -> Option<u64> {
        self.ask(|a| a.clock += 1);
        self.inner.now_ms()
    }

    fn request_headers(&mut self) -> Result<std::rc::Rc<crate::flow::Headers>, crate::flow::ReadError> {
        self.ask(|a| a.headers += 1);
        self.inner.request_headers()
    }

    fn request_headers_lossy(&mut self) -> Result<std::rc::Rc<crate::flow::Headers>, HostFailed> {
        self.ask(|a| a.headers += 1);
        self.inner.request_headers_lossy()
    }

    fn source_address(&mut self) -> Option<String> {
        self.ask(|a| a.source_address += 1);
        self.inner.source_address()
    }

    fn principal(&mut self) -> Result<Option<String>, HostFailed> {
        self.ask(|a| a.principal += 1);
        self.inner.principal()
    }

    fn call_redis(&mut self, redis: &RedisConfig, command: &[u8]) -> Result<CallId, HostFailed> {
        self.ask(|a| a.calls += 1);
        self.inner.call_redis(redis, command)
    }
}

struct Watched {
    inner: Box<dyn Flow>,
    asked: Rc<Cell<Asked>>,
}

impl Flow for Watched {
    fn on_event(&mut self, event: Event, host: &mut dyn Host) -> Step {
        let asked = self.asked.clone();
        let mut counting = Counting { inner: host, asked: &asked };
        self.inner.on_event(event, &mut counting)
    }
}

fn asked(factory: &std::sync::Arc<dyn FlowFactory>, env: &mut MemoryEnv, request: &MemoryRequest) -> (Outcome, Asked) {
    let asked = Rc::new(Cell::new(Asked::default()));
    let mut flow = Watched { inner: factory.new_flow(), asked: asked.clone() };
    let outcome = exchange(&mut flow, env, request, &MemoryUpstream::default());
    (outcome, asked.get())
}

#[test]
fn the_host_is_asked_only_for_what_the_rules_key_on() {
    let header = r#","trusted_user_header":"x-edge-user""#;
    for (name, rules, extra, want) in [
        ("ip only", vec![rule("r", "ip", 5, "")], "", Asked { headers: 1, clock: 1, principal: 0, source_address: 1, calls: 0 }),
        (
            "user only",
            vec![rule("r", "user", 5, "")],
            "",
            Asked { headers: 1, clock: 1, principal: 1, source_address: 0, calls: 0 },
        ),
        (
            "user from a trusted header",
            vec![rule("r", "user", 5, "")],
            header,
            Asked { headers: 1, clock: 1, principal: 0, source_address: 0, calls: 0 },
        ),
        (
            "ip and user",
            vec![rule("r", "ip_and_user", 5, "")],
            "",
            Asked { headers: 1, clock: 1, principal: 1, source_address: 1, calls: 0 },
        ),
        (
            "one rule of each",
            vec![rule("a", "ip", 5, ""), rule("b", "user", 5, "")],
            "",
            Asked { headers: 1, clock: 1, principal: 1, source_address: 1, calls: 0 },
        ),
    ] {
        let mut env = MemoryEnv::default();
        let factory = instance(&config(&rules, extra), &env);
        let request = request("GET", "/v1/a", &[("x-edge-user", "bob")]);
        let (_, got) = asked(&factory, &mut env, &request);
        assert_eq!(got, want, "{name}");
        // Outside every rule: one header read, nothing else.
        let (outcome, got) = asked(&factory, &mut env, &get("/healthz"));
        assert!(outcome.passed());
        assert_eq!(got, Asked { headers: 1, ..Asked::default() }, "{name}");
    }
}

#[test]
fn what_the_host_cannot_give_is_refused() {
    let rules = [rule("a", "ip", 5, ""), rule("b", "user", 5, "")];
    for (name, env, want) in [
        (
            "headers unreadable",
            MemoryEnv { faults: Faults { request_headers: true, ..Faults::default() }, ..MemoryEnv::default() },
            ("rate_limit_unavailable", Some("headers_unreadable"), "instance=rl"),
        ),
        (
            "principal unreadable",
            MemoryEnv { faults: Faults { principal: true, ..Faults::default() }, ..MemoryEnv::default() },
            ("rate_limit_unavailable", Some("principal_unreadable"), "instance=rl method=GET path=\"/v1/a\""),
        ),
        (
            "no clock",
            MemoryEnv { now_ms: None, ..MemoryEnv::default() },
            ("rate_limit_unavailable", None, "instance=rl method=GET path=\"/v1/a\""),
        ),
    ] {
        let mut env = env;
        let factory = instance(&config(&rules, ""), &env);
        let (outcome, asked) = asked(&factory, &mut env, &get("/v1/a"));
        let rejection = outcome.reply.as_ref().unwrap();
        assert_eq!((rejection.status, rejection.code, rejection.detail), (503, want.0, want.1), "{name}");
        assert!(!outcome.forwarded, "{name}");
        let mut expected = vec![format!("rejected.{}", want.0)];
        expected.extend(want.1.map(|d| format!("rejected.{}.{d}", want.0)));
        assert_eq!(counters(&outcome), expected, "{name}");
        assert_eq!(outcome.logs.len(), 1, "{name}");
        assert!(outcome.logs[0].1.contains(&format!(" {} msg=", want.2)), "{name}: {}", outcome.logs[0].1);
        // Nothing is asked after the refusal.
        assert_eq!(asked.source_address, 0, "{name}");
    }
}

/// [`super::redis::MULTI_GCRA_SCRIPT`] in Rust behind a fake webdis: reads the command in
/// webdis's path form and answers `{"EVAL": [...]}`, on a clock the test moves.
struct FakeBridge {
    tat: HashMap<String, i128>,
    now_ms: Rc<Cell<u64>>,
}

impl FakeBridge {
    fn answer(&mut self, command: &[u8]) -> CallAnswer {
        // A Redis that holds the script already: the call names it by its SHA-1.
        assert!(command.starts_with(b"EVALSHA/404cbd490400f225358fc704188292560e5dbf5d/"));
        let command = crate::remote::eval_fallback(command).unwrap();
        let parts: Vec<String> = std::str::from_utf8(&command)
            .unwrap()
            .split('/')
            .map(|p| percent_encoding::percent_decode_str(p).decode_utf8().unwrap().into_owned())
            .collect();
        assert_eq!(parts[0], "EVAL");
        assert_eq!(parts[1], super::redis::MULTI_GCRA_SCRIPT);
        let n: usize = parts[2].parse().unwrap();
        let keys = &parts[3..3 + n];
        let enforced: usize = parts[3 + n].parse().unwrap();
        let lease: i128 = parts[4 + n].parse().unwrap();
        let args: Vec<i128> = parts[5 + n..].iter().map(|a| a.parse().unwrap()).collect();
        let now = i128::from(self.now_ms.get()) * 1000;
        let mut tat: Vec<i128> = keys.iter().map(|k| self.tat.get(k).copied().unwrap_or(0).max(now)).collect();
        let avail = |i: usize, tat: i128| (args[2 * i + 1] - (tat - now)).div_euclid(args[2 * i]);
        let refused = (0..enforced).any(|i| avail(i, tat[i]) < 1);
        let mut out = Vec::new();
        for i in 0..n {
            let (iv, hz) = (args[2 * i], args[2 * i + 1]);
            let mut take = 0;
            if !refused && avail(i, tat[i]) >= 1 {
                take = avail(i, tat[i]).min(lease);
            }
            if take > 0 {
                tat[i] += take * iv;
                self.tat.insert(keys[i].clone(), tat[i]);
            }
            let debt = tat[i] - now;
            let rem = avail(i, tat[i]).max(0);
            let retry = if rem < 1 { (debt + iv - hz + 999).div_euclid(1000) } else { 0 };
            out.extend([take, rem, (debt + 999).div_euclid(1000), retry]);
        }
        let values: Vec<String> = out.iter().map(i128::to_string).collect();
        CallAnswer { status: Some(200), body: format!(r#"{{"EVAL":[{}]}}"#, values.join(",")).into_bytes() }
    }
}

fn with_bridge(clock: &Rc<Cell<u64>>) -> MemoryEnv {
    let mut bridge = FakeBridge { tat: HashMap::new(), now_ms: clock.clone() };
    MemoryEnv { redis: Some(Box::new(move |command| bridge.answer(command))), ..MemoryEnv::default() }
}

#[test]
fn redis_decides_and_the_request_waits_for_it() {
    let clock = Rc::new(Cell::new(T0));
    let mut env = with_bridge(&clock);
    let json = config(&[rule("per-ip", "ip", 2, "")], &format!("{}{}", redis_state("closed"), r#","response_headers":true"#));
    let factory = instance(&json, &env);
    let first = send(&factory, &mut env, &get("/v1/a"));
    assert!(first.passed());
    assert_eq!(first.calls.len(), 1);
    assert_eq!(counters(&first), ["allowed", "redis.calls", "rule.per-ip.allowed"]);
    assert_eq!(first.client_headers[1], ("ratelimit".to_string(), "\"per-ip\";r=1;t=3600".to_string()));
    let command = String::from_utf8(first.calls[0].clone()).unwrap();
    assert!(command.starts_with("EVALSHA/"), "{command}");
    // One key (`t:rl:<hash>`), one enforced, a lease of 1, the interval and horizon in us.
    assert!(command.contains("/1/t:rl:"), "{command}");
    assert!(command.ends_with("/1/1/3600000000/7200000000"), "{command}");

    // A chunked body waits for the answer and then goes through whole.
    let mut chunked = request("POST", "/v1/b", &[]);
    chunked.chunks = vec![b"{\"amount\":".to_vec(), b"1}".to_vec()];
    let second = send(&factory, &mut env, &chunked);
    assert!(second.passed());
    assert_eq!(second.forwarded_body, b"{\"amount\":1}");
    assert!(!second.stalled);

    let third = send(&factory, &mut env, &get("/v1/a"));
    assert_eq!(code(&third), Some("rate_limited"));
    assert_eq!(counters(&third), ["redis.calls", "rejected.rate_limited", "rule.per-ip.limited"]);
    assert_eq!(third.reply.as_ref().unwrap().headers[0], ("retry-after".to_string(), "3600".to_string()));
    // An hour later one more is admitted.
    clock.set(T0 + 3_600_000);
    env.now_ms = Some(T0 + 3_600_000);
    assert!(send(&factory, &mut env, &get("/v1/a")).passed());
}

#[test]
fn while_redis_has_not_answered_nothing_passes_and_other_answers_are_ignored() {
    let clock = Rc::new(Cell::new(T0));
    let mut env = with_bridge(&clock);
    let factory = instance(&config(&[rule("per-ip", "ip", 2, "")], &redis_state("closed")), &env);
    let mut flow = factory.new_flow();
    let mut chunked = request("POST", "/v1/b", &[]);
    chunked.chunks = vec![b"{}".to_vec()];
    chunked.trailers = Some(vec![("x-t".into(), "1".into())]);
    let upstream = MemoryUpstream::default();
    let mut event = |event| step(&mut *flow, event, &mut env, &chunked, &upstream);
    let (headers, outcome) = event(Event::RequestHeaders { end_of_stream: false });
    assert_eq!(headers, Step::Hold);
    assert_eq!(outcome.calls.len(), 1);
    assert_eq!(event(Event::RequestBody { buffered: 2, end_of_stream: false }).0, Step::Hold);
    assert_eq!(event(Event::RequestTrailers).0, Step::Hold);
    // An answer to a call this flow did not make: not its business.
    let (other, outcome) = event(Event::CallAnswer { call: CallId(99), body_size: 3 });
    assert_eq!(other, Step::Hold);
    assert!(outcome.counters.is_empty() && outcome.logs.is_empty());
    assert_eq!(event(Event::RequestBody { buffered: 2, end_of_stream: true }).0, Step::Hold);

    // Without a call in flight, the body and trailers go on.
    let mut env = MemoryEnv::default();
    let factory = instance(&config(&[rule("per-ip", "ip", 2, "")], ""), &env);
    let mut flow = factory.new_flow();
    let mut event = |event| step(&mut *flow, event, &mut env, &chunked, &upstream).0;
    assert_eq!(event(Event::RequestHeaders { end_of_stream: false }), Step::Continue);
    assert_eq!(event(Event::RequestBody { buffered: 2, end_of_stream: false }), Step::Continue);
    assert_eq!(event(Event::RequestTrailers), Step::Continue);
}

/// A bridge that always answers `answer`.
fn answering(status: Option<u16>, body: &str) -> MemoryEnv {
    let body = body.as_bytes().to_vec();
    MemoryEnv { redis: Some(Box::new(move |_| CallAnswer { status, body: body.clone() })), ..MemoryEnv::default() }
}

/// A fresh environment with its bridge.
type MakeEnv = fn() -> MemoryEnv;

#[test]
fn redis_failures_follow_the_failure_mode() {
    let failures: Vec<(&str, MakeEnv, &str)> = vec![
        ("dispatch fails", MemoryEnv::default, "state store unreachable: dispatch failed"),
        ("bridge 504", || answering(Some(504), ""), "state store unreachable: bridge answered HTTP 504"),
        ("no answer", || answering(None, ""), "state store unreachable: no answer (timeout or connection failure)"),
        (
            "redis error",
            || answering(Some(200), r#"{"EVAL":[false,"ERR firebreak: foreign rate-limit record"]}"#),
            "state store error: ERR firebreak: foreign rate-limit record",
        ),
        (
            "wrong count",
            || answering(Some(200), r#"{"EVAL":[1,0,5]}"#),
            "state store answered something unreadable: 3 values for 1 keys",
        ),
        (
            "not JSON",
            || answering(Some(200), "<html>"),
            "state store answered something unreadable: expected value at line 1 column 1",
        ),
    ];
    for (name, env, error) in &failures {
        let context = format!("instance=rl method=GET path=\"/v1/a\" store_error={error:?}");
        // Closed: refused, 503 state_unavailable.
        let mut closed = env();
        let factory = instance(&config(&[rule("per-ip", "ip", 2, "")], &redis_state("closed")), &closed);
        let outcome = send(&factory, &mut closed, &get("/v1/a"));
        let rejection = outcome.reply.as_ref().unwrap();
        assert_eq!((rejection.status, rejection.code), (503, "state_unavailable"), "{name}");
        assert_eq!(
            counters(&outcome),
            ["redis.calls", "redis.failed", "rejected.state_unavailable", "rule.per-ip.error.state_unavailable"],
            "{name}"
        );
        assert_eq!(outcome.logs.len(), 1, "{name}");
        let (level, line) = &outcome.logs[0];
        assert_eq!(*level, Level::Warn, "{name}");
        assert!(
            line.starts_with(&format!(
                "firebreak rate_limit reject status=503 code=state_unavailable {context} rule=per-ip error=state_unavailable msg="
            )),
            "{name}: {line}"
        );

        // Open: passes, counted and logged at error level.
        let mut open = env();
        let factory = instance(&config(&[rule("per-ip", "ip", 2, "")], &redis_state("open")), &open);
        let outcome = send(&factory, &mut open, &get("/v1/a"));
        assert!(outcome.passed(), "{name}");
        assert_eq!(
            counters(&outcome),
            ["allowed", "redis.calls", "redis.failed", "rule.per-ip.error.state_unavailable", "state_unavailable_failed_open"],
            "{name}"
        );
        assert_eq!(
            outcome.logs,
            vec![
                (Level::Error, format!("firebreak rate_limit fail_open rate_limit_unchecked {context}")),
                (
                    Level::Warn,
                    format!("firebreak rate_limit pass_on_error instance=rl rule=per-ip error=state_unavailable {context}")
                ),
            ],
            "{name}"
        );
    }

    // Closed, one rule fails open: the other (a money route) still refuses.
    let mut env = MemoryEnv::default();
    let rules = [rule("reads", "ip", 2, r#","fail_open":true"#), rule("money", "ip", 2, "")];
    let factory = instance(&config(&rules, &redis_state("closed")), &env);
    let outcome = send(&factory, &mut env, &get("/v1/a"));
    assert_eq!(code(&outcome), Some("state_unavailable"));
    assert!(outcome.logs[1].1.contains(" rule=money error=state_unavailable "), "{:?}", outcome.logs);
    // Closed, every rule that applies fails open: passes.
    let mut env = MemoryEnv::default();
    let factory = instance(&config(&[rule("reads", "ip", 2, r#","fail_open":true"#)], &redis_state("closed")), &env);
    let outcome = send(&factory, &mut env, &get("/v1/a"));
    assert!(outcome.passed());
    assert_eq!(outcome.counter(&format!("{PREFIX}state_unavailable_failed_open")), 1);
}

#[test]
fn reconciled_mode_spends_leases_locally() {
    let clock = Rc::new(Cell::new(T0));
    let mut env = with_bridge(&clock);
    let json = config(
        &[rule("per-user", "user", 5, "")],
        &format!("{}{}", redis_state("closed"), r#","reconcile":{"lease_tokens":3,"lease_ms":1000}"#),
    );
    let factory = instance(&json, &env);
    let mut seen = Vec::new();
    for _ in 0..7 {
        let outcome = send_as("alice", &factory, &mut env, &get("/v1/a"));
        seen.push((code(&outcome), outcome.calls.len(), outcome.counter(&format!("{PREFIX}lease.local_decisions"))));
    }
    assert_eq!(
        seen,
        [
            // Takes 3 from Redis, spends 1.
            (None, 1, 0),
            (None, 0, 1),
            (None, 0, 1),
            // Takes the last 2.
            (None, 1, 0),
            (None, 0, 1),
            // Redis refuses; the refusal is kept locally until its Retry-After.
            (Some("rate_limited"), 1, 0),
            (Some("rate_limited"), 0, 1),
        ]
    );
    // The lease command asks for 3 tokens.
    let mut env2 = with_bridge(&clock);
    let factory2 = instance(&json, &env2);
    let outcome = send_as("bob", &factory2, &mut env2, &get("/v1/a"));
    assert!(String::from_utf8(outcome.calls[0].clone()).unwrap().ends_with("/1/3/3600000000/18000000000"));
}

#[test]
fn the_factory_defines_every_counter_and_binds_the_tables() {
    let env = MemoryEnv::default();
    let local = instance(&config(&[rule("a", "ip", 2, ""), rule("b", "user", 2, "")], ""), &env);
    assert_eq!(local.meter(), Meter::new("rate_limit", "firebreak.rate_limit.rl"));
    assert_eq!(
        local.counters(),
        [
            "allowed",
            "rejected.rate_limited",
            "rule.a.allowed",
            "rule.a.limited",
            "rule.a.would_limit",
            "rule.a.error.no_user",
            "rule.a.error.no_client_ip",
            "rule.a.error.store_full",
            "rule.a.error.store_unavailable",
            "rule.a.error.state_unavailable",
            "rule.b.allowed",
            "rule.b.limited",
            "rule.b.would_limit",
            "rule.b.error.no_user",
            "rule.b.error.no_client_ip",
            "rule.b.error.store_full",
            "rule.b.error.store_unavailable",
            "rule.b.error.state_unavailable"
        ]
    );
    assert!(local.configured().is_empty());
    let redis = instance(&config(&[rule("a", "ip", 2, "")], &redis_state("closed")), &env);
    assert_eq!(
        redis.counters()[2..6],
        ["redis.calls", "redis.failed", "state_unavailable_failed_open", "rejected.state_unavailable"]
    );
    assert!(!redis.counters().contains(&"lease.local_decisions".to_string()));
    let reconciled = instance(
        &config(
            &[rule("a", "ip", 2, "")],
            &format!("{}{}", redis_state("closed"), r#","reconcile":{"lease_tokens":3,"lease_ms":1000}"#),
        ),
        &env,
    );
    assert_eq!(reconciled.counters()[6], "lease.local_decisions");

    // The table is bound to the shared data: the same instance with another geometry is refused
    // (its budgets would move to other buckets), a configuration error at `table`.
    let other = config(&[rule("a", "ip", 2, "")], r#","table":{"buckets":8}"#);
    let setup = Setup { env: &|_| None, store: &env.store, entropy: [9; 32] };
    let error = configure("rate_limit", other.as_bytes(), &setup).err().unwrap();
    assert_eq!(error.field, "table.buckets");
    // A configuration error names its field.
    let error = configure("rate_limit", br#"{"name":"rl","rules":[]}"#, &setup).err().unwrap();
    assert_eq!(error.field, "rules");
    // A budget spent through one flow is seen by the next (one table per instance).
    let mut env = MemoryEnv::default();
    let factory = instance(&config(&[rule("a", "ip", 1, "")], ""), &env);
    assert!(send(&factory, &mut env, &get("/v1/a")).passed());
    assert_eq!(code(&send(&factory, &mut env, &get("/v1/a"))), Some("rate_limited"));
}
