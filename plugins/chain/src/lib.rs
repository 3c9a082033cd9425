//! Firebreak's filters in one proxy-wasm module: `{"filters": [{"<filter>": {...}}, ...]}` runs
//! the named filters in order, in one VM per worker and one context per request. The chain
//! lives in `firebreak_filters::chain`.

proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    proxy_wasm::set_root_context(|_| firebreak_filters::chain::root());
}}
