//! Redis replies as webdis renders them (JSON), read by every parser that consumes them.
//!
//! Properties: never panics; only an HTTP 200 answer is ever read as a reply (anything else, or
//! no answer, is "unreachable"); a Redis error is never taken for a reply; a value stored as
//! base64 decodes to what was encoded, and a value that decodes re-encodes to the same text
//! (one spelling per value: two spellings cannot name one record differently); an amount-limit
//! reply the parser accepts never shows a key charged that does not fit, a charge next to a
//! refused enforced key, or a charge with the tenant's quota exceeded.
#![no_main]

use arbitrary::Arbitrary;
use firebreak_core::amount::redis::{parse as parse_amount, QuotaAnswer};
use firebreak_core::ratelimit::redis::parse_grants;
use firebreak_core::remote::{
    decode_value, encode_value, parse_claim_or_get, parse_compare_and_set, parse_get, parse_reply, RemoteError, Reply,
};
use firebreak_core::signature::verify::nonce_claim_answer;
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    command: u8,
    status: Option<u16>,
    body: Vec<u8>,
    rules: u8,
    value: Vec<u8>,
    text: String,
}

fn contains_error(reply: &Reply) -> bool {
    match reply {
        Reply::Error(_) => true,
        Reply::Array(items) => items.iter().any(contains_error),
        _ => false,
    }
}

fuzz_target!(|input: Input| {
    let command = ["EVAL", "GET", "SET", "EVALSHA"][usize::from(input.command) % 4];
    let reply = parse_reply(command, input.status, &input.body);
    match (&reply, input.status) {
        (Ok(_), Some(200)) => {}
        (Ok(r), other) => panic!("a reply {r:?} read from HTTP {other:?}"),
        (Err(RemoteError::Unreachable(_)), status) => assert_ne!(status, Some(200)),
        (Err(_), status) => assert_eq!(status, Some(200)),
    }
    if let Ok(reply) = &reply {
        assert!(!matches!(reply, Reply::Error(_)));
        let _ = contains_error(reply);
        let _ = parse_get(reply);
        let _ = parse_compare_and_set(reply);
        let _ = parse_claim_or_get(reply);
        for rules in 0..=usize::from(input.rules % 4) {
            if let Ok(grants) = parse_grants(reply, rules) {
                assert_eq!(grants.len(), rules);
            }
            for enforced in 0..=rules {
                let Ok(decision) = parse_amount(reply, rules, enforced) else { continue };
                assert_eq!(decision.keys.len(), rules);
                let (enforced_keys, _) = decision.keys.split_at(enforced);
                let any_taken = decision.keys.iter().any(|k| k.taken);
                assert!(decision.keys.iter().all(|k| k.fits || !k.taken), "{decision:?}");
                if enforced_keys.iter().any(|k| !k.fits) {
                    assert!(!any_taken, "a charge next to a refused enforced key: {decision:?}");
                }
                if decision.quota == QuotaAnswer::Exceeded {
                    assert!(!any_taken, "a charge with the quota exceeded: {decision:?}");
                }
            }
        }
    }
    if let Ok(Err(refusal)) = nonce_claim_answer(input.status, &input.body) {
        assert!(matches!(reply, Ok(Reply::Integer(0 | 2))), "{refusal:?}");
    }

    assert_eq!(decode_value(&encode_value(&input.value)).ok(), Some(input.value.clone()));
    if let Ok(bytes) = decode_value(&input.text) {
        assert_eq!(encode_value(&bytes), input.text, "two spellings of one stored value");
    }
});
