//! GCRA weighted by the amount, in exact integer minor units.
//!
//! A budget of `amount` minor units per `window_s` seconds is a GCRA whose rate is `amount` units
//! per window and whose burst is the whole budget. Time is counted in *ticks* of `1 / amount`
//! seconds, so a request of `a` minor units costs exactly `a * window_s` ticks, the tolerance
//! (horizon) is `amount * window_s` ticks, and one second drains `amount` ticks: no rounding
//! anywhere, no floating point.
//!
//! The record of a key is its debt: `(t0, debt)`, the debt in ticks as of second `t0` (the
//! GCRA's theoretical arrival time is `t0 * amount + debt` ticks). At second `now` the debt is
//! `max(0, debt - (now - t0) * amount)`. A request of `a` units is admitted when
//! `debt_now + a * window_s <= horizon`, and then the record becomes `(now, debt_now + cost)`.
//!
//! The same arithmetic runs on Redis ([`super::redis::AMOUNT_GCRA_SCRIPT`]), whose Lua numbers
//! are doubles: exact for integers up to 2^53. The configuration therefore refuses a budget whose
//! horizon exceeds [`MAX_HORIZON`] (2^52): every value the script computes (`debt + cost <= 2 *
//! horizon`) then stays an exact integer.
//!
//! Bound (property test `amount_budget_never_exceeds_burst_plus_rate`): the amounts admitted at
//! clock readings within `[s1, s2]` (whole seconds) total at most
//! `amount + floor((s2 - s1) * amount / window_s)`.

use std::num::NonZeroU64;

/// The largest horizon (`amount * window_s`) a budget may have: 2^52, so the Redis script's
/// doubles stay exact.
pub const MAX_HORIZON: u64 = 1 << 52;

/// One currency's validated budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Minor units admitted per window (and the burst: the whole budget may go at once).
    pub amount: NonZeroU64,
    /// The window, in seconds.
    pub window_s: NonZeroU64,
}

/// A key's record: the debt in ticks as of second `t0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Debt {
    pub t0: u64,
    pub debt: u64,
}

/// The outcome of one decision for one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub allowed: bool,
    /// The record to store when `allowed`.
    pub record: Debt,
    /// Minor units that could still be admitted right now after this decision.
    pub remaining: u64,
    /// Seconds until the whole budget is available again.
    pub reset_s: u64,
    /// Seconds until this request's amount would be admitted (0 when admitted; the window when
    /// the amount exceeds the whole budget: it never will).
    pub retry_after_s: u64,
}

impl Budget {
    /// `amount * window_s` ticks (checked at configure time to be at most [`MAX_HORIZON`]).
    pub fn horizon(&self) -> u64 {
        self.amount.get().saturating_mul(self.window_s.get())
    }

    /// The debt of `record` at second `now` (a clock that went back drains nothing).
    pub fn debt_at(&self, record: Option<Debt>, now: u64) -> u64 {
        let Some(Debt { t0, debt }) = record else { return 0 };
        let elapsed = now.saturating_sub(t0);
        if elapsed >= self.window_s.get() {
            // The debt is at most the horizon, which a whole window drains.
            return 0;
        }
        debt.saturating_sub(elapsed.saturating_mul(self.amount.get()))
    }

    /// The cost of `amount` minor units in ticks (`None`: more than any budget can hold).
    pub fn cost(&self, amount: u64) -> Option<u64> {
        amount.checked_mul(self.window_s.get())
    }

    /// Decides a request of `amount` minor units at second `now` given the stored record.
    /// Pure: the caller stores `record` when `allowed`.
    pub fn decide(&self, record: Option<Debt>, now: u64, amount: u64) -> Outcome {
        let horizon = self.horizon();
        let per_second = self.amount.get();
        let window = self.window_s.get();
        let debt = self.debt_at(record, now);
        // The record's time never goes back: a debt measured at t0 stays measured there.
        let t = record.map_or(now, |r| r.t0.max(now));
        let fits = self.cost(amount).and_then(|cost| debt.checked_add(cost)).filter(|new| *new <= horizon);
        match fits {
            Some(new) => Outcome {
                allowed: true,
                record: Debt { t0: t, debt: new },
                remaining: (horizon - new) / window,
                reset_s: new.div_ceil(per_second),
                retry_after_s: 0,
            },
            None => {
                let retry_after_s = match self.cost(amount) {
                    // Admitted again once the debt has drained to `horizon - cost`.
                    Some(cost) if cost <= horizon => (debt + cost - horizon).div_ceil(per_second),
                    _ => window,
                };
                Outcome {
                    allowed: false,
                    record: Debt { t0: t, debt },
                    remaining: (horizon - debt.min(horizon)) / window,
                    reset_s: debt.div_ceil(per_second),
                    retry_after_s,
                }
            }
        }
    }

    /// When a record carries no information any more (its debt has drained), in milliseconds.
    pub fn expires_at_ms(&self, record: Debt) -> u64 {
        record
            .t0
            .saturating_add(record.debt.div_ceil(self.amount.get()))
            .saturating_add(1)
            .saturating_mul(1000)
    }
}

/// Bytes of a record as this version writes it: `t0` (8, BE) | `debt` (8, BE) | `counted_until_ms`
/// (8, BE).
pub const RECORD_LEN: u16 = 24;

/// Bytes of a record as the previous version wrote it (`t0` | `debt`, no window stamp).
pub const OLD_RECORD_LEN: usize = 16;

/// A key's record as stored: its debt, and the end of the tenant quota window it was last counted
/// in (see [`crate::quota::TenantQuota::charge_in_window`]); `0`: counted in no window (a record
/// of the previous format).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    pub debt: Debt,
    pub counted_until_ms: u64,
}

/// A record as stored in a table slot ([`RECORD_LEN`] bytes).
pub fn encode(record: Stored) -> Vec<u8> {
    let mut out = Vec::with_capacity(usize::from(RECORD_LEN));
    out.extend_from_slice(&record.debt.t0.to_be_bytes());
    out.extend_from_slice(&record.debt.debt.to_be_bytes());
    out.extend_from_slice(&record.counted_until_ms.to_be_bytes());
    out
}

/// `None` for bytes this code did not write. A record of the previous format (16 bytes, no
/// window stamp) is read as counted in no window.
pub fn decode(bytes: &[u8]) -> Option<Stored> {
    let word = |i: usize| -> Option<u64> { Some(u64::from_be_bytes(bytes.get(i * 8..i * 8 + 8)?.try_into().ok()?)) };
    let counted_until_ms = match bytes.len() {
        OLD_RECORD_LEN => 0,
        len if len == usize::from(RECORD_LEN) => word(2)?,
        _ => return None,
    };
    Some(Stored { debt: Debt { t0: word(0)?, debt: word(1)? }, counted_until_ms })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(amount: u64, window_s: u64) -> Budget {
        Budget { amount: NonZeroU64::new(amount).unwrap(), window_s: NonZeroU64::new(window_s).unwrap() }
    }

    fn run(b: &Budget, record: &mut Option<Debt>, now: u64, amount: u64) -> Outcome {
        let out = b.decide(*record, now, amount);
        if out.allowed {
            *record = Some(out.record);
        }
        out
    }

    #[test]
    fn the_whole_budget_passes_and_one_minor_unit_more_does_not() {
        let b = budget(2_000, 86_400);
        let mut r = None;
        let first = run(&b, &mut r, 100, 1_999);
        assert!(first.allowed);
        assert_eq!(first.remaining, 1);
        assert!(run(&b, &mut r, 100, 1).allowed, "exactly at the budget");
        let over = run(&b, &mut r, 100, 1);
        assert!(!over.allowed, "one minor unit over");
        assert_eq!(over.remaining, 0);
        // One unit comes back after window / amount seconds (43.2 s, rounded up).
        assert_eq!(over.retry_after_s, 44);
        assert!(!run(&b, &mut r, 143, 1).allowed);
        assert!(run(&b, &mut r, 144, 1).allowed);
    }

    #[test]
    fn twenty_withdrawals_of_five_against_twenty() {
        let b = budget(20, 86_400);
        let mut r = None;
        let admitted: u64 = (0..20).filter(|_| run(&b, &mut r, 1_000, 5).allowed).map(|_| 5).sum();
        assert_eq!(admitted, 20);
    }

    #[test]
    fn an_amount_over_the_whole_budget_never_passes() {
        let b = budget(100, 60);
        let out = b.decide(None, 0, 101);
        assert!(!out.allowed);
        assert_eq!(out.retry_after_s, 60);
        assert_eq!(out.remaining, 100);
        let out = b.decide(None, 0, u64::MAX);
        assert!(!out.allowed, "an overflowing cost refuses, it does not wrap");
        assert!(b.decide(None, 0, 0).allowed, "zero costs nothing");
    }

    #[test]
    fn refill_is_exact_and_a_clock_that_goes_back_drains_nothing() {
        let b = budget(3, 10); // 3 units per 10 s: one unit per 3.33 s
        let mut r = None;
        assert!(run(&b, &mut r, 1_000, 3).allowed);
        assert!(!run(&b, &mut r, 1_003, 1).allowed);
        assert!(run(&b, &mut r, 1_004, 1).allowed, "4 s drain 12 ticks >= one unit's 10");
        // The clock goes back: the debt is not drained, and the record keeps its time.
        let before = r;
        assert!(!run(&b, &mut r, 900, 1).allowed);
        assert_eq!(r, before);
        assert_eq!(b.debt_at(r, 900), b.debt_at(r, 1_004));
        assert!(run(&b, &mut r, 1_100, 3).allowed, "a whole window drains everything");
    }

    #[test]
    fn extreme_budgets_stay_exact() {
        let b = budget(MAX_HORIZON, 1);
        let mut r = None;
        assert!(run(&b, &mut r, u64::MAX - 1, MAX_HORIZON).allowed);
        assert!(!run(&b, &mut r, u64::MAX - 1, 1).allowed);
        let b = budget(1, MAX_HORIZON);
        assert!(b.decide(None, 0, 1).allowed);
        assert_eq!(b.decide(Some(Debt { t0: 0, debt: MAX_HORIZON }), 0, 1).retry_after_s, MAX_HORIZON);
    }

    #[test]
    fn records_round_trip_and_foreign_bytes_are_refused() {
        let d = Stored { debt: Debt { t0: 1_700_000_000, debt: 123_456_789 }, counted_until_ms: 1_700_000_086_401_000 };
        assert_eq!(decode(&encode(d)), Some(d));
        assert_eq!(encode(d).len(), usize::from(RECORD_LEN));
        assert_eq!(decode(&[1, 2, 3]), None);
        assert_eq!(decode(&[0; 17]), None);
        assert_eq!(decode(&[0; 25]), None);
        // The previous format: the same debt, counted in no window.
        let old = encode(d)[..OLD_RECORD_LEN].to_vec();
        assert_eq!(decode(&old), Some(Stored { debt: d.debt, counted_until_ms: 0 }));
    }
}
