//! env-guard: production credentials never work from a non-production environment (incident 4:
//! production push keys deployed to UAT sent a tester's "hhhhh" to real users).
//!
//! - [`config`]: the validated [`GuardPolicy`] (fingerprints, patterns, production hosts, limits).
//! - [`detect`]: the [`Detector`], the one piece of code that decides "this value is a protected
//!   credential"; shared by the filter and by `firebreak lint`.
//! - [`request`]: where in a request to look, and the [`GuardError`] -> [`crate::Rejection`] map.
//! - [`body`]: Content-Encoding parsing and bounded gzip/deflate decoding.
//! - [`flow`]: the flow of one request (when to read, hold, reply; counters and log lines).

pub mod body;
pub mod config;
pub mod detect;
pub mod flow;
pub mod request;

pub use config::{parse_fingerprint, GuardPolicy, OverLimit};
pub use detect::{Budget, Detector, Found, Hit, MAX_DEPTH};
pub use flow::GuardFlow;
pub use request::{check_body, check_headers, check_trailers, over_limit, BodyOutcome, BodyPlan, GuardError, Place};

/// Every rejection code env-guard can send (its README's table lists exactly these).
pub const CODES: &[crate::Code] = {
    use crate::Code::*;
    &[
        ProductionCredential,
        PathNotCanonical,
        ProductionHost,
        ContentEncodingNotInspectable,
        BodyNotDecodable,
        EncodingTooDeep,
        BodyTooLargeToInspect,
        RequestNotInspectable,
    ]
};

/// SHA-256 hex of the exact secret bytes: the fingerprint the configuration holds.
pub fn fingerprint(secret: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(secret))
}

#[cfg(test)]
mod detect_diff_tests;
#[cfg(test)]
mod detect_reference;
#[cfg(test)]
mod flow_tests;
#[cfg(test)]
mod tests;
