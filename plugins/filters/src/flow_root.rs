//! The one root context of every module: configures a filter (or, in the chain module, a chain
//! of them) through `firebreak_core::filters`, defines its counters, logs its configuration, and
//! gives every stream a [`FlowContext`] running its flow.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use firebreak_core::filters::{self, Configure, Setup, CHAIN};
use firebreak_core::flow::fill::{self, FillLevels};
use firebreak_core::flow::{FlowFactory, Meter};
use firebreak_core::ConfigError;
use firebreak_glue::host::{log_at, FlowContext, Module};
use firebreak_glue::{self as glue, HostStore};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, LogLevel};

/// How often the chain module writes the counts of passed requests to Envoy's counters
/// (refusals and failures are counted at once), and every module with local tables sweeps a few
/// of their buckets for the fill-level gauges (`core::flow::fill`).
const TICK_PERIOD: Duration = Duration::from_millis(fill::TICK_MS);

/// What a module runs.
#[derive(Clone, Copy)]
enum Runs {
    /// One filter: its name (`core::filters::FILTERS`) and its own configure function (so that
    /// its module links only that filter).
    Filter(&'static str, Configure),
    /// The chain: its configuration names the stages (configured by `configure_chain`, a
    /// function only the chain module's root names, so a filter's module does not link it).
    Chain(Configure),
}

/// A fresh root context of `filter`'s module; `on_configure` reads its configuration.
pub fn filter_root(filter: &'static str, configure: Configure) -> Box<dyn RootContext> {
    Box::new(FlowRoot { runs: Runs::Filter(filter, configure), factory: None, module: None, fill: FillLevels::default() })
}

/// A fresh root context of the chain module.
pub fn chain_root() -> Box<dyn RootContext> {
    Box::new(FlowRoot { runs: Runs::Chain(configure_chain), factory: None, module: None, fill: FillLevels::default() })
}

struct FlowRoot {
    runs: Runs,
    factory: Option<Arc<dyn FlowFactory>>,
    /// Made at configure time (it reads Envoy's log level).
    module: Option<Rc<Module>>,
    /// The sweeps of the local tables' fill levels, one step per tick.
    fill: FillLevels,
}

impl FlowRoot {
    fn plugin(&self) -> &'static str {
        match self.runs {
            Runs::Filter(filter, _) => filter,
            Runs::Chain(_) => CHAIN,
        }
    }

    fn configure(&self, json: &[u8]) -> Result<Arc<dyn FlowFactory>, ConfigError> {
        let entropy = glue::random_32()
            .ok_or_else(|| ConfigError::new("", "the host gave no random bytes for the table placement secret"))?;
        let setup = Setup { env: &glue::env_var, store: &HostStore, entropy };
        match self.runs {
            Runs::Filter(_, configure) | Runs::Chain(configure) => configure(json, &setup),
        }
    }
}

impl Context for FlowRoot {}

impl RootContext for FlowRoot {
    /// A configuration that is refused logs one line naming the field, and the plugin does not
    /// start (`false`).
    fn on_configure(&mut self, _size: usize) -> bool {
        let plugin = self.plugin();
        let chain = matches!(self.runs, Runs::Chain(_));
        self.factory = None;
        self.module = None;
        self.fill = FillLevels::default();
        let Some(json) = glue::plugin_configuration(plugin) else { return false };
        let factory = match self.configure(&json) {
            Ok(factory) => factory,
            Err(error) => {
                glue::log(LogLevel::Critical, &format!("firebreak {plugin} config_error field={} {error}", error.field));
                return false;
            }
        };
        let fill = FillLevels::new(factory.stores());
        if (chain || !fill.is_empty()) && glue::set_tick_period(TICK_PERIOD).is_err() {
            glue::log(LogLevel::Critical, &format!("firebreak {plugin} config_error cannot set the tick period"));
            return false;
        }
        let module = Module::new(chain, factory.meter());
        for (meter, names) in factory.definitions() {
            module.meters.define(&meter, &names);
        }
        for (meter, names) in fill.definitions() {
            module.meters.define_gauges(&meter, &names);
        }
        fill.set_capacities(&mut |meter: &Meter, name: &str, value: u64| module.meters.gauge(meter, name, value));
        if let Runs::Filter(filter, _) = self.runs {
            glue::log(LogLevel::Info, &format!("firebreak {filter} configured"));
        }
        for (level, line) in factory.configured() {
            log_at(level, &line);
        }
        self.factory = Some(factory);
        self.module = Some(module);
        self.fill = fill;
        true
    }

    fn on_tick(&mut self) {
        let Some(module) = &self.module else { return };
        module.meters.flush();
        if let Some(now_ms) = glue::now_ms() {
            let budget = self.fill.budget();
            let meters = &module.meters;
            self.fill
                .tick(&HostStore, now_ms, budget, &mut |meter: &Meter, name: &str, value: u64| meters.gauge(meter, name, value));
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let factory = self.factory.as_ref()?;
        let module = self.module.clone()?;
        Some(Box::new(FlowContext::new(factory.new_flow(), module)))
    }
}

/// The chain's [`Configure`]: every filter, by the sections of its configuration.
fn configure_chain(json: &[u8], setup: &Setup<'_>) -> Result<Arc<dyn FlowFactory>, ConfigError> {
    Ok(Arc::new(filters::configure_chain(json, setup)?))
}
