//! A filter (or the chain) exactly as its module runs it (`firebreak_glue::host::FlowContext`),
//! plus `bench_repeat` more runs of the same flow per request on [`ShadowHost`], an in-VM host
//! that answers from memory: the request's headers and body and the upstream's response as read
//! once per callback, a clock read once per callback, shared data in a `MemoryStore` per repeat
//! (kept across requests, so its tables fill as the real ones do), writes, counters and logs
//! dropped. The reads happen whatever `bench_repeat` is, so the same module with 0 and with N
//! repeats differ only by N runs of the filter's decision code in the VM: the slope is the
//! decision code's cost per request, without host calls.
//!
//! Configuration: `{"filter": "<filter>" | "firebreak_chain", "bench_repeat": N, "config": {...}}`,
//! `config` being the filter's (or the chain's) own configuration. A repeat the flow refuses is
//! counted in `bench.shadow.refused` (the benchmark expects 0: every repeat takes the accepted path).

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use firebreak_core::filters::{self, Setup, CHAIN};
use firebreak_core::flow::header_cache::RequestHeaderCache;
use firebreak_core::flow::{
    BodyChunks, CallAnswer, CallId, Event, Flow, FlowFactory, Headers, Host, HostFailed, Level, Meter, RawHeaders, ReadError,
    Step,
};
use firebreak_core::remote::RedisConfig;
use firebreak_core::store::{MemoryStore, SharedStore};
use firebreak_glue::host::{FlowContext, Module};
use firebreak_glue::{self as glue, HostStore};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};

pub fn root() -> Box<dyn RootContext> {
    Box::new(Root { state: None })
}

struct Configured {
    factory: Arc<dyn FlowFactory>,
    module: Rc<Module>,
    /// One store per repeat, kept across requests.
    stores: Rc<Vec<MemoryStore>>,
    refused_metric: Option<u32>,
}

struct Root {
    state: Option<Configured>,
}

impl Root {
    fn configure(json: &[u8]) -> Result<(Arc<dyn FlowFactory>, bool, usize), String> {
        let value: serde_json::Value = serde_json::from_slice(json).map_err(|e| e.to_string())?;
        let filter = value.get("filter").and_then(|v| v.as_str()).ok_or("filter: required")?.to_string();
        let repeat = value.get("bench_repeat").and_then(|v| v.as_u64()).unwrap_or(0);
        let repeat = usize::try_from(repeat).map_err(|e| e.to_string())?;
        let config = serde_json::to_vec(value.get("config").ok_or("config: required")?).map_err(|e| e.to_string())?;
        let entropy = glue::random_32().ok_or("no random bytes")?;
        let setup = Setup { env: &glue::env_var, store: &HostStore, entropy };
        let chain = filter == CHAIN || filter == "firebreak_chain";
        let factory: Arc<dyn FlowFactory> = if chain {
            Arc::new(filters::configure_chain(&config, &setup).map_err(|e| format!("field={} {e}", e.field))?)
        } else {
            filters::configure(&filter, &config, &setup).map_err(|e| format!("field={} {e}", e.field))?
        };
        Ok((factory, chain, repeat))
    }
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(json) = glue::plugin_configuration("bench_shadow") else { return false };
        let (factory, chain, repeat) = match Root::configure(&json) {
            Ok(configured) => configured,
            Err(error) => {
                glue::log(LogLevel::Critical, &format!("bench_shadow config_error {error}"));
                return false;
            }
        };
        // As plugins/filters/src/flow_root.rs: the chain batches its passed counts on a tick.
        if chain && glue::set_tick_period(Duration::from_secs(1)).is_err() {
            return false;
        }
        let module = Module::new(chain, factory.meter());
        for (meter, names) in factory.definitions() {
            module.meters.define(&meter, &names);
        }
        let refused_metric = hostcalls::define_metric(MetricType::Counter, "bench.shadow.refused").ok();
        glue::log(LogLevel::Info, &format!("bench_shadow configured: {repeat} repeats"));
        let stores = Rc::new((0..repeat).map(|_| MemoryStore::default()).collect());
        self.state = Some(Configured { factory, module, stores, refused_metric });
        true
    }

    fn on_tick(&mut self) {
        if let Some(state) = &self.state {
            state.module.meters.flush();
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let state = self.state.as_ref()?;
        let shadows = (0..state.stores.len())
            .map(|i| (state.factory.new_flow(), ShadowState { index: i, principal: None, body_sha256: None }))
            .collect();
        Some(Box::new(Stream {
            real: FlowContext::new(state.factory.new_flow(), state.module.clone()),
            shadows,
            stores: state.stores.clone(),
            seen: Rc::new(RefCell::new(Seen::default())),
            refused_metric: state.refused_metric,
        }))
    }
}

/// What the shadows read, as read once per callback from Envoy.
#[derive(Default)]
struct Seen {
    request_headers: RawHeaders,
    request_body: Vec<u8>,
    response_headers: RawHeaders,
    response_body: Vec<u8>,
    now_ms: Option<u64>,
}

/// What one shadow flow keeps across the callbacks of its stream.
struct ShadowState {
    index: usize,
    principal: Option<String>,
    body_sha256: Option<[u8; 32]>,
}

struct Stream {
    real: FlowContext,
    shadows: Vec<(Box<dyn Flow>, ShadowState)>,
    stores: Rc<Vec<MemoryStore>>,
    seen: Rc<RefCell<Seen>>,
    refused_metric: Option<u32>,
}

impl Stream {
    fn shadow(&mut self, event: Event) {
        let seen = self.seen.borrow();
        for (flow, state) in &mut self.shadows {
            let Some(store) = self.stores.get(state.index) else { continue };
            let mut host = ShadowHost { seen: &seen, state, store, headers: RequestHeaderCache::default() };
            let step = flow.on_event(event, &mut host);
            if matches!(step, Step::Reply(_) | Step::Respond(_)) {
                if let Some(id) = self.refused_metric {
                    let _ = hostcalls::increment_metric(id, 1);
                }
            }
        }
    }

    fn read_clock(&self) {
        self.seen.borrow_mut().now_ms = glue::now_ms();
    }
}

impl Context for Stream {
    fn on_http_call_response(&mut self, token: u32, headers: usize, body_size: usize, trailers: usize) {
        self.real.on_http_call_response(token, headers, body_size, trailers);
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, num_headers: usize, end_of_stream: bool) -> Action {
        self.seen.borrow_mut().request_headers = hostcalls::get_map_bytes(MapType::HttpRequestHeaders).unwrap_or_default();
        self.read_clock();
        let action = self.real.on_http_request_headers(num_headers, end_of_stream);
        self.shadow(Event::RequestHeaders { end_of_stream });
        action
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.seen.borrow_mut().request_body =
            hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size).ok().flatten().unwrap_or_default();
        self.read_clock();
        let action = self.real.on_http_request_body(body_size, end_of_stream);
        self.shadow(Event::RequestBody { buffered: body_size, end_of_stream });
        action
    }

    fn on_http_request_trailers(&mut self, num_trailers: usize) -> Action {
        self.real.on_http_request_trailers(num_trailers)
    }

    fn on_http_response_headers(&mut self, num_headers: usize, end_of_stream: bool) -> Action {
        self.seen.borrow_mut().response_headers = hostcalls::get_map_bytes(MapType::HttpResponseHeaders).unwrap_or_default();
        self.read_clock();
        let action = self.real.on_http_response_headers(num_headers, end_of_stream);
        self.shadow(Event::ResponseHeaders { end_of_stream });
        action
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.seen.borrow_mut().response_body =
            hostcalls::get_buffer(BufferType::HttpResponseBody, 0, body_size).ok().flatten().unwrap_or_default();
        self.read_clock();
        let action = self.real.on_http_response_body(body_size, end_of_stream);
        self.shadow(Event::ResponseBody { buffered: body_size, end_of_stream });
        action
    }

    fn on_http_response_trailers(&mut self, num_trailers: usize) -> Action {
        self.real.on_http_response_trailers(num_trailers)
    }

    fn on_log(&mut self) {
        self.real.on_log();
        self.shadow(Event::StreamEnd);
    }
}

/// A shadow flow's host during one callback: answers from [`Seen`] and its own store.
struct ShadowHost<'a> {
    seen: &'a Seen,
    state: &'a mut ShadowState,
    store: &'a MemoryStore,
    headers: RequestHeaderCache,
}

impl Host for ShadowHost<'_> {
    fn now_ms(&mut self) -> Option<u64> {
        self.seen.now_ms
    }

    fn request_headers(&mut self) -> Result<Rc<Headers>, ReadError> {
        let raw = &self.seen.request_headers;
        self.headers.utf8(|| Ok(raw.clone()))
    }

    fn request_headers_lossy(&mut self) -> Result<Rc<Headers>, HostFailed> {
        let raw = &self.seen.request_headers;
        self.headers.lossy(|| Ok(raw.clone()))
    }

    fn with_request_body(&mut self, size: usize, visit: &mut dyn FnMut(BodyChunks<'_>)) -> Result<(), HostFailed> {
        firebreak_core::flow::body::lend([self.seen.request_body.as_slice()], size, visit);
        Ok(())
    }

    fn request_trailers_raw(&mut self) -> Result<RawHeaders, HostFailed> {
        Ok(Vec::new())
    }

    fn set_request_header(&mut self, name: &str, value: Option<&str>) -> Result<(), HostFailed> {
        self.headers.wrote(name, value);
        Ok(())
    }

    fn response_headers_raw(&mut self) -> Result<RawHeaders, HostFailed> {
        Ok(self.seen.response_headers.clone())
    }

    fn response_body(&mut self, size: usize) -> Result<Vec<u8>, HostFailed> {
        Ok(self.seen.response_body.iter().take(size).copied().collect())
    }

    fn add_response_header(&mut self, _name: &str, _value: &str) -> Result<(), HostFailed> {
        Ok(())
    }

    fn response_from_upstream(&mut self) -> bool {
        true
    }

    fn source_address(&mut self) -> Option<String> {
        Some("127.0.0.1:40000".to_string())
    }

    fn principal(&mut self) -> Result<Option<String>, HostFailed> {
        Ok(self.state.principal.clone())
    }

    fn set_principal(&mut self, principal: &str) -> Result<(), HostFailed> {
        self.state.principal = Some(principal.to_string());
        Ok(())
    }

    fn body_sha256(&mut self, _body_len: usize) -> Option<[u8; 32]> {
        self.state.body_sha256
    }

    fn set_body_sha256(&mut self, digest: &[u8; 32], _body_len: usize) {
        self.state.body_sha256 = Some(*digest);
    }

    fn store(&self) -> &dyn SharedStore {
        self.store
    }

    fn call_redis(&mut self, _redis: &RedisConfig, _command: &[u8]) -> Result<CallId, HostFailed> {
        Err(HostFailed)
    }

    fn call_answer(&mut self, _body_size: usize, _max_bytes: usize) -> Option<CallAnswer> {
        None
    }

    fn count(&mut self, _meter: &Meter, _name: &str) {}

    fn count_passed(&mut self, _meter: &Meter, _name: &str) {}

    fn logs_debug(&self) -> bool {
        false
    }

    fn log(&mut self, _level: Level, _line: &str) {}
}
