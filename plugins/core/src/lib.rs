//! Firebreak's decision logic in plain Rust.
//!
//! Nothing here imports proxy-wasm: every decision takes the request's data and `now` as
//! arguments, so the same scenarios run natively, in the wasm module under the test host, and in
//! the wasm module inside Envoy.
#![forbid(unsafe_code)]
// Test code may also cast and slice freely (unwrap/expect/panic/indexing: clippy.toml); the
// library itself is still held to every lint by the non-test build.
#![cfg_attr(test, allow(clippy::cast_possible_truncation, clippy::string_slice, clippy::unreachable))]

pub mod amount;
pub mod config;
pub mod envguard;
pub mod filters;
#[macro_use]
pub mod flow;
pub mod headers;
pub mod mode;
pub mod quota;
pub mod ratelimit;
pub mod reject;
pub mod remote;
pub mod replay;
pub mod route;
pub mod signature;
pub mod store;

pub use mode::Mode;
pub use reject::{rejection_counter_names, would_reject_counter_names, Code, ConfigError, Rejection};
