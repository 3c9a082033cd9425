//! request-signature: rejects unsigned, forged, tampered, stale and replayed requests on the
//! configured routes before they reach the money API. Its flow and decisions live in
//! `firebreak_core::signature` (`flow.rs`); the module runs it through [`crate::flow_root`].

use proxy_wasm::traits::RootContext;

/// A fresh root context of this filter; `on_configure` reads its configuration.
pub fn root() -> Box<dyn RootContext> {
    crate::flow_root::filter_root("request_signature", firebreak_core::signature::flow::configure)
}
