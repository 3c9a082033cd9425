//! RFC 9421 HTTP Message Signatures with `hmac-sha256`, RFC 9530 `Content-Digest`, and
//! single-use nonces.

pub mod base;
pub mod config;
pub mod digest;
pub mod fields;
pub mod flow;
pub mod sign;
pub mod verify;

pub use base::{Component, RequestView};
pub use config::{valid_key_id, SignaturePolicy};
pub use flow::SignatureFlow;
pub use sign::{sign, SignRequest, SignedHeaders};
pub use verify::{
    claim_nonce, client_principal_copies, nonce_claim_answer, nonce_claim_command, nonce_key, nonce_ttl_ms, verify_body,
    verify_headers, SigError, VerifiedHeaders,
};

/// Every rejection code request-signature can send (its README's table lists exactly these).
pub const CODES: &[crate::Code] = {
    use crate::Code::*;
    &[
        PathNotCanonical,
        HeaderDuplicated,
        PrincipalHeaderSpoofed,
        SignatureMalformed,
        SignatureParamMissing,
        SignatureParamInvalid,
        SignatureAlgorithmUnsupported,
        SignatureComponentUnsupported,
        SignatureComponentMissing,
        KeyIdInvalid,
        ContentDigestMalformed,
        SignatureMissing,
        SignatureCoverageInsufficient,
        KeyNotActive,
        SignatureStale,
        SignatureFromFuture,
        SignatureExpired,
        SignatureInvalid,
        ContentDigestMismatch,
        NonceReplayed,
        TenantQuotaExceeded,
        BodyTooLarge,
        NonceStoreFull,
        StateUnavailable,
    ]
};

#[cfg(test)]
mod flow_tests;
#[cfg(test)]
mod tests;
