//! The amount-limit filter as its own proxy-wasm module. The filter lives in
//! `firebreak_filters::amount_limit`; the same code also runs as a stage of the one-module chain
//! (`plugins/chain`) and as a section of the native module (`plugins/native`).

proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    proxy_wasm::set_root_context(|_| firebreak_filters::amount_limit::root());
}}
