//! amount-limit's flow: when it reads the headers and the body, what it charges, how it waits for
//! Redis, and how a decision becomes a reply, with its counters and log lines. A host only
//! applies the [`Step`]s.
//!
//! One request, top to bottom:
//! 1. Headers. One read of the header map. A request outside every rule's routes passes untouched
//!    (no counter); a path that is not canonical is refused; a `content-length` over
//!    `max_body_bytes` is refused (413). A request without a body is refused
//!    (`amount_body_invalid`). Otherwise the flow continues and waits for the body.
//! 2. Body chunks are held until the last one (trailers end the body too); a body over
//!    `max_body_bytes` is refused. The whole body is then read once and each rule that applies
//!    reads its charge (amount, currency, key) from it; a rule that cannot is a refusal (in its
//!    mode). The charges are then decided:
//!    - local backend: the budgets in shared data. With more than one enforced charge, all are
//!      first read without writing, so a request refused by one costs nothing in the others, and
//!      the records among them not yet counted in the tenant's quota window are counted before
//!      anything is written (over the quota: refused, nothing written).
//!    - Redis backend: one script decides every charge atomically; the request waits (Hold).
//! 3. Redis's answer: a refusal is replied; an admission resumes the request. A failure is
//!    `redis.failed` and goes to `state.failure_mode`.
//!
//! The budget is charged when the request is let through, never given back: what happens after
//! (a later filter's refusal, the upstream's answer) is not seen. Placed last in a chain, it only
//! charges what the chain forwards (README, "Counting").

use std::sync::Arc;

use crate::flow::calls::{Calls, Delivered};
use crate::flow::{header, refuse, reject, Event, Flow, FlowFactory, Host, Level, Meter, RequestContext, Step};
use crate::quota::{self, QuotaError};
use crate::remote::{self, Backend, FailureMode, RedisConfig, RemoteError};
use crate::route::{not_canonical_rejection, split_path, Scope};
use crate::store::{KeyHash, SharedStore, TableError, Update};
use crate::{Code, Mode, Rejection};

use super::budget::{self, Outcome};
use super::extract::parse_document;
use super::redis::{self as amount_redis, QuotaAnswer, ScriptKey, ScriptQuota};
use super::{charge, limited, AmountPolicy, Charge};

/// The log lines' plugin name.
pub const PLUGIN: &str = "amount_limit";

/// Every Redis answer this flow reads is a few integers per rule.
const MAX_REPLY_BYTES: usize = 64 * 1024;

/// Where amount-limit's counters and log lines go: `firebreak.amount_limit.<counter>`.
pub fn meter() -> Meter {
    Meter::new(PLUGIN, format!("firebreak.{PLUGIN}"))
}

/// Counters defined up front (shown as 0 before the first request).
pub fn counters(policy: &AmountPolicy) -> Vec<String> {
    let mut names = vec!["allowed".to_string()];
    if let Backend::Redis(_) = policy.state {
        names.extend(["redis.calls", "redis.failed", "state_unavailable_failed_open"].map(String::from));
    }
    if policy.rules.iter().any(|r| r.mode == Mode::ReportOnly) {
        names.extend(crate::would_reject_counter_names());
    }
    for rule in &policy.rules {
        for what in ["allowed", "limited", "would_limit"] {
            names.push(format!("rule.{}.{what}", rule.name));
        }
    }
    names
}

/// A request whose body is awaited: the rules that apply to it, and its log context.
struct Pending {
    rules: Vec<usize>,
    context: String,
}

/// A request waiting for Redis: the charges its answer decides.
struct Waiting {
    charges: Vec<Charge>,
    context: String,
}

/// amount-limit's flow for one request.
pub struct AmountFlow {
    policy: Arc<AmountPolicy>,
    meter: Meter,
    pending: Option<Pending>,
    calls: Calls<Waiting>,
}

impl AmountFlow {
    pub fn new(policy: Arc<AmountPolicy>) -> Self {
        AmountFlow { policy, meter: meter(), pending: None, calls: Calls::default() }
    }
}

impl Flow for AmountFlow {
    fn on_event(&mut self, event: Event, host: &mut dyn Host) -> Step {
        match event {
            Event::RequestHeaders { end_of_stream } => self.headers(host, end_of_stream),
            Event::RequestBody { buffered, end_of_stream } => {
                if self.calls.waiting() {
                    return Step::Hold;
                }
                let Some(pending) = self.pending.take() else { return Step::Continue };
                if buffered > self.policy.max_body_bytes.get() {
                    return self.too_large(host, rules_mode(&self.policy, &pending.rules), &pending.context);
                }
                if !end_of_stream {
                    self.pending = Some(pending);
                    return Step::Hold;
                }
                self.decide(host, pending, buffered)
            }
            Event::RequestTrailers => {
                if self.calls.waiting() {
                    return Step::Hold;
                }
                // Trailers end the body.
                let Some(pending) = self.pending.take() else { return Step::Continue };
                self.decide(host, pending, self.policy.max_body_bytes.get().saturating_add(1))
            }
            Event::CallAnswer { call, body_size } => match self.calls.deliver(host, call, body_size, MAX_REPLY_BYTES) {
                Some((waiting, delivered)) => self.answer(host, waiting, delivered),
                None => Step::Hold,
            },
            Event::ResponseHeaders { .. } | Event::ResponseBody { .. } | Event::ResponseTrailers | Event::StreamEnd => {
                Step::Continue
            }
        }
    }
}

impl AmountFlow {
    fn headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> Step {
        let policy = self.policy.clone();
        let mode = policy.mode();
        let Ok(headers) = host.request_headers_lossy() else {
            let rejection = Rejection::new(Code::AmountLimitUnavailable).with_detail("headers_unreadable");
            return self.refuse_or_continue(host, mode, rejection, "");
        };
        if [":method", ":path"].iter().any(|name| header(&headers, name) == Some("")) {
            let rejection =
                Rejection::new(Code::RequestHeadersInvalid).with_message("the request's method or path is not valid UTF-8");
            return self.refuse_or_continue(host, mode, rejection, "");
        }
        let method = header(&headers, ":method").unwrap_or_default();
        let path = split_path(header(&headers, ":path").unwrap_or_default()).0;
        let scope = policy.scope(method, path);
        if !scope.applies() {
            return Step::Continue;
        }
        let context = RequestContext { method, path }.to_string();
        if scope == Scope::NotCanonical {
            return self.refuse_or_continue(host, mode, not_canonical_rejection(), &context);
        }
        // Enforced rules first: a request they refuse is never charged to a report-only rule.
        let mut rules: Vec<usize> = policy
            .rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.applies_to(method, path))
            .map(|(i, _)| i)
            .collect();
        rules.sort_by_key(|i| policy.rules.get(*i).map(|r| r.mode == Mode::ReportOnly));
        let rules_mode = rules_mode(&policy, &rules);
        if let Some(length) = header(&headers, "content-length") {
            match length.trim().parse::<u64>() {
                Ok(n) if n > policy.max_body_bytes.get() as u64 => return self.too_large(host, rules_mode, &context),
                Ok(_) => {}
                Err(_) => {
                    let rejection = Rejection::new(Code::AmountBodyInvalid)
                        .with_message("content-length is not a number")
                        .with_detail("not_json");
                    return self.refuse_or_continue(host, rules_mode, rejection, &context);
                }
            }
        }
        let pending = Pending { rules, context };
        if end_of_stream {
            return self.decide(host, pending, 0);
        }
        // A paused header callback would stop the body from ever reaching this filter: continue
        // here and hold the body until it is complete.
        self.pending = Some(pending);
        Step::Continue
    }

    fn too_large(&mut self, host: &mut dyn Host, mode: Mode, context: &str) -> Step {
        self.pending = None;
        let rejection = Rejection::new(Code::BodyTooLarge)
            .with_message(format!("the body exceeds amount-limit's max_body_bytes ({})", self.policy.max_body_bytes));
        self.refuse_or_continue(host, mode, rejection, context)
    }

    /// The whole body is here: each rule reads its charge, then the charges are decided.
    fn decide(&mut self, host: &mut dyn Host, pending: Pending, size: usize) -> Step {
        let policy = self.policy.clone();
        let Pending { rules, context } = pending;
        let body = if size == 0 {
            Vec::new()
        } else {
            match host.request_body(size.min(policy.max_body_bytes.get().saturating_add(1))) {
                Ok(body) => body,
                Err(_) => {
                    let rejection = Rejection::new(Code::AmountLimitUnavailable).with_detail("body_unreadable");
                    return self.refuse_or_continue(host, rules_mode(&policy, &rules), rejection, &context);
                }
            }
        };
        if body.len() > policy.max_body_bytes.get() {
            return self.too_large(host, rules_mode(&policy, &rules), &context);
        }
        let document = parse_document(&body);
        let mut principal: Option<Option<String>> = None;
        let mut charges = Vec::with_capacity(rules.len());
        for index in rules {
            let Some(rule) = policy.rules.get(index) else { continue };
            if rule.keys_on_principal() && principal.is_none() {
                match host.principal() {
                    Ok(p) => principal = Some(p),
                    Err(_) => {
                        let rejection = Rejection::new(Code::AmountLimitUnavailable).with_detail("principal_unreadable");
                        match refuse(
                            host,
                            &self.meter,
                            rule.mode,
                            Level::Warn,
                            rejection,
                            &format!("{context} rule={}", rule.name),
                        ) {
                            Some(step) => return step,
                            None => continue,
                        }
                    }
                }
            }
            match charge(&policy, index, &document, principal.as_ref().and_then(|p| p.as_deref())) {
                Ok(charge) => charges.push(charge),
                Err(rejection) => {
                    let line = format!("{context} rule={}", rule.name);
                    if let Some(step) = refuse(host, &self.meter, rule.mode, Level::Warn, rejection, &line) {
                        return step;
                    }
                }
            }
        }
        if charges.is_empty() {
            host.count_passed(&self.meter, "allowed");
            return Step::Continue;
        }
        let Some(now_ms) = host.now_ms() else {
            let rejection = Rejection::new(Code::AmountLimitUnavailable).with_detail("clock");
            return self.refuse_or_continue(host, charges_mode(&charges), rejection, &context);
        };
        let principal = match principal {
            Some(p) => p,
            None => host.principal().ok().flatten(),
        };
        let tenant = tenant_of(&policy.key_hasher(), principal.as_deref(), host);
        match &policy.state {
            Backend::Local => self.decide_local(host, charges, tenant, now_ms, &context),
            Backend::Redis(redis) => self.ask_redis(host, redis, charges, tenant, context),
        }
    }

    /// The local backend: the budgets in this Envoy's shared data.
    fn decide_local(&mut self, host: &mut dyn Host, charges: Vec<Charge>, tenant: KeyHash, now_ms: u64, context: &str) -> Step {
        let policy = self.policy.clone();
        let now_s = now_ms / 1000;
        let enforced = charges.iter().filter(|c| c.mode == Mode::Enforce).count();
        // Several enforced charges: read them all first so that a refusal costs nothing elsewhere.
        // The units of the tenant's quota taken before any write, by charge.
        let mut units: Vec<Option<u64>> = vec![None; charges.len()];
        if enforced > 1 {
            let mut peeked = Vec::with_capacity(enforced);
            let mut uncounted = Vec::new();
            for (i, charge) in charges.iter().enumerate().filter(|(_, c)| c.mode == Mode::Enforce) {
                match peek(&policy, host.store(), charge, now_s, now_ms) {
                    Ok((outcome, counted)) => {
                        if !counted {
                            uncounted.push(i);
                        }
                        peeked.push((charge.clone(), outcome));
                    }
                    Err(error) => return self.store_failed(host, charge, error, context).unwrap_or(Step::Continue),
                }
            }
            if peeked.iter().any(|(_, o)| !o.allowed) {
                return self.conclude(host, peeked, context);
            }
            // Every enforced record to count is counted before anything is written: a tenant over
            // its quota is refused with nothing written (a unit taken for another of its records
            // is spent: never counted twice, so never unsafe).
            for i in uncounted {
                match policy.quota.charge_in_window(host.store(), tenant, now_ms) {
                    Ok(end) => {
                        if let Some(unit) = units.get_mut(i) {
                            *unit = Some(end);
                        }
                    }
                    Err(QuotaError::Exceeded) => {
                        return self.refuse_or_continue(host, Mode::Enforce, quota_rejection(), context);
                    }
                    Err(QuotaError::Table(error)) => {
                        let Some(charge) = charges.get(i) else { return Step::Continue };
                        return self.store_failed(host, charge, error, context).unwrap_or(Step::Continue);
                    }
                }
            }
        }
        let mut results = Vec::with_capacity(charges.len());
        for (charge, unit) in charges.into_iter().zip(units) {
            // A record not yet counted in its tenant's current quota window is counted first.
            match charge_record(&policy, host.store(), &charge, tenant, unit, now_s, now_ms) {
                Ok(outcome) => {
                    let refused = charge.mode == Mode::Enforce && !outcome.allowed;
                    results.push((charge, outcome));
                    if refused {
                        // Towards refusing: an enforced charge committed before this one stays.
                        return self.conclude(host, results, context);
                    }
                }
                Err(QuotaError::Exceeded) => {
                    let line = format!("{context} {}", charge.context(&policy));
                    if let Some(step) = refuse(host, &self.meter, charge.mode, Level::Warn, quota_rejection(), &line) {
                        return step;
                    }
                }
                Err(QuotaError::Table(error)) => {
                    if let Some(step) = self.store_failed(host, &charge, error, context) {
                        return step;
                    }
                }
            }
        }
        self.conclude(host, results, context)
    }

    /// A store failure for one charge: refused in its mode (`Some`: the reply).
    fn store_failed(&mut self, host: &mut dyn Host, charge: &Charge, error: TableError, context: &str) -> Option<Step> {
        let rejection = match error {
            TableError::Full => Rejection::new(Code::AmountLimitStoreFull),
            _ => Rejection::new(Code::AmountLimitUnavailable).with_detail("store"),
        };
        let line = format!("{context} {}", charge.context(&self.policy));
        refuse(host, &self.meter, charge.mode, Level::Error, rejection, &line)
    }

    /// The charges decided: the most restrictive enforced refusal is replied; a report-only
    /// rule's refusal is reported; otherwise the request goes on.
    fn conclude(&mut self, host: &mut dyn Host, results: Vec<(Charge, Outcome)>, context: &str) -> Step {
        let policy = self.policy.clone();
        let refusal = results
            .iter()
            .filter(|(c, o)| c.mode == Mode::Enforce && !o.allowed)
            .max_by_key(|(_, o)| o.retry_after_s);
        if let Some((charge, outcome)) = refusal {
            let name = policy.rules.get(charge.rule).map_or("-", |r| r.name.as_str());
            host.count(&self.meter, &format!("rule.{name}.limited"));
            let line = format!("{context} {} retry_after_s={}", charge.context(&policy), outcome.retry_after_s);
            return reject(host, &self.meter, Level::Warn, limited(&policy, charge, outcome), &line);
        }
        for (charge, outcome) in &results {
            let name = policy.rules.get(charge.rule).map_or("-", |r| r.name.as_str());
            if outcome.allowed {
                host.count_passed(&self.meter, &format!("rule.{name}.allowed"));
            } else {
                host.count(&self.meter, &format!("rule.{name}.would_limit"));
                let line = format!("{context} {}", charge.context(&policy));
                let _ = refuse(host, &self.meter, Mode::ReportOnly, Level::Warn, limited(&policy, charge, outcome), &line);
            }
        }
        host.count_passed(&self.meter, "allowed");
        Step::Continue
    }

    /// Sends the charges to Redis; the request waits for the answer.
    fn ask_redis(
        &mut self,
        host: &mut dyn Host,
        redis: &RedisConfig,
        charges: Vec<Charge>,
        tenant: KeyHash,
        context: String,
    ) -> Step {
        let keys: Vec<ScriptKey> = charges
            .iter()
            .map(|c| ScriptKey {
                hash: c.hash,
                budget: c.budget.budget.amount.get(),
                window_s: c.budget.budget.window_s.get(),
                cost: c.budget.budget.cost(c.amount).unwrap_or(u64::MAX),
            })
            .collect();
        let enforced = charges.iter().filter(|c| c.mode == Mode::Enforce).count();
        let quota = ScriptQuota { tenant, limit: self.policy.quota.limit.get(), window_ms: self.policy.quota.window_ms.get() };
        let command = amount_redis::command(redis, &keys, enforced, &quota);
        host.count(&self.meter, "redis.calls");
        match self.calls.start(host, redis, &command, Waiting { charges, context }) {
            Ok(()) => Step::Hold,
            Err((waiting, error)) => self.redis_failed(host, redis.failure_mode, waiting, &error),
        }
    }

    /// Redis answered (or the answer cannot be read).
    fn answer(&mut self, host: &mut dyn Host, waiting: Waiting, delivered: Delivered) -> Step {
        let Backend::Redis(redis) = &self.policy.state else { return Step::Hold };
        let failure_mode = redis.failure_mode;
        let enforced = waiting.charges.iter().filter(|c| c.mode == Mode::Enforce).count();
        let decision = delivered
            .and_then(|answer| remote::parse_reply("EVAL", answer.status, &answer.body))
            .and_then(|reply| amount_redis::parse(&reply, waiting.charges.len(), enforced));
        let decision = match decision {
            Ok(decision) => decision,
            Err(error) => return self.redis_failed(host, failure_mode, waiting, &error),
        };
        let Waiting { charges, context } = waiting;
        if decision.quota == QuotaAnswer::Exceeded {
            // An enforced charge would need a unit of the tenant's quota: nothing was
            // written anywhere.
            return self.refuse_or_continue(host, charges_mode(&charges), quota_rejection(), &context);
        }
        let mut results = Vec::with_capacity(charges.len());
        for (charge, a) in charges.into_iter().zip(decision.keys) {
            if decision.quota == QuotaAnswer::ReportOnlyOver && charge.mode == Mode::ReportOnly && a.fits && !a.taken {
                // A report-only rule's record the quota left out (it needed a unit): reported, as
                // on the local backend, and not charged.
                let line = format!("{context} {}", charge.context(&self.policy));
                let _ = refuse(host, &self.meter, Mode::ReportOnly, Level::Warn, quota_rejection(), &line);
                continue;
            }
            let budget = charge.budget.budget;
            let over = budget.cost(charge.amount).is_none_or(|cost| cost > budget.horizon());
            let outcome = Outcome {
                allowed: a.fits,
                record: budget::Debt { t0: 0, debt: 0 },
                remaining: a.remaining,
                reset_s: a.reset_s,
                retry_after_s: if over { budget.window_s.get() } else { a.retry_after_s },
            };
            results.push((charge, outcome));
        }
        self.conclude(host, results, &context)
    }

    /// Redis did not answer usably: `state.failure_mode` decides (closed: 503 for an enforced
    /// charge; open: the request goes on unchecked, counted and logged).
    fn redis_failed(&mut self, host: &mut dyn Host, failure_mode: FailureMode, waiting: Waiting, error: &RemoteError) -> Step {
        host.count(&self.meter, "redis.failed");
        let context = format!("{} store_error={:?}", waiting.context, error.to_string());
        let mode = charges_mode(&waiting.charges);
        match failure_mode {
            FailureMode::Closed => {
                let rejection = Rejection::new(Code::StateUnavailable).with_message(
                    "the cluster-wide amount-limit state is unavailable; refusing rather than forwarding unchecked",
                );
                self.refuse_or_continue(host, mode, rejection, &context)
            }
            FailureMode::Open => {
                host.count(&self.meter, "state_unavailable_failed_open");
                host.log(Level::Error, &format!("firebreak {PLUGIN} fail_open amount_unchecked {context}"));
                Step::Continue
            }
        }
    }

    /// Refuses in `mode`, or (report-only) lets the request go on.
    fn refuse_or_continue(&mut self, host: &mut dyn Host, mode: Mode, rejection: Rejection, context: &str) -> Step {
        self.pending = None;
        refuse(host, &self.meter, mode, Level::Warn, rejection, context).unwrap_or(Step::Continue)
    }
}

/// Enforce when any of the rules is enforced.
fn rules_mode(policy: &AmountPolicy, rules: &[usize]) -> Mode {
    if rules.iter().any(|i| policy.rules.get(*i).is_some_and(|r| r.mode == Mode::Enforce)) {
        Mode::Enforce
    } else {
        Mode::ReportOnly
    }
}

fn charges_mode(charges: &[Charge]) -> Mode {
    if charges.iter().any(|c| c.mode == Mode::Enforce) {
        Mode::Enforce
    } else {
        Mode::ReportOnly
    }
}

/// The tenant whose quota counts the records a request charges: the verified principal, else the client address
/// (without its port), else one tenant for every request that has neither.
fn tenant_of(hasher: &crate::store::KeyHasher, principal: Option<&str>, host: &mut dyn Host) -> KeyHash {
    match principal.filter(|p| !p.is_empty()) {
        Some(principal) => quota::tenant(hasher, "principal", principal),
        None => {
            let address = host.source_address().unwrap_or_default();
            let ip = crate::ratelimit::client::parse_source_address(&address)
                .map(|ip| ip.to_string())
                .unwrap_or_default();
            quota::tenant(hasher, "client", &ip)
        }
    }
}

/// Decides a charge on the local backend and, when admitted, records it, within its tenant's
/// quota of records per quota window (module [`super`], "The tenant quota").
///
/// Invariant: a record is written with `counted_until_ms = e` only when a unit of the tenant's
/// quota was counted in the window ending at `e` and holding `now_ms`, at this charge or at an
/// earlier one (the record then already carried `e` and `now_ms < e`). So a record charged at
/// `now_ms` was counted in the tenant's window that holds `now_ms`.
///
/// `unit`: a unit taken for this charge beforehand (several enforced charges), else none. First
/// attempt with it: a record counted in the running window ([`quota::in_window`])
/// is charged with no quota call (one read and one write, as before). A charge that fits a record
/// not counted (new, of the previous format, or counted in an ended window) writes nothing and
/// asks the quota for a unit (`Exceeded`: refused, nothing written), then decides again with it.
fn charge_record(
    policy: &AmountPolicy,
    store: &dyn SharedStore,
    charge: &Charge,
    tenant: KeyHash,
    mut unit: Option<u64>,
    now_s: u64,
    now_ms: u64,
) -> Result<Outcome, QuotaError> {
    // Twice at most: without a unit, then with one (a unit taken is always enough).
    for _ in 0..2 {
        match commit(policy, store, charge, unit, now_s, now_ms).map_err(QuotaError::Table)? {
            Some(outcome) => return Ok(outcome),
            None => unit = Some(policy.quota.charge_in_window(store, tenant, now_ms)?),
        }
    }
    Err(QuotaError::Table(TableError::Contended))
}

/// `429 tenant_quota_exceeded`: the tenant has charged its quota of distinct debt records in the
/// current quota window (either backend).
fn quota_rejection() -> Rejection {
    Rejection::new(Code::TenantQuotaExceeded)
        .with_message("this tenant has charged its quota of distinct amount budgets for the current window; retry later")
}

/// Reads a charge's outcome without writing, and whether its record is counted in the tenant's
/// running quota window.
fn peek(
    policy: &AmountPolicy,
    store: &dyn SharedStore,
    charge: &Charge,
    now_s: u64,
    now_ms: u64,
) -> Result<(Outcome, bool), TableError> {
    let record = match policy.table.get(store, charge.hash, now_ms)? {
        Some((payload, _, _)) => Some(budget::decode(&payload).ok_or(TableError::Corrupt)?),
        None => None,
    };
    let counted = record.is_some_and(|r| quota::in_window(r.counted_until_ms, now_ms));
    Ok((charge.budget.budget.decide(record.map(|r| r.debt), now_s, charge.amount), counted))
}

/// Decides a charge and, when admitted, records it, atomically. `unit`: the end of the quota
/// window of a unit taken for this charge. `None` (nothing written): the charge fits a record
/// that is not counted in the running quota window and no unit was taken.
fn commit(
    policy: &AmountPolicy,
    store: &dyn SharedStore,
    charge: &Charge,
    unit: Option<u64>,
    now_s: u64,
    now_ms: u64,
) -> Result<Option<Outcome>, TableError> {
    let budget = charge.budget.budget;
    let (result, _) = policy.table.update(store, charge.hash, now_ms, |current| {
        let record = match current {
            Some(payload) => match budget::decode(payload) {
                Some(record) => Some(record),
                None => return Update::Keep(Err(TableError::Corrupt)),
            },
            None => None,
        };
        let outcome = budget.decide(record.map(|r| r.debt), now_s, charge.amount);
        if !outcome.allowed {
            return Update::Keep(Ok(Some(outcome)));
        }
        let counted = record.map(|r| r.counted_until_ms).filter(|end| quota::in_window(*end, now_ms));
        // The unit taken for this charge, else the running window the record was counted in.
        let Some(counted_until_ms) = unit.or(counted) else { return Update::Keep(Ok(None)) };
        let stored = budget::Stored { debt: outcome.record, counted_until_ms };
        Update::Write {
            payload: budget::encode(stored),
            expires_at_ms: budget.expires_at_ms(outcome.record),
            result: Ok(Some(outcome)),
        }
    })?;
    result
}

/// amount-limit, configured (its table bound to the plugin's shared data).
pub struct AmountFactory {
    pub policy: Arc<AmountPolicy>,
}

impl FlowFactory for AmountFactory {
    fn new_flow(&self) -> Box<dyn Flow> {
        Box::new(AmountFlow::new(self.policy.clone()))
    }

    fn meter(&self) -> Meter {
        meter()
    }

    fn counters(&self) -> Vec<String> {
        counters(&self.policy)
    }

    fn stores(&self) -> Vec<crate::flow::fill::StoreTable> {
        use crate::flow::fill::StoreTable;
        if self.policy.state != Backend::Local {
            return Vec::new();
        }
        vec![
            StoreTable::new(meter(), "budgets", &self.policy.table),
            StoreTable::new(meter(), "budget_quotas", &self.policy.quota.table),
        ]
    }

    fn configured(&self) -> Vec<(Level, String)> {
        let rules: Vec<String> = self
            .policy
            .rules
            .iter()
            .map(|r| {
                let budgets: Vec<String> =
                    r.budgets.iter().map(|(c, b)| format!("{c}:{}/{}s", b.budget.amount, b.budget.window_s)).collect();
                format!("{}[{}]{}", r.name, budgets.join(","), if r.mode == Mode::ReportOnly { "(report_only)" } else { "" })
            })
            .collect();
        let state = match &self.policy.state {
            Backend::Local => "local",
            Backend::Redis(_) => "redis",
        };
        vec![(Level::Info, format!("firebreak {PLUGIN} rules={} state={state}", rules.join(";")))]
    }
}

/// Configures amount-limit ([`crate::filters::Configure`]): parses the configuration and binds
/// its local table.
pub fn configure(json: &[u8], setup: &crate::filters::Setup<'_>) -> Result<Arc<dyn FlowFactory>, crate::ConfigError> {
    let mut policy = AmountPolicy::from_json(json)?;
    policy.bind_tables(setup.store, setup.entropy)?;
    Ok(Arc::new(AmountFactory { policy: Arc::new(policy) }))
}
