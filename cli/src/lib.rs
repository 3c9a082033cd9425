//! Library side of the `firebreak` command, so its pieces are testable.

pub mod sign;
