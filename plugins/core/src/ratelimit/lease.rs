//! The reconciled mode's leases (`reconcile` with `state.backend: redis`): tokens Redis granted
//! an instance ahead of time ([`super::redis`]), kept in the instance's shared data and spent
//! locally, one CAS per request, until they run out or `lease_ms` passes. The accuracy this
//! gives is described in [`super::redis`].

use crate::store::{SharedStore, Update};

use super::gcra::Outcome;
use super::redis::Grant;
use super::{limited, ratelimit_headers, Decision, Event, Plan, PlannedRule, RateLimitPolicy, Rule};

/// A key's local lease: `tokens` still to spend until `until_ms`; `tokens == 0` means Redis
/// refused the key and it is refused locally until `until_ms` (its Retry-After).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub tokens: u32,
    pub until_ms: u64,
    /// When the key's whole burst is available again, as Redis said when it granted the lease.
    pub reset_at_ms: u64,
}

impl Lease {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(20);
        out.extend_from_slice(&self.tokens.to_be_bytes());
        out.extend_from_slice(&self.until_ms.to_be_bytes());
        out.extend_from_slice(&self.reset_at_ms.to_be_bytes());
        out
    }

    /// `None` for bytes this code did not write.
    pub fn decode(bytes: &[u8]) -> Option<Lease> {
        let tokens: [u8; 4] = bytes.get(0..4)?.try_into().ok()?;
        let until: [u8; 8] = bytes.get(4..12)?.try_into().ok()?;
        let reset: [u8; 8] = bytes.get(12..20)?.try_into().ok()?;
        if bytes.len() != 20 {
            return None;
        }
        Some(Lease {
            tokens: u32::from_be_bytes(tokens),
            until_ms: u64::from_be_bytes(until),
            reset_at_ms: u64::from_be_bytes(reset),
        })
    }

    fn outcome(&self, now_ms: u64) -> Outcome {
        let left = self.until_ms.saturating_sub(now_ms);
        Outcome {
            allowed: self.tokens > 0,
            tat: 0,
            remaining: self.tokens.saturating_sub(1),
            reset_ms: self.reset_at_ms.saturating_sub(now_ms).max(if self.tokens == 0 { left } else { 0 }),
            retry_after_ms: if self.tokens == 0 { left } else { 0 },
        }
    }
}

/// What the local leases decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseStep {
    /// Decided without Redis.
    Decided(Decision),
    /// Some key has no usable lease: ask Redis (take new leases) with this plan.
    Remote(Plan),
}

/// Reconciled mode, first step: decide from the instance's leases when every rule has one.
/// Spending is a CAS on shared data, so workers never spend one token twice. A lease that
/// cannot be read is treated as absent (Redis decides).
pub fn spend_leases(policy: &RateLimitPolicy, store: &dyn SharedStore, plan: Plan, now_ms: u64) -> LeaseStep {
    let leases: Vec<Option<Lease>> = plan
        .rules
        .iter()
        .map(|p| match policy.lease_table.get(store, p.hash, now_ms) {
            Ok(Some((payload, _, _))) => Lease::decode(&payload).filter(|l| l.until_ms > now_ms),
            _ => None,
        })
        .collect();
    let resolved: Vec<(&Rule, &PlannedRule, Option<Lease>)> = plan
        .rules
        .iter()
        .zip(&leases)
        .filter_map(|(p, l)| policy.rules.get(p.index).map(|rule| (rule, p, *l)))
        .collect();
    // A key Redis refused stays refused locally until its Retry-After.
    let enforced_refusal = resolved
        .iter()
        .filter(|(_, p, l)| !p.report_only && matches!(l, Some(lease) if lease.tokens == 0))
        .max_by_key(|(_, _, l)| l.map_or(0, |l| l.until_ms));
    if let Some((rule, p, Some(lease))) = enforced_refusal {
        let items: Vec<(&Rule, Outcome)> = resolved
            .iter()
            .filter(|(_, p, _)| !p.report_only)
            .filter_map(|(r, _, l)| l.map(|l| (*r, l.outcome(now_ms))))
            .collect();
        return LeaseStep::Decided(limited(rule, &p.key, &lease.outcome(now_ms), &items, plan.events.clone()));
    }
    if resolved.iter().any(|(_, _, l)| l.is_none()) {
        return LeaseStep::Remote(plan);
    }
    let mut events = plan.events.clone();
    let mut items: Vec<(&Rule, Outcome)> = Vec::new();
    for (rule, p, lease) in &resolved {
        let Some(lease) = lease else { return LeaseStep::Remote(plan) };
        if lease.tokens == 0 {
            // Only report-only rules reach here with a refusal.
            events.push(Event::WouldLimit {
                rule: rule.name.clone(),
                key: p.key.clone(),
                retry_after_ms: lease.until_ms.saturating_sub(now_ms),
            });
            continue;
        }
        let spent = policy.lease_table.update(store, p.hash, now_ms, |current| {
            match current.and_then(Lease::decode).filter(|l| l.tokens > 0 && l.until_ms > now_ms) {
                Some(l) => {
                    // The last token spent ends the lease (expired now: the next request asks
                    // Redis); a lease of 0 tokens would read as a refusal.
                    let until_ms = if l.tokens > 1 { l.until_ms } else { now_ms };
                    let after = Lease { tokens: l.tokens - 1, until_ms, ..l };
                    Update::Write { payload: after.encode(), expires_at_ms: until_ms, result: Some(l) }
                }
                None => Update::Keep(None),
            }
        });
        match spent {
            Ok((Some(before), _)) => {
                events.push(Event::Allowed { rule: rule.name.clone() });
                if !p.report_only {
                    items.push((rule, before.outcome(now_ms)));
                }
            }
            // Another worker spent the last token (or the store failed): Redis decides. Tokens
            // this request already took from earlier rules lapse (towards refusing).
            _ => return LeaseStep::Remote(plan),
        }
    }
    let response_headers = if policy.response_headers { ratelimit_headers(&items) } else { Vec::new() };
    LeaseStep::Decided(Decision { rejection: None, response_headers, events })
}

/// Reconciled mode, after Redis answered: keeps what this request did not spend as the keys'
/// leases (added to any lease another worker stored meanwhile), and remembers refusals until
/// their Retry-After. Returns the grants as the request sees them (the unspent lease counts as
/// remaining). A lease that cannot be stored lapses (towards refusing).
pub fn store_leases(
    policy: &RateLimitPolicy,
    store: &dyn SharedStore,
    plan: &Plan,
    grants: &[Grant],
    lease_ms: u32,
    now_ms: u64,
) -> Vec<Grant> {
    let until_ms = now_ms.saturating_add(u64::from(lease_ms));
    let mut seen = Vec::new();
    for (p, grant) in plan.rules.iter().zip(grants) {
        let reset_at_ms = now_ms.saturating_add(grant.reset_ms);
        let unspent = grant.taken.saturating_sub(1);
        let _ = policy.lease_table.update(store, p.hash, now_ms, |current| {
            let current = current.and_then(Lease::decode).filter(|l| l.until_ms > now_ms);
            let held = current.map_or(0, |l| l.tokens);
            if grant.taken > 0 && unspent + held > 0 {
                let lease = Lease { tokens: unspent.saturating_add(held), until_ms, reset_at_ms };
                Update::Write { payload: lease.encode(), expires_at_ms: until_ms, result: () }
            } else if grant.taken == 0 && grant.retry_after_ms > 0 && held == 0 {
                let until = now_ms.saturating_add(grant.retry_after_ms);
                let lease = Lease { tokens: 0, until_ms: until, reset_at_ms };
                Update::Write { payload: lease.encode(), expires_at_ms: until, result: () }
            } else {
                Update::Keep(())
            }
        });
        seen.push(Grant { remaining: grant.remaining.saturating_add(unspent), ..*grant });
    }
    seen
}
