//! What the key table holds per idempotency key, and the stored response that lives next to it.
//!
//! A record is a fixed-size payload of one [`BucketTable`](crate::store::BucketTable) slot. The
//! response (status, selected headers, body) lives in a *companion* key named after the record's
//! slot address, so the number of keys stays bounded. A slot is reused once its record expires,
//! so a companion can be stale (written for an earlier record of the slot, or by a worker whose
//! record expired under it): the record holds the SHA-256 of the companion it committed and the
//! companion repeats the record's claim id; a companion that does not match both is never replayed.

use sha2::{Digest, Sha256};

/// Encoded record length (every record has the same size).
pub const RECORD_LEN: usize = 1 + 1 + 32 + 8 + 8 + 2 + 1 + 32;
const RECORD_VERSION: u8 = 1;
const COMPANION_VERSION: u8 = 1;
/// Bound on the encoded stored headers of one response.
pub const MAX_RESPONSE_HEAD_LEN: usize = 2048;

/// Where an idempotency key stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// Claimed and forwarded; no answer yet.
    InFlight,
    /// The upstream answered; `response` says whether the answer can be replayed.
    Completed { status: u16, response: StoredBody },
    /// Forwarded, and the answer (5xx, timeout, reset, local reply) does not prove what happened.
    OutcomeUnknown { status: u16 },
}

/// Whether a completed record's response was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredBody {
    /// The companion key holds the response whose SHA-256 is this.
    Stored([u8; 32]),
    /// The response was larger than `max_stored_body_bytes` (or its headers too large).
    NotStored,
}

/// One idempotency key's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub state: KeyState,
    /// SHA-256 of (principal, method, path and query, SHA-256 of the body).
    pub fingerprint: [u8; 32],
    /// Identifies the claim (the forwarded request) that owns the record; changes on slot reuse.
    pub claim_id: u64,
    pub claimed_at_ms: u64,
}

impl Record {
    pub fn in_flight(fingerprint: [u8; 32], claim_id: u64, now_ms: u64) -> Self {
        Record { state: KeyState::InFlight, fingerprint, claim_id, claimed_at_ms: now_ms }
    }

    pub fn encode(&self) -> Vec<u8> {
        let (tag, status, kind, digest) = match self.state {
            KeyState::InFlight => (1u8, 0u16, 0u8, [0u8; 32]),
            KeyState::Completed { status, response: StoredBody::Stored(digest) } => (2, status, 1, digest),
            KeyState::Completed { status, response: StoredBody::NotStored } => (2, status, 2, [0u8; 32]),
            KeyState::OutcomeUnknown { status } => (3, status, 0, [0u8; 32]),
        };
        let mut out = Vec::with_capacity(RECORD_LEN);
        out.push(RECORD_VERSION);
        out.push(tag);
        out.extend_from_slice(&self.fingerprint);
        out.extend_from_slice(&self.claim_id.to_be_bytes());
        out.extend_from_slice(&self.claimed_at_ms.to_be_bytes());
        out.extend_from_slice(&status.to_be_bytes());
        out.push(kind);
        out.extend_from_slice(&digest);
        out
    }

    /// `None` for bytes this code did not write (the caller fails closed).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != RECORD_LEN {
            return None;
        }
        let mut r = Reader(bytes);
        if r.u8()? != RECORD_VERSION {
            return None;
        }
        let tag = r.u8()?;
        let fingerprint: [u8; 32] = r.take(32)?.try_into().ok()?;
        let claim_id = r.u64()?;
        let claimed_at_ms = r.u64()?;
        let status = r.u16()?;
        let kind = r.u8()?;
        let digest: [u8; 32] = r.take(32)?.try_into().ok()?;
        // Fields a state does not use are zero as written: other bytes are foreign (one
        // encoding per record; found by the shared_data fuzz target).
        let unused_digest = digest == [0u8; 32];
        let state = match (tag, kind) {
            (1, 0) if status == 0 && unused_digest => KeyState::InFlight,
            (2, 1) => KeyState::Completed { status, response: StoredBody::Stored(digest) },
            (2, 2) if unused_digest => KeyState::Completed { status, response: StoredBody::NotStored },
            (3, 0) if unused_digest => KeyState::OutcomeUnknown { status },
            _ => return None,
        };
        Some(Record { state, fingerprint, claim_id, claimed_at_ms })
    }
}

/// A response as stored and replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    /// Only the configured `stored_headers`, lower-case names, in the upstream's order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl StoredResponse {
    /// The companion value: version, claim id, status, headers, body. `None` when the headers
    /// exceed [`MAX_RESPONSE_HEAD_LEN`].
    pub fn encode(&self, claim_id: u64) -> Option<Vec<u8>> {
        // The head (header count, then each name and value with its u16 length) is measured
        // first, then written in place: one allocation of the value's size.
        let count = u8::try_from(self.headers.len()).ok()?;
        let mut head_len = 1usize;
        for (name, value) in &self.headers {
            for part in [name.as_bytes(), value.as_bytes()] {
                u16::try_from(part.len()).ok()?;
                head_len += 2 + part.len();
            }
        }
        if head_len > MAX_RESPONSE_HEAD_LEN {
            return None;
        }
        let body_len = u32::try_from(self.body.len()).ok()?;
        let mut out = Vec::with_capacity(1 + 8 + 2 + head_len + 4 + self.body.len());
        out.push(COMPANION_VERSION);
        out.extend_from_slice(&claim_id.to_be_bytes());
        out.extend_from_slice(&self.status.to_be_bytes());
        out.push(count);
        for (name, value) in &self.headers {
            for part in [name.as_bytes(), value.as_bytes()] {
                out.extend_from_slice(&u16::try_from(part.len()).ok()?.to_be_bytes());
                out.extend_from_slice(part);
            }
        }
        out.extend_from_slice(&body_len.to_be_bytes());
        out.extend_from_slice(&self.body);
        Some(out)
    }

    /// Decodes a companion value, only if it belongs to `claim_id` and hashes to `digest`.
    pub fn decode_for(bytes: &[u8], claim_id: u64, digest: &[u8; 32]) -> Option<Self> {
        if Sha256::digest(bytes).as_slice() != digest.as_slice() {
            return None;
        }
        let mut r = Reader(bytes);
        if r.u8()? != COMPANION_VERSION || r.u64()? != claim_id {
            return None;
        }
        let status = r.u16()?;
        let count = r.u8()?;
        let mut headers = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let name_len = usize::from(r.u16()?);
            let name = String::from_utf8(r.take(name_len)?.to_vec()).ok()?;
            let value_len = usize::from(r.u16()?);
            let value = String::from_utf8(r.take(value_len)?.to_vec()).ok()?;
            headers.push((name, value));
        }
        let body_len = usize::try_from(r.u32()?).ok()?;
        let body = r.take(body_len)?.to_vec();
        if !r.0.is_empty() {
            return None;
        }
        Some(StoredResponse { status, headers, body })
    }
}

/// SHA-256 of a companion value, as a record commits it.
pub fn companion_digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
}
