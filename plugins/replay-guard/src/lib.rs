//! replay-guard: each money operation is forwarded exactly once (Idempotency-Key, duplicate
//! collapse, `outcome_unknown` locking). Decisions live in `firebreak_core::replay`; this file
//! only moves data between Envoy and the core.

use std::cell::Cell;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::rc::Rc;

use firebreak_core::replay::{
    decide_early, operator_request, parse_clear, Answer, ClaimAnswer, ClearAnswer, Decision, Exchange, FinishAnswer, LocalState,
    ReplayError, ReplayPolicy, ReplayState, RequestFacts, StateError,
};
use firebreak_core::Rejection;
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
];

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(ReplayRoot {
            policy: None,
            counters: Rc::new(Counters::new("firebreak.replay_guard")),
            claims: Rc::new(ClaimIds { seed: RandomState::new(), next: Cell::new(0) }),
        })
    });
}}

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
}

impl Context for ReplayRoot {}

impl RootContext for ReplayRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        self.policy = glue::load_config(PLUGIN, ReplayPolicy::from_json).map(Rc::new);
        if let Some(policy) = &self.policy {
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
        self.counters.define_all(COUNTERS);
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
            stage: Stage::Idle,
            operator_context: String::new(),
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

/// Largest accepted operator clear request body.
const MAX_CLEAR_BODY: usize = 4096;

struct ReplayFilter {
    policy: Rc<ReplayPolicy>,
    counters: Rc<Counters>,
    claims: Rc<ClaimIds>,
    context_id: u32,
    exchange: Option<Exchange>,
    stage: Stage,
    operator_context: String,
}

impl Context for ReplayFilter {}

impl ReplayFilter {
    fn reject(&mut self, error: &ReplayError, context: &str) -> Action {
        self.reject_with(&error.rejection(), context)
    }

    fn reject_with(&mut self, rejection: &Rejection, context: &str) -> Action {
        self.stage = Stage::Answered;
        glue::reject(PLUGIN, &self.counters, rejection, context);
        Action::Pause
    }

    /// The whole body is known: fingerprint, claim, decide.
    fn claim(&mut self, body: &[u8]) -> Action {
        let Some(exchange) = self.exchange.as_ref() else { return Action::Continue };
        let context = exchange.context().to_string();
        let Some(now) = glue::now_ms() else {
            return self.reject(&ReplayError::StateUnavailable, &context);
        };
        let claim_id = self.claims.next(now, self.context_id);
        let Some(request) = exchange.claim_request(&self.policy, body, claim_id) else {
            // Optional key absent and collapse off on this route: nothing to claim.
            self.counters.increment("forwarded_unguarded");
            glue::log(LogLevel::Info, &format!("firebreak {PLUGIN} forward_unguarded {context}"));
            self.stage = Stage::Forwarded;
            return Action::Continue;
        };
        let answer = LocalState { policy: &self.policy, store: &HostStore }.claim(&request, now);
        match answer {
            Answer::Now(answer) => self.on_claim_answer(answer),
            // A store that answers later (cluster-wide store, later issue) delivers its answer
            // to `on_claim_answer` from its callback and then resumes the request.
            Answer::Later => {
                self.stage = Stage::AwaitingStore;
                Action::Pause
            }
        }
    }

    /// Applies the store's answer: forward, reject, or replay. Also the entry point for an
    /// answer that arrives later (the caller then resumes the request on `Continue`).
    fn on_claim_answer(&mut self, answer: Result<ClaimAnswer, StateError>) -> Action {
        let Some(exchange) = self.exchange.as_mut() else { return Action::Continue };
        if let Ok(ClaimAnswer::OutcomeUnknown { stale_in_flight: true }) = answer {
            self.counters.increment("stale_in_flight");
        }
        let context = exchange.context().to_string();
        match exchange.on_claim(&self.policy, answer) {
            Decision::Forward => {
                let what = if exchange.owns_key() { "forwarded" } else { "forwarded_first_of_fingerprint" };
                self.counters.increment(what);
                glue::log(LogLevel::Info, &format!("firebreak {PLUGIN} {what} {context}"));
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

    /// The answer ended (or the stream did): record what it proves.
    fn finish(&mut self, complete: bool) {
        let Some(exchange) = self.exchange.as_mut() else { return };
        let Some(request) = exchange.finish(&self.policy, complete) else { return };
        let context = exchange.context().to_string();
        let answer = match glue::now_ms() {
            Some(now) => LocalState { policy: &self.policy, store: &HostStore }.finish(&request, now),
            None => Answer::Now(Err(StateError::Unavailable)),
        };
        let (counter, level) = match answer {
            Answer::Now(Ok(FinishAnswer::Completed { stored: true })) => ("completed", LogLevel::Info),
            Answer::Now(Ok(FinishAnswer::Completed { stored: false })) => ("completed_not_stored", LogLevel::Info),
            Answer::Now(Ok(FinishAnswer::OutcomeUnknown)) => ("outcome_unknown_recorded", LogLevel::Warn),
            Answer::Now(Ok(FinishAnswer::Released)) => ("released", LogLevel::Info),
            Answer::Now(Ok(FinishAnswer::NotOwner)) => ("finish_not_owner", LogLevel::Warn),
            // The record stays in flight and turns outcome_unknown after in_flight_timeout_ms:
            // a failed write can never free a key whose request executed.
            Answer::Now(Err(_)) => ("finish_failed", LogLevel::Error),
            Answer::Later => return,
        };
        self.counters.increment(counter);
        let outcome = match &request.outcome {
            firebreak_core::replay::Outcome::Completed { status, .. } => format!("status={status}"),
            firebreak_core::replay::Outcome::Unknown { status } => format!("status={status}"),
            firebreak_core::replay::Outcome::Release => "release".to_string(),
        };
        glue::log(level, &format!("firebreak {PLUGIN} {counter} {outcome} complete={complete} {context}"));
    }

    /// A key still in flight is refused at header time, before the router opens an upstream
    /// request for the retry. Store errors are left to the claim (which fails closed).
    fn early_answer(&self, exchange: &Exchange) -> Option<ClaimAnswer> {
        let address = exchange.key_address(&self.policy)?;
        let now = glue::now_ms()?;
        let state = LocalState { policy: &self.policy, store: &HostStore };
        match state.peek(address, now) {
            Answer::Now(Ok(record)) => decide_early(record.as_ref(), now, self.policy.in_flight_timeout_ms),
            Answer::Now(Err(_)) | Answer::Later => None,
        }
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
        let state = LocalState { policy: &self.policy, store: &HostStore };
        let answer = match state.clear(key, now) {
            Answer::Now(answer) => answer,
            Answer::Later => Err(StateError::Unavailable),
        };
        match answer {
            Ok(ClearAnswer::Cleared { stale_in_flight }) => {
                self.stage = Stage::Answered;
                self.counters.increment("operator_cleared");
                glue::log(LogLevel::Warn, &format!("firebreak {PLUGIN} operator_cleared stale_in_flight={stale_in_flight} {context}"));
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

    fn finish_body(&mut self, size: usize) -> Action {
        let context = self.exchange.as_ref().map(|e| e.context().to_string()).unwrap_or_default();
        match glue::request_body(size) {
            Ok(body) if body.len() as u64 > self.policy.max_body_bytes => self.reject(&ReplayError::BodyTooLarge, &context),
            Ok(body) => self.claim(&body),
            Err(_) => self.reject(&ReplayError::StateUnavailable, &context),
        }
    }
}

impl HttpContext for ReplayFilter {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let headers = match glue::request_headers() {
            Ok(headers) => headers,
            Err(_) => {
                return self.reject_with(&Rejection::new(400, "request_headers_invalid", "request headers are not valid UTF-8"), "")
            }
        };
        let principal = glue::principal();
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
                self.counters.increment("passed_unprotected");
                Action::Continue
            }
            Err((error, context)) => self.reject(&error, &context),
            Ok(Some(exchange)) => {
                let early = self.early_answer(&exchange);
                self.exchange = Some(exchange);
                if let Some(answer) = early {
                    self.counters.increment("decided_at_headers");
                    return self.on_claim_answer(Ok(answer));
                }
                if end_of_stream {
                    return self.claim(&[]);
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
        self.finish_body(body_size)
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        match self.stage {
            Stage::Body => {
                let size = usize::try_from(self.policy.max_body_bytes).unwrap_or(usize::MAX).saturating_add(1);
                self.finish_body(size)
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
        if end_of_stream {
            self.finish(true);
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(exchange) = self.exchange.as_mut() else { return Action::Continue };
        if !exchange.owns_key() {
            return Action::Continue;
        }
        let room = exchange.body_room(&self.policy);
        if body_size > 0 {
            // One byte past the room is enough to know it overflows.
            match glue::response_body(body_size.min(room.saturating_add(1))) {
                Ok(chunk) => exchange.on_response_body(&self.policy, &chunk),
                // Cannot read the answer: complete the key without storing the body.
                Err(_) => exchange.on_response_body(&self.policy, &vec![0; room.saturating_add(1)]),
            }
        }
        if end_of_stream {
            self.finish(true);
        }
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        self.finish(true);
        Action::Continue
    }

    fn on_log(&mut self) {
        // The stream ended; an exchange still owning its key got no complete answer.
        self.finish(false);
    }
}
