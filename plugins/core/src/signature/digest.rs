//! RFC 9530 `Content-Digest`: `sha-256` and `sha-512` over the exact body bytes.

use sfv::{BareItem, Dictionary, ListEntry, Parser};
use sha2::{Digest, Sha256, Sha512};

use crate::flow::BodyChunks;

/// Why a `Content-Digest` does not vouch for a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DigestError {
    /// Not an RFC 8941 dictionary of byte sequences, or no supported algorithm in it.
    Malformed,
    /// A supported algorithm's digest does not match the body.
    Mismatch,
}

/// Checks every supported algorithm present (unsupported ones are ignored, as RFC 9530 allows);
/// at least one supported algorithm must be present.
pub fn verify_content_digest<'b>(header_value: &str, body: impl Into<BodyChunks<'b>>) -> Result<(), DigestError> {
    let body = body.into();
    let dict: Dictionary = Parser::new(header_value).parse().map_err(|_| DigestError::Malformed)?;
    let mut checked = 0;
    for (algorithm, entry) in &dict {
        let ListEntry::Item(item) = entry else { return Err(DigestError::Malformed) };
        let BareItem::ByteSequence(expected) = &item.bare_item else { return Err(DigestError::Malformed) };
        let actual: Vec<u8> = match algorithm.as_str() {
            "sha-256" => digest_chunks::<Sha256>(body),
            "sha-512" => digest_chunks::<Sha512>(body),
            _ => continue,
        };
        // Digests are not secrets; a plain comparison is fine here.
        if actual != *expected {
            return Err(DigestError::Mismatch);
        }
        checked += 1;
    }
    if checked == 0 {
        return Err(DigestError::Malformed);
    }
    Ok(())
}

/// A body's digest, fed chunk by chunk (never copied into one buffer).
fn digest_chunks<D: Digest>(body: BodyChunks<'_>) -> Vec<u8> {
    let mut hasher = D::new();
    for chunk in body.iter() {
        hasher.update(chunk);
    }
    hasher.finalize().to_vec()
}

/// `sha-256=:<base64>:` for a body (what clients send).
pub fn content_digest_sha256(body: &[u8]) -> String {
    use base64::Engine;
    format!("sha-256=:{}:", base64::engine::general_purpose::STANDARD.encode(Sha256::digest(body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 9530 Appendix B / RFC 9421 B.2: {"hello": "world"}
    const BODY: &[u8] = br#"{"hello": "world"}"#;
    const SHA512: &str = "sha-512=:WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX+TaPm+AbwAgBWnrIiYllu7BNNyealdVLvRwEmTHWXvJwew==:";

    #[test]
    fn rfc_examples_verify() {
        assert_eq!(verify_content_digest(SHA512, BODY), Ok(()));
        assert_eq!(verify_content_digest(&content_digest_sha256(BODY), BODY), Ok(()));
        assert_eq!(verify_content_digest("sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:", BODY), Ok(()));
    }

    #[test]
    fn wrong_inputs_are_rejected() {
        assert_eq!(verify_content_digest(SHA512, b"{\"hello\": \"world!\"}"), Err(DigestError::Mismatch));
        assert_eq!(verify_content_digest("md5=:AAAA:", BODY), Err(DigestError::Malformed));
        assert_eq!(verify_content_digest("sha-256=abc", BODY), Err(DigestError::Malformed));
        assert_eq!(verify_content_digest("", BODY), Err(DigestError::Malformed));
        assert_eq!(verify_content_digest("sha-256=:%%%:", BODY), Err(DigestError::Malformed));
        // One good and one bad supported digest: mismatch.
        let both = format!("{}, sha-512=:AAAA:", content_digest_sha256(BODY));
        assert_eq!(verify_content_digest(&both, BODY), Err(DigestError::Mismatch));
    }
}
