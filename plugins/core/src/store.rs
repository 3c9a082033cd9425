//! Bounded, CAS-guarded tables on top of proxy-wasm shared data.
//!
//! Envoy's shared data has two properties every store here is designed around:
//! - `set` with a CAS token on an *absent* key inserts it unconditionally, and
//! - keys can never be deleted.
//!
//! So a [`BucketTable`] owns a fixed number of keys (`<prefix>:<bucket>`), each holding a fixed
//! number of positional slots. Memory is bounded by `buckets * slots * (SLOT_OVERHEAD + max payload)`
//! whatever the traffic. Every change is a read-modify-write of one bucket, committed with the CAS
//! token of the read; a bucket that was absent is written with [`INSERT_IF_ABSENT_CAS`], a token
//! that no present bucket holds, so of two workers that both saw it absent only one insert wins and
//! the other gets a CAS mismatch and retries against the winner's value.
//!
//! Placement is secret: a record's bucket is a keyed hash of its [`KeyHash`] under a 32-byte
//! placement secret that clients never see, so no client can aim records at one bucket. The
//! secret lives in the table's metadata key (`<prefix>:meta`), with the table's geometry; the
//! first VM of an Envoy to configure the table writes it (create-if-absent), every other VM and
//! every later configuration adopts it ([`BucketTable::bind`]). Since shared data outlives a
//! configuration, a configuration whose geometry differs from the stored one is refused: the
//! same records would be looked for in other buckets, and live records would become claimable
//! again.

use std::hash::Hasher;

use sha2::{Digest, Sha256};
use siphasher::sip::SipHasher13;
use siphasher::sip128::Hasher128;

/// Failure of a shared-data operation, as the host reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreError {
    /// The CAS token did not match the stored one: someone else wrote first.
    CasMismatch,
    /// Any other host failure. Callers fail closed.
    Unavailable,
}

/// The host side of proxy-wasm shared data (`proxy_get_shared_data` / `proxy_set_shared_data`).
pub trait SharedStore {
    /// The value and its CAS token, or `None` when the key is absent.
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError>;
    /// Writes `value`. A non-zero `cas` must match the stored token of a present key.
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError>;
}

/// CAS token used to create a bucket that was read as absent.
///
/// Envoy inserts an absent key whatever the token, and rejects a write to a present key whose
/// token differs. Envoy's tokens count up from 1 across the whole process, so a present bucket
/// holds `u32::MAX` only if its last write was exactly the 4,294,967,295th shared-data write of
/// the process; in that case one racing insert may overwrite it. Everywhere else this makes
/// "create if absent" atomic.
pub const INSERT_IF_ABSENT_CAS: u32 = u32::MAX;

/// Bytes a slot needs besides its payload: key hash (16), expiry (8), payload length (2).
pub const SLOT_OVERHEAD: usize = 26;

/// How many times an update re-reads a contended bucket before giving up (fail closed).
const MAX_CAS_ATTEMPTS: usize = 32;

/// A 128-bit fingerprint of a record's key; the table never stores the key itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KeyHash([u8; 16]);

impl KeyHash {
    /// SHA-256 (its first 16 bytes) of the parts of a key; parts are length-prefixed so
    /// ("ab","c") != ("a","bc"). The same in every process: [`KeyHasher::Sha256`].
    pub fn of(parts: &[&[u8]]) -> Self {
        let mut hasher = Sha256::new();
        for part in parts {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part);
        }
        let digest: [u8; 32] = hasher.finalize().into();
        let (head, _) = digest.split_first_chunk::<16>().unwrap_or((&[0; 16], &[]));
        KeyHash(*head)
    }

    /// One of `shards` (at least 1), from the hash's bytes: as unpredictable as the hash.
    pub fn shard(&self, shards: usize) -> usize {
        let [first, second, ..] = self.0;
        usize::from(u16::from_le_bytes([first, second])) % shards.max(1)
    }

    /// Lower-case hex, for keys in external stores.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The bucket of this key under a placement secret: SipHash-1-3 (a keyed pseudo-random
    /// function) of the key hash under the secret's first 16 bytes, mod `buckets`. Without the
    /// secret no client can predict a bucket; the bias of the modulo is below 2^-32.
    fn bucket_index(&self, secret: &[u8; 32], buckets: u32) -> u32 {
        let (sip_key, _) = secret.split_first_chunk::<16>().unwrap_or((&[0; 16], &[]));
        let mut hasher = SipHasher13::new_with_key(sip_key);
        hasher.write(&self.0);
        // The remainder is below `buckets`, a u32: it always fits (the fallback is never taken).
        u32::try_from(hasher.finish() % u64::from(buckets.max(1))).unwrap_or(0)
    }
}

/// How a filter turns the parts of a record's key into a [`KeyHash`].
///
/// In-process tables (Envoy's shared data) take their fingerprints from a keyed fast hash,
/// SipHash-1-3 with a 128-bit output, under a 16-byte secret that every VM of this Envoy shares
/// (half of a table's placement secret, [`BucketTable::key_hasher`]): no client can compute a
/// fingerprint, so none can aim two keys at one record. Keys named on Redis are shared by every
/// Envoy of the deployment, which share no secret: their names keep SHA-256 ([`KeyHash::of`]),
/// unchanged from earlier versions.
#[derive(Clone, PartialEq, Eq)]
pub enum KeyHasher {
    /// SipHash-1-3-128 under this secret (in-process tables).
    Keyed([u8; 16]),
    /// SHA-256, unkeyed (names of records on Redis, the same on every replica).
    Sha256,
}

impl std::fmt::Debug for KeyHasher {
    // The secret is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeyHasher::Keyed(_) => "KeyHasher::Keyed(..)",
            KeyHasher::Sha256 => "KeyHasher::Sha256",
        })
    }
}

impl KeyHasher {
    /// The fingerprint of a key's parts (length-prefixed, as in [`KeyHash::of`]).
    pub fn of(&self, parts: &[&[u8]]) -> KeyHash {
        match self {
            KeyHasher::Sha256 => KeyHash::of(parts),
            KeyHasher::Keyed(secret) => {
                let mut hasher = siphasher::sip128::SipHasher13::new_with_key(secret);
                // One write of the whole length-prefixed input when it fits on the stack (the
                // same stream as a write per piece, without the per-write tail handling).
                let mut buffer = [0u8; 160];
                let mut len = 0usize;
                for part in parts {
                    let end = len + 8 + part.len();
                    match buffer.get_mut(len..end) {
                        Some(out) => {
                            let (prefix, bytes) = out.split_at_mut(8);
                            prefix.copy_from_slice(&(part.len() as u64).to_be_bytes());
                            bytes.copy_from_slice(part);
                            len = end;
                        }
                        None => {
                            hasher.write(buffer.get(..len).unwrap_or(&[]));
                            len = 0;
                            hasher.write(&(part.len() as u64).to_be_bytes());
                            hasher.write(part);
                        }
                    }
                }
                hasher.write(buffer.get(..len).unwrap_or(&[]));
                KeyHash(hasher.finish128().as_bytes())
            }
        }
    }
}

/// Version of the `<prefix>:meta` value layout. Version 2: record fingerprints are keyed
/// SipHash-1-3-128 ([`KeyHasher::Keyed`]); a version-1 table (SHA-256 fingerprints) is refused
/// ([`BindError::Legacy`]), since its live records would not be found again.
const META_VERSION: u8 = 2;
/// The layout whose fingerprints were SHA-256.
const META_VERSION_SHA256: u8 = 1;
/// `<prefix>:meta`: version (1) | buckets (4, BE) | slots per bucket (2, BE) | max payload (2, BE)
/// | placement secret (32).
const META_LEN: usize = 1 + 4 + 2 + 2 + 32;

/// Why a table could not be bound to the shared data of this Envoy (the configuration is refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindError {
    /// The table already exists in this Envoy's shared data with another geometry. `what` is
    /// `buckets`, `slots_per_bucket` or `max_payload`.
    GeometryChanged { what: &'static str, stored: u32, configured: u32 },
    /// Written by an earlier Firebreak version: buckets without metadata (no secret placement),
    /// or metadata of version 1 (SHA-256 record fingerprints, before [`KeyHasher::Keyed`]).
    Legacy,
    /// The metadata holds bytes this code did not write.
    Corrupt,
    /// The host failed, or the metadata kept changing.
    Unavailable,
}

impl BindError {
    /// A configuration error for the table configured at `field` (e.g. `nonce_store`).
    pub fn config_error(&self, field: &str) -> crate::ConfigError {
        const HOW: &str = "to change it, use a new vm_id (a new shared-data namespace) once the old records have expired, or restart Envoy (which clears shared data)";
        match self {
            BindError::GeometryChanged { what, stored, configured } => {
                let name = if *what == "max_payload" { field.to_string() } else { format!("{field}.{what}") };
                crate::ConfigError::new(
                    name,
                    format!(
                        "this Envoy already holds this table with {what} = {stored} (configured: {configured}); changing the geometry of a live table would make its live records claimable again, so the configuration is refused; {HOW}"
                    ),
                )
            }
            BindError::Legacy => crate::ConfigError::new(
                field,
                format!("this Envoy's shared data holds this table as written by an earlier Firebreak version (without secret placement, or with SHA-256 record fingerprints); its live records would become claimable again; {HOW}"),
            ),
            BindError::Corrupt => crate::ConfigError::new(field, "the table's metadata in shared data is corrupt; refusing"),
            BindError::Unavailable => crate::ConfigError::new(field, "the table's metadata in shared data could not be read or written"),
        }
    }
}

/// A record in a slot, borrowed from its bucket's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot<'a> {
    key: KeyHash,
    expires_at_ms: u64,
    payload: &'a [u8],
}

/// What an update callback decides for the record of its key.
pub enum Update<T> {
    /// Store (or replace) the record.
    Write { payload: Vec<u8>, expires_at_ms: u64, result: T },
    /// Leave the bucket unchanged.
    Keep(T),
}

/// Why a table operation did not complete. Every variant means "fail closed".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableError {
    /// Every slot of the key's bucket holds a live record: refuse rather than forget one.
    Full,
    /// The bucket kept changing under us for [`MAX_CAS_ATTEMPTS`] attempts.
    Contended,
    /// The host failed.
    Unavailable,
    /// A bucket held bytes this code did not write.
    Corrupt,
    /// The payload is larger than the table allows.
    PayloadTooLarge,
}

/// Where a record lives: stable for the record's lifetime, usable to name a companion key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotAddress {
    pub bucket: u32,
    pub slot: u16,
}

/// One read of a bucket: its slots and the CAS token a change to it must be committed with
/// ([`INSERT_IF_ABSENT_CAS`] when the bucket was absent).
///
/// The slots stay in the bytes as read (checked once, at the read: no copy of a payload, no list
/// of slots); a bucket holds `slots_per_bucket` slots, the ones past the bytes' end are empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketSnapshot {
    /// The table it was read from ([`BucketTable`]'s `id`).
    table: u64,
    bucket: u32,
    /// The bucket's bytes (empty when absent), checked against the table's geometry.
    bytes: Vec<u8>,
    /// The table's `slots_per_bucket`.
    slots: u16,
    cas: u32,
}

impl BucketSnapshot {
    /// Every slot of the bucket, numbered.
    fn slots(&self) -> impl Iterator<Item = (u16, Option<Slot<'_>>)> {
        numbered(SlotIter { bytes: &self.bytes }.chain(std::iter::repeat(None))).take(usize::from(self.slots))
    }

    /// The bucket's bytes with slot `index` holding `record`, every other slot as read and the
    /// bucket filled up to its `slots` (what encoding each slot in turn gives), spliced from the
    /// bytes as read in one allocation of the result's size.
    fn with_slot(&self, index: u16, record: Slot<'_>) -> Result<Vec<u8>, TableError> {
        let bytes = self.bytes.as_slice();
        // Where slot `index` starts and ends in the bytes, and how many slots they hold.
        let (mut start, mut end, mut held) = (bytes.len(), bytes.len(), 0u16);
        let mut rest = bytes;
        while !rest.is_empty() {
            let (_, after) = decode_slot(rest).ok_or(TableError::Corrupt)?;
            if held == index {
                start = bytes.len() - rest.len();
                end = bytes.len() - after.len();
            }
            held = held.saturating_add(1);
            rest = after;
        }
        let (head, tail) = match (bytes.get(..start), bytes.get(end..)) {
            (Some(head), Some(tail)) => (head, tail),
            _ => return Err(TableError::Corrupt),
        };
        let before = index.saturating_sub(held);
        let after = self.slots.saturating_sub(held.max(index.saturating_add(1)));
        let size = head.len() + usize::from(before) + 1 + SLOT_OVERHEAD + record.payload.len() + tail.len() + usize::from(after);
        let mut out = Vec::with_capacity(size);
        out.extend_from_slice(head);
        out.resize(out.len() + usize::from(before), 0);
        encode_slot(&mut out, Some(record))?;
        out.extend_from_slice(tail);
        out.resize(out.len() + usize::from(after), 0);
        Ok(out)
    }

    /// Whether a slot holds a record of `key`, live or expired: when not, the key is absent
    /// whatever the time (no clock needed to say so).
    pub fn mentions(&self, key: KeyHash) -> bool {
        self.slots().any(|(_, slot)| slot.is_some_and(|slot| slot.key == key))
    }

    /// The live record of `key` at `now_ms`: payload, expiry, address.
    pub fn live(&self, key: KeyHash, now_ms: u64) -> Option<(Vec<u8>, u64, SlotAddress)> {
        self.live_ref(key, now_ms).map(|(payload, expires, address)| (payload.to_vec(), expires, address))
    }

    /// [`BucketSnapshot::live`], the payload borrowed from the snapshot.
    pub fn live_ref(&self, key: KeyHash, now_ms: u64) -> Option<(&[u8], u64, SlotAddress)> {
        self.slots().find_map(|(index, slot)| match slot {
            Some(slot) if slot.key == key && live_at(slot.expires_at_ms, now_ms) => {
                Some((slot.payload, slot.expires_at_ms, SlotAddress { bucket: self.bucket, slot: index }))
            }
            _ => None,
        })
    }
}

/// Validated geometry of a table: it cannot hold zero buckets or slots.
///
/// A table built with [`BucketTable::new`] places records with an all-zero secret (native tests);
/// the filters [`bind`](BucketTable::bind) every table at configure time.
#[derive(Clone, PartialEq, Eq)]
pub struct BucketTable {
    prefix: String,
    buckets: u32,
    slots_per_bucket: u16,
    max_payload: u16,
    placement: [u8; 32],
    /// A fingerprint of `prefix`, telling a snapshot of this table from one of another without
    /// a copy of the prefix per read.
    id: u64,
}

impl std::fmt::Debug for BucketTable {
    // The placement secret is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BucketTable")
            .field("prefix", &self.prefix)
            .field("buckets", &self.buckets)
            .field("slots_per_bucket", &self.slots_per_bucket)
            .field("max_payload", &self.max_payload)
            .finish_non_exhaustive()
    }
}

impl BucketTable {
    /// `prefix` namespaces the keys; `buckets * slots_per_bucket` records at most.
    pub fn new(
        prefix: impl Into<String>,
        buckets: std::num::NonZeroU32,
        slots_per_bucket: std::num::NonZeroU16,
        max_payload: u16,
    ) -> Self {
        let prefix: String = prefix.into();
        let mut id = SipHasher13::new_with_key(&[0; 16]);
        id.write(prefix.as_bytes());
        BucketTable {
            prefix,
            buckets: buckets.get(),
            slots_per_bucket: slots_per_bucket.get(),
            max_payload,
            placement: [0; 32],
            id: id.finish(),
        }
    }

    /// The key prefix (namespaces the table's keys).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Number of buckets.
    pub fn buckets(&self) -> u32 {
        self.buckets
    }

    /// Slots per bucket.
    pub fn slots_per_bucket(&self) -> u16 {
        self.slots_per_bucket
    }

    fn meta_key(&self) -> String {
        format!("{}:meta", self.prefix)
    }

    fn encode_meta(&self, secret: &[u8; 32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(META_LEN);
        out.push(META_VERSION);
        out.extend_from_slice(&self.buckets.to_be_bytes());
        out.extend_from_slice(&self.slots_per_bucket.to_be_bytes());
        out.extend_from_slice(&self.max_payload.to_be_bytes());
        out.extend_from_slice(secret);
        out
    }

    /// Adopts the stored metadata, if its geometry is ours.
    fn adopt_meta(&mut self, bytes: &[u8]) -> Result<(), BindError> {
        if bytes.len() == META_LEN && bytes.first() == Some(&META_VERSION_SHA256) {
            return Err(BindError::Legacy);
        }
        if bytes.len() != META_LEN || bytes.first() != Some(&META_VERSION) {
            return Err(BindError::Corrupt);
        }
        let (_, rest) = split(bytes, 1).ok_or(BindError::Corrupt)?;
        let (buckets, rest) = split(rest, 4).ok_or(BindError::Corrupt)?;
        let (slots, rest) = split(rest, 2).ok_or(BindError::Corrupt)?;
        let (payload, secret) = split(rest, 2).ok_or(BindError::Corrupt)?;
        let buckets = u32::from_be_bytes(buckets.try_into().map_err(|_| BindError::Corrupt)?);
        let slots = u16::from_be_bytes(slots.try_into().map_err(|_| BindError::Corrupt)?);
        let payload = u16::from_be_bytes(payload.try_into().map_err(|_| BindError::Corrupt)?);
        let secret: [u8; 32] = secret.try_into().map_err(|_| BindError::Corrupt)?;
        let checks = [
            ("buckets", buckets, self.buckets),
            ("slots_per_bucket", u32::from(slots), u32::from(self.slots_per_bucket)),
            ("max_payload", u32::from(payload), u32::from(self.max_payload)),
        ];
        for (what, stored, configured) in checks {
            if stored != configured {
                return Err(BindError::GeometryChanged { what, stored, configured });
            }
        }
        self.placement = secret;
        Ok(())
    }

    /// Binds the table to this Envoy's shared data: adopts the placement secret stored in
    /// `<prefix>:meta`, or, when the table is new, stores `entropy` (32 random bytes from the
    /// host) as its secret with the geometry. Of VMs racing to create it, one insert wins and
    /// the others adopt the winner's secret. Refused when the stored geometry differs from this
    /// table's (see [`BindError`]). Configure-time only: reads every bucket key once when the
    /// metadata is absent (to find tables written without it).
    /// `entropy` may be shared by several tables: each table's secret is SHA-256 of it and the
    /// table's prefix.
    pub fn bind(&mut self, store: &dyn SharedStore, entropy: [u8; 32]) -> Result<(), BindError> {
        let entropy: [u8; 32] = Sha256::new().chain_update(entropy).chain_update(self.prefix.as_bytes()).finalize().into();
        let meta_key = self.meta_key();
        for _ in 0..MAX_CAS_ATTEMPTS {
            match store.get(&meta_key).map_err(|_| BindError::Unavailable)? {
                Some((bytes, _)) => return self.adopt_meta(&bytes),
                None => {
                    for bucket in 0..self.buckets {
                        if store.get(&self.bucket_key(bucket)).map_err(|_| BindError::Unavailable)?.is_some() {
                            // A VM that created the metadata since may already have written.
                            return match store.get(&meta_key).map_err(|_| BindError::Unavailable)? {
                                Some((bytes, _)) => self.adopt_meta(&bytes),
                                None => Err(BindError::Legacy),
                            };
                        }
                    }
                    match store.set(&meta_key, &self.encode_meta(&entropy), INSERT_IF_ABSENT_CAS) {
                        Ok(()) => {
                            self.placement = entropy;
                            return Ok(());
                        }
                        // Another VM created it first: adopt its secret.
                        Err(StoreError::CasMismatch) => continue,
                        Err(StoreError::Unavailable) => return Err(BindError::Unavailable),
                    }
                }
            }
        }
        Err(BindError::Unavailable)
    }

    /// The hasher of this table's record keys: SipHash-1-3-128 under the second half of the
    /// placement secret (the first half places records in buckets), so every VM of this Envoy
    /// computes the same fingerprints and no client can.
    pub fn key_hasher(&self) -> KeyHasher {
        let (_, second) = self.placement.split_at(16);
        KeyHasher::Keyed(second.try_into().unwrap_or([0; 16]))
    }

    /// The bucket `key` lives in (secret placement).
    pub fn bucket_of(&self, key: KeyHash) -> u32 {
        key.bucket_index(&self.placement, self.buckets)
    }

    /// The most records the table can hold at once.
    pub fn capacity(&self) -> u64 {
        u64::from(self.buckets) * u64::from(self.slots_per_bucket)
    }

    /// Upper bound of the shared-data bytes this table can ever use (values only).
    pub fn max_bytes(&self) -> u64 {
        self.capacity() * (SLOT_OVERHEAD as u64 + u64::from(self.max_payload))
    }

    /// Calls `f` with `<prefix>:<bucket>`, written on the stack when it fits (every shared-data
    /// call names a bucket: no allocation for it).
    fn with_bucket_key<R>(&self, bucket: u32, f: impl FnOnce(&str) -> R) -> R {
        let mut number = itoa::Buffer::new();
        let digits = number.format(bucket).as_bytes();
        let prefix = self.prefix.as_bytes();
        let mut buffer = [0u8; 96];
        let len = prefix.len() + 1 + digits.len();
        if let Some(out) = buffer.get_mut(..len) {
            let (head, tail) = out.split_at_mut(prefix.len());
            head.copy_from_slice(prefix);
            if let Some((colon, number)) = tail.split_first_mut() {
                *colon = b':';
                number.copy_from_slice(digits);
            }
            if let Ok(key) = std::str::from_utf8(out) {
                return f(key);
            }
        }
        f(&self.bucket_key(bucket))
    }

    fn bucket_key(&self, bucket: u32) -> String {
        // `<prefix>:<bucket>` without the formatting machinery.
        let mut number = itoa::Buffer::new();
        let digits = number.format(bucket);
        let mut key = String::with_capacity(self.prefix.len() + 1 + digits.len());
        key.push_str(&self.prefix);
        key.push(':');
        key.push_str(digits);
        key
    }

    /// Reads the live record of `key`, if any.
    pub fn get(
        &self,
        store: &dyn SharedStore,
        key: KeyHash,
        now_ms: u64,
    ) -> Result<Option<(Vec<u8>, u64, SlotAddress)>, TableError> {
        Ok(self.read(store, key)?.live(key, now_ms))
    }

    /// One read of the bucket `key` lives in (one shared-data get), to look at now and to commit
    /// a change against later with [`BucketTable::update_from`].
    pub fn read(&self, store: &dyn SharedStore, key: KeyHash) -> Result<BucketSnapshot, TableError> {
        self.read_bucket(store, self.bucket_of(key))
    }

    fn read_bucket(&self, store: &dyn SharedStore, bucket: u32) -> Result<BucketSnapshot, TableError> {
        let (bytes, cas) = match self.with_bucket_key(bucket, |key| store.get(key)).map_err(|_| TableError::Unavailable)? {
            Some((bytes, cas)) => {
                self.check(&bytes)?;
                (bytes, cas)
            }
            None => (Vec::new(), INSERT_IF_ABSENT_CAS),
        };
        Ok(BucketSnapshot { table: self.id, bucket, bytes, slots: self.slots_per_bucket, cas })
    }

    /// Checks a bucket's bytes are as this table wrote them; its slots are then read in place
    /// ([`SlotIter`]). More slots than the table has, or a payload larger than it allows, are
    /// bytes it did not write: `Corrupt` (cutting the slots down would forget live records).
    fn check(&self, bytes: &[u8]) -> Result<(), TableError> {
        let mut slots = 0usize;
        let mut rest = bytes;
        while !rest.is_empty() {
            let (slot, after) = decode_slot(rest).ok_or(TableError::Corrupt)?;
            slots += 1;
            if slots > usize::from(self.slots_per_bucket)
                || slot.is_some_and(|slot| slot.payload.len() > usize::from(self.max_payload))
            {
                return Err(TableError::Corrupt);
            }
            rest = after;
        }
        Ok(())
    }

    /// The live records at `now_ms` in a bucket's bytes, checked.
    fn live_in(&self, bytes: &[u8], now_ms: u64) -> Result<u64, TableError> {
        self.check(bytes)?;
        Ok(SlotIter { bytes }.flatten().filter(|s| live_at(s.expires_at_ms, now_ms)).count() as u64)
    }

    /// Atomically reads and updates the record of `key`.
    ///
    /// `decide` sees the live payload (expired records count as absent) and may be called more
    /// than once if another worker wrote the bucket in between; it must be free of side effects.
    pub fn update<T>(
        &self,
        store: &dyn SharedStore,
        key: KeyHash,
        now_ms: u64,
        decide: impl FnMut(Option<&[u8]>) -> Update<T>,
    ) -> Result<(T, SlotAddress), TableError> {
        self.update_from(store, key, now_ms, None, decide)
    }

    /// [`BucketTable::update`] whose first attempt uses `snapshot`, a read made earlier (saves a
    /// shared-data get). Still atomic: a write is committed with the snapshot's CAS token, so it
    /// lands only if the bucket did not change since (else the bucket is read again and `decide`
    /// runs again); and a `Keep` decided on the snapshot is decided again on a fresh read, since
    /// the snapshot may be out of date. A snapshot of another table or bucket is ignored.
    pub fn update_from<T>(
        &self,
        store: &dyn SharedStore,
        key: KeyHash,
        now_ms: u64,
        snapshot: Option<BucketSnapshot>,
        mut decide: impl FnMut(Option<&[u8]>) -> Update<T>,
    ) -> Result<(T, SlotAddress), TableError> {
        self.update_with_expiry(store, key, now_ms, snapshot, |current| decide(current.map(|(payload, _)| payload)))
    }

    /// [`BucketTable::update_from`] whose `decide` also sees the live record's expiry.
    pub fn update_with_expiry<T>(
        &self,
        store: &dyn SharedStore,
        key: KeyHash,
        now_ms: u64,
        snapshot: Option<BucketSnapshot>,
        mut decide: impl FnMut(Option<(&[u8], u64)>) -> Update<T>,
    ) -> Result<(T, SlotAddress), TableError> {
        let bucket = self.bucket_of(key);
        let mut earlier = snapshot.filter(|s| s.bucket == bucket && s.table == self.id && s.slots == self.slots_per_bucket);
        for _ in 0..MAX_CAS_ATTEMPTS {
            let from_earlier = earlier.is_some();
            let snapshot = match earlier.take() {
                Some(snapshot) => snapshot,
                None => self.read_bucket(store, bucket)?,
            };
            let cas = snapshot.cas;
            let found = snapshot.slots().find_map(|(i, slot)| match slot {
                Some(s) if s.key == key && live_at(s.expires_at_ms, now_ms) => Some((i, s.payload, s.expires_at_ms)),
                _ => None,
            });
            let live = found.map(|(i, _, _)| i);
            match decide(found.map(|(_, payload, expires_at_ms)| (payload, expires_at_ms))) {
                // Not from an earlier read: "leave it" must be decided on the current value.
                Update::Keep(_) if from_earlier => continue,
                Update::Keep(result) => {
                    let address = SlotAddress { bucket, slot: live.unwrap_or(0) };
                    return Ok((result, address));
                }
                Update::Write { payload, expires_at_ms, result } => {
                    if payload.len() > usize::from(self.max_payload) {
                        return Err(TableError::PayloadTooLarge);
                    }
                    // Reuse the key's own slot, else an empty or expired one (or one holding a
                    // stale copy of this key).
                    let index = live
                        .or_else(|| {
                            snapshot
                                .slots()
                                .find(|(_, slot)| match slot {
                                    None => true,
                                    Some(s) => !live_at(s.expires_at_ms, now_ms),
                                })
                                .map(|(i, _)| i)
                        })
                        .ok_or(TableError::Full)?;
                    let record = Slot { key, expires_at_ms, payload: &payload };
                    let bytes = snapshot.with_slot(index, record)?;
                    match self.with_bucket_key(bucket, |key| store.set(key, &bytes, cas)) {
                        Ok(()) => return Ok((result, SlotAddress { bucket, slot: index })),
                        Err(StoreError::CasMismatch) => continue,
                        Err(StoreError::Unavailable) => return Err(TableError::Unavailable),
                    }
                }
            }
        }
        Err(TableError::Contended)
    }

    /// Live records at `now_ms` in the buckets `from..from + count` (cut at the last bucket):
    /// one shared-data get per bucket, for a fill level swept a few buckets at a time
    /// ([`crate::flow::fill`]). An absent bucket holds none.
    pub fn live_in_buckets(&self, store: &dyn SharedStore, from: u32, count: u32, now_ms: u64) -> Result<u64, TableError> {
        let mut live = 0;
        for bucket in from..from.saturating_add(count).min(self.buckets) {
            if let Some((bytes, _)) = store.get(&self.bucket_key(bucket)).map_err(|_| TableError::Unavailable)? {
                live += self.live_in(&bytes, now_ms)?;
            }
        }
        Ok(live)
    }

    /// Number of live records (for tests and memory reports); reads every bucket.
    pub fn live_records(&self, store: &dyn SharedStore, now_ms: u64) -> Result<u64, TableError> {
        let mut count = 0;
        for bucket in 0..self.buckets {
            if let Some((bytes, _)) = store.get(&self.bucket_key(bucket)).map_err(|_| TableError::Unavailable)? {
                count += self.live_in(&bytes, now_ms)?;
            }
        }
        Ok(count)
    }
}

// Bucket encoding: a sequence of slots, each either 0x00 (empty) or
// 0x01 | key hash (16) | expires_at_ms (8, BE) | payload length (2, BE) | payload.
fn encode_slot(out: &mut Vec<u8>, slot: Option<Slot<'_>>) -> Result<(), TableError> {
    match slot {
        None => out.push(0),
        Some(slot) => {
            out.push(1);
            out.extend_from_slice(&slot.key.0);
            out.extend_from_slice(&slot.expires_at_ms.to_be_bytes());
            let len = u16::try_from(slot.payload.len()).map_err(|_| TableError::PayloadTooLarge)?;
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(slot.payload);
        }
    }
    Ok(())
}

/// The first slot of `bytes` and the bytes after it (`None`: not a slot this code wrote).
fn decode_slot(bytes: &[u8]) -> Option<(Option<Slot<'_>>, &[u8])> {
    let (&tag, rest) = bytes.split_first()?;
    match tag {
        0 => Some((None, rest)),
        1 => {
            let (key, rest) = split(rest, 16)?;
            let (expiry, rest) = split(rest, 8)?;
            let (len, rest) = split(rest, 2)?;
            let len = usize::from(u16::from_be_bytes(len.try_into().ok()?));
            let (payload, rest) = split(rest, len)?;
            let slot =
                Slot { key: KeyHash(key.try_into().ok()?), expires_at_ms: u64::from_be_bytes(expiry.try_into().ok()?), payload };
            Some((Some(slot), rest))
        }
        _ => None,
    }
}

/// The slots of a bucket's bytes, in place; it stops at bytes that are not a slot (a snapshot's
/// bytes were checked when read: [`BucketTable::check`]).
struct SlotIter<'a> {
    bytes: &'a [u8],
}

impl<'a> Iterator for SlotIter<'a> {
    type Item = Option<Slot<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        let (slot, rest) = decode_slot(self.bytes)?;
        self.bytes = rest;
        Some(slot)
    }
}

/// Decodes a bucket's bytes and encodes the slots again: the number of slots and the bytes
/// (`None`: bytes this code did not write). For the fuzz targets (docs/robustness.md): a decoded
/// bucket must re-encode to the same bytes.
#[doc(hidden)]
pub fn reencode_bucket(bytes: &[u8]) -> Option<(usize, Vec<u8>)> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut count = 0;
    let mut rest = bytes;
    while !rest.is_empty() {
        let (slot, after) = decode_slot(rest)?;
        encode_slot(&mut out, slot).ok()?;
        count += 1;
        rest = after;
    }
    Some((count, out))
}

fn split(bytes: &[u8], at: usize) -> Option<(&[u8], &[u8])> {
    (bytes.len() >= at).then(|| bytes.split_at(at))
}

/// Whether a record expiring at `expires_at_ms` is live at `now_ms`. An expiry that saturated to
/// `u64::MAX` (a record written at the end of the clock's range) never expires: otherwise a record
/// written then would be dead on arrival, and a nonce or a claim could be used again at once
/// (found by the `shared_data` and `time_arith` fuzz targets, docs/robustness.md).
fn live_at(expires_at_ms: u64, now_ms: u64) -> bool {
    expires_at_ms > now_ms || expires_at_ms == u64::MAX
}

/// A bucket's slots with their slot numbers. A bucket holds `slots_per_bucket` (a u16) slots, so
/// numbering them with u16 reaches every one, with no cast.
fn numbered<T>(slots: impl Iterator<Item = T>) -> impl Iterator<Item = (u16, T)> {
    (0..=u16::MAX).zip(slots)
}

/// An in-process [`SharedStore`] with Envoy's exact semantics, for native tests and benchmarks.
#[derive(Default)]
pub struct MemoryStore {
    inner: std::sync::Mutex<MemoryStoreInner>,
}

#[derive(Default)]
struct MemoryStoreInner {
    map: std::collections::HashMap<String, (Vec<u8>, u32)>,
    next_cas: u32,
}

impl SharedStore for MemoryStore {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        let inner = self.inner.lock().map_err(|_| StoreError::Unavailable)?;
        Ok(inner.map.get(key).cloned())
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        let mut inner = self.inner.lock().map_err(|_| StoreError::Unavailable)?;
        inner.next_cas = inner.next_cas.wrapping_add(1).max(1);
        let token = inner.next_cas;
        match inner.map.get_mut(key) {
            Some(entry) => {
                if cas != 0 && cas != entry.1 {
                    return Err(StoreError::CasMismatch);
                }
                *entry = (value.to_vec(), token);
            }
            // Envoy inserts an absent key whatever the token.
            None => {
                inner.map.insert(key.to_string(), (value.to_vec(), token));
            }
        }
        Ok(())
    }
}

/// What a store holds (for memory reports and tests): its entries (a table's buckets and
/// companion keys), their keys' and values' bytes, the heap bytes allocated for them, and the
/// entries its maps have room for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Footprint {
    pub entries: usize,
    pub key_bytes: usize,
    pub value_bytes: usize,
    pub allocated_bytes: usize,
    /// Entries the maps have room for (their tables' capacity).
    pub map_capacity: usize,
}

impl Footprint {
    fn add<'a>(&mut self, map_capacity: usize, entries: impl Iterator<Item = (&'a String, &'a (Vec<u8>, u32))>) {
        self.map_capacity += map_capacity;
        for (key, (value, _)) in entries {
            self.entries += 1;
            self.key_bytes += key.len();
            self.value_bytes += value.len();
            self.allocated_bytes += key.capacity() + value.capacity();
        }
    }
}

impl MemoryStore {
    pub fn footprint(&self) -> Footprint {
        let mut footprint = Footprint::default();
        if let Ok(inner) = self.inner.lock() {
            footprint.add(inner.map.capacity(), inner.map.iter());
        }
        footprint
    }
}

/// A [`SharedStore`] for a native host (the Envoy dynamic module): Envoy's shared-data semantics
/// under real concurrency, for every worker of the process. The keys are spread over
/// [`SHARDS`] locks by a per-process random hash (a client cannot aim every key at one lock), and
/// the CAS tokens come from one process-wide counter, as Envoy's do.
///
/// The hash is foldhash, randomly seeded: fast, and enough here because no client chooses a key.
/// The keys are a table's bucket keys (`<prefix>:<bucket>`), whose bucket a client cannot predict
/// (secret placement, [`KeyHash`]), so there is no key set to flood a lock or a map with.
pub struct ShardedStore {
    shards: Vec<std::sync::Mutex<Shard>>,
    hasher: foldhash::fast::RandomState,
    next_cas: std::sync::atomic::AtomicU32,
}

/// One lock's keys: each key's entry, found by the key's bytes.
type Shard = std::collections::HashSet<Entry, foldhash::fast::RandomState>;

/// One key with its CAS token and value, in one allocation of exactly their size:
/// `cas (4, native order) | key length (4, native order) | key | value`. A map slot is then one
/// boxed slice (16 bytes), where a `(String, (Vec<u8>, u32))` took 56 bytes and two allocations,
/// the value's with room to grow (memory per key: docs/benchmarks.md, bench/analysis.md).
struct Entry(Box<[u8]>);

const ENTRY_HEAD: usize = 8;

impl Entry {
    /// `None` for a key longer than 4 GiB.
    fn new(key: &str, value: &[u8], cas: u32) -> Option<Entry> {
        let key_len = u32::try_from(key.len()).ok()?;
        let mut bytes = Vec::with_capacity(ENTRY_HEAD + key.len() + value.len());
        bytes.extend_from_slice(&cas.to_ne_bytes());
        bytes.extend_from_slice(&key_len.to_ne_bytes());
        bytes.extend_from_slice(key.as_bytes());
        bytes.extend_from_slice(value);
        Some(Entry(bytes.into_boxed_slice()))
    }

    fn cas(&self) -> u32 {
        self.0.first_chunk::<4>().map_or(0, |cas| u32::from_ne_bytes(*cas))
    }

    /// Where the value starts (after the head and the key).
    fn value_at(&self) -> usize {
        let key_len = self
            .0
            .get(4..ENTRY_HEAD)
            .and_then(|len| <[u8; 4]>::try_from(len).ok())
            .map_or(0, u32::from_ne_bytes);
        ENTRY_HEAD.saturating_add(usize::try_from(key_len).unwrap_or(usize::MAX))
    }

    fn key(&self) -> &[u8] {
        self.0.get(ENTRY_HEAD..self.value_at()).unwrap_or_default()
    }

    /// Writes a value of the same size as the current one, and its token, in place (a bucket
    /// rewritten with a record changed keeps its size: no allocation).
    fn overwrite(&mut self, value: &[u8], cas: u32) -> bool {
        let at = self.value_at();
        match self.0.get_mut(at..) {
            Some(old) if old.len() == value.len() => old.copy_from_slice(value),
            _ => return false,
        }
        if let Some(head) = self.0.first_chunk_mut::<4>() {
            *head = cas.to_ne_bytes();
        }
        true
    }

    fn value(&self) -> &[u8] {
        self.0.get(self.value_at()..).unwrap_or_default()
    }
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Entry {}

/// As the key's bytes hash (a lookup by `&[u8]` finds the entry).
impl std::hash::Hash for Entry {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key().hash(state);
    }
}

impl std::borrow::Borrow<[u8]> for Entry {
    fn borrow(&self) -> &[u8] {
        self.key()
    }
}

/// How many locks a [`ShardedStore`] spreads its keys over.
pub const SHARDS: usize = 64;

impl Default for ShardedStore {
    fn default() -> Self {
        ShardedStore {
            shards: (0..SHARDS).map(|_| std::sync::Mutex::new(Shard::default())).collect(),
            hasher: foldhash::fast::RandomState::default(),
            next_cas: std::sync::atomic::AtomicU32::new(0),
        }
    }
}

impl ShardedStore {
    fn shard(&self, key: &str) -> Result<std::sync::MutexGuard<'_, Shard>, StoreError> {
        use std::hash::BuildHasher;
        let index = usize::try_from(self.hasher.hash_one(key) % SHARDS as u64).unwrap_or(0);
        // A poisoned lock (a panic while holding it) fails closed.
        self.shards.get(index).ok_or(StoreError::Unavailable)?.lock().map_err(|_| StoreError::Unavailable)
    }

    pub fn footprint(&self) -> Footprint {
        let mut footprint = Footprint::default();
        for shard in &self.shards {
            if let Ok(shard) = shard.lock() {
                footprint.map_capacity += shard.capacity();
                for entry in shard.iter() {
                    footprint.entries += 1;
                    footprint.key_bytes += entry.key().len();
                    footprint.value_bytes += entry.value().len();
                    footprint.allocated_bytes += entry.0.len();
                }
            }
        }
        footprint
    }

    /// The next CAS token: never 0 (0 means "no check").
    fn token(&self) -> u32 {
        loop {
            let token = self.next_cas.fetch_add(1, std::sync::atomic::Ordering::Relaxed).wrapping_add(1);
            if token != 0 {
                return token;
            }
        }
    }
}

impl SharedStore for ShardedStore {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        Ok(self.shard(key)?.get(key.as_bytes()).map(|entry| (entry.value().to_vec(), entry.cas())))
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        let mut shard = self.shard(key)?;
        let Some(mut entry) = shard.take(key.as_bytes()) else {
            // Envoy inserts an absent key whatever the token.
            shard.insert(Entry::new(key, value, self.token()).ok_or(StoreError::Unavailable)?);
            return Ok(());
        };
        if cas != 0 && cas != entry.cas() {
            shard.insert(entry);
            return Err(StoreError::CasMismatch);
        }
        // A value of the same size is written in place; else the entry is replaced by one of the
        // new value's exact size.
        let token = self.token();
        if !entry.overwrite(value, token) {
            match Entry::new(key, value, token) {
                Some(new) => entry = new,
                None => {
                    shard.insert(entry);
                    return Err(StoreError::Unavailable);
                }
            }
        }
        shard.insert(entry);
        Ok(())
    }
}

/// A [`MemoryStore`] that counts its calls (tests of how many shared-data calls a decision makes).
#[cfg(test)]
#[derive(Default)]
pub(crate) struct CountingStore {
    store: MemoryStore,
    pub gets: std::cell::Cell<u32>,
    pub sets: std::cell::Cell<u32>,
}

#[cfg(test)]
impl SharedStore for CountingStore {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        self.gets.set(self.gets.get() + 1);
        self.store.get(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        self.sets.set(self.sets.get() + 1);
        self.store.set(key, value, cas)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::{NonZeroU16, NonZeroU32};

    fn table(buckets: u32, slots: u16) -> BucketTable {
        BucketTable::new("t", NonZeroU32::new(buckets).unwrap(), NonZeroU16::new(slots).unwrap(), 64)
    }

    #[test]
    fn a_bucket_key_is_the_prefix_and_the_decimal_bucket() {
        let t = table(1, 1);
        for (bucket, key) in [(0, "t:0"), (7, "t:7"), (10, "t:10"), (65_536, "t:65536"), (u32::MAX, "t:4294967295")] {
            assert_eq!(t.bucket_key(bucket), key);
            assert_eq!(t.with_bucket_key(bucket, str::to_string), key);
        }
        // A prefix too long for the stack buffer: the same key, from the heap.
        let long = BucketTable::new("p".repeat(120), NonZeroU32::new(1).unwrap(), NonZeroU16::new(1).unwrap(), 8);
        assert_eq!(long.with_bucket_key(42, str::to_string), format!("{}:42", "p".repeat(120)));
    }

    fn claim(table: &BucketTable, store: &dyn SharedStore, key: &str, now: u64) -> Result<bool, TableError> {
        table
            .update(store, KeyHash::of(&[key.as_bytes()]), now, |current| match current {
                Some(_) => Update::Keep(false),
                None => Update::Write { payload: vec![], expires_at_ms: now.saturating_add(1000), result: true },
            })
            .map(|(won, _)| won)
    }

    #[test]
    fn a_slot_spliced_into_a_bucket_is_the_bucket_encoded_slot_by_slot() {
        let slot =
            |i: u8, len: usize| Slot { key: KeyHash([i; 16]), expires_at_ms: u64::from(i) * 1000, payload: &[7u8; 40][..len] };
        for spb in 1u16..=5 {
            // Every bucket of up to `spb` slots, each empty or a record (lengths varying).
            for held in 0..=spb {
                for mask in 0u32..(1 << held) {
                    let slots: Vec<Option<Slot<'_>>> =
                        (0..held).map(|i| (mask >> i & 1 == 1).then(|| slot(i as u8 + 1, usize::from(i) * 3))).collect();
                    let mut bytes = Vec::new();
                    for s in &slots {
                        encode_slot(&mut bytes, *s).unwrap();
                    }
                    let snapshot = BucketSnapshot { table: 0, bucket: 0, bytes, slots: spb, cas: 0 };
                    for index in 0..spb {
                        let record = slot(99, 5);
                        let mut expected = Vec::new();
                        for i in 0..spb {
                            let current = slots.get(usize::from(i)).copied().flatten();
                            encode_slot(&mut expected, if i == index { Some(record) } else { current }).unwrap();
                        }
                        let spliced = snapshot.with_slot(index, record).unwrap();
                        assert_eq!(spliced, expected, "spb {spb} held {held} mask {mask:b} index {index}");
                        assert_eq!(spliced.capacity(), spliced.len(), "one allocation of the result's size");
                    }
                }
            }
        }
    }

    #[test]
    fn a_key_is_claimed_once_until_it_expires() {
        let store = MemoryStore::default();
        let t = table(4, 4);
        assert_eq!(claim(&t, &store, "a", 0), Ok(true));
        assert_eq!(claim(&t, &store, "a", 999), Ok(false));
        assert_eq!(claim(&t, &store, "a", 1000), Ok(true));
    }

    /// Fuzz regression (fuzz/regressions/shared_data, time_arith): at the end of the clock's range
    /// the expiry saturates to `u64::MAX`; the record must still be live, not dead on arrival.
    #[test]
    fn a_record_written_at_the_end_of_the_clock_is_live() {
        let store = MemoryStore::default();
        let t = table(1, 2);
        assert_eq!(claim(&t, &store, "a", u64::MAX), Ok(true));
        assert_eq!(claim(&t, &store, "a", u64::MAX), Ok(false), "claimed twice at u64::MAX");
        assert_eq!(t.live_records(&store, u64::MAX), Ok(1));
        let quota =
            crate::quota::TenantQuota::for_table(&t, NonZeroU32::new(2).unwrap(), std::num::NonZeroU64::new(1000).unwrap());
        let tenant = KeyHash::of(&[b"t"]);
        assert!(quota.charge(&store, tenant, u64::MAX).is_ok());
        assert!(quota.charge(&store, tenant, u64::MAX).is_ok());
        assert!(quota.charge(&store, tenant, u64::MAX).is_err(), "the quota counted past its limit at u64::MAX");
    }

    /// Fuzz regression (fuzz/regressions/shared_data): a bucket holding more slots than the table
    /// has, or a payload larger than it allows, is foreign: Corrupt, never cut down (which would
    /// forget live records) nor read.
    #[test]
    fn a_bucket_with_more_slots_or_larger_payloads_than_its_table_is_corrupt() {
        let store = MemoryStore::default();
        let t = BucketTable::new("t", NonZeroU32::new(1).unwrap(), NonZeroU16::new(2).unwrap(), 4);
        store.set("t:0", &[0, 0, 0], 0).unwrap();
        assert_eq!(t.read(&store, KeyHash::of(&[b"k"])).err(), Some(TableError::Corrupt));
        let mut big = vec![1];
        big.extend_from_slice(&[0; 16]);
        big.extend_from_slice(&u64::MAX.to_be_bytes());
        big.extend_from_slice(&5u16.to_be_bytes());
        big.extend_from_slice(&[9; 5]);
        store.set("t:0", &big, 0).unwrap();
        assert_eq!(t.read(&store, KeyHash::of(&[b"k"])).err(), Some(TableError::Corrupt));
        assert_eq!(reencode_bucket(&big).map(|(n, bytes)| (n, bytes == big)), Some((1, true)));
    }

    #[test]
    fn a_full_bucket_refuses_instead_of_forgetting() {
        let store = MemoryStore::default();
        let t = table(1, 2);
        assert_eq!(claim(&t, &store, "a", 0), Ok(true));
        assert_eq!(claim(&t, &store, "b", 0), Ok(true));
        assert_eq!(claim(&t, &store, "c", 0), Err(TableError::Full));
        assert_eq!(claim(&t, &store, "a", 0), Ok(false), "a is still remembered");
        assert_eq!(claim(&t, &store, "c", 1000), Ok(true), "expired slots are reused");
    }

    /// Two workers both read the bucket as absent; Envoy would insert either write whatever its
    /// token, so the table must not let both claims win.
    #[test]
    fn two_workers_that_both_saw_the_bucket_absent_do_not_both_win() {
        struct Interleaved<'a> {
            store: &'a MemoryStore,
            stale_absent_reads: std::cell::Cell<u32>,
        }
        impl SharedStore for Interleaved<'_> {
            fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
                // The first read of the other worker happened before our insert.
                if self.stale_absent_reads.get() > 0 {
                    self.stale_absent_reads.set(self.stale_absent_reads.get() - 1);
                    return Ok(None);
                }
                self.store.get(key)
            }
            fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
                self.store.set(key, value, cas)
            }
        }
        let store = MemoryStore::default();
        let t = table(1, 4);
        assert_eq!(claim(&t, &store, "x", 0), Ok(true));
        let late = Interleaved { store: &store, stale_absent_reads: std::cell::Cell::new(1) };
        assert_eq!(claim(&t, &late, "x", 0), Ok(false));
    }

    fn insert(now: u64) -> impl FnMut(Option<&[u8]>) -> Update<bool> {
        move |current| match current {
            Some(_) => Update::Keep(false),
            None => Update::Write { payload: vec![], expires_at_ms: now.saturating_add(1000), result: true },
        }
    }

    #[test]
    fn an_update_from_an_earlier_read_writes_without_reading_again() {
        let store = CountingStore::default();
        let t = table(4, 4);
        let key = KeyHash::of(&[b"a"]);
        let snapshot = t.read(&store, key).unwrap();
        assert!(!snapshot.mentions(key));
        assert_eq!(t.update_from(&store, key, 0, Some(snapshot), insert(0)).map(|(won, _)| won), Ok(true));
        assert_eq!((store.gets.get(), store.sets.get()), (1, 1));
        let snapshot = t.read(&store, key).unwrap();
        assert!(snapshot.mentions(key));
        assert!(snapshot.live(key, 999).is_some());
        assert!(snapshot.live(key, 1000).is_none(), "expired");
    }

    /// The earlier read is out of date: its CAS token no longer matches (the write is not
    /// lost over the other worker's), and a Keep decided on it is decided again on a fresh read.
    #[test]
    fn an_out_of_date_earlier_read_never_decides() {
        let store = CountingStore::default();
        let t = table(1, 4);
        let (a, b) = (KeyHash::of(&[b"a"]), KeyHash::of(&[b"b"]));
        // Both saw the bucket absent; a's insert lands first; b's write must not erase a.
        let stale = t.read(&store, b).unwrap();
        assert_eq!(claim(&t, &store, "a", 0), Ok(true));
        assert_eq!(t.update_from(&store, b, 0, Some(stale), insert(0)).map(|(won, _)| won), Ok(true));
        assert!(t.get(&store, a, 0).unwrap().is_some(), "a survived b's write");
        // A read that saw b live: b is still live, so the fresh read agrees (Keep).
        let saw_b = t.read(&store, b).unwrap();
        assert_eq!(t.update_from(&store, b, 500, Some(saw_b.clone()), insert(500)).map(|(won, _)| won), Ok(false));
        // b is released after that read: the Keep the read suggests is not trusted, a fresh
        // read finds b free.
        t.update(&store, b, 0, |_| Update::Write { payload: vec![], expires_at_ms: 0, result: () }).unwrap();
        assert_eq!(t.update_from(&store, b, 500, Some(saw_b), insert(500)).map(|(won, _)| won), Ok(true));
        // A snapshot of another bucket is ignored.
        let other = BucketTable::new("u", NonZeroU32::new(1).unwrap(), NonZeroU16::new(4).unwrap(), 64);
        let snapshot = other.read(&store, a).unwrap();
        assert_eq!(t.update_from(&store, KeyHash::of(&[b"c"]), 0, Some(snapshot), insert(0)).map(|(won, _)| won), Ok(true));
    }

    #[test]
    fn corrupt_buckets_fail_closed() {
        let store = MemoryStore::default();
        let t = table(1, 1);
        store.set("t:0", &[7, 7, 7], 0).unwrap();
        assert_eq!(claim(&t, &store, "a", 0), Err(TableError::Corrupt));
        store.set("t:0", &[1, 2], 0).unwrap();
        assert_eq!(claim(&t, &store, "a", 0), Err(TableError::Corrupt));
    }

    #[test]
    fn memory_is_bounded_by_geometry() {
        let store = MemoryStore::default();
        let t = table(8, 2);
        let mut accepted = 0;
        for i in 0..100 {
            if claim(&t, &store, &format!("k{i}"), 0) == Ok(true) {
                accepted += 1;
            }
        }
        assert!(accepted <= 16);
        assert_eq!(t.live_records(&store, 0), Ok(accepted));
        assert_eq!(store.inner.lock().unwrap().map.len(), 8);
    }

    fn bound(prefix: &str, buckets: u32, slots: u16, store: &dyn SharedStore, entropy: u8) -> BucketTable {
        let mut t = BucketTable::new(prefix, NonZeroU32::new(buckets).unwrap(), NonZeroU16::new(slots).unwrap(), 8);
        t.bind(store, [entropy; 32]).unwrap();
        t
    }

    /// Placement depends on a secret: two Envoys (two secrets) place the same keys differently,
    /// so a client that knows the key derivation still cannot tell which keys share a bucket.
    #[test]
    fn placement_depends_on_the_secret() {
        let (s1, s2) = (MemoryStore::default(), MemoryStore::default());
        let (a, b) = (bound("t", 1024, 2, &s1, 1), bound("t", 1024, 2, &s2, 2));
        let keys: Vec<KeyHash> = (0..64u32).map(|i| KeyHash::of(&[&i.to_be_bytes()])).collect();
        let differ = keys.iter().filter(|k| a.bucket_of(**k) != b.bucket_of(**k)).count();
        assert!(differ > 60, "{differ} of 64 keys placed differently");
        // The unkeyed placement (all-zero secret, as before) is not what a bound table uses.
        let unkeyed = table(1024, 2);
        assert!(keys.iter().filter(|k| unkeyed.bucket_of(**k) == a.bucket_of(**k)).count() < 4);
        // "Aiming": the keys that share key 0's bucket under one secret are spread by the other.
        let aimed: Vec<KeyHash> = (0..20_000u32)
            .map(|i| KeyHash::of(&[&i.to_be_bytes()]))
            .filter(|k| a.bucket_of(*k) == a.bucket_of(keys[0]))
            .collect();
        assert!(aimed.len() > 5);
        let still_aimed = aimed.iter().filter(|k| b.bucket_of(**k) == b.bucket_of(keys[0])).count();
        assert!(still_aimed <= 1, "{still_aimed} of {} keys aimed under one secret still land together", aimed.len());
    }

    /// Every VM of an Envoy adopts the first one's secret; a changed geometry is refused; a
    /// table written without metadata (an earlier version) is refused rather than forgotten.
    /// Record fingerprints of a bound table: keyed by its secret (every VM that adopts the secret
    /// gets the same ones; another secret, others), length-prefixed, and not SHA-256.
    #[test]
    fn fingerprints_are_keyed_by_the_table_secret() {
        let store = MemoryStore::default();
        let first = bound("t", 16, 2, &store, 1).key_hasher();
        let second = bound("t", 16, 2, &store, 2).key_hasher();
        assert_eq!(first, second, "the adopted secret gives the same hasher");
        let other = bound("t", 16, 2, &MemoryStore::default(), 2).key_hasher();
        let parts: &[&[u8]] = &[b"nonce", b"demo-client", b"n-1"];
        assert_eq!(first.of(parts), second.of(parts));
        assert_ne!(first.of(parts), other.of(parts), "another secret, another fingerprint");
        assert_ne!(first.of(parts), KeyHash::of(parts), "not SHA-256");
        assert_eq!(KeyHasher::Sha256.of(parts), KeyHash::of(parts));
        assert_ne!(first.of(&[b"ab", b"c"]), first.of(&[b"a", b"bc"]), "parts are length-prefixed");
        // Parts too long for the stack buffer hash as the same stream as short ones would.
        let long = vec![7u8; 300];
        let mut stream = siphasher::sip128::SipHasher13::new_with_key(&[9; 16]);
        for part in [&b"x"[..], &long, b"y"] {
            stream.write(&(part.len() as u64).to_be_bytes());
            stream.write(part);
        }
        assert_eq!(KeyHasher::Keyed([9; 16]).of(&[b"x", &long, b"y"]), KeyHash(stream.finish128().as_bytes()));
        let mut stream = siphasher::sip128::SipHasher13::new_with_key(&[9; 16]);
        for part in [&b"nonce"[..], b"k", b"n"] {
            stream.write(&(part.len() as u64).to_be_bytes());
            stream.write(part);
        }
        assert_eq!(KeyHasher::Keyed([9; 16]).of(&[b"nonce", b"k", b"n"]), KeyHash(stream.finish128().as_bytes()));
        assert_eq!(format!("{first:?}"), "KeyHasher::Keyed(..)", "the secret is never printed");
    }

    #[test]
    fn binding_adopts_the_stored_secret_and_refuses_another_geometry() {
        let store = MemoryStore::default();
        let first = bound("t", 16, 2, &store, 1);
        let second = bound("t", 16, 2, &store, 2);
        assert_eq!(first, second, "same secret");
        assert_eq!(claim(&first, &store, "a", 0), Ok(true));
        assert_eq!(claim(&second, &store, "a", 0), Ok(false), "found where the first put it");
        let mut other = BucketTable::new("t", NonZeroU32::new(32).unwrap(), NonZeroU16::new(2).unwrap(), 8);
        assert_eq!(other.bind(&store, [3; 32]), Err(BindError::GeometryChanged { what: "buckets", stored: 16, configured: 32 }));
        assert_eq!(other.bind(&store, [3; 32]).unwrap_err().config_error("nonce_store").field, "nonce_store.buckets");
        let mut other = BucketTable::new("t", NonZeroU32::new(16).unwrap(), NonZeroU16::new(4).unwrap(), 8);
        assert_eq!(other.bind(&store, [3; 32]).unwrap_err().config_error("key_store").field, "key_store.slots_per_bucket");
        // Another prefix is another table.
        assert_ne!(bound("u", 16, 2, &store, 1), first);
        // Buckets without metadata: written by a version without secret placement.
        let legacy = MemoryStore::default();
        assert_eq!(claim(&table(4, 2), &legacy, "a", 0), Ok(true));
        let mut t = table(4, 2);
        assert_eq!(t.bind(&legacy, [1; 32]), Err(BindError::Legacy));
        legacy.set("t:meta", &[9, 9], 0).unwrap();
        assert_eq!(t.bind(&legacy, [1; 32]), Err(BindError::Corrupt));
        // Metadata of version 1: its records carry SHA-256 fingerprints, which the keyed hasher
        // would not find again (live nonces would become claimable): refused the same way.
        let v1 = MemoryStore::default();
        let mut meta = table(4, 2).encode_meta(&[5; 32]);
        meta[0] = META_VERSION_SHA256;
        v1.set("t:meta", &meta, 0).unwrap();
        assert_eq!(table(4, 2).bind(&v1, [1; 32]), Err(BindError::Legacy));
        // Racing creators: the loser's insert fails its CAS and it adopts the winner's secret.
        struct Racy<'a> {
            store: &'a MemoryStore,
            absent_reads: std::cell::Cell<u32>,
        }
        impl SharedStore for Racy<'_> {
            fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
                if key.ends_with(":meta") && self.absent_reads.get() > 0 {
                    self.absent_reads.set(self.absent_reads.get() - 1);
                    return Ok(None);
                }
                self.store.get(key)
            }
            fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
                self.store.set(key, value, cas)
            }
        }
        let store = MemoryStore::default();
        let winner = bound("r", 8, 2, &store, 1);
        let racy = Racy { store: &store, absent_reads: std::cell::Cell::new(1) };
        let loser = bound("r", 8, 2, &racy, 2);
        assert_eq!(loser, winner);
    }

    /// The sharded store keeps Envoy's semantics with one exact-size allocation per key.
    #[test]
    fn the_sharded_store_has_envoys_semantics_in_one_exact_allocation_per_key() {
        let store = ShardedStore::default();
        assert_eq!(store.get("a").unwrap(), None);
        // An absent key is inserted whatever the token.
        store.set("a", b"one", 12345).unwrap();
        let (value, cas) = store.get("a").unwrap().unwrap();
        assert_eq!(value, b"one");
        assert_ne!(cas, 0);
        assert_eq!(store.set("a", b"two", cas.wrapping_add(1)), Err(StoreError::CasMismatch));
        store.set("a", b"longer value", cas).unwrap();
        let (value, cas2) = store.get("a").unwrap().unwrap();
        assert_eq!((value.as_slice(), cas2 != cas), (b"longer value".as_slice(), true));
        // The same size again: written in place, with a new token; the old token no longer works.
        store.set("a", b"LONGER VALUE", cas2).unwrap();
        let (value, cas3) = store.get("a").unwrap().unwrap();
        assert_eq!((value.as_slice(), cas3 != cas2), (b"LONGER VALUE".as_slice(), true));
        assert_eq!(store.set("a", b"longer value", cas2), Err(StoreError::CasMismatch));
        assert_eq!(store.get("a").unwrap().unwrap().0, b"LONGER VALUE", "a refused write changes nothing");
        // Token 0: no check. Empty keys and values are kept apart from their neighbours.
        store.set("a", b"", 0).unwrap();
        store.set("", b"x", 0).unwrap();
        store.set("ab", b"", 0).unwrap();
        assert_eq!(store.get("a").unwrap().unwrap().0, b"");
        assert_eq!(store.get("").unwrap().unwrap().0, b"x");
        assert_eq!(store.get("ab").unwrap().unwrap().0, b"");
        assert_eq!(store.get("b").unwrap(), None);
        let footprint = store.footprint();
        assert_eq!((footprint.entries, footprint.key_bytes, footprint.value_bytes), (3, 3, 1));
        assert_eq!(footprint.allocated_bytes, 3 * 8 + 3 + 1, "head, key and value, nothing more");
    }

    /// Many threads claim keys of one table at once: every key is claimed exactly once, and CAS
    /// increments of one shared key lose no update.
    #[test]
    fn the_sharded_store_keeps_exactly_once_under_real_concurrency() {
        let store = std::sync::Arc::new(ShardedStore::default());
        let table = std::sync::Arc::new(table(4096, 8));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (store, table) = (store.clone(), table.clone());
                std::thread::spawn(move || {
                    let mut won = 0u32;
                    for key in 0..500 {
                        if claim(&table, store.as_ref(), &format!("k{key}"), 1) == Ok(true) {
                            won += 1;
                        }
                    }
                    for _ in 0..500 {
                        loop {
                            let (value, cas) = match store.get("counter").unwrap() {
                                Some((value, cas)) => (u32::from_le_bytes(value.try_into().unwrap()), cas),
                                None => (0, INSERT_IF_ABSENT_CAS),
                            };
                            if store.set("counter", &(value + 1).to_le_bytes(), cas).is_ok() {
                                break;
                            }
                        }
                    }
                    won
                })
            })
            .collect();
        let won: u32 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(won, 500, "each key claimed by exactly one thread");
        let (value, _) = store.get("counter").unwrap().unwrap();
        assert_eq!(u32::from_le_bytes(value.try_into().unwrap()), 8 * 500);
    }
}
