//! env-guard's flow: when it reads the headers, whether it holds the body, and how a finding
//! becomes a reply, with its counters and log lines. The decisions it calls are in
//! [`super::request`]; a host only applies the [`Step`]s.
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

use std::sync::Arc;

use crate::flow::{header, read_request_body, refuse, Event, Flow, FlowFactory, Host, Level, Meter, RequestContext, Step};
use crate::route::{not_canonical_rejection, split_path, Scope};
use crate::{Mode, Rejection};

use super::request::{check_body, check_headers, check_trailers, over_limit, BodyOutcome, BodyPlan, GuardError, Place};
use super::GuardPolicy;

/// The log lines' plugin name.
pub const PLUGIN: &str = "env_guard";

/// Counters defined up front (shown as 0 before the first request).
pub const COUNTERS: &[&str] = &["passed", "passed_unguarded", "passed_production", "passed_uninspected_over_limit"];

/// The log lines of a configuration that was accepted.
pub fn configured(policy: &GuardPolicy) -> Vec<(Level, String)> {
    let mode = match (policy.production, policy.mode) {
        (true, _) => "pass-through",
        (false, Mode::Enforce) => "blocking",
        (false, Mode::ReportOnly) => "report_only",
    };
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

/// Where env-guard's counters and log lines go.
pub fn meter() -> Meter {
    Meter::new(PLUGIN, "firebreak.env_guard")
}

/// env-guard's flow for one request.
pub struct GuardFlow {
    policy: Arc<GuardPolicy>,
    meter: Meter,
    /// Headers clean, body still to inspect.
    pending: Option<Pending>,
}

struct Pending {
    plan: BodyPlan,
    /// `method=.. path=".."`, read with the headers: the headers continued, and a wasm host
    /// (Envoy) no longer hands them out at the body's events.
    context: String,
}

impl GuardFlow {
    pub fn new(policy: Arc<GuardPolicy>) -> Self {
        GuardFlow { policy, meter: meter(), pending: None }
    }
}

impl Flow for GuardFlow {
    fn on_event(&mut self, event: Event, host: &mut dyn Host) -> Step {
        match event {
            Event::RequestHeaders { end_of_stream } => self.headers(host, end_of_stream),
            Event::RequestBody { buffered, end_of_stream } => self.body(host, buffered, end_of_stream),
            Event::RequestTrailers => self.trailers(host),
            _ => Step::Continue,
        }
    }
}

impl GuardFlow {
    fn headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> Step {
        if self.policy.production {
            // A production environment is where production credentials belong.
            host.count_passed(&self.meter, "passed_production");
            return Step::Continue;
        }
        let Ok(headers) = host.request_headers() else {
            return self.reject(&GuardError::Unreadable("request headers (not UTF-8)"), "", host);
        };
        let method = header(&headers, ":method").unwrap_or("");
        let path = split_path(header(&headers, ":path").unwrap_or("")).0;
        let scope = self.policy.guards(method, path);
        if !scope.applies() {
            host.count_passed(&self.meter, "passed_unguarded");
            return Step::Continue;
        }
        if scope == Scope::NotCanonical {
            let context = format!("environment={} method={method}", self.policy.environment);
            return self.refuse(host, Level::Warn, not_canonical_rejection(), &context);
        }
        let plan = match check_headers(&self.policy, &headers) {
            Ok(plan) => plan,
            Err(error) => {
                // Never log a path that carries the credential.
                let context = match &error {
                    GuardError::Credential { place: Place::Path, .. } => format!("method={method}"),
                    _ => format!("method={method} path={path:?}"),
                };
                return self.reject(&error, &context, host);
            }
        };
        let context = || RequestContext { method, path }.to_string();
        if plan.headers_uninspected {
            // `over_limit: pass` and the header decodings exceeded `max_decoded_bytes`.
            self.outcome(BodyOutcome::Uninspected, host);
        }
        if let Some(length) = header(&headers, "content-length") {
            match length.trim().parse::<u64>() {
                Ok(n) if n > self.policy.max_body_bytes.get() as u64 => return self.over_limit(&context(), host),
                Ok(_) => {}
                Err(_) => return self.reject(&GuardError::Unreadable("content-length"), &context(), host),
            }
        }
        if end_of_stream {
            return self.outcome(BodyOutcome::Clean, host);
        }
        // A paused header callback would stop the body from ever reaching this filter (Envoy
        // turns it into StopAllIteration): continue here and hold the body until it is complete.
        self.pending = Some(Pending { plan, context: context() });
        Step::Continue
    }

    fn body(&mut self, host: &mut dyn Host, buffered: usize, end_of_stream: bool) -> Step {
        let Some(pending) = self.pending.take() else { return Step::Continue };
        if buffered > self.policy.max_body_bytes.get() {
            return self.over_limit(&pending.context, host);
        }
        if !end_of_stream {
            self.pending = Some(pending);
            return Step::Hold;
        }
        self.finish_body(host, pending, buffered)
    }

    fn trailers(&mut self, host: &mut dyn Host) -> Step {
        // Trailers end the body: inspect them, then what was buffered.
        let Some(pending) = self.pending.take() else { return Step::Continue };
        match host.request_trailers() {
            Ok(trailers) => {
                if let Err(error) = check_trailers(&self.policy, &trailers) {
                    return self.reject(&error, &pending.context, host);
                }
            }
            Err(_) => return self.reject(&GuardError::Unreadable("request trailers"), &pending.context, host),
        }
        let size = self.policy.max_body_bytes.get().saturating_add(1);
        self.finish_body(host, pending, size)
    }

    fn finish_body(&mut self, host: &mut dyn Host, pending: Pending, size: usize) -> Step {
        let policy = &self.policy;
        match read_request_body(host, size, |body| check_body(policy, &pending.plan, body)) {
            Ok(Ok(outcome)) => self.outcome(outcome, host),
            Ok(Err(error)) => self.reject(&error, &pending.context, host),
            Err(_) => self.reject(&GuardError::Unreadable("request body"), &pending.context, host),
        }
    }

    /// A body over `max_body_bytes`: `over_limit` refuses it or lets it through uninspected.
    fn over_limit(&mut self, context: &str, host: &mut dyn Host) -> Step {
        match over_limit(&self.policy) {
            Ok(outcome) => self.outcome(outcome, host),
            Err(error) => self.reject(&error, context, host),
        }
    }

    fn outcome(&mut self, outcome: BodyOutcome, host: &mut dyn Host) -> Step {
        match outcome {
            BodyOutcome::Clean => host.count_passed(&self.meter, "passed"),
            BodyOutcome::Uninspected => {
                host.count(&self.meter, "passed_uninspected_over_limit");
                let environment = &self.policy.environment;
                let line = format!("firebreak {PLUGIN} pass_uninspected reason=over_limit environment={environment}");
                host.log(Level::Warn, &line);
            }
        }
        Step::Continue
    }

    fn reject(&mut self, error: &GuardError, context: &str, host: &mut dyn Host) -> Step {
        self.pending = None;
        if let Some(counter) = error.detection_counter() {
            host.count(&self.meter, &counter);
        }
        let rejection = error.rejection(&self.policy.environment);
        let context = format!("environment={} {context} {}", self.policy.environment, error.log_context());
        // Error level: a production credential in a test environment is an incident.
        let level = match error {
            GuardError::Credential { .. } | GuardError::ProductionHost { .. } => Level::Error,
            _ => Level::Warn,
        };
        self.refuse(host, level, rejection, context.trim_end())
    }

    /// Refuses in enforce mode. In report-only mode the finding is counted
    /// (`would_reject.<code>`) and logged and the request goes on unmodified; nothing more of it
    /// is inspected (enforce mode would have stopped here too).
    fn refuse(&mut self, host: &mut dyn Host, level: Level, rejection: Rejection, context: &str) -> Step {
        self.pending = None;
        refuse(host, &self.meter, self.policy.mode, level, rejection, context).unwrap_or(Step::Continue)
    }
}

/// env-guard, configured.
pub struct GuardFactory {
    pub policy: Arc<GuardPolicy>,
}

impl FlowFactory for GuardFactory {
    fn new_flow(&self) -> Box<dyn Flow> {
        Box::new(GuardFlow::new(self.policy.clone()))
    }

    fn meter(&self) -> Meter {
        meter()
    }

    /// With `detected.<label>.<place>` for every label and place, and the production host's.
    fn counters(&self) -> Vec<String> {
        let mut names: Vec<String> = COUNTERS.iter().map(|name| name.to_string()).collect();
        for label in self.policy.detector.labels() {
            names.extend(Place::ALL.iter().map(|place| format!("detected.{label}.{}", place.name())));
        }
        names.push("detected.production_host.host".to_string());
        if self.policy.mode == Mode::ReportOnly {
            names.extend(crate::would_reject_counter_names());
        }
        names
    }

    fn configured(&self) -> Vec<(Level, String)> {
        configured(&self.policy)
    }
}

/// Configures env-guard ([`crate::filters::Configure`]).
pub fn configure(json: &[u8], _setup: &crate::filters::Setup<'_>) -> Result<Arc<dyn FlowFactory>, crate::ConfigError> {
    Ok(Arc::new(GuardFactory { policy: Arc::new(GuardPolicy::from_json(json)?) }))
}
