//! The whole chain in one module: one VM per worker, one context per request, one set of
//! callbacks through V8, instead of one of each per filter. Its configuration names the stages
//! (`{"filters": [{"<filter>": {...}}, ...]}`, parsed by `firebreak_core::filters`), and the
//! stages are composed in core (`firebreak_core::flow::chain::Chain`) with Envoy's semantics for a
//! chain of filters. Stages keep their own counters (`firebreak.<filter>.*`), log lines and
//! shared-data tables, so the stats, logs and state are those of the separate modules.

use proxy_wasm::traits::RootContext;

/// A fresh root context of the chain; `on_configure` reads the chain's configuration.
pub fn root() -> Box<dyn RootContext> {
    crate::flow_root::chain_root()
}
