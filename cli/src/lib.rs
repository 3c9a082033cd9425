//! Library side of the `firebreak` command, so its pieces are testable.

pub mod fingerprint;
pub mod lint;
pub mod sign;
