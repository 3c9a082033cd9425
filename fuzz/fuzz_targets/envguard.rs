//! env-guard: detection over arbitrary headers and bodies (JSON, form, multipart, text; gzip and
//! deflate; base64, percent and quoted-printable layers).
//!
//! Properties:
//! - never panics, and every refusal is a documented env-guard code;
//! - a protected credential planted in the body, as a token of its own, is never let through as
//!   clean: raw, gzip-compressed, base64-encoded, percent-encoded or as a JSON string value,
//!   whatever the fuzzer puts around it;
//! - the same for a credential planted in a header value.
#![no_main]

use std::io::Write;

use arbitrary::Arbitrary;
use base64::Engine;
use firebreak_core::envguard::{check_body, check_headers, fingerprint, BodyOutcome, GuardPolicy};
use firebreak_fuzz::{check_rejection, codes_of};
use libfuzzer_sys::fuzz_target;

const PROD: &str = "fake-apns-prod-key-0123456789abcdef";

#[derive(Debug, Arbitrary)]
enum Plant {
    Raw,
    Gzip,
    Base64,
    Percent,
    JsonValue,
    Header,
}

#[derive(Debug, Arbitrary)]
struct Input {
    content_type: u8,
    content_encoding: Option<String>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    plant: Option<(Plant, Vec<u8>, Vec<u8>)>,
}

fn policy() -> &'static GuardPolicy {
    static POLICY: std::sync::OnceLock<GuardPolicy> = std::sync::OnceLock::new();
    POLICY.get_or_init(|| {
        let json = format!(
            r#"{{"environment":"uat","production":false,
                "protected_credentials":[{{"label":"apns-prod","sha256":"{}","length":{}}}],
                "patterns":[{{"label":"stripe-live","prefix":"sk_live_"}},{{"label":"aws-prod-key","regex":"AKIA[0-9A-Z]{{16}}"}}],
                "production_hosts":["api.push.apple.com","*.prod.example.com"],
                "max_body_bytes":65536,"max_decoded_bytes":262144,"over_limit":"block"}}"#,
            fingerprint(PROD.as_bytes()),
            PROD.len()
        );
        GuardPolicy::from_json(json.as_bytes()).expect("the fuzz policy configures")
    })
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).expect("gzip");
    encoder.finish().expect("gzip")
}

/// The fuzzer's text around the token, cut so that it cannot glue itself to the token.
fn around(bytes: &[u8]) -> Vec<u8> {
    bytes
        .iter()
        .map(|&b| if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b >= 0x80 { b' ' } else { b })
        .collect()
}

fn refused(result: Result<BodyOutcome, firebreak_core::envguard::GuardError>) -> bool {
    match result {
        Ok(BodyOutcome::Clean) => false,
        Ok(BodyOutcome::Uninspected) => false,
        Err(error) => {
            let rejection = error.rejection("uat");
            check_rejection(&rejection);
            assert!(codes_of("env_guard").contains(rejection.code), "{}", rejection.code);
            true
        }
    }
}

fuzz_target!(|input: Input| {
    let policy = policy();
    let content_type =
        ["application/json", "application/x-www-form-urlencoded", "multipart/form-data; boundary=xyz", "text/plain", ""]
            [usize::from(input.content_type) % 5];
    let mut headers = vec![
        (":method".to_string(), "POST".to_string()),
        (":path".to_string(), "/v1/push".to_string()),
        (":authority".to_string(), "uat-api.example.com".to_string()),
        ("content-type".to_string(), content_type.to_string()),
    ];
    if let Some(coding) = &input.content_encoding {
        headers.push(("content-encoding".into(), coding.clone()));
    }
    headers.extend(input.headers);

    // Arbitrary input: no panic, documented codes.
    if let Ok(plan) = check_headers(policy, &headers) {
        refused(check_body(policy, &plan, &input.body));
    } else if let Err(error) = check_headers(policy, &headers) {
        check_rejection(&error.rejection("uat"));
    }

    // A planted credential is found.
    let Some((plant, before, after)) = input.plant else { return };
    let (before, after) = (around(&before), around(&after));
    let token: Vec<u8> = match plant {
        Plant::Raw | Plant::Gzip | Plant::Header | Plant::JsonValue => PROD.as_bytes().to_vec(),
        Plant::Base64 => base64::engine::general_purpose::STANDARD.encode(PROD).into_bytes(),
        Plant::Percent => PROD.bytes().flat_map(|b| format!("%{b:02X}").into_bytes()).collect(),
    };
    let mut text = before.clone();
    text.push(b' ');
    text.extend_from_slice(&token);
    text.push(b' ');
    text.extend_from_slice(&after);
    let base = vec![
        (":method".to_string(), "POST".to_string()),
        (":path".to_string(), "/v1/push".to_string()),
        (":authority".to_string(), "uat-api.example.com".to_string()),
    ];
    match plant {
        Plant::Header => {
            let mut h = base;
            h.push(("x-note".into(), String::from_utf8_lossy(&text).into_owned()));
            assert!(check_headers(policy, &h).is_err(), "a credential in a header passed");
        }
        Plant::JsonValue => {
            let mut h = base;
            h.push(("content-type".into(), "application/json".into()));
            let doc = serde_json::json!({ "note": String::from_utf8_lossy(&before), "key": PROD, "more": String::from_utf8_lossy(&after) });
            let body = serde_json::to_vec(&doc).expect("json");
            let plan = check_headers(policy, &h).expect("clean headers");
            assert!(refused(check_body(policy, &plan, &body)), "a credential in a JSON value passed");
        }
        _ => {
            let mut h = base;
            h.push(("content-type".into(), "text/plain".into()));
            let body = if matches!(plant, Plant::Gzip) {
                h.push(("content-encoding".into(), "gzip".into()));
                gzip(&text)
            } else {
                text
            };
            let plan = check_headers(policy, &h).expect("clean headers");
            assert!(refused(check_body(policy, &plan, &body)), "a planted credential ({plant:?}) passed");
        }
    }
});
