//! request-signature's `Signature-Input` / `Signature` parser (`signature::fields`), against the
//! `sfv` crate's RFC 9651 dictionary parser as the oracle.
//!
//! Input: one selector byte (which member to want: the first, `sig1`, `a`, or sfv's last key),
//! then the field value.
//!
//! Properties:
//! - whenever sfv refuses the field, the parser refuses it;
//! - whenever sfv accepts it, the parser accepts it, except for what it refuses on purpose in
//!   the wanted member (a repeated label, a repeated parameter, too many parameters);
//! - the wanted member is the one sfv holds under that key, item for item and parameter for
//!   parameter (values compared as sfv reads them), when the keys are not repeated;
//! - the member's value is flagged canonical exactly when it equals sfv's serialization of that
//!   member (only items with more than `MAX_PARAMS` parameters may be flagged non-canonical
//!   otherwise), and the canonical form written from it, when written, is sfv's serialization.
#![no_main]

use firebreak_core::signature::base::serialize_signature_params;
use firebreak_core::signature::fields::{self, Bare, FieldError, Member, Params, Want, MAX_PARAMS};
use libfuzzer_sys::fuzz_target;
use sfv::{BareItem, Dictionary, ListEntry, Parser};

/// The bare item as sfv reads it: ours written back as text and parsed by sfv.
fn as_sfv(bare: &Bare<'_>) -> BareItem {
    let text = match bare {
        Bare::Integer(v) => v.to_string(),
        Bare::Decimal(raw) | Bare::Token(raw) => raw.to_string(),
        Bare::String(s) => format!("\"{}\"", s.raw()),
        Bare::ByteSequence(raw) => format!(":{raw}:"),
        Bare::Boolean(b) => if *b { "?1" } else { "?0" }.to_string(),
        Bare::Date(v) => format!("@{v}"),
        Bare::DisplayString(raw) => format!("%\"{raw}\""),
    };
    let item: sfv::Item = Parser::new(&text).parse().unwrap_or_else(|e| panic!("our item {bare:?} ({text}) is not sfv's: {e}"));
    item.bare_item
}

fn same_bare(ours: &Bare<'_>, theirs: &BareItem) {
    assert_eq!(&as_sfv(ours), theirs, "bare item {ours:?}");
    if let (Bare::String(s), BareItem::String(t)) = (ours, theirs) {
        assert_eq!(s.value(), t.as_str());
    }
}

/// Compares parameters; `false` when ours repeat a key (sfv keeps the last: not comparable).
fn same_params(ours: &Params<'_>, theirs: &sfv::Parameters) -> bool {
    let ours: Vec<(&str, Bare<'_>)> = ours.iter().map(|p| p.expect("validated parameters walk")).collect();
    let mut keys: Vec<&str> = ours.iter().map(|(k, _)| *k).collect();
    keys.sort_unstable();
    keys.dedup();
    if keys.len() != ours.len() {
        return false;
    }
    assert_eq!(ours.len(), theirs.len(), "parameter count");
    for ((key, value), (their_key, their_value)) in ours.iter().zip(theirs) {
        assert_eq!(*key, their_key.as_str());
        same_bare(value, their_value);
    }
    true
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    let Ok(input) = std::str::from_utf8(rest) else { return };
    let oracle: Result<Dictionary, _> = Parser::new(input).parse();
    let last_key = oracle.as_ref().ok().and_then(|d| d.keys().last().map(|k| k.as_str().to_string()));
    let want = match selector % 4 {
        0 => Want::First,
        1 => Want::Label("sig1"),
        2 => Want::Label("a"),
        _ => Want::Label(last_key.as_deref().unwrap_or("sig1")),
    };
    let ours = fields::dictionary(input, want);
    let dict = match oracle {
        Err(_) => {
            assert!(ours.is_err(), "sfv refuses {input:?}, we accepted {ours:?}");
            return;
        }
        Ok(dict) => dict,
    };
    let lookup = match ours {
        Ok(lookup) => lookup,
        Err(FieldError::Syntax) => panic!("sfv accepts {input:?}, we refused it as a syntax error"),
        // Refused on purpose (module documentation of `fields`).
        Err(FieldError::DuplicateLabel | FieldError::DuplicateParameter | FieldError::TooManyParameters) => return,
    };
    assert!(lookup.members >= dict.len());
    let key = match want {
        Want::First => {
            if lookup.members != dict.len() {
                // A repeated key: sfv keeps the last value, ours is the first member.
                return;
            }
            dict.keys().next().map(|k| k.as_str().to_string())
        }
        Want::Label(label) => Some(label.to_string()),
    };
    let theirs = key.as_deref().and_then(|k| dict.get(k));
    match (lookup.member, theirs) {
        (None, None) => {}
        (Some((our_key, member)), Some(entry)) => {
            assert_eq!(Some(our_key), key.as_deref());
            match (member, entry) {
                (Member::Item(bare, params), ListEntry::Item(item)) => {
                    same_bare(&bare, &item.bare_item);
                    same_params(&params, &item.params);
                    if let Bare::ByteSequence(raw) = bare {
                        let mut buffer = vec![0u8; raw.len()];
                        let decoded = fields::decode_byte_sequence(raw, &mut buffer);
                        assert_eq!(decoded, item.bare_item.as_byte_sequence());
                    }
                }
                (Member::InnerList(list), ListEntry::InnerList(their_list)) => {
                    let items: Vec<_> = list.items().map(|i| i.expect("validated items walk")).collect();
                    assert_eq!(items.len(), their_list.items.len(), "item count");
                    let mut crowded = false;
                    for ((bare, params), item) in items.iter().zip(&their_list.items) {
                        same_bare(bare, &item.bare_item);
                        // Repeated keys (sfv keeps the last) are compared through the serialization below.
                        same_params(params, &item.params);
                        crowded |= params.iter().count() > MAX_PARAMS;
                    }
                    assert!(same_params(&list.params, &their_list.params), "the wanted list's parameters repeat a key");
                    let serialized = serialize_signature_params(their_list).expect("sfv serializes what it parsed");
                    if list.canonical {
                        assert_eq!(list.value, serialized, "flagged canonical");
                    } else if list.value == serialized {
                        assert!(crowded, "{:?} is canonical but not flagged so", list.value);
                    }
                    let mut written = String::new();
                    if fields::write_canonical(&list, &mut written).is_some() {
                        assert_eq!(written, serialized, "canonical form written");
                    }
                }
                (ours, theirs) => panic!("member kinds differ: {ours:?} / {theirs:?}"),
            }
        }
        (ours, theirs) => panic!("member presence differs for {key:?}: {ours:?} / {theirs:?}"),
    }
});
