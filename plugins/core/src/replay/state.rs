//! Where idempotency records live, behind an interface whose answer may arrive later.
//!
//! The decisions are pure functions ([`decide_claim`], [`decide_finish`]) of (stored record,
//! request facts, now). A store applies them atomically: [`LocalState`] inside one CAS-guarded
//! read-modify-write of a [`BucketTable`](crate::store::BucketTable) bucket over Envoy shared
//! data, answering at once ([`Answer::Now`]); a cluster-wide store (an HTTP callout to a Redis
//! bridge, a later issue) applies the same functions around its own compare-and-set and answers
//! [`Answer::Later`]: the filter pauses the request and hands the answer to the same
//! [`Exchange::on_claim`](super::Exchange::on_claim) when it arrives.

use std::num::NonZeroU64;

use crate::quota::{QuotaError, TenantQuota};
use crate::store::{BucketSnapshot, KeyHash, SharedStore, SlotAddress, StoreError, TableError, Update};

use super::config::ReplayPolicy;
use super::record::{companion_digest, KeyState, Record, StoredBody, StoredResponse};

/// An answer now, or a promise that the store will deliver it later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer<T> {
    Now(T),
    /// The store will call back (for the HTTP-callout store: `on_http_call_response`).
    Later,
}

/// Why the store could not answer. Both fail closed (503).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateError {
    /// Every slot the key could use holds a live record: refuse rather than forget one.
    Full,
    /// Host failure, contention beyond the retry budget, or bytes this code did not write.
    Unavailable,
    /// The cluster-wide store (Redis through its HTTP bridge) did not answer usably in time.
    Remote,
    /// The request's tenant (principal, or route when anonymous) used its quota of the table.
    QuotaExceeded,
}

impl From<TableError> for StateError {
    fn from(error: TableError) -> Self {
        match error {
            TableError::Full => StateError::Full,
            TableError::Contended | TableError::Unavailable | TableError::Corrupt | TableError::PayloadTooLarge => {
                StateError::Unavailable
            }
        }
    }
}

/// The claim a request makes before it is forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimRequest {
    /// An idempotency key (scoped to principal and route). `tenant`: whose quota it counts on.
    Key { key: KeyHash, fingerprint: [u8; 32], claim_id: u64, tenant: KeyHash },
    /// No key: the request's fingerprint, remembered for the route's collapse window.
    Collapse { key: KeyHash, window_ms: NonZeroU64, tenant: KeyHash },
}

/// The forwarded request that owns an idempotency record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub key: KeyHash,
    pub claim_id: u64,
    /// Where a local record lives (names the stored-response companion key).
    pub slot: Option<SlotAddress>,
    /// The in-flight record this claim wrote: a cluster-wide store compare-and-sets against it.
    pub record: Record,
}

/// What the store says about a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimAnswer {
    /// The request owns the key (or is the first of its fingerprint in the window): forward it.
    Forward { owner: Option<Owner> },
    /// The key's first request has not answered yet.
    InFlight,
    /// The key's first request was forwarded and its outcome is not known. `stale_in_flight`:
    /// it was still in flight after `in_flight_timeout_ms` (its owner died or it is very slow).
    OutcomeUnknown { stale_in_flight: bool },
    /// The key was used for a request with another fingerprint.
    Mismatch,
    /// The key completed: its stored response.
    Replay(StoredResponse),
    /// The key completed with this status, but its response was not stored (or cannot be read).
    NotStored { status: u16 },
    /// No key, and an identical request came within the collapse window.
    Duplicate,
}

/// How a forwarded request ended, as far as the key is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered; `response` is `None` when it was too large to store.
    Completed { status: u16, response: Option<StoredResponse> },
    /// The answer does not prove whether the operation executed.
    Unknown { status: u16 },
    /// The answer proves that nothing executed (or the route allows repeating): free the key.
    Release,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishRequest {
    pub owner: Owner,
    pub outcome: Outcome,
}

/// What happened to the record when its request finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishAnswer {
    Completed {
        stored: bool,
    },
    OutcomeUnknown,
    Released,
    /// The record is no longer this request's (it expired, and its slot may hold another key).
    NotOwner,
}

/// What an operator's clear did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClearAnswer {
    /// The key was `outcome_unknown` (or in flight past the timeout) and is free now.
    Cleared { stale_in_flight: bool },
    /// No live record for the key.
    NotFound,
    /// The key's request is still running: clearing it could execute the operation twice.
    InFlight,
    /// The key completed: its answer is known and is replayed; clearing would re-execute.
    Completed,
}

/// The state interface of the filter.
pub trait ReplayState {
    fn claim(&self, request: &ClaimRequest, now_ms: u64) -> Answer<Result<ClaimAnswer, StateError>>;
    fn finish(&self, request: &FinishRequest, now_ms: u64) -> Answer<Result<FinishAnswer, StateError>>;
    /// An operator frees an `outcome_unknown` key after reconciling it.
    fn clear(&self, key: KeyHash, now_ms: u64) -> Answer<Result<ClearAnswer, StateError>>;
    /// A read of the key's record at header time, before the body (see [`decide_early`]). A
    /// store for which an extra read is not worth it answers `Now(Ok(None))`.
    fn peek(&self, key: KeyHash, now_ms: u64) -> Answer<Result<Option<Record>, StateError>>;
}

/// Pure: what the key's record already says at header time, whatever the body will be. Only a
/// request still in flight (not past the timeout) is refused this early (`409 request_in_flight`,
/// which takes precedence over a fingerprint mismatch): a flood of retries is then answered
/// before the router opens an upstream request for each. Everything else waits for the body and
/// the claim, which decides authoritatively; this never forwards anything.
pub fn decide_early(current: Option<&Record>, now_ms: u64, in_flight_timeout_ms: NonZeroU64) -> Option<ClaimAnswer> {
    match current {
        Some(r) if r.state == KeyState::InFlight && now_ms.saturating_sub(r.claimed_at_ms) < in_flight_timeout_ms.get() => {
            Some(ClaimAnswer::InFlight)
        }
        _ => None,
    }
}

/// Pure: only an uncertain key can be cleared (`outcome_unknown`, or in flight past the timeout).
pub fn decide_clear(current: Option<&Record>, now_ms: u64, in_flight_timeout_ms: NonZeroU64) -> ClearAnswer {
    match current.map(|r| (r.state, r.claimed_at_ms)) {
        None => ClearAnswer::NotFound,
        Some((KeyState::OutcomeUnknown { .. }, _)) => ClearAnswer::Cleared { stale_in_flight: false },
        Some((KeyState::InFlight, at)) if now_ms.saturating_sub(at) >= in_flight_timeout_ms.get() => {
            ClearAnswer::Cleared { stale_in_flight: true }
        }
        Some((KeyState::InFlight, _)) => ClearAnswer::InFlight,
        Some((KeyState::Completed { .. }, _)) => ClearAnswer::Completed,
    }
}

/// The verdict on a keyed claim, given the record currently stored for the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimVerdict {
    Forward,
    InFlight,
    OutcomeUnknown { stale_in_flight: bool },
    Mismatch,
    Completed { status: u16, response: StoredBody, claim_id: u64 },
}

/// Pure: what a keyed claim gets, and the record to write (only when the key was free).
///
/// An in-flight record older than `in_flight_timeout_ms` is `outcome_unknown`, never free: its
/// request may have executed before its owner died.
pub fn decide_claim(
    current: Option<&Record>,
    fingerprint: [u8; 32],
    claim_id: u64,
    now_ms: u64,
    in_flight_timeout_ms: NonZeroU64,
) -> (ClaimVerdict, Option<Record>) {
    let Some(record) = current else {
        return (ClaimVerdict::Forward, Some(Record::in_flight(fingerprint, claim_id, now_ms)));
    };
    if record.fingerprint != fingerprint {
        return (ClaimVerdict::Mismatch, None);
    }
    let verdict = match record.state {
        KeyState::InFlight if now_ms.saturating_sub(record.claimed_at_ms) < in_flight_timeout_ms.get() => ClaimVerdict::InFlight,
        KeyState::InFlight => ClaimVerdict::OutcomeUnknown { stale_in_flight: true },
        KeyState::OutcomeUnknown { .. } => ClaimVerdict::OutcomeUnknown { stale_in_flight: false },
        KeyState::Completed { status, response } => ClaimVerdict::Completed { status, response, claim_id: record.claim_id },
    };
    (verdict, None)
}

/// What a finishing request writes to its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishWrite {
    Replace(Record),
    /// Free the slot (expire the record now).
    Release,
}

/// Pure: only the owner of a record still in flight may finish it (a late answer from an owner
/// that timed out still lands, and turns a provisional `outcome_unknown` into the truth).
pub fn decide_finish(
    current: Option<&Record>,
    claim_id: u64,
    outcome: &Outcome,
    digest: Option<[u8; 32]>,
) -> (FinishAnswer, Option<FinishWrite>) {
    let Some(record) = current.filter(|r| r.claim_id == claim_id && r.state == KeyState::InFlight) else {
        return (FinishAnswer::NotOwner, None);
    };
    match outcome {
        Outcome::Completed { status, .. } => {
            let response = match digest {
                Some(d) => StoredBody::Stored(d),
                None => StoredBody::NotStored,
            };
            let record = Record { state: KeyState::Completed { status: *status, response }, ..*record };
            (FinishAnswer::Completed { stored: digest.is_some() }, Some(FinishWrite::Replace(record)))
        }
        Outcome::Unknown { status } => {
            let record = Record { state: KeyState::OutcomeUnknown { status: *status }, ..*record };
            (FinishAnswer::OutcomeUnknown, Some(FinishWrite::Replace(record)))
        }
        Outcome::Release => (FinishAnswer::Released, Some(FinishWrite::Release)),
    }
}

/// A header-time read of the bucket a key lives in (one shared-data get), kept for the claim:
/// the claim commits against its CAS token instead of reading the bucket again.
#[derive(Debug, Clone)]
pub struct KeyPeek {
    key: KeyHash,
    snapshot: BucketSnapshot,
}

impl KeyPeek {
    /// Whether the bucket holds any record of the key (live or expired). When not, the key is
    /// free whatever the time, and the early decision needs no clock.
    pub fn mentions_key(&self) -> bool {
        self.snapshot.mentions(self.key)
    }

    /// The key's live record at `now_ms`.
    pub fn record(&self, now_ms: u64) -> Result<Option<Record>, StateError> {
        match self.snapshot.live(self.key, now_ms) {
            Some((payload, _, _)) => Record::decode(&payload).map(Some).ok_or(StateError::Unavailable),
            None => Ok(None),
        }
    }
}

/// The per-Envoy-instance store: bucket tables over shared data; answers at once.
pub struct LocalState<'a> {
    pub policy: &'a ReplayPolicy,
    pub store: &'a dyn SharedStore,
}

impl LocalState<'_> {
    fn charge(&self, quota: &TenantQuota, tenant: KeyHash, now_ms: u64) -> Result<(), StateError> {
        quota.charge(self.store, tenant, now_ms).map_err(|e| match e {
            QuotaError::Exceeded => StateError::QuotaExceeded,
            QuotaError::Table(e) => e.into(),
        })
    }

    fn companion_key(&self, slot: SlotAddress) -> String {
        // `<prefix>:<bucket>:<slot>` in one allocation of its size (no formatting machinery).
        let (mut bucket, mut index) = (itoa::Buffer::new(), itoa::Buffer::new());
        let (bucket, index) = (bucket.format(slot.bucket), index.format(slot.slot));
        let prefix = &self.policy.response_prefix;
        let mut key = String::with_capacity(prefix.len() + bucket.len() + index.len() + 2);
        key.push_str(prefix);
        key.push(':');
        key.push_str(bucket);
        key.push(':');
        key.push_str(index);
        key
    }

    /// Reads the bucket of `key` (header time); [`LocalState::claim_after_peek`] reuses it.
    pub fn peek_key(&self, key: KeyHash) -> Result<KeyPeek, StateError> {
        Ok(KeyPeek { key, snapshot: self.policy.key_table.read(self.store, key)? })
    }

    /// The claim, its first attempt on the header-time read `peek` (if it is of this key): an
    /// absent key is then claimed with one shared-data write. Same answers as
    /// [`ReplayState::claim`] (the write is CAS-guarded; anything else is decided on a fresh read).
    pub fn claim_after_peek(
        &self,
        request: &ClaimRequest,
        now_ms: u64,
        peek: Option<KeyPeek>,
    ) -> Result<ClaimAnswer, StateError> {
        self.claim_now(request, now_ms, peek)
    }

    fn claim_now(&self, request: &ClaimRequest, now_ms: u64, peek: Option<KeyPeek>) -> Result<ClaimAnswer, StateError> {
        match request {
            ClaimRequest::Collapse { key, window_ms, tenant } => {
                let expires_at_ms = now_ms.saturating_add(window_ms.get());
                // A duplicate is refused on the first read, without touching the quota.
                let snapshot = self.policy.collapse_table.read(self.store, *key)?;
                if snapshot.live(*key, now_ms).is_some() {
                    return Ok(ClaimAnswer::Duplicate);
                }
                self.charge(&self.policy.collapse_quota, *tenant, now_ms)?;
                let (first, _) =
                    self.policy.collapse_table.update_from(
                        self.store,
                        *key,
                        now_ms,
                        Some(snapshot),
                        |current| match current {
                            Some(_) => Update::Keep(false),
                            None => Update::Write { payload: Vec::new(), expires_at_ms, result: true },
                        },
                    )?;
                Ok(if first { ClaimAnswer::Forward { owner: None } } else { ClaimAnswer::Duplicate })
            }
            ClaimRequest::Key { key, fingerprint, claim_id, tenant } => {
                let expires_at_ms = now_ms.saturating_add(self.policy.ttl_ms.get());
                let timeout = self.policy.in_flight_timeout_ms;
                let earlier = match peek.filter(|p| p.key == *key) {
                    Some(peek) => peek.snapshot,
                    None => self.policy.key_table.read(self.store, *key)?,
                };
                // Only a claim that would take a free key counts on the tenant's quota (a retry
                // of a live key is answered from its record); a refused claim writes no record.
                if earlier.live(*key, now_ms).is_none() {
                    self.charge(&self.policy.key_quota, *tenant, now_ms)?;
                }
                let earlier = Some(earlier);
                let (verdict, slot) = self.policy.key_table.update_from(self.store, *key, now_ms, earlier, |current| {
                    let record = match current.map(Record::decode) {
                        None => None,
                        Some(Some(record)) => Some(record),
                        Some(None) => return Update::Keep(Err(StateError::Unavailable)),
                    };
                    match decide_claim(record.as_ref(), *fingerprint, *claim_id, now_ms, timeout) {
                        (verdict, Some(new)) => Update::Write { payload: new.encode(), expires_at_ms, result: Ok(verdict) },
                        (verdict, None) => Update::Keep(Ok(verdict)),
                    }
                })?;
                Ok(match verdict? {
                    ClaimVerdict::Forward => ClaimAnswer::Forward {
                        owner: Some(Owner {
                            key: *key,
                            claim_id: *claim_id,
                            slot: Some(slot),
                            record: Record::in_flight(*fingerprint, *claim_id, now_ms),
                        }),
                    },
                    ClaimVerdict::InFlight => ClaimAnswer::InFlight,
                    ClaimVerdict::OutcomeUnknown { stale_in_flight } => ClaimAnswer::OutcomeUnknown { stale_in_flight },
                    ClaimVerdict::Mismatch => ClaimAnswer::Mismatch,
                    ClaimVerdict::Completed { status, response: StoredBody::NotStored, .. } => ClaimAnswer::NotStored { status },
                    ClaimVerdict::Completed { status, response: StoredBody::Stored(digest), claim_id } => {
                        let stored = match self.store.get(&self.companion_key(slot)) {
                            Ok(Some((bytes, _))) => StoredResponse::decode_for(&bytes, claim_id, &digest),
                            Ok(None) => None,
                            Err(_) => return Err(StateError::Unavailable),
                        };
                        match stored {
                            Some(response) => ClaimAnswer::Replay(response),
                            // Stale or overwritten companion: never replay another key's answer.
                            None => ClaimAnswer::NotStored { status },
                        }
                    }
                })
            }
        }
    }

    /// Writes the companion (one shared-data write); `Some(digest)` once it holds exactly `bytes`.
    ///
    /// Unconditional (CAS token 0): only the claim holding the slot's live in-flight record
    /// writes it (checked by the caller on the bucket read it then commits against), and a reader
    /// accepts it only with that claim's id and digest. Reading the companion's token first would
    /// not order anything more: on a mismatch the writer would read again and overwrite.
    fn write_companion(&self, slot: SlotAddress, bytes: &[u8]) -> Result<Option<[u8; 32]>, StateError> {
        match self.store.set(&self.companion_key(slot), bytes, 0) {
            Ok(()) => Ok(Some(companion_digest(bytes))),
            // Token 0 never mismatches in Envoy; if a host did, the response is not stored.
            Err(StoreError::CasMismatch) => Ok(None),
            Err(StoreError::Unavailable) => Err(StateError::Unavailable),
        }
    }

    /// One read of the record's bucket, the companion write (a stored response), and the record
    /// write committed against that read's CAS token.
    fn finish_now(&self, request: &FinishRequest, now_ms: u64) -> Result<FinishAnswer, StateError> {
        let owner = request.owner;
        let table = &self.policy.key_table;
        let snapshot = table.read(self.store, owner.key)?;
        // The response goes to the companion first, and only while the slot still holds this
        // claim's live record: a reader that sees "completed" can then read it. The record write
        // below is committed against the same read, so it lands only if the bucket is unchanged.
        let mut digest = None;
        if let (Outcome::Completed { response: Some(response), .. }, Some(slot)) = (&request.outcome, owner.slot) {
            let ours = match snapshot.live_ref(owner.key, now_ms) {
                Some((payload, _, address)) => {
                    address == slot
                        && Record::decode(payload).is_some_and(|r| r.claim_id == owner.claim_id && r.state == KeyState::InFlight)
                }
                None => false,
            };
            if !ours {
                return Ok(FinishAnswer::NotOwner);
            }
            if let Some(bytes) = response.encode(owner.claim_id) {
                digest = self.write_companion(slot, &bytes)?;
            }
        }
        let (answer, _) = table.update_from(self.store, owner.key, now_ms, Some(snapshot), |current| {
            let record = match current.map(Record::decode) {
                None => None,
                Some(Some(record)) => Some(record),
                Some(None) => return Update::Keep(Err(StateError::Unavailable)),
            };
            let expires_at_ms = record.map_or(0, |r| r.claimed_at_ms.saturating_add(self.policy.ttl_ms.get()));
            match decide_finish(record.as_ref(), owner.claim_id, &request.outcome, digest) {
                (answer, Some(FinishWrite::Replace(new))) => {
                    Update::Write { payload: new.encode(), expires_at_ms, result: Ok(answer) }
                }
                (answer, Some(FinishWrite::Release)) => {
                    Update::Write { payload: Vec::new(), expires_at_ms: 0, result: Ok(answer) }
                }
                (answer, None) => Update::Keep(Ok(answer)),
            }
        })?;
        answer
    }
}

impl ReplayState for LocalState<'_> {
    fn claim(&self, request: &ClaimRequest, now_ms: u64) -> Answer<Result<ClaimAnswer, StateError>> {
        Answer::Now(self.claim_now(request, now_ms, None))
    }

    fn finish(&self, request: &FinishRequest, now_ms: u64) -> Answer<Result<FinishAnswer, StateError>> {
        Answer::Now(self.finish_now(request, now_ms))
    }

    fn peek(&self, key: KeyHash, now_ms: u64) -> Answer<Result<Option<Record>, StateError>> {
        Answer::Now(self.peek_key(key).and_then(|peek| peek.record(now_ms)))
    }

    fn clear(&self, key: KeyHash, now_ms: u64) -> Answer<Result<ClearAnswer, StateError>> {
        let timeout = self.policy.in_flight_timeout_ms;
        let result = self.policy.key_table.update(self.store, key, now_ms, |current| {
            let record = match current.map(Record::decode) {
                None => None,
                Some(Some(record)) => Some(record),
                Some(None) => return Update::Keep(Err(StateError::Unavailable)),
            };
            match decide_clear(record.as_ref(), now_ms, timeout) {
                answer @ ClearAnswer::Cleared { .. } => {
                    Update::Write { payload: Vec::new(), expires_at_ms: 0, result: Ok(answer) }
                }
                answer => Update::Keep(Ok(answer)),
            }
        });
        Answer::Now(match result {
            Ok((answer, _)) => answer,
            Err(error) => Err(error.into()),
        })
    }
}
