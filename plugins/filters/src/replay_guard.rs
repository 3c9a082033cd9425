//! replay-guard: each money operation is forwarded exactly once (Idempotency-Key, duplicate
//! collapse, `outcome_unknown` locking). Its flow and decisions live in
//! `firebreak_core::replay` (`flow.rs`); the module runs it through [`crate::flow_root`].

use proxy_wasm::traits::RootContext;

/// A fresh root context of this filter; `on_configure` reads its configuration.
pub fn root() -> Box<dyn RootContext> {
    crate::flow_root::filter_root("replay_guard", firebreak_core::replay::flow::configure)
}
