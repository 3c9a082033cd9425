//! Per-tenant quotas on a bounded table: no tenant can fill a table that other tenants need.
//!
//! A guarded table (nonces, idempotency keys, collapse fingerprints, amount debts) holds records
//! that live at most `window_ms` after they are claimed. Its quota table holds one small record
//! per tenant (key id, principal, route or client): a fixed-window count of the units of the
//! tenant's quota taken in that window. A window starts at the tenant's first charge after the
//! previous window ended and lasts `window_ms`; a charge is allowed while the count of the
//! current window is below `limit`.
//!
//! **Leases.** Reading and writing the shared record costs two host calls (a shared-data get and
//! a CAS set), on every claim. To spare them, a charge takes a *lease* of up to `lease` units at
//! once (`count += lease`, or the units left when fewer are: refused only when none are left)
//! and keeps the unspent units in the policy's lease cache ([`TenantQuota`] lives in a policy,
//! one per worker in wasm, one per process natively). A later claim of the same tenant spends a
//! unit of its lease with no host call while the lease's window lasts (`now < window_start +
//! window_ms`, the shared record's own expiry); after that, the next claim charges the shared
//! record again. With `lease == 1` (every small limit) nothing is cached: each claim is one
//! read-modify-write of the shared record, exactly as without leases.
//!
//! **The bound.** Every claim spends a unit that was counted in the shared record of a window
//! `[s, s + window_ms)` and it spends it within that window: the lease was taken at or after
//! `s` (the record is created by the charge that opens the window) and it is spent only while
//! `now < s + window_ms`. The shared record never counts more than `limit` units, however many
//! workers take leases from it, and a new window opens only after the previous one ended, so
//! a tenant's claims within one window never exceed `limit`. Any record of the guarded table
//! live at time `t` was claimed in `(t - window_ms, t]`, which meets at most two consecutive
//! windows, so a tenant holds at most `2 * limit` live records of the guarded table, whatever it
//! sends and however many workers serve it. (As everywhere in the tables, this takes the clock
//! not to go back: a claim at an earlier time than its window's start is counted in that
//! window, with or without a lease.) Policies that share a quota table with different windows
//! (two configurations under one `vm_id`) never shorten a live record: a charge keeps the later
//! of the stored expiry and its own `start + window_ms`, and a lease lasts until the expiry
//! written, so no policy reopens a window another still holds leased units of; each window is
//! then at least as long as every sharing policy's own, and the bound holds for each.
//!
//! **What leases cost.** Units leased and not spent before the window ends are lost for that
//! window (never counted twice, so never unsafe): each worker holds at most one lease per tenant,
//! of at most `lease - 1` unspent units, so with `W` workers a tenant can be refused at most
//! `W * (lease - 1)` claims before its limit. A configuration reload builds a new policy and
//! drops the old leases (up to `W * (lease - 1)` more units of the current window, per reload).
//! The cache holds at most [`MAX_LEASES`] tenants, keyed by the tenant's keyed hash (never its
//! name); a lease is never evicted while it is valid (evicting one would strand its units):
//! when the tenant's shard of the cache ([`LEASE_SHARDS`] shards, each of an equal part of
//! [`MAX_LEASES`], each with its own lock) is full of valid leases, a new tenant's claim charges
//! one unit, as without leases, until a lease of that shard expires or runs out.
//!
//! Defaults and bounds ([`default_limit`], [`validate_limit`], [`default_lease`],
//! [`validate_lease`]): the limit defaults to an eighth of the guarded table's capacity (at least
//! 1), so one tenant holds at most a quarter of the table; a limit whose `2 * limit` exceeds the
//! capacity is refused (the bound would be void). The lease defaults to `limit / 256`, between 1
//! and [`DEFAULT_MAX_LEASE`]; a configured lease may be at most `limit / 16` (at least 1).

use std::collections::BTreeMap;
use std::num::{NonZeroU32, NonZeroU64};
use std::sync::{Mutex, PoisonError};

use crate::store::{BindError, BucketTable, KeyHash, KeyHasher, SharedStore, TableError, Update};
use crate::ConfigError;

/// Tenants whose leases one policy keeps at most (a lease is about 40 bytes).
pub const MAX_LEASES: usize = 256;

/// The lease cache's locks: a tenant's charges take its shard's lock only (held across the shared
/// record's update), so the native module's workers charging different tenants seldom wait on
/// one another. The shard is picked by the tenant's keyed hash: a client cannot aim at one.
pub const LEASE_SHARDS: usize = 16;

/// Tenants one shard keeps at most.
const LEASES_PER_SHARD: usize = MAX_LEASES / LEASE_SHARDS;

type LeaseShards = [Mutex<BTreeMap<KeyHash, Lease>>; LEASE_SHARDS];

fn no_leases() -> LeaseShards {
    std::array::from_fn(|_| Mutex::default())
}

/// The largest default lease: 15/16 of a quota's host calls are spared at 16; a larger lease
/// would spare at most another 1/16 and strand more units per worker.
pub const DEFAULT_MAX_LEASE: u32 = 16;

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

/// The default lease of a quota of `limit`: `limit / 256`, between 1 and [`DEFAULT_MAX_LEASE`].
/// Each worker then strands under 1/256 of the limit (under an eighth of it with 32 workers),
/// and every limit under 512 charges each claim to the shared record, exactly.
pub fn default_lease(limit: NonZeroU32) -> NonZeroU32 {
    NonZeroU32::new((limit.get() / 256).clamp(1, DEFAULT_MAX_LEASE)).unwrap_or(NonZeroU32::MIN)
}

/// Checks a configured lease against its quota's `limit` (`field` names it): between 1 (no
/// lease: every claim charges the shared record) and `max(1, limit / 16)`, so that one worker
/// never strands more than a sixteenth of a tenant's quota.
pub fn validate_lease(lease: u64, limit: NonZeroU32, field: &str) -> Result<NonZeroU32, ConfigError> {
    let max = (limit.get() / 16).max(1);
    u32::try_from(lease).ok().and_then(NonZeroU32::new).filter(|l| l.get() <= max).ok_or_else(|| {
        ConfigError::new(
            field,
            format!(
                "must be between 1 and {max} (a sixteenth of the quota of {limit}): each worker may hold up to lease - 1 units of a tenant's quota unspent, refused to the tenant until the window ends"
            ),
        )
    })
}

/// The lease of a quota: `configured` checked by [`validate_lease`], else [`default_lease`].
pub fn lease(configured: Option<u64>, limit: NonZeroU32, field: &str) -> Result<NonZeroU32, ConfigError> {
    configured.map_or(Ok(default_lease(limit)), |lease| validate_lease(lease, limit, field))
}

/// Why a charge was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaError {
    /// The tenant used its quota for the current window.
    Exceeded,
    /// The quota table failed (full bucket, contention, host): fail closed.
    Table(TableError),
}

/// A per-tenant quota on one guarded table, with this worker's leases of it.
pub struct TenantQuota {
    /// One record per tenant (same geometry as the guarded table, prefix `<guarded>.quota`).
    pub table: BucketTable,
    /// Claims per tenant per window.
    pub limit: NonZeroU32,
    /// The longest life of a guarded record, from its claim.
    pub window_ms: NonZeroU64,
    /// Units a charge takes from the shared record at once (1: no lease).
    pub lease: NonZeroU32,
    /// The unspent units of this policy's leases, by tenant, in [`LEASE_SHARDS`] shards.
    leases: LeaseShards,
}

/// Units of a tenant's quota taken from the shared record and not spent yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lease {
    /// At least 1 (a spent lease is removed).
    units: u32,
    /// The shared record's expiry: the end of the window the units were counted in.
    expires_at_ms: u64,
}

impl Lease {
    /// Valid while its window lasts: exactly while the shared record it was counted in is live
    /// (the store's rule, including an expiry saturated at the end of the clock's range).
    fn valid(&self, now_ms: u64) -> bool {
        self.expires_at_ms > now_ms || self.expires_at_ms == u64::MAX
    }
}

/// A clone holds no lease (a lease's units belong to the policy that took them).
impl Clone for TenantQuota {
    fn clone(&self) -> Self {
        TenantQuota {
            table: self.table.clone(),
            limit: self.limit,
            window_ms: self.window_ms,
            lease: self.lease,
            leases: no_leases(),
        }
    }
}

/// Equal quotas have equal settings; the leases they hold are not compared.
impl PartialEq for TenantQuota {
    fn eq(&self, other: &Self) -> bool {
        self.table == other.table && self.limit == other.limit && self.window_ms == other.window_ms && self.lease == other.lease
    }
}

impl Eq for TenantQuota {}

impl std::fmt::Debug for TenantQuota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantQuota")
            .field("table", &self.table)
            .field("limit", &self.limit)
            .field("window_ms", &self.window_ms)
            .field("lease", &self.lease)
            .field("leases_held", &self.leases_held())
            .finish()
    }
}

impl TenantQuota {
    /// The quota of `guarded`: a table of the same geometry under `<guarded prefix>.quota`, with
    /// the [`default_lease`] of `limit`.
    pub fn for_table(guarded: &BucketTable, limit: NonZeroU32, window_ms: NonZeroU64) -> Self {
        let table = BucketTable::new(
            format!("{}.quota", guarded.prefix()),
            NonZeroU32::new(guarded.buckets()).unwrap_or(NonZeroU32::MIN),
            std::num::NonZeroU16::new(guarded.slots_per_bucket()).unwrap_or(std::num::NonZeroU16::MIN),
            QUOTA_RECORD_LEN,
        );
        TenantQuota { table, limit, window_ms, lease: default_lease(limit), leases: no_leases() }
    }

    /// The same quota with leases of `lease` units (see [`validate_lease`]).
    pub fn with_lease(mut self, lease: NonZeroU32) -> Self {
        self.lease = lease;
        self
    }

    /// See [`BucketTable::bind`].
    pub fn bind(&mut self, store: &dyn SharedStore, entropy: [u8; 32]) -> Result<(), BindError> {
        self.table.bind(store, entropy)
    }

    /// Counts one claim of `tenant` at `now_ms`, or refuses it without counting.
    ///
    /// A unit of a valid lease of this tenant is spent with no host call; otherwise one
    /// read-modify-write of the shared record (a shared-data get and a CAS set) takes a new lease
    /// of up to `lease` units, one of which is spent now (see the module's documentation).
    pub fn charge(&self, store: &dyn SharedStore, tenant: KeyHash, now_ms: u64) -> Result<(), QuotaError> {
        self.charge_in_window(store, tenant, now_ms).map(|_| ())
    }

    /// [`TenantQuota::charge`], returning the end of the window the spent unit was counted in
    /// (the shared record's expiry when the unit was taken, also a lease's `expires_at_ms`): the
    /// unit was counted in the window `[start, end)` that holds `now_ms`. A guarded record that
    /// keeps this end ([`in_window`]) was counted in the tenant's window that is still running.
    pub fn charge_in_window(&self, store: &dyn SharedStore, tenant: KeyHash, now_ms: u64) -> Result<u64, QuotaError> {
        if self.lease.get() == 1 {
            return self.take(store, tenant, now_ms, 1).map(|(_, end)| end);
        }
        // The tenant's shard, held across the shared record's update, so that two threads of the
        // native module never both take a lease for one tenant (wasm is single-threaded: never
        // contended).
        let Some(shard) = self.leases.get(tenant.shard(LEASE_SHARDS)) else {
            return self.take(store, tenant, now_ms, 1).map(|(_, end)| end);
        };
        let mut leases = shard.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(end) = spend(&mut leases, tenant, now_ms) {
            return Ok(end);
        }
        let want = if room(&mut leases, now_ms) { self.lease.get() } else { 1 };
        let (units, expires_at_ms) = self.take(store, tenant, now_ms, want)?;
        if let Some(units) = units.checked_sub(1).filter(|u| *u > 0) {
            leases.insert(tenant, Lease { units, expires_at_ms });
        }
        Ok(expires_at_ms)
    }

    /// Counts up to `want` units of `tenant` in the shared record (at least one, at most what is
    /// left of the limit): the units counted and the end of their window.
    fn take(&self, store: &dyn SharedStore, tenant: KeyHash, now_ms: u64, want: u32) -> Result<(u32, u64), QuotaError> {
        let limit = self.limit.get();
        let window = self.window_ms.get();
        let (result, _) = self
            .table
            .update_with_expiry(store, tenant, now_ms, None, |current| match current.map(|(p, e)| (decode(p), e)) {
                None => {
                    let units = want.min(limit).max(1);
                    let expires_at_ms = now_ms.saturating_add(window);
                    Update::Write { payload: encode(now_ms, units), expires_at_ms, result: Ok((units, expires_at_ms)) }
                }
                Some((Some((start, count)), stored_expiry)) if count < limit => {
                    let units = want.min(limit.saturating_sub(count)).max(1);
                    // Never shortened: another policy sharing the table (another window) may
                    // hold leases until the expiry it wrote; a window must not reopen before.
                    let expires_at_ms = start.saturating_add(window).max(stored_expiry);
                    Update::Write {
                        payload: encode(start, count.saturating_add(units)),
                        expires_at_ms,
                        result: Ok((units, expires_at_ms)),
                    }
                }
                Some((Some(_), _)) => Update::Keep(Err(QuotaError::Exceeded)),
                Some((None, _)) => Update::Keep(Err(QuotaError::Table(TableError::Corrupt))),
            })
            .map_err(QuotaError::Table)?;
        result
    }

    /// Units counted in the tenant's current window in the shared record, spent or leased
    /// (tests and reports).
    pub fn used(&self, store: &dyn SharedStore, tenant: KeyHash, now_ms: u64) -> Result<u32, TableError> {
        Ok(self.table.get(store, tenant, now_ms)?.and_then(|(p, _, _)| decode(&p)).map_or(0, |(_, c)| c))
    }

    /// Tenants with a lease in this policy's cache (valid or not yet purged).
    pub fn leases_held(&self) -> usize {
        self.leases.iter().map(|shard| shard.try_lock().map_or(0, |leases| leases.len())).sum()
    }
}

/// Spends a unit of `tenant`'s lease if it holds a valid one (an expired lease is dropped): the
/// end of the window the unit was counted in.
fn spend(leases: &mut BTreeMap<KeyHash, Lease>, tenant: KeyHash, now_ms: u64) -> Option<u64> {
    let lease = leases.get_mut(&tenant)?;
    if !lease.valid(now_ms) {
        leases.remove(&tenant);
        return None;
    }
    let end = lease.expires_at_ms;
    lease.units = lease.units.saturating_sub(1);
    if lease.units == 0 {
        leases.remove(&tenant);
    }
    Some(end)
}

/// Whether a unit counted in the window ending at `window_end_ms` (as returned by
/// [`TenantQuota::charge_in_window`]) was counted in a window that still runs at `now_ms`: the
/// rule of a lease's validity and of the store's expiry (an end saturated at the end of the
/// clock's range never passes). `0` (no window: a record never counted) is never in one.
pub fn in_window(window_end_ms: u64, now_ms: u64) -> bool {
    Lease { units: 1, expires_at_ms: window_end_ms }.valid(now_ms)
}

/// Whether a shard of the cache can keep one more lease, after dropping its expired ones when it
/// is full. Valid leases are never evicted: that would strand their units.
fn room(leases: &mut BTreeMap<KeyHash, Lease>, now_ms: u64) -> bool {
    if leases.len() >= LEASES_PER_SHARD {
        leases.retain(|_, lease| lease.valid(now_ms));
    }
    leases.len() < LEASES_PER_SHARD
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

    /// Counts the host calls a quota makes (a shared-data get or set each).
    #[derive(Default)]
    struct Counting {
        store: MemoryStore,
        calls: std::cell::Cell<usize>,
    }

    impl SharedStore for Counting {
        fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, crate::store::StoreError> {
            self.calls.set(self.calls.get() + 1);
            self.store.get(key)
        }
        fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), crate::store::StoreError> {
            self.calls.set(self.calls.get() + 1);
            self.store.set(key, value, cas)
        }
    }

    fn leased(limit: u32, lease: u32, window: u64) -> TenantQuota {
        quota(limit, window).with_lease(NonZeroU32::new(lease).unwrap())
    }

    fn key(name: &str) -> KeyHash {
        tenant(&KeyHasher::Keyed([3; 16]), "key_id", name)
    }

    #[test]
    fn small_limits_take_no_lease() {
        let store = Counting::default();
        let q = quota(2, 1000);
        assert_eq!(q.lease.get(), 1);
        assert_eq!(q.charge(&store, key("a"), 0), Ok(()));
        assert_eq!(q.charge(&store, key("a"), 1), Ok(()));
        assert_eq!(store.calls.get(), 4, "two host calls per claim, as without leases");
        assert_eq!(q.leases_held(), 0);
    }

    #[test]
    fn one_worker_gets_exactly_its_limit_with_leases() {
        let store = Counting::default();
        let q = leased(40, 16, 1000);
        for i in 0..40 {
            assert_eq!(q.charge(&store, key("a"), i), Ok(()), "claim {i}");
        }
        assert_eq!(q.charge(&store, key("a"), 40), Err(QuotaError::Exceeded));
        // Leases of 16, 16 and the 8 left: three read-modify-writes, then one refused read.
        assert_eq!(store.calls.get(), 3 * 2 + 1);
        assert_eq!(q.used(&store, key("a"), 40), Ok(40));
        assert_eq!(q.leases_held(), 0, "a spent lease is dropped");
    }

    /// Two policies sharing a quota table with different windows (two configurations under one
    /// `vm_id`): the shorter one must not end the window the longer one leased units in.
    #[test]
    fn a_shorter_window_never_shortens_a_record_another_policy_leased_from() {
        let store = MemoryStore::default();
        let long = leased(64, 4, 1000);
        let short = quota(64, 100);
        let who = key("shared");
        assert_eq!(long.charge(&store, who, 0), Ok(()), "takes a lease of 4 (3 left) until 1000");
        assert_eq!(short.charge(&store, who, 10), Ok(()));
        assert_eq!(short.charge(&store, who, 150), Ok(()));
        assert_eq!(short.used(&store, who, 150), Ok(6), "still the window opened at 0, not a new one at 150");
        assert_eq!(short.used(&store, who, 999), Ok(6));
        assert_eq!(short.used(&store, who, 1000), Ok(0), "the window the lease was counted in ended");
    }

    #[test]
    fn two_workers_never_exceed_the_limit_together() {
        let store = MemoryStore::default();
        let first = leased(40, 8, 1000);
        let second = first.clone();
        assert_eq!(second.leases_held(), 0, "a clone holds no lease");
        let mut accepted = 0;
        for i in 0..100 {
            let worker = if i % 3 == 0 { &first } else { &second };
            if worker.charge(&store, key("a"), i).is_ok() {
                accepted += 1;
            }
        }
        assert!(accepted <= 40, "{accepted} claims against a limit of 40");
        assert!(accepted >= 40 - 2 * 7, "{accepted}: more than (lease - 1) units stranded per worker");
        // Both workers now hold nothing of this window: the shared record is spent.
        for worker in [&first, &second] {
            assert_eq!(worker.charge(&store, key("a"), 999), Err(QuotaError::Exceeded));
        }
    }

    /// A unit names the end of the window it was counted in, leased or not: a guarded record
    /// stamped with it is in the running window exactly until that end.
    #[test]
    fn a_unit_names_the_end_of_its_window() {
        let store = MemoryStore::default();
        for q in [leased(64, 4, 1000), leased(64, 1, 1000)] {
            let who = key(&format!("w{}", q.lease));
            assert_eq!(q.charge_in_window(&store, who, 100), Ok(1100), "opens the window [100, 1100)");
            assert_eq!(q.charge_in_window(&store, who, 1099), Ok(1100), "the same window (a lease's unit or the record)");
            assert!(in_window(1100, 1099) && !in_window(1100, 1100));
            assert_eq!(q.charge_in_window(&store, who, 1100), Ok(2100), "the next window");
        }
        assert!(!in_window(0, 0) && !in_window(0, 1), "no window");
        assert!(in_window(u64::MAX, u64::MAX), "saturated at the end of the clock");
    }

    #[test]
    fn a_lease_ends_with_its_window() {
        let store = Counting::default();
        let q = leased(64, 4, 1000);
        assert_eq!(q.charge(&store, key("a"), 0), Ok(()));
        assert_eq!(store.calls.get(), 2);
        assert_eq!(q.charge(&store, key("a"), 999), Ok(()), "a unit of the lease");
        assert_eq!(store.calls.get(), 2, "spent with no host call");
        assert_eq!(q.used(&store.store, key("a"), 999), Ok(4));
        assert_eq!(q.charge(&store, key("a"), 1000), Ok(()), "the window rolled: a new lease");
        assert_eq!(store.calls.get(), 4);
        assert_eq!(q.used(&store.store, key("a"), 1000), Ok(4), "counted in the new window");
        assert_eq!(q.charge(&store, key("b"), 1000), Ok(()));
        assert_eq!(q.leases_held(), 2);
    }

    #[test]
    fn the_lease_cache_is_bounded_and_never_evicts_a_valid_lease() {
        let store = MemoryStore::default();
        let guarded = BucketTable::new("g", NonZeroU32::new(64).unwrap(), NonZeroU16::new(16).unwrap(), 0);
        let q = TenantQuota::for_table(&guarded, NonZeroU32::new(64).unwrap(), NonZeroU64::new(1000).unwrap())
            .with_lease(NonZeroU32::new(4).unwrap());
        // Tenants until every shard is full: never more than MAX_LEASES leases held.
        let mut tenants = 0;
        while q.leases_held() < MAX_LEASES {
            assert!(tenants < 100 * MAX_LEASES, "the shards never filled");
            assert_eq!(q.charge(&store, key(&format!("t{tenants}")), 0), Ok(()));
            tenants += 1;
        }
        assert_eq!(q.used(&store, key("t0"), 0), Ok(4), "a lease");
        assert_eq!(q.charge(&store, key("one more"), 0), Ok(()));
        assert_eq!(q.leases_held(), MAX_LEASES, "no valid lease evicted");
        assert_eq!(q.used(&store, key("one more"), 0), Ok(1), "no room: one unit, no lease");
        // Once the leases expire, the next tenant's claim purges its shard and takes a lease.
        assert_eq!(q.charge(&store, key("late"), 1000), Ok(()));
        assert_eq!(q.leases_held(), MAX_LEASES - LEASES_PER_SHARD + 1);
        assert_eq!(q.used(&store, key("late"), 1000), Ok(4));
    }

    #[test]
    fn leases_follow_the_limit() {
        let lease = |limit| default_lease(NonZeroU32::new(limit).unwrap()).get();
        assert_eq!((lease(1), lease(511), lease(512), lease(1024), lease(4096), lease(u32::MAX)), (1, 1, 2, 4, 16, 16));
        let limit = NonZeroU32::new(160).unwrap();
        assert_eq!(validate_lease(10, limit, "f").map(NonZeroU32::get), Ok(10));
        assert_eq!(validate_lease(11, limit, "f").unwrap_err().field, "f");
        assert!(validate_lease(0, limit, "f").is_err());
        assert_eq!(validate_lease(1, NonZeroU32::MIN, "f").map(NonZeroU32::get), Ok(1), "no lease is always allowed");
    }

    proptest::proptest! {
        /// Workers sharing one store, with leases, at random times: a tenant's claims in any span
        /// of `window_ms` never exceed twice its limit, and in one window never its limit.
        #[test]
        fn leased_claims_stay_within_the_bound(
            limit in 1u32..40, lease in 1u32..8, workers in 1usize..4,
            ops in proptest::collection::vec((0usize..4, 0u8..3, 0u64..40), 1..300),
        ) {
            let window = 100;
            let store = MemoryStore::default();
            let first = leased(limit, lease.min(limit), window);
            let quotas: Vec<TenantQuota> = (0..workers).map(|_| first.clone()).collect();
            let mut now = 0;
            let mut accepted: Vec<(u8, u64)> = Vec::new();
            for (worker, who, advance) in ops {
                now += advance;
                let Some(q) = quotas.get(worker % workers) else { continue };
                let tenant = key(&who.to_string());
                if q.charge(&store, tenant, now).is_ok() {
                    accepted.push((who, now));
                    // Every claim since the current window opened spent a unit of its record.
                    let record = q.table.get(&store, tenant, now).unwrap().and_then(|(p, _, _)| decode(&p));
                    let (start, count) = record.unwrap();
                    let in_window = accepted.iter().filter(|(w, u)| *w == who && *u >= start).count();
                    // Exactly: what the record counts was either spent in this window or is still
                    // held unspent in a valid lease (a unit spent outside its window, or lost
                    // track of, breaks the equality).
                    let unspent: u32 = quotas
                        .iter()
                        .map(|q| q.leases[tenant.shard(LEASE_SHARDS)].lock().unwrap().get(&tenant).filter(|l| l.valid(now)).map_or(0, |l| l.units))
                        .sum();
                    proptest::prop_assert_eq!(in_window + unspent as usize, count as usize, "tenant {} since {}", who, start);
                    proptest::prop_assert!(count <= limit);
                }
            }
            for &(who, t) in &accepted {
                let recent = accepted.iter().filter(|(w, u)| *w == who && *u <= t && *u + window > t).count();
                proptest::prop_assert!(recent <= 2 * limit as usize, "{} claims of tenant {} in ({}, {}]", recent, who, t.saturating_sub(window), t);
            }
        }
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
