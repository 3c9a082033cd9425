//! The native host of the engine: a filter configuration (the chain, or one filter) shared by
//! every worker, and per stream a [`NativeFilter`] that turns Envoy's hooks into core events and
//! applies the steps, through [`NativeHost`] (core's `Host` on the dynamic-module ABI). No
//! decision is made here.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use firebreak_core::filters::{self, Setup, CHAIN};
use firebreak_core::flow::fill::{self, FillLevels};
use firebreak_core::flow::header_cache::RequestHeaderCache;
use firebreak_core::flow::local_reply::LocalReply;
use firebreak_core::flow::{
    BodyChunks, CallAnswer, CallId, Direction, Event, Flow, FlowFactory, Headers, Host, HostFailed, Level, Meter, RawHeaders,
    ReadError, Response, Step,
};
use firebreak_core::remote::RedisConfig;
use firebreak_core::store::{ShardedStore, SharedStore};
use firebreak_core::{Code, Rejection};

use crate::abi::{self, CalloutAnswer, ConfigEnvoy, HeaderMap, Stream};

/// The shared data of the whole process: every configuration and worker, like proxy-wasm's
/// shared data for one VM id (each table's keys carry its own prefix), and it outlives a
/// configuration reload.
fn process_store() -> &'static ShardedStore {
    static STORE: OnceLock<ShardedStore> = OnceLock::new();
    STORE.get_or_init(ShardedStore::default)
}

/// Filter-state keys, the same as the proxy-wasm properties.
const PRINCIPAL_KEY: &str = "firebreak.principal";
const BODY_SHA256_KEY: &str = "firebreak.body_sha256";

/// A configured filter (or chain) with its counters, shared by every worker.
pub struct Config {
    factory: Arc<dyn FlowFactory>,
    /// Counter ids by meter prefix, then by name (the Envoy stat is `<prefix>.<name>`), defined
    /// at configure time: an increment looks up two borrowed strings and allocates nothing. The
    /// names are ours (configured), never a client's: a fast hash (foldhash) rather than SipHash.
    counters: Counters<Counters<usize>>,
    /// The counter a name that was not defined at configure time goes to.
    uncounted: Option<usize>,
    /// Gauge ids by full name (`<prefix>.<name>`), defined at configure time.
    gauges: HashMap<String, usize>,
    /// The sweeps of the local tables' fill levels ([`fill`]). The dynamic-module ABI has no
    /// timer for an HTTP filter's configuration (its scheduler only posts to the main thread), so
    /// the end of a stream runs one sweep step when [`fill::TICK_MS`] have passed since the last
    /// (a relaxed load on every stream; the step itself runs on one worker at a time).
    fill: Mutex<FillLevels>,
    /// When the next sweep step is due (milliseconds since the epoch).
    fill_due_ms: AtomicU64,
    debug_log: bool,
    /// `FIREBREAK_NATIVE_TRACE` set in Envoy's environment: one line per hook (event, step,
    /// status; never a header or body value), for diagnosing the ABI in a new Envoy.
    trace: bool,
}

/// A map by configured name.
type Counters<V> = HashMap<String, V, foldhash::fast::RandomState>;

/// Configures the filter named `name` (`chain` for a chain) from `json`. A refused configuration
/// logs one line naming the field, and Envoy refuses the listener.
pub fn new_config(envoy: &ConfigEnvoy<'_>, name: &[u8], json: &[u8]) -> Option<Arc<Config>> {
    let name = std::str::from_utf8(name).unwrap_or("");
    let plugin = if name == CHAIN { CHAIN } else { filters::FILTERS.iter().copied().find(|f| *f == name).unwrap_or(name) };
    let mut entropy = [0u8; 32];
    let configured = if getrandom::fill(&mut entropy).is_err() {
        Err(firebreak_core::ConfigError::new("", "no random bytes for the table placement secret"))
    } else {
        let env = |variable: &str| std::env::var(variable).ok();
        let setup = Setup { env: &env, store: process_store(), entropy };
        if plugin == CHAIN {
            filters::configure_chain(json, &setup).map(|chain| Arc::new(chain) as Arc<dyn FlowFactory>)
        } else {
            filters::configure(plugin, json, &setup)
        }
    };
    let factory = match configured {
        Ok(factory) => factory,
        Err(error) => {
            abi::log(abi::LOG_CRITICAL, &format!("firebreak {plugin} config_error field={} {error}", error.field));
            return None;
        }
    };
    let mut counters: Counters<Counters<usize>> = Counters::default();
    for (meter, names) in factory.definitions() {
        let rejections = firebreak_core::rejection_counter_names();
        let ids = counters.entry(meter.prefix.to_string()).or_default();
        for name in names.into_iter().chain(rejections) {
            if let Some(id) = envoy.define_counter(&format!("{}.{name}", meter.prefix)) {
                ids.insert(name, id);
            }
        }
    }
    let uncounted = envoy.define_counter("firebreak.native.uncounted");
    let fill = FillLevels::new(factory.stores());
    let mut gauges = HashMap::new();
    for (meter, names) in fill.definitions() {
        for name in names {
            let full = format!("{}.{name}", meter.prefix);
            if let Some(id) = envoy.define_gauge(&full) {
                gauges.insert(full, id);
            }
        }
    }
    fill.set_capacities(&mut |meter: &Meter, name: &str, value: u64| {
        if let Some(id) = gauges.get(&format!("{}.{name}", meter.prefix)) {
            envoy.set_gauge(*id, value);
        }
    });
    if plugin != CHAIN {
        abi::log(abi::LOG_INFO, &format!("firebreak {plugin} configured"));
    }
    for (level, line) in factory.configured() {
        abi::log(log_level(level), &line);
    }
    let trace = std::env::var_os("FIREBREAK_NATIVE_TRACE").is_some();
    Some(Arc::new(Config {
        factory,
        counters,
        uncounted,
        gauges,
        fill: Mutex::new(fill),
        fill_due_ms: AtomicU64::new(0),
        debug_log: abi::log_enabled(abi::LOG_DEBUG),
        trace,
    }))
}

impl Config {
    /// One step of the fill-level sweep, at most once per [`fill::TICK_MS`] for the whole
    /// configuration (the worker that takes the due time runs it; the others skip it).
    fn sweep(&self, host: &mut NativeHost<'_, '_>) {
        if self.gauges.is_empty() {
            return;
        }
        let due = self.fill_due_ms.load(Ordering::Relaxed);
        let Some(now_ms) = host.now_ms() else { return };
        if now_ms < due
            || self
                .fill_due_ms
                .compare_exchange(due, now_ms.saturating_add(fill::TICK_MS), Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let Ok(mut fill) = self.fill.try_lock() else { return };
        let budget = fill.budget();
        fill.tick(process_store(), now_ms, budget, &mut |meter: &Meter, name: &str, value: u64| host.gauge(meter, name, value));
    }
}

fn log_level(level: Level) -> u32 {
    match level {
        Level::Debug => abi::LOG_DEBUG,
        Level::Info => abi::LOG_INFO,
        Level::Warn => abi::LOG_WARN,
        Level::Error => abi::LOG_ERROR,
    }
}

/// The fault-injection build only (feature `fault-injection`, see Cargo.toml): the
/// request-headers hook of a request carrying `x-firebreak-test-panic` panics.
#[cfg(feature = "fault-injection")]
#[allow(clippy::panic)]
fn inject_fault(stream: &Stream<'_>, hook: &Hook) {
    if matches!(hook, Hook::RequestHeaders { .. })
        && stream
            .headers(HeaderMap::RequestHeaders)
            .is_some_and(|headers| headers.iter().any(|(name, _)| name == "x-firebreak-test-panic"))
    {
        panic!("fault injection: x-firebreak-test-panic");
    }
}

/// A hook of one stream.
pub enum Hook {
    RequestHeaders { end_of_stream: bool },
    RequestBody { end_of_stream: bool },
    RequestTrailers,
    ResponseHeaders { end_of_stream: bool },
    ResponseBody { end_of_stream: bool },
    ResponseTrailers,
    CalloutDone(CalloutAnswer),
    StreamComplete,
}

/// What a hook returns to Envoy.
pub enum HookResult {
    Status(u32),
    Panicked,
}

/// One stream's filter.
pub struct NativeFilter {
    config: Arc<Config>,
    state: RefCell<StreamState>,
}

struct StreamState {
    flow: Box<dyn Flow>,
    /// Where the flow stopped the stream (a `Continue` on a call's answer resumes it).
    stopped: Option<Stopped>,
    /// The end of a body (or trailers) that arrived while its half's headers waited for a call.
    /// The flow gets it once the headers go on, as Envoy gives it to a wasm filter after its resume.
    deferred: Option<Deferred>,
    /// Envoy's response began (its headers reached this filter): a reply now goes straight to
    /// the client, as Envoy sends it.
    response_started: bool,
    /// The module's own local reply, waiting for the flow (a call it made while the reply
    /// crossed it) before it goes to the client.
    reply: Option<LocalReply>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stopped {
    direction: Direction,
    /// Stopped at the headers (waiting for a call), not at a body chunk.
    at_headers: bool,
}

#[derive(Debug, Clone, Copy)]
struct Deferred {
    direction: Direction,
    end_of_stream: bool,
    trailers: bool,
}

impl NativeFilter {
    pub fn new(config: &Arc<Config>) -> Self {
        let flow = config.factory.new_flow();
        NativeFilter {
            config: config.clone(),
            state: RefCell::new(StreamState { flow, stopped: None, deferred: None, response_started: false, reply: None }),
        }
    }

    pub fn on_hook(&self, stream: &Stream<'_>, hook: Hook) -> HookResult {
        #[cfg(feature = "fault-injection")]
        inject_fault(stream, &hook);
        // A hook re-entered while another runs (Envoy may call back synchronously): nothing to do.
        let Ok(mut state) = self.state.try_borrow_mut() else { return HookResult::Status(0) };
        let mut host =
            NativeHost { stream, config: &self.config, answer: None, body_hook: None, headers: RequestHeaderCache::default() };
        if state.reply.is_some() {
            // The module's own local reply waits for a call: the request is over for the flow.
            match hook {
                Hook::RequestHeaders { .. } => return HookResult::Status(abi::HEADERS_STOP_ITERATION),
                Hook::RequestBody { .. } => return HookResult::Status(abi::BODY_STOP_AND_BUFFER),
                Hook::RequestTrailers => return HookResult::Status(abi::TRAILERS_STOP),
                _ => {}
            }
        }
        if matches!(hook, Hook::ResponseHeaders { .. }) {
            state.response_started = true;
        }
        let (event, status_of): (Event, fn(&Step) -> u32) = match hook {
            Hook::RequestHeaders { end_of_stream } => (Event::RequestHeaders { end_of_stream }, headers_status),
            Hook::RequestBody { end_of_stream } => {
                if state.defer(Direction::Request, end_of_stream, false) {
                    return HookResult::Status(abi::BODY_STOP_AND_BUFFER);
                }
                host.body_hook = Some(Direction::Request);
                let buffered = stream.body_size(false, true);
                (Event::RequestBody { buffered, end_of_stream }, body_status)
            }
            Hook::RequestTrailers => {
                if state.defer(Direction::Request, true, true) {
                    return HookResult::Status(abi::TRAILERS_STOP);
                }
                (Event::RequestTrailers, trailers_status)
            }
            Hook::ResponseHeaders { end_of_stream } => (Event::ResponseHeaders { end_of_stream }, headers_status),
            Hook::ResponseBody { end_of_stream } => {
                if state.defer(Direction::Response, end_of_stream, false) {
                    return HookResult::Status(abi::BODY_STOP_AND_BUFFER);
                }
                host.body_hook = Some(Direction::Response);
                let buffered = stream.body_size(true, true);
                (Event::ResponseBody { buffered, end_of_stream }, body_status)
            }
            Hook::ResponseTrailers => {
                if state.defer(Direction::Response, true, true) {
                    return HookResult::Status(abi::TRAILERS_STOP);
                }
                (Event::ResponseTrailers, trailers_status)
            }
            Hook::CalloutDone(answer) => {
                let Ok(call) = u32::try_from(answer.id) else { return HookResult::Status(0) };
                let status = if answer.succeeded {
                    answer
                        .headers
                        .iter()
                        .find(|(name, _)| name == ":status")
                        .and_then(|(_, value)| std::str::from_utf8(value).ok()?.parse::<u16>().ok())
                } else {
                    None
                };
                let body_size = answer.body.len();
                host.answer = Some(CallAnswer { status, body: answer.body });
                (Event::CallAnswer { call: CallId(call), body_size }, |_| 0)
            }
            Hook::StreamComplete => (Event::StreamEnd, |_| 0),
        };
        let mut step = match state.reply.take() {
            // A call's answer while the module's own local reply waits for it.
            Some(mut reply) if matches!(event, Event::CallAnswer { .. }) => {
                let step = reply.run(state.flow.as_mut(), Some(event), &mut host);
                if self.config.trace {
                    abi::log(abi::LOG_INFO, &format!("firebreak native trace {event:?} (own local reply) -> {step:?}"));
                }
                if step == Step::Hold {
                    state.reply = Some(reply);
                } else {
                    drop(state);
                    send_reply(stream, &reply);
                }
                return HookResult::Status(0);
            }
            _ => state.flow.on_event(event, &mut host),
        };
        if event == Event::StreamEnd {
            self.config.sweep(&mut host);
        }
        let status = status_of(&step);
        if self.config.trace {
            abi::log(abi::LOG_INFO, &format!("firebreak native trace {event:?} -> {step:?} status={status}"));
        }
        if let (Step::Continue, None, Some(stopped)) = (&step, event.direction(), state.stopped) {
            // The flow lets the stream go on after a call: first the body (and trailers) that
            // arrived while the headers waited.
            if stopped.at_headers {
                if let Some(deferred) = state.deferred.take().filter(|d| d.direction == stopped.direction) {
                    // `stopped` stays set: a `Continue` below resumes that half.
                    step = state.deliver(&mut host, deferred);
                }
            }
        }
        match (step, event.direction()) {
            (Step::Continue, Some(_)) => state.stopped = None,
            (Step::Continue, None) => match state.stopped.take().map(|s| s.direction) {
                Some(Direction::Request) => stream.continue_decoding(),
                Some(Direction::Response) => stream.continue_encoding(),
                None => {}
            },
            (Step::Hold, Some(direction)) => {
                let at_headers = matches!(event, Event::RequestHeaders { .. } | Event::ResponseHeaders { .. });
                state.stopped = Some(Stopped { direction, at_headers });
            }
            (Step::Hold, None) => {}
            (step @ (Step::Reply(_) | Step::Respond(_)), _) => {
                let Some(mut reply) = LocalReply::of(&step) else { return HookResult::Status(status) };
                // Before any response, Envoy passes a filter's own local reply through that
                // filter's encoder side (what a wasm filter sees); Envoy 1.40 skips a dynamic
                // module's encoder hooks for it, so the flow gets it here, before it is sent.
                if !state.response_started
                    && event != Event::StreamEnd
                    && reply.run(state.flow.as_mut(), None, &mut host) == Step::Hold
                {
                    state.reply = Some(reply);
                    return HookResult::Status(status);
                }
                drop(state);
                send_reply(stream, &reply);
            }
        }
        HookResult::Status(status)
    }
}

impl StreamState {
    /// Keeps a body end (or trailers) for later when its half's headers wait for a call.
    fn defer(&mut self, direction: Direction, end_of_stream: bool, trailers: bool) -> bool {
        let waiting = self.stopped == Some(Stopped { direction, at_headers: true });
        if waiting {
            let trailers = trailers || self.deferred.is_some_and(|d| d.trailers);
            self.deferred = Some(Deferred { direction, end_of_stream, trailers });
        }
        waiting
    }

    /// The deferred body (then trailers) to the flow; its last step. A step that holds stops the
    /// stream at the body.
    fn deliver(&mut self, host: &mut NativeHost<'_, '_>, deferred: Deferred) -> Step {
        let response = deferred.direction == Direction::Response;
        let buffered = host.stream.body_size(response, false);
        let body = if response {
            Event::ResponseBody { buffered, end_of_stream: deferred.end_of_stream && !deferred.trailers }
        } else {
            Event::RequestBody { buffered, end_of_stream: deferred.end_of_stream && !deferred.trailers }
        };
        let mut step = self.flow.on_event(body, host);
        if step == Step::Continue && deferred.trailers {
            let trailers = if response { Event::ResponseTrailers } else { Event::RequestTrailers };
            step = self.flow.on_event(trailers, host);
        }
        if step == Step::Hold {
            // Still stopped (Envoy holds headers and body), now at the body.
            self.stopped = Some(Stopped { direction: deferred.direction, at_headers: false });
        }
        step
    }
}

fn headers_status(step: &Step) -> u32 {
    match step {
        Step::Continue => abi::HEADERS_CONTINUE,
        // Waiting for a call: the body still comes to this filter, which buffers it until then.
        Step::Hold => abi::HEADERS_STOP_ITERATION,
        Step::Reply(_) | Step::Respond(_) => abi::HEADERS_STOP_ITERATION,
    }
}

fn body_status(step: &Step) -> u32 {
    match step {
        Step::Continue => abi::BODY_CONTINUE,
        Step::Hold => abi::BODY_STOP_AND_BUFFER,
        Step::Reply(_) | Step::Respond(_) => abi::BODY_STOP_NO_BUFFER,
    }
}

fn trailers_status(step: &Step) -> u32 {
    match step {
        Step::Continue => abi::TRAILERS_CONTINUE,
        _ => abi::TRAILERS_STOP,
    }
}

fn send_reply(stream: &Stream<'_>, reply: &LocalReply) {
    let Response { status, headers, body } = &reply.response;
    stream.send_response(*status, headers, body, &reply.details);
}

fn send_rejection(stream: &Stream<'_>, rejection: &Rejection) {
    let headers: Vec<(String, String)> = rejection
        .response_headers()
        .into_iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect();
    stream.send_response(rejection.status, &headers, &rejection.body(), &format!("firebreak_{}", rejection.code));
}

/// After a panic in a hook: the request is refused, never let through.
pub fn fail_closed(stream: &Stream<'_>) {
    send_rejection(stream, &Rejection::new(Code::FilterFailed));
}

/// Envoy, through the dynamic-module ABI, as a flow's host during one hook.
struct NativeHost<'a, 'hook> {
    stream: &'a Stream<'hook>,
    config: &'a Config,
    /// The callout answer being delivered.
    answer: Option<CallAnswer>,
    /// Inside a body hook of this half: the hook's own chunk is part of the body.
    body_hook: Option<Direction>,
    /// The request headers, read once per hook (every stage of a chain shares the read); forgotten
    /// when a flow writes one.
    headers: RequestHeaderCache,
}

impl Host for NativeHost<'_, '_> {
    fn now_ms(&mut self) -> Option<u64> {
        let since = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
        u64::try_from(since.as_millis()).ok()
    }

    fn request_headers(&mut self) -> Result<Rc<Headers>, ReadError> {
        let stream = self.stream;
        self.headers.utf8(|| stream.headers(HeaderMap::RequestHeaders).ok_or(HostFailed))
    }

    fn request_headers_lossy(&mut self) -> Result<Rc<Headers>, HostFailed> {
        let stream = self.stream;
        self.headers.lossy(|| stream.headers(HeaderMap::RequestHeaders).ok_or(HostFailed))
    }

    /// Envoy's own slices, lent to the flow (no copy).
    fn with_request_body(&mut self, size: usize, visit: &mut dyn FnMut(BodyChunks<'_>)) -> Result<(), HostFailed> {
        let in_body_hook = self.body_hook == Some(Direction::Request);
        self.stream
            .with_body(false, in_body_hook, size, |chunks| visit(BodyChunks::new(chunks)))
            .ok_or(HostFailed)
    }

    fn request_trailers_raw(&mut self) -> Result<RawHeaders, HostFailed> {
        self.stream.headers(HeaderMap::RequestTrailers).ok_or(HostFailed)
    }

    fn set_request_header(&mut self, name: &str, value: Option<&str>) -> Result<(), HostFailed> {
        // The ABI reports removing an absent header as a failure: only a failed set counts.
        let done = self.stream.set_header(HeaderMap::RequestHeaders, name, value);
        if done || value.is_none() {
            self.headers.wrote(name, value);
            Ok(())
        } else {
            Err(HostFailed)
        }
    }

    fn response_headers_raw(&mut self) -> Result<RawHeaders, HostFailed> {
        self.stream.headers(HeaderMap::ResponseHeaders).ok_or(HostFailed)
    }

    fn response_body(&mut self, size: usize) -> Result<Vec<u8>, HostFailed> {
        Ok(self.stream.body(true, self.body_hook == Some(Direction::Response), size))
    }

    fn add_response_header(&mut self, name: &str, value: &str) -> Result<(), HostFailed> {
        self.stream.add_header(HeaderMap::ResponseHeaders, name, value).then_some(()).ok_or(HostFailed)
    }

    fn response_from_upstream(&mut self) -> bool {
        self.stream.attribute_string(abi::ATTRIBUTE_RESPONSE_CODE_DETAILS).as_deref() == Some("via_upstream")
    }

    fn source_address(&mut self) -> Option<String> {
        self.stream.attribute_string(abi::ATTRIBUTE_SOURCE_ADDRESS)
    }

    fn principal(&mut self) -> Result<Option<String>, HostFailed> {
        let Some(bytes) = self.stream.filter_state(PRINCIPAL_KEY) else { return Ok(None) };
        let principal = String::from_utf8(bytes).map_err(|_| HostFailed)?;
        Ok(Some(principal).filter(|p| !p.is_empty()))
    }

    fn set_principal(&mut self, principal: &str) -> Result<(), HostFailed> {
        self.stream.set_filter_state(PRINCIPAL_KEY, principal.as_bytes()).then_some(()).ok_or(HostFailed)
    }

    fn body_sha256(&mut self, _body_len: usize) -> Option<[u8; 32]> {
        let bytes = self.stream.filter_state(BODY_SHA256_KEY)?;
        let mut digest = [0u8; 32];
        hex::decode_to_slice(bytes, &mut digest).ok()?;
        Some(digest)
    }

    fn set_body_sha256(&mut self, digest: &[u8; 32], _body_len: usize) {
        let _ = self.stream.set_filter_state(BODY_SHA256_KEY, hex::encode(digest).as_bytes());
    }

    fn store(&self) -> &dyn SharedStore {
        process_store()
    }

    fn call_redis(&mut self, redis: &RedisConfig, command: &[u8]) -> Result<CallId, HostFailed> {
        let length = command.len().to_string();
        let headers = [
            (":method", "POST"),
            (":path", "/"),
            (":authority", redis.authority.as_str()),
            ("host", redis.authority.as_str()),
            ("content-type", "text/plain"),
            ("content-length", length.as_str()),
        ];
        let id = self
            .stream
            .callout(&redis.cluster, &headers, command, u64::from(redis.timeout_ms.get()))
            .ok_or(HostFailed)?;
        u32::try_from(id).map(CallId).map_err(|_| HostFailed)
    }

    fn call_answer(&mut self, body_size: usize, max_bytes: usize) -> Option<CallAnswer> {
        if body_size > max_bytes {
            return None;
        }
        self.answer.clone()
    }

    fn count(&mut self, meter: &Meter, name: &str) {
        let defined = self.config.counters.get(meter.prefix.as_ref()).and_then(|ids| ids.get(name));
        if let Some(id) = defined.copied().or(self.config.uncounted) {
            self.stream.increment_counter(id, 1);
        }
    }

    fn count_passed(&mut self, meter: &Meter, name: &str) {
        self.count(meter, name);
    }

    fn gauge(&mut self, meter: &Meter, name: &str, value: u64) {
        if let Some(id) = self.config.gauges.get(&format!("{}.{name}", meter.prefix)) {
            self.stream.set_gauge(*id, value);
        }
    }

    fn logs_debug(&self) -> bool {
        self.config.debug_log
    }

    fn log(&mut self, level: Level, line: &str) {
        if level != Level::Debug || self.config.debug_log {
            abi::log(log_level(level), line);
        }
    }
}
