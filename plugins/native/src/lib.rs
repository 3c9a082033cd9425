//! Firebreak's engine as an Envoy dynamic module: `libfirebreak.so`, loaded by Envoy 1.40's
//! `envoy.extensions.filters.http.dynamic_modules` filter. `filter_name: chain` runs a chain (the
//! chain module's configuration), `filter_name: <filter>` one filter (its own configuration):
//! the same flows, rejections, counters and log lines as the wasm modules.
//!
//! - [`abi`]: our bindings to the ABI (`v0.2.0`) and the exported hooks: the only `unsafe` code.
//! - [`filter`]: the native host of the engine (configuration, per-stream state, `Host`).

#[allow(unsafe_code)]
pub mod abi;
pub mod filter;
