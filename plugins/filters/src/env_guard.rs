//! env-guard: in a non-production environment, refuses requests that carry a protected production
//! credential (or go to a production-only host). Its flow and decisions live in
//! `firebreak_core::envguard` (`flow.rs`); the module runs it through [`crate::flow_root`]. It
//! works the same on an ingress and on an egress listener.

use proxy_wasm::traits::RootContext;

/// A fresh root context of this filter; `on_configure` reads its configuration.
pub fn root() -> Box<dyn RootContext> {
    crate::flow_root::filter_root("env_guard", firebreak_core::envguard::flow::configure)
}
