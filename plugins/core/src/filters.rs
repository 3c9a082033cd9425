//! The filters by name: each one's configuration parsed, validated and bound into a
//! [`FlowFactory`] that makes its flow per stream; and the chain's configuration, one section per
//! stage, into one factory of [`Chain`]s. Every host configures filters through here: the
//! separate proxy-wasm modules, the chain module, the native tests.

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::Value;

use crate::flow::chain::Chain;
use crate::flow::{Flow, FlowFactory, Level, Meter};
use crate::store::SharedStore;
use crate::ConfigError;

/// The filters, by the name of their configuration section (and their module's root id).
pub const FILTERS: &[&str] = &["request_signature", "replay_guard", "rate_limit", "env_guard", "amount_limit"];

/// A kind of stream event ([`crate::flow::Event`] without its values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    RequestHeaders,
    RequestBody,
    RequestTrailers,
    ResponseHeaders,
    ResponseBody,
    ResponseTrailers,
    CallAnswer,
    StreamEnd,
}

impl EventKind {
    pub const ALL: [EventKind; 8] = [
        EventKind::RequestHeaders,
        EventKind::RequestBody,
        EventKind::RequestTrailers,
        EventKind::ResponseHeaders,
        EventKind::ResponseBody,
        EventKind::ResponseTrailers,
        EventKind::CallAnswer,
        EventKind::StreamEnd,
    ];
}

/// The events `filter`'s flow acts on (`None`: not a filter). To any other event the flow answers
/// `Continue` and does nothing, so a host may leave it undelivered: a proxy-wasm module does not
/// export those callbacks, and Envoy then never enters the VM for them. The chain acts on every
/// event (replay-guard needs them all). `filters/tests.rs` checks that every other event is
/// ignored.
pub fn events_used(filter: &str) -> Option<&'static [EventKind]> {
    use EventKind::*;
    const REQUEST: [EventKind; 3] = [RequestHeaders, RequestBody, RequestTrailers];
    match filter {
        "env_guard" => Some(&REQUEST),
        // The amount is in the body; Redis answers the decision.
        "amount_limit" => Some(&[RequestHeaders, RequestBody, RequestTrailers, CallAnswer]),
        "request_signature" => Some(&[RequestHeaders, RequestBody, RequestTrailers, CallAnswer]),
        // The RateLimit headers go on the response.
        "rate_limit" => Some(&[RequestHeaders, RequestBody, RequestTrailers, ResponseHeaders, CallAnswer]),
        "replay_guard" | CHAIN => Some(&EventKind::ALL),
        _ => None,
    }
}

/// What a filter's configuration may need besides its JSON.
pub struct Setup<'a> {
    /// Environment variables given to the plugin (keys from `secret_env`).
    pub env: &'a dyn Fn(&str) -> Option<String>,
    /// The plugin's shared data (its tables are bound at configure time).
    pub store: &'a dyn SharedStore,
    /// 32 random bytes: a new table's placement secret.
    pub entropy: [u8; 32],
}

/// A filter's own configure function (each filter's module has one: a separate module links only
/// its own filter).
pub type Configure = fn(&[u8], &Setup<'_>) -> Result<Arc<dyn FlowFactory>, ConfigError>;

/// Configures `filter` from its JSON configuration. An error names the field, from the filter's
/// own configuration down (the chain puts its section in front, [`ConfigError::under`]).
pub fn configure(filter: &str, json: &[u8], setup: &Setup<'_>) -> Result<Arc<dyn FlowFactory>, ConfigError> {
    match filter {
        "env_guard" => crate::envguard::flow::configure(json, setup),
        "amount_limit" => crate::amount::flow::configure(json, setup),
        "rate_limit" => crate::ratelimit::flow::configure(json, setup),
        "request_signature" => crate::signature::flow::configure(json, setup),
        "replay_guard" => crate::replay::flow::configure(json, setup),
        other => Err(ConfigError::new("", format!("unknown filter `{other}` (expected one of {})", FILTERS.join(", ")))),
    }
}

/// One section of a chain's configuration: which filter, and its own configuration.
#[derive(Debug, PartialEq)]
pub struct StageSection {
    pub filter: &'static str,
    pub config: Vec<u8>,
}

/// Where stage `index`'s section sits in the chain's configuration: `filters[<index>].<filter>`.
/// A stage's own configuration errors are reported under it ([`ConfigError::under`]), so the
/// chain and the filters share one error type and every field is named by its full path.
pub fn stage_section(index: usize, filter: &str) -> String {
    format!("filters[{index}].{filter}")
}

/// Splits `{"filters": [{"<filter>": {...}}, ...]}` into its sections, in order. The filters'
/// own fields are checked by each filter when it configures; this checks the shape of the chain:
/// a known filter per section, at most one of each filter but `rate_limit`, and distinct
/// rate-limit `name`s (a name names the budget table: two stages with one name would share it).
pub fn parse_sections(json: &[u8]) -> Result<Vec<StageSection>, ConfigError> {
    let value: Value = serde_json::from_slice(json).map_err(|e| ConfigError::new("", format!("not valid JSON: {e}")))?;
    let Value::Object(top) = value else {
        return Err(ConfigError::new("", "must be a JSON object with a `filters` list"));
    };
    if let Some(unknown) = top.keys().find(|k| k.as_str() != "filters") {
        return Err(ConfigError::new(unknown.as_str(), "unknown field (expected only `filters`)"));
    }
    let Some(Value::Array(filters)) = top.get("filters") else {
        return Err(ConfigError::new("filters", "required: a list of {\"<filter>\": {<its configuration>}}"));
    };
    if filters.is_empty() {
        return Err(ConfigError::new("filters", "must name at least one filter"));
    }
    let mut seen = HashSet::new();
    let mut rate_limit_names = HashSet::new();
    let mut sections = Vec::with_capacity(filters.len());
    for (index, entry) in filters.iter().enumerate() {
        let field = format!("filters[{index}]");
        let Some((name, config)) = entry.as_object().filter(|o| o.len() == 1).and_then(|o| o.iter().next()) else {
            return Err(ConfigError::new(field, "must be an object with exactly one key, the filter's name"));
        };
        let Some(filter) = FILTERS.iter().copied().find(|f| *f == name.as_str()) else {
            return Err(ConfigError::new(
                format!("{field}.{name}"),
                format!("unknown filter (expected one of {})", FILTERS.join(", ")),
            ));
        };
        if filter == "rate_limit" {
            if let Some(stage_name) = config.get("name").and_then(Value::as_str) {
                if !rate_limit_names.insert(stage_name.to_string()) {
                    return Err(ConfigError::new(
                        format!("{field}.rate_limit.name"),
                        format!("duplicate rate-limit name `{stage_name}`: each stage needs its own budget table"),
                    ));
                }
            }
        } else if !seen.insert(filter) {
            return Err(ConfigError::new(format!("{field}.{filter}"), "this filter is already in the chain"));
        }
        let config = serde_json::to_vec(config).map_err(|e| ConfigError::new(format!("{field}.{filter}"), e.to_string()))?;
        sections.push(StageSection { filter, config });
    }
    Ok(sections)
}

/// Configures a chain: each section as its filter, errors named under the section.
pub fn configure_chain(json: &[u8], setup: &Setup<'_>) -> Result<ChainFactory, ConfigError> {
    let sections = parse_sections(json)?;
    let mut stages = Vec::with_capacity(sections.len());
    for (index, section) in sections.iter().enumerate() {
        let stage =
            configure(section.filter, &section.config, setup).map_err(|e| e.under(&stage_section(index, section.filter)))?;
        stages.push((section.filter, stage));
    }
    Ok(ChainFactory { stages })
}

/// A configured chain: one flow per stage per stream, composed by [`Chain`].
pub struct ChainFactory {
    stages: Vec<(&'static str, Arc<dyn FlowFactory>)>,
}

/// The chain's own log lines.
pub const CHAIN: &str = "chain";

impl FlowFactory for ChainFactory {
    fn new_flow(&self) -> Box<dyn Flow> {
        Box::new(Chain::new(self.stages.iter().map(|(_, stage)| stage.new_flow()).collect()))
    }

    fn meter(&self) -> Meter {
        Meter::new(CHAIN, "firebreak.chain")
    }

    fn counters(&self) -> Vec<String> {
        Vec::new()
    }

    fn configured(&self) -> Vec<(Level, String)> {
        let mut lines = Vec::new();
        for (filter, stage) in &self.stages {
            lines.push((Level::Info, format!("firebreak {filter} configured")));
            lines.extend(stage.configured());
        }
        let names: Vec<&str> = self.stages.iter().map(|(filter, _)| *filter).collect();
        lines.push((Level::Info, format!("firebreak {CHAIN} configured stages={}", names.join(","))));
        lines
    }

    fn definitions(&self) -> Vec<(Meter, Vec<String>)> {
        self.stages.iter().flat_map(|(_, stage)| stage.definitions()).collect()
    }

    fn stores(&self) -> Vec<crate::flow::fill::StoreTable> {
        self.stages.iter().flat_map(|(_, stage)| stage.stores()).collect()
    }
}

#[cfg(test)]
mod tests;
