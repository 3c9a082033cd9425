//! Helpers shared by the fuzz targets (docs/robustness.md): the demo chain's configuration, the
//! checks every rejection must pass, a lenient-upstream model of paths.

use std::collections::HashSet;

use firebreak_core::{Code, Rejection};

/// The demo's chain (envoy/demo.yaml): rate-limit per IP, env-guard, request-signature (every
/// unsafe method signed), rate-limit per user, replay-guard, amount-limit.
pub const DEMO_CHAIN: &str = include_str!("demo_chain.json");

/// The demo keys' secrets (demo values, README).
pub const DEMO_KEY_B64: &str = "ZGVtby1jbGllbnQtc2VjcmV0LWRvLW5vdC11c2UtaW4tcHJvZHVjdGlvbiE=";
pub const SECOND_KEY_B64: &str = "c2Vjb25kLWNsaWVudC1zZWNyZXQtZm9yLXRlc3RzLW9ubHktMzJieXRlcyE=";

/// The environment the demo's configuration reads its secrets from.
pub fn demo_env(name: &str) -> Option<String> {
    match name {
        "FIREBREAK_DEMO_KEY" => Some(DEMO_KEY_B64.to_string()),
        "FIREBREAK_SECOND_KEY" => Some(SECOND_KEY_B64.to_string()),
        _ => None,
    }
}

pub fn decode_b64(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap_or_default()
}

pub fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
}

/// Every rejection is one of the documented codes (reject.rs), with that code's status, the
/// documented JSON body and `x-firebreak-error` header.
pub fn check_rejection(rejection: &Rejection) {
    let code = rejection.kind();
    assert!(Code::ALL.contains(&code), "undocumented code {code:?}");
    assert_eq!(rejection.code, code.as_str());
    assert_eq!(rejection.status, code.status(), "status of {}", rejection.code);
    assert!((400..600).contains(&rejection.status), "a rejection is a client or server error");
    let body: serde_json::Value = serde_json::from_slice(&rejection.body()).expect("rejection body is JSON");
    assert_eq!(body["error"], rejection.code);
    assert!(body["message"].is_string());
    assert!(rejection.response_headers().contains(&("x-firebreak-error", rejection.code)));
}

/// Whether a configuration error's field is a path (`a.b[0].c`) whose first segment is a field
/// name with its indexes, or the whole document (`""` or `<configuration>`, for a document serde
/// could not read). Later segments may repeat a key the input spelled (an unknown filter or field
/// is named as written).
pub fn well_formed_field(field: &str) -> bool {
    if field.is_empty() || field == "<configuration>" {
        return true;
    }
    let first = field.split('.').next().unwrap_or("");
    let name = first.split('[').next().unwrap_or("");
    let indexes = &first[name.len()..];
    !name.is_empty()
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && indexes
            .split('[')
            .skip(1)
            .all(|i| i.strip_suffix(']').is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())))
}

/// A model of what a lenient upstream router makes of a path, written independently of
/// `core::route`: percent-decoded until stable (at most `rounds` times), `\` as `/`, cut at `?` and
/// `#`, `;params` dropped, trailing dots and spaces of each segment dropped, empty and `.`
/// segments removed, `..` resolved, lower-cased.
pub fn lenient_reading(path: &[u8], rounds: usize) -> Vec<u8> {
    let mut current = path.to_vec();
    for _ in 0..rounds {
        let next: Vec<u8> = percent_decode(&current);
        if next == current {
            break;
        }
        current = next;
    }
    let replaced: Vec<u8> = current.iter().map(|&b| if b == b'\\' { b'/' } else { b }).collect();
    let end = replaced.iter().position(|&b| b == b'?' || b == b'#').unwrap_or(replaced.len());
    let mut segments: Vec<Vec<u8>> = Vec::new();
    for segment in replaced[..end].split(|&b| b == b'/') {
        let segment = match segment.iter().position(|&b| b == b';') {
            Some(at) => &segment[..at],
            None => segment,
        };
        let segment: Vec<u8> = if segment.iter().all(|&b| b == b'.') {
            segment.to_vec()
        } else {
            let mut s = segment.to_vec();
            while matches!(s.last(), Some(b'.' | b' ' | b'\t')) {
                s.pop();
            }
            s
        };
        match segment.as_slice() {
            b"" | b"." => {}
            b".." => {
                segments.pop();
            }
            _ => segments.push(segment),
        }
    }
    let mut out = Vec::new();
    for s in segments {
        out.push(b'/');
        out.extend_from_slice(&s);
    }
    if out.is_empty() {
        out.push(b'/');
    }
    out.make_ascii_lowercase();
    out
}

/// One round of percent-decoding (invalid escapes kept).
pub fn percent_decode(input: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        if input[i] == b'%' && i + 2 < input.len() {
            if let (Some(h), Some(l)) = (hex(input[i + 1]), hex(input[i + 2])) {
                out.push(h * 16 + l);
                i += 3;
                continue;
            }
        }
        out.push(input[i]);
        i += 1;
    }
    out
}

/// The codes a filter may send, by name (the README tables).
pub fn codes_of(filter: &str) -> HashSet<&'static str> {
    let codes: &[Code] = match filter {
        "request_signature" => firebreak_core::signature::CODES,
        "replay_guard" => firebreak_core::replay::CODES,
        "rate_limit" => firebreak_core::ratelimit::CODES,
        "env_guard" => firebreak_core::envguard::CODES,
        "amount_limit" => firebreak_core::amount::CODES,
        _ => Code::ALL,
    };
    codes.iter().map(|c| c.as_str()).collect()
}
