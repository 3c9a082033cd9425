//! replay-guard: each money operation is forwarded exactly once.
//!
//! - Requests carrying an `Idempotency-Key` (draft-ietf-httpapi-idempotency-key-header) claim the
//!   key, scoped to the verified principal and the route, before they are forwarded. Retries get
//!   the stored answer (with a marker header), 409 while the first is in flight or when its
//!   outcome is unknown, 422 when the key is reused for a different request.
//! - Requests without a key are collapsed: identical fingerprints within a short window get 409.
//! - An answer that does not prove what happened (5xx, timeout, reset, local reply) locks the key
//!   as `outcome_unknown` instead of freeing it: money moves never twice, never zero.
//!
//! Decisions are pure functions of (request facts, stored record, now); the store behind them is
//! the [`ReplayState`] trait, whose answer may arrive later (see [`state`]).

mod config;
mod exchange;
pub mod flow;
mod record;
pub mod redis;
pub mod state;

pub use config::{
    KeyMode, OnUncertain, OperatorClear, ReplayPolicy, ReplayRoute, COLLAPSE_TABLE_PREFIX, DEFAULT_NOT_EXECUTED_STATUSES,
    KEY_TABLE_PREFIX, RESPONSE_PREFIX,
};
pub use exchange::{
    body_sha256, body_sha256_from_content_digest, classify, key_hash, operator_request, parse_clear, parse_idempotency_key,
    Classification, Decision, Exchange, ReplayError, RequestFacts, IDEMPOTENCY_KEY_HEADER, ORIGINAL_STATUS_HEADER,
};
pub use record::{KeyState, Record, StoredBody, StoredResponse, MAX_RESPONSE_HEAD_LEN, RECORD_LEN};
pub use state::{
    decide_claim, decide_clear, decide_early, decide_finish, Answer, ClaimAnswer, ClaimRequest, ClaimVerdict, ClearAnswer,
    FinishAnswer, FinishRequest, KeyPeek, LocalState, Outcome, Owner, ReplayState, StateError,
};

/// Every rejection code replay-guard can send (its README's table lists exactly these).
pub const CODES: &[crate::Code] = {
    use crate::Code::*;
    &[
        PathNotCanonical,
        IdempotencyKeyMissing,
        IdempotencyKeyInvalid,
        IdempotencyKeyDuplicated,
        RequestHeadersInvalid,
        PrincipalRequired,
        BodyTooLarge,
        IdempotencyKeyMismatch,
        RequestInFlight,
        OutcomeUnknown,
        DuplicateRequest,
        ResponseNotStored,
        TenantQuotaExceeded,
        ReplayStoreFull,
        ReplayStateUnavailable,
        StateUnavailable,
        OperatorForbidden,
        ClearRequestInvalid,
        KeyNotFound,
        KeyNotClearable,
    ]
};

#[cfg(test)]
mod fake_redis;
#[cfg(test)]
mod flow_tests;
#[cfg(test)]
mod tests;
