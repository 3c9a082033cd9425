//! rate-limit's flow: what it reads from the host and when, how a decision becomes a reply or
//! response headers, with its counters and log lines, and how it waits for Redis. The decisions
//! it calls are in [`super`] (local GCRA), [`super::redis`] and [`super::lease`]; a host only
//! applies the [`Step`]s.
//!
//! One request, top to bottom:
//! 1. Headers. One read of the header map. A request outside every rule's routes passes untouched
//!    (no counter); a path that is not canonical is refused. The host is then asked only for
//!    what this instance's rules key on: the clock, the verified principal (only when a rule keys
//!    on the user and the user is the principal), the client address (only when a rule keys on
//!    ip). The plan decides at once (no rule can be keyed, or one that cannot blocks), or:
//!    - local backend: the budgets in shared data decide;
//!    - Redis backend, reconciled: the leases in shared data decide when every rule holds one
//!      (`lease.local_decisions`); else, and in direct mode, one script on Redis decides and the
//!      request waits (Hold) for its answer.
//! 2. Body chunks and trailers are held while the decision waits for Redis (never let data pass
//!    before the decision), and continue otherwise.
//! 3. Redis's answer: a refusal is replied; an admission resumes the request. A failure (dispatch,
//!    no answer, an unreadable answer) is `redis.failed` and goes to the failure mode.
//! 4. Response headers: the RateLimit-Policy / RateLimit headers of an admitted request are
//!    added (when `response_headers` is configured).

use std::fmt::Display;
use std::sync::Arc;

use crate::flow::calls::{Calls, Delivered};
use crate::flow::{header, refuse, Event as FlowEvent, Flow, FlowFactory, Host, Level, Meter, Step};
use crate::remote::{self, Backend, RedisConfig, RemoteError};
use crate::route::{not_canonical_rejection, split_path, Scope};
use crate::{Code, Mode, Rejection};

use super::lease::{self, LeaseStep};
use super::redis as remote_rl;
use super::{
    check_planned, client, host_failure, plan, user_of, Decision, Event, KeyBy, Plan, Planned, RateLimitPolicy, RequestFacts,
    RuleError, UserSource,
};

/// The log lines' plugin name.
pub const PLUGIN: &str = "rate_limit";

/// The largest Redis answer read. The adapter this flow replaced read every answer whole, and
/// this keeps that (an answer this code cannot parse fails like any unreadable one).
const MAX_REPLY_BYTES: usize = usize::MAX;

/// Where an instance's counters and log lines go: each instance counts under its own name,
/// `firebreak.rate_limit.<name>.<counter>`.
pub fn meter(policy: &RateLimitPolicy) -> Meter {
    Meter::new(PLUGIN, format!("firebreak.{PLUGIN}.{}", policy.name))
}

/// Counters defined up front (shown as 0 before the first request).
pub fn counters(policy: &RateLimitPolicy) -> Vec<String> {
    let mut names = vec!["allowed".to_string(), "rejected.rate_limited".to_string()];
    if let Backend::Redis(_) = policy.state {
        for name in ["redis.calls", "redis.failed", "state_unavailable_failed_open", "rejected.state_unavailable"] {
            names.push(name.to_string());
        }
        if policy.reconcile.is_some() {
            names.push("lease.local_decisions".to_string());
        }
    }
    if policy.mode == Mode::ReportOnly || policy.rules.iter().any(|rule| rule.report_only()) {
        names.extend(crate::would_reject_counter_names());
    }
    for rule in &policy.rules {
        for what in ["allowed", "limited", "would_limit"] {
            names.push(format!("rule.{}.{what}", rule.name));
        }
        for error in RuleError::ALL {
            names.push(format!("rule.{}.error.{}", rule.name, error.code()));
        }
    }
    names
}

/// A request waiting for Redis: what its answer decides.
#[derive(Debug)]
struct Pending {
    plan: Plan,
    /// `instance=.. method=.. path=..` for the log lines of the decision.
    context: String,
    /// The clock of the request's headers (the leases of the answer are stored as of then).
    now_ms: u64,
}

/// rate-limit's flow for one request.
pub struct RateLimitFlow {
    policy: Arc<RateLimitPolicy>,
    meter: Meter,
    /// Each rule's `rule.<name>.allowed` counter name, made once at configure time.
    allowed_counters: Arc<[(String, String)]>,
    /// RateLimit-Policy / RateLimit for the response of an admitted request.
    response_headers: Vec<(String, String)>,
    /// The request waits for Redis.
    calls: Calls<Pending>,
}

impl RateLimitFlow {
    pub fn new(policy: Arc<RateLimitPolicy>, meter: Meter) -> Self {
        let allowed_counters = allowed_counters(&policy);
        RateLimitFlow { policy, meter, allowed_counters, response_headers: Vec::new(), calls: Calls::default() }
    }

    fn with_counters(policy: Arc<RateLimitPolicy>, meter: Meter, allowed_counters: Arc<[(String, String)]>) -> Self {
        RateLimitFlow { policy, meter, allowed_counters, response_headers: Vec::new(), calls: Calls::default() }
    }
}

fn allowed_counters(policy: &RateLimitPolicy) -> Arc<[(String, String)]> {
    policy.rules.iter().map(|rule| (rule.name.clone(), format!("rule.{}.allowed", rule.name))).collect()
}

/// `instance=.. method=.. path=".."`: a log line's context, formatted only when one is written.
struct RouteContext<'a> {
    instance: &'a str,
    method: &'a str,
    path: &'a str,
}

impl Display for RouteContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "instance={} method={} path={:?}", self.instance, self.method, self.path)
    }
}

impl Flow for RateLimitFlow {
    fn on_event(&mut self, event: FlowEvent, host: &mut dyn Host) -> Step {
        match event {
            FlowEvent::RequestHeaders { .. } => self.headers(host),
            // Never let data pass while the decision waits for Redis.
            FlowEvent::RequestBody { .. } | FlowEvent::RequestTrailers => {
                if self.calls.waiting() {
                    Step::Hold
                } else {
                    Step::Continue
                }
            }
            FlowEvent::ResponseHeaders { .. } => {
                for (name, value) in std::mem::take(&mut self.response_headers) {
                    // A header Envoy does not take only leaves the response without it.
                    let _ = host.add_response_header(&name, &value);
                }
                Step::Continue
            }
            FlowEvent::CallAnswer { call, body_size } => match self.calls.deliver(host, call, body_size, MAX_REPLY_BYTES) {
                Some((pending, delivered)) => self.answer(host, pending, delivered),
                None => Step::Hold,
            },
            FlowEvent::ResponseBody { .. } | FlowEvent::ResponseTrailers | FlowEvent::StreamEnd => Step::Continue,
        }
    }
}

impl RateLimitFlow {
    fn headers(&mut self, host: &mut dyn Host) -> Step {
        let policy = self.policy.clone();
        let instance = &policy.name;
        // One read of the header map; the host is asked only for what this instance's rules key
        // on (the client address, the verified principal).
        // A value that is not UTF-8 is kept as an empty value. Headers that cannot be read at all
        // leave the route unknown: refused, never let through unchecked.
        let Ok(headers) = host.request_headers_lossy() else {
            return self.refuse(host, host_failure("headers_unreadable"), &format!("instance={instance}"));
        };
        // A method or path that is not UTF-8 (kept as empty) would match no route: refused.
        if [":method", ":path"].iter().any(|name| header(&headers, name) == Some("")) {
            let rejection =
                Rejection::new(Code::RequestHeadersInvalid).with_message("the request's method or path is not valid UTF-8");
            return self.refuse(host, rejection, &format!("instance={instance}"));
        }
        let method = header(&headers, ":method").unwrap_or_default();
        let path = split_path(header(&headers, ":path").unwrap_or_default()).0;
        let scope = policy.scope(method, path);
        if !scope.applies() {
            return Step::Continue;
        }
        // Formatted only when a line is written.
        let context = RouteContext { instance, method, path };
        if scope == Scope::NotCanonical {
            return self.refuse(host, not_canonical_rejection(), &context);
        }
        let Some(now) = host.now_ms() else {
            return self.refuse(host, RuleError::StoreUnavailable.rejection("-"), &context);
        };
        let keys_on_user = policy.rules.iter().any(|r| r.key != KeyBy::Ip);
        let keys_on_ip = policy.rules.iter().any(|r| r.key != KeyBy::User);
        // A trusted header is looked up in the whole map (only its spellings count, see
        // `resolve_user`), without copying it.
        let (principal, trusted): (Option<String>, &[(String, String)]) = match &policy.user_source {
            UserSource::Principal if keys_on_user => match host.principal() {
                Ok(principal) => (principal, &[]),
                Err(_) => return self.refuse(host, host_failure("principal_unreadable"), &context),
            },
            UserSource::TrustedHeader(_) if keys_on_user => (None, &headers),
            _ => (None, &[]),
        };
        let user = user_of(&policy.user_source, principal.as_deref(), trusted);
        let source = if keys_on_ip { host.source_address() } else { None };
        let facts = RequestFacts { method, path, client_ip: source.as_deref().and_then(client::parse_source_address), user };
        let plan = match plan(&policy, &facts) {
            Planned::Decided(decision) => return self.apply(host, decision, &context),
            Planned::Evaluate(plan) => plan,
        };
        match &policy.state {
            Backend::Local => {
                let decision = check_planned(&policy, host.store(), plan, now);
                self.apply(host, decision, &context)
            }
            Backend::Redis(redis) => {
                let plan = match policy.reconcile {
                    None => plan,
                    Some(_) => match lease::spend_leases(&policy, host.store(), plan, now) {
                        LeaseStep::Decided(decision) => {
                            host.count(&self.meter, "lease.local_decisions");
                            return self.apply(host, decision, &context);
                        }
                        LeaseStep::Remote(plan) => plan,
                    },
                };
                self.ask_redis(host, redis, plan, context.to_string(), now)
            }
        }
    }

    /// Sends the plan to Redis; the request waits for the answer.
    fn ask_redis(&mut self, host: &mut dyn Host, redis: &RedisConfig, plan: Plan, context: String, now_ms: u64) -> Step {
        let lease = self.policy.reconcile.map_or(1, |r| r.lease_tokens.get());
        let command = remote_rl::command(&self.policy, &plan, redis, lease);
        host.count(&self.meter, "redis.calls");
        match self.calls.start(host, redis, &command, Pending { plan, context, now_ms }) {
            Ok(()) => Step::Hold,
            Err((pending, error)) => self.finish_remote(host, redis, pending.plan, Err(error), &pending.context),
        }
    }

    /// Redis answered (or the answer cannot be read).
    fn answer(&mut self, host: &mut dyn Host, pending: Pending, delivered: Delivered) -> Step {
        let policy = self.policy.clone();
        let Backend::Redis(redis) = &policy.state else { return Step::Hold };
        let rules = pending.plan.rules.len();
        let mut result = delivered
            .and_then(|answer| remote::parse_reply("EVAL", answer.status, &answer.body))
            .and_then(|reply| remote_rl::parse_grants(&reply, rules));
        if let (Ok(grants), Some(reconcile)) = (&result, policy.reconcile) {
            result =
                Ok(lease::store_leases(&policy, host.store(), &pending.plan, grants, reconcile.lease_ms.get(), pending.now_ms));
        }
        // An admission continues: the host resumes the request this flow held.
        self.finish_remote(host, redis, pending.plan, result, &pending.context)
    }

    fn finish_remote(
        &mut self,
        host: &mut dyn Host,
        redis: &RedisConfig,
        plan: Plan,
        result: Result<Vec<remote_rl::Grant>, RemoteError>,
        context: &str,
    ) -> Step {
        let context = match &result {
            Ok(_) => context.to_string(),
            Err(error) => {
                host.count(&self.meter, "redis.failed");
                format!("{context} store_error={:?}", error.to_string())
            }
        };
        let failed = result.is_err();
        let decision = remote_rl::decide(&self.policy, plan, result, redis.failure_mode);
        if failed && decision.rejection.is_none() {
            host.count(&self.meter, "state_unavailable_failed_open");
            host.log(Level::Error, &format!("firebreak {PLUGIN} fail_open rate_limit_unchecked {context}"));
        }
        self.apply(host, decision, &context)
    }

    /// Applies a decision: the local reply, or the response headers to add and Continue.
    fn apply(&mut self, host: &mut dyn Host, decision: Decision, context: &dyn Display) -> Step {
        self.record(host, &decision.events, context);
        if let Some(rejection) = decision.rejection {
            let key = decision
                .events
                .iter()
                .find_map(|e| match e {
                    Event::Limited { rule, key, .. } => Some(format!("rule={rule} {key}")),
                    Event::Error { rule, error, blocked: true } => Some(format!("rule={rule} error={}", error.code())),
                    _ => None,
                })
                .unwrap_or_default();
            return self.reject(host, rejection, &format_args!("{context} {key}"));
        }
        host.count_passed(&self.meter, "allowed");
        self.response_headers = decision.response_headers;
        Step::Continue
    }

    /// Refuses the request (a rule's refusal: always enforced, a report-only rule never
    /// refuses); the instance's own refusals go through [`RateLimitFlow::refuse`].
    fn reject(&mut self, host: &mut dyn Host, rejection: Rejection, context: &dyn Display) -> Step {
        crate::flow::reject(host, &self.meter, Level::Warn, rejection, &context.to_string())
    }

    /// The instance's own refusal (not a rule's: a path that is not canonical, unreadable
    /// headers, no clock, no principal), in the instance's `mode`: in report-only mode it is
    /// counted and logged and the request goes on, not rate-limited.
    fn refuse(&mut self, host: &mut dyn Host, rejection: Rejection, context: &dyn Display) -> Step {
        refuse(host, &self.meter, self.policy.mode, Level::Warn, rejection, &context.to_string()).unwrap_or(Step::Continue)
    }

    fn record(&self, host: &mut dyn Host, events: &[Event], context: &dyn Display) {
        let instance = &self.policy.name;
        for event in events {
            match event {
                Event::Allowed { rule } => match self.allowed_counters.iter().find(|(name, _)| name == rule) {
                    Some((_, counter)) => host.count_passed(&self.meter, counter),
                    None => host.count_passed(&self.meter, &format!("rule.{rule}.allowed")),
                },
                Event::Limited { rule, .. } => host.count(&self.meter, &format!("rule.{rule}.limited")),
                Event::WouldLimit { rule, key, retry_after_ms } => {
                    // A report-only rule: `rule.<name>.would_limit`, and the would-be refusal
                    // (`would_reject.rate_limited` and its line) as every report-only check.
                    host.count(&self.meter, &format!("rule.{rule}.would_limit"));
                    let retry_after = retry_after_ms.div_ceil(1000).max(1);
                    let rejection = Rejection::new(Code::RateLimited)
                        .with_message(format!("rate limit `{rule}` exceeded; retry in {retry_after} s"));
                    let line = format!("{context} rule={rule} {key} retry_after_ms={retry_after_ms}");
                    let _ = refuse(host, &self.meter, Mode::ReportOnly, Level::Warn, rejection, &line);
                }
                Event::Error { rule, error, blocked } => {
                    host.count(&self.meter, &format!("rule.{rule}.error.{}", error.code()));
                    if !blocked {
                        host.log(
                            Level::Warn,
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

/// rate-limit, configured: one instance (its tables bound to the plugin's shared data).
pub struct RateLimitFactory {
    pub policy: Arc<RateLimitPolicy>,
    meter: Meter,
    allowed_counters: Arc<[(String, String)]>,
}

impl RateLimitFactory {
    pub fn new(policy: RateLimitPolicy) -> Self {
        let meter = meter(&policy);
        let allowed_counters = allowed_counters(&policy);
        RateLimitFactory { policy: Arc::new(policy), meter, allowed_counters }
    }
}

impl FlowFactory for RateLimitFactory {
    fn new_flow(&self) -> Box<dyn Flow> {
        Box::new(RateLimitFlow::with_counters(self.policy.clone(), self.meter.clone(), self.allowed_counters.clone()))
    }

    fn meter(&self) -> Meter {
        self.meter.clone()
    }

    fn counters(&self) -> Vec<String> {
        counters(&self.policy)
    }

    /// Besides the `configured` line every filter logs: which rules only report, if any.
    fn configured(&self) -> Vec<(Level, String)> {
        let reporting: Vec<&str> =
            self.policy.rules.iter().filter(|rule| rule.report_only()).map(|rule| rule.name.as_str()).collect();
        if self.policy.mode == Mode::Enforce && reporting.is_empty() {
            return Vec::new();
        }
        let line = format!(
            "firebreak {PLUGIN} instance={} mode={} report_only_rules={}",
            self.policy.name,
            self.policy.mode.as_str(),
            if reporting.is_empty() { "-".to_string() } else { reporting.join(",") }
        );
        vec![(Level::Warn, line)]
    }

    /// The budget table (local state) and the lease table (Redis with `reconcile`).
    fn stores(&self) -> Vec<crate::flow::fill::StoreTable> {
        use crate::flow::fill::StoreTable;
        let mut stores = Vec::new();
        if self.policy.state == Backend::Local {
            stores.push(StoreTable::new(self.meter.clone(), "budgets", &self.policy.table));
        }
        if self.policy.reconcile.is_some() {
            stores.push(StoreTable::new(self.meter.clone(), "leases", &self.policy.lease_table));
        }
        stores
    }
}

/// Configures rate-limit ([`crate::filters::Configure`]): parses the configuration and binds its
/// local tables (secret placement, and a refusal if the geometry changed).
pub fn configure(json: &[u8], setup: &crate::filters::Setup<'_>) -> Result<Arc<dyn FlowFactory>, crate::ConfigError> {
    let mut policy = RateLimitPolicy::from_json(json)?;
    policy.bind_tables(setup.store, setup.entropy)?;
    Ok(Arc::new(RateLimitFactory::new(policy)))
}
