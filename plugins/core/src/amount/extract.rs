//! What a rule reads from the request body: the amount, the currency and the key fields, found
//! by RFC 6901 JSON Pointers, read exactly.
//!
//! - The body must be one JSON document with no duplicated object key anywhere (serde_json
//!   silently keeps the last of two equal keys, and an upstream might keep the first: the gateway
//!   and the upstream would then read different amounts). Keys are compared after unescaping
//!   (`"a"` and `"\u0061"` are duplicates).
//! - A value is found by walking the pointer over the document's *raw text* (serde_json's
//!   `RawValue`), so a number is never converted to a float: its literal is parsed here, digit
//!   by digit, into integer minor units with checked arithmetic ([`parse_amount`]).

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

/// How the amount is written in the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AmountFormat {
    /// A JSON integer of minor units (`1250` is 12.50 USD): no sign, no fraction, no exponent.
    MinorUnits,
    /// A JSON number in major units with at most the currency's exponent of fractional digits
    /// (`12.5`, `12.50`): no sign, no exponent.
    Decimal,
    /// A JSON string holding a decimal in major units (`"12.50"`): digits, an optional `.` and at
    /// most the currency's exponent of fractional digits; no sign, space, `+` or exponent.
    DecimalString,
}

/// Why the body is not a document a rule can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    Empty,
    NotJson,
    DuplicateKey,
}

impl BodyError {
    pub fn detail(self) -> &'static str {
        match self {
            BodyError::Empty => "empty",
            BodyError::NotJson => "not_json",
            BodyError::DuplicateKey => "duplicate_key",
        }
    }
}

/// Why an amount is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AmountError {
    /// No value at the pointer (or `null`).
    Missing,
    /// A string where a number is expected, a number where a string is expected, or any other
    /// JSON type.
    WrongType,
    Negative,
    /// More fractional digits than the currency has (any fraction for `minor_units`).
    Fractional,
    /// Exponent notation (`1e3`).
    Exponent,
    /// More than `u64::MAX` minor units.
    Overflow,
    /// A decimal string that is not `digits[.digits]`.
    Malformed,
}

impl AmountError {
    pub fn detail(self) -> &'static str {
        match self {
            AmountError::Missing => "missing",
            AmountError::WrongType => "wrong_type",
            AmountError::Negative => "negative",
            AmountError::Fractional => "fractional",
            AmountError::Exponent => "exponent",
            AmountError::Overflow => "overflow",
            AmountError::Malformed => "malformed",
        }
    }

    pub const ALL: [AmountError; 7] = [
        AmountError::Missing,
        AmountError::WrongType,
        AmountError::Negative,
        AmountError::Fractional,
        AmountError::Exponent,
        AmountError::Overflow,
        AmountError::Malformed,
    ];
}

/// Why a string field (currency, key part) is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldError {
    Missing,
    WrongType,
}

/// A parsed RFC 6901 JSON Pointer: its reference tokens, unescaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pointer {
    text: String,
    tokens: Vec<String>,
}

impl Pointer {
    /// A non-empty pointer (`/a/b`, `~0` for `~`, `~1` for `/`). The empty pointer (the whole
    /// document) is refused: a rule reads a member, never the document itself.
    pub fn parse(text: &str) -> Result<Self, String> {
        let Some(rest) = text.strip_prefix('/') else {
            return Err("a JSON Pointer (RFC 6901) starting with `/`".into());
        };
        let mut tokens = Vec::new();
        for raw in rest.split('/') {
            let mut token = String::with_capacity(raw.len());
            let mut chars = raw.chars();
            while let Some(c) = chars.next() {
                match c {
                    '~' => match chars.next() {
                        Some('0') => token.push('~'),
                        Some('1') => token.push('/'),
                        _ => return Err("`~` must be followed by 0 or 1 (RFC 6901)".into()),
                    },
                    c => token.push(c),
                }
            }
            tokens.push(token);
        }
        Ok(Pointer { text: text.to_string(), tokens })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// A body that is one JSON document without duplicated keys.
#[derive(Debug)]
pub struct Document<'a> {
    root: &'a RawValue,
}

/// Checks the whole body (syntax, duplicated keys at any depth) and keeps its raw text.
pub fn parse_document(body: &[u8]) -> Result<Document<'_>, BodyError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(BodyError::Empty);
    }
    let text = std::str::from_utf8(body).map_err(|_| BodyError::NotJson)?;
    match serde_json::from_str::<Strict>(text) {
        Ok(Strict) => {}
        Err(error) if error.to_string().starts_with(DUPLICATE) => return Err(BodyError::DuplicateKey),
        Err(_) => return Err(BodyError::NotJson),
    }
    let root = serde_json::from_str::<&RawValue>(text).map_err(|_| BodyError::NotJson)?;
    Ok(Document { root })
}

const DUPLICATE: &str = "firebreak: duplicate key";

/// Visits a whole document, refusing a duplicated key in any object.
struct Strict;

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Strict;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Strict, A::Error> {
        while seq.next_element::<Strict>()?.is_some() {}
        Ok(Strict)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Strict, A::Error> {
        let mut keys = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !keys.insert(key) {
                return Err(de::Error::custom(DUPLICATE));
            }
            map.next_value::<Strict>()?;
        }
        Ok(Strict)
    }
}

/// A value found in the document, by its JSON type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found<'a> {
    /// The literal text of a number, exactly as sent.
    Number(&'a str),
    /// A string, unescaped.
    String(String),
    /// `null`, a boolean, an object or an array.
    Other,
}

impl<'a> Document<'a> {
    /// The value at `pointer`, or `None` when a member or index on its path is absent (or `null`).
    pub fn get(&self, pointer: &Pointer) -> Option<Found<'a>> {
        let current = self.raw(pointer)?;
        let text = current.get().trim();
        match text.as_bytes().first() {
            Some(b'"') => serde_json::from_str::<String>(text).ok().map(Found::String),
            Some(b'-' | b'0'..=b'9') => Some(Found::Number(text)),
            _ if text == "null" => None,
            _ => Some(Found::Other),
        }
    }

    /// Whether nothing is at `pointer` (`null` is something: it is not absent).
    pub fn is_absent(&self, pointer: &Pointer) -> bool {
        self.raw(pointer).is_none()
    }

    /// The raw value at `pointer` (an object or array on the way; `None` when absent).
    fn raw(&self, pointer: &Pointer) -> Option<&'a RawValue> {
        let mut current: &'a RawValue = self.root;
        for token in &pointer.tokens {
            let text = current.get();
            current = match text.trim_start().as_bytes().first() {
                Some(b'{') => object_members(text)?.into_iter().find(|(key, _)| key == token)?.1,
                Some(b'[') => {
                    let items: Vec<&'a RawValue> = serde_json::from_str(text).ok()?;
                    items.into_iter().nth(array_index(token)?)?
                }
                _ => return None,
            };
        }
        Some(current)
    }

    /// A string field (currency, key part).
    pub fn string(&self, pointer: &Pointer) -> Result<String, FieldError> {
        match self.get(pointer) {
            None => Err(FieldError::Missing),
            Some(Found::String(s)) => Ok(s),
            Some(_) => Err(FieldError::WrongType),
        }
    }
}

fn object_members(text: &str) -> Option<Vec<(String, &RawValue)>> {
    struct Members<'a>(Vec<(String, &'a RawValue)>);
    impl<'de> Deserialize<'de> for Members<'de> {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Members<'de>;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("an object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members<'de>, A::Error> {
                    let mut out = Vec::new();
                    while let Some((key, value)) = map.next_entry::<String, &'de RawValue>()? {
                        out.push((key, value));
                    }
                    Ok(Members(out))
                }
            }
            deserializer.deserialize_map(V)
        }
    }
    serde_json::from_str::<Members<'_>>(text).ok().map(|m| m.0)
}

/// An array index token (RFC 6901: `0` or digits without a leading zero).
fn array_index(token: &str) -> Option<usize> {
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_digit()) || (token.len() > 1 && token.starts_with('0')) {
        return None;
    }
    token.parse().ok()
}

/// The amount at the rule's pointer, in minor units of a currency with `exponent` fractional
/// digits. Exact: digits are accumulated in a `u64` with checked arithmetic.
pub fn parse_amount(found: Option<Found<'_>>, format: AmountFormat, exponent: u8) -> Result<u64, AmountError> {
    let found = found.ok_or(AmountError::Missing)?;
    match (format, found) {
        (AmountFormat::MinorUnits | AmountFormat::Decimal, Found::Number(text)) => {
            let exponent = if format == AmountFormat::MinorUnits { 0 } else { exponent };
            if text.starts_with('-') {
                return Err(AmountError::Negative);
            }
            if text.contains(['e', 'E']) {
                return Err(AmountError::Exponent);
            }
            decimal(text, exponent)
        }
        (AmountFormat::DecimalString, Found::String(text)) => {
            if text.starts_with('-') {
                return Err(AmountError::Negative);
            }
            // JSON's own number grammar (no leading zeros), without sign or exponent.
            let (int, frac) = text.split_once('.').map_or((text.as_str(), None), |(i, f)| (i, Some(f)));
            let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
            if !digits(int) || (int.len() > 1 && int.starts_with('0')) || frac.is_some_and(|f| !digits(f)) {
                return Err(AmountError::Malformed);
            }
            decimal(&text, exponent)
        }
        _ => Err(AmountError::WrongType),
    }
}

/// `digits[.digits]` (already checked to be a JSON number or a plain decimal) in units of
/// `10^-exponent`.
fn decimal(text: &str, exponent: u8) -> Result<u64, AmountError> {
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    let exponent = usize::from(exponent);
    if frac.len() > exponent {
        return Err(AmountError::Fractional);
    }
    let mut value: u64 = 0;
    let pad = std::iter::repeat_n(b'0', exponent - frac.len());
    for byte in int.bytes().chain(frac.bytes()).chain(pad) {
        if !byte.is_ascii_digit() {
            return Err(AmountError::Malformed);
        }
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(byte - b'0')))
            .ok_or(AmountError::Overflow)?;
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ptr(s: &str) -> Pointer {
        Pointer::parse(s).unwrap()
    }

    fn amount(body: &str, format: AmountFormat, exponent: u8) -> Result<u64, AmountError> {
        let doc = parse_document(body.as_bytes()).unwrap();
        parse_amount(doc.get(&ptr("/amount")), format, exponent)
    }

    #[test]
    fn pointers_follow_rfc_6901() {
        let p = ptr("/a~1b/m~0n/0");
        assert_eq!(p.tokens, ["a/b", "m~n", "0"]);
        assert!(Pointer::parse("").is_err());
        assert!(Pointer::parse("a").is_err());
        assert!(Pointer::parse("/a~2").is_err());
        assert!(Pointer::parse("/a~").is_err());
        let doc = parse_document(br#"{"a/b":{"m~n":[{"x":"y"}]},"list":[1,2,3],"":{"":"empty"}}"#).unwrap();
        assert_eq!(doc.get(&ptr("/a~1b/m~0n/0/x")), Some(Found::String("y".into())));
        assert_eq!(doc.get(&ptr("/list/2")), Some(Found::Number("3")));
        assert_eq!(doc.get(&ptr("/list/3")), None);
        assert_eq!(doc.get(&ptr("/list/01")), None, "no leading zeros in an index");
        assert_eq!(doc.get(&ptr("/list/-")), None);
        assert_eq!(doc.get(&ptr("//")), Some(Found::String("empty".into())));
        assert_eq!(doc.get(&ptr("/list")), Some(Found::Other));
        assert_eq!(doc.get(&ptr("/list/0/x")), None);
    }

    #[test]
    fn duplicated_keys_anywhere_are_refused_after_unescaping() {
        for body in [
            r#"{"amount":1,"amount":1000000}"#,
            r#"{"amount":1,"\u0061mount":5}"#,
            r#"{"x":{"deep":[{"k":1,"k":2}]},"amount":1}"#,
        ] {
            assert_eq!(parse_document(body.as_bytes()).unwrap_err(), BodyError::DuplicateKey, "{body}");
        }
        assert!(parse_document(br#"{"a":{"k":1},"b":{"k":1}}"#).is_ok(), "the same key in two objects");
    }

    #[test]
    fn bodies_that_are_not_one_json_document() {
        for (body, error) in [
            ("", BodyError::Empty),
            ("  \n", BodyError::Empty),
            ("{", BodyError::NotJson),
            ("{} {}", BodyError::NotJson),
            ("amount=5", BodyError::NotJson),
            ("{\"amount\":01}", BodyError::NotJson),
            ("{\"amount\":NaN}", BodyError::NotJson),
        ] {
            assert_eq!(parse_document(body.as_bytes()).unwrap_err(), error, "{body:?}");
        }
        assert_eq!(parse_document(b"{\"a\":\"\xff\"}").unwrap_err(), BodyError::NotJson);
    }

    #[test]
    fn minor_units_are_plain_non_negative_integers() {
        use AmountFormat::MinorUnits as M;
        assert_eq!(amount(r#"{"amount":1250}"#, M, 2), Ok(1250));
        assert_eq!(amount(r#"{"amount":0}"#, M, 2), Ok(0));
        assert_eq!(amount(r#"{"amount":18446744073709551615}"#, M, 2), Ok(u64::MAX));
        assert_eq!(amount(r#"{"amount":18446744073709551616}"#, M, 2), Err(AmountError::Overflow));
        assert!(parse_document(br#"{"amount":1e400}"#).is_err(), "out of any range: not a document serde_json reads");
        assert_eq!(amount(r#"{"amount":-5}"#, M, 2), Err(AmountError::Negative));
        assert_eq!(amount(r#"{"amount":-0}"#, M, 2), Err(AmountError::Negative));
        assert_eq!(amount(r#"{"amount":12.5}"#, M, 2), Err(AmountError::Fractional));
        assert_eq!(amount(r#"{"amount":12.0}"#, M, 2), Err(AmountError::Fractional));
        assert_eq!(amount(r#"{"amount":1e3}"#, M, 2), Err(AmountError::Exponent));
        assert_eq!(amount(r#"{"amount":"1250"}"#, M, 2), Err(AmountError::WrongType));
        assert_eq!(amount(r#"{"amount":null}"#, M, 2), Err(AmountError::Missing));
        assert_eq!(amount(r#"{"amount":true}"#, M, 2), Err(AmountError::WrongType));
        assert_eq!(amount(r#"{"amount":[5]}"#, M, 2), Err(AmountError::WrongType));
        assert_eq!(amount(r#"{"other":5}"#, M, 2), Err(AmountError::Missing));
        assert_eq!(amount(r#"[5]"#, M, 2), Err(AmountError::Missing));
    }

    #[test]
    fn decimals_map_exactly_to_minor_units() {
        use AmountFormat::{Decimal as D, DecimalString as S};
        assert_eq!(amount(r#"{"amount":12.5}"#, D, 2), Ok(1250));
        assert_eq!(amount(r#"{"amount":12.50}"#, D, 2), Ok(1250));
        assert_eq!(amount(r#"{"amount":12}"#, D, 2), Ok(1200));
        assert_eq!(amount(r#"{"amount":0.01}"#, D, 2), Ok(1));
        assert_eq!(amount(r#"{"amount":12.345}"#, D, 2), Err(AmountError::Fractional));
        assert_eq!(amount(r#"{"amount":12.340}"#, D, 2), Err(AmountError::Fractional));
        assert_eq!(amount(r#"{"amount":12}"#, D, 0), Ok(12));
        assert_eq!(amount(r#"{"amount":1.5}"#, D, 0), Err(AmountError::Fractional));
        assert_eq!(amount(r#"{"amount":0.1}"#, D, 18), Ok(100_000_000_000_000_000));
        assert_eq!(amount(r#"{"amount":184467440737095516.15}"#, D, 2), Ok(u64::MAX));
        assert_eq!(amount(r#"{"amount":184467440737095516.16}"#, D, 2), Err(AmountError::Overflow));
        assert_eq!(amount(r#"{"amount":1.2e1}"#, D, 2), Err(AmountError::Exponent));
        assert_eq!(amount(r#"{"amount":"12.50"}"#, D, 2), Err(AmountError::WrongType));
        assert_eq!(amount(r#"{"amount":"12.50"}"#, S, 2), Ok(1250));
        assert_eq!(amount(r#"{"amount":"0.07"}"#, S, 2), Ok(7));
        assert_eq!(amount(r#"{"amount":"\u0031\u0032"}"#, S, 2), Ok(1200), "escapes are JSON's own");
        assert_eq!(amount(r#"{"amount":12.50}"#, S, 2), Err(AmountError::WrongType));
        for bad in ["", " 1", "1 ", "+1", "01", "1.", ".5", "1e2", "1,5", "1.2.3", "0x10", "١"] {
            let body = format!(r#"{{"amount":"{bad}"}}"#);
            assert_eq!(amount(&body, S, 2), Err(AmountError::Malformed), "{bad:?}");
        }
        assert_eq!(amount(r#"{"amount":"-1.00"}"#, S, 2), Err(AmountError::Negative));
        assert_eq!(amount(r#"{"amount":"1.001"}"#, S, 2), Err(AmountError::Fractional));
    }

    #[test]
    fn string_fields() {
        let doc = parse_document(br#"{"account":"acc-1","n":5,"u":"\u00e9"}"#).unwrap();
        assert_eq!(doc.string(&ptr("/account")), Ok("acc-1".into()));
        assert_eq!(doc.string(&ptr("/u")), Ok("é".into()));
        assert_eq!(doc.string(&ptr("/n")), Err(FieldError::WrongType));
        assert_eq!(doc.string(&ptr("/none")), Err(FieldError::Missing));
        let doc = parse_document(br#"{"c":null}"#).unwrap();
        assert!(doc.is_absent(&ptr("/d")) && !doc.is_absent(&ptr("/c")));
    }
}
