//! GCRA and the window arithmetic at extreme values (u64 clocks near 0 and u64::MAX, u32 rates,
//! periods and bursts, stored TATs anywhere in u128).
//!
//! Properties: never panics or overflows; an admission leaves the TAT ahead of now by at most the
//! burst's worth of time; a refusal keeps the stored TAT; `remaining` never exceeds the burst;
//! with a non-decreasing clock from a fresh key, the admissions over [t0, t] never exceed
//! burst + (t - t0) * requests / period (exact integer bound); the tenant quota's window never
//! counts more than its limit, whatever the clock does.
#![no_main]

use std::num::{NonZeroU16, NonZeroU32, NonZeroU64};

use arbitrary::Arbitrary;
use firebreak_core::quota::TenantQuota;
use firebreak_core::ratelimit::gcra::Quota;
use firebreak_core::store::{BucketTable, KeyHash, MemoryStore};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    requests: NonZeroU32,
    period_ms: NonZeroU32,
    burst: NonZeroU32,
    start_ms: u64,
    stored: Option<u128>,
    steps: Vec<u32>,
    big_jump: bool,
    limit: NonZeroU32,
    window_ms: NonZeroU64,
}

fuzz_target!(|input: Input| {
    let quota = Quota { requests: input.requests, period_ms: input.period_ms, burst: input.burst };
    let horizon = u128::from(input.burst.get()) * u128::from(input.period_ms.get());

    // One decision from any stored TAT.
    let one = quota.decide(input.stored, input.start_ms);
    let now_ticks = quota.ticks(input.start_ms);
    assert!(one.remaining <= input.burst.get());
    if one.allowed {
        assert!(one.tat > now_ticks || one.tat == u128::MAX);
        assert!(one.tat.saturating_sub(now_ticks) <= horizon);
    } else {
        assert_eq!(Some(one.tat), input.stored, "a refusal changed the TAT");
        assert!(one.retry_after_ms > 0);
    }
    let _ = quota.remaining_now(input.stored, input.start_ms);
    let _ = quota.expires_at_ms(one.tat);

    // A sequence from a fresh key with a non-decreasing clock.
    let mut tat = None;
    let mut now = input.start_ms;
    let mut admitted: u128 = 0;
    for (i, step) in input.steps.iter().take(512).enumerate() {
        let advance = if input.big_jump && i == 1 { u64::MAX / 2 } else { u64::from(*step % 5000) };
        now = now.saturating_add(advance);
        let outcome = quota.decide(tat, now);
        if outcome.allowed {
            if let Some(previous) = tat {
                assert!(outcome.tat > previous, "the TAT went back");
            }
            tat = Some(outcome.tat);
            admitted += 1;
        }
        let elapsed = u128::from(now - input.start_ms);
        let bound =
            u128::from(input.burst.get()) + elapsed * u128::from(input.requests.get()) / u128::from(input.period_ms.get());
        assert!(admitted <= bound, "admitted {admitted} > burst + rate * time = {bound}");
    }

    // The tenant quota's window at extreme clocks.
    let table = BucketTable::new("fz", NonZeroU32::MIN, NonZeroU16::new(4).expect("4"), 64);
    let tenants = TenantQuota::for_table(&table, input.limit, input.window_ms);
    let store = MemoryStore::default();
    let tenant = KeyHash::of(&[b"t"]);
    let mut now = input.start_ms;
    let mut charged = 0u64;
    let window_start = now;
    for step in input.steps.iter().take(64) {
        now = now.saturating_add(u64::from(*step % 100));
        if now.saturating_sub(window_start) >= input.window_ms.get() {
            break;
        }
        if tenants.charge(&store, tenant, now).is_ok() {
            charged += 1;
        }
        assert!(charged <= u64::from(input.limit.get()), "the quota counted past its limit");
    }
});
