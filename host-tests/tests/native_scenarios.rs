//! Every scenario file run natively: no wasm, no Envoy. Each filter's flow (or a chain of them)
//! is configured through `firebreak_core::filters`, exactly as the modules configure it, and
//! driven through `firebreak_core::flow::memory`, one exchange per case, with the same requests
//! the test host sends (`build_request`, then what Envoy's connection manager adds) and the same
//! upstream answers (`Upstream::router_answer`). The verdict is checked with the same
//! `Observed::check` as the test host's and Envoy's.
//!
//! What only a proxy-wasm host can show is skipped, by name: host-call budgets (not checked
//! natively), races with a chosen interleaving of shared-data operations, and the test filters
//! (not Firebreak filters).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use firebreak_core::filters::{self, Setup};
use firebreak_core::flow::chain::Chain;
use firebreak_core::flow::memory::{exchange, MemoryEnv, MemoryRequest, MemoryUpstream, Outcome};
use firebreak_core::flow::{Flow, FlowFactory, Level};
use firebreak_core::ConfigError;
use firebreak_host_tests::scenario::{answered_by, build_request, value_bytes, Expect, Observed, ScenarioFile};
use firebreak_host_tests::{hcm_normalize, workspace_root, Request, Upstream, DEFAULT_START_NANOS, VIA_UPSTREAM};

/// The filters of a file, configured: one factory per module, in Envoy's order.
struct Configured {
    stages: Vec<Arc<dyn FlowFactory>>,
}

impl Configured {
    /// Every counter the stages declare at configure time (`<prefix>.<name>`), with the
    /// `rejected.<code>` of every code: all a host that must define its counters up front (the
    /// native module) can count.
    fn declared(&self) -> std::collections::BTreeSet<String> {
        let mut names = std::collections::BTreeSet::new();
        for stage in &self.stages {
            for (meter, counters) in stage.definitions() {
                let rejections = firebreak_core::rejection_counter_names();
                for name in counters.into_iter().chain(rejections) {
                    names.insert(format!("{}.{name}", meter.prefix));
                }
            }
        }
        names
    }

    fn new_flow(&self) -> Box<dyn Flow> {
        match self.stages.as_slice() {
            [one] => one.new_flow(),
            many => Box::new(Chain::new(many.iter().map(|stage| stage.new_flow()).collect())),
        }
    }
}

/// What a module file is: a filter's name, the chain, or (`None`) not a Firebreak filter.
fn module_filter(module: &str) -> Option<&'static str> {
    let stem = Path::new(module).file_stem()?.to_str()?;
    if stem == "firebreak_chain" {
        return Some("chain");
    }
    filters::FILTERS.iter().copied().find(|f| *f == stem)
}

fn configure_module(
    module: &str,
    configuration: &Option<serde_yaml::Value>,
    env: &BTreeMap<String, String>,
    state: &MemoryEnv,
) -> Result<Option<Arc<dyn FlowFactory>>, ConfigError> {
    let Some(filter) = module_filter(module) else { return Ok(None) };
    let json = value_bytes(configuration).map_err(|e| ConfigError::new("", e.to_string()))?;
    let lookup = |name: &str| env.get(name).cloned();
    let setup = Setup { env: &lookup, store: &state.store, entropy: [7; 32] };
    if filter == "chain" {
        return Ok(Some(Arc::new(filters::configure_chain(&json, &setup)?)));
    }
    filters::configure(filter, &json, &setup).map(Some)
}

/// `None`: not a file of Firebreak filters.
fn configure(file: &ScenarioFile, state: &MemoryEnv) -> Result<Option<Configured>, ConfigError> {
    let modules: Vec<(&str, &_)> = if file.chain.is_empty() {
        let Some(module) = &file.module else { return Ok(None) };
        vec![(module.as_str(), &file.plugin)]
    } else {
        file.chain.iter().map(|filter| (filter.module.as_str(), &filter.plugin)).collect()
    };
    let mut stages = Vec::new();
    for (module, plugin) in modules {
        match configure_module(module, &plugin.configuration, &plugin.env, state)? {
            Some(stage) => stages.push(stage),
            None => return Ok(None),
        }
    }
    Ok(Some(Configured { stages }))
}

fn memory_request(request: &Request) -> MemoryRequest {
    let principal = request
        .properties
        .iter()
        .find(|(name, _)| name == "firebreak.principal")
        .map(|(_, value)| String::from_utf8_lossy(value).to_string());
    MemoryRequest {
        headers: request.headers.clone(),
        chunks: request.body_chunks.clone(),
        trailers: if request.trailers.is_empty() { None } else { Some(request.trailers.clone()) },
        source_address: Some(request.source_address.clone()),
        principal,
        disconnect: request.disconnect,
    }
}

/// The answer the flow gets, and how long the router took to give it (the upstream's delay, or
/// the route timeout).
fn memory_upstream(upstream: &Upstream, route_timeout_ms: u64) -> (MemoryUpstream, u64) {
    let answer = upstream.router_answer(route_timeout_ms);
    let status = answer.headers.first().and_then(|(_, v)| v.parse().ok()).unwrap_or(200);
    let memory = MemoryUpstream {
        status,
        headers: answer.headers.iter().filter(|(n, _)| !n.starts_with(':')).cloned().collect(),
        chunks: if answer.body.is_empty() { Vec::new() } else { vec![answer.body.clone()] },
        trailers: None,
        via_upstream: answer.details == VIA_UPSTREAM,
        cut: answer.cut,
    };
    (memory, answer.elapsed_ms)
}

/// What the client and the upstream saw, in the terms the scenario files check.
fn observed(outcome: &Outcome, request: &MemoryRequest, upstream: &MemoryUpstream) -> Observed {
    let (status, response_headers, response_body) = match (&outcome.reply, &outcome.responded) {
        (Some(rejection), _) => (
            rejection.status,
            rejection.response_headers().into_iter().map(|(n, v)| (n.to_string(), v.to_string())).collect(),
            rejection.body(),
        ),
        (None, Some(response)) => (response.status, response.headers.clone(), response.body.clone()),
        // A reset stream, or a client gone before the answer: the client got no response.
        (None, None) if outcome.reset || request.disconnect => (0, Vec::new(), Vec::new()),
        (None, None) => (upstream.status, outcome.client_headers.clone(), outcome.client_body.clone()),
    };
    let error = serde_json::from_slice::<serde_json::Value>(&response_body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string));
    Observed {
        status,
        error,
        forwarded: outcome.forwarded,
        upstream_headers: if outcome.forwarded { outcome.upstream_headers.clone() } else { Vec::new() },
        upstream_body: outcome.forwarded.then(|| outcome.forwarded_body.clone()),
        upstream_trailers: if outcome.forwarded { request.trailers.clone().unwrap_or_default() } else { Vec::new() },
        response_headers,
        response_body,
        // The flow's own lines for this exchange (the filter's start is not one: a `logs:`
        // check on a first case's start lines holds in the test host and in Envoy only).
        logs: Some(outcome.logs.iter().map(|(level, line)| (level_name(*level).to_string(), line.clone())).collect()),
        ..Observed::default()
    }
}

/// A level as the scenario files and the hosts name it.
fn level_name(level: Level) -> &'static str {
    match level {
        Level::Debug => "debug",
        Level::Info => "info",
        Level::Warn => "warn",
        Level::Error => "error",
    }
}

#[derive(Default)]
struct Tally {
    files: usize,
    requests: usize,
    skipped: Vec<String>,
    failures: Vec<String>,
}

fn run_file(path: &Path, tally: &mut Tally) {
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let file = match ScenarioFile::load(path) {
        Ok(file) => file,
        Err(error) => return tally.failures.push(format!("{name}: {error:#}")),
    };
    let mut state = MemoryEnv { now_ms: Some(DEFAULT_START_NANOS / 1_000_000), ..MemoryEnv::default() };
    let configured = match configure(&file, &state) {
        Err(_) if file.expects_start_failure() => {
            tally.files += 1;
            return;
        }
        Err(error) => return tally.failures.push(format!("{name}: configuration refused: {error}")),
        Ok(None) => return tally.skipped.push(format!("{name}: not Firebreak filters")),
        Ok(Some(_)) if file.expects_start_failure() => {
            return tally.failures.push(format!("{name}: the configuration must be refused"));
        }
        Ok(Some(configured)) => configured,
    };
    tally.files += 1;
    let declared = configured.declared();
    let route_timeout_ms = file.route_timeout_ms();
    for (index, case) in file.cases.iter().enumerate() {
        let at = format!("{name} / {}", case.name);
        if let Some(now) = state.now_ms.as_mut() {
            *now += case.advance_ms;
        }
        if case.race.is_some() {
            tally.skipped.push(format!("{at}: a race with a chosen interleaving (proxy-wasm hosts only)"));
            continue;
        }
        let Some(spec) = &case.request else { continue };
        let now_secs = state.now_ms.unwrap_or(0) / 1000;
        let upstream_spec = case.upstream.as_ref().or(file.upstream.as_ref());
        let request = match build_request(spec, case.sign.as_ref(), now_secs).and_then(|r| answered_by(r, upstream_spec)) {
            Ok(request) => hcm_normalize(request, index as u64 + 1),
            Err(error) => {
                tally.failures.push(format!("{at}: {error:#}"));
                continue;
            }
        };
        let (upstream, elapsed_ms) = memory_upstream(&request.upstream.clone().unwrap_or_default(), route_timeout_ms);
        let memory = memory_request(&request);
        let mut flow = configured.new_flow();
        let outcome = exchange(flow.as_mut(), &mut state, &memory, &upstream);
        // The memory host has one clock per exchange; the router's wait moves it on for the
        // next case, as the test host's fake clock and Envoy's real one move during the wait.
        if let Some(now) = state.now_ms.as_mut() {
            *now += elapsed_ms;
        }
        tally.requests += 1;
        let expect = Expect { max_host_calls: None, ..case.expect.clone() };
        for problem in observed(&outcome, &memory, &upstream).check(&expect) {
            tally.failures.push(format!("{at}: {problem}"));
        }
        if outcome.stalled {
            tally.failures.push(format!("{at}: the stream stalled (nothing resumed it)"));
        }
        // A counter not declared at configure time would be lost by the native module (Envoy
        // defines a dynamic module's counters only then).
        for name in outcome.counters.keys().filter(|name| !declared.contains(*name)) {
            tally.failures.push(format!("{at}: counter {name} is not declared by its filter's definitions()"));
        }
    }
}

fn scenario_files() -> Vec<PathBuf> {
    let dir = workspace_root().join("host-tests/scenarios");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_scenario_file_passes_natively() {
    let mut tally = Tally::default();
    for path in scenario_files() {
        run_file(&path, &mut tally);
    }
    println!("native: {} files, {} requests; skipped:\n  {}", tally.files, tally.requests, tally.skipped.join("\n  "));
    assert!(tally.files >= 20, "only {} files ran natively: are the scenario files there?", tally.files);
    assert!(tally.requests >= 180, "only {} requests ran natively", tally.requests);
    assert!(tally.failures.is_empty(), "{} failures:\n{}", tally.failures.len(), tally.failures.join("\n"));
}
