//! The Generic Cell Rate Algorithm in exact integer arithmetic.
//!
//! A quota of `requests` per `period_ms` with a `burst` is enforced by remembering one number per
//! key: the theoretical arrival time (TAT). Time is counted in *ticks* of `1/requests`
//! milliseconds, so the emission interval (the time one request "costs") is exactly `period_ms`
//! ticks and no rounding ever accumulates: over any interval of length `d` at most
//! `burst + floor(d * requests / period)` requests are admitted, and under sustained overload
//! exactly that many. There is no window boundary, so there is no double burst at one.

use std::num::NonZeroU32;

/// A validated quota: cannot hold a zero rate, period or burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub requests: NonZeroU32,
    pub period_ms: NonZeroU32,
    pub burst: NonZeroU32,
}

/// The outcome of one GCRA decision for one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub allowed: bool,
    /// The TAT to store when `allowed` (ticks); otherwise the stored one.
    pub tat: u128,
    /// Requests that could still be admitted right now after this decision.
    pub remaining: u32,
    /// Milliseconds until the whole burst is available again (the record is then forgettable).
    pub reset_ms: u64,
    /// Milliseconds until the next request would be admitted (0 when one would be now).
    pub retry_after_ms: u64,
}

impl Quota {
    fn scale(&self) -> u128 {
        u128::from(self.requests.get())
    }

    /// Emission interval in ticks.
    fn interval(&self) -> u128 {
        u128::from(self.period_ms.get())
    }

    /// Tolerance: how far the TAT may run ahead of now after an admission, in ticks.
    fn horizon(&self) -> u128 {
        u128::from(self.burst.get()) * self.interval()
    }

    pub fn ticks(&self, ms: u64) -> u128 {
        u128::from(ms) * self.scale()
    }

    /// Ticks to milliseconds, rounded up.
    pub fn ms_ceil(&self, ticks: u128) -> u64 {
        let ms = ticks.div_ceil(self.scale());
        u64::try_from(ms).unwrap_or(u64::MAX)
    }

    /// When the record of a TAT carries no information any more (it equals a fresh key's):
    /// the slot may expire then.
    pub fn expires_at_ms(&self, tat: u128) -> u64 {
        self.ms_ceil(tat)
    }

    /// Decides one request at `now_ms` given the stored TAT (`None`: no record, a fresh key).
    /// Pure: nothing is written; the caller stores `tat` when `allowed`.
    pub fn decide(&self, stored_tat: Option<u128>, now_ms: u64) -> Outcome {
        let now = self.ticks(now_ms);
        let interval = self.interval();
        let horizon = self.horizon();
        // A TAT in the past is the same as a fresh key.
        let base = stored_tat.map_or(now, |tat| tat.max(now));
        let candidate = base.saturating_add(interval);
        let debt = candidate - now;
        if debt <= horizon {
            Outcome {
                allowed: true,
                tat: candidate,
                remaining: remaining(horizon - debt, interval),
                reset_ms: self.ms_ceil(debt),
                retry_after_ms: if horizon - debt >= interval { 0 } else { self.ms_ceil(debt + interval - horizon) },
            }
        } else {
            let ahead = base - now;
            Outcome {
                allowed: false,
                tat: base,
                remaining: 0,
                reset_ms: self.ms_ceil(ahead),
                // Admitted again once candidate - t <= horizon, i.e. at t = candidate - horizon.
                retry_after_ms: self.ms_ceil(debt - horizon),
            }
        }
    }

    /// The state of a key without a request (for headers on a peek).
    pub fn remaining_now(&self, stored_tat: Option<u128>, now_ms: u64) -> u32 {
        let now = self.ticks(now_ms);
        let base = stored_tat.map_or(now, |tat| tat.max(now));
        remaining(self.horizon().saturating_sub(base - now), self.interval())
    }
}

fn remaining(slack: u128, interval: u128) -> u32 {
    u32::try_from(slack / interval).unwrap_or(u32::MAX)
}

/// TAT as stored in a table slot: 16 bytes, big endian.
pub fn encode_tat(tat: u128) -> Vec<u8> {
    tat.to_be_bytes().to_vec()
}

/// `None` for bytes this code did not write.
pub fn decode_tat(bytes: &[u8]) -> Option<u128> {
    let array: [u8; 16] = bytes.try_into().ok()?;
    Some(u128::from_be_bytes(array))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota(requests: u32, period_ms: u32, burst: u32) -> Quota {
        Quota {
            requests: NonZeroU32::new(requests).unwrap(),
            period_ms: NonZeroU32::new(period_ms).unwrap(),
            burst: NonZeroU32::new(burst).unwrap(),
        }
    }

    /// Runs `decide` as a store would: keeps the TAT of admitted requests.
    fn run(q: &Quota, tat: &mut Option<u128>, now: u64) -> Outcome {
        let out = q.decide(*tat, now);
        if out.allowed {
            *tat = Some(out.tat);
        }
        out
    }

    #[test]
    fn a_fresh_key_gets_its_burst_then_is_throttled() {
        let q = quota(1, 1000, 3);
        let mut tat = None;
        let outs: Vec<_> = (0..4).map(|_| run(&q, &mut tat, 10_000)).collect();
        assert_eq!(outs.iter().map(|o| o.allowed).collect::<Vec<_>>(), [true, true, true, false]);
        assert_eq!(outs.iter().map(|o| o.remaining).collect::<Vec<_>>(), [2, 1, 0, 0]);
        assert_eq!(outs[3].retry_after_ms, 1000);
        assert_eq!(outs[3].reset_ms, 3000);
        assert_eq!(outs[2].retry_after_ms, 1000, "after the last token: next one in one interval");
        assert_eq!(outs[0].retry_after_ms, 0);
    }

    #[test]
    fn refill_is_one_request_per_interval() {
        let q = quota(2, 1000, 2); // one request every 500 ms
        let mut tat = None;
        assert!(run(&q, &mut tat, 0).allowed);
        assert!(run(&q, &mut tat, 0).allowed);
        assert!(!run(&q, &mut tat, 499).allowed);
        assert!(run(&q, &mut tat, 500).allowed);
        assert!(!run(&q, &mut tat, 500).allowed);
        assert!(run(&q, &mut tat, 2000).allowed);
        assert!(run(&q, &mut tat, 2000).allowed, "fully refilled after burst * interval");
        assert!(!run(&q, &mut tat, 2000).allowed);
    }

    #[test]
    fn rejected_requests_do_not_change_the_state() {
        let q = quota(1, 1000, 1);
        let mut tat = None;
        assert!(run(&q, &mut tat, 0).allowed);
        let before = tat;
        for now in 0..1000 {
            assert!(!run(&q, &mut tat, now).allowed);
        }
        assert_eq!(tat, before);
        assert!(run(&q, &mut tat, 1000).allowed);
    }

    /// Rates that do not divide the period (3 per 1000 ms) are still exact over time.
    #[test]
    fn indivisible_rates_do_not_drift() {
        let q = quota(3, 1000, 2);
        let mut tat = None;
        let mut admitted = 0u64;
        for now in 0..=3_600_000u64 {
            if run(&q, &mut tat, now).allowed {
                admitted += 1;
            }
        }
        // 2 (burst) + one every 333.33 ms for an hour.
        assert_eq!(admitted, 2 + 3 * 3600);
    }

    /// With `burst: 1` there is no tolerance: a request polled on a millisecond clock is admitted
    /// at the first millisecond on or after its due time, and the next is due one interval
    /// after that. The error is only ever towards admitting less.
    #[test]
    fn burst_one_rounds_each_admission_up_to_the_clock() {
        let q = quota(3, 1000, 1);
        let mut tat = None;
        let admitted = (0..=3_600_000u64).filter(|now| run(&q, &mut tat, *now).allowed).count() as u64;
        assert!(admitted < 1 + 3 * 3600);
        assert_eq!(admitted, 1 + 3_600_000 / 334);
    }

    #[test]
    fn a_past_tat_equals_a_fresh_key() {
        let q = quota(5, 1000, 4);
        let fresh = q.decide(None, 50_000);
        let stale = q.decide(Some(q.ticks(10_000)), 50_000);
        assert_eq!(fresh, stale);
        assert_eq!(q.expires_at_ms(fresh.tat), 50_200);
    }

    #[test]
    fn tat_round_trips_and_rejects_foreign_bytes() {
        assert_eq!(decode_tat(&encode_tat(123_456_789_012_345)), Some(123_456_789_012_345));
        assert_eq!(decode_tat(&[1, 2, 3]), None);
        assert_eq!(decode_tat(&[]), None);
    }

    #[test]
    fn extreme_quotas_do_not_overflow() {
        let q = quota(u32::MAX, u32::MAX, u32::MAX);
        assert!(q.decide(None, u64::MAX).allowed);
        let out = q.decide(Some(u128::MAX - 1), u64::MAX);
        assert!(!out.allowed, "a TAT from the far future refuses, it does not wrap");
        assert_eq!(out.retry_after_ms, u64::MAX);
        let q = quota(1, u32::MAX, 1);
        let mut tat = None;
        assert!(run(&q, &mut tat, u64::MAX - 1).allowed);
        let out = run(&q, &mut tat, u64::MAX);
        assert!(!out.allowed);
        assert!(out.retry_after_ms > 0);
    }
}
