//! amount-limit: what a rule reads from a body (`core::amount::extract`, `core::amount::charge`)
//! and the weighted GCRA (`core::amount::budget`), on arbitrary bodies and amounts.
//!
//! Properties:
//! - never panics; every refusal is a documented amount-limit code;
//! - a body accepted as a document is one serde_json also reads;
//! - an amount read as `minor_units` is exactly the integer serde_json reads at the pointer;
//! - an amount read as `decimal` / `decimal_string` with exponent `e` printed back with `e`
//!   fractional digits reads again to the same amount (exact, no float on the way);
//! - the budget never admits more than the budget from a fresh key at one instant.
#![no_main]

use std::num::NonZeroU64;

use arbitrary::Arbitrary;
use firebreak_core::amount::budget::Budget;
use firebreak_core::amount::extract::{parse_amount, parse_document, AmountFormat, Found, Pointer};
use firebreak_core::amount::{charge, AmountPolicy};
use firebreak_fuzz::check_rejection;
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    body: Vec<u8>,
    exponent: u8,
    budget: u64,
    window_s: u32,
    amounts: Vec<u64>,
}

const POLICY: &str = r#"{"rules":[{"name":"r","routes":[{"path_prefix":"/"}],"amount_pointer":"/amount","amount_format":"minor_units","currency_pointer":"/currency","key":["/account"],"budgets":{"USD":{"exponent":2,"amount_minor":100,"window_s":60},"JPY":{"exponent":0,"amount_minor":100,"window_s":60}}}]}"#;

fuzz_target!(|input: Input| {
    let pointer = Pointer::parse("/amount").unwrap();
    if let Ok(doc) = parse_document(&input.body) {
        let value: serde_json::Value = serde_json::from_slice(&input.body).expect("serde_json reads an accepted document");
        // minor units: exactly serde_json's integer
        if let Ok(amount) = parse_amount(doc.get(&pointer), AmountFormat::MinorUnits, 0) {
            assert_eq!(value.pointer("/amount").and_then(serde_json::Value::as_u64), Some(amount));
        }
        let exponent = input.exponent % 19;
        for format in [AmountFormat::Decimal, AmountFormat::DecimalString] {
            if let Ok(amount) = parse_amount(doc.get(&pointer), format, exponent) {
                let scale = 10u64.pow(u32::from(exponent));
                let text = if exponent == 0 {
                    amount.to_string()
                } else {
                    format!("{}.{:0width$}", amount / scale, amount % scale, width = usize::from(exponent))
                };
                let again = match format {
                    AmountFormat::DecimalString => Found::String(text.clone()),
                    _ => Found::Number(&text),
                };
                assert_eq!(parse_amount(Some(again), format, exponent), Ok(amount), "{text}");
            }
        }
    }
    // The whole rule: a charge or a documented refusal.
    let policy = AmountPolicy::from_json(POLICY.as_bytes()).unwrap();
    let body = parse_document(&input.body);
    match charge(&policy, 0, &body, None) {
        Ok(c) => assert!(c.currency == "USD" || c.currency == "JPY"),
        Err(rejection) => {
            check_rejection(&rejection);
            assert!(firebreak_core::amount::CODES.contains(&rejection.kind()), "{}", rejection.code);
        }
    }
    // The budget: from a fresh key at one instant, never more than the budget in all.
    if let (Some(amount), Some(window_s)) = (NonZeroU64::new(input.budget % (1 << 40)), NonZeroU64::new(u64::from(input.window_s % 4096))) {
        let budget = Budget { amount, window_s };
        let (mut record, mut admitted) = (None, 0u128);
        for a in input.amounts.iter().take(64) {
            let outcome = budget.decide(record, 1_700_000_000, *a);
            if outcome.allowed {
                record = Some(outcome.record);
                admitted += u128::from(*a);
            }
        }
        assert!(admitted <= u128::from(amount.get()));
    }
});
