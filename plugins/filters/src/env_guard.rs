//! env-guard: in a non-production environment, refuses requests that carry a protected production
//! credential (or go to a production-only host). The flow and its decisions live in
//! `firebreak_core::envguard` (`flow.rs`); this file only reads what the flow asks for from Envoy
//! and applies the steps it returns. It works the same on an ingress and on an egress listener.

use std::rc::Rc;

use firebreak_core::envguard::flow::{configured, COUNTERS, PLUGIN};
use firebreak_core::envguard::{GuardFlow, GuardPolicy};
use firebreak_core::flow::{Event, Flow, Headers, Level, Output, Record, Request, Step, Unreadable};
use firebreak_glue::{self as glue, Counters};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

/// A fresh root context of this filter; `on_configure` reads its configuration.
pub fn root() -> Box<dyn RootContext> {
    Box::new(GuardRoot { policy: None, counters: Rc::new(Counters::new("firebreak.env_guard")) })
}

struct GuardRoot {
    policy: Option<Rc<GuardPolicy>>,
    counters: Rc<Counters>,
}

impl Context for GuardRoot {}

impl RootContext for GuardRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        self.policy = glue::load_config(PLUGIN, GuardPolicy::from_json).map(Rc::new);
        self.counters.define_all(COUNTERS);
        for (level, line) in self.policy.as_deref().map(configured).unwrap_or_default() {
            glue::log(log_level(level), &line);
        }
        self.policy.is_some()
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let policy = self.policy.clone()?;
        Some(Box::new(GuardFilter { flow: GuardFlow::new(policy), counters: self.counters.clone() }))
    }
}

struct GuardFilter {
    flow: GuardFlow,
    counters: Rc<Counters>,
}

impl Context for GuardFilter {}

impl GuardFilter {
    fn on_event(&mut self, event: Event) -> Action {
        let Output { records, step } = self.flow.on_event(event, &mut Envoy);
        for record in records {
            match record {
                Record::Count(name) => self.counters.increment(&name),
                Record::CountPassed(name) => self.counters.count_passed(name),
                Record::Log(level, line) => glue::log(log_level(level), &line),
            }
        }
        match step {
            Step::Continue => Action::Continue,
            Step::Hold => Action::Pause,
            Step::Reply(reply) => {
                glue::reject_at(log_level(reply.level), PLUGIN, &self.counters, &reply.rejection, &reply.context);
                Action::Pause
            }
        }
    }
}

impl HttpContext for GuardFilter {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.on_event(Event::RequestHeaders { end_of_stream })
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.on_event(Event::RequestBody { buffered: body_size, end_of_stream })
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        self.on_event(Event::RequestTrailers)
    }
}

/// The request as Envoy holds it, read through the glue (shared reads in the one-module chain).
struct Envoy;

impl Request for Envoy {
    fn now_ms(&mut self) -> Option<u64> {
        glue::now_ms()
    }

    fn headers(&mut self) -> Result<Headers, Unreadable> {
        glue::request_headers().map_err(|_| Unreadable)
    }

    fn body(&mut self, size: usize) -> Result<Vec<u8>, Unreadable> {
        glue::request_body(size).map_err(|_| Unreadable)
    }

    fn trailers(&mut self) -> Result<Headers, Unreadable> {
        glue::request_trailers().map_err(|_| Unreadable)
    }
}

fn log_level(level: Level) -> LogLevel {
    match level {
        Level::Info => LogLevel::Info,
        Level::Warn => LogLevel::Warn,
        Level::Error => LogLevel::Error,
    }
}
