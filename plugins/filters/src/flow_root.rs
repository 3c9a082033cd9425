//! The root context of a filter whose flow lives in core: configures it through
//! `firebreak_core::filters::configure` and gives every stream a [`FlowContext`] running its flow.

use std::rc::Rc;

use firebreak_core::filters::{Configure, Setup};
use firebreak_core::flow::FlowFactory;
use firebreak_core::ConfigError;
use firebreak_glue::host::{FlowContext, Module};
use firebreak_glue::{self as glue, HostStore};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

/// A fresh root context of `filter`, configured by its own `configure` (so that a separate module
/// links only its own filter); `on_configure` reads its configuration.
pub fn root(filter: &'static str, configure: Configure) -> Box<dyn RootContext> {
    Box::new(FlowRoot { filter, configure, factory: None, module: Module::new() })
}

struct FlowRoot {
    filter: &'static str,
    configure: Configure,
    factory: Option<Rc<dyn FlowFactory>>,
    module: Rc<Module>,
}

impl Context for FlowRoot {}

impl RootContext for FlowRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let filter = self.filter;
        let configure = self.configure;
        self.module = Module::new();
        self.factory = glue::load_config(filter, |json| {
            let entropy = glue::random_32()
                .ok_or_else(|| ConfigError::new("", "the host gave no random bytes for the table placement secret"))?;
            configure(json, &Setup { env: &glue::env_var, store: &HostStore, entropy })
        });
        let Some(factory) = &self.factory else { return false };
        let meter = factory.meter();
        self.module.meters.define(&meter, &factory.counters());
        for (level, line) in factory.configured() {
            glue::host::log_at(level, &line);
        }
        true
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let factory = self.factory.as_ref()?;
        Some(Box::new(FlowContext::new(factory.new_flow(), self.module.clone())))
    }
}
