//! Firebreak's filters as proxy-wasm contexts. Each filter is built as its own module
//! (`plugins/<filter>`, a three-line `main!`) and all of them can run as stages of one module
//! (`plugins/chain`, [`chain`]). Decisions live in `firebreak_core`; these files move data
//! between Envoy and the core.

pub mod amount_limit;
pub mod chain;
pub mod env_guard;
pub mod flow_root;
pub mod rate_limit;
pub mod replay_guard;
pub mod request_signature;
