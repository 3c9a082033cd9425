//! Amount-velocity limits: a budget of money per key (account, beneficiary, verified principal,
//! or a combination) per currency per window, on the amounts in the request bodies of money
//! routes.
//!
//! A rate limit counts requests; twenty concurrent withdrawals of 5 from an account holding 20
//! are twenty requests, each well within any sane request rate (incident 1). This filter counts
//! what they move: each request's amount, read exactly from its JSON body, is charged to a GCRA
//! budget weighted by the amount ([`budget`]), in integer minor units, shared by every worker
//! (the local backend: shared data) or by every Envoy instance (the Redis backend, [`redis`]).
//!
//! - [`config`]: rules (routes, JSON Pointers to the amount, the currency and the key fields, a
//!   budget per currency with its minor-unit exponent, a mode).
//! - [`extract`]: the body read strictly (one JSON document, no duplicated key anywhere) and the
//!   amount parsed from its literal text, never through a float.
//! - [`budget`]: the weighted GCRA in exact integers.
//! - [`flow`]: when the body is read, what is charged, and how a decision becomes a reply.
//!
//! **The tenant quota.** A key's debt record lives until its debt has drained: at most the
//! longest window and a second (`W`, the quota window) after its last charge. To keep one tenant
//! (the verified principal, else the client address) from filling the local table or Redis, the
//! records a tenant charges are counted in a per-tenant quota of `table.quota_per_tenant` units
//! per quota window ([`crate::quota`] on the local backend, the budget script on Redis, same
//! semantics): a charge that lands on a record, new or existing, that is not yet counted in the
//! tenant's running quota window costs one unit and stamps the record with that window's end
//! (`counted_until_ms`); later charges of the record while that window runs are free. An enforced
//! charge that needs a unit when none is left is refused (`429 tenant_quota_exceeded`, nothing
//! written); a report-only one is reported and not charged.
//!
//! The bound: a record live at `t` was last charged in `(t - W, t]`, and that charge was counted
//! in the tenant's window holding it (the stamp's invariant: a record is written with stamp `e`
//! only when a unit was counted in the window ending at `e` that holds the charge). A tenant's
//! windows are disjoint and each lasts at least `W`, so at most two of them meet `(t - W, t]`,
//! and each counts at most `limit` units, one per record: **a tenant holds at most
//! `2 * limit` live records at any time, whatever it sends** (re-charging its records to keep
//! them alive costs a unit per record per window). A record of the previous format (no stamp)
//! is counted in no window: its next charge costs a unit.

pub mod budget;
pub mod config;
pub mod extract;
pub mod flow;
pub mod redis;

#[cfg(test)]
mod flow_tests;

pub use config::{AmountPolicy, CurrencySource, KeyPart, Rule};

use crate::store::KeyHash;
use crate::{Code, Mode, Rejection};

use budget::Outcome;
use config::{CurrencyBudget, MAX_KEY_BYTES};
use extract::{parse_amount, AmountError, BodyError, Document, FieldError};

/// Every rejection code amount-limit can send (its README's table lists exactly these).
pub const CODES: &[Code] = {
    use crate::Code::*;
    &[
        PathNotCanonical,
        RequestHeadersInvalid,
        BodyTooLarge,
        AmountLimited,
        AmountInvalid,
        AmountCurrencyInvalid,
        AmountKeyInvalid,
        AmountBodyInvalid,
        AmountLimitUnauthenticated,
        AmountLimitStoreFull,
        AmountLimitUnavailable,
        TenantQuotaExceeded,
        StateUnavailable,
    ]
};

/// One rule's charge for one request: what is charged, to which budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    /// The rule's index in the policy.
    pub rule: usize,
    pub mode: Mode,
    pub currency: String,
    pub budget: CurrencyBudget,
    /// Minor units.
    pub amount: u64,
    /// The budget's record key (rule, currency, budget, key parts).
    pub hash: KeyHash,
}

impl Charge {
    /// `rule=.. currency=.. amount=.. key=..` for log lines: the key as a short hash (the
    /// fields are account numbers and names, not for logs).
    pub fn context(&self, policy: &AmountPolicy) -> String {
        let rule = policy.rules.get(self.rule).map_or("-", |r| r.name.as_str());
        let key = self.hash.to_hex();
        let key = key.get(..16).unwrap_or(&key);
        format!("rule={rule} currency={} amount_minor={} key={key}", self.currency, self.amount)
    }
}

/// The body as a rule sees it: a document, or why there is none.
pub type Body<'a> = Result<Document<'a>, BodyError>;

/// The rejection for a body no rule can read.
pub fn body_rejection(error: BodyError) -> Rejection {
    let message = match error {
        BodyError::Empty => "this route requires a JSON body with the amount",
        BodyError::NotJson => "the body is not one JSON document",
        BodyError::DuplicateKey => "the body repeats a key in an object; send each key once",
    };
    Rejection::new(Code::AmountBodyInvalid).with_message(message).with_detail(error.detail())
}

/// What a rule reads from a request: its charge, or the rejection of the request.
/// `principal` is the verified principal (read only for rules keyed on it).
pub fn charge(policy: &AmountPolicy, index: usize, body: &Body<'_>, principal: Option<&str>) -> Result<Charge, Rejection> {
    let Some(rule) = policy.rules.get(index) else {
        return Err(Rejection::new(Code::AmountLimitUnavailable).with_detail("store"));
    };
    let doc = body.as_ref().map_err(|e| body_rejection(*e))?;
    let name = &rule.name;
    let currency = match &rule.currency {
        CurrencySource::Fixed(code) => code.clone(),
        CurrencySource::Field(pointer, when_absent) => match (doc.string(pointer), when_absent) {
            (Ok(code), _) => code,
            (Err(FieldError::Missing), Some(code)) if doc.is_absent(pointer) => code.clone(),
            (Err(e), _) => {
                let (detail, what) = match e {
                    FieldError::Missing => ("missing", "is missing"),
                    FieldError::WrongType => ("wrong_type", "is not a string"),
                };
                return Err(Rejection::new(Code::AmountCurrencyInvalid)
                    .with_message(format!("rule `{name}`: the currency at `{}` {what}", pointer.as_str()))
                    .with_detail(detail));
            }
        },
    };
    let Some(budget) = rule.budgets.get(&currency).copied() else {
        let known: Vec<&str> = rule.budgets.keys().map(String::as_str).collect();
        return Err(Rejection::new(Code::AmountCurrencyInvalid)
            .with_message(format!("rule `{name}`: no budget for this currency (budgets: {})", known.join(", ")))
            .with_detail("unknown"));
    };
    let amount =
        parse_amount(doc.get(&rule.amount), rule.format, budget.exponent).map_err(|e| amount_rejection(rule, budget, e))?;
    let amount_bytes = budget.budget.amount.get().to_be_bytes();
    let window_bytes = budget.budget.window_s.get().to_be_bytes();
    let mut parts: Vec<Vec<u8>> = vec![b"amount".to_vec(), name.as_bytes().to_vec(), currency.as_bytes().to_vec()];
    parts.push(amount_bytes.to_vec());
    parts.push(window_bytes.to_vec());
    for part in &rule.key {
        let value = match part {
            KeyPart::Principal => match principal.filter(|p| !p.is_empty()) {
                Some(p) => [b"p:".as_slice(), p.as_bytes()].concat(),
                None => {
                    return Err(Rejection::new(Code::AmountLimitUnauthenticated)
                        .with_message(format!("rule `{name}` keeps its budget per verified principal and the request has none")))
                }
            },
            KeyPart::Field(pointer) => {
                let key_error = |detail: &'static str, what: &str| {
                    Rejection::new(Code::AmountKeyInvalid)
                        .with_message(format!("rule `{name}`: the key field at `{}` {what}", pointer.as_str()))
                        .with_detail(detail)
                };
                let value = doc.string(pointer).map_err(|e| match e {
                    FieldError::Missing => key_error("missing", "is missing"),
                    FieldError::WrongType => key_error("wrong_type", "is not a string"),
                })?;
                if value.is_empty() {
                    return Err(key_error("empty", "is empty"));
                }
                if value.len() > MAX_KEY_BYTES {
                    return Err(key_error("too_long", &format!("is longer than {MAX_KEY_BYTES} bytes")));
                }
                [b"f:".as_slice(), value.as_bytes()].concat()
            }
        };
        parts.push(value);
    }
    let parts: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    Ok(Charge { rule: index, mode: rule.mode, currency, budget, amount, hash: policy.key_hasher().of(&parts) })
}

fn amount_rejection(rule: &Rule, budget: CurrencyBudget, error: AmountError) -> Rejection {
    let at = rule.amount.as_str();
    let what = match error {
        AmountError::Missing => "is missing".to_string(),
        AmountError::WrongType => match rule.format {
            extract::AmountFormat::DecimalString => "must be a JSON string holding a decimal".to_string(),
            _ => "must be a JSON number".to_string(),
        },
        AmountError::Negative => "is negative".to_string(),
        AmountError::Fractional => match rule.format {
            extract::AmountFormat::MinorUnits => "must be an integer of minor units".to_string(),
            _ => format!("has more than {} fractional digits", budget.exponent),
        },
        AmountError::Exponent => "uses exponent notation".to_string(),
        AmountError::Overflow => "is too large".to_string(),
        AmountError::Malformed => "is not a plain decimal (digits, an optional `.` and digits)".to_string(),
    };
    Rejection::new(Code::AmountInvalid)
        .with_message(format!("rule `{}`: the amount at `{at}` {what}", rule.name))
        .with_detail(error.detail())
}

/// `429 amount_limited` with `Retry-After` and the `RateLimit-Policy` / `RateLimit` headers
/// (draft-ietf-httpapi-ratelimit-headers, as rate-limit sends them; the quota in minor units,
/// the item named `<rule>.<currency>`).
pub fn limited(policy: &AmountPolicy, charge: &Charge, outcome: &Outcome) -> Rejection {
    let rule = policy.rules.get(charge.rule).map_or("-", |r| r.name.as_str());
    let budget = charge.budget.budget;
    let item = format!("{rule}.{}", charge.currency);
    let retry_after = outcome.retry_after_s.max(1);
    let message = if budget.cost(charge.amount).is_none_or(|cost| cost > budget.horizon()) {
        format!(
            "amount limit `{item}`: the amount exceeds the whole budget of {} minor units per {} s",
            budget.amount, budget.window_s
        )
    } else {
        format!("amount limit `{item}` exceeded; {} minor units remain; retry in {retry_after} s", outcome.remaining)
    };
    Rejection::new(Code::AmountLimited)
        .with_message(message)
        .with_header("retry-after", retry_after.to_string())
        .with_header("ratelimit-policy", format!("\"{item}\";q={};w={}", budget.amount, budget.window_s))
        .with_header("ratelimit", format!("\"{item}\";r={};t={}", outcome.remaining, outcome.reset_s))
}
