//! The proxy-wasm host of a core flow: [`EnvoyHost`] answers a flow's [`Host`] calls with Envoy's
//! host calls, and [`FlowContext`] is the one `HttpContext` every filter (and the chain) runs: it
//! turns each callback into an [`Event`] and applies the [`Step`] the flow returns.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use firebreak_core::flow::{
    CallAnswer, CallId, Direction, Event, Flow, Host, HostFailed, Level, Meter, RawHeaders, Response, Step,
};
use firebreak_core::remote::RedisConfig;
use firebreak_core::store::SharedStore;
use firebreak_core::Rejection;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, LogLevel, MapType};

use crate::{Counters, HostStore};

/// Every flow's counters in one module, by meter prefix (defined on first use per worker).
#[derive(Default)]
pub struct Meters {
    families: RefCell<HashMap<Rc<str>, Rc<Counters>>>,
}

impl Meters {
    pub fn counters(&self, meter: &Meter) -> Rc<Counters> {
        if let Some(counters) = self.families.borrow().get(&meter.prefix) {
            return counters.clone();
        }
        let counters = Rc::new(Counters::new(meter.prefix.to_string()));
        self.families.borrow_mut().insert(meter.prefix.clone(), counters.clone());
        counters
    }

    /// Defines `names` under `meter` so they show (as 0) before the first event.
    pub fn define(&self, meter: &Meter, names: &[String]) {
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        self.counters(meter).define_all(&names);
    }
}

/// What a module's flows share: the counters, and whether debug lines are written.
pub struct Module {
    pub meters: Meters,
    pub debug_log: bool,
}

impl Module {
    /// Reads Envoy's log level (once, at configure time).
    pub fn new() -> Rc<Self> {
        Rc::new(Module { meters: Meters::default(), debug_log: crate::debug_enabled() })
    }
}

/// Envoy as a flow's host during one callback.
pub struct EnvoyHost<'a> {
    module: &'a Module,
    /// The size of the call answer being delivered.
    answer_size: usize,
}

fn log_level(level: Level) -> LogLevel {
    match level {
        Level::Debug => LogLevel::Debug,
        Level::Info => LogLevel::Info,
        Level::Warn => LogLevel::Warn,
        Level::Error => LogLevel::Error,
    }
}

/// One log line at a flow's level.
pub fn log_at(level: Level, line: &str) {
    crate::log(log_level(level), line);
}

impl Host for EnvoyHost<'_> {
    fn now_ms(&mut self) -> Option<u64> {
        crate::now_ms()
    }

    fn request_headers_raw(&mut self) -> Result<RawHeaders, HostFailed> {
        crate::raw_request_headers().map_err(|_| HostFailed)
    }

    fn request_body(&mut self, size: usize) -> Result<Vec<u8>, HostFailed> {
        crate::request_body(size).map_err(|_| HostFailed)
    }

    fn request_trailers_raw(&mut self) -> Result<RawHeaders, HostFailed> {
        hostcalls::get_map_bytes(MapType::HttpRequestTrailers).map_err(|_| HostFailed)
    }

    fn set_request_header(&mut self, name: &str, value: Option<&str>) -> Result<(), HostFailed> {
        crate::set_request_header(name, value).map_err(|_| HostFailed)
    }

    fn response_headers_raw(&mut self) -> Result<RawHeaders, HostFailed> {
        hostcalls::get_map_bytes(MapType::HttpResponseHeaders).map_err(|_| HostFailed)
    }

    fn response_body(&mut self, size: usize) -> Result<Vec<u8>, HostFailed> {
        crate::response_body(size).map_err(|_| HostFailed)
    }

    fn add_response_header(&mut self, name: &str, value: &str) -> Result<(), HostFailed> {
        hostcalls::add_map_value(MapType::HttpResponseHeaders, name, value).map_err(|_| HostFailed)
    }

    fn response_from_upstream(&mut self) -> bool {
        crate::property_string(&["response", "code_details"]).as_deref() == Some("via_upstream")
    }

    fn source_address(&mut self) -> Option<String> {
        crate::property_string(&["source", "address"])
    }

    fn principal(&mut self) -> Result<Option<String>, HostFailed> {
        crate::principal().map_err(|_| HostFailed)
    }

    fn set_principal(&mut self, principal: &str) -> Result<(), HostFailed> {
        crate::set_principal(principal).map_err(|_| HostFailed)
    }

    fn body_sha256(&mut self, body_len: usize) -> Option<[u8; 32]> {
        crate::verified_body_sha256(body_len)
    }

    fn set_body_sha256(&mut self, digest: &[u8; 32], body_len: usize) {
        // A failed hand-over only makes a later filter hash the body itself.
        let _ = crate::publish_body_sha256(digest, body_len);
    }

    fn store(&self) -> &dyn SharedStore {
        &HostStore
    }

    fn call_redis(&mut self, redis: &RedisConfig, command: &[u8]) -> Result<CallId, HostFailed> {
        crate::dispatch_webdis(redis, command).map(CallId).map_err(|_| HostFailed)
    }

    fn call_answer(&mut self, body_size: usize, max_bytes: usize) -> Option<CallAnswer> {
        if body_size > max_bytes {
            return None;
        }
        let (status, body) = crate::http_call_response(body_size.min(self.answer_size));
        Some(CallAnswer { status, body })
    }

    fn count(&mut self, meter: &Meter, name: &str) {
        self.module.meters.counters(meter).increment(name);
    }

    fn count_passed(&mut self, meter: &Meter, name: &str) {
        self.module.meters.counters(meter).count_passed(name);
    }

    fn logs_debug(&self) -> bool {
        self.module.debug_log
    }

    fn log(&mut self, level: Level, line: &str) {
        if level != Level::Debug || self.module.debug_log {
            log_at(level, line);
        }
    }
}

/// The `HttpContext` of one stream: feeds its flow every callback, applies the steps.
pub struct FlowContext {
    flow: Box<dyn Flow>,
    module: Rc<Module>,
    /// The half of the stream this context stopped to wait (a resume goes there).
    stopped: Option<Direction>,
}

impl FlowContext {
    pub fn new(flow: Box<dyn Flow>, module: Rc<Module>) -> Self {
        FlowContext { flow, module, stopped: None }
    }

    fn event(&mut self, event: Event, answer_size: usize) -> Action {
        let module = self.module.clone();
        let mut host = EnvoyHost { module: &module, answer_size };
        let step = self.flow.on_event(event, &mut host);
        self.apply(step, event.direction())
    }

    /// Applies a step; `direction`: the half of the stream whose callback it answers (`None`: a
    /// call's answer, which resumes what this context stopped).
    fn apply(&mut self, step: Step, direction: Option<Direction>) -> Action {
        match step {
            Step::Continue => {
                match direction {
                    Some(_) => self.stopped = None,
                    None => {
                        if let Some(stopped) = self.stopped.take() {
                            let resumed = match stopped {
                                Direction::Request => crate::resume_request(),
                                Direction::Response => crate::resume_response(),
                            };
                            if resumed.is_err() {
                                // The stream stays stopped; Envoy's stream timeout then ends it.
                                crate::log(LogLevel::Error, &format!("firebreak resume_failed direction={stopped:?}"));
                            }
                        }
                    }
                }
                Action::Continue
            }
            Step::Hold => {
                if direction.is_some() {
                    self.stopped = direction;
                }
                Action::Pause
            }
            Step::Reply(rejection) => {
                send_rejection(&rejection);
                Action::Pause
            }
            Step::Respond(Response { status, headers, body }) => {
                crate::send_response(status, &headers, &body);
                Action::Pause
            }
        }
    }
}

/// Sends a rejection as a local reply (status, JSON body, headers); if Envoy cannot send it, the
/// stream is reset rather than let through.
pub fn send_rejection(rejection: &Rejection) {
    let body = rejection.body();
    if hostcalls::send_http_response(u32::from(rejection.status), rejection.response_headers(), Some(&body)).is_err() {
        let _ = hostcalls::reset_http_request();
    }
}

impl Context for FlowContext {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _trailers: usize) {
        let _ = self.event(Event::CallAnswer { call: CallId(token), body_size }, body_size);
    }
}

impl HttpContext for FlowContext {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.event(Event::RequestHeaders { end_of_stream }, 0)
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.event(Event::RequestBody { buffered: body_size, end_of_stream }, 0)
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        self.event(Event::RequestTrailers, 0)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.event(Event::ResponseHeaders { end_of_stream }, 0)
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.event(Event::ResponseBody { buffered: body_size, end_of_stream }, 0)
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        self.event(Event::ResponseTrailers, 0)
    }

    fn on_log(&mut self) {
        let _ = self.event(Event::StreamEnd, 0);
    }
}
