//! Running a scenario file in the test host: the requests its cases send, and their verdicts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context as _, Result};
use base64::Engine as _;

use super::report::{host_log_lines, outcome, CaseResult, Observed, Outcome};
use super::schema::{CalloutSpec, HeaderValue, RequestSpec, ScenarioFile, SignSpec, UpstreamSpec};
use crate::chain::Chain;
use crate::host::{Host, Module, StartError};
use crate::http::{Request, Verdict};

/// The request with the case's own upstream answer, if it has one.
pub fn answered_by(request: Request, upstream: Option<&UpstreamSpec>) -> Result<Request> {
    Ok(match upstream {
        Some(u) => request.answered_by(u.to_upstream()?),
        None => request,
    })
}

/// The request with the case's own callout answers (cluster → answer), if it has any.
pub fn with_callouts(mut request: Request, callouts: &BTreeMap<String, CalloutSpec>) -> Result<Request> {
    for (cluster, spec) in callouts {
        request = request.callout(cluster, spec.reply()?);
    }
    Ok(request)
}

/// Builds the request a case sends; `now_secs` is the clock signatures are created against.
pub fn build_request(spec: &RequestSpec, sign: Option<&SignSpec>, now_secs: u64) -> Result<Request> {
    let mut r = Request::new(&spec.method, &spec.path).set_header(":authority", &spec.authority);
    for (k, v) in spec.headers.pairs() {
        r = r.header(&k, &v);
    }
    if !spec.chunks.is_empty() {
        r = r.chunks(spec.chunks.iter());
    } else if let Some(n) = spec.body_bytes {
        r = r.body(vec![b'x'; n]);
    } else if let Some(b) = &spec.body_base64 {
        r = r.body(
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .context("request.body_base64 is not base64")?,
        );
    } else if let Some(b) = &spec.body {
        r = r.body(b);
    }
    for (k, v) in spec.trailers.pairs() {
        r = r.trailer(&k, &v);
    }
    r.disconnect = spec.disconnect;
    if let Some(s) = &spec.source {
        r = r.from(s);
    }
    for (k, v) in spec.properties.pairs() {
        r = r.property(&k, v);
    }
    if let Some(sign) = sign {
        for (k, v) in sign_headers(spec, sign, &r, now_secs)? {
            r = r.set_header(&k, &v);
        }
    }
    Ok(r)
}

fn sign_headers(spec: &RequestSpec, sign: &SignSpec, r: &Request, now_secs: u64) -> Result<Vec<(String, String)>> {
    use firebreak_core::signature::sign::{sign as sign_request, SignRequest};
    let secret = base64::engine::general_purpose::STANDARD
        .decode(&sign.secret_b64)
        .context("sign.secret_b64 is not base64")?;
    let body = match &sign.body_override {
        Some(b) => b.clone().into_bytes(),
        None => r.body_bytes(),
    };
    let headers: Vec<(String, String)> = r.headers.iter().filter(|(k, _)| !k.starts_with(':')).cloned().collect();
    let created = (now_secs as i64 + sign.created_offset).max(0) as u64;
    let request = SignRequest {
        method: sign.method.as_deref().unwrap_or(&spec.method),
        scheme: "http",
        authority: &spec.authority,
        path_and_query: sign.path.as_deref().unwrap_or(&spec.path),
        headers: &headers,
        body: &body,
        key_id: &sign.key_id,
        secret: &secret,
        created,
        expires: sign.expires_offset.map(|o| (now_secs as i64 + o).max(0) as u64),
        nonce: sign.nonce.as_deref(),
        label: &sign.label,
        components: sign.components.clone(),
        extra_covered_headers: &sign.extra_covered_headers,
    };
    let signed = sign_request(&request).map_err(|e| anyhow!("signing: {e}"))?;
    let mut pairs = signed.pairs();
    if sign.tamper {
        for (k, v) in pairs.iter_mut() {
            if k == "signature" {
                // Flip one base64 character inside the :...: byte sequence.
                if let Some(i) = v.find(':') {
                    let c = v.as_bytes()[i + 1];
                    let flipped = if c == b'A' { 'B' } else { 'A' };
                    v.replace_range(i + 1..i + 2, &flipped.to_string());
                }
            }
        }
    }
    Ok(pairs)
}

/// Modules compiled once per run, keyed by path (owned by the caller: no global state).
#[derive(Default)]
pub struct ModuleCache {
    modules: BTreeMap<PathBuf, Arc<Module>>,
}

impl ModuleCache {
    pub fn get(&mut self, path: &Path) -> Result<Arc<Module>> {
        if let Some(m) = self.modules.get(path) {
            return Ok(m.clone());
        }
        let m = Module::load(path)?;
        self.modules.insert(path.to_path_buf(), m.clone());
        Ok(m)
    }
}

/// One plugin, or a chain of them, behind the same calls.
enum Target {
    Single(Box<Host>),
    Chain(Chain),
}

impl Target {
    fn advance(&mut self, by: Duration) {
        match self {
            Target::Single(h) => h.advance(by),
            Target::Chain(c) => c.advance(by),
        }
    }
    fn now_nanos(&self) -> u64 {
        match self {
            Target::Single(h) => h.now_nanos(),
            Target::Chain(c) => c.now_nanos(),
        }
    }
    fn root_logs(&self) -> Vec<Vec<String>> {
        match self {
            Target::Single(h) => h.all_root_logs(),
            Target::Chain(c) => c.all_root_logs(),
        }
    }
    /// Root-context lines logged since `seen` (lines per VM), and the new counts.
    fn root_logs_since(&self, seen: &[usize]) -> (Vec<String>, Vec<usize>) {
        let all = self.root_logs();
        let counts = all.iter().map(Vec::len).collect();
        let new = all
            .into_iter()
            .enumerate()
            .flat_map(|(i, l)| l.into_iter().skip(seen.get(i).copied().unwrap_or(0)))
            .collect();
        (new, counts)
    }
    fn send_on(&mut self, worker: usize, request: Request) -> Verdict {
        match self {
            Target::Single(h) => h
                .run_on(worker, request)
                .unwrap_or_else(|e| Verdict { violations: vec![e.to_string()], ..Verdict::default() }),
            Target::Chain(c) => c.send_on(worker, request),
        }
    }
    fn race(&mut self, requests: Vec<(usize, Request)>, schedule: &[usize]) -> Option<Vec<Verdict>> {
        // Both run every worker on its own thread under the schedule.
        match self {
            Target::Single(h) => Some(h.race(requests, schedule)),
            Target::Chain(c) => Some(c.race(requests, schedule)),
        }
    }
}

/// Runs a scenario file in the test host: `modules` in chain order (one for a single filter).
pub fn run_host(file: &Path, scenario: &ScenarioFile, modules: Vec<Arc<Module>>) -> Vec<CaseResult> {
    let fname = file.display().to_string();
    let row = |case: &str, outcome: Outcome, observed: Option<Observed>| CaseResult {
        file: fname.clone(),
        case: case.to_string(),
        outcome,
        observed,
    };
    let mut specs = Vec::new();
    for plugin in scenario.plugins() {
        match scenario.plugin_spec_for(plugin) {
            Ok(s) => specs.push(s),
            Err(e) => return vec![row("(scenario)", Outcome::Fail(vec![format!("{e:#}")]), None)],
        }
    }
    let started = if scenario.chain.is_empty() {
        let module = modules.into_iter().next();
        let spec = specs.into_iter().next();
        match (module, spec) {
            (Some(m), Some(s)) => Host::start(m, s).map(|h| Target::Single(Box::new(h))),
            _ => return vec![row("(scenario)", Outcome::Fail(vec!["no module".into()]), None)],
        }
    } else {
        let upstream = match scenario.upstream_reply() {
            Ok(u) => u,
            Err(e) => return vec![row("(scenario)", Outcome::Fail(vec![format!("{e:#}")]), None)],
        };
        Chain::start(modules.into_iter().zip(specs).collect(), upstream)
            .map(Target::Chain)
            .map_err(|(_, e)| e)
    };
    let mut host = match started {
        Ok(h) if scenario.expects_start_failure() => {
            drop(h);
            return vec![row("plugin refuses to start", Outcome::Fail(vec!["plugin started".into()]), None)];
        }
        Ok(h) => h,
        Err(StartError::ConfigureFailed { .. } | StartError::VmStartFailed) if scenario.expects_start_failure() => {
            return vec![row("plugin refuses to start", Outcome::Pass, None)];
        }
        Err(e) => return vec![row("plugin start", Outcome::Fail(vec![e.to_string()]), None)],
    };
    let mut out = Vec::new();
    // Root-context log lines already reported (none: the first case sees the plugin's start).
    let mut seen_logs: Vec<usize> = Vec::new();
    for case in &scenario.cases {
        if case.advance_ms > 0 {
            host.advance(Duration::from_millis(case.advance_ms));
        }
        let now_secs = host.now_nanos() / 1_000_000_000;
        if let Some(race) = &case.race {
            let mut requests = Vec::new();
            for r in &race.requests {
                match build_request(&r.request, r.sign.as_ref(), now_secs).and_then(|q| answered_by(q, r.upstream.as_ref())) {
                    Ok(req) => requests.push((r.worker, req)),
                    Err(e) => {
                        out.push(row(&case.name, Outcome::Fail(vec![format!("{e:#}")]), None));
                        continue;
                    }
                }
            }
            let Some(verdicts) = host.race(requests, &race.schedule) else {
                out.push(row(&case.name, Outcome::Fail(vec!["race is not supported in a chain".into()]), None));
                continue;
            };
            let mut problems = Vec::new();
            for (i, (v, r)) in verdicts.iter().zip(&race.requests).enumerate() {
                for p in Observed::from_verdict(v).check(&r.expect) {
                    problems.push(format!("request {i} (worker {}): {p}", r.worker));
                }
            }
            out.push(row(&case.name, outcome(problems), None));
            continue;
        }
        let Some(spec) = &case.request else {
            // No request (a root-only module, or the clock moving): the logs, ticks included.
            let (lines, counts) = host.root_logs_since(&seen_logs);
            seen_logs = counts;
            let observed = Observed { logs: Some(host_log_lines(&lines)), ..Observed::default() };
            out.push(row(&case.name, outcome(observed.check_effects(&case.expect)), None));
            continue;
        };
        let request = match build_request(spec, case.sign.as_ref(), now_secs)
            .and_then(|q| answered_by(q, case.upstream.as_ref()))
            .and_then(|q| with_callouts(q, &case.callouts))
        {
            Ok(r) => r,
            Err(e) => {
                out.push(row(&case.name, Outcome::Fail(vec![format!("{e:#}")]), None));
                continue;
            }
        };
        if case.worker >= scenario.workers.max(1) {
            out.push(row(&case.name, Outcome::Fail(vec![format!("no worker {}", case.worker)]), None));
            continue;
        }
        let verdict = host.send_on(case.worker, request);
        let mut observed = Observed::from_verdict(&verdict);
        // Root-context lines (ticks, queue deliveries, a callout's root) come before the stream's.
        let (lines, counts) = host.root_logs_since(&seen_logs);
        seen_logs = counts;
        if let Some(logs) = observed.logs.as_mut() {
            logs.splice(0..0, host_log_lines(&lines));
        }
        let mut problems = observed.check(&case.expect);
        for v in &verdict.violations {
            problems.push(format!("strict: {v}"));
        }
        if verdict.stalled {
            // Say why: a gRPC callout whose cluster has no `grpc:` answer is never answered.
            let answers = scenario.case_callouts(case);
            for c in verdict.callouts.iter().filter(|c| c.grpc_method.is_some()) {
                if !matches!(answers.get(&c.cluster), Some(CalloutSpec::Grpc { .. })) {
                    problems.push(format!(
                        "stalled: the gRPC callout to {:?} ({}) has no `grpc:` answer, so nothing answers it",
                        c.cluster,
                        c.grpc_method.as_deref().unwrap_or_default()
                    ));
                }
            }
        }
        if let Some(t) = &verdict.trap {
            // Envoy's answer to a stream on a failed VM: 503, or to a gRPC request grpc-status 14.
            let fail_stream = case.expect.status == Some(503)
                || matches!(case.expect.response_headers.get("grpc-status"), Some(Some(HeaderValue::One(v))) if v == "14");
            if !fail_stream && case.expect.trap.is_none() {
                problems.push(format!("trap: {t}"));
            }
        }
        out.push(row(&case.name, outcome(problems), Some(observed)));
    }
    out
}
