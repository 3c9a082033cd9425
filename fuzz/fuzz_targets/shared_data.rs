//! Decoding of everything Firebreak keeps in Envoy's shared data: table buckets, table metadata,
//! replay-guard records and stored responses, rate-limit TATs and leases, tenant quota counts.
//!
//! Properties: foreign bytes never panic and are reported `Corrupt` (or not decoded: `None`),
//! never read as something else; whatever decodes re-encodes to exactly the same bytes; a bucket
//! holding more slots than the table has, or a payload larger than it allows, is `Corrupt`; a
//! write on top of a readable bucket keeps it readable and within the table's bound.
#![no_main]

use std::num::{NonZeroU16, NonZeroU32, NonZeroU64};

use arbitrary::Arbitrary;
use firebreak_core::quota::TenantQuota;
use firebreak_core::ratelimit::gcra::{decode_tat, encode_tat};
use firebreak_core::ratelimit::lease::Lease;
use firebreak_core::replay::{Record, StoredResponse};
use firebreak_core::store::{reencode_bucket, BucketTable, KeyHash, MemoryStore, SharedStore, TableError, Update};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    bytes: Vec<u8>,
    slots: u8,
    max_payload: u8,
    key: u8,
    now_ms: u64,
    claim_id: u64,
    write_len: u8,
}

fuzz_target!(|input: Input| {
    let bytes = &input.bytes;

    // Bucket bytes, decoded directly.
    let decoded = reencode_bucket(bytes);
    if let Some((_, again)) = &decoded {
        assert_eq!(again, bytes, "a decoded bucket re-encoded differently");
    }

    // The same bytes found in a table's bucket.
    let slots = NonZeroU16::new(u16::from(input.slots % 8) + 1).expect("non-zero");
    let table = BucketTable::new("fz", NonZeroU32::MIN, slots, u16::from(input.max_payload));
    let store = MemoryStore::default();
    store.set("fz:0", bytes, 0).expect("memory store");
    let key = KeyHash::of(&[&[input.key]]);
    match table.read(&store, key) {
        Err(TableError::Corrupt) => {}
        Err(other) => panic!("foreign bytes gave {other:?}"),
        Ok(snapshot) => {
            let (count, _) = decoded.expect("a bucket the table read decodes");
            assert!(count <= usize::from(slots.get()), "a bucket with more slots than the table was read");
            let _ = snapshot.live(key, input.now_ms);
        }
    }
    let write = vec![0xab; usize::from(input.write_len)];
    let result = table.update(&store, key, input.now_ms, |_| Update::Write {
        payload: write.clone(),
        expires_at_ms: input.now_ms.saturating_add(1000),
        result: (),
    });
    if result.is_ok() {
        let (after, _) = store.get("fz:0").expect("memory store").expect("written");
        let (count, _) = reencode_bucket(&after).expect("a written bucket decodes");
        assert!(count <= usize::from(slots.get()));
        assert_eq!(table.get(&store, key, input.now_ms).expect("readable").map(|(p, _, _)| p), Some(write));
    }
    assert!(table.live_records(&store, input.now_ms).map_or(true, |n| n <= u64::from(slots.get())));

    // Table metadata: foreign bytes never bind silently to another geometry.
    let mut bound = BucketTable::new("fz", NonZeroU32::MIN, slots, u16::from(input.max_payload));
    let meta = MemoryStore::default();
    meta.set("fz:meta", bytes, 0).expect("memory store");
    if bound.bind(&meta, [1; 32]).is_ok() {
        assert_eq!(bytes.len(), 41);
    }

    // replay-guard records.
    if let Some(record) = Record::decode(bytes) {
        assert_eq!(&record.encode(), bytes);
    }
    if let Some(response) = StoredResponse::decode_for(
        bytes,
        input.claim_id,
        &sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(bytes)).into(),
    ) {
        if let Some(again) = response.encode(input.claim_id) {
            assert_eq!(&again, bytes, "a stored response re-encoded differently");
        }
    }
    // rate-limit TATs and leases.
    if let Some(tat) = decode_tat(bytes) {
        assert_eq!(&encode_tat(tat), bytes);
    }
    if let Some(lease) = Lease::decode(bytes) {
        assert_eq!(&lease.encode(), bytes);
    }
    // Tenant quota counts found in their table.
    let quota = TenantQuota::for_table(&table, NonZeroU32::new(3).expect("3"), NonZeroU64::new(60_000).expect("60 s"));
    let qstore = MemoryStore::default();
    qstore.set(&format!("{}:0", quota.table.prefix()), bytes, 0).expect("memory store");
    let before = quota.used(&qstore, key, input.now_ms);
    if quota.charge(&qstore, key, input.now_ms).is_ok() {
        let after = quota.used(&qstore, key, input.now_ms).expect("readable after a charge");
        assert!(after >= 1 && after <= 3, "a charge left {after} (before: {before:?})");
    }
});
