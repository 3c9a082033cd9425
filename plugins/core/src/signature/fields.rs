//! `Signature-Input` and `Signature` (RFC 9421 §4): Structured Field Dictionaries (RFC 9651),
//! parsed in one pass over the received bytes, without maps or owned strings.
//!
//! The whole field is validated exactly as RFC 9651 §4.2 says (a field any RFC 9651 parser
//! refuses is refused here: the `sig_fields` fuzz target checks this against the `sfv` crate);
//! only the member under the wanted label is kept, as slices of the input. Its items and
//! parameters are read by walking that (already validated) slice again.
//!
//! Stricter than RFC 9651 in one way, on purpose: in the wanted member of a dictionary, a
//! parameter key given twice, or more than [`MAX_PARAMS`] parameters, or the label itself given
//! twice, is refused ([`FieldError`]) instead of "the last one wins": two verifiers that resolve
//! such a field differently would act on different values under one MAC.
//!
//! The member's value is also checked for being in canonical form (the serialization of what it
//! parses to, RFC 9651 §4.1): then it is the `@signature-params` value as received (RFC 9421
//! §2.3), with nothing to serialize again.

use std::borrow::Cow;

use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;

/// Most parameters one list or item of the wanted member may carry (RFC 9421 defines six
/// signature parameters).
pub const MAX_PARAMS: usize = 16;

/// Base64 as RFC 9651 §4.2.7 reads it (the same configuration as the `sfv` crate): padding
/// optional, non-zero trailing bits accepted.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_encode_padding(true),
);

/// Why a field was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldError {
    /// Not a Structured Field Dictionary (RFC 9651 §4.2.2).
    Syntax,
    /// The wanted label is a key of the dictionary more than once.
    DuplicateLabel,
    /// A parameter key given twice in the wanted member's own parameters.
    DuplicateParameter,
    /// More than [`MAX_PARAMS`] parameters on the wanted member.
    TooManyParameters,
}

/// A String as received: between the quotes, escapes (`\"`, `\\`) still in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SfString<'a>(&'a str);

impl<'a> SfString<'a> {
    /// The bytes between the quotes (the String's serialization without its quotes).
    pub fn raw(&self) -> &'a str {
        self.0
    }

    /// The String's value: borrowed unless it holds an escape.
    pub fn value(&self) -> Cow<'a, str> {
        if !self.0.contains('\\') {
            return Cow::Borrowed(self.0);
        }
        let mut out = String::with_capacity(self.0.len());
        let mut escaped = false;
        for c in self.0.chars() {
            if c == '\\' && !escaped {
                escaped = true;
                continue;
            }
            escaped = false;
            out.push(c);
        }
        Cow::Owned(out)
    }
}

/// A Bare Item, borrowed from the field (RFC 9651 §3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bare<'a> {
    Integer(i64),
    /// As received (`-12.5`).
    Decimal(&'a str),
    String(SfString<'a>),
    Token(&'a str),
    /// The base64 text between the colons.
    ByteSequence(&'a str),
    Boolean(bool),
    /// Seconds since the epoch (`@1659578233`).
    Date(i64),
    /// The text between the quotes, percent escapes still in.
    DisplayString(&'a str),
}

/// Parameters as received and validated (`;key=value...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params<'a>(&'a str);

impl<'a> Params<'a> {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The parameters in order, as received.
    pub fn iter(&self) -> ParamIter<'a> {
        ParamIter(Cursor::new(self.0))
    }
}

/// The parameters of a [`Params`]: `(key, value)`; a key without a value is `Boolean(true)`.
pub struct ParamIter<'a>(Cursor<'a>);

impl<'a> Iterator for ParamIter<'a> {
    type Item = Result<(&'a str, Bare<'a>), FieldError>;

    fn next(&mut self) -> Option<Self::Item> {
        if !self.0.eat(b';') {
            return None;
        }
        Some(self.0.parameter().map(|(key, value, _)| (key, value)))
    }
}

/// An Inner List member: `(item item ...);param...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InnerList<'a> {
    /// The member's value as received: the parenthesised items and the list's parameters.
    pub value: &'a str,
    /// `value` is already the serialization of what it parses to (RFC 9651 §4.1.1.1).
    pub canonical: bool,
    /// Between the parentheses.
    items: &'a str,
    pub params: Params<'a>,
}

impl<'a> InnerList<'a> {
    /// The items in order: bare item and its parameters.
    pub fn items(&self) -> ItemIter<'a> {
        ItemIter(Cursor::new(self.items))
    }
}

/// The items of an [`InnerList`].
pub struct ItemIter<'a>(Cursor<'a>);

impl<'a> Iterator for ItemIter<'a> {
    type Item = Result<(Bare<'a>, Params<'a>), FieldError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.0.skip_sp();
        self.0.peek()?;
        let item = self.0.bare().and_then(|(bare, _)| self.0.params(Track::No).map(|(params, _, _)| (bare, params)));
        Some(item)
    }
}

/// A dictionary member's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Member<'a> {
    Item(Bare<'a>, Params<'a>),
    InnerList(InnerList<'a>),
}

/// Which member to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want<'l> {
    /// The member with this key.
    Label(&'l str),
    /// The first member, whatever its key.
    First,
}

/// A dictionary, validated, with the wanted member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lookup<'a> {
    /// How many members the field has (a repeated key counts each time).
    pub members: usize,
    /// The wanted member and its key, if present.
    pub member: Option<(&'a str, Member<'a>)>,
}

/// Parses a Dictionary field and keeps the wanted member (see the module documentation).
pub fn dictionary<'a>(input: &'a str, want: Want<'_>) -> Result<Lookup<'a>, FieldError> {
    let mut c = Cursor::new(input);
    let mut lookup = Lookup { members: 0, member: None };
    let mut refusal = None;
    c.skip_sp();
    while c.peek().is_some() {
        let key = c.key()?;
        let wanted = match want {
            Want::Label(label) => key == label,
            Want::First => lookup.members == 0,
        };
        if wanted && lookup.member.is_some() {
            refusal = refusal.or(Some(FieldError::DuplicateLabel));
        }
        let member = if c.eat(b'=') {
            if c.peek() == Some(b'(') {
                let (list, list_refusal) = c.inner_list(wanted)?;
                refusal = refusal.or(list_refusal);
                Member::InnerList(list)
            } else {
                let (bare, _) = c.bare()?;
                let (params, _, _) = c.params(Track::No)?;
                Member::Item(bare, params)
            }
        } else {
            let (params, _, _) = c.params(Track::No)?;
            Member::Item(Bare::Boolean(true), params)
        };
        lookup.members += 1;
        if wanted && lookup.member.is_none() {
            lookup.member = Some((key, member));
        }
        c.skip_ows();
        match c.peek() {
            None => break,
            Some(b',') => {
                c.advance();
                c.skip_ows();
                if c.peek().is_none() {
                    return Err(FieldError::Syntax);
                }
            }
            Some(_) => return Err(FieldError::Syntax),
        }
    }
    match refusal {
        Some(refusal) => Err(refusal),
        None => Ok(lookup),
    }
}

/// Decodes a Byte Sequence's base64 (validated by [`dictionary`]) into `out`; `None` when it
/// does not fit (or is not base64).
pub fn decode_byte_sequence<'o>(raw: &str, out: &'o mut [u8]) -> Option<&'o [u8]> {
    let n = BASE64.decode_slice(raw, out).ok()?;
    out.get(..n)
}

/// Writes the serialization (RFC 9651 §4.1) of an Inner List of Strings without parameters,
/// with Integer, String, Token and Boolean parameters (RFC 9421's signature parameters); `None`
/// for anything else.
pub fn write_canonical(list: &InnerList<'_>, out: &mut String) -> Option<()> {
    out.push('(');
    for (i, item) in list.items().enumerate() {
        let (Bare::String(s), params) = item.ok()? else { return None };
        if !params.is_empty() {
            return None;
        }
        if i > 0 {
            out.push(' ');
        }
        out.push('"');
        out.push_str(s.raw());
        out.push('"');
    }
    out.push(')');
    for param in list.params.iter() {
        let (key, value) = param.ok()?;
        out.push(';');
        out.push_str(key);
        match value {
            Bare::Boolean(true) => {}
            Bare::Boolean(false) => out.push_str("=?0"),
            Bare::Integer(v) => {
                out.push('=');
                push_integer(out, v);
            }
            Bare::String(s) => {
                out.push_str("=\"");
                out.push_str(s.raw());
                out.push('"');
            }
            Bare::Token(t) => {
                out.push('=');
                out.push_str(t);
            }
            _ => return None,
        }
    }
    Some(())
}

fn push_integer(out: &mut String, v: i64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = v.unsigned_abs();
    loop {
        at -= 1;
        if let Some(d) = digits.get_mut(at) {
            *d = b'0' + (rest % 10) as u8;
        }
        rest /= 10;
        if rest == 0 || at == 0 {
            break;
        }
    }
    if v < 0 {
        out.push('-');
    }
    out.extend(digits.iter().skip(at).map(|d| char::from(*d)));
}

/// Whether a parameter list's keys are tracked (the wanted member's): repeated keys found.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Track {
    No,
    Yes,
}

/// What tracking a parameter list found.
#[derive(Default)]
struct Tracked {
    duplicate: bool,
    too_many: bool,
}

#[derive(Clone)]
struct Cursor<'a> {
    s: &'a str,
    i: usize,
}

fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

fn is_key_char(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'-' | b'*' | b'.')
}

impl<'a> Cursor<'a> {
    fn new(s: &'a str) -> Self {
        Cursor { s, i: 0 }
    }

    fn peek(&self) -> Option<u8> {
        self.s.as_bytes().get(self.i).copied()
    }

    fn advance(&mut self) {
        self.i += 1;
    }

    fn eat(&mut self, byte: u8) -> bool {
        if self.peek() == Some(byte) {
            self.advance();
            true
        } else {
            false
        }
    }

    /// Every position handed here is at an ASCII byte or the end (the parser only steps over
    /// ASCII; a non-ASCII byte is a syntax error before any slice ends at it).
    fn slice(&self, from: usize, to: usize) -> &'a str {
        self.s.get(from..to).unwrap_or("")
    }

    /// Skips SP; returns how many.
    fn skip_sp(&mut self) -> usize {
        let start = self.i;
        while self.peek() == Some(b' ') {
            self.advance();
        }
        self.i - start
    }

    fn skip_ows(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.advance();
        }
    }

    fn skip_while(&mut self, f: impl Fn(u8) -> bool) {
        while self.peek().is_some_and(&f) {
            self.advance();
        }
    }

    fn key(&mut self) -> Result<&'a str, FieldError> {
        let start = self.i;
        match self.peek() {
            Some(c) if c.is_ascii_lowercase() || c == b'*' => self.advance(),
            _ => return Err(FieldError::Syntax),
        }
        self.skip_while(is_key_char);
        Ok(self.slice(start, self.i))
    }

    /// A Bare Item, and whether it is written as its serialization.
    fn bare(&mut self) -> Result<(Bare<'a>, bool), FieldError> {
        match self.peek() {
            Some(b'?') => {
                self.advance();
                let value = match self.peek() {
                    Some(b'0') => false,
                    Some(b'1') => true,
                    _ => return Err(FieldError::Syntax),
                };
                self.advance();
                Ok((Bare::Boolean(value), true))
            }
            Some(b'"') => self.string().map(|s| (Bare::String(s), true)),
            Some(b':') => self.byte_sequence(),
            Some(b'@') => {
                self.advance();
                match self.number()? {
                    (Bare::Integer(v), canonical) => Ok((Bare::Date(v), canonical)),
                    _ => Err(FieldError::Syntax),
                }
            }
            Some(b'%') => self.display_string(),
            Some(c) if c.is_ascii_alphabetic() || c == b'*' => {
                let start = self.i;
                self.advance();
                self.skip_while(|c| is_tchar(c) || c == b':' || c == b'/');
                Ok((Bare::Token(self.slice(start, self.i)), true))
            }
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ => Err(FieldError::Syntax),
        }
    }

    fn string(&mut self) -> Result<SfString<'a>, FieldError> {
        self.advance();
        let start = self.i;
        loop {
            // Plain characters in one tight scan; the byte it stops at decides.
            let rest = self.s.as_bytes().get(self.i..).unwrap_or(&[]);
            self.i += rest
                .iter()
                .position(|&c| c == b'"' || c == b'\\' || !(0x20..0x7f).contains(&c))
                .unwrap_or(rest.len());
            match self.peek() {
                None | Some(0x00..=0x1f | 0x7f..=0xff) => return Err(FieldError::Syntax),
                Some(b'"') => {
                    let raw = self.slice(start, self.i);
                    self.advance();
                    return Ok(SfString(raw));
                }
                Some(b'\\') => {
                    self.advance();
                    match self.peek() {
                        Some(b'\\' | b'"') => self.advance(),
                        _ => return Err(FieldError::Syntax),
                    }
                }
                Some(_) => self.advance(),
            }
        }
    }

    fn byte_sequence(&mut self) -> Result<(Bare<'a>, bool), FieldError> {
        self.advance();
        let start = self.i;
        loop {
            match self.peek() {
                None => return Err(FieldError::Syntax),
                Some(b':') => break,
                Some(_) => self.advance(),
            }
        }
        // Any byte up to the colon: base64 then refuses what is not in its alphabet.
        let raw = self.s.as_bytes().get(start..self.i).unwrap_or(&[]);
        let canonical = base64_canonical(raw)?;
        let raw = self.slice(start, self.i);
        self.advance();
        Ok((Bare::ByteSequence(raw), canonical))
    }

    /// A Number (RFC 9651 §4.2.4): an Integer (at most 15 digits) or a Decimal (at most 12
    /// digits, a point, one to three digits), and whether it is written as its serialization.
    fn number(&mut self) -> Result<(Bare<'a>, bool), FieldError> {
        let start = self.i;
        let negative = self.eat(b'-');
        let digits_start = self.i;
        let mut magnitude: i64 = 0;
        let mut digits = 0usize;
        while let Some(c @ b'0'..=b'9') = self.peek() {
            digits += 1;
            if digits > 15 {
                return Err(FieldError::Syntax);
            }
            magnitude = magnitude * 10 + i64::from(c - b'0');
            self.advance();
        }
        if digits == 0 {
            return Err(FieldError::Syntax);
        }
        let leading_zero = digits > 1 && self.s.as_bytes().get(digits_start) == Some(&b'0');
        if self.peek() != Some(b'.') {
            let canonical = !(leading_zero || negative && magnitude == 0);
            return Ok((Bare::Integer(if negative { -magnitude } else { magnitude }), canonical));
        }
        if digits > 12 {
            return Err(FieldError::Syntax);
        }
        self.advance();
        let mut fraction = 0usize;
        let mut fraction_zero = true;
        let mut last = b'0';
        while let Some(c @ b'0'..=b'9') = self.peek() {
            fraction += 1;
            if fraction > 3 {
                return Err(FieldError::Syntax);
            }
            fraction_zero &= c == b'0';
            last = c;
            self.advance();
        }
        if fraction == 0 {
            return Err(FieldError::Syntax);
        }
        let zero = magnitude == 0 && fraction_zero;
        let canonical = !leading_zero && (fraction == 1 || last != b'0') && !(negative && zero);
        Ok((Bare::Decimal(self.slice(start, self.i)), canonical))
    }

    fn display_string(&mut self) -> Result<(Bare<'a>, bool), FieldError> {
        self.advance();
        if !self.eat(b'"') {
            return Err(FieldError::Syntax);
        }
        let start = self.i;
        let mut canonical = true;
        // Only a string with escapes needs its bytes decoded (to check they are UTF-8).
        let mut decoded: Option<Vec<u8>> = None;
        loop {
            match self.peek() {
                None | Some(0x00..=0x1f | 0x7f..=0xff) => return Err(FieldError::Syntax),
                Some(b'"') => {
                    let raw = self.slice(start, self.i);
                    self.advance();
                    if let Some(bytes) = decoded {
                        if std::str::from_utf8(&bytes).is_err() {
                            return Err(FieldError::Syntax);
                        }
                    }
                    return Ok((Bare::DisplayString(raw), canonical));
                }
                Some(b'%') => {
                    let at = self.i;
                    self.advance();
                    let mut octet = 0u8;
                    for _ in 0..2 {
                        let nibble = match self.peek() {
                            Some(c @ b'0'..=b'9') => c - b'0',
                            Some(c @ b'a'..=b'f') => c - b'a' + 10,
                            _ => return Err(FieldError::Syntax),
                        };
                        octet = (octet << 4) | nibble;
                        self.advance();
                    }
                    // The serialization escapes exactly `%`, `"` and bytes outside 0x20..0x7e.
                    canonical &= matches!(octet, b'%' | b'"' | 0x00..=0x1f | 0x7f..=0xff);
                    let bytes = decoded.get_or_insert_with(|| self.s.as_bytes().get(start..at).unwrap_or(&[]).to_vec());
                    bytes.push(octet);
                }
                Some(c) => {
                    if let Some(bytes) = decoded.as_mut() {
                        bytes.push(c);
                    }
                    self.advance();
                }
            }
        }
    }

    /// One parameter after its `;`: key, value, whether written as its serialization.
    fn parameter(&mut self) -> Result<(&'a str, Bare<'a>, bool), FieldError> {
        let spaced = self.skip_sp() > 0;
        let key = self.key()?;
        if !self.eat(b'=') {
            return Ok((key, Bare::Boolean(true), !spaced));
        }
        let (value, canonical) = self.bare()?;
        // `;a=?1` serializes as `;a`.
        Ok((key, value, canonical && !spaced && value != Bare::Boolean(true)))
    }

    /// Parameters (possibly none): validated, whether written as their serialization, and, when
    /// tracked, what tracking found. An untracked list with a repeated key is not canonical
    /// either (its serialization has the key once) when that is seen among the first
    /// [`MAX_PARAMS`] keys; beyond them, canonical is `false`.
    fn params(&mut self, track: Track) -> Result<(Params<'a>, bool, Tracked), FieldError> {
        let start = self.i;
        if self.peek() != Some(b';') {
            return Ok((Params(""), true, Tracked::default()));
        }
        let mut canonical = true;
        let mut tracked = Tracked::default();
        let mut keys: [&str; MAX_PARAMS] = [""; MAX_PARAMS];
        let mut n = 0usize;
        while self.eat(b';') {
            let (key, _, written) = self.parameter()?;
            canonical &= written;
            match keys.get(..n) {
                Some(seen) if seen.contains(&key) => tracked.duplicate = true,
                _ => match keys.get_mut(n) {
                    Some(slot) => {
                        *slot = key;
                        n += 1;
                    }
                    None => tracked.too_many = true,
                },
            }
        }
        canonical &= !tracked.duplicate && !tracked.too_many;
        if track == Track::No {
            tracked = Tracked::default();
        }
        Ok((Params(self.slice(start, self.i)), canonical, tracked))
    }

    /// An Inner List (RFC 9651 §4.2.1.2) at `(`; for the wanted member, the refusal its
    /// parameters earn (a repeated key, too many).
    fn inner_list(&mut self, wanted: bool) -> Result<(InnerList<'a>, Option<FieldError>), FieldError> {
        let start = self.i;
        self.advance();
        let items_start = self.i;
        let mut canonical = true;
        let mut first = true;
        let items_end = loop {
            if self.peek().is_none() {
                return Err(FieldError::Syntax);
            }
            let spaces = self.skip_sp();
            if self.peek() == Some(b')') {
                canonical &= spaces == 0;
                let end = self.i;
                self.advance();
                break end;
            }
            canonical &= spaces == usize::from(!first);
            first = false;
            let (_, written) = self.bare()?;
            let (_, params_written, _) = self.params(Track::No)?;
            canonical &= written && params_written;
            match self.peek() {
                None | Some(b' ' | b')') => {}
                Some(_) => return Err(FieldError::Syntax),
            }
        };
        let track = if wanted { Track::Yes } else { Track::No };
        let (params, params_written, tracked) = self.params(track)?;
        let refusal = if tracked.duplicate {
            Some(FieldError::DuplicateParameter)
        } else if tracked.too_many {
            Some(FieldError::TooManyParameters)
        } else {
            None
        };
        Ok((
            InnerList {
                value: self.slice(start, self.i),
                canonical: canonical && params_written,
                items: self.slice(items_start, items_end),
                params,
            },
            refusal,
        ))
    }
}

fn is_base64_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'+' || c == b'/'
}

/// Checks base64 as [`BASE64`] decodes it, without decoding all of it: every group of four but
/// the last must be four alphabet characters (no padding); the last group is decoded. Returns
/// whether the text is the canonical encoding of what it decodes to (padded, zero trailing bits).
fn base64_canonical(raw: &[u8]) -> Result<bool, FieldError> {
    if raw.is_empty() {
        return Ok(true);
    }
    let (head, tail) = raw.split_at_checked((raw.len() - 1) / 4 * 4).ok_or(FieldError::Syntax)?;
    if !head.iter().all(|c| is_base64_char(*c)) {
        return Err(FieldError::Syntax);
    }
    let mut bytes = [0u8; 3];
    let n = BASE64.decode_slice(tail, &mut bytes).map_err(|_| FieldError::Syntax)?;
    let mut again = [0u8; 4];
    let canonical = tail.len() == 4
        && bytes.get(..n).and_then(|b| BASE64.encode_slice(b, &mut again).ok()) == Some(4)
        && again.as_slice() == tail;
    Ok(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list<'a>(input: &'a str, label: &str) -> InnerList<'a> {
        match dictionary(input, Want::Label(label)).unwrap().member {
            Some((_, Member::InnerList(list))) => list,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reads_the_rfc9421_example_member_and_its_bytes() {
        let input = r#"sig1=("@method" "@authority" "@path" "content-digest");created=1618884473;keyid="test-key-rsa-pss";nonce="b3k2pp5k7z", sig2=("@authority");created=1"#;
        let l = list(input, "sig1");
        assert!(l.canonical);
        assert_eq!(
            l.value,
            r#"("@method" "@authority" "@path" "content-digest");created=1618884473;keyid="test-key-rsa-pss";nonce="b3k2pp5k7z""#
        );
        let names: Vec<_> = l.items().map(|i| i.unwrap().0).collect();
        assert_eq!(names.len(), 4);
        assert_eq!(names[3], Bare::String(SfString("content-digest")));
        let params: Vec<_> = l.params.iter().map(|p| p.unwrap()).collect();
        assert_eq!(params[0], ("created", Bare::Integer(1618884473)));
        assert_eq!(params[2], ("nonce", Bare::String(SfString("b3k2pp5k7z"))));
        assert_eq!(dictionary(input, Want::First).unwrap().members, 2);
        assert_eq!(dictionary(input, Want::First).unwrap().member.unwrap().0, "sig1");
        assert!(list(input, "sig2").canonical);
    }

    #[test]
    fn non_canonical_forms_are_told_apart() {
        for (input, canonical) in [
            (r#"a=("x" "y");n=1"#, true),
            (r#"a=( "x" "y");n=1"#, false),
            (r#"a=("x"  "y");n=1"#, false),
            (r#"a=("x" "y" );n=1"#, false),
            (r#"a=("x" "y"); n=1"#, false),
            (r#"a=("x" "y");n=01"#, false),
            (r#"a=("x" "y");n=-0"#, false),
            (r#"a=("x" "y");n=?1"#, false),
            (r#"a=("x" "y");n"#, true),
            (r#"a=("x" "y");n=1.50"#, false),
            (r#"a=("x" "y");n=1.5"#, true),
            (r#"a=("x" "y");n=:AA==:"#, true),
            (r#"a=("x" "y");n=:AA:"#, false),
            (r#"a=("x" "y");n=:AB==:"#, false),
            (r#"a=("x";p;p "y");n=1"#, false),
            (r#"a=();n=1"#, true),
            (r#"a=( );n=1"#, false),
            (r#"a=("x" "y");n=%"%41""#, false),
            (r#"a=("x" "y");n=%"%25""#, true),
        ] {
            assert_eq!(list(input, "a").canonical, canonical, "{input}");
        }
    }

    #[test]
    fn repeats_are_refused_in_the_wanted_member_only() {
        assert_eq!(dictionary(r#"a=("x");n=1;n=2"#, Want::Label("a")), Err(FieldError::DuplicateParameter));
        assert!(dictionary(r#"a=("x");n=1;n=2, b=("y")"#, Want::Label("b")).is_ok());
        assert_eq!(dictionary(r#"a=("x"), a=("y")"#, Want::Label("a")), Err(FieldError::DuplicateLabel));
        assert_eq!(dictionary(r#"a=("x"), a=("y")"#, Want::First).unwrap().members, 2);
        let many = format!("a=(){}", (0..17).map(|i| format!(";k{i}")).collect::<String>());
        assert_eq!(dictionary(&many, Want::Label("a")), Err(FieldError::TooManyParameters));
        // A syntax error wins over a repeat.
        assert_eq!(dictionary(r#"a=("x");n=1;n=2,"#, Want::Label("a")), Err(FieldError::Syntax));
    }

    #[test]
    fn strings_keep_their_escapes_until_read() {
        let l = list(r#"a=("x");nonce="a\"b\\c""#, "a");
        let (_, value) = l.params.iter().next().unwrap().unwrap();
        let Bare::String(s) = value else { panic!() };
        assert_eq!(s.raw(), r#"a\"b\\c"#);
        assert_eq!(s.value(), r#"a"b\c"#);
        let mut out = String::new();
        write_canonical(&l, &mut out).unwrap();
        assert_eq!(out, l.value);
    }

    #[test]
    fn canonical_writing_normalises_spaces_and_numbers() {
        let l = list(r#"a=(  "x"   "y" );created=0012; keyid="k";b;c=?0"#, "a");
        assert!(!l.canonical);
        let mut out = String::new();
        write_canonical(&l, &mut out).unwrap();
        assert_eq!(out, r#"("x" "y");created=12;keyid="k";b;c=?0"#);
    }

    #[test]
    fn syntax_errors() {
        for input in [
            "a=(",
            "a=(\"x\"",
            "a=(\"x\")x",
            "a=1,",
            "a=1, ",
            "A=1",
            "a=\"\\x\"",
            "a=1.",
            "a=1.2345",
            "a=1234567890123456",
            "a=1234567890123.5",
            "a=:A:",
            "a=:AA=A:",
            "a=@1.5",
            "a=%\"%4\"",
            "a=%\"%c3\"",
            "a=?2",
            "a=é",
            "\ta=1",
            "a=1;",
            "a=1 b=2",
            "a=(\"x\"\"y\")",
        ] {
            assert_eq!(dictionary(input, Want::First), Err(FieldError::Syntax), "{input}");
        }
        for input in ["", "  ", "a", "a=1 ,\tb=?0", "a=@-5;b=*tok/x:y", "a=%\"%c3%a9\"", "a=:AA:", "a=-0.5"] {
            assert!(dictionary(input, Want::First).is_ok(), "{input}");
        }
    }

    #[test]
    fn byte_sequences_decode_into_a_buffer() {
        let lookup = dictionary("sig=:AAEC:;x", Want::Label("sig")).unwrap();
        let Some((_, Member::Item(Bare::ByteSequence(raw), _))) = lookup.member else { panic!() };
        let mut buf = [0u8; 8];
        assert_eq!(decode_byte_sequence(raw, &mut buf), Some(&[0u8, 1, 2][..]));
        let mut small = [0u8; 2];
        assert_eq!(decode_byte_sequence(raw, &mut small), None);
    }
}
