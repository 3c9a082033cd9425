//! env-guard: in a non-production environment, refuses requests that carry a protected production
//! credential (or go to a production-only host). Decisions live in `firebreak_core::envguard`;
//! this file only moves data between Envoy and the core. It works the same on an ingress and on
//! an egress listener.

use std::rc::Rc;

use firebreak_core::envguard::{
    check_body, check_headers, check_trailers, over_limit, BodyOutcome, BodyPlan, GuardError, GuardPolicy, Place,
};
use firebreak_glue::{self as glue, Counters};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

const PLUGIN: &str = "env_guard";

/// A fresh root context of this filter; `on_configure` reads its configuration.
pub fn root() -> Box<dyn RootContext> {
    Box::new(GuardRoot { policy: None, counters: Rc::new(Counters::new("firebreak.env_guard")) })
}

struct GuardRoot {
    policy: Option<Rc<GuardPolicy>>,
    counters: Rc<Counters>,
}

impl Context for GuardRoot {}

impl RootContext for GuardRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        self.policy = glue::load_config(PLUGIN, GuardPolicy::from_json).map(Rc::new);
        self.counters
            .define_all(&["passed", "passed_unguarded", "passed_production", "passed_uninspected_over_limit"]);
        if let Some(policy) = &self.policy {
            glue::log(
                LogLevel::Info,
                &format!(
                    "firebreak {PLUGIN} environment={} production={} mode={}",
                    policy.environment,
                    policy.production,
                    if policy.production { "pass-through" } else { "blocking" }
                ),
            );
            if !policy.production && !policy.detector.lengths_known() {
                // Correct but slower: every candidate of every length is hashed.
                glue::log(
                    LogLevel::Warn,
                    &format!("firebreak {PLUGIN} protected_credentials without `length`: every value is hashed; add the length `firebreak fingerprint --label` prints"),
                );
            }
        }
        self.policy.is_some()
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let policy = self.policy.clone()?;
        Some(Box::new(GuardFilter { policy, counters: self.counters.clone(), pending: None }))
    }
}

struct GuardFilter {
    policy: Rc<GuardPolicy>,
    counters: Rc<Counters>,
    /// Headers clean, body still to inspect.
    pending: Option<Pending>,
}

struct Pending {
    plan: BodyPlan,
    context: String,
}

impl Context for GuardFilter {}

impl GuardFilter {
    fn reject(&mut self, error: &GuardError, context: &str) -> Action {
        self.pending = None;
        if let Some(counter) = error.detection_counter() {
            self.counters.increment(&counter);
        }
        let rejection = error.rejection(&self.policy.environment);
        let context = format!("environment={} {context} {}", self.policy.environment, error.log_context());
        // Error level: a production credential in a test environment is an incident.
        let level = match error {
            GuardError::Credential { .. } | GuardError::ProductionHost { .. } => LogLevel::Error,
            _ => LogLevel::Warn,
        };
        glue::reject_at(level, PLUGIN, &self.counters, &rejection, context.trim_end());
        Action::Pause
    }

    fn outcome(&mut self, outcome: BodyOutcome) -> Action {
        match outcome {
            BodyOutcome::Clean => self.counters.count_passed("passed"),
            BodyOutcome::Uninspected => {
                self.counters.increment("passed_uninspected_over_limit");
                glue::log(
                    LogLevel::Warn,
                    &format!("firebreak {PLUGIN} pass_uninspected reason=over_limit environment={}", self.policy.environment),
                );
            }
        }
        Action::Continue
    }

    fn finish_body(&mut self, pending: Pending, size: usize) -> Action {
        match glue::request_body(size) {
            Ok(body) => match check_body(&self.policy, &pending.plan, &body) {
                Ok(outcome) => self.outcome(outcome),
                Err(error) => self.reject(&error, &pending.context),
            },
            Err(_) => self.reject(&GuardError::Unreadable("request body"), &pending.context),
        }
    }
}

impl HttpContext for GuardFilter {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        if self.policy.production {
            // A production environment is where production credentials belong.
            self.counters.count_passed("passed_production");
            return Action::Continue;
        }
        let headers = match glue::request_headers() {
            Ok(headers) => headers,
            Err(_) => return self.reject(&GuardError::Unreadable("request headers (not UTF-8)"), ""),
        };
        let method = glue::header(&headers, ":method").unwrap_or("");
        let path = firebreak_core::route::split_path(glue::header(&headers, ":path").unwrap_or("")).0;
        let scope = self.policy.guards(method, path);
        if !scope.applies() {
            self.counters.count_passed("passed_unguarded");
            return Action::Continue;
        }
        if scope == firebreak_core::route::Scope::NotCanonical {
            let rejection = firebreak_core::route::not_canonical_rejection();
            let context = format!("environment={} method={method}", self.policy.environment);
            glue::reject(PLUGIN, &self.counters, &rejection, &context);
            return Action::Pause;
        }
        let plan = match check_headers(&self.policy, &headers) {
            Ok(plan) => plan,
            Err(error) => {
                // Never log a path that carries the credential.
                let context = match &error {
                    GuardError::Credential { place: Place::Path, .. } => format!("method={method}"),
                    _ => format!("method={method} path={path:?}"),
                };
                return self.reject(&error, &context);
            }
        };
        let context = format!("method={method} path={path:?}");
        if plan.headers_uninspected {
            // `over_limit: pass` and the header decodings exceeded `max_decoded_bytes`.
            self.outcome(BodyOutcome::Uninspected);
        }
        if let Some(length) = glue::header(&headers, "content-length") {
            match length.trim().parse::<u64>() {
                Ok(n) if n > self.policy.max_body_bytes.get() as u64 => {
                    return match over_limit(&self.policy) {
                        Ok(outcome) => self.outcome(outcome),
                        Err(error) => self.reject(&error, &context),
                    }
                }
                Ok(_) => {}
                Err(_) => return self.reject(&GuardError::Unreadable("content-length"), &context),
            }
        }
        if end_of_stream {
            return self.outcome(BodyOutcome::Clean);
        }
        // A paused header callback would stop the body from ever reaching this filter (Envoy
        // turns it into StopAllIteration): continue here and hold the body until it is complete.
        self.pending = Some(Pending { plan, context });
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(pending) = self.pending.take() else { return Action::Continue };
        if body_size > self.policy.max_body_bytes.get() {
            return match over_limit(&self.policy) {
                Ok(outcome) => self.outcome(outcome),
                Err(error) => self.reject(&error, &pending.context),
            };
        }
        if !end_of_stream {
            self.pending = Some(pending);
            return Action::Pause;
        }
        self.finish_body(pending, body_size)
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        // Trailers end the body: inspect them, then what was buffered.
        let Some(pending) = self.pending.take() else { return Action::Continue };
        match glue::request_trailers() {
            Ok(trailers) => {
                if let Err(error) = check_trailers(&self.policy, &trailers) {
                    return self.reject(&error, &pending.context);
                }
            }
            Err(_) => return self.reject(&GuardError::Unreadable("request trailers"), &pending.context),
        }
        let size = self.policy.max_body_bytes.get().saturating_add(1);
        self.finish_body(pending, size)
    }
}
