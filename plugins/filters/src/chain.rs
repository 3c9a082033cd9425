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

use std::time::Duration;

use firebreak_core::filters::{parse_sections, stage_section};
use firebreak_glue::{self as glue, Direction, StreamFacts};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

const PLUGIN: &str = "chain";

/// How often the counts of passed requests are written to Envoy's counters (refusals and
/// failures are counted at once).
const COUNT_FLUSH_PERIOD: Duration = Duration::from_secs(1);

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
