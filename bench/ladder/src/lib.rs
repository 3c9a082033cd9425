//! The cost ladder's modules (benchmark only; see Cargo.toml). One build per variant: a feature
//! `step1` .. `step5` makes request-signature returning early after that step ([`ladder`]); no
//! feature makes the shadow module ([`shadow`]): a filter (or the chain) as its module runs it,
//! plus N more runs of its flow per request on an in-VM host. Both are always compiled (the
//! workspace's lints check both); the feature picks the root context.

mod ladder;
mod shadow;

/// The ladder's step this build stops after; 0: the shadow module.
const STEP: u8 = if cfg!(feature = "step5") {
    5
} else if cfg!(feature = "step4") {
    4
} else if cfg!(feature = "step3") {
    3
} else if cfg!(feature = "step2") {
    2
} else if cfg!(feature = "step1") {
    1
} else {
    0
};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    if STEP == 0 {
        proxy_wasm::set_root_context(|_| shadow::root());
    } else {
        proxy_wasm::set_root_context(|_| ladder::root());
    }
}}
