//! The proxy-wasm host of a core flow: [`EnvoyHost`] answers a flow's [`Host`] calls with
//! Envoy's host calls, and [`FlowContext`] is the one `HttpContext` every module runs (a single
//! filter's flow, or a chain's): it turns each callback into an [`Event`] and applies the
//! [`Step`] the flow returns.
//!
//! One `EnvoyHost` serves one callback. It reads the request headers, the request body and the
//! clock at most once per callback, whichever stage asks first (every stage of a chain shares it),
//! and forgets the headers when a flow writes one.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use firebreak_core::flow::header_cache::RequestHeaderCache;
use firebreak_core::flow::{
    BodyChunks, CallAnswer, CallId, Direction, Event, Flow, Headers, Host, HostFailed, Level, Meter, RawHeaders, ReadError,
    Response, Step,
};
use firebreak_core::remote::RedisConfig;
use firebreak_core::store::SharedStore;
use firebreak_core::Rejection;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, LogLevel, MapType};

use crate::{Counters, HostStore, BODY_SHA256_MIN_BYTES, BODY_SHA256_PROPERTY, PRINCIPAL_PROPERTY};

/// Every flow's counters in one module, by meter prefix (defined on first use per worker).
#[derive(Default)]
pub struct Meters {
    families: RefCell<HashMap<std::sync::Arc<str>, Rc<Counters>>>,
    /// Counts of passed requests not yet written to Envoy, by metric id (batched modules).
    pending: RefCell<HashMap<u32, u64>>,
    /// The family counted last (most counts of one event come from one flow): found by pointer,
    /// without hashing its prefix.
    last: RefCell<Option<(std::sync::Arc<str>, Rc<Counters>)>>,
    /// Gauge ids by meter prefix, then name (defined as `<prefix>.<name>` at configure time):
    /// found without formatting the full name.
    gauges: RefCell<HashMap<std::sync::Arc<str>, HashMap<String, u32>>>,
}

impl Meters {
    fn counters(&self, meter: &Meter) -> Rc<Counters> {
        if let Some((prefix, counters)) = self.last.borrow().as_ref() {
            if std::sync::Arc::ptr_eq(prefix, &meter.prefix) {
                return counters.clone();
            }
        }
        let known = self.families.borrow().get(&meter.prefix).cloned();
        if let Some(counters) = known {
            *self.last.borrow_mut() = Some((meter.prefix.clone(), counters.clone()));
            return counters;
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

    /// Defines the gauges `names` under `meter` (configure time).
    pub fn define_gauges(&self, meter: &Meter, names: &[String]) {
        let mut gauges = self.gauges.borrow_mut();
        let family = gauges.entry(meter.prefix.clone()).or_default();
        for name in names {
            if let Some(id) = crate::define_gauge(&format!("{}.{name}", meter.prefix)) {
                family.insert(name.clone(), id);
            }
        }
    }

    /// Sets the gauge `<meter.prefix>.<name>` (one defined at configure time; another is ignored).
    pub fn gauge(&self, meter: &Meter, name: &str, value: u64) {
        let id = self.gauges.borrow().get(&meter.prefix).and_then(|family| family.get(name)).copied();
        if let Some(id) = id {
            crate::set_gauge(id, value);
        }
    }

    /// Writes the batched counts (one host call per counter that moved).
    pub fn flush(&self) {
        let pending = std::mem::take(&mut *self.pending.borrow_mut());
        for (id, count) in pending {
            crate::add(id, count);
        }
    }
}

/// What a module's streams share: the counters, whether debug lines are written, and whether
/// passed requests are counted in the VM and written by the root's tick.
pub struct Module {
    pub meters: Meters,
    pub debug_log: bool,
    /// Counts of passed requests are kept in the VM and written by [`Meters::flush`] (the chain
    /// module's tick): no host call per request, a counter lags by at most the tick period.
    /// Refusals and failures are always counted at once.
    pub batch_passed: bool,
    /// Where the module counts and logs what is its own (a resume Envoy refused).
    pub meter: Meter,
}

impl Module {
    /// Reads Envoy's log level (once, at configure time).
    pub fn new(batch_passed: bool, meter: Meter) -> Rc<Self> {
        Rc::new(Module { meters: Meters::default(), debug_log: crate::debug_enabled(), batch_passed, meter })
    }
}

/// Envoy as a flow's host during one callback.
pub struct EnvoyHost<'a> {
    module: &'a Module,
    /// The size of the call answer being delivered.
    answer_size: usize,
    headers: RequestHeaderCache,
    body: Option<(usize, Vec<u8>)>,
    now_ms: Option<u64>,
}

fn read_request_headers() -> Result<RawHeaders, HostFailed> {
    hostcalls::get_map_bytes(MapType::HttpRequestHeaders).map_err(|_| HostFailed)
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
        if self.now_ms.is_none() {
            self.now_ms = crate::now_ms();
        }
        self.now_ms
    }

    fn request_headers(&mut self) -> Result<Rc<Headers>, ReadError> {
        self.headers.utf8(read_request_headers)
    }

    fn request_headers_lossy(&mut self) -> Result<Rc<Headers>, HostFailed> {
        self.headers.lossy(read_request_headers)
    }

    /// proxy-wasm copies the body into the VM (one chunk); the copy is kept for the callback
    /// (every stage of a chain reading the same size shares it) and lent, not copied again.
    fn with_request_body(&mut self, size: usize, visit: &mut dyn FnMut(BodyChunks<'_>)) -> Result<(), HostFailed> {
        if size == 0 {
            // Nothing to copy (a request without a body, or an empty end-of-stream frame).
            visit(BodyChunks::from(&[][..]));
            return Ok(());
        }
        let cached = matches!(&self.body, Some((asked, _)) if *asked == size);
        if !cached {
            let body = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, size)
                .map_err(|_| HostFailed)?
                .unwrap_or_default();
            self.body = Some((size, body));
        }
        if let Some((_, body)) = &self.body {
            visit(BodyChunks::from(body));
        }
        Ok(())
    }

    fn request_trailers_raw(&mut self) -> Result<RawHeaders, HostFailed> {
        hostcalls::get_map_bytes(MapType::HttpRequestTrailers).map_err(|_| HostFailed)
    }

    fn set_request_header(&mut self, name: &str, value: Option<&str>) -> Result<(), HostFailed> {
        hostcalls::set_map_value(MapType::HttpRequestHeaders, name, value).map_err(|_| HostFailed)?;
        self.headers.wrote(name, value);
        Ok(())
    }

    fn response_headers_raw(&mut self) -> Result<RawHeaders, HostFailed> {
        hostcalls::get_map_bytes(MapType::HttpResponseHeaders).map_err(|_| HostFailed)
    }

    fn response_body(&mut self, size: usize) -> Result<Vec<u8>, HostFailed> {
        Ok(hostcalls::get_buffer(BufferType::HttpResponseBody, 0, size)
            .map_err(|_| HostFailed)?
            .unwrap_or_default())
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

    /// An error when the host cannot tell (or holds something that is not UTF-8): the caller
    /// fails closed rather than take the request for one without a principal.
    fn principal(&mut self) -> Result<Option<String>, HostFailed> {
        let Some(bytes) = hostcalls::get_property(vec![PRINCIPAL_PROPERTY]).map_err(|_| HostFailed)? else {
            return Ok(None);
        };
        let principal = String::from_utf8(bytes).map_err(|_| HostFailed)?;
        Ok(Some(principal).filter(|p| !p.is_empty()))
    }

    fn set_principal(&mut self, principal: &str) -> Result<(), HostFailed> {
        hostcalls::set_property(vec![PRINCIPAL_PROPERTY], Some(principal.as_bytes())).map_err(|_| HostFailed)
    }

    /// A property that is not 64 hex digits counts as absent.
    fn body_sha256(&mut self, body_len: usize) -> Option<[u8; 32]> {
        if body_len < BODY_SHA256_MIN_BYTES {
            return None;
        }
        let bytes = hostcalls::get_property(vec![BODY_SHA256_PROPERTY]).ok()??;
        let mut digest = [0u8; 32];
        hex::decode_to_slice(bytes, &mut digest).ok()?;
        Some(digest)
    }

    /// A failed hand-over only makes a later filter hash the body itself.
    fn set_body_sha256(&mut self, digest: &[u8; 32], body_len: usize) {
        if body_len >= BODY_SHA256_MIN_BYTES {
            let _ = hostcalls::set_property(vec![BODY_SHA256_PROPERTY], Some(hex::encode(digest).as_bytes()));
        }
    }

    fn store(&self) -> &dyn SharedStore {
        &HostStore
    }

    fn call_redis(&mut self, redis: &RedisConfig, command: &[u8]) -> Result<CallId, HostFailed> {
        crate::dispatch_webdis(redis, command).map(CallId).map_err(|_| HostFailed)
    }

    /// Envoy reports a timeout or a connection failure as an answer without a `:status`.
    fn call_answer(&mut self, body_size: usize, max_bytes: usize) -> Option<CallAnswer> {
        if body_size > max_bytes {
            return None;
        }
        let status = hostcalls::get_map(MapType::HttpCallResponseHeaders)
            .ok()
            .and_then(|headers| headers.into_iter().find(|(n, _)| n == ":status"))
            .and_then(|(_, v)| v.parse::<u16>().ok());
        let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size.min(self.answer_size))
            .ok()
            .flatten()
            .unwrap_or_default();
        Some(CallAnswer { status, body })
    }

    fn count(&mut self, meter: &Meter, name: &str) {
        self.module.meters.counters(meter).increment(name);
    }

    fn count_passed(&mut self, meter: &Meter, name: &str) {
        let meters = &self.module.meters;
        if !self.module.batch_passed {
            return meters.counters(meter).increment(name);
        }
        if let Some(id) = meters.counters(meter).id(name) {
            *meters.pending.borrow_mut().entry(id).or_insert(0) += 1;
        }
    }

    fn gauge(&mut self, meter: &Meter, name: &str, value: u64) {
        self.module.meters.gauge(meter, name, value);
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
    /// The half of the stream this context stopped (a `Continue` on a call's answer resumes it).
    stopped: Option<Direction>,
}

impl FlowContext {
    pub fn new(flow: Box<dyn Flow>, module: Rc<Module>) -> Self {
        FlowContext { flow, module, stopped: None }
    }

    fn event(&mut self, event: Event, answer_size: usize) -> Action {
        let module = self.module.clone();
        let mut host =
            EnvoyHost { module: &module, answer_size, headers: RequestHeaderCache::default(), body: None, now_ms: None };
        let step = self.flow.on_event(event, &mut host);
        self.apply(step, event.direction())
    }

    /// Applies a step; `direction`: the half of the stream whose callback it answers (`None`: a
    /// call's answer or the end of the stream).
    fn apply(&mut self, step: Step, direction: Option<Direction>) -> Action {
        match step {
            Step::Continue => {
                if direction.is_some() {
                    self.stopped = None;
                } else if let Some(stopped) = self.stopped.take() {
                    let resumed = match stopped {
                        Direction::Request => hostcalls::resume_http_request(),
                        Direction::Response => hostcalls::resume_http_response(),
                    };
                    if resumed.is_err() {
                        // The stream stays stopped; Envoy's stream timeout then ends it.
                        let meter = &self.module.meter;
                        self.module.meters.counters(meter).increment("resume_failed");
                        crate::log(LogLevel::Error, &format!("firebreak {} resume_failed direction={stopped:?}", meter.plugin));
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
                let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
                if hostcalls::send_http_response(u32::from(status), headers, Some(&body)).is_err() {
                    let _ = hostcalls::reset_http_request();
                }
                Action::Pause
            }
        }
    }
}

/// Sends a rejection as a local reply (status, JSON body, headers); if Envoy cannot send it, the
/// stream is reset rather than let through.
fn send_rejection(rejection: &Rejection) {
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
