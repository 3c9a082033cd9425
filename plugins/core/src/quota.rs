//! Per-tenant quotas on a bounded table: no tenant can fill a table that other tenants need.
//!
//! A guarded table (nonces, idempotency keys, collapse fingerprints) holds records that live at
//! most `window_ms` after they are claimed. Its quota table holds one small record per tenant
//! (key id or principal): a fixed-window count of the tenant's claims. A claim is allowed while
//! the count of the tenant's current window is below `limit`; a window starts at the tenant's
//! first claim after the previous one ended and lasts `window_ms`. Any record live at time `t`
//! was claimed in `(t - window_ms, t]`, which meets at most two consecutive windows, so a tenant
//! holds at most `2 * limit` live records of the guarded table, whatever it sends.
//!
//! Defaults and bounds ([`default_limit`], [`validate_limit`]): the limit defaults to an eighth
//! of the guarded table's capacity (at least 1), so one tenant holds at most a quarter of the
//! table; a limit whose `2 * limit` exceeds the capacity is refused (the bound would be void).

use std::num::{NonZeroU32, NonZeroU64};

use crate::store::{BindError, BucketTable, KeyHash, KeyHasher, SharedStore, TableError, Update};
use crate::ConfigError;

/// Bytes of a quota record: window start (8, BE) | count (4, BE).
pub const QUOTA_RECORD_LEN: u16 = 12;

/// The default limit: `max(1, capacity / 8)`.
pub fn default_limit(capacity: u64) -> u32 {
    u32::try_from((capacity / 8).max(1)).unwrap_or(u32::MAX)
}

/// Checks a configured limit against the guarded table's capacity (`field` names it).
pub fn validate_limit(limit: u64, capacity: u64, field: &str) -> Result<NonZeroU32, ConfigError> {
    let max = (capacity / 2).max(1);
    u32::try_from(limit)
        .ok()
        .and_then(NonZeroU32::new)
        .filter(|l| u64::from(l.get()) <= max)
        .ok_or_else(|| {
            ConfigError::new(
                field,
                format!(
                    "must be between 1 and {max} (half the table's capacity of {capacity} records): a tenant can hold up to twice its quota, and beyond half the table it could fill it for everyone"
                ),
            )
        })
}

/// Why a charge was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaError {
    /// The tenant used its quota for the current window.
    Exceeded,
    /// The quota table failed (full bucket, contention, host): fail closed.
    Table(TableError),
}

/// A per-tenant quota on one guarded table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantQuota {
    /// One record per tenant (same geometry as the guarded table, prefix `<guarded>.quota`).
    pub table: BucketTable,
    /// Claims per tenant per window.
    pub limit: NonZeroU32,
    /// The longest life of a guarded record, from its claim.
    pub window_ms: NonZeroU64,
}

impl TenantQuota {
    /// The quota of `guarded`: a table of the same geometry under `<guarded prefix>.quota`.
    pub fn for_table(guarded: &BucketTable, limit: NonZeroU32, window_ms: NonZeroU64) -> Self {
        let table = BucketTable::new(
            format!("{}.quota", guarded.prefix()),
            NonZeroU32::new(guarded.buckets()).unwrap_or(NonZeroU32::MIN),
            std::num::NonZeroU16::new(guarded.slots_per_bucket()).unwrap_or(std::num::NonZeroU16::MIN),
            QUOTA_RECORD_LEN,
        );
        TenantQuota { table, limit, window_ms }
    }

    /// See [`BucketTable::bind`].
    pub fn bind(&mut self, store: &dyn SharedStore, entropy: [u8; 32]) -> Result<(), BindError> {
        self.table.bind(store, entropy)
    }

    /// Counts one claim of `tenant` at `now_ms` (one bucket read-modify-write: a shared-data get
    /// and set), or refuses it without counting.
    pub fn charge(&self, store: &dyn SharedStore, tenant: KeyHash, now_ms: u64) -> Result<(), QuotaError> {
        let limit = self.limit.get();
        let window = self.window_ms.get();
        let (result, _) = self
            .table
            .update(store, tenant, now_ms, |current| match current.map(decode) {
                None => {
                    Update::Write { payload: encode(now_ms, 1), expires_at_ms: now_ms.saturating_add(window), result: Ok(()) }
                }
                Some(Some((start, count))) if count < limit => Update::Write {
                    payload: encode(start, count.saturating_add(1)),
                    expires_at_ms: start.saturating_add(window),
                    result: Ok(()),
                },
                Some(Some(_)) => Update::Keep(Err(QuotaError::Exceeded)),
                Some(None) => Update::Keep(Err(QuotaError::Table(TableError::Corrupt))),
            })
            .map_err(QuotaError::Table)?;
        result
    }

    /// Claims counted in the tenant's current window (tests and reports).
    pub fn used(&self, store: &dyn SharedStore, tenant: KeyHash, now_ms: u64) -> Result<u32, TableError> {
        Ok(self.table.get(store, tenant, now_ms)?.and_then(|(p, _, _)| decode(&p)).map_or(0, |(_, c)| c))
    }
}

/// The tenant key of a quota record: `kind` (`key_id`, `principal`, `route`) and the name,
/// under the filter's hasher.
pub fn tenant(hasher: &KeyHasher, kind: &str, name: &str) -> KeyHash {
    hasher.of(&[b"tenant", kind.as_bytes(), name.as_bytes()])
}

fn encode(start: u64, count: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(usize::from(QUOTA_RECORD_LEN));
    out.extend_from_slice(&start.to_be_bytes());
    out.extend_from_slice(&count.to_be_bytes());
    out
}

fn decode(bytes: &[u8]) -> Option<(u64, u32)> {
    let start: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
    let count: [u8; 4] = bytes.get(8..12)?.try_into().ok()?;
    (bytes.len() == 12).then(|| (u64::from_be_bytes(start), u32::from_be_bytes(count)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use std::num::NonZeroU16;

    fn quota(limit: u32, window: u64) -> TenantQuota {
        let guarded = BucketTable::new("g", NonZeroU32::new(4).unwrap(), NonZeroU16::new(2).unwrap(), 0);
        TenantQuota::for_table(&guarded, NonZeroU32::new(limit).unwrap(), NonZeroU64::new(window).unwrap())
    }

    #[test]
    fn a_tenant_gets_its_limit_per_window_and_others_are_unaffected() {
        let store = MemoryStore::default();
        let q = quota(2, 1000);
        let (a, b) = (tenant(&KeyHasher::Keyed([3; 16]), "key_id", "a"), tenant(&KeyHasher::Keyed([3; 16]), "key_id", "b"));
        assert_eq!(q.charge(&store, a, 0), Ok(()));
        assert_eq!(q.charge(&store, a, 10), Ok(()));
        assert_eq!(q.charge(&store, a, 20), Err(QuotaError::Exceeded));
        assert_eq!(q.used(&store, a, 20), Ok(2), "a refusal is not counted");
        assert_eq!(q.charge(&store, b, 20), Ok(()));
        assert_eq!(q.charge(&store, a, 999), Err(QuotaError::Exceeded));
        assert_eq!(q.charge(&store, a, 1000), Ok(()), "the window rolled");
        assert_eq!(q.used(&store, a, 1000), Ok(1));
    }

    #[test]
    fn limits_are_bounded_by_the_capacity() {
        assert_eq!(default_limit(8), 1);
        assert_eq!(default_limit(3), 1);
        assert_eq!(default_limit(8192), 1024);
        assert!(validate_limit(4, 8, "f").is_ok());
        assert_eq!(validate_limit(5, 8, "f").unwrap_err().field, "f");
        assert!(validate_limit(0, 8, "f").is_err());
        assert!(validate_limit(1, 1, "f").is_ok(), "a one-record table still allows one");
    }
}
