//! replay-guard: each money operation is forwarded exactly once (Idempotency-Key, duplicate
//! collapse, `outcome_unknown` locking). Decisions live in `firebreak_core::replay`; this file
//! only moves data between Envoy and the core.

use std::cell::{Cell, RefCell};
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::rc::Rc;

use firebreak_core::remote::{Backend, RedisConfig};
use firebreak_core::replay::redis::{self as remote_state, ClearStep, FinishPlan, PendingClaim, RemoteCommand};
use firebreak_core::replay::{
    body_sha256, decide_early, operator_request, parse_clear, Answer, ClaimAnswer, ClaimRequest, ClearAnswer, Decision, Exchange,
    FinishAnswer, FinishRequest, KeyPeek, LocalState, Outcome, Record, ReplayError, ReplayPolicy, ReplayState, RequestFacts,
    StateError,
};
use firebreak_core::store::KeyHash;
use firebreak_core::{Code, Rejection};
use firebreak_glue::{self as glue, Counters, HostStore};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

const PLUGIN: &str = "replay_guard";

/// Counters besides `rejected.<code>` (which glue::reject increments).
const COUNTERS: &[&str] = &[
    "passed_unprotected",
    "forwarded",
    "forwarded_first_of_fingerprint",
    "forwarded_unguarded",
    "replayed",
    "stale_in_flight",
    "completed",
    "completed_not_stored",
    "outcome_unknown_recorded",
    "released",
    "finish_not_owner",
    "finish_failed",
    "operator_cleared",
    "decided_at_headers",
    "rejected.request_in_flight",
    "rejected.outcome_unknown",
    "rejected.duplicate_request",
    "rejected.idempotency_key_mismatch",
    "rejected.replay_store_full",
    "rejected.tenant_quota_exceeded",
    "rejected.state_unavailable",
    "remote_error",
    "finish_paused_response",
    "claim_unwound",
    "claim_unwind_not_needed",
    "claim_unwind_failed",
    "resume_failed",
];

/// A fresh root context of this filter; `on_configure` reads its configuration.
pub fn root() -> Box<dyn RootContext> {
    Box::new(ReplayRoot {
        policy: None,
        counters: Rc::new(Counters::new("firebreak.replay_guard")),
        claims: Rc::new(ClaimIds { seed: RandomState::new(), next: Cell::new(0) }),
        debug_log: false,
    })
}

/// Claim ids: unique per forwarded request (a per-VM random seed, the time, a counter).
struct ClaimIds {
    seed: RandomState,
    next: Cell<u64>,
}

impl ClaimIds {
    fn next(&self, now_ms: u64, context_id: u32) -> u64 {
        let n = self.next.get().wrapping_add(1);
        self.next.set(n);
        self.seed.hash_one((now_ms, context_id, n))
    }
}

struct ReplayRoot {
    policy: Option<Rc<ReplayPolicy>>,
    counters: Rc<Counters>,
    claims: Rc<ClaimIds>,
    /// Envoy's log level lets debug lines through (read once, at configure time).
    debug_log: bool,
}

impl Context for ReplayRoot {}

impl RootContext for ReplayRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        self.policy = glue::load_bound_config(PLUGIN, ReplayPolicy::from_json, ReplayPolicy::bind_tables).map(Rc::new);
        if let Some(policy) = &self.policy {
            if let Backend::Redis(redis) = &policy.state {
                glue::log(
                    LogLevel::Info,
                    &format!(
                        "firebreak {PLUGIN} state backend=redis cluster={} timeout_ms={} key_prefix={} failure_mode=closed",
                        redis.cluster, redis.timeout_ms, redis.key_prefix
                    ),
                );
            }
            if policy.state == Backend::Local {
                glue::log(
                    LogLevel::Info,
                    &format!(
                        "firebreak {PLUGIN} tables keys={} collapse={} max_shared_bytes={}",
                        policy.key_table.capacity(),
                        policy.collapse_table.capacity(),
                        policy.max_memory_bytes()
                    ),
                );
            }
        }
        self.counters.define_all(COUNTERS);
        self.debug_log = glue::debug_enabled();
        self.policy.is_some()
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let policy = self.policy.clone()?;
        Some(Box::new(ReplayFilter {
            policy,
            counters: self.counters.clone(),
            claims: self.claims.clone(),
            context_id,
            exchange: None,
            peek: None,
            debug_log: self.debug_log,
            stage: Stage::Idle,
            operator_context: String::new(),
            pending: None,
            holding_response: false,
        }))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Not protected, or nothing to do any more on the request side.
    Idle,
    /// Header checks passed; holding the body until it is complete.
    Body,
    /// The claim went to a store that answers later; the request is paused.
    AwaitingStore,
    /// Forwarded; the exchange captures the answer if it owns a key.
    Forwarded,
    /// Answered locally (rejection or replay).
    Answered,
    /// An authorised operator's clear request; holding its body.
    Operator,
}

/// How much of an answer the Redis backend holds back until its record is written: the stored
/// response bound, at least 64 KiB, at most 512 KiB (half Envoy's default buffer limit, so that
/// holding never makes Envoy reset an answer whose operation executed).
fn hold_limit(policy: &ReplayPolicy) -> usize {
    usize::try_from(policy.max_stored_body_bytes).unwrap_or(usize::MAX).clamp(64 * 1024, 512 * 1024)
}

/// Largest accepted operator clear request body.
const MAX_CLEAR_BODY: usize = 4096;

struct ReplayFilter {
    policy: Rc<ReplayPolicy>,
    counters: Rc<Counters>,
    claims: Rc<ClaimIds>,
    context_id: u32,
    exchange: Option<Exchange>,
    /// The header-time read of the key's bucket (local store): the claim commits against it.
    peek: Option<KeyPeek>,
    /// Accepted requests (forwarded, completed) are logged only at debug level: a log line is
    /// a host call, and the counters already record each of them.
    debug_log: bool,
    stage: Stage,
    operator_context: String,
    /// A Redis callout in flight (Redis backend only).
    pending: Option<Pending>,
    /// Response body chunks are held (Redis backend) until the record is written.
    holding_response: bool,
}

/// A Redis command sent and not answered yet, with what its answer is for.
enum Pending {
    Claim {
        token: u32,
        claim: PendingClaim,
    },
    Finish {
        token: u32,
        command: RemoteCommand,
        on_success: FinishAnswer,
        log: FinishLog,
        resume_response: bool,
    },
    ClearRead {
        token: u32,
        command: RemoteCommand,
        key: KeyHash,
        now_ms: u64,
    },
    ClearDelete {
        token: u32,
        command: RemoteCommand,
        on_success: ClearAnswer,
    },
    /// The claim's answer was lost: deleting this claim's record (if Redis applied it) before
    /// answering 503. `why`: the claim's failure, for the log line.
    Unwind {
        token: u32,
        command: RemoteCommand,
        why: String,
    },
}

impl Pending {
    fn token(&self) -> u32 {
        match self {
            Pending::Claim { token, .. }
            | Pending::Finish { token, .. }
            | Pending::ClearRead { token, .. }
            | Pending::ClearDelete { token, .. }
            | Pending::Unwind { token, .. } => *token,
        }
    }
}

/// What the finish log line says besides the answer.
struct FinishLog {
    outcome: String,
    complete: bool,
    context: String,
}

/// The Redis store behind the [`ReplayState`] interface: each call dispatches ONE atomic
/// command (built by `firebreak_core::replay::redis`) and answers `Later`; the answer comes to
/// `on_http_call_response`. A dispatch that fails answers `Now(Err(Remote))` (fail closed).
struct RemoteState<'a> {
    policy: &'a ReplayPolicy,
    redis: &'a RedisConfig,
    sent: RefCell<Option<Pending>>,
    error: RefCell<Option<String>>,
}

impl RemoteState<'_> {
    fn send(&self, command: &RemoteCommand, pending: impl FnOnce(u32) -> Pending) -> bool {
        match glue::dispatch_webdis(self.redis, &command.body) {
            Ok(token) => {
                *self.sent.borrow_mut() = Some(pending(token));
                true
            }
            Err(status) => {
                *self.error.borrow_mut() = Some(format!("dispatch failed: {status:?}"));
                false
            }
        }
    }
}

impl ReplayState for RemoteState<'_> {
    fn claim(&self, request: &ClaimRequest, now_ms: u64) -> Answer<Result<ClaimAnswer, StateError>> {
        let claim = remote_state::claim(self.policy, self.redis, request, now_ms);
        let command = claim.command.clone();
        if self.send(&command, |token| Pending::Claim { token, claim }) {
            Answer::Later
        } else {
            Answer::Now(Err(StateError::Remote))
        }
    }

    fn finish(&self, request: &FinishRequest, now_ms: u64) -> Answer<Result<FinishAnswer, StateError>> {
        match remote_state::finish(self.policy, self.redis, request, now_ms) {
            FinishPlan::Done(answer) => Answer::Now(Ok(answer)),
            FinishPlan::Send { command, on_success } => {
                let log = FinishLog { outcome: String::new(), complete: false, context: String::new() };
                if self.send(&command, |token| Pending::Finish {
                    token,
                    command: command.clone(),
                    on_success,
                    log,
                    resume_response: false,
                }) {
                    Answer::Later
                } else {
                    Answer::Now(Err(StateError::Remote))
                }
            }
        }
    }

    fn clear(&self, key: KeyHash, now_ms: u64) -> Answer<Result<ClearAnswer, StateError>> {
        let command = remote_state::clear_read(self.redis, key);
        if self.send(&command, |token| Pending::ClearRead { token, command: command.clone(), key, now_ms }) {
            Answer::Later
        } else {
            Answer::Now(Err(StateError::Remote))
        }
    }

    /// No header-time read: an extra round trip per request is not worth it; the claim at body
    /// time decides (and nothing is executed before it).
    fn peek(&self, _key: KeyHash, _now_ms: u64) -> Answer<Result<Option<Record>, StateError>> {
        Answer::Now(Ok(None))
    }
}

impl Context for ReplayFilter {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _trailers: usize) {
        let Some(pending) = self.pending.take() else { return };
        if pending.token() != token {
            self.pending = Some(pending);
            return;
        }
        let limit = remote_state::max_reply_bytes(&self.policy);
        let (status, body, too_large) = if body_size > limit {
            (None, Vec::new(), true)
        } else {
            let (status, body) = glue::http_call_response(body_size);
            (status, body, false)
        };
        let why = |command: &RemoteCommand| -> String {
            if too_large {
                format!("reply of {body_size} bytes exceeds {limit}")
            } else {
                remote_state::describe(command, status, &body)
            }
        };
        match pending {
            Pending::Claim { claim, .. } => {
                let answer = if too_large { Err(StateError::Remote) } else { claim.answer(&self.policy, status, &body) };
                let error = answer.is_err().then(|| why(&claim.command));
                if answer == Err(StateError::Remote) {
                    // Redis may have applied the claim although its answer was lost: the
                    // request is not forwarded, so this claim's record is deleted (compare-and-
                    // delete) before the 503, else the key would read outcome_unknown for the TTL.
                    let policy = self.policy.clone();
                    if let Backend::Redis(redis) = &policy.state {
                        if let Some(command) = claim.unwind(redis) {
                            if let Ok(token) = glue::dispatch_webdis(redis, &command.body) {
                                self.pending = Some(Pending::Unwind { token, command, why: error.unwrap_or_default() });
                                return;
                            }
                        }
                    }
                }
                if self.on_claim_answer(answer, error.as_deref()) == Action::Continue && glue::resume_request().is_err() {
                    // A failed resume leaves the request paused; Envoy's stream timeout ends it.
                    self.counters.increment("resume_failed");
                    glue::log(LogLevel::Error, &format!("firebreak {PLUGIN} resume_failed"));
                }
            }
            Pending::Finish { command, on_success, log, resume_response, .. } => {
                let answer = if too_large {
                    Err(StateError::Remote)
                } else {
                    remote_state::finish_answer(&command, on_success, status, &body)
                };
                let error = answer.is_err().then(|| why(&command));
                self.record_finish(answer, &log, error.as_deref());
                if resume_response && glue::resume_response().is_err() {
                    self.counters.increment("resume_failed");
                    glue::log(LogLevel::Error, &format!("firebreak {PLUGIN} resume_failed {}", log.context));
                }
            }
            Pending::Unwind { command, why: claim_error, .. } => {
                let outcome =
                    if too_large { Err(StateError::Remote) } else { remote_state::unwind_answer(&command, status, &body) };
                let counter = match outcome {
                    Ok(true) => "claim_unwound",
                    Ok(false) => "claim_unwind_not_needed",
                    Err(_) => "claim_unwind_failed",
                };
                self.counters.increment(counter);
                let context = self.exchange.as_ref().map(|e| e.context().to_string()).unwrap_or_default();
                let mut line = format!("firebreak {PLUGIN} {counter} {context}");
                if outcome.is_err() {
                    line.push_str(&format!(" store_error={:?}", why(&command)));
                }
                glue::log(if outcome.is_err() { LogLevel::Error } else { LogLevel::Warn }, &line);
                // Refused whatever the unwind did: the claim never answered.
                let _ = self.on_claim_answer(Err(StateError::Remote), Some(&claim_error));
            }
            Pending::ClearRead { command, key, now_ms, .. } => {
                let Backend::Redis(redis) = &self.policy.state else { return };
                let redis = redis.clone();
                let context = self.operator_context.clone();
                let step = if too_large {
                    Err(StateError::Remote)
                } else {
                    remote_state::clear_after_read(&self.policy, &redis, key, now_ms, &command, status, &body)
                };
                match step {
                    Ok(ClearStep::Done(answer)) => {
                        let _ = self.respond_clear(Ok(answer), &context);
                    }
                    Ok(ClearStep::Delete { command, on_success }) => match glue::dispatch_webdis(&redis, &command.body) {
                        Ok(token) => self.pending = Some(Pending::ClearDelete { token, command, on_success }),
                        Err(status) => {
                            let context = format!("{context} store_error={:?}", format!("dispatch failed: {status:?}"));
                            let _ = self.respond_clear(Err(StateError::Remote), &context);
                        }
                    },
                    Err(error) => {
                        let context = format!("{context} store_error={:?}", why(&command));
                        let _ = self.respond_clear(Err(error), &context);
                    }
                }
            }
            Pending::ClearDelete { command, on_success, .. } => {
                let context = self.operator_context.clone();
                let answer = if too_large {
                    Err(StateError::Remote)
                } else {
                    remote_state::clear_answer(&command, on_success, status, &body)
                };
                match answer {
                    Ok(Some(answer)) => {
                        let _ = self.respond_clear(Ok(answer), &context);
                    }
                    Ok(None) => {
                        let _ = self.reject(&ReplayError::ClearRefused("changing (retry the clear)"), &context);
                    }
                    Err(error) => {
                        let context = format!("{context} store_error={:?}", why(&command));
                        let _ = self.respond_clear(Err(error), &context);
                    }
                }
            }
        }
    }
}

impl ReplayFilter {
    fn reject(&mut self, error: &ReplayError, context: &str) -> Action {
        self.reject_with(&error.rejection(), context)
    }

    fn reject_with(&mut self, rejection: &Rejection, context: &str) -> Action {
        self.stage = Stage::Answered;
        glue::reject(PLUGIN, &self.counters, rejection, context);
        Action::Pause
    }

    /// The whole body is known (its SHA-256): fingerprint, claim, decide.
    fn claim(&mut self, body_sha256: &[u8; 32]) -> Action {
        let Some(exchange) = self.exchange.as_ref() else { return Action::Continue };
        let context = exchange.context().to_string();
        let Some(now) = glue::now_ms() else {
            return self.reject(&ReplayError::StateUnavailable, &context);
        };
        let claim_id = self.claims.next(now, self.context_id);
        let Some(request) = exchange.claim_request_of_body_sha256(&self.policy, body_sha256, claim_id) else {
            // Optional key absent and collapse off on this route: nothing to claim.
            self.counters.count_passed("forwarded_unguarded");
            if self.debug_log {
                glue::log(LogLevel::Debug, &format!("firebreak {PLUGIN} forward_unguarded {context}"));
            }
            self.stage = Stage::Forwarded;
            return Action::Continue;
        };
        let (answer, sent, error) = match &self.policy.state {
            Backend::Local => {
                let state = LocalState { policy: &self.policy, store: &HostStore };
                (Answer::Now(state.claim_after_peek(&request, now, self.peek.take())), None, None)
            }
            Backend::Redis(redis) => {
                let state = RemoteState { policy: &self.policy, redis, sent: RefCell::new(None), error: RefCell::new(None) };
                let answer = state.claim(&request, now);
                (answer, state.sent.into_inner(), state.error.into_inner())
            }
        };
        match answer {
            Answer::Now(answer) => self.on_claim_answer(answer, error.as_deref()),
            // The Redis store delivers its answer to `on_claim_answer` from
            // `on_http_call_response` and then resumes the request.
            Answer::Later => {
                self.pending = sent;
                self.stage = Stage::AwaitingStore;
                Action::Pause
            }
        }
    }

    /// Applies the store's answer: forward, reject, or replay. Also the entry point for an
    /// answer that arrives later (the caller then resumes the request on `Continue`).
    /// `store_error`: why the store did not answer (for the log line), never a value.
    fn on_claim_answer(&mut self, answer: Result<ClaimAnswer, StateError>, store_error: Option<&str>) -> Action {
        let Some(exchange) = self.exchange.as_mut() else { return Action::Continue };
        if let Ok(ClaimAnswer::OutcomeUnknown { stale_in_flight: true }) = answer {
            self.counters.increment("stale_in_flight");
        }
        if let Some(why) = store_error {
            self.counters.increment("remote_error");
            glue::log(
                LogLevel::Error,
                &format!("firebreak {PLUGIN} remote_error op=claim store_error={why:?} {}", exchange.context()),
            );
        }
        let mut context = exchange.context().to_string();
        if let Some(why) = store_error {
            context.push_str(&format!(" store_error={why:?}"));
        }
        match exchange.on_claim(&self.policy, answer) {
            Decision::Forward => {
                let what = if exchange.owns_key() { "forwarded" } else { "forwarded_first_of_fingerprint" };
                self.counters.count_passed(what);
                if self.debug_log {
                    glue::log(LogLevel::Debug, &format!("firebreak {PLUGIN} {what} {context}"));
                }
                self.stage = Stage::Forwarded;
                Action::Continue
            }
            Decision::Reject(error) => self.reject(&error, &context),
            Decision::Replay(response) => {
                self.stage = Stage::Answered;
                self.counters.increment("replayed");
                glue::log(LogLevel::Info, &format!("firebreak {PLUGIN} replayed status={} {context}", response.status));
                glue::send_response(response.status, &response.headers, &response.body);
                Action::Pause
            }
        }
    }

    /// The answer ended (or the stream did): record what it proves. `true` when the write went
    /// to Redis and the response waits for it (`pause_response`): the caller returns Pause, and
    /// the answer resumes the response. A client therefore sees the answer only once its key
    /// is completed on every instance.
    fn finish(&mut self, complete: bool, pause_response: bool) -> bool {
        let Some(exchange) = self.exchange.as_mut() else { return false };
        let Some(request) = exchange.finish(&self.policy, complete) else { return false };
        let outcome = match &request.outcome {
            Outcome::Completed { status, .. } => format!("status={status}"),
            Outcome::Unknown { status } => format!("status={status}"),
            Outcome::Release => "release".to_string(),
        };
        let log = FinishLog { outcome, complete, context: exchange.context().to_string() };
        let Some(now) = glue::now_ms() else {
            self.record_finish(Err(StateError::Unavailable), &log, None);
            return false;
        };
        let (answer, sent, error) = match &self.policy.state {
            Backend::Local => (LocalState { policy: &self.policy, store: &HostStore }.finish(&request, now), None, None),
            Backend::Redis(redis) => {
                let state = RemoteState { policy: &self.policy, redis, sent: RefCell::new(None), error: RefCell::new(None) };
                let answer = state.finish(&request, now);
                (answer, state.sent.into_inner(), state.error.into_inner())
            }
        };
        match answer {
            Answer::Now(answer) => {
                self.record_finish(answer, &log, error.as_deref());
                false
            }
            Answer::Later => {
                self.pending = sent.map(|pending| match pending {
                    Pending::Finish { token, command, on_success, .. } => {
                        Pending::Finish { token, command, on_success, log, resume_response: pause_response }
                    }
                    other => other,
                });
                if pause_response {
                    self.counters.increment("finish_paused_response");
                }
                pause_response
            }
        }
    }

    fn record_finish(&self, answer: Result<FinishAnswer, StateError>, log: &FinishLog, store_error: Option<&str>) {
        let happy_path = matches!(answer, Ok(FinishAnswer::Completed { stored: true })) && store_error.is_none();
        let (counter, level) = match answer {
            Ok(FinishAnswer::Completed { stored: true }) => ("completed", LogLevel::Info),
            Ok(FinishAnswer::Completed { stored: false }) => ("completed_not_stored", LogLevel::Info),
            Ok(FinishAnswer::OutcomeUnknown) => ("outcome_unknown_recorded", LogLevel::Warn),
            Ok(FinishAnswer::Released) => ("released", LogLevel::Info),
            Ok(FinishAnswer::NotOwner) => ("finish_not_owner", LogLevel::Warn),
            // The record stays in flight and turns outcome_unknown after in_flight_timeout_ms:
            // a failed write can never free a key whose request executed.
            Err(_) => ("finish_failed", LogLevel::Error),
        };
        if happy_path {
            self.counters.count_passed(counter);
        } else {
            self.counters.increment(counter);
        }
        let mut line = format!("firebreak {PLUGIN} {counter} {} complete={} {}", log.outcome, log.complete, log.context);
        if let Some(why) = store_error {
            self.counters.increment("remote_error");
            line.push_str(&format!(" store_error={why:?}"));
        }
        // The happy path (completed and stored) is logged only at debug level: the counter counts.
        if !happy_path {
            glue::log(level, &line);
        } else if self.debug_log {
            glue::log(LogLevel::Debug, &line);
        }
    }

    /// A key still in flight is refused at header time, before the router opens an upstream
    /// request for the retry. Store errors are left to the claim (which fails closed). The read
    /// of the key's bucket is kept for the claim; the clock is read only when the bucket holds a
    /// record of the key (a new key needs no time to be known free).
    fn early_answer(&mut self, exchange: &Exchange) -> Option<ClaimAnswer> {
        if !matches!(self.policy.state, Backend::Local) {
            // The Redis store does not peek (see RemoteState::peek).
            return None;
        }
        let address = exchange.key_address(&self.policy)?;
        let peek = LocalState { policy: &self.policy, store: &HostStore }.peek_key(address).ok()?;
        let answer = if peek.mentions_key() {
            glue::now_ms().and_then(|now| match peek.record(now) {
                Ok(record) => decide_early(record.as_ref(), now, self.policy.in_flight_timeout_ms),
                Err(_) => None,
            })
        } else {
            None
        };
        self.peek = Some(peek);
        answer
    }

    /// An operator's clear request, complete: free an `outcome_unknown` key.
    fn operator_clear(&mut self, body_size: usize) -> Action {
        let context = self.operator_context.clone();
        if body_size > MAX_CLEAR_BODY {
            return self.reject(&ReplayError::ClearRequestInvalid("body too large"), &context);
        }
        let body = match glue::request_body(MAX_CLEAR_BODY) {
            Ok(body) => body,
            Err(_) => return self.reject(&ReplayError::StateUnavailable, &context),
        };
        let (key, target) = match parse_clear(&self.policy, &body) {
            Ok(parsed) => parsed,
            Err(error) => return self.reject(&error, &context),
        };
        let context = format!("{context} {target}");
        let Some(now) = glue::now_ms() else {
            return self.reject(&ReplayError::StateUnavailable, &context);
        };
        let (answer, sent, error) = match &self.policy.state {
            Backend::Local => (LocalState { policy: &self.policy, store: &HostStore }.clear(key, now), None, None),
            Backend::Redis(redis) => {
                let state = RemoteState { policy: &self.policy, redis, sent: RefCell::new(None), error: RefCell::new(None) };
                let answer = state.clear(key, now);
                (answer, state.sent.into_inner(), state.error.into_inner())
            }
        };
        self.operator_context = context.clone();
        match answer {
            Answer::Now(answer) => {
                let context = match error {
                    Some(why) => format!("{context} store_error={why:?}"),
                    None => context,
                };
                self.respond_clear(answer, &context)
            }
            Answer::Later => {
                self.pending = sent;
                Action::Pause
            }
        }
    }

    /// The store's answer to an operator clear becomes the operator's response.
    fn respond_clear(&mut self, answer: Result<ClearAnswer, StateError>, context: &str) -> Action {
        if let Err(StateError::Remote) = answer {
            self.counters.increment("remote_error");
        }
        let context = context.to_string();
        match answer {
            Ok(ClearAnswer::Cleared { stale_in_flight }) => {
                self.stage = Stage::Answered;
                self.counters.increment("operator_cleared");
                glue::log(
                    LogLevel::Warn,
                    &format!("firebreak {PLUGIN} operator_cleared stale_in_flight={stale_in_flight} {context}"),
                );
                let body = format!("{{\"cleared\":true,\"stale_in_flight\":{stale_in_flight}}}");
                glue::send_response(200, &[("content-type".to_string(), "application/json".to_string())], body.as_bytes());
                Action::Pause
            }
            Ok(ClearAnswer::NotFound) => self.reject(&ReplayError::ClearNotFound, &context),
            Ok(ClearAnswer::InFlight) => self.reject(&ReplayError::ClearRefused("still in flight"), &context),
            Ok(ClearAnswer::Completed) => self.reject(&ReplayError::ClearRefused("completed"), &context),
            Err(error) => self.reject(&ReplayError::from(error), &context),
        }
    }

    /// The body is complete (`size` bytes at most): its SHA-256 from request-signature when that
    /// filter verified a signed `sha-256` Content-Digest earlier in this stream (a large body of
    /// a signed request), else read and hashed here. `size_known`: `size` is the body's exact
    /// size (not a bound from the trailers callback).
    fn finish_body(&mut self, size: usize, size_known: bool) -> Action {
        let context = self.exchange.as_ref().map(|e| e.context().to_string()).unwrap_or_default();
        let signed = self.exchange.as_ref().is_some_and(|e| e.principal().is_some());
        if signed && size_known {
            if size as u64 > self.policy.max_body_bytes {
                return self.reject(&ReplayError::BodyTooLarge, &context);
            }
            if let Some(digest) = glue::verified_body_sha256(size) {
                return self.claim(&digest);
            }
        }
        match glue::request_body(size) {
            Ok(body) if body.len() as u64 > self.policy.max_body_bytes => self.reject(&ReplayError::BodyTooLarge, &context),
            Ok(body) => self.claim(&body_sha256(&body)),
            Err(_) => self.reject(&ReplayError::StateUnavailable, &context),
        }
    }
}

impl HttpContext for ReplayFilter {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let headers = match glue::request_headers() {
            Ok(headers) => headers,
            Err(_) => return self.reject_with(&Rejection::new(Code::RequestHeadersInvalid), ""),
        };
        let principal = match glue::principal() {
            Ok(principal) => principal,
            Err(status) => return self.reject(&ReplayError::StateUnavailable, &format!("principal_unreadable={status:?}")),
        };
        let facts = RequestFacts {
            method: glue::header(&headers, ":method").unwrap_or(""),
            path_and_query: glue::header(&headers, ":path").unwrap_or(""),
            headers: &headers,
            principal: principal.as_deref(),
        };
        if let Some((allowed, context)) = operator_request(&self.policy, &facts) {
            if let Err(error) = allowed {
                return self.reject(&error, &context);
            }
            if end_of_stream {
                return self.reject(&ReplayError::ClearRequestInvalid("a JSON body is required"), &context);
            }
            self.operator_context = context;
            self.stage = Stage::Operator;
            return Action::Continue;
        }
        match Exchange::begin(&self.policy, &facts) {
            Ok(None) => {
                self.counters.count_passed("passed_unprotected");
                Action::Continue
            }
            Err((error, context)) => self.reject(&error, &context),
            Ok(Some(exchange)) => {
                let early = self.early_answer(&exchange);
                self.exchange = Some(exchange);
                if let Some(answer) = early {
                    self.counters.increment("decided_at_headers");
                    return self.on_claim_answer(Ok(answer), None);
                }
                if end_of_stream {
                    return self.claim(&body_sha256(&[]));
                }
                // Envoy turns a paused header callback into "stop everything" and the body would
                // never reach this filter: the headers continue (nothing executes without the
                // body), and the body is held below until it is complete and claimed. Put
                // Envoy's buffer filter first in the chain (see README).
                self.stage = Stage::Body;
                Action::Continue
            }
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        match self.stage {
            Stage::Operator if end_of_stream || body_size > MAX_CLEAR_BODY => return self.operator_clear(body_size),
            Stage::Operator => return Action::Pause,
            Stage::Body => {}
            Stage::AwaitingStore | Stage::Answered => return Action::Pause,
            Stage::Idle | Stage::Forwarded => return Action::Continue,
        }
        if body_size as u64 > self.policy.max_body_bytes {
            let context = self.exchange.as_ref().map(|e| e.context().to_string()).unwrap_or_default();
            return self.reject(&ReplayError::BodyTooLarge, &context);
        }
        if !end_of_stream {
            return Action::Pause;
        }
        self.finish_body(body_size, true)
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        match self.stage {
            Stage::Body => {
                let size = usize::try_from(self.policy.max_body_bytes).unwrap_or(usize::MAX).saturating_add(1);
                self.finish_body(size, false)
            }
            Stage::Operator => self.operator_clear(0),
            Stage::AwaitingStore | Stage::Answered => Action::Pause,
            Stage::Idle | Stage::Forwarded => Action::Continue,
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let owns = self.stage == Stage::Forwarded && self.exchange.as_ref().is_some_and(Exchange::owns_key);
        if !owns {
            return Action::Continue;
        }
        let headers = glue::response_headers().unwrap_or_default();
        let status = glue::header(&headers, ":status").and_then(|s| s.parse::<u16>().ok());
        let via_upstream = glue::property_string(&["response", "code_details"]).as_deref() == Some("via_upstream");
        if let (Some(exchange), Some(status)) = (self.exchange.as_mut(), status) {
            exchange.on_response_headers(&self.policy, status, via_upstream, &headers);
        }
        self.holding_response = matches!(self.policy.state, Backend::Redis(_));
        if end_of_stream && self.finish(true, true) {
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(exchange) = self.exchange.as_mut() else { return Action::Continue };
        if !exchange.owns_key() {
            return Action::Continue;
        }
        let room = exchange.body_room(&self.policy);
        if !end_of_stream && self.holding_response && body_size <= hold_limit(&self.policy) {
            // With Redis the answer (up to hold_limit bytes) is held until its record is
            // written: a client that has every byte of a content-length body closes the stream,
            // and Envoy would cancel the update with it. Envoy buffers the held chunks; the next
            // call's body_size covers all of them, read once at the end.
            return Action::Pause;
        }
        self.holding_response = false;
        if body_size > 0 {
            // One byte past the room is enough to know it overflows.
            match glue::response_body(body_size.min(room.saturating_add(1))) {
                Ok(chunk) => exchange.on_response_body(&self.policy, &chunk),
                // Cannot read the answer: complete the key without storing the body.
                Err(_) => exchange.on_response_body(&self.policy, &vec![0; room.saturating_add(1)]),
            }
        }
        if end_of_stream && self.finish(true, true) {
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        if std::mem::take(&mut self.holding_response) {
            // The held body cannot be read from the trailers callback: record the outcome
            // without the body (never a truncated one).
            if let Some(exchange) = self.exchange.as_mut() {
                let room = exchange.body_room(&self.policy);
                exchange.on_response_body(&self.policy, &vec![0; room.saturating_add(1)]);
            }
        }
        if self.finish(true, true) {
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        // The stream ended; an exchange still owning its key got no complete answer. With Redis
        // the update is sent without waiting (the stream is gone; Envoy may cancel the callout
        // with the context): if it is lost the record stays in flight and is `outcome_unknown`
        // after in_flight_timeout_ms, never free.
        self.finish(false, false);
    }
}
