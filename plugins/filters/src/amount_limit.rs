//! amount-limit: a budget of money per account, beneficiary or verified principal, per currency
//! per window, charged with each request's amount read exactly from its JSON body, shared by
//! every worker of an Envoy (local backend) or by every Envoy instance (Redis backend). Its flow
//! and decisions live in `firebreak_core::amount` (`flow.rs`); the module runs it through
//! [`crate::flow_root`].

use proxy_wasm::traits::RootContext;

/// A fresh root context of this filter; `on_configure` reads its configuration.
pub fn root() -> Box<dyn RootContext> {
    crate::flow_root::filter_root("amount_limit", firebreak_core::amount::flow::configure)
}
