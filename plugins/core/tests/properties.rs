//! Invariants over random sequences and interleavings (proptest; docs/robustness.md):
//! - GCRA never admits more than burst + rate × time;
//! - no table ever holds more than its bound (per bucket, and in all);
//! - exactly one forward per idempotency key, and per signature nonce, whatever the interleaving
//!   of the workers' events (flows driven event by event through the in-memory host, sharing one
//!   shared-data store), and under real threads on the native host's `ShardedStore`.
//!
//! - amount-limit: the amounts admitted for one key within any interval of whole seconds never
//!   exceed `amount + rate × time` (the weighted GCRA alone), and the amounts forwarded never
//!   exceed the budget whatever the interleaving of the workers' events (the flow, one store).

// Test code: indexing and unwrapping are allowed (README, "Lint policy").
#![allow(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::cast_possible_truncation)]

use std::num::{NonZeroU16, NonZeroU32, NonZeroU64};
use std::sync::Arc;

use firebreak_core::amount::budget::Budget;
use firebreak_core::filters::{configure, Setup};
use firebreak_core::flow::memory::{step, MemoryEnv, MemoryRequest, MemoryUpstream};
use firebreak_core::flow::{Event, Flow, FlowFactory, Step};
use firebreak_core::quota::TenantQuota;
use firebreak_core::ratelimit::gcra::Quota;
use firebreak_core::signature::{sign, SignRequest};
use firebreak_core::store::{reencode_bucket, BucketTable, KeyHash, MemoryStore, ShardedStore, SharedStore, Update};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    // A few seconds in all under `cargo test` (debug build).
    ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn gcra_never_admits_more_than_burst_plus_rate_times_time(
        requests in 1u32..1000, period_ms in 1u32..100_000, burst in 1u32..50,
        start in 0u64..(1 << 50), steps in prop::collection::vec(0u64..2000, 1..300),
    ) {
        let quota = Quota {
            requests: NonZeroU32::new(requests).unwrap(),
            period_ms: NonZeroU32::new(period_ms).unwrap(),
            burst: NonZeroU32::new(burst).unwrap(),
        };
        let (mut tat, mut now, mut admitted) = (None, start, 0u128);
        // Every window [t0, t] of the sequence, not only from the start: admissions at times.
        let mut times = Vec::new();
        for advance in steps {
            now += advance;
            let outcome = quota.decide(tat, now);
            if outcome.allowed {
                tat = Some(outcome.tat);
                admitted += 1;
                times.push(now);
            }
            prop_assert!(outcome.remaining <= burst);
        }
        prop_assert_eq!(admitted as usize, times.len());
        for (i, &t0) in times.iter().enumerate() {
            for (j, &t) in times.iter().enumerate().skip(i) {
                let count = (j - i + 1) as u128;
                let bound = u128::from(burst) + u128::from(t - t0) * u128::from(requests) / u128::from(period_ms);
                prop_assert!(count <= bound, "{} admitted in [{}, {}], bound {}", count, t0, t, bound);
            }
        }
    }

    #[test]
    fn amount_budget_never_exceeds_burst_plus_rate(
        amount in 1u64..10_000, window_s in 1u64..100_000, start in 0u64..(1 << 40),
        steps in prop::collection::vec((0u64..5_000, 0u64..12_000), 1..200),
    ) {
        let budget = Budget { amount: NonZeroU64::new(amount).unwrap(), window_s: NonZeroU64::new(window_s).unwrap() };
        let (mut record, mut now) = (None, start);
        let mut admitted: Vec<(u64, u64)> = Vec::new();
        for (advance, a) in steps {
            now += advance;
            let outcome = budget.decide(record, now, a);
            if outcome.allowed {
                record = Some(outcome.record);
                admitted.push((now, a));
            }
            prop_assert!(outcome.remaining <= amount);
        }
        for i in 0..admitted.len() {
            let mut sum = 0u128;
            for (t, a) in &admitted[i..] {
                sum += u128::from(*a);
                let t0 = admitted[i].0;
                let bound = u128::from(amount) + u128::from(t - t0) * u128::from(amount) / u128::from(window_s);
                prop_assert!(sum <= bound, "{} admitted in [{}, {}], bound {}", sum, t0, t, bound);
            }
        }
    }

    #[test]
    fn amounts_forwarded_never_exceed_the_budget_under_interleaved_workers(
        amounts in prop::collection::vec(0u64..12, 2..6), order in prop::collection::vec(0usize..6, 0..60),
    ) {
        let mut env = MemoryEnv::default();
        let factory = amount_limit(&env);
        let requests: Vec<MemoryRequest> = amounts.iter().map(|a| MemoryRequest::new(vec![
            (":method".into(), "POST".into()), (":path".into(), "/v1/withdrawals".into()),
            (":authority".into(), "api".into()),
        ], format!(r#"{{"account":"acc-1","amount":{a}}}"#).as_bytes())).collect();
        let forwarded = interleave(&*factory, &mut env, &requests, &order);
        let total: u64 = amounts.iter().zip(&forwarded).filter(|(_, f)| **f).map(|(a, _)| *a).sum();
        prop_assert!(total <= 20, "forwarded {} against a budget of 20", total);
        // The first request that ran alone to its end fits (each amount is at most 11 <= 20).
        prop_assert!(forwarded.iter().any(|f| *f));
    }

    #[test]
    fn no_table_exceeds_its_bound(
        buckets in 1u32..4, slots in 1u16..4,
        ops in prop::collection::vec((0u8..40, 0u64..50, 1u64..100, 0usize..6), 1..200),
    ) {
        let store = MemoryStore::default();
        let table = BucketTable::new("p", NonZeroU32::new(buckets).unwrap(), NonZeroU16::new(slots).unwrap(), 8);
        let quota = TenantQuota::for_table(&table, NonZeroU32::new(3).unwrap(), NonZeroU64::new(100).unwrap());
        let mut now = 0;
        for (key, advance, ttl, len) in ops {
            now += advance;
            let key = KeyHash::of(&[&[key]]);
            let _ = table.update(&store, key, now, |_| Update::Write { payload: vec![1; len], expires_at_ms: now + ttl, result: () });
            let _ = quota.charge(&store, key, now);
            prop_assert!(table.live_records(&store, now).unwrap() <= table.capacity());
            for b in 0..buckets {
                for prefix in ["p", "p.quota"] {
                    if let Some((bytes, _)) = store.get(&format!("{prefix}:{b}")).unwrap() {
                        let (count, _) = reencode_bucket(&bytes).unwrap();
                        prop_assert!(count <= usize::from(slots), "bucket {}:{} holds {} slots", prefix, b, count);
                    }
                }
            }
            prop_assert!(quota.used(&store, key, now).unwrap() <= 3);
        }
    }

    #[test]
    fn one_forward_per_idempotency_key_under_interleaved_workers(
        keys in prop::collection::vec(0u8..3, 2..6), order in prop::collection::vec(0usize..6, 0..60),
    ) {
        let mut env = MemoryEnv::default();
        let factory = replay_guard(&env);
        let requests: Vec<MemoryRequest> = keys.iter().map(|k| MemoryRequest::new(vec![
            (":method".into(), "POST".into()), (":path".into(), "/v1/payouts".into()),
            (":authority".into(), "api".into()), (":scheme".into(), "http".into()),
            ("idempotency-key".into(), format!("\"k-{k}\"")),
        ], b"{\"amount\":1}")).collect();
        let forwarded = interleave(&*factory, &mut env, &requests, &order);
        for key in 0..3u8 {
            let n = keys.iter().zip(&forwarded).filter(|(k, f)| **k == key && **f).count();
            prop_assert!(n <= 1, "key {} forwarded {} times", key, n);
        }
        // The first request of each key that ran alone to its end was forwarded: no lost request.
        prop_assert!(forwarded.iter().any(|f| *f));
    }

    #[test]
    fn one_forward_per_nonce_under_interleaved_workers(
        nonces in prop::collection::vec(0u8..3, 2..6), order in prop::collection::vec(0usize..6, 0..60),
    ) {
        let mut env = MemoryEnv::default();
        let factory = request_signature(&env);
        let now_s = env.now_ms.unwrap() / 1000;
        let requests: Vec<MemoryRequest> = nonces.iter().map(|n| signed(now_s, &format!("nonce-{n}"))).collect();
        let forwarded = interleave(&*factory, &mut env, &requests, &order);
        for nonce in 0..3u8 {
            let n = nonces.iter().zip(&forwarded).filter(|(k, f)| **k == nonce && **f).count();
            prop_assert!(n <= 1, "nonce {} forwarded {} times", nonce, n);
        }
        prop_assert!(forwarded.iter().any(|f| *f));
    }
}

/// Real threads racing on one native store: each key is claimed exactly once.
#[test]
fn one_claim_per_key_across_threads_on_the_sharded_store() {
    let store = Arc::new(ShardedStore::default());
    let table = Arc::new(BucketTable::new("t", NonZeroU32::new(4).unwrap(), NonZeroU16::new(64).unwrap(), 8));
    let wins = std::sync::atomic::AtomicU32::new(0);
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                for key in 0..100u8 {
                    let won = table
                        .update(&*store, KeyHash::of(&[&[key]]), 0, |current| match current {
                            Some(_) => Update::Keep(false),
                            None => Update::Write { payload: vec![], expires_at_ms: 1000, result: true },
                        })
                        .map(|(won, _)| won);
                    if won == Ok(true) {
                        wins.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    assert_eq!(wins.into_inner(), 100);
}

const SECRET: &[u8] = b"0123456789012345678901234567890!";

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn amount_limit(env: &MemoryEnv) -> Arc<dyn FlowFactory> {
    let setup = Setup { env: &|_| None, store: &env.store, entropy: [9; 32] };
    let json = r#"{"rules":[{"name":"w","routes":[{"methods":["POST"],"path_exact":"/v1/withdrawals"}],"amount_pointer":"/amount","amount_format":"minor_units","key":["/account"],"budgets":{"CNY":{"exponent":2,"amount_minor":20,"window_s":86400}}}]}"#;
    configure("amount_limit", json.as_bytes(), &setup).unwrap()
}

fn replay_guard(env: &MemoryEnv) -> Arc<dyn FlowFactory> {
    let json = br#"{"routes":[{"name":"payouts","match":{"methods":["POST"],"path_exact":"/v1/payouts"}}],
        "ttl_seconds":3600,"in_flight_timeout_ms":30000,"key_store":{"buckets":2,"slots_per_bucket":8}}"#;
    configure("replay_guard", json, &Setup { env: &|_| None, store: &env.store, entropy: [7; 32] }).unwrap()
}

fn request_signature(env: &MemoryEnv) -> Arc<dyn FlowFactory> {
    let json = format!(
        r#"{{"routes":[{{"methods":["POST"],"path_prefix":"/v1/"}}],"max_age_seconds":300,"max_body_bytes":1024,
            "keys":[{{"id":"client-a","secret_base64":"{}"}}],"nonce_store":{{"buckets":2,"slots_per_bucket":8}}}}"#,
        b64(SECRET)
    );
    configure("request_signature", json.as_bytes(), &Setup { env: &|_| None, store: &env.store, entropy: [7; 32] }).unwrap()
}

fn signed(now_s: u64, nonce: &str) -> MemoryRequest {
    let body = b"{\"amount\":1}";
    let signed = sign(&SignRequest {
        method: "POST",
        scheme: "http",
        authority: "api",
        path_and_query: "/v1/payouts",
        headers: &[],
        body,
        key_id: "client-a",
        secret: SECRET,
        created: now_s,
        expires: None,
        nonce: Some(nonce),
        label: "sig1",
        components: None,
        extra_covered_headers: &[],
    })
    .unwrap();
    let mut headers = vec![
        (":method".to_string(), "POST".to_string()),
        (":path".to_string(), "/v1/payouts".to_string()),
        (":authority".to_string(), "api".to_string()),
        (":scheme".to_string(), "http".to_string()),
    ];
    headers.extend(signed.pairs());
    MemoryRequest::new(headers, body)
}

/// Drives one flow per request, one event at a time, in the order `order` picks (index modulo the
/// flows still running; then every flow to its end), all on `env`'s shared data. A flow is
/// forwarded when every request event was answered `Continue`; a forwarded flow gets `201`.
fn interleave(factory: &dyn FlowFactory, env: &mut MemoryEnv, requests: &[MemoryRequest], order: &[usize]) -> Vec<bool> {
    let upstream = MemoryUpstream { status: 201, ..MemoryUpstream::default() };
    let mut flows: Vec<Box<dyn Flow>> = requests.iter().map(|_| factory.new_flow()).collect();
    // Next event index per flow: 0 headers, 1 body, 2 response headers, 3 stream end, 4 done.
    let mut next = vec![0usize; requests.len()];
    let mut forwarded = vec![false; requests.len()];
    let mut refused = vec![false; requests.len()];
    #[allow(clippy::too_many_arguments)]
    fn advance(
        i: usize,
        env: &mut MemoryEnv,
        requests: &[MemoryRequest],
        upstream: &MemoryUpstream,
        flows: &mut [Box<dyn Flow>],
        next: &mut [usize],
        forwarded: &mut [bool],
        refused: &mut [bool],
    ) {
        let request = &requests[i];
        let len = request.chunks.concat().len();
        let event = match next[i] {
            0 => Event::RequestHeaders { end_of_stream: len == 0 },
            1 => Event::RequestBody { buffered: len, end_of_stream: true },
            2 => Event::ResponseHeaders { end_of_stream: true },
            _ => Event::StreamEnd,
        };
        let (result, _) = step(flows[i].as_mut(), event, env, request, upstream);
        next[i] += 1;
        match result {
            Step::Continue if next[i] == 2 => forwarded[i] = !refused[i],
            Step::Continue | Step::Hold => {}
            Step::Reply(_) | Step::Respond(_) if next[i] <= 2 => {
                refused[i] = true;
                next[i] = 3;
            }
            _ => {}
        }
        if next[i] == 2 && !forwarded[i] {
            next[i] = 3;
        }
    }
    for pick in order {
        let running: Vec<usize> = (0..requests.len()).filter(|&i| next[i] < 4).collect();
        if running.is_empty() {
            break;
        }
        let i = running[pick % running.len()];
        advance(i, env, requests, &upstream, &mut flows, &mut next, &mut forwarded, &mut refused);
    }
    for i in 0..requests.len() {
        while next[i] < 4 {
            advance(i, env, requests, &upstream, &mut flows, &mut next, &mut forwarded, &mut refused);
        }
    }
    forwarded
}
