//! rate-limit: GCRA limits per client network, per verified user, or both, with one budget per
//! key shared by every worker of an Envoy (local backend) or by every Envoy instance (Redis
//! backend). Decisions live in `firebreak_core::ratelimit`; this file only moves data between
//! Envoy and the core.

use std::rc::Rc;

use firebreak_core::ratelimit::lease::{self, LeaseStep};
use firebreak_core::ratelimit::redis as remote_rl;
use firebreak_core::ratelimit::{
    self, client, Decision, Event, KeyBy, Plan, Planned, RateLimitPolicy, RequestFacts, RuleError, UserSource,
};
use firebreak_core::remote::{self, Backend, RedisConfig};
use firebreak_core::route::{split_path, Scope};
use firebreak_glue::{self as glue, Counters, HostStore};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MapType};

const PLUGIN: &str = "rate_limit";

/// A fresh root context of this filter; `on_configure` reads its configuration.
pub fn root() -> Box<dyn RootContext> {
    Box::new(RateLimitRoot { policy: None, counters: None })
}

struct RateLimitRoot {
    policy: Option<Rc<RateLimitPolicy>>,
    counters: Option<Rc<Counters>>,
}

impl Context for RateLimitRoot {}

impl RootContext for RateLimitRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(policy) = glue::load_bound_config(PLUGIN, RateLimitPolicy::from_json, RateLimitPolicy::bind_tables) else {
            return false;
        };
        // Each instance counts under its own name: firebreak.rate_limit.<name>.<counter>.
        let counters = Counters::new(format!("firebreak.{PLUGIN}.{}", policy.name));
        let mut names = vec!["allowed".to_string(), "rejected.rate_limited".to_string()];
        if let Backend::Redis(_) = policy.state {
            for name in ["redis.calls", "redis.failed", "state_unavailable_failed_open", "rejected.state_unavailable"] {
                names.push(name.to_string());
            }
            if policy.reconcile.is_some() {
                names.push("lease.local_decisions".to_string());
            }
        }
        for rule in &policy.rules {
            for what in ["allowed", "limited", "would_limit"] {
                names.push(format!("rule.{}.{what}", rule.name));
            }
        }
        counters.define_all(&names.iter().map(String::as_str).collect::<Vec<_>>());
        self.counters = Some(Rc::new(counters));
        self.policy = Some(Rc::new(policy));
        true
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let policy = self.policy.clone()?;
        let counters = self.counters.clone()?;
        Some(Box::new(RateLimitFilter { policy, counters, response_headers: Vec::new(), pending: None }))
    }
}

struct RateLimitFilter {
    policy: Rc<RateLimitPolicy>,
    counters: Rc<Counters>,
    /// RateLimit-Policy / RateLimit for the response of an admitted request.
    response_headers: Vec<(String, String)>,
    /// The request waits for Redis.
    pending: Option<Pending>,
}

struct Pending {
    token: u32,
    plan: Plan,
    context: String,
    now_ms: u64,
}

impl Context for RateLimitFilter {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _trailers: usize) {
        let Some(pending) = self.pending.take() else { return };
        if pending.token != token {
            self.pending = Some(pending);
            return;
        }
        let Backend::Redis(redis) = &self.policy.state else { return };
        let redis = redis.clone();
        let (status, body) = glue::http_call_response(body_size);
        let rules = pending.plan.rules.len();
        let mut result = remote::parse_reply("EVAL", status, &body).and_then(|reply| remote_rl::parse_grants(&reply, rules));
        if let (Ok(grants), Some(reconcile)) = (&result, self.policy.reconcile) {
            result = Ok(lease::store_leases(
                &self.policy,
                &HostStore,
                &pending.plan,
                grants,
                reconcile.lease_ms.get(),
                pending.now_ms,
            ));
        }
        let action = self.finish_remote(&redis, pending.plan, result, &pending.context);
        if action == Action::Continue {
            // A failed resume leaves the request paused; Envoy's stream timeout then ends it.
            let _ = glue::resume_request();
        }
    }
}

/// The downstream address Envoy computed: the peer, or with `use_remote_address` and
/// `xff_num_trusted_hops: N` the address N hops from the right of X-Forwarded-For.
fn source_address() -> Option<String> {
    let bytes = hostcalls::get_property(vec!["source", "address"]).ok()??;
    String::from_utf8(bytes).ok()
}

/// Every value of one header in any of its spellings (case, `_` for `-`), as (name, value) pairs.
fn all_values(headers: &[(String, String)], name: &str) -> Vec<(String, String)> {
    headers.iter().filter(|(n, _)| firebreak_core::headers::is_spelling_of(n, name)).cloned().collect()
}

impl RateLimitFilter {
    /// Applies a decision: the local reply, or the response headers to add and Continue.
    fn apply(&mut self, decision: Decision, context: &str) -> Action {
        self.record(&decision.events, context);
        if let Some(rejection) = &decision.rejection {
            let key = decision
                .events
                .iter()
                .find_map(|e| match e {
                    Event::Limited { rule, key, .. } => Some(format!("rule={rule} {key}")),
                    Event::Error { rule, error, blocked: true } => Some(format!("rule={rule} error={}", error.code())),
                    _ => None,
                })
                .unwrap_or_default();
            return self.reject(rejection, &format!("{context} {key}"));
        }
        self.counters.count_passed("allowed");
        self.response_headers = decision.response_headers;
        Action::Continue
    }

    /// Sends the plan to Redis; the request waits for the answer.
    fn ask_redis(&mut self, redis: &RedisConfig, plan: Plan, context: String, now_ms: u64) -> Action {
        let lease = self.policy.reconcile.map_or(1, |r| r.lease_tokens.get());
        let command = remote_rl::command(&self.policy, &plan, redis, lease);
        self.counters.increment("redis.calls");
        match glue::dispatch_webdis(redis, &command) {
            Ok(token) => {
                self.pending = Some(Pending { token, plan, context, now_ms });
                Action::Pause
            }
            Err(status) => {
                let error = remote::RemoteError::Unreachable(format!("dispatch failed: {status:?}"));
                self.finish_remote(redis, plan, Err(error), &context)
            }
        }
    }

    fn finish_remote(
        &mut self,
        redis: &RedisConfig,
        plan: Plan,
        result: Result<Vec<remote_rl::Grant>, remote::RemoteError>,
        context: &str,
    ) -> Action {
        let context = match &result {
            Ok(_) => context.to_string(),
            Err(error) => {
                self.counters.increment("redis.failed");
                format!("{context} store_error={:?}", error.to_string())
            }
        };
        let failed = result.is_err();
        let decision = remote_rl::decide(&self.policy, plan, result, redis.failure_mode);
        if failed && decision.rejection.is_none() {
            self.counters.increment("state_unavailable_failed_open");
            glue::log(LogLevel::Error, &format!("firebreak {PLUGIN} fail_open rate_limit_unchecked {context}"));
        }
        self.apply(decision, &context)
    }

    fn reject(&self, rejection: &firebreak_core::Rejection, context: &str) -> Action {
        glue::reject(PLUGIN, &self.counters, rejection, context);
        Action::Pause
    }

    fn record(&self, events: &[Event], context: &str) {
        let instance = &self.policy.name;
        for event in events {
            match event {
                Event::Allowed { rule } => self.counters.count_passed(&format!("rule.{rule}.allowed")),
                Event::Limited { rule, .. } => self.counters.increment(&format!("rule.{rule}.limited")),
                Event::WouldLimit { rule, key, retry_after_ms } => {
                    self.counters.increment(&format!("rule.{rule}.would_limit"));
                    glue::log(
                        LogLevel::Warn,
                        &format!("firebreak {PLUGIN} would_reject instance={instance} rule={rule} {key} retry_after_ms={retry_after_ms} {context}"),
                    );
                }
                Event::Error { rule, error, blocked } => {
                    self.counters.increment(&format!("rule.{rule}.error.{}", error.code()));
                    if !blocked {
                        glue::log(
                            LogLevel::Warn,
                            &format!(
                                "firebreak {PLUGIN} pass_on_error instance={instance} rule={rule} error={} {context}",
                                error.code()
                            ),
                        );
                    }
                }
            }
        }
    }
}

impl HttpContext for RateLimitFilter {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let instance = &self.policy.name;
        // One read of the header map; the host is asked only for what this instance's rules key
        // on (the client address, the verified principal).
        // A value that is not UTF-8 is kept as an empty value. Headers that cannot be read at all
        // leave the route unknown: refused, never let through unchecked.
        let Ok(headers) = glue::request_headers_lossy() else {
            return self.reject(&ratelimit::host_failure("headers_unreadable"), &format!("instance={instance}"));
        };
        // A method or path that is not UTF-8 (kept as empty) would match no route: refused.
        if [":method", ":path"].iter().any(|name| glue::header(&headers, name) == Some("")) {
            let rejection = firebreak_core::Rejection::new(firebreak_core::Code::RequestHeadersInvalid)
                .with_message("the request's method or path is not valid UTF-8");
            return self.reject(&rejection, &format!("instance={instance}"));
        }
        let method = glue::header(&headers, ":method").unwrap_or_default();
        let path = split_path(glue::header(&headers, ":path").unwrap_or_default()).0;
        let scope = self.policy.scope(method, path);
        if !scope.applies() {
            return Action::Continue;
        }
        let context = format!("instance={instance} method={method} path={path:?}");
        if scope == Scope::NotCanonical {
            return self.reject(&firebreak_core::route::not_canonical_rejection(), &context);
        }
        let Some(now) = glue::now_ms() else {
            return self.reject(&RuleError::StoreUnavailable.rejection("-"), &context);
        };
        let keys_on_user = self.policy.rules.iter().any(|r| r.key != KeyBy::Ip);
        let keys_on_ip = self.policy.rules.iter().any(|r| r.key != KeyBy::User);
        let (principal, trusted) = match &self.policy.user_source {
            UserSource::Principal if keys_on_user => match glue::principal() {
                Ok(principal) => (principal, Vec::new()),
                Err(_) => return self.reject(&ratelimit::host_failure("principal_unreadable"), &context),
            },
            UserSource::TrustedHeader(name) if keys_on_user => (None, all_values(&headers, name)),
            _ => (None, Vec::new()),
        };
        let user = ratelimit::resolve_user(&self.policy.user_source, principal, &trusted);
        let source = if keys_on_ip { source_address() } else { None };
        let facts = RequestFacts {
            method,
            path,
            client_ip: source.as_deref().and_then(client::parse_source_address),
            user: user.as_deref(),
        };
        let plan = match ratelimit::plan(&self.policy, &facts) {
            Planned::Decided(decision) => return self.apply(decision, &context),
            Planned::Evaluate(plan) => plan,
        };
        match &self.policy.state {
            Backend::Local => {
                let decision = ratelimit::check_planned(&self.policy, &HostStore, plan, now);
                self.apply(decision, &context)
            }
            Backend::Redis(redis) => {
                let redis = redis.clone();
                let plan = match self.policy.reconcile {
                    None => plan,
                    Some(_) => match lease::spend_leases(&self.policy, &HostStore, plan, now) {
                        LeaseStep::Decided(decision) => {
                            self.counters.increment("lease.local_decisions");
                            return self.apply(decision, &context);
                        }
                        LeaseStep::Remote(plan) => plan,
                    },
                };
                self.ask_redis(&redis, plan, context, now)
            }
        }
    }

    fn on_http_request_body(&mut self, _body_size: usize, _end_of_stream: bool) -> Action {
        // Never let data pass while the decision waits for Redis.
        if self.pending.is_some() {
            Action::Pause
        } else {
            Action::Continue
        }
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        if self.pending.is_some() {
            Action::Pause
        } else {
            Action::Continue
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        for (name, value) in std::mem::take(&mut self.response_headers) {
            let _ = hostcalls::add_map_value(MapType::HttpResponseHeaders, &name, &value);
        }
        Action::Continue
    }
}
