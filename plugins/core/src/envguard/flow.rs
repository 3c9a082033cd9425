//! env-guard's flow: when it reads the headers, whether it holds the body, and how a finding
//! becomes a reply, with its counters and log lines. The decisions it calls are in
//! [`super::request`]; the proxy-wasm adapter (`plugins/filters/src/env_guard.rs`) only applies
//! the [`Output`]s.
//!
//! One request, top to bottom:
//! 1. Headers. In a production environment everything passes (`passed_production`). Otherwise:
//!    a request outside `routes` passes (`passed_unguarded`); a path that is not canonical is
//!    refused; the headers (path, query, host, every header) are inspected; a `content-length`
//!    over `max_body_bytes` goes to `over_limit` at once; a request without a body passes.
//!    Otherwise the flow continues and waits for the body (pausing the headers would stop the
//!    body from ever reaching the filter: Envoy turns it into `StopAllIteration`).
//! 2. Body chunks are held until the last one; a body over `max_body_bytes` goes to
//!    `over_limit`; the whole body is then inspected.
//! 3. Trailers end the body: they are inspected, then the body buffered so far.

use std::rc::Rc;

use crate::flow::{Event, Flow, Level, Output, Record, Reply, Request, Step};
use crate::route::{not_canonical_rejection, split_path, Scope};

use super::request::{check_body, check_headers, check_trailers, over_limit, BodyOutcome, BodyPlan, GuardError, Place};
use super::GuardPolicy;

/// The log lines' plugin name.
pub const PLUGIN: &str = "env_guard";

/// Counters defined up front (shown as 0 before the first request).
pub const COUNTERS: &[&str] = &["passed", "passed_unguarded", "passed_production", "passed_uninspected_over_limit"];

/// The log lines of a configuration that was accepted.
pub fn configured(policy: &GuardPolicy) -> Vec<(Level, String)> {
    let mode = if policy.production { "pass-through" } else { "blocking" };
    let mut lines = vec![(
        Level::Info,
        format!("firebreak {PLUGIN} environment={} production={} mode={mode}", policy.environment, policy.production),
    )];
    if !policy.production && !policy.detector.lengths_known() {
        // Correct but slower: every candidate of every length is hashed.
        lines.push((
            Level::Warn,
            format!(
                "firebreak {PLUGIN} protected_credentials without `length`: every value is hashed; add the length `firebreak fingerprint --label` prints"
            ),
        ));
    }
    lines
}

/// env-guard's flow for one request.
pub struct GuardFlow {
    policy: Rc<GuardPolicy>,
    /// Headers clean, body still to inspect.
    pending: Option<Pending>,
}

struct Pending {
    plan: BodyPlan,
    /// `method=.. path=..` for the log line of a refusal of the body.
    context: String,
}

impl GuardFlow {
    pub fn new(policy: Rc<GuardPolicy>) -> Self {
        GuardFlow { policy, pending: None }
    }
}

impl Flow for GuardFlow {
    fn on_event(&mut self, event: Event, request: &mut dyn Request) -> Output {
        let mut records = Vec::new();
        let step = match event {
            Event::RequestHeaders { end_of_stream } => self.headers(request, end_of_stream, &mut records),
            Event::RequestBody { buffered, end_of_stream } => self.body(request, buffered, end_of_stream, &mut records),
            Event::RequestTrailers => self.trailers(request, &mut records),
        };
        Output { records, step }
    }
}

impl GuardFlow {
    fn headers(&mut self, request: &mut dyn Request, end_of_stream: bool, records: &mut Vec<Record>) -> Step {
        if self.policy.production {
            // A production environment is where production credentials belong.
            records.push(Record::CountPassed("passed_production"));
            return Step::Continue;
        }
        let Ok(headers) = request.headers() else {
            return self.reject(&GuardError::Unreadable("request headers (not UTF-8)"), "", records);
        };
        let method = header(&headers, ":method").unwrap_or("");
        let path = split_path(header(&headers, ":path").unwrap_or("")).0;
        let scope = self.policy.guards(method, path);
        if !scope.applies() {
            records.push(Record::CountPassed("passed_unguarded"));
            return Step::Continue;
        }
        if scope == Scope::NotCanonical {
            let context = format!("environment={} method={method}", self.policy.environment);
            return Step::Reply(Reply { rejection: not_canonical_rejection(), level: Level::Warn, context });
        }
        let plan = match check_headers(&self.policy, &headers) {
            Ok(plan) => plan,
            Err(error) => {
                // Never log a path that carries the credential.
                let context = match &error {
                    GuardError::Credential { place: Place::Path, .. } => format!("method={method}"),
                    _ => format!("method={method} path={path:?}"),
                };
                return self.reject(&error, &context, records);
            }
        };
        let context = format!("method={method} path={path:?}");
        if plan.headers_uninspected {
            // `over_limit: pass` and the header decodings exceeded `max_decoded_bytes`.
            self.outcome(BodyOutcome::Uninspected, records);
        }
        if let Some(length) = header(&headers, "content-length") {
            match length.trim().parse::<u64>() {
                Ok(n) if n > self.policy.max_body_bytes.get() as u64 => return self.over_limit(&context, records),
                Ok(_) => {}
                Err(_) => return self.reject(&GuardError::Unreadable("content-length"), &context, records),
            }
        }
        if end_of_stream {
            return self.outcome(BodyOutcome::Clean, records);
        }
        // A paused header callback would stop the body from ever reaching this filter (Envoy
        // turns it into StopAllIteration): continue here and hold the body until it is complete.
        self.pending = Some(Pending { plan, context });
        Step::Continue
    }

    fn body(&mut self, request: &mut dyn Request, buffered: usize, end_of_stream: bool, records: &mut Vec<Record>) -> Step {
        let Some(pending) = self.pending.take() else { return Step::Continue };
        if buffered > self.policy.max_body_bytes.get() {
            return self.over_limit(&pending.context, records);
        }
        if !end_of_stream {
            self.pending = Some(pending);
            return Step::Hold;
        }
        self.finish_body(request, pending, buffered, records)
    }

    fn trailers(&mut self, request: &mut dyn Request, records: &mut Vec<Record>) -> Step {
        // Trailers end the body: inspect them, then what was buffered.
        let Some(pending) = self.pending.take() else { return Step::Continue };
        match request.trailers() {
            Ok(trailers) => {
                if let Err(error) = check_trailers(&self.policy, &trailers) {
                    return self.reject(&error, &pending.context, records);
                }
            }
            Err(_) => return self.reject(&GuardError::Unreadable("request trailers"), &pending.context, records),
        }
        let size = self.policy.max_body_bytes.get().saturating_add(1);
        self.finish_body(request, pending, size, records)
    }

    fn finish_body(&mut self, request: &mut dyn Request, pending: Pending, size: usize, records: &mut Vec<Record>) -> Step {
        match request.body(size) {
            Ok(body) => match check_body(&self.policy, &pending.plan, &body) {
                Ok(outcome) => self.outcome(outcome, records),
                Err(error) => self.reject(&error, &pending.context, records),
            },
            Err(_) => self.reject(&GuardError::Unreadable("request body"), &pending.context, records),
        }
    }

    /// A body over `max_body_bytes`: `over_limit` refuses it or lets it through uninspected.
    fn over_limit(&mut self, context: &str, records: &mut Vec<Record>) -> Step {
        match over_limit(&self.policy) {
            Ok(outcome) => self.outcome(outcome, records),
            Err(error) => self.reject(&error, context, records),
        }
    }

    fn outcome(&mut self, outcome: BodyOutcome, records: &mut Vec<Record>) -> Step {
        match outcome {
            BodyOutcome::Clean => records.push(Record::CountPassed("passed")),
            BodyOutcome::Uninspected => {
                records.push(Record::Count("passed_uninspected_over_limit".to_string()));
                let environment = &self.policy.environment;
                let line = format!("firebreak {PLUGIN} pass_uninspected reason=over_limit environment={environment}");
                records.push(Record::Log(Level::Warn, line));
            }
        }
        Step::Continue
    }

    fn reject(&mut self, error: &GuardError, context: &str, records: &mut Vec<Record>) -> Step {
        self.pending = None;
        if let Some(counter) = error.detection_counter() {
            records.push(Record::Count(counter));
        }
        let rejection = error.rejection(&self.policy.environment);
        let context = format!("environment={} {context} {}", self.policy.environment, error.log_context());
        // Error level: a production credential in a test environment is an incident.
        let level = match error {
            GuardError::Credential { .. } | GuardError::ProductionHost { .. } => Level::Error,
            _ => Level::Warn,
        };
        Step::Reply(Reply { rejection, level, context: context.trim_end().to_string() })
    }
}

/// First value of a header.
fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}
