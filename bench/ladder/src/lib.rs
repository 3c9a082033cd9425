//! The cost ladder's modules (benchmark only; see Cargo.toml): one cargo feature per variant.
//! `ladder`: request-signature returning early after step 1 to 5; `shadow`: a filter (or the
//! chain) as its module runs it, plus N more runs of its flow per request on an in-VM host.

#[cfg(not(any(
    feature = "step1",
    feature = "step2",
    feature = "step3",
    feature = "step4",
    feature = "step5",
    feature = "shadow"
)))]
compile_error!("bench-ladder: build with exactly one of the features step1 .. step5, shadow");

#[cfg(not(feature = "shadow"))]
mod ladder;
#[cfg(feature = "shadow")]
mod shadow;

#[cfg(not(feature = "shadow"))]
proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    proxy_wasm::set_root_context(|_| ladder::root());
}}

#[cfg(feature = "shadow")]
proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    proxy_wasm::set_root_context(|_| shadow::root());
}}
