//! request-signature: `Signature`/`Signature-Input` parsing and the whole `verify_headers` +
//! `verify_body` path.
//!
//! Properties:
//! - raw headers chosen by the fuzzer never verify (nobody but the key holder can make a MAC);
//! - a request signed with the core's own `sign` verifies (when its parts are tame), and the same
//!   request tampered in any covered part (MAC bits, method, authority, path, query, a covered
//!   header, the body, the parameters of another signature) never verifies;
//! - every refusal maps to a documented request-signature code.
#![no_main]

use arbitrary::Arbitrary;
use firebreak_core::signature::{sign, verify_body, verify_headers, RequestView, SignRequest, SignaturePolicy};
use firebreak_fuzz::{check_rejection, codes_of, decode_b64, DEMO_KEY_B64};
use libfuzzer_sys::fuzz_target;

const NOW_S: u64 = 1_700_000_000;

#[derive(Debug, Arbitrary)]
enum Tamper {
    MacBit(u16),
    Method,
    Authority,
    Path,
    Query,
    Header,
    BodyByte(u16),
    OtherSignatureParams,
    None,
}

#[derive(Debug, Arbitrary)]
enum Input {
    /// Whatever the fuzzer writes in the signature headers.
    Raw { method: String, path: String, signature_input: String, signature: String, extra: Vec<(String, String)>, body: Vec<u8> },
    /// A correctly signed request, then tampered with.
    Signed { method: u8, path: String, idempotency_key: Option<String>, body: Vec<u8>, nonce: String, age_s: u16, tamper: Tamper },
}

fn policy() -> &'static SignaturePolicy {
    static POLICY: std::sync::OnceLock<SignaturePolicy> = std::sync::OnceLock::new();
    POLICY.get_or_init(|| {
        let json = format!(
            r#"{{"routes":[{{"path_prefix":"/"}}],"max_age_seconds":300,"future_skew_seconds":5,"max_body_bytes":65536,
                "covered_headers_when_present":["idempotency-key"],
                "keys":[{{"id":"demo-client","secret_base64":"{DEMO_KEY_B64}"}}]}}"#
        );
        SignaturePolicy::from_json(json.as_bytes(), &|_| None).expect("the fuzz policy configures")
    })
}

fn tame(s: &str) -> bool {
    s.bytes().all(|b| (0x21..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

/// Headers verified, then the body: Ok only if both pass. Errors are checked to be documented.
fn verifies(method: &str, authority: &str, path: &str, headers: &[(String, String)], body: &[u8]) -> bool {
    let policy = policy();
    let view = RequestView { method, scheme: "https", authority, path_and_query: path, headers };
    let codes = codes_of("request_signature");
    match verify_headers(policy, &view, NOW_S * 1000) {
        Ok(verified) => {
            let digest = view.header_values("content-digest").next();
            match verify_body(policy, &verified, digest, body) {
                Ok(()) => true,
                Err(e) => {
                    check_rejection(&e.rejection());
                    assert!(codes.contains(e.rejection().code));
                    false
                }
            }
        }
        Err(e) => {
            check_rejection(&e.rejection());
            assert!(codes.contains(e.rejection().code), "{}", e.rejection().code);
            false
        }
    }
}

fuzz_target!(|input: Input| {
    match input {
        Input::Raw { method, path, signature_input, signature, extra, body } => {
            let mut headers = extra;
            headers.push(("signature-input".into(), signature_input));
            headers.push(("signature".into(), signature));
            assert!(!verifies(&method, "api.example.com", &path, &headers, &body), "a signature the fuzzer wrote verified");
        }
        Input::Signed { method, path, idempotency_key, body, nonce, age_s, tamper } => {
            let method = ["POST", "PUT", "PATCH", "DELETE", "GET"][usize::from(method) % 5];
            let path = format!("/{}", path.trim_start_matches('/'));
            let mut headers = vec![("content-type".to_string(), "application/json".to_string())];
            if let Some(key) = &idempotency_key {
                headers.push(("idempotency-key".into(), format!("\"{key}\"")));
            }
            let extra: Vec<String> = if idempotency_key.is_some() { vec!["idempotency-key".into()] } else { vec![] };
            let secret = decode_b64(DEMO_KEY_B64);
            let created = NOW_S - u64::from(age_s % 300);
            let base = SignRequest {
                method,
                scheme: "https",
                authority: "api.example.com",
                path_and_query: &path,
                headers: &headers,
                body: &body,
                key_id: "demo-client",
                secret: &secret,
                created,
                expires: None,
                nonce: None,
                label: "sig1",
                components: None,
                extra_covered_headers: &extra,
            };
            let Ok(signed) = sign(&SignRequest { nonce: Some(&nonce), ..base.clone() }) else { return };
            let mut all = headers.clone();
            all.retain(|(n, _)| n != "content-digest");
            all.extend(signed.pairs());
            let ok = verifies(method, "api.example.com", &path, &all, &body);
            let tame_request = tame(&path)
                && !path.contains('#')
                && idempotency_key.as_deref().map_or(true, |k| tame(k) && !k.is_empty())
                && !nonce.is_empty()
                && nonce.len() <= 128
                && tame(&nonce);
            if tame_request {
                assert!(ok, "a correctly signed request did not verify");
            }
            let set = |headers: &mut Vec<(String, String)>, name: &str, value: String| {
                for (n, v) in headers.iter_mut() {
                    if n == name {
                        *v = value.clone();
                    }
                }
            };
            let (mut m, mut a, mut p, mut h, mut b) =
                (method.to_string(), "api.example.com".to_string(), path.clone(), all.clone(), body.clone());
            match tamper {
                Tamper::MacBit(bit) => {
                    let mac = signed.signature.trim_start_matches("sig1=:").trim_end_matches(':');
                    let mut bytes = decode_b64(mac);
                    let len = bytes.len().max(1);
                    if let Some(byte) = bytes.get_mut(usize::from(bit / 8) % len) {
                        *byte ^= 1 << (bit % 8);
                    }
                    use base64::Engine;
                    let forged = format!("sig1=:{}:", base64::engine::general_purpose::STANDARD.encode(bytes));
                    set(&mut h, "signature", forged);
                }
                Tamper::Method => m = if method == "POST" { "PUT".into() } else { "POST".into() },
                Tamper::Authority => a.push_str(".evil"),
                Tamper::Path => match p.find('?') {
                    Some(at) => p.insert(at, 'x'),
                    None => p.push('x'),
                },
                Tamper::Query => p.push_str(if p.contains('?') { "&x=1" } else { "?x=1" }),
                Tamper::Header => match &idempotency_key {
                    Some(key) => set(&mut h, "idempotency-key", format!("\"{key}x\"")),
                    None => h.push(("idempotency-key".into(), "\"added\"".into())),
                },
                Tamper::BodyByte(at) => {
                    if b.is_empty() {
                        b.push(0);
                    } else {
                        let len = b.len();
                        b[usize::from(at) % len] ^= 0x01;
                    }
                }
                Tamper::OtherSignatureParams => {
                    // Another signature's parameters (another nonce) with this MAC.
                    let other_nonce = format!("{nonce}-other");
                    let Ok(other) = sign(&SignRequest { nonce: Some(&other_nonce), ..base.clone() }) else { return };
                    set(&mut h, "signature-input", other.signature_input);
                }
                Tamper::None => return,
            }
            assert!(!verifies(&m, &a, &p, &h, &b), "a tampered request verified");
        }
    }
});
