//! replay-guard's flow: when it reads the headers, holds and reads the body, claims the key (in
//! the local store or in Redis), captures the answer and writes what it proves. The decisions it
//! calls are in [`super::Exchange`] and [`super::state`]; a host only applies the [`Step`]s.
//!
//! One request, top to bottom:
//! 1. Headers. An operator's clear request (`operator_clear.path`) is checked and its body held.
//!    A request outside `routes` passes (`passed_unprotected`); the header-time checks of
//!    [`Exchange::begin`] refuse what they must. With the local store, a key still in flight is
//!    refused at once (`decided_at_headers`), and the read of its bucket is kept for the claim.
//!    A request without a body is claimed now; otherwise the headers continue (nothing executes
//!    without the body) and the body is held.
//! 2. The body is complete (last chunk, or trailers): its SHA-256 (handed over by
//!    request-signature, or hashed here) makes the fingerprint and the claim. The local store
//!    answers at once; Redis answers later ([`Event::CallAnswer`]): the request waits, and a claim
//!    whose answer was lost is unwound before the 503. The answer forwards, refuses or replays.
//! 3. The answer of a forwarded request that owns its key is captured; at its end (or at the
//!    stream's end) what it proves is written back. With Redis the answer (up to [`hold_limit`])
//!    is held until its record is written, and resumed on the write's answer.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::flow::calls::Calls;
use crate::flow::{
    header, read_request_body, refuse, reject, CallId, Event, Flow, FlowFactory, Host, Level, Meter, Response, Step,
};
use crate::remote::{Backend, RedisConfig, RemoteError};
use crate::store::KeyHash;
use crate::{Code, Mode, Rejection};

use super::redis::{self as remote_state, ClearStep, FinishPlan, PendingClaim, RemoteCommand};
use super::{
    body_sha256, decide_early, operator_request, parse_clear, Answer, ClaimAnswer, ClaimRequest, ClearAnswer, Decision, Exchange,
    FinishAnswer, FinishRequest, KeyPeek, LocalState, Outcome, ReplayError, ReplayPolicy, ReplayState, RequestFacts, StateError,
};

/// The log lines' plugin name.
pub const PLUGIN: &str = "replay_guard";

/// Counters defined up front (shown as 0 before the first request), besides the
/// `rejected.<code>` counters [`reject`] increments.
pub const COUNTERS: &[&str] = &[
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

/// Where replay-guard's counters and log lines go.
pub fn meter() -> Meter {
    Meter::new(PLUGIN, "firebreak.replay_guard")
}

/// The log lines of a configuration that was accepted.
pub fn configured(policy: &ReplayPolicy) -> Vec<(Level, String)> {
    let mut lines = Vec::new();
    if policy.mode == Mode::ReportOnly {
        lines.push((Level::Warn, format!("firebreak {PLUGIN} mode=report_only nothing_refused_or_replayed")));
    }
    if let Backend::Redis(redis) = &policy.state {
        lines.push((
            Level::Info,
            format!(
                "firebreak {PLUGIN} state backend=redis cluster={} timeout_ms={} key_prefix={} failure_mode=closed",
                redis.cluster, redis.timeout_ms, redis.key_prefix
            ),
        ));
    }
    if policy.state == Backend::Local {
        lines.push((
            Level::Info,
            format!(
                "firebreak {PLUGIN} tables keys={} collapse={} max_shared_bytes={}",
                policy.key_table.capacity(),
                policy.collapse_table.capacity(),
                policy.max_memory_bytes()
            ),
        ));
    }
    lines
}

/// Claim ids: unique per forwarded request (a random seed made when the filter is configured,
/// so one per VM; the time; a counter).
#[derive(Debug)]
pub struct ClaimIds {
    seed: [u8; 32],
    next: AtomicU64,
}

impl ClaimIds {
    /// `entropy`: the configuration's random bytes ([`crate::filters::Setup::entropy`]); the seed
    /// is derived from them, so it is not the tables' placement secret.
    pub fn new(entropy: [u8; 32]) -> Self {
        let seed = Sha256::new()
            .chain_update(b"firebreak replay_guard claim ids")
            .chain_update(entropy)
            .finalize()
            .into();
        ClaimIds { seed, next: AtomicU64::new(0) }
    }

    pub fn next(&self, now_ms: u64) -> u64 {
        let n = self.next.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        let mut hasher = DefaultHasher::new();
        (self.seed, now_ms, n).hash(&mut hasher);
        hasher.finish()
    }
}

/// How much of an answer the Redis backend holds back until its record is written: the stored
/// response bound, at least 64 KiB, at most 512 KiB (half Envoy's default buffer limit, so that
/// holding never makes Envoy reset an answer whose operation executed).
pub fn hold_limit(policy: &ReplayPolicy) -> usize {
    usize::try_from(policy.max_stored_body_bytes).unwrap_or(usize::MAX).clamp(64 * 1024, 512 * 1024)
}

/// Largest accepted operator clear request body.
pub const MAX_CLEAR_BODY: usize = 4096;

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

/// A Redis command sent and not answered yet: what its answer is for.
#[derive(Debug)]
enum Pending {
    Claim(PendingClaim),
    Finish {
        command: RemoteCommand,
        on_success: FinishAnswer,
        log: FinishLog,
        /// The answer was held for this write: resume it on the write's answer.
        resume_response: bool,
    },
    ClearRead {
        command: RemoteCommand,
        key: KeyHash,
        now_ms: u64,
    },
    ClearDelete {
        command: RemoteCommand,
        on_success: ClearAnswer,
    },
    /// The claim's answer was lost: deleting this claim's record (if Redis applied it) before
    /// answering 503. `why`: the claim's failure, for the log line.
    Unwind {
        command: RemoteCommand,
        why: String,
    },
}

/// What the finish log line says besides the answer.
#[derive(Debug, Clone)]
struct FinishLog {
    outcome: FinishOutcome,
    complete: bool,
    context: String,
}

/// The outcome a finish records, as its log line says it.
#[derive(Debug, Clone, Copy)]
enum FinishOutcome {
    Status(u16),
    Release,
}

impl std::fmt::Display for FinishOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FinishOutcome::Status(status) => write!(f, "status={status}"),
            FinishOutcome::Release => f.write_str("release"),
        }
    }
}

/// Why a call gave no usable answer, for a log line (never a value): a dispatch that failed, an
/// answer too large to read.
fn call_error(error: &RemoteError) -> String {
    match error {
        RemoteError::Unreachable(why) => why.clone(),
        other => other.to_string(),
    }
}

/// The Redis store behind the same calls as [`ReplayState`]: each call starts ONE atomic command
/// (built by [`super::redis`]) through [`Calls`] and answers `Later`; the answer comes as
/// [`Event::CallAnswer`]. A dispatch that fails answers `Now(Err(Remote))` (fail closed), with
/// the reason in `error`.
struct RemoteState<'a> {
    policy: &'a ReplayPolicy,
    redis: &'a RedisConfig,
    host: &'a mut dyn Host,
    calls: &'a mut Calls<Pending>,
    /// Why the command could not be sent.
    error: Option<String>,
}

impl RemoteState<'_> {
    fn send(&mut self, command: &RemoteCommand, pending: Pending) -> bool {
        match self.calls.start(self.host, self.redis, &command.body, pending) {
            Ok(()) => true,
            Err((_, error)) => {
                self.error = Some(call_error(&error));
                false
            }
        }
    }

    fn later_or_remote<T>(sent: bool) -> Answer<Result<T, StateError>> {
        if sent {
            Answer::Later
        } else {
            Answer::Now(Err(StateError::Remote))
        }
    }

    fn claim(&mut self, request: &ClaimRequest, now_ms: u64) -> Answer<Result<ClaimAnswer, StateError>> {
        let claim = remote_state::claim(self.policy, self.redis, request, now_ms);
        let command = claim.command.clone();
        let sent = self.send(&command, Pending::Claim(claim));
        Self::later_or_remote(sent)
    }

    fn finish(
        &mut self,
        request: &FinishRequest,
        now_ms: u64,
        log: &FinishLog,
        resume_response: bool,
    ) -> Answer<Result<FinishAnswer, StateError>> {
        match remote_state::finish(self.policy, self.redis, request, now_ms) {
            FinishPlan::Done(answer) => Answer::Now(Ok(answer)),
            FinishPlan::Send { command, on_success } => {
                let pending = Pending::Finish { command: command.clone(), on_success, log: log.clone(), resume_response };
                let sent = self.send(&command, pending);
                Self::later_or_remote(sent)
            }
        }
    }

    fn clear(&mut self, key: KeyHash, now_ms: u64) -> Answer<Result<ClearAnswer, StateError>> {
        let command = remote_state::clear_read(self.redis, key);
        let sent = self.send(&command, Pending::ClearRead { command: command.clone(), key, now_ms });
        Self::later_or_remote(sent)
    }

    // No header-time read (`ReplayState::peek`): an extra round trip per request is not worth
    // it; the claim at body time decides (and nothing is executed before it).
}

/// replay-guard's flow for one stream.
pub struct ReplayFlow {
    policy: Arc<ReplayPolicy>,
    meter: Meter,
    claims: Arc<ClaimIds>,
    exchange: Option<Exchange>,
    /// The header-time read of the key's bucket (local store): the claim commits against it.
    peek: Option<KeyPeek>,
    stage: Stage,
    operator_context: String,
    /// Redis callouts in flight (Redis backend only).
    calls: Calls<Pending>,
    /// Response body chunks are held (Redis backend) until the record is written.
    holding_response: bool,
}

impl ReplayFlow {
    pub fn new(policy: Arc<ReplayPolicy>, claims: Arc<ClaimIds>) -> Self {
        ReplayFlow {
            policy,
            meter: meter(),
            claims,
            exchange: None,
            peek: None,
            stage: Stage::Idle,
            operator_context: String::new(),
            calls: Calls::default(),
            holding_response: false,
        }
    }
}

impl Flow for ReplayFlow {
    fn on_event(&mut self, event: Event, host: &mut dyn Host) -> Step {
        match event {
            Event::RequestHeaders { end_of_stream } => self.request_headers(host, end_of_stream),
            Event::RequestBody { buffered, end_of_stream } => self.request_body(host, buffered, end_of_stream),
            Event::RequestTrailers => self.request_trailers(host),
            Event::ResponseHeaders { end_of_stream } => self.response_headers(host, end_of_stream),
            Event::ResponseBody { buffered, end_of_stream } => self.response_body(host, buffered, end_of_stream),
            Event::ResponseTrailers => self.response_trailers(host),
            Event::CallAnswer { call, body_size } => self.call_answer(host, call, body_size),
            Event::StreamEnd => {
                // The stream ended; an exchange still owning its key got no complete answer. With
                // Redis the update is sent without waiting (the stream is gone; Envoy may cancel
                // the callout with the context): if it is lost the record stays in flight and is
                // `outcome_unknown` after in_flight_timeout_ms, never free. Nothing to resume.
                self.finish(host, false, false);
                Step::Hold
            }
        }
    }
}

impl ReplayFlow {
    fn request_headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> Step {
        let headers = match host.request_headers() {
            Ok(headers) => headers,
            Err(_) => return self.reject_with(host, Rejection::new(Code::RequestHeadersInvalid), ""),
        };
        let principal = match host.principal() {
            Ok(principal) => principal,
            Err(failed) => {
                return self.reject(host, &ReplayError::StateUnavailable, &format!("principal_unreadable={failed:?}"));
            }
        };
        let facts = RequestFacts {
            method: header(&headers, ":method").unwrap_or(""),
            path_and_query: header(&headers, ":path").unwrap_or(""),
            headers: &headers,
            principal: principal.as_deref(),
        };
        if let Some((allowed, context)) = operator_request(&self.policy, &facts) {
            if let Err(error) = allowed {
                return self.reject_operator(host, &error, &context);
            }
            if end_of_stream {
                return self.reject_operator(host, &ReplayError::ClearRequestInvalid("a JSON body is required"), &context);
            }
            self.operator_context = context;
            self.stage = Stage::Operator;
            return Step::Continue;
        }
        match Exchange::begin(&self.policy, &facts) {
            Ok(None) => {
                host.count_passed(&self.meter, "passed_unprotected");
                Step::Continue
            }
            Err((error, context)) => self.reject(host, &error, &context),
            Ok(Some(exchange)) => {
                let early = self.early_answer(host, &exchange);
                self.exchange = Some(exchange);
                if let Some(answer) = early {
                    host.count(&self.meter, "decided_at_headers");
                    return self.on_claim_answer(host, Ok(answer), None);
                }
                if end_of_stream {
                    return self.claim(host, &super::exchange::EMPTY_BODY_SHA256);
                }
                // Envoy turns a paused header callback into "stop everything" and the body would
                // never reach this filter: the headers continue (nothing executes without the
                // body), and the body is held below until it is complete and claimed. Put
                // Envoy's buffer filter first in the chain (see README).
                self.stage = Stage::Body;
                Step::Continue
            }
        }
    }

    fn request_body(&mut self, host: &mut dyn Host, buffered: usize, end_of_stream: bool) -> Step {
        match self.stage {
            Stage::Operator if end_of_stream || buffered > MAX_CLEAR_BODY => return self.operator_clear(host, buffered),
            Stage::Operator => return Step::Hold,
            Stage::Body => {}
            Stage::AwaitingStore | Stage::Answered => return Step::Hold,
            Stage::Idle | Stage::Forwarded => return Step::Continue,
        }
        if u64::try_from(buffered).unwrap_or(u64::MAX) > self.policy.max_body_bytes {
            let context = self.context();
            return self.reject(host, &ReplayError::BodyTooLarge, &context);
        }
        if !end_of_stream {
            return Step::Hold;
        }
        self.finish_body(host, buffered, true)
    }

    fn request_trailers(&mut self, host: &mut dyn Host) -> Step {
        match self.stage {
            Stage::Body => {
                let size = usize::try_from(self.policy.max_body_bytes).unwrap_or(usize::MAX).saturating_add(1);
                self.finish_body(host, size, false)
            }
            Stage::Operator => self.operator_clear(host, 0),
            Stage::AwaitingStore | Stage::Answered => Step::Hold,
            Stage::Idle | Stage::Forwarded => Step::Continue,
        }
    }

    fn response_headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> Step {
        let owns = self.stage == Stage::Forwarded && self.exchange.as_ref().is_some_and(Exchange::owns_key);
        if !owns {
            return Step::Continue;
        }
        let headers = host.response_headers().unwrap_or_default();
        let status = header(&headers, ":status").and_then(|s| s.parse::<u16>().ok());
        let via_upstream = host.response_from_upstream();
        if let (Some(exchange), Some(status)) = (self.exchange.as_mut(), status) {
            exchange.on_response_headers(&self.policy, status, via_upstream, &headers);
        }
        self.holding_response = matches!(self.policy.state, Backend::Redis(_));
        if end_of_stream && self.finish(host, true, true) {
            return Step::Hold;
        }
        Step::Continue
    }

    fn response_body(&mut self, host: &mut dyn Host, buffered: usize, end_of_stream: bool) -> Step {
        let Some(exchange) = self.exchange.as_mut() else { return Step::Continue };
        if !exchange.owns_key() {
            return Step::Continue;
        }
        let room = exchange.body_room(&self.policy);
        if !end_of_stream && self.holding_response && buffered <= hold_limit(&self.policy) {
            // With Redis the answer (up to hold_limit bytes) is held until its record is
            // written: a client that has every byte of a content-length body closes the stream,
            // and Envoy would cancel the update with it. Envoy buffers the held chunks; the next
            // event's `buffered` covers all of them, read once at the end.
            return Step::Hold;
        }
        self.holding_response = false;
        if buffered > 0 {
            // One byte past the room is enough to know it overflows.
            match host.response_body(buffered.min(room.saturating_add(1))) {
                Ok(chunk) => exchange.on_response_body(&self.policy, &chunk),
                // Cannot read the answer: complete the key without storing the body.
                Err(_) => exchange.on_response_body(&self.policy, &vec![0; room.saturating_add(1)]),
            }
        }
        if end_of_stream && self.finish(host, true, true) {
            return Step::Hold;
        }
        Step::Continue
    }

    fn response_trailers(&mut self, host: &mut dyn Host) -> Step {
        if std::mem::take(&mut self.holding_response) {
            // The held body cannot be read from the trailers callback: record the outcome
            // without the body (never a truncated one).
            if let Some(exchange) = self.exchange.as_mut() {
                let room = exchange.body_room(&self.policy);
                exchange.on_response_body(&self.policy, &vec![0; room.saturating_add(1)]);
            }
        }
        if self.finish(host, true, true) {
            return Step::Hold;
        }
        Step::Continue
    }

    /// The answer to a Redis command this flow sent. `Continue` resumes what the flow stopped
    /// (the request after a claim that forwards, the answer held for its finish write).
    fn call_answer(&mut self, host: &mut dyn Host, call: CallId, body_size: usize) -> Step {
        let limit = remote_state::max_reply_bytes(&self.policy);
        let Some((pending, delivered)) = self.calls.deliver(host, call, body_size, limit) else { return Step::Hold };
        // `too_large`: the answer was not read (why, for the log line).
        let (status, body, too_large) = match delivered {
            Ok(answer) => (answer.status, answer.body, None),
            Err(error) => (None, Vec::new(), Some(call_error(&error))),
        };
        let why = |command: &RemoteCommand| -> String {
            match &too_large {
                Some(why) => why.clone(),
                None => remote_state::describe(command, status, &body),
            }
        };
        match pending {
            Pending::Claim(claim) => {
                let answer =
                    if too_large.is_some() { Err(StateError::Remote) } else { claim.answer(&self.policy, status, &body) };
                let error = answer.is_err().then(|| why(&claim.command));
                if answer == Err(StateError::Remote) {
                    // Redis may have applied the claim although its answer was lost: the
                    // request is not forwarded, so this claim's record is deleted (compare-and-
                    // delete) before the 503, else the key would read outcome_unknown for the TTL.
                    let policy = self.policy.clone();
                    if let Backend::Redis(redis) = &policy.state {
                        if let Some(command) = claim.unwind(redis) {
                            let bytes = command.body.clone();
                            let unwind = Pending::Unwind { command, why: error.clone().unwrap_or_default() };
                            if self.calls.start(host, redis, &bytes, unwind).is_ok() {
                                return Step::Hold;
                            }
                        }
                    }
                }
                // Continue (forward) resumes the request; a failed resume leaves it paused and
                // Envoy's stream timeout ends it.
                self.on_claim_answer(host, answer, error.as_deref())
            }
            Pending::Finish { command, on_success, log, resume_response } => {
                let answer = if too_large.is_some() {
                    Err(StateError::Remote)
                } else {
                    remote_state::finish_answer(&command, on_success, status, &body)
                };
                let error = answer.is_err().then(|| why(&command));
                self.record_finish(host, answer, &|| log.clone(), error.as_deref());
                if resume_response {
                    Step::Continue
                } else {
                    Step::Hold
                }
            }
            Pending::Unwind { command, why: claim_error } => {
                let outcome = if too_large.is_some() {
                    Err(StateError::Remote)
                } else {
                    remote_state::unwind_answer(&command, status, &body)
                };
                let counter = match outcome {
                    Ok(true) => "claim_unwound",
                    Ok(false) => "claim_unwind_not_needed",
                    Err(_) => "claim_unwind_failed",
                };
                host.count(&self.meter, counter);
                let context = self.context();
                let mut line = format!("firebreak {PLUGIN} {counter} {context}");
                if outcome.is_err() {
                    line.push_str(&format!(" store_error={:?}", why(&command)));
                }
                host.log(if outcome.is_err() { Level::Error } else { Level::Warn }, &line);
                // Refused whatever the unwind did: the claim never answered (in report-only mode
                // counted, and the request resumes unguarded).
                match self.on_claim_answer(host, Err(StateError::Remote), Some(&claim_error)) {
                    Step::Continue if self.policy.mode == Mode::Enforce => Step::Hold,
                    step => step,
                }
            }
            Pending::ClearRead { command, key, now_ms } => {
                let policy = self.policy.clone();
                let Backend::Redis(redis) = &policy.state else { return Step::Hold };
                let context = self.operator_context.clone();
                let step = if too_large.is_some() {
                    Err(StateError::Remote)
                } else {
                    remote_state::clear_after_read(&policy, redis, key, now_ms, &command, status, &body)
                };
                match step {
                    Ok(ClearStep::Done(answer)) => self.respond_clear(host, Ok(answer), &context),
                    Ok(ClearStep::Delete { command, on_success }) => {
                        let bytes = command.body.clone();
                        match self.calls.start(host, redis, &bytes, Pending::ClearDelete { command, on_success }) {
                            Ok(()) => Step::Hold,
                            Err((_, error)) => {
                                let context = format!("{context} store_error={:?}", call_error(&error));
                                self.respond_clear(host, Err(StateError::Remote), &context)
                            }
                        }
                    }
                    Err(error) => {
                        let context = format!("{context} store_error={:?}", why(&command));
                        self.respond_clear(host, Err(error), &context)
                    }
                }
            }
            Pending::ClearDelete { command, on_success } => {
                let context = self.operator_context.clone();
                let answer = if too_large.is_some() {
                    Err(StateError::Remote)
                } else {
                    remote_state::clear_answer(&command, on_success, status, &body)
                };
                match answer {
                    Ok(Some(answer)) => self.respond_clear(host, Ok(answer), &context),
                    Ok(None) => self.reject_operator(host, &ReplayError::ClearRefused("changing (retry the clear)"), &context),
                    Err(error) => {
                        let context = format!("{context} store_error={:?}", why(&command));
                        self.respond_clear(host, Err(error), &context)
                    }
                }
            }
        }
    }

    /// The exchange's log context (empty without one), formatted when a line is written.
    fn context(&self) -> String {
        self.exchange.as_ref().map(|e| e.context(&self.policy)).unwrap_or_default()
    }

    /// Refuses with the exchange's context.
    fn refuse(&mut self, host: &mut dyn Host, error: &ReplayError) -> Step {
        let context = self.context();
        self.reject(host, error, &context)
    }

    fn reject(&mut self, host: &mut dyn Host, error: &ReplayError, context: &str) -> Step {
        self.reject_with(host, error.rejection(), context)
    }

    /// Refuses the request in enforce mode. In report-only mode the refusal is counted
    /// (`would_reject.<code>`) and logged, and the request goes on unguarded: it owns no key, so
    /// its answer is neither captured nor recorded (the record of the key's first request stays
    /// as it is), and nothing more is checked.
    fn reject_with(&mut self, host: &mut dyn Host, rejection: Rejection, context: &str) -> Step {
        match refuse(host, &self.meter, self.policy.mode, Level::Warn, rejection, context) {
            Some(step) => {
                self.stage = Stage::Answered;
                step
            }
            None => self.go_on_unguarded(),
        }
    }

    /// Report-only: the request goes on as one this filter does not guard.
    fn go_on_unguarded(&mut self) -> Step {
        self.stage = Stage::Forwarded;
        self.peek = None;
        self.holding_response = false;
        Step::Continue
    }

    /// Answers an operator's clear request with a refusal, in either mode: the operator endpoint
    /// is this filter's own, never forwarded.
    fn reject_operator(&mut self, host: &mut dyn Host, error: &ReplayError, context: &str) -> Step {
        self.stage = Stage::Answered;
        reject(host, &self.meter, Level::Warn, error.rejection(), context)
    }

    /// The whole body is known (its SHA-256): fingerprint, claim, decide.
    fn claim(&mut self, host: &mut dyn Host, body_sha256: &[u8; 32]) -> Step {
        let Some(exchange) = self.exchange.as_ref() else { return Step::Continue };
        let Some(now) = host.now_ms() else {
            return self.refuse(host, &ReplayError::StateUnavailable);
        };
        let claim_id = self.claims.next(now);
        let Some(request) = exchange.claim_request_of_body_sha256(&self.policy, body_sha256, claim_id) else {
            // Optional key absent and collapse off on this route: nothing to claim.
            host.count_passed(&self.meter, "forwarded_unguarded");
            if host.logs_debug() {
                host.log(Level::Debug, &format!("firebreak {PLUGIN} forward_unguarded {}", exchange.context(&self.policy)));
            }
            self.stage = Stage::Forwarded;
            return Step::Continue;
        };
        let policy = self.policy.clone();
        let (answer, error) = match &policy.state {
            Backend::Local => {
                let state = LocalState { policy: &policy, store: host.store() };
                (Answer::Now(state.claim_after_peek(&request, now, self.peek.take())), None)
            }
            Backend::Redis(redis) => {
                let mut state = RemoteState { policy: &policy, redis, host: &mut *host, calls: &mut self.calls, error: None };
                let answer = state.claim(&request, now);
                (answer, state.error)
            }
        };
        match answer {
            Answer::Now(answer) => self.on_claim_answer(host, answer, error.as_deref()),
            // The Redis store delivers its answer as a call answer, to `on_claim_answer`; a
            // forward then resumes the request.
            Answer::Later => {
                self.stage = Stage::AwaitingStore;
                Step::Hold
            }
        }
    }

    /// Applies the store's answer: forward, reject, or replay. Also the entry point for an
    /// answer that arrives later (its `Continue` then resumes the request).
    /// `store_error`: why the store did not answer (for the log line), never a value.
    fn on_claim_answer(
        &mut self,
        host: &mut dyn Host,
        answer: Result<ClaimAnswer, StateError>,
        store_error: Option<&str>,
    ) -> Step {
        let Some(exchange) = self.exchange.as_mut() else { return Step::Continue };
        if let Ok(ClaimAnswer::OutcomeUnknown { stale_in_flight: true }) = answer {
            host.count(&self.meter, "stale_in_flight");
        }
        if let Some(why) = store_error {
            host.count(&self.meter, "remote_error");
            host.log(
                Level::Error,
                &format!("firebreak {PLUGIN} remote_error op=claim store_error={why:?} {}", exchange.context(&self.policy)),
            );
        }
        // Formatted only when a line is written.
        let context = |exchange: &Exchange, policy: &ReplayPolicy| match store_error {
            Some(why) => format!("{} store_error={why:?}", exchange.context(policy)),
            None => exchange.context(policy),
        };
        match exchange.on_claim(&self.policy, answer) {
            Decision::Forward => {
                let what = if exchange.owns_key() { "forwarded" } else { "forwarded_first_of_fingerprint" };
                host.count_passed(&self.meter, what);
                if host.logs_debug() {
                    host.log(Level::Debug, &format!("firebreak {PLUGIN} {what} {}", context(exchange, &self.policy)));
                }
                self.stage = Stage::Forwarded;
                Step::Continue
            }
            Decision::Reject(error) => {
                let context = context(exchange, &self.policy);
                self.reject(host, &error, &context)
            }
            Decision::Replay(response) if self.policy.mode == Mode::ReportOnly => {
                // Counted and logged; the request goes to the upstream instead, and the stored
                // answer stays the key's.
                host.count(&self.meter, "would_replay");
                let line =
                    format!("firebreak {PLUGIN} would_replay status={} {}", response.status, context(exchange, &self.policy));
                host.log(Level::Warn, &line);
                self.go_on_unguarded()
            }
            Decision::Replay(response) => {
                self.stage = Stage::Answered;
                host.count(&self.meter, "replayed");
                let line = format!("firebreak {PLUGIN} replayed status={} {}", response.status, context(exchange, &self.policy));
                host.log(Level::Info, &line);
                Step::Respond(Response { status: response.status, headers: response.headers, body: response.body })
            }
        }
    }

    /// The answer ended (or the stream did): record what it proves. `true` when the write went
    /// to Redis and the response waits for it (`pause_response`): the caller holds, and the
    /// write's answer resumes the response. A client therefore sees the answer only once its key
    /// is completed on every instance.
    fn finish(&mut self, host: &mut dyn Host, complete: bool, pause_response: bool) -> bool {
        let Some(exchange) = self.exchange.as_mut() else { return false };
        let Some(request) = exchange.finish(&self.policy, complete) else { return false };
        let Some(exchange) = self.exchange.as_ref() else { return false };
        let outcome = match &request.outcome {
            Outcome::Completed { status, .. } | Outcome::Unknown { status } => FinishOutcome::Status(*status),
            Outcome::Release => FinishOutcome::Release,
        };
        // The context is formatted only when a line is written (or a Redis write carries it).
        let log = || FinishLog { outcome, complete, context: exchange.context(&self.policy) };
        // A local record expires with its claim (claimed at + TTL) and is ours by its claim id,
        // so the local finish works at the claim's time and reads no clock: it writes only its
        // own slot, and a record taken over meanwhile has another claim id (`NotOwner`). An
        // answer that outlives the TTL with its slot untouched completes a record already
        // expired (read as free). Redis's finish sets a TTL relative to now, so it reads the
        // clock.
        let now = match &self.policy.state {
            Backend::Local => Some(request.owner.record.claimed_at_ms),
            Backend::Redis(_) => host.now_ms(),
        };
        let Some(now) = now else {
            self.record_finish(host, Err(StateError::Unavailable), &log, None);
            return false;
        };
        let policy = self.policy.clone();
        let (answer, error) = match &policy.state {
            Backend::Local => (LocalState { policy: &policy, store: host.store() }.finish(&request, now), None),
            Backend::Redis(redis) => {
                let mut state = RemoteState { policy: &policy, redis, host: &mut *host, calls: &mut self.calls, error: None };
                let answer = state.finish(&request, now, &log(), pause_response);
                (answer, state.error)
            }
        };
        match answer {
            Answer::Now(answer) => {
                self.record_finish(host, answer, &log, error.as_deref());
                false
            }
            Answer::Later => {
                if pause_response {
                    host.count(&self.meter, "finish_paused_response");
                }
                pause_response
            }
        }
    }

    fn record_finish(
        &self,
        host: &mut dyn Host,
        answer: Result<FinishAnswer, StateError>,
        log: &dyn Fn() -> FinishLog,
        store_error: Option<&str>,
    ) {
        let happy_path = matches!(answer, Ok(FinishAnswer::Completed { stored: true })) && store_error.is_none();
        let (counter, level) = match answer {
            Ok(FinishAnswer::Completed { stored: true }) => ("completed", Level::Info),
            Ok(FinishAnswer::Completed { stored: false }) => ("completed_not_stored", Level::Info),
            Ok(FinishAnswer::OutcomeUnknown) => ("outcome_unknown_recorded", Level::Warn),
            Ok(FinishAnswer::Released) => ("released", Level::Info),
            Ok(FinishAnswer::NotOwner) => ("finish_not_owner", Level::Warn),
            // The record stays in flight and turns outcome_unknown after in_flight_timeout_ms:
            // a failed write can never free a key whose request executed.
            Err(_) => ("finish_failed", Level::Error),
        };
        if happy_path {
            host.count_passed(&self.meter, counter);
        } else {
            host.count(&self.meter, counter);
        }
        if store_error.is_some() {
            host.count(&self.meter, "remote_error");
        }
        // The happy path (completed and stored) is logged only at debug level: the counter counts.
        let level = if !happy_path {
            level
        } else if host.logs_debug() {
            Level::Debug
        } else {
            return;
        };
        let log = log();
        let mut line = format!("firebreak {PLUGIN} {counter} {} complete={} {}", log.outcome, log.complete, log.context);
        if let Some(why) = store_error {
            line.push_str(&format!(" store_error={why:?}"));
        }
        host.log(level, &line);
    }

    /// A key still in flight is refused at header time, before the router opens an upstream
    /// request for the retry. Store errors are left to the claim (which fails closed). The read
    /// of the key's bucket is kept for the claim; the clock is read only when the bucket holds a
    /// record of the key (a new key needs no time to be known free).
    fn early_answer(&mut self, host: &mut dyn Host, exchange: &Exchange) -> Option<ClaimAnswer> {
        if !matches!(self.policy.state, Backend::Local) {
            // The Redis store does not peek (see RemoteState).
            return None;
        }
        let address = exchange.key_address(&self.policy)?;
        let peek = LocalState { policy: &self.policy, store: host.store() }.peek_key(address).ok()?;
        let answer = if peek.mentions_key() {
            host.now_ms().and_then(|now| match peek.record(now) {
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
    fn operator_clear(&mut self, host: &mut dyn Host, body_size: usize) -> Step {
        let context = self.operator_context.clone();
        if body_size > MAX_CLEAR_BODY {
            return self.reject_operator(host, &ReplayError::ClearRequestInvalid("body too large"), &context);
        }
        // A JSON document: parsed from one slice (joined only if the host holds it in chunks).
        let policy = &self.policy;
        let parsed = match read_request_body(host, MAX_CLEAR_BODY, |body| parse_clear(policy, &body.contiguous())) {
            Ok(parsed) => parsed,
            Err(_) => return self.reject_operator(host, &ReplayError::StateUnavailable, &context),
        };
        let (key, target) = match parsed {
            Ok(parsed) => parsed,
            Err(error) => return self.reject_operator(host, &error, &context),
        };
        let context = format!("{context} {target}");
        let Some(now) = host.now_ms() else {
            return self.reject_operator(host, &ReplayError::StateUnavailable, &context);
        };
        let policy = self.policy.clone();
        let (answer, error) = match &policy.state {
            Backend::Local => (LocalState { policy: &policy, store: host.store() }.clear(key, now), None),
            Backend::Redis(redis) => {
                let mut state = RemoteState { policy: &policy, redis, host: &mut *host, calls: &mut self.calls, error: None };
                let answer = state.clear(key, now);
                (answer, state.error)
            }
        };
        self.operator_context = context.clone();
        match answer {
            Answer::Now(answer) => {
                let context = match error {
                    Some(why) => format!("{context} store_error={why:?}"),
                    None => context,
                };
                self.respond_clear(host, answer, &context)
            }
            Answer::Later => Step::Hold,
        }
    }

    /// The store's answer to an operator clear becomes the operator's response.
    fn respond_clear(&mut self, host: &mut dyn Host, answer: Result<ClearAnswer, StateError>, context: &str) -> Step {
        if let Err(StateError::Remote) = answer {
            host.count(&self.meter, "remote_error");
        }
        match answer {
            Ok(ClearAnswer::Cleared { stale_in_flight }) => {
                self.stage = Stage::Answered;
                host.count(&self.meter, "operator_cleared");
                host.log(
                    Level::Warn,
                    &format!("firebreak {PLUGIN} operator_cleared stale_in_flight={stale_in_flight} {context}"),
                );
                let body = format!("{{\"cleared\":true,\"stale_in_flight\":{stale_in_flight}}}");
                Step::Respond(Response {
                    status: 200,
                    headers: vec![("content-type".to_string(), "application/json".to_string())],
                    body: body.into_bytes(),
                })
            }
            Ok(ClearAnswer::NotFound) => self.reject_operator(host, &ReplayError::ClearNotFound, context),
            Ok(ClearAnswer::InFlight) => self.reject_operator(host, &ReplayError::ClearRefused("still in flight"), context),
            Ok(ClearAnswer::Completed) => self.reject_operator(host, &ReplayError::ClearRefused("completed"), context),
            Err(error) => self.reject_operator(host, &ReplayError::from(error), context),
        }
    }

    /// The body is complete (`size` bytes at most): its SHA-256 from request-signature when that
    /// filter verified a signed `sha-256` Content-Digest earlier in this stream (a large body of
    /// a signed request), else read and hashed here. `size_known`: `size` is the body's exact
    /// size (not a bound from the trailers event).
    fn finish_body(&mut self, host: &mut dyn Host, size: usize, size_known: bool) -> Step {
        let signed = self.exchange.as_ref().is_some_and(|e| e.principal().is_some());
        let max_body_bytes = self.policy.max_body_bytes;
        let too_large = move |len: usize| u64::try_from(len).unwrap_or(u64::MAX) > max_body_bytes;
        if signed && size_known {
            if too_large(size) {
                return self.refuse(host, &ReplayError::BodyTooLarge);
            }
            if let Some(digest) = host.body_sha256(size) {
                return self.claim(host, &digest);
            }
        }
        // Hashed in place, chunk by chunk.
        let read = read_request_body(host, size, |body| (!too_large(body.len())).then(|| body_sha256(body)));
        match read {
            Ok(Some(digest)) => self.claim(host, &digest),
            Ok(None) => self.refuse(host, &ReplayError::BodyTooLarge),
            Err(_) => self.refuse(host, &ReplayError::StateUnavailable),
        }
    }
}

/// replay-guard, configured.
pub struct ReplayFactory {
    pub policy: Arc<ReplayPolicy>,
    claims: Arc<ClaimIds>,
}

impl ReplayFactory {
    /// `entropy`: the configuration's random bytes (the claim ids' seed is made of them).
    pub fn new(policy: ReplayPolicy, entropy: [u8; 32]) -> Self {
        ReplayFactory { policy: Arc::new(policy), claims: Arc::new(ClaimIds::new(entropy)) }
    }
}

impl FlowFactory for ReplayFactory {
    fn new_flow(&self) -> Box<dyn Flow> {
        Box::new(ReplayFlow::new(self.policy.clone(), self.claims.clone()))
    }

    fn meter(&self) -> Meter {
        meter()
    }

    fn counters(&self) -> Vec<String> {
        let mut names: Vec<String> = COUNTERS.iter().map(|name| name.to_string()).collect();
        if self.policy.mode == Mode::ReportOnly {
            names.push("would_replay".to_string());
            names.extend(crate::would_reject_counter_names());
        }
        names
    }

    fn configured(&self) -> Vec<(Level, String)> {
        configured(&self.policy)
    }

    /// The idempotency-key and collapse tables and their per-tenant quota records (local state
    /// only; a stored response lives beside its key's record, so the key table bounds them).
    fn stores(&self) -> Vec<crate::flow::fill::StoreTable> {
        use crate::flow::fill::StoreTable;
        if self.policy.state != Backend::Local {
            return Vec::new();
        }
        vec![
            StoreTable::new(meter(), "keys", &self.policy.key_table),
            StoreTable::new(meter(), "key_quotas", &self.policy.key_quota.table),
            StoreTable::new(meter(), "collapse", &self.policy.collapse_table),
            StoreTable::new(meter(), "collapse_quotas", &self.policy.collapse_quota.table),
        ]
    }
}

/// Configures replay-guard ([`crate::filters::Configure`]): parses the configuration and binds
/// its local tables; the claim ids' seed is made of the configuration's random bytes.
pub fn configure(json: &[u8], setup: &crate::filters::Setup<'_>) -> Result<Arc<dyn FlowFactory>, crate::ConfigError> {
    let mut policy = ReplayPolicy::from_json(json)?;
    policy.bind_tables(setup.store, setup.entropy)?;
    Ok(Arc::new(ReplayFactory::new(policy, setup.entropy)))
}
