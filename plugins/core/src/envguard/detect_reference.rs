//! The detector as it was before the scan was made cheaper (issue 16), kept unchanged as the
//! oracle of the differential tests (`detect_diff_tests`): the new walk must find exactly what
//! this one finds, with the same decodings, the same verdicts and the same budget spent.
//! Test-only and frozen: a change that means to detect something new changes `detect.rs` and its
//! tests, and then retires this file and the differential tests with it (they would only pin the
//! old behaviour).
#![allow(dead_code)]

use std::collections::HashMap;

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use sha2::{Digest, Sha256};

/// Nested encodings followed inside one value, in any mix (base64 of base64, base64 of a
/// percent-encoded value, gzip inside base64, a multipart part's transfer encoding, a nested
/// multipart...). A value still encoded below this many layers is [`Found::TooDeep`].
pub const MAX_DEPTH: u8 = 6;
/// Tokens shorter than this are not hashed (whole values always are).
pub const MIN_TOKEN_LEN: usize = 8;

const LENIENT: GeneralPurposeConfig = GeneralPurposeConfig::new()
    .with_decode_padding_mode(DecodePaddingMode::Indifferent)
    .with_decode_allow_trailing_bits(true);
const B64_STD: GeneralPurpose = GeneralPurpose::new(&alphabet::STANDARD, LENIENT);
const B64_URL: GeneralPurpose = GeneralPurpose::new(&alphabet::URL_SAFE, LENIENT);

#[derive(Debug, Clone)]
pub enum PatternMatcher {
    /// A token (see the module docs) that starts with these bytes.
    Prefix(Vec<u8>),
    /// Searched anywhere in a value and in each of its decodings (`regex` is linear-time).
    Regex(regex::bytes::Regex),
}

#[derive(Debug, Clone)]
pub struct Pattern {
    pub label: usize,
    pub matcher: PatternMatcher,
}

/// A production-only host: exact, or `*.suffix` (any sub-domain of suffix, not suffix itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostRule {
    Exact(String),
    Subdomains(String),
}

impl HostRule {
    pub fn parse(text: &str) -> Option<HostRule> {
        let (wild, name) = match text.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let name = name.strip_suffix('.').unwrap_or(name);
        let ok = !name.is_empty()
            && name.len() <= 253
            && name.contains(|c: char| c.is_ascii_alphabetic())
            && name
                .split('.')
                .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
        if !ok {
            return None;
        }
        Some(if wild { HostRule::Subdomains(name.to_string()) } else { HostRule::Exact(name.to_string()) })
    }

    /// `host`: lower-case, no port, no trailing dot.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostRule::Exact(name) => host == name,
            HostRule::Subdomains(suffix) => {
                host.strip_suffix(suffix.as_str()).is_some_and(|head| head.len() > 1 && head.ends_with('.'))
            }
        }
    }

    pub fn text(&self) -> String {
        match self {
            HostRule::Exact(name) => name.clone(),
            HostRule::Subdomains(suffix) => format!("*.{suffix}"),
        }
    }
}

/// A protected credential found: its label and the decodings that revealed it (outermost first).
/// Never carries the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    pub label: String,
    pub how: Vec<&'static str>,
}

impl Hit {
    /// `""`, or ` (base64, url-encoded)`.
    pub fn how_suffix(&self) -> String {
        if self.how.is_empty() {
            String::new()
        } else {
            format!(" ({})", self.how.join(", "))
        }
    }
}

/// One protected credential as configured: the SHA-256 of its bytes, their number when known,
/// and the index of its label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    pub sha256: [u8; 32],
    pub length: Option<usize>,
    pub label: usize,
}

/// Which candidate lengths are worth a SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HashedLengths {
    /// Only these (sorted, no duplicates; empty without fingerprints).
    Only(Vec<usize>),
    /// Every length: a credential was configured without `length` (backward compatibility).
    Every,
}

/// The compiled detection rules.
#[derive(Debug, Clone)]
pub struct Detector {
    labels: Vec<String>,
    fingerprints: HashMap<[u8; 32], usize>,
    hashed_lengths: HashedLengths,
    /// No candidate shorter than this can match anything (fingerprint, prefix or regex);
    /// `usize::MAX` for a detector with nothing to find.
    shortest_match: usize,
    patterns: Vec<Pattern>,
    hosts: Vec<HostRule>,
}

/// Most steps recorded in a [`Hit`]'s `how` (caller's steps plus decodings; more are dropped
/// from the message, never from the search).
const MAX_HOW: usize = 16;

/// What a scan found, other than nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// A protected credential or a production-only pattern.
    Credential(Hit),
    /// A value still encoded after [`MAX_DEPTH`] decodings (the decodings so far, outermost
    /// first): the guard cannot see what it hides.
    TooDeep(Vec<&'static str>),
    /// The decodings of this request used up the [`Budget`] (`max_decoded_bytes`).
    OverBudget,
}

/// Bytes that decodings inside values (base64, percent-encoding, gzip/deflate inside a value,
/// multipart transfer encodings) may produce, summed over everything one budget is used for.
#[derive(Debug, Clone)]
pub struct Budget {
    left: usize,
    exceeded: bool,
}

impl Budget {
    pub fn new(bytes: usize) -> Budget {
        Budget { left: bytes, exceeded: false }
    }

    /// Reserves `bytes`; `false` (and the budget is marked exceeded) when they are not left.
    pub fn take(&mut self, bytes: usize) -> bool {
        if bytes > self.left {
            self.exceeded = true;
            return false;
        }
        self.left -= bytes;
        true
    }

    pub fn left(&self) -> usize {
        self.left
    }

    pub fn exceeded(&self) -> bool {
        self.exceeded
    }
}

/// The budget of [`Detector::scan`] (the lint, which has no request limits): 64 MiB.
const SCAN_BUDGET: usize = 64 * 1024 * 1024;

/// The state of one scan: the decoding budget, and the first place found too deep to follow.
struct Walk<'a> {
    budget: &'a mut Budget,
    too_deep: Option<How>,
}

impl Walk<'_> {
    fn too_deep(&mut self, how: How) {
        if self.too_deep.is_none() {
            self.too_deep = Some(how);
        }
    }
}

/// The decodings applied so far, on the stack (copied, never allocated, per candidate).
#[derive(Clone, Copy)]
struct How {
    steps: [&'static str; MAX_HOW],
    len: usize,
}

impl How {
    fn new(prefix: &[&'static str]) -> How {
        let mut how = How { steps: [""; MAX_HOW], len: 0 };
        for step in prefix {
            how = how.with(step);
        }
        how
    }

    fn with(mut self, step: &'static str) -> How {
        if let Some(slot) = self.steps.get_mut(self.len) {
            *slot = step;
            self.len += 1;
        }
        self
    }

    fn as_slice(&self) -> &[&'static str] {
        self.steps.get(..self.len).unwrap_or_default()
    }
}

/// Most bytes that `len` characters of base64 (padding and white space included) decode to.
pub fn base64_decoded_max(len: usize) -> usize {
    len / 4 * 3 + (len % 4).saturating_sub(1)
}

/// The valid `%XX` escapes in `text`, counted as `percent_encoding::percent_decode` decodes them
/// (a `%` not followed by two hex digits stays as is).
pub(super) fn percent_escapes(text: &[u8]) -> usize {
    let mut count = 0;
    let mut rest = text;
    while let Some(at) = rest.iter().position(|b| *b == b'%') {
        let after = rest.get(at + 1..).unwrap_or_default();
        match after {
            [hi, lo, ..] if hi.is_ascii_hexdigit() && lo.is_ascii_hexdigit() => {
                count += 1;
                rest = after.get(2..).unwrap_or_default();
            }
            _ => rest = after,
        }
    }
    count
}

/// Characters that never occur inside a credential token.
const fn is_delimiter(b: u8) -> bool {
    b.is_ascii_whitespace()
        || b.is_ascii_control()
        || matches!(
            b,
            b'"' | b'\''
                | b'`'
                | b','
                | b';'
                | b'<'
                | b'>'
                | b'('
                | b')'
                | b'['
                | b']'
                | b'{'
                | b'}'
                | b'|'
                | b'\\'
                | b'&'
                | b'?'
        )
}

const fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

const fn is_b64(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'-' | b'_' | b'=')
}

/// Byte classes, looked up once per byte by [`Shape::of`] (one pass instead of one per question).
const DELIMITER: u16 = 1;
const B64_OR_NEWLINE: u16 = 1 << 1;
const NEWLINE: u16 = 1 << 2;
const WORD: u16 = 1 << 3;
const URL_SAFE: u16 = 1 << 4;
const STANDARD: u16 = 1 << 5;
const PERCENT: u16 = 1 << 6;
const EQUALS: u16 = 1 << 7;
const COLON: u16 = 1 << 8;

// Evaluated at compile time: an out-of-range index or cast here fails the build, never a request.
#[allow(clippy::indexing_slicing, clippy::cast_possible_truncation, reason = "const evaluation, i < 256")]
const CLASSES: [u16; 256] = {
    let mut table = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        let mut class = 0;
        if is_delimiter(b) {
            class |= DELIMITER;
        }
        if is_b64(b) || b == b'\n' || b == b'\r' {
            class |= B64_OR_NEWLINE;
        }
        if b == b'\n' || b == b'\r' {
            class |= NEWLINE;
        }
        if is_word(b) {
            class |= WORD;
        }
        if b == b'-' || b == b'_' {
            class |= URL_SAFE;
        }
        if b == b'+' || b == b'/' {
            class |= STANDARD;
        }
        if b == b'%' {
            class |= PERCENT;
        }
        if b == b'=' {
            class |= EQUALS;
        }
        if b == b':' {
            class |= COLON;
        }
        table[i] = class;
        i += 1;
    }
    table
};

/// The byte classes present in a value (`any`) and shared by all its bytes (`all`).
#[derive(Clone, Copy)]
struct Shape {
    any: u16,
    all: u16,
}

impl Shape {
    fn of(data: &[u8]) -> Shape {
        let (mut any, mut all) = (0u16, u16::MAX);
        for b in data {
            let class = CLASSES.get(usize::from(*b)).copied().unwrap_or(DELIMITER);
            any |= class;
            all &= class;
        }
        Shape { any, all }
    }

    fn any(self, class: u16) -> bool {
        self.any & class != 0
    }

    fn all(self, class: u16) -> bool {
        self.all & class != 0
    }
}

/// Shortest base64 text of a secret of [`MIN_TOKEN_LEN`] bytes.
pub const MIN_B64_LEN: usize = (MIN_TOKEN_LEN * 4).div_ceil(3);

/// Worth decoding as base64: long enough, base64 characters only, and not a plain lower-case
/// word (base64 of 8+ bytes is all lower-case/digits with probability under 0.2%).
fn looks_b64(token: &[u8]) -> bool {
    token.len() >= MIN_B64_LEN
        && token.iter().all(|b| is_b64(*b))
        && token.iter().any(|b| b.is_ascii_uppercase() || matches!(b, b'+' | b'/' | b'-' | b'_' | b'='))
}

/// gzip (`1f 8b`, deflate method) or zlib (deflate method, header checksum) data: worth
/// inflating when it turns up inside a decoded value.
fn compressed(data: &[u8]) -> Option<super::body::Coding> {
    match data {
        [0x1f, 0x8b, 8, ..] => Some(super::body::Coding::Gzip),
        [cmf, flg, ..] if cmf & 0x0f == 8 && cmf >> 4 <= 7 && (u16::from(*cmf) * 256 + u16::from(*flg)) % 31 == 0 => {
            Some(super::body::Coding::Deflate)
        }
        _ => None,
    }
}

/// Printable text (UTF-8 or not): at most 1 in 16 bytes is a control character other than
/// white space.
fn is_text(data: &[u8]) -> bool {
    let control = data.iter().filter(|b| (**b < 0x20 && !b.is_ascii_whitespace()) || **b == 0x7f).count();
    control * 16 <= data.len()
}

fn trim(data: &[u8]) -> &[u8] {
    data.trim_ascii()
}

/// Non-empty runs of bytes for which `keep` holds.
fn runs(data: &[u8], keep: fn(u8) -> bool) -> impl Iterator<Item = &[u8]> {
    data.split(move |b| !keep(*b)).filter(|t| !t.is_empty())
}

impl Detector {
    /// `fingerprints` are distinct (the configuration refuses duplicates).
    /// The labels of the credentials and patterns it looks for.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    pub fn new(labels: Vec<String>, fingerprints: Vec<Fingerprint>, patterns: Vec<Pattern>, hosts: Vec<HostRule>) -> Self {
        let hashed_lengths = if fingerprints.iter().any(|f| f.length.is_none()) {
            HashedLengths::Every
        } else {
            let mut lengths: Vec<usize> = fingerprints.iter().filter_map(|f| f.length).collect();
            lengths.sort_unstable();
            lengths.dedup();
            HashedLengths::Only(lengths)
        };
        let fingerprint_shortest = match &hashed_lengths {
            HashedLengths::Every => Some(1),
            HashedLengths::Only(lengths) => lengths.first().copied(),
        };
        let pattern_shortest = patterns.iter().map(|p| match &p.matcher {
            // A prefix matches only a longer token.
            PatternMatcher::Prefix(prefix) => prefix.len() + 1,
            // Never the empty string (refused at configuration), so at least one byte.
            PatternMatcher::Regex(_) => 1,
        });
        let shortest_match = fingerprint_shortest.into_iter().chain(pattern_shortest).min().unwrap_or(usize::MAX).max(1);
        let fingerprints = fingerprints.into_iter().map(|f| (f.sha256, f.label)).collect();
        Detector { labels, fingerprints, hashed_lengths, shortest_match, patterns, hosts }
    }

    /// The shortest candidate that could match a fingerprint or a pattern. A value (or a
    /// decoding) shorter than this holds nothing to find.
    pub fn shortest_match(&self) -> usize {
        self.shortest_match
    }

    /// Whether every protected credential has a known length (otherwise every candidate of
    /// every length is hashed: correct, slower).
    pub fn lengths_known(&self) -> bool {
        self.hashed_lengths != HashedLengths::Every
    }

    /// Whether a candidate of `len` bytes is worth a SHA-256.
    fn hashed(&self, len: usize) -> bool {
        match &self.hashed_lengths {
            HashedLengths::Only(lengths) => lengths.binary_search(&len).is_ok(),
            HashedLengths::Every => true,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.fingerprints.is_empty() && self.patterns.is_empty() && self.hosts.is_empty()
    }

    pub fn hosts(&self) -> &[HostRule] {
        &self.hosts
    }

    fn hit(&self, label: usize, how: &[&'static str]) -> Hit {
        Hit { label: self.labels.get(label).cloned().unwrap_or_else(|| "?".to_string()), how: how.to_vec() }
    }

    /// The whole candidate: fingerprint and prefix patterns (no tokenising, no decoding).
    pub fn exact(&self, candidate: &[u8], how: &[&'static str]) -> Option<Hit> {
        if candidate.is_empty() {
            return None;
        }
        // The length check first: most candidates are never hashed.
        if self.hashed(candidate.len()) {
            let digest: [u8; 32] = Sha256::digest(candidate).into();
            if let Some(label) = self.fingerprints.get(&digest) {
                return Some(self.hit(*label, how));
            }
        }
        for pattern in &self.patterns {
            if let PatternMatcher::Prefix(prefix) = &pattern.matcher {
                // The prefix alone (e.g. in the guard's own configuration) is not a credential.
                if candidate.len() > prefix.len() && candidate.starts_with(prefix) {
                    return Some(self.hit(pattern.label, how));
                }
            }
        }
        None
    }

    /// Checks one value (a header value, a parameter, a JSON string, a body) as described in
    /// the module docs, for credentials only: a value too deep to follow, or over the decoding
    /// budget, is not a finding here (the lint's view; the filter uses [`Detector::inspect`]).
    pub fn scan(&self, data: &[u8], how: &[&'static str]) -> Option<Hit> {
        let mut budget = Budget::new(SCAN_BUDGET);
        match self.inspect(data, how, 0, &mut budget) {
            Some(Found::Credential(hit)) => Some(hit),
            _ => None,
        }
    }

    /// Checks one value found `depth` layers of encoding down (0: as received; a caller that
    /// undid a multipart part's transfer encoding passes 1, ...), charging its decodings to
    /// `budget`. A credential is reported first, then a value too deep to follow, then an
    /// exhausted budget. `how` prefixes the decodings already applied by the caller.
    pub fn inspect(&self, data: &[u8], how: &[&'static str], depth: u8, budget: &mut Budget) -> Option<Found> {
        let mut walk = Walk { budget, too_deep: None };
        let how = How::new(how);
        let hit = if depth > MAX_DEPTH { self.beyond(data, how, &mut walk) } else { self.scan_at(data, depth, how, &mut walk) };
        if let Some(hit) = hit {
            return Some(Found::Credential(hit));
        }
        if let Some(how) = walk.too_deep {
            return Some(Found::TooDeep(how.as_slice().to_vec()));
        }
        walk.budget.exceeded().then_some(Found::OverBudget)
    }

    /// A decoding one layer deeper than [`MAX_DEPTH`]: not looked into; if it could hold
    /// anything (text or compressed data, long enough to match), the value is too deep.
    fn beyond(&self, data: &[u8], how: How, walk: &mut Walk) -> Option<Hit> {
        if data.len() >= self.shortest_match && (is_text(data) || compressed(data).is_some()) {
            walk.too_deep(how);
        }
        None
    }

    /// A decoding at `depth` (1: one layer below the value as received). Text is scanned like a
    /// value; compressed data (gzip or zlib magic) is inflated within the budget; other bytes
    /// (most base64-looking words decode to noise) are only checked whole: tokenising noise
    /// finds nothing and costs hashes.
    fn layer(&self, data: &[u8], depth: u8, how: How, walk: &mut Walk) -> Option<Hit> {
        if depth > MAX_DEPTH {
            return self.beyond(data, how, walk);
        }
        if is_text(data) {
            return self.scan_at(data, depth, how, walk);
        }
        if let Some(coding) = compressed(data) {
            match super::body::decode(data, &[coding], walk.budget.left()) {
                Ok(inflated) => {
                    if walk.budget.take(inflated.len()) {
                        return self.layer(&inflated, depth + 1, how.with(coding.name()), walk);
                    }
                    return None;
                }
                Err(super::body::DecodeError::TooLarge) => {
                    walk.budget.take(usize::MAX);
                    return None;
                }
                // Noise that starts like compressed data.
                Err(super::body::DecodeError::Invalid(_)) => {}
            }
        }
        self.exact(data, how.as_slice())
    }

    fn scan_at(&self, data: &[u8], depth: u8, how: How, walk: &mut Walk) -> Option<Hit> {
        // Every candidate below is a slice or a (shrinking) decoding of `data`.
        if data.len() < self.shortest_match {
            return None;
        }
        if let Some(hit) = self.exact(data, how.as_slice()) {
            return Some(hit);
        }
        let trimmed = trim(data);
        if trimmed.len() != data.len() {
            if let Some(hit) = self.exact(trimmed, how.as_slice()) {
                return Some(hit);
            }
        }
        for pattern in &self.patterns {
            if let PatternMatcher::Regex(regex) = &pattern.matcher {
                if regex.is_match(data) {
                    return Some(self.hit(pattern.label, how.as_slice()));
                }
            }
        }
        // A JSON document (a decoded layer, a header value, a text body): its strings, with
        // their escapes (`\u0066`, `\/`) undone, at the same depth; its keys whole.
        if let (Some(b'{' | b'['), Some(b'}' | b']')) = (trimmed.first(), trimmed.last()) {
            if let Ok(value) = serde_json::from_slice::<serde_json::Value>(trimmed) {
                return self.json_strings(&value, depth, how, walk);
            }
        }
        let shape = Shape::of(trimmed);
        // The whole value decoded, white space ignored (wrapped base64).
        // (line breaks only: a text of words separated by spaces is not wrapped base64)
        if trimmed.len() >= MIN_B64_LEN && base64_decoded_max(trimmed.len()) >= self.shortest_match && shape.all(B64_OR_NEWLINE) {
            let hit = if shape.any(NEWLINE) {
                let compact: Vec<u8> = trimmed.iter().copied().filter(|b| !b.is_ascii_whitespace()).collect();
                self.decode_b64_shaped(&compact, shape, depth, how, walk)
            } else {
                self.decode_b64_shaped(trimmed, shape, depth, how, walk)
            };
            if hit.is_some() {
                return hit;
            }
        }
        // The whole value percent-decoded: its tokens are the decoded tokens, so the tokens
        // below are not percent-decoded again (one decoding per layer, not two).
        if shape.any(PERCENT) {
            if let Some(hit) = self.decode_percent(trimmed, depth, how, walk) {
                return Some(hit);
            }
        }
        // Tokens: white space is a delimiter, so the tokens of `data` are those of `trimmed`.
        if !shape.any(DELIMITER) {
            return if trimmed.is_empty() { None } else { self.token(trimmed, Some(shape), depth, how, walk) };
        }
        for token in runs(trimmed, |b| !is_delimiter(b)) {
            if token.len() < self.shortest_match {
                continue;
            }
            let whole = (token.len() == trimmed.len()).then_some(shape);
            if let Some(hit) = self.token(token, whole, depth, how, walk) {
                return Some(hit);
            }
        }
        None
    }

    /// Every string of a JSON document scanned at `depth`, every key checked whole.
    fn json_strings(&self, value: &serde_json::Value, depth: u8, how: How, walk: &mut Walk) -> Option<Hit> {
        match value {
            serde_json::Value::String(s) => self.scan_at(s.as_bytes(), depth, how, walk),
            serde_json::Value::Array(items) => items.iter().find_map(|item| self.json_strings(item, depth, how, walk)),
            serde_json::Value::Object(map) => map.iter().find_map(|(key, item)| {
                self.exact(key.as_bytes(), how.as_slice()).or_else(|| self.json_strings(item, depth, how, walk))
            }),
            _ => None,
        }
    }

    /// One delimiter-free token. `whole`: it is the whole (trimmed) value, of this shape,
    /// already checked and decoded as such.
    fn token(&self, token: &[u8], whole: Option<Shape>, depth: u8, how: How, walk: &mut Walk) -> Option<Hit> {
        if whole.is_none() && token.len() >= MIN_TOKEN_LEN {
            if let Some(hit) = self.exact(token, how.as_slice()) {
                return Some(hit);
            }
            // "SECRET." at the end of a sentence.
            let stripped = token.strip_suffix(b".").or_else(|| token.strip_suffix(b":")).or_else(|| token.strip_suffix(b"!"));
            if let Some(stripped) = stripped {
                if let Some(hit) = self.exact(stripped, how.as_slice()) {
                    return Some(hit);
                }
            }
            if looks_b64(token) {
                if let Some(hit) = self.decode_b64(token, depth, how, walk) {
                    return Some(hit);
                }
            }
        }
        // key=SECRET, user:SECRET, and the other way round.
        for (sep, class) in [(b'=', EQUALS), (b':', COLON)] {
            if whole.is_some_and(|shape| !shape.any(class)) {
                continue;
            }
            if let Some(at) = token.iter().position(|b| *b == sep) {
                let (head, tail) = (token.get(..at).unwrap_or_default(), token.get(at + 1..).unwrap_or_default());
                for part in [tail, head] {
                    if part.len() >= MIN_TOKEN_LEN {
                        if let Some(hit) = self.exact(part, how.as_slice()) {
                            return Some(hit);
                        }
                        // A structured-field byte sequence (`sha-256=:BASE64:`, RFC 8941).
                        let part = if sep == b'=' {
                            part.strip_prefix(b":").and_then(|p| p.strip_suffix(b":")).unwrap_or(part)
                        } else {
                            part
                        };
                        if sep == b'=' && looks_b64(part) {
                            if let Some(hit) = self.decode_b64(part, depth, how, walk) {
                                return Some(hit);
                            }
                        }
                    }
                }
            }
        }
        // Word-like sub-tokens (a secret inside a URL path, after a dot, ...).
        if whole.is_some_and(|shape| shape.all(WORD)) {
            return None;
        }
        let mut words = runs(token, is_word).peekable();
        let single = words.peek().is_some_and(|w| w.len() == token.len());
        if !single {
            for word in words {
                if word.len() >= MIN_TOKEN_LEN {
                    if let Some(hit) = self.exact(word, how.as_slice()) {
                        return Some(hit);
                    }
                }
            }
        }
        None
    }

    /// `text`: base64 characters only (no white space).
    fn decode_b64(&self, text: &[u8], depth: u8, how: How, walk: &mut Walk) -> Option<Hit> {
        // Decoding only shrinks: skip what cannot decode to anything long enough to match.
        if base64_decoded_max(text.len()) < self.shortest_match.max(4) {
            return None;
        }
        self.decode_b64_shaped(text, Shape::of(text), depth, how, walk)
    }

    /// `shape`: of `text`, or of `text` with line breaks (its alphabet is the same).
    fn decode_b64_shaped(&self, text: &[u8], shape: Shape, depth: u8, how: How, walk: &mut Walk) -> Option<Hit> {
        let most = base64_decoded_max(text.len());
        if most < self.shortest_match.max(4) {
            return None;
        }
        let engine = match (shape.any(URL_SAFE), shape.any(STANDARD)) {
            (true, true) => return None,
            (true, false) => &B64_URL,
            (false, _) => &B64_STD,
        };
        if !walk.budget.take(most) {
            return None;
        }
        let decoded = engine.decode(text).ok()?;
        if decoded.len() < 4 {
            return None;
        }
        self.layer(&decoded, depth + 1, how.with("base64"), walk)
    }

    fn decode_percent(&self, text: &[u8], depth: u8, how: How, walk: &mut Walk) -> Option<Hit> {
        let escapes = percent_escapes(text);
        // No escape: nothing to decode. Each escape shrinks 3 bytes to 1.
        let most = text.len().saturating_sub(2 * escapes);
        if escapes == 0 || most < self.shortest_match {
            return None;
        }
        if !walk.budget.take(most) {
            return None;
        }
        let decoded: Vec<u8> = percent_encoding::percent_decode(text).collect();
        let how = how.with("url-encoded");
        // Percent-decoded bytes are scanned as a value whatever they are (as before).
        if depth + 1 > MAX_DEPTH {
            self.beyond(&decoded, how, walk)
        } else {
            self.scan_at(&decoded, depth + 1, how, walk)
        }
    }

    /// The production-only host rule matching this `:authority`/`Host` value, if any.
    pub fn production_host(&self, authority: &str) -> Option<&HostRule> {
        let host = host_of(authority)?;
        self.hosts.iter().find(|rule| rule.matches(&host))
    }

    /// A production-only host named anywhere in free text (URLs, `host: x`, `x:443`), for lint.
    pub fn production_host_in_text(&self, text: &[u8]) -> Option<&HostRule> {
        if self.hosts.is_empty() {
            return None;
        }
        for name in runs(text, |b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.') {
            let Ok(name) = std::str::from_utf8(name) else { continue };
            let host = name.trim_end_matches('.').to_ascii_lowercase();
            if let Some(rule) = self.hosts.iter().find(|rule| rule.matches(&host)) {
                return Some(rule);
            }
        }
        None
    }
}

/// `Host`/`:authority` without port and trailing dot, lower-case. `None` for an empty value.
pub fn host_of(authority: &str) -> Option<String> {
    let authority = authority.trim();
    let host = if authority.starts_with('[') {
        // IPv6 literal: never a production host name.
        authority.split(']').next().unwrap_or(authority)
    } else {
        authority
            .rsplit_once(':')
            .map_or(authority, |(h, port)| if port.bytes().all(|b| b.is_ascii_digit()) { h } else { authority })
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    (!host.is_empty()).then_some(host)
}
