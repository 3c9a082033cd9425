//! `Content-Digest` (RFC 9530).
//!
//! Properties: never panics; the digest the core computes for a body verifies that body and no
//! other; a header that vouches for a body never vouches for a different one; the SHA-256 read
//! back from a Content-Digest (replay-guard's fingerprint shortcut) is the body's SHA-256.
#![no_main]

use firebreak_core::replay::{body_sha256, body_sha256_from_content_digest};
use firebreak_core::signature::digest::{content_digest_sha256, verify_content_digest, DigestError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (String, Vec<u8>)| {
    let (header, body) = input;
    let result = verify_content_digest(&header, &body);
    if result.is_ok() {
        let mut other = body.clone();
        other.push(b'x');
        assert_eq!(verify_content_digest(&header, &other), Err(DigestError::Mismatch), "one header vouched for two bodies");
        if let Some(sha) = body_sha256_from_content_digest(&header) {
            assert_eq!(sha, body_sha256(&body), "the sha-256 member of a verified header is the body's");
        }
    }
    let ours = content_digest_sha256(&body);
    assert_eq!(verify_content_digest(&ours, &body), Ok(()));
    assert_eq!(body_sha256_from_content_digest(&ours), Some(body_sha256(&body)));
    let mut other = body;
    match other.first_mut() {
        Some(b) => *b ^= 0x80,
        None => other.push(0),
    }
    assert_eq!(verify_content_digest(&ours, &other), Err(DigestError::Mismatch));
});
