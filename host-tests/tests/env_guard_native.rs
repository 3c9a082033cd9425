//! env-guard's flow run natively (no wasm, no Envoy) against the SAME scenario files as the
//! module: `host-tests/scenarios/env-guard*.yaml`, through `firebreak_core::flow::memory`.
//! Each request is the one the test host would send (`build_request`, then what Envoy's
//! connection manager adds); the verdict is checked against the case's `expect`.

use std::rc::Rc;

use firebreak_core::envguard::{GuardFlow, GuardPolicy};
use firebreak_core::flow::memory::{drive, MemoryRequest, Outcome};
use firebreak_host_tests::scenario::{build_request, value_bytes, Expect, RequestSpec, ScenarioFile, UpstreamSpec};
use firebreak_host_tests::{hcm_normalize, workspace_root};

fn scenario_files() -> Vec<std::path::PathBuf> {
    let dir = workspace_root().join("host-tests/scenarios");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            let name = path.file_name().unwrap().to_string_lossy();
            name.starts_with("env-guard") && name.ends_with(".yaml")
        })
        .collect();
    files.sort();
    files
}

/// Runs one request through a fresh flow; the failures found, prefixed with `at`.
fn check(
    at: &str,
    policy: &Rc<GuardPolicy>,
    spec: &RequestSpec,
    upstream: Option<&UpstreamSpec>,
    expect: &Expect,
) -> (Outcome, Vec<String>) {
    let request = hcm_normalize(build_request(spec, None, 0).unwrap(), 1);
    let memory = MemoryRequest {
        headers: request.headers.clone(),
        chunks: request.body_chunks.clone(),
        trailers: if request.trailers.is_empty() { None } else { Some(request.trailers.clone()) },
        source_address: None,
    };
    let outcome = drive(&mut GuardFlow::new(policy.clone()), &memory);
    let mut failures = Vec::new();
    let mut fail = |what: String| failures.push(format!("{at}: {what}"));
    let upstream = upstream.map(|u| u.to_upstream().unwrap());
    let (status, response_body, response_headers): (u16, Vec<u8>, Vec<(String, String)>) = match &outcome.reply {
        Some(reply) => (
            reply.status,
            reply.body(),
            reply.response_headers().into_iter().map(|(n, v)| (n.to_string(), v.to_string())).collect(),
        ),
        None => match &upstream {
            Some(u) => (u.status, u.body.clone(), u.headers.iter().map(|(n, v)| (n.to_ascii_lowercase(), v.clone())).collect()),
            None => (200, Vec::new(), Vec::new()),
        },
    };
    if let Some(want) = expect.status {
        if want != status {
            fail(format!("status {status}, expected {want} ({:?})", outcome.reply));
        }
    }
    if let Some(want) = &expect.error {
        let got = outcome.reply.as_ref().map(|r| r.code.to_string());
        if *want != got {
            fail(format!("error {got:?}, expected {want:?}"));
        }
    }
    if let Some(want) = expect.forwarded {
        if want != outcome.passed() {
            fail(format!("forwarded {}, expected {want}", outcome.passed()));
        }
    }
    let body = String::from_utf8_lossy(&response_body).to_string();
    if let Some(want) = &expect.response_body_contains {
        if !body.contains(want.as_str()) {
            fail(format!("response body {body:?} does not contain {want:?}"));
        }
    }
    if let Some(want) = &expect.response_body {
        if *want != body {
            fail(format!("response body {body:?}, expected {want:?}"));
        }
    }
    for (name, want) in &expect.response_headers {
        let got = response_headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
        if *want != got {
            fail(format!("response header {name} {got:?}, expected {want:?}"));
        }
    }
    if outcome.passed() {
        // env-guard changes neither headers nor trailers: the upstream sees what was sent.
        for (name, want) in &expect.upstream_headers {
            let got = request.header_value(name).map(str::to_string);
            if *want != got {
                fail(format!("upstream header {name} {got:?}, expected {want:?}"));
            }
        }
        for (name, want) in &expect.upstream_trailers {
            let got = request.trailers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
            if *want != got {
                fail(format!("upstream trailer {name} {got:?}, expected {want:?}"));
            }
        }
        if let Some(want) = &expect.upstream_body {
            if want.as_bytes() != outcome.forwarded_body.as_slice() {
                fail(format!("upstream body {:?}, expected {want:?}", String::from_utf8_lossy(&outcome.forwarded_body)));
            }
        }
        if let Some(want) = &expect.upstream_body_base64 {
            use base64::Engine as _;
            let want = base64::engine::general_purpose::STANDARD.decode(want.trim()).unwrap();
            if want != outcome.forwarded_body {
                fail("upstream body differs from upstream_body_base64".to_string());
            }
        }
    }
    (outcome, failures)
}

#[test]
fn env_guard_scenario_files_pass_natively() {
    let mut failures = Vec::new();
    let mut requests = 0;
    for path in scenario_files() {
        let file = ScenarioFile::load(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let bytes = value_bytes(&file.plugin.configuration).unwrap();
        let policy = GuardPolicy::from_json(&bytes);
        if file.expect_start.as_deref() == Some("fail") {
            assert!(policy.is_err(), "{name}: the configuration must be refused");
            continue;
        }
        let policy = Rc::new(policy.unwrap_or_else(|e| panic!("{name}: {e:?}")));
        for case in &file.cases {
            let at = format!("{name} / {}", case.name);
            let upstream = case.upstream.as_ref().or(file.upstream.as_ref());
            if let Some(spec) = &case.request {
                failures.extend(check(&at, &policy, spec, upstream, &case.expect).1);
                requests += 1;
            }
            for (index, race) in case.race.iter().flat_map(|r| r.requests.iter()).enumerate() {
                let upstream = race.upstream.as_ref().or(upstream);
                failures.extend(check(&format!("{at} [{index}]"), &policy, &race.request, upstream, &race.expect).1);
                requests += 1;
            }
        }
    }
    assert!(requests >= 40, "only {requests} requests: are the scenario files there?");
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}
