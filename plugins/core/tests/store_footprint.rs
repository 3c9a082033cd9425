//! Where replay-guard's memory goes with 100,000 tracked keys (the benchmark's configuration,
//! bench/filters_replay.py): what its tables put in shared data, counted by the store. Not a
//! test (ignored); run it to reproduce the figures in docs/benchmarks.md:
//!   cargo test --release -p firebreak-core --test store_footprint -- --ignored --nocapture
//! `N=<keys>` changes the number of keys.

use firebreak_core::filters::{self, Setup};
use firebreak_core::flow::memory::{exchange, MemoryEnv, MemoryRequest, MemoryUpstream};

fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
}

#[test]
#[ignore]
fn replay_guard_keys() {
    let json = r#"{"routes":[{"name":"transfers","match":{"methods":["POST"],"path_exact":"/v1/transfers"},"idempotency_key":"required","require_principal":false}],
      "ttl_seconds":86400,"in_flight_timeout_ms":30000,"max_stored_body_bytes":4096,"stored_headers":["content-type","location"],
      "key_store":{"buckets":65536,"slots_per_bucket":16,"quota_per_principal":524288},"collapse_store":{"buckets":256,"slots_per_bucket":8}}"#;
    let mut env = MemoryEnv { now_ms: Some(1_700_000_000_000), ..MemoryEnv::default() };
    let env_fn = |_: &str| None;
    let factory =
        filters::configure("replay_guard", json.as_bytes(), &Setup { env: &env_fn, store: &env.store, entropy: [7; 32] })
            .unwrap();
    let before = env.store.footprint();
    let upstream = MemoryUpstream {
        status: 200,
        headers: h(&[("content-type", "application/json")]),
        chunks: vec![b"{\"ok\":true}".to_vec()],
        ..MemoryUpstream::default()
    };
    let n = std::env::var("N").ok().and_then(|n| n.parse().ok()).unwrap_or(100_000);
    for i in 0..n {
        let key = format!("\"bench-{i:08}\"");
        let req = MemoryRequest::new(
            h(&[(":method", "POST"), (":path", "/v1/transfers"), (":authority", "x"), ("idempotency-key", &key)]),
            b"",
        );
        let mut flow = factory.new_flow();
        let o = exchange(&mut *flow, &mut env, &req, &upstream);
        assert!(o.passed(), "{:?}", o.reply);
    }
    let after = env.store.footprint();
    let (entries, keys, values) =
        (after.entries - before.entries, after.key_bytes - before.key_bytes, after.value_bytes - before.value_bytes);
    // The native store (ShardedStore) allocates each entry as one slice: an 8-byte head, the key,
    // the value; its maps' slots are 16 bytes and a control byte.
    let per = |bytes: usize| bytes as f64 / n as f64;
    eprintln!(
        "{n} keys: {entries} shared-data entries (buckets and stored responses), keys {keys} B ({:.0} B/key), values {values} B ({:.0} B/key), native entries {} B ({:.0} B/key)",
        per(keys),
        per(values),
        keys + values + 8 * entries,
        per(keys + values + 8 * entries)
    );
}
