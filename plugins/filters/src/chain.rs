//! The whole chain in one module: one VM per worker, one context per request, one set of
//! callbacks through V8, instead of one of each per filter. The stages are the very filters of
//! the separate modules, configured from sections of one configuration and called in order,
//! with Envoy's semantics for a chain of filters:
//!
//! - request callbacks run the stages first to last, response callbacks last to first (as Envoy
//!   runs decoder and encoder filters);
//! - the first stage that does not continue (it refused the request with a local reply, waits for
//!   more body, or waits for a callout) stops the callback there, as Envoy stops iteration;
//! - a stage waiting for a callout resumes through `glue::resume_*`, which in chain mode hands the
//!   resume to the chain: the chain runs the stages after it and resumes the stream only when all
//!   of them continue.
//!
//! Stages keep their own counters (`firebreak.<filter>.*`), log lines and shared-data tables
//! (each table has its own key prefix), so the stats, logs and state are those of the separate
//! modules.

use std::collections::HashSet;
use std::time::Duration;

use firebreak_core::ConfigError;
use firebreak_glue::{self as glue, Direction, StreamFacts};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde_json::Value;

const PLUGIN: &str = "chain";

/// How often the counts of passed requests are written to Envoy's counters (refusals and
/// failures are counted at once).
const COUNT_FLUSH_PERIOD: Duration = Duration::from_secs(1);

/// The filters a chain can hold, by the name of their configuration section.
const FILTERS: &[&str] = &["request_signature", "replay_guard", "rate_limit", "env_guard"];

/// A fresh root context of the chain; `on_configure` reads the chain's configuration.
pub fn root() -> Box<dyn RootContext> {
    glue::enter_chain_mode();
    Box::new(ChainRoot { stages: Vec::new() })
}

fn filter_root(filter: &str) -> Option<Box<dyn RootContext>> {
    match filter {
        "request_signature" => Some(crate::request_signature::root()),
        "replay_guard" => Some(crate::replay_guard::root()),
        "rate_limit" => Some(crate::rate_limit::root()),
        "env_guard" => Some(crate::env_guard::root()),
        _ => None,
    }
}

/// One configuration section: which filter, and its own configuration.
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

fn chain_error(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::new(field, message)
}

/// Splits `{"filters": [{"<filter>": {...}}, ...]}` into its sections, in order. The filters'
/// own fields are checked by each filter when it configures; this checks the shape of the chain:
/// a known filter per section, at most one of each filter but `rate_limit`, and distinct
/// rate-limit `name`s (a name names the budget table: two stages with one name would share it).
pub fn parse_sections(json: &[u8]) -> Result<Vec<StageSection>, ConfigError> {
    let value: Value = serde_json::from_slice(json).map_err(|e| chain_error("", format!("not valid JSON: {e}")))?;
    let Value::Object(top) = value else {
        return Err(chain_error("", "must be a JSON object with a `filters` list"));
    };
    if let Some(unknown) = top.keys().find(|k| k.as_str() != "filters") {
        return Err(chain_error(unknown.as_str(), "unknown field (expected only `filters`)"));
    }
    let Some(Value::Array(filters)) = top.get("filters") else {
        return Err(chain_error("filters", "required: a list of {\"<filter>\": {<its configuration>}}"));
    };
    if filters.is_empty() {
        return Err(chain_error("filters", "must name at least one filter"));
    }
    let mut seen = HashSet::new();
    let mut rate_limit_names = HashSet::new();
    let mut sections = Vec::with_capacity(filters.len());
    for (index, entry) in filters.iter().enumerate() {
        let field = format!("filters[{index}]");
        let Some((name, config)) = entry.as_object().filter(|o| o.len() == 1).and_then(|o| o.iter().next()) else {
            return Err(chain_error(field, "must be an object with exactly one key, the filter's name"));
        };
        let Some(filter) = FILTERS.iter().copied().find(|f| *f == name.as_str()) else {
            return Err(chain_error(
                format!("{field}.{name}"),
                format!("unknown filter (expected one of {})", FILTERS.join(", ")),
            ));
        };
        if filter == "rate_limit" {
            if let Some(stage_name) = config.get("name").and_then(Value::as_str) {
                if !rate_limit_names.insert(stage_name.to_string()) {
                    return Err(chain_error(
                        format!("{field}.rate_limit.name"),
                        format!("duplicate rate-limit name `{stage_name}`: each stage needs its own budget table"),
                    ));
                }
            }
        } else if !seen.insert(filter) {
            return Err(chain_error(format!("{field}.{filter}"), "this filter is already in the chain"));
        }
        let config = serde_json::to_vec(config).map_err(|e| chain_error(format!("{field}.{filter}"), e.to_string()))?;
        sections.push(StageSection { filter, config });
    }
    Ok(sections)
}

struct ChainRoot {
    stages: Vec<Box<dyn RootContext>>,
}

impl Context for ChainRoot {}

impl RootContext for ChainRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        self.stages.clear();
        let Some(bytes) = glue::plugin_configuration(PLUGIN) else { return false };
        let sections = match parse_sections(&bytes) {
            Ok(sections) => sections,
            Err(error) => {
                glue::log(
                    LogLevel::Critical,
                    &format!("firebreak {PLUGIN} config_error field={} {}", error.field, error.message),
                );
                return false;
            }
        };
        let mut names = Vec::with_capacity(sections.len());
        for (index, section) in sections.into_iter().enumerate() {
            let Some(mut stage) = filter_root(section.filter) else { return false };
            // The stage logs its own config_error, with the field under its section.
            if !glue::configure_stage(section.config, stage_section(index, section.filter), || stage.on_configure(0)) {
                self.stages.clear();
                return false;
            }
            names.push(section.filter);
            self.stages.push(stage);
        }
        // Counts of passed requests are kept in the VM and written once per tick.
        if glue::set_tick_period(COUNT_FLUSH_PERIOD).is_err() {
            glue::log(LogLevel::Critical, &format!("firebreak {PLUGIN} config_error cannot set the tick period"));
            self.stages.clear();
            return false;
        }
        glue::log(LogLevel::Info, &format!("firebreak {PLUGIN} configured stages={}", names.join(",")));
        true
    }

    fn on_tick(&mut self) {
        glue::flush_counts();
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        if self.stages.is_empty() {
            return None;
        }
        let stages = self.stages.iter().map(|root| root.create_http_context(context_id)).collect::<Option<Vec<_>>>()?;
        Some(Box::new(ChainFilter { stages, stopped: None, facts: StreamFacts::default() }))
    }
}

/// A callback of the stream, with its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    RequestHeaders { headers: usize, end_of_stream: bool },
    RequestBody { size: usize, end_of_stream: bool },
    RequestTrailers { trailers: usize },
    ResponseHeaders { headers: usize, end_of_stream: bool },
    ResponseBody { size: usize, end_of_stream: bool },
    ResponseTrailers { trailers: usize },
}

impl Phase {
    fn direction(self) -> Direction {
        match self {
            Phase::RequestHeaders { .. } | Phase::RequestBody { .. } | Phase::RequestTrailers { .. } => Direction::Request,
            _ => Direction::Response,
        }
    }

    fn call(self, stage: &mut dyn HttpContext) -> Action {
        match self {
            Phase::RequestHeaders { headers, end_of_stream } => stage.on_http_request_headers(headers, end_of_stream),
            Phase::RequestBody { size, end_of_stream } => stage.on_http_request_body(size, end_of_stream),
            Phase::RequestTrailers { trailers } => stage.on_http_request_trailers(trailers),
            Phase::ResponseHeaders { headers, end_of_stream } => stage.on_http_response_headers(headers, end_of_stream),
            Phase::ResponseBody { size, end_of_stream } => stage.on_http_response_body(size, end_of_stream),
            Phase::ResponseTrailers { trailers } => stage.on_http_response_trailers(trailers),
        }
    }
}

/// Where a callback stopped: the phase and the position (in that phase's order) of the stage
/// that did not continue.
#[derive(Debug, Clone, Copy)]
struct Stopped {
    phase: Phase,
    position: usize,
}

struct ChainFilter {
    stages: Vec<Box<dyn HttpContext>>,
    stopped: Option<Stopped>,
    /// What the stages hand each other in this stream (the verified principal, the body's
    /// SHA-256), running in glue while Envoy is in one of this stream's callbacks.
    facts: StreamFacts,
}

impl ChainFilter {
    /// Runs `f` as this stream's callback: its facts are the running ones meanwhile.
    fn in_stream<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        glue::enter_stream(std::mem::take(&mut self.facts));
        let result = f(self);
        self.facts = glue::leave_stream();
        result
    }

    /// The stage at `position` in the order of `direction` (responses run last to first).
    fn stage_index(&self, direction: Direction, position: usize) -> usize {
        match direction {
            Direction::Request => position,
            Direction::Response => self.stages.len().saturating_sub(position + 1),
        }
    }

    /// Runs `phase` on the stages from `position` on, until one does not continue.
    fn run(&mut self, phase: Phase, from: usize) -> Action {
        glue::begin_callback();
        for position in from..self.stages.len() {
            let index = self.stage_index(phase.direction(), position);
            let Some(stage) = self.stages.get_mut(index) else { break };
            let action = phase.call(stage.as_mut());
            if action != Action::Continue {
                self.stopped = Some(Stopped { phase, position });
                return action;
            }
        }
        self.stopped = None;
        Action::Continue
    }

    /// A stage that stopped a callback to wait for a callout asked to resume: the stages after
    /// it run that callback now, and the stream resumes only if they all continue.
    fn resume_after(&mut self, stage_index: usize, direction: Direction) {
        let Some(stopped) = self.stopped else {
            // Nothing of this chain is stopped: resume as the separate module would have.
            let _ = glue::resume_stream(direction);
            return;
        };
        if stopped.phase.direction() != direction || self.stage_index(direction, stopped.position) != stage_index {
            // Not the stage that holds the stream: its resume has nothing to resume.
            return;
        }
        if self.run(stopped.phase, stopped.position + 1) == Action::Continue && glue::resume_stream(direction).is_err() {
            // A failed resume leaves the stream stopped; Envoy's stream timeout then ends it.
            glue::log(LogLevel::Error, &format!("firebreak {PLUGIN} resume_failed direction={direction:?}"));
        }
    }
}

impl Context for ChainFilter {
    fn on_http_call_response(&mut self, token: u32, headers: usize, body_size: usize, trailers: usize) {
        self.in_stream(|chain| {
            // Each stage recognises its own callout tokens and ignores the others.
            let _ = glue::take_deferred_resume();
            glue::begin_callback();
            for index in 0..chain.stages.len() {
                let Some(stage) = chain.stages.get_mut(index) else { break };
                stage.on_http_call_response(token, headers, body_size, trailers);
                if let Some(direction) = glue::take_deferred_resume() {
                    chain.resume_after(index, direction);
                }
            }
        })
    }

    fn on_done(&mut self) -> bool {
        self.in_stream(|chain| {
            for stage in &mut chain.stages {
                stage.on_done();
            }
        });
        true
    }
}

impl HttpContext for ChainFilter {
    fn on_http_request_headers(&mut self, headers: usize, end_of_stream: bool) -> Action {
        self.in_stream(|chain| chain.run(Phase::RequestHeaders { headers, end_of_stream }, 0))
    }

    // Body callbacks start again from the first stage: a stage that waits for the whole body
    // stops every chunk until the last, and a stage that has let the body through continues.
    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        self.in_stream(|chain| chain.run(Phase::RequestBody { size, end_of_stream }, 0))
    }

    fn on_http_request_trailers(&mut self, trailers: usize) -> Action {
        self.in_stream(|chain| chain.run(Phase::RequestTrailers { trailers }, 0))
    }

    fn on_http_response_headers(&mut self, headers: usize, end_of_stream: bool) -> Action {
        self.in_stream(|chain| chain.run(Phase::ResponseHeaders { headers, end_of_stream }, 0))
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        self.in_stream(|chain| chain.run(Phase::ResponseBody { size, end_of_stream }, 0))
    }

    fn on_http_response_trailers(&mut self, trailers: usize) -> Action {
        self.in_stream(|chain| chain.run(Phase::ResponseTrailers { trailers }, 0))
    }

    fn on_log(&mut self) {
        self.in_stream(|chain| {
            for stage in &mut chain.stages {
                stage.on_log();
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(json: &str) -> String {
        match parse_sections(json.as_bytes()) {
            Err(error) => error.field,
            Ok(sections) => panic!("accepted {json}: {sections:?}"),
        }
    }

    #[test]
    fn sections_keep_their_order_and_their_own_configuration() {
        let sections = parse_sections(
            br#"{"filters": [{"rate_limit": {"name": "per-ip"}}, {"request_signature": {"keys": []}}, {"rate_limit": {"name": "per-user"}}]}"#,
        )
        .unwrap();
        let filters: Vec<_> = sections.iter().map(|s| s.filter).collect();
        assert_eq!(filters, ["rate_limit", "request_signature", "rate_limit"]);
        assert_eq!(sections[1].config, br#"{"keys":[]}"#);
    }

    #[test]
    fn a_wrong_chain_names_the_field() {
        assert_eq!(field_of("[]"), "");
        assert_eq!(field_of("not json"), "");
        assert_eq!(field_of(r#"{}"#), "filters");
        assert_eq!(field_of(r#"{"filters": []}"#), "filters");
        assert_eq!(field_of(r#"{"filters": {}}"#), "filters");
        assert_eq!(field_of(r#"{"filters": [], "extra": 1}"#), "extra");
        assert_eq!(field_of(r#"{"filters": [{"env_guard": {}}, 3]}"#), "filters[1]");
        assert_eq!(field_of(r#"{"filters": [{"env_guard": {}, "rate_limit": {}}]}"#), "filters[0]");
        assert_eq!(field_of(r#"{"filters": [{"waf": {}}]}"#), "filters[0].waf");
        assert_eq!(field_of(r#"{"filters": [{"env_guard": {}}, {"env_guard": {}}]}"#), "filters[1].env_guard");
        assert_eq!(
            field_of(r#"{"filters": [{"rate_limit": {"name": "a"}}, {"rate_limit": {"name": "a"}}]}"#),
            "filters[1].rate_limit.name"
        );
    }

    /// A stage's own configuration, parsed as `on_configure` parses it (the same core function),
    /// its error reported under `at` as `glue::load_config` reports it (`""`: a separate module).
    fn stage_error(at: &str, section: &StageSection) -> Option<ConfigError> {
        use firebreak_core::envguard::GuardPolicy;
        use firebreak_core::ratelimit::RateLimitPolicy;
        use firebreak_core::replay::ReplayPolicy;
        use firebreak_core::signature::SignaturePolicy;
        let json = section.config.as_slice();
        let error = match section.filter {
            "request_signature" => SignaturePolicy::from_json(json, &|_| None).err(),
            "replay_guard" => ReplayPolicy::from_json(json).err(),
            "rate_limit" => RateLimitPolicy::from_json(json).err(),
            "env_guard" => GuardPolicy::from_json(json).err(),
            other => panic!("no stage {other}"),
        };
        error.map(|e| e.under(at))
    }

    #[test]
    fn every_stage_error_is_named_by_its_full_path_in_the_chain() {
        let rule = r#"{"name":"r","routes":[{"path_prefix":"/"}],"key":"ip","requests":1,"per_seconds":1,"burst":1}"#;
        let redis =
            |failure_mode: &str| format!(r#""state":{{"backend":"redis","cluster":"webdis","failure_mode":"{failure_mode}"}}"#);
        let cases = [
            (
                r#"{"request_signature":{"routes":[{"path_prefix":"/"}],"max_age_seconds":1,"keys":[{"id":"a","secret_env":"NOPE"}]}}"#
                    .to_string(),
                "filters[0].request_signature.keys[0].secret_env",
            ),
            (
                format!(r#"{{"request_signature":{{"routes":[{{"path_prefix":"/"}}],"max_age_seconds":1,"keys":[{{"id":"a","secret_base64":"WlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlo="}}],{}}}}}"#, redis("open")),
                "filters[0].request_signature.state.failure_mode",
            ),
            (
                r#"{"replay_guard":{"routes":[{"name":"p","match":{"path_prefix":"/"},"on_uncertain":"retry"}]}}"#.to_string(),
                "filters[0].replay_guard.routes[0].on_uncertain",
            ),
            (
                r#"{"replay_guard":{"routes":[{"name":"p","match":{"path_prefix":"/"},"idempotency_key":"Required"}]}}"#.to_string(),
                "filters[0].replay_guard.routes[0].idempotency_key",
            ),
            (
                format!(r#"{{"rate_limit":{{"name":"a","rules":[{}]}}}}"#, rule.replace(r#""ip""#, r#""cookie""#)),
                "filters[0].rate_limit.rules[0].key",
            ),
            (
                format!(r#"{{"rate_limit":{{"name":"a","rules":[{}],{}}}}}"#, rule, redis("maybe")),
                "filters[0].rate_limit.state.failure_mode",
            ),
            (
                format!(r#"{{"rate_limit":{{"name":"a","rules":[{rule}],"state":{{"backend":"memcached"}}}}}}"#),
                "filters[0].rate_limit.state.backend",
            ),
            (
                format!(r#"{{"rate_limit":{{"name":"a","rules":[{rule}],"state":{{"backend":"redis"}}}}}}"#),
                "filters[0].rate_limit.state.cluster",
            ),
            (
                r#"{"env_guard":{"environment":"uat","production":false,"production_hosts":["a.example"],"over_limit":"allow"}}"#
                    .to_string(),
                "filters[0].env_guard.over_limit",
            ),
            (r#"{"rate_limit":{"name":"a","rules":[],"bogus":1}}"#.to_string(), "filters[0].rate_limit.<configuration>"),
        ];
        let valid = format!(r#"{{"rate_limit":{{"name":"first","rules":[{rule}]}}}}"#);
        for (bad, field) in cases {
            // The bad stage second, after a valid one: its index is its place in the chain.
            let chain = format!(r#"{{"filters":[{valid},{bad}]}}"#);
            let sections = parse_sections(chain.as_bytes()).unwrap();
            assert_eq!(stage_error(&stage_section(0, sections[0].filter), &sections[0]), None, "{valid}");
            let error = stage_error(&stage_section(1, sections[1].filter), &sections[1]).expect(&chain);
            assert_eq!(error.field, field.replacen("filters[0]", "filters[1]", 1), "{chain}: {error}");
            // The same section as a separate module: the stage's own path, without the section.
            let own = field.splitn(3, '.').nth(2).unwrap();
            assert_eq!(stage_error("", &sections[1]).map(|e| e.field), Some(own.to_string()), "{chain}");
        }
    }
}
