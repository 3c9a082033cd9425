//! "Is this a protected production credential?": the one piece of code that decides it, shared by
//! the filter (every header, query parameter and body value) and by `firebreak lint` (every
//! configuration value).
//!
//! A candidate value is checked as follows; the work is linear in its length:
//! 1. the whole value, and the value trimmed of white space: SHA-256, compared with the
//!    fingerprints; prefix patterns; regex patterns are searched anywhere in it;
//! 2. its decodings, when it looks encoded: base64 (standard or URL-safe alphabet, padded or not,
//!    white space ignored) and percent-encoding; each decoding is checked again from step 1, up to
//!    [`MAX_DEPTH`] nested encodings (e.g. base64 of a percent-encoded value);
//! 3. its tokens: the value is cut at characters that never occur inside a credential (white
//!    space, quotes, brackets, `,;&?|\<>`); each token of at least [`MIN_TOKEN_LEN`] bytes is
//!    checked, as are its parts around the first `=` or `:` (`key=SECRET`, `user:SECRET`), its
//!    alphanumeric sub-tokens (`[A-Za-z0-9_-]+`, for a secret inside a URL or a sentence), and its
//!    base64/percent decodings (step 2). Every token is a disjoint slice of the value, so each
//!    byte is hashed a small constant number of times: no quadratic "every substring" search.
//!
//! Limits (documented in the README): a secret shorter than [`MIN_TOKEN_LEN`] bytes is found only
//! when it is a whole value; a secret that contains a token delimiter is found only as a whole
//! value (header, parameter, JSON string, form field), not embedded in free text.

use std::collections::HashMap;

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use sha2::{Digest, Sha256};

/// Nested encodings followed (base64 of base64, base64 of percent-encoded, ...).
pub const MAX_DEPTH: u8 = 2;
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
            && name.split('.').all(|part| {
                !part.is_empty() && part.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            });
        if !ok {
            return None;
        }
        Some(if wild { HostRule::Subdomains(name.to_string()) } else { HostRule::Exact(name.to_string()) })
    }

    /// `host`: lower-case, no port, no trailing dot.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostRule::Exact(name) => host == name,
            HostRule::Subdomains(suffix) => host
                .strip_suffix(suffix.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
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

/// The compiled detection rules.
#[derive(Debug, Clone)]
pub struct Detector {
    labels: Vec<String>,
    fingerprints: HashMap<[u8; 32], usize>,
    patterns: Vec<Pattern>,
    hosts: Vec<HostRule>,
}

/// Characters that never occur inside a credential token.
fn is_delimiter(b: u8) -> bool {
    b.is_ascii_whitespace()
        || b.is_ascii_control()
        || matches!(b, b'"' | b'\'' | b'`' | b',' | b';' | b'<' | b'>' | b'(' | b')' | b'[' | b']' | b'{' | b'}' | b'|' | b'\\' | b'&' | b'?')
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

fn is_b64(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'-' | b'_' | b'=')
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
    pub fn new(labels: Vec<String>, fingerprints: HashMap<[u8; 32], usize>, patterns: Vec<Pattern>, hosts: Vec<HostRule>) -> Self {
        Detector { labels, fingerprints, patterns, hosts }
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
        if !self.fingerprints.is_empty() {
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
    /// the module docs. `how` prefixes the decodings already applied by the caller.
    pub fn scan(&self, data: &[u8], how: &[&'static str]) -> Option<Hit> {
        let mut chain = how.to_vec();
        self.scan_at(data, 0, &mut chain)
    }

    fn scan_at(&self, data: &[u8], depth: u8, how: &mut Vec<&'static str>) -> Option<Hit> {
        if let Some(hit) = self.exact(data, how) {
            return Some(hit);
        }
        let trimmed = trim(data);
        if trimmed.len() != data.len() {
            if let Some(hit) = self.exact(trimmed, how) {
                return Some(hit);
            }
        }
        for pattern in &self.patterns {
            if let PatternMatcher::Regex(regex) = &pattern.matcher {
                if regex.is_match(data) {
                    return Some(self.hit(pattern.label, how));
                }
            }
        }
        if depth < MAX_DEPTH {
            // The whole value decoded, white space ignored (wrapped base64).
            // (line breaks only: a text of words separated by spaces is not wrapped base64)
            if trimmed.len() >= MIN_B64_LEN && trimmed.iter().all(|b| is_b64(*b) || *b == b'\n' || *b == b'\r') {
                let compact: Vec<u8> = trimmed.iter().copied().filter(|b| !b.is_ascii_whitespace()).collect();
                if let Some(hit) = self.decode_b64(&compact, depth, how) {
                    return Some(hit);
                }
            }
            if let Some(hit) = self.decode_percent(trimmed, depth, how) {
                return Some(hit);
            }
        }
        for token in runs(data, |b| !is_delimiter(b)) {
            if let Some(hit) = self.token(token, token.len() == trimmed.len(), depth, how) {
                return Some(hit);
            }
        }
        None
    }

    /// One delimiter-free token. `is_whole`: it is the whole (trimmed) value, already checked
    /// and decoded as such.
    fn token(&self, token: &[u8], is_whole: bool, depth: u8, how: &mut Vec<&'static str>) -> Option<Hit> {
        if !is_whole && token.len() >= MIN_TOKEN_LEN {
            if let Some(hit) = self.exact(token, how) {
                return Some(hit);
            }
            // "SECRET." at the end of a sentence.
            let stripped = token.strip_suffix(b".").or_else(|| token.strip_suffix(b":")).or_else(|| token.strip_suffix(b"!"));
            if let Some(stripped) = stripped {
                if let Some(hit) = self.exact(stripped, how) {
                    return Some(hit);
                }
            }
            if depth < MAX_DEPTH {
                if looks_b64(token) {
                    if let Some(hit) = self.decode_b64(token, depth, how) {
                        return Some(hit);
                    }
                }
                if let Some(hit) = self.decode_percent(token, depth, how) {
                    return Some(hit);
                }
            }
        }
        // key=SECRET, user:SECRET, and the other way round.
        for sep in [b'=', b':'] {
            if let Some(at) = token.iter().position(|b| *b == sep) {
                let (head, tail) = (token.get(..at).unwrap_or_default(), token.get(at + 1..).unwrap_or_default());
                for part in [tail, head] {
                    if part.len() >= MIN_TOKEN_LEN {
                        if let Some(hit) = self.exact(part, how) {
                            return Some(hit);
                        }
                        if depth < MAX_DEPTH && sep == b'=' && looks_b64(part) {
                            if let Some(hit) = self.decode_b64(part, depth, how) {
                                return Some(hit);
                            }
                        }
                    }
                }
            }
        }
        // Word-like sub-tokens (a secret inside a URL path, after a dot, ...).
        let mut words = runs(token, is_word).peekable();
        let single = words.peek().is_some_and(|w| w.len() == token.len());
        if !single {
            for word in words {
                if word.len() >= MIN_TOKEN_LEN {
                    if let Some(hit) = self.exact(word, how) {
                        return Some(hit);
                    }
                }
            }
        }
        None
    }

    fn decode_b64(&self, text: &[u8], depth: u8, how: &mut Vec<&'static str>) -> Option<Hit> {
        let url = text.iter().any(|b| *b == b'-' || *b == b'_');
        let std = text.iter().any(|b| *b == b'+' || *b == b'/');
        let engine = match (url, std) {
            (true, true) => return None,
            (true, false) => &B64_URL,
            (false, _) => &B64_STD,
        };
        let decoded = engine.decode(text).ok()?;
        if decoded.len() < 4 {
            return None;
        }
        how.push("base64");
        // Decoded bytes that are not text (most base64-looking words decode to noise) are only
        // checked whole: tokenising noise finds nothing and costs hashes.
        let hit = if is_text(&decoded) { self.scan_at(&decoded, depth + 1, how) } else { self.exact(&decoded, how) };
        how.pop();
        hit
    }

    fn decode_percent(&self, text: &[u8], depth: u8, how: &mut Vec<&'static str>) -> Option<Hit> {
        if !text.contains(&b'%') {
            return None;
        }
        let decoded: Vec<u8> = percent_encoding::percent_decode(text).collect();
        if decoded.len() == text.len() {
            return None;
        }
        how.push("url-encoded");
        let hit = self.scan_at(&decoded, depth + 1, how);
        how.pop();
        hit
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
        authority.rsplit_once(':').map_or(authority, |(h, port)| if port.bytes().all(|b| b.is_ascii_digit()) { h } else { authority })
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    (!host.is_empty()).then_some(host)
}
