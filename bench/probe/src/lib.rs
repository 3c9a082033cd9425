//! The host-call probe: `n` host calls of one `call` kind per request, made in the request-headers
//! callback, then `Continue`. Configuration (JSON): `{"call": "<kind>", "n": <calls per request>}`;
//! `n: 0` (or no configuration) makes no call at all. Benchmark code: a call's failure is ignored
//! (the benchmark checks that every request is answered 2xx).
//!
//! Kinds, by the proxy-wasm ABI function they exercise:
//! - `header_map`: `proxy_get_header_map_pairs` (the whole request header map)
//! - `header`: `proxy_get_header_map_value` (one request header, `x-bench-client`)
//! - `set_header`: `proxy_replace_header_map_value` (one request header)
//! - `shared_get_warm`: `proxy_get_shared_data` of one key, the same every call (a bucket in cache)
//! - `shared_get_cold`: `proxy_get_shared_data` of a different key each call, spread over
//!   [`COLD_KEYS`] keys (a table's bucket, as a nonce or an idempotency key lands on)
//! - `shared_set`: `proxy_set_shared_data` of a different key each call (no CAS)
//! - `counter`: `proxy_increment_metric`
//! - `clock`: `proxy_get_current_time_nanoseconds`
//! - `log_filtered`: `proxy_log` at debug, below Envoy's log level (filtered out by the host)
//! - `get_property`: `proxy_get_property` (`source.address`)
//! - `set_property`: `proxy_set_property` (a filter-state value)
//! - `buffer`: `proxy_get_buffer_bytes` of the response body, in the response-body callback (the
//!   bench upstream answers 11 bytes)
//!
//! Shared-data values are [`VALUE_BYTES`] bytes, about a 16-slot bucket of the Firebreak tables.

use std::cell::Cell;
use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};

/// Keys of the cold shared-data table (written once at configure time).
const COLD_KEYS: u32 = 16384;
/// Bytes of each shared-data value.
const VALUE_BYTES: usize = 512;
/// Stride through the cold keys: consecutive calls land far apart.
const STRIDE: u32 = 7919;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { probe: Rc::new(Probe::default()) }) });
}}

#[derive(Clone, Copy, Default, PartialEq, Eq)]
enum Call {
    #[default]
    None,
    HeaderMap,
    Header,
    SetHeader,
    SharedGetWarm,
    SharedGetCold,
    SharedSet,
    Counter,
    Clock,
    LogFiltered,
    GetProperty,
    SetProperty,
    Buffer,
}

impl Call {
    fn parse(name: &str) -> Option<Call> {
        Some(match name {
            "none" => Call::None,
            "header_map" => Call::HeaderMap,
            "header" => Call::Header,
            "set_header" => Call::SetHeader,
            "shared_get_warm" => Call::SharedGetWarm,
            "shared_get_cold" => Call::SharedGetCold,
            "shared_set" => Call::SharedSet,
            "counter" => Call::Counter,
            "clock" => Call::Clock,
            "log_filtered" => Call::LogFiltered,
            "get_property" => Call::GetProperty,
            "set_property" => Call::SetProperty,
            "buffer" => Call::Buffer,
            _ => return None,
        })
    }
}

#[derive(Default)]
struct Probe {
    call: Cell<Call>,
    n: Cell<u32>,
    metric: Cell<u32>,
    /// The next cold key (moves by [`STRIDE`] every call).
    next: Cell<u32>,
}

impl Probe {
    fn cold_key(&self) -> String {
        let i = self.next.get();
        self.next.set((i + STRIDE) % COLD_KEYS);
        format!("probe:cold:{i}")
    }

    /// The calls of the response-body callback.
    fn run_response_body(&self, size: usize) {
        if self.call.get() == Call::Buffer {
            for _ in 0..self.n.get() {
                let _ = hostcalls::get_buffer(BufferType::HttpResponseBody, 0, size);
            }
        }
    }

    /// The calls of the request-headers callback.
    fn run(&self) {
        let value = [0x5au8; VALUE_BYTES];
        for _ in 0..self.n.get() {
            match self.call.get() {
                Call::None | Call::Buffer => return,
                Call::HeaderMap => {
                    let _ = hostcalls::get_map_bytes(MapType::HttpRequestHeaders);
                }
                Call::Header => {
                    let _ = hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, "x-bench-client");
                }
                Call::SetHeader => {
                    let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, "x-bench-probe", Some("c0001"));
                }
                Call::SharedGetWarm => {
                    let _ = hostcalls::get_shared_data("probe:warm");
                }
                Call::SharedGetCold => {
                    let _ = hostcalls::get_shared_data(&self.cold_key());
                }
                Call::SharedSet => {
                    let _ = hostcalls::set_shared_data(&self.cold_key(), Some(&value), None);
                }
                Call::Counter => {
                    let _ = hostcalls::increment_metric(self.metric.get(), 1);
                }
                Call::Clock => {
                    let _ = hostcalls::get_current_time();
                }
                Call::LogFiltered => {
                    let _ = hostcalls::log(LogLevel::Debug, "bench probe: a line below the log level");
                }
                Call::GetProperty => {
                    let _ = hostcalls::get_property(vec!["source", "address"]);
                }
                Call::SetProperty => {
                    let _ = hostcalls::set_property(vec!["bench.probe"], Some(b"c0001"));
                }
            }
        }
    }
}

struct Root {
    probe: Rc<Probe>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        let (call, n) = if config.is_empty() {
            (Call::None, 0)
        } else {
            let Ok(json) = serde_json::from_slice::<serde_json::Value>(&config) else { return false };
            let Some(call) = Call::parse(json.get("call").and_then(|v| v.as_str()).unwrap_or("none")) else { return false };
            (call, u32::try_from(json.get("n").and_then(|v| v.as_u64()).unwrap_or(0)).unwrap_or(0))
        };
        self.probe.call.set(call);
        self.probe.n.set(n);
        if call == Call::Counter {
            match hostcalls::define_metric(MetricType::Counter, "bench.probe.calls") {
                Ok(id) => self.probe.metric.set(id),
                Err(_) => return false,
            }
        }
        let value = [0x5au8; VALUE_BYTES];
        if matches!(call, Call::SharedGetWarm) {
            let _ = hostcalls::set_shared_data("probe:warm", Some(&value), None);
        }
        if matches!(call, Call::SharedGetCold) {
            for i in 0..COLD_KEYS {
                let _ = hostcalls::set_shared_data(&format!("probe:cold:{i}"), Some(&value), None);
            }
        }
        true
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream { probe: self.probe.clone() }))
    }
}

struct Stream {
    probe: Rc<Probe>,
}

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.probe.run();
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, _end_of_stream: bool) -> Action {
        self.probe.run_response_body(body_size);
        Action::Continue
    }
}
