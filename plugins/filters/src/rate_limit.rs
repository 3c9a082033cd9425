//! rate-limit: GCRA limits per client network, per verified user, or both, with one budget per
//! key shared by every worker of an Envoy (local backend) or by every Envoy instance (Redis
//! backend). Its flow and decisions live in `firebreak_core::ratelimit` (`flow.rs`); the module
//! runs it through [`crate::flow_root`].

use proxy_wasm::traits::RootContext;

/// A fresh root context of this filter; `on_configure` reads its configuration.
pub fn root() -> Box<dyn RootContext> {
    crate::flow_root::filter_root("rate_limit", firebreak_core::ratelimit::flow::configure)
}
