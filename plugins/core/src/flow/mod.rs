//! A filter's *flow*, independent of the host: the events it receives, the [`Host`] it reads the
//! stream from and acts through, and the [`Step`] it answers each event with.
//!
//! A host (the proxy-wasm driver in `plugins/glue`, [`memory::MemoryHost`] in native tests, the
//! Envoy dynamic module later) turns what Envoy tells it into an [`Event`], hands the flow itself
//! as a [`Host`], and applies the [`Step`]. The host decides nothing.
//!
//! The stream is read on demand, not pushed with the event: a flow that lets a request through on
//! its headers alone never reads its body, and a flow that needs no clock never asks for it, so
//! moving a flow here adds no host call.
//!
//! Callouts (Redis through webdis) go through [`calls::Calls`], the one callout runtime: the flow
//! starts a call with [`Host::call_redis`], answers the event with [`Step::Hold`], and gets the
//! answer later as [`Event::CallAnswer`]. Answering that event with [`Step::Continue`] resumes the
//! stream the flow stopped; [`Step::Hold`] leaves it stopped.
//!
//! Stages of one chain ([`chain::Chain`]) hand each other facts (the verified principal, the
//! body's SHA-256) through the same [`Host`] methods a separate module uses to hand them to the
//! next module; the chain keeps them in memory.

/// A wrapper's [`Host`] methods that only hand the call to `self.inner` (a `&mut dyn Host`),
/// by name: `forward_to_inner!(now_ms, store, log);` inside an `impl Host`. The signatures are
/// written once, here; a wrapper writes out only the methods it changes.
macro_rules! forward_to_inner {
    ($($method:ident),* $(,)?) => { $(forward_to_inner!(@one $method);)* };
    (@one now_ms) => { fn now_ms(&mut self) -> Option<u64> { self.inner.now_ms() } };
    (@one request_headers) => {
        fn request_headers(&mut self) -> Result<std::rc::Rc<$crate::flow::Headers>, $crate::flow::ReadError> {
            self.inner.request_headers()
        }
    };
    (@one request_headers_lossy) => {
        fn request_headers_lossy(&mut self) -> Result<std::rc::Rc<$crate::flow::Headers>, $crate::flow::HostFailed> {
            self.inner.request_headers_lossy()
        }
    };
    (@one with_request_body) => {
        fn with_request_body(
            &mut self,
            size: usize,
            visit: &mut dyn FnMut($crate::flow::BodyChunks<'_>),
        ) -> Result<(), $crate::flow::HostFailed> {
            self.inner.with_request_body(size, visit)
        }
    };
    (@one request_trailers_raw) => {
        fn request_trailers_raw(&mut self) -> Result<$crate::flow::RawHeaders, $crate::flow::HostFailed> {
            self.inner.request_trailers_raw()
        }
    };
    (@one set_request_header) => {
        fn set_request_header(&mut self, name: &str, value: Option<&str>) -> Result<(), $crate::flow::HostFailed> {
            self.inner.set_request_header(name, value)
        }
    };
    (@one response_headers_raw) => {
        fn response_headers_raw(&mut self) -> Result<$crate::flow::RawHeaders, $crate::flow::HostFailed> {
            self.inner.response_headers_raw()
        }
    };
    (@one response_body) => {
        fn response_body(&mut self, size: usize) -> Result<Vec<u8>, $crate::flow::HostFailed> {
            self.inner.response_body(size)
        }
    };
    (@one add_response_header) => {
        fn add_response_header(&mut self, name: &str, value: &str) -> Result<(), $crate::flow::HostFailed> {
            self.inner.add_response_header(name, value)
        }
    };
    (@one response_from_upstream) => { fn response_from_upstream(&mut self) -> bool { self.inner.response_from_upstream() } };
    (@one source_address) => { fn source_address(&mut self) -> Option<String> { self.inner.source_address() } };
    (@one principal) => {
        fn principal(&mut self) -> Result<Option<String>, $crate::flow::HostFailed> {
            self.inner.principal()
        }
    };
    (@one set_principal) => {
        fn set_principal(&mut self, principal: &str) -> Result<(), $crate::flow::HostFailed> {
            self.inner.set_principal(principal)
        }
    };
    (@one body_sha256) => { fn body_sha256(&mut self, body_len: usize) -> Option<[u8; 32]> { self.inner.body_sha256(body_len) } };
    (@one set_body_sha256) => {
        fn set_body_sha256(&mut self, digest: &[u8; 32], body_len: usize) {
            self.inner.set_body_sha256(digest, body_len)
        }
    };
    (@one store) => { fn store(&self) -> &dyn $crate::store::SharedStore { self.inner.store() } };
    (@one call_redis) => {
        fn call_redis(
            &mut self,
            redis: &$crate::remote::RedisConfig,
            command: &[u8],
        ) -> Result<$crate::flow::CallId, $crate::flow::HostFailed> {
            self.inner.call_redis(redis, command)
        }
    };
    (@one call_answer) => {
        fn call_answer(&mut self, body_size: usize, max_bytes: usize) -> Option<$crate::flow::CallAnswer> {
            self.inner.call_answer(body_size, max_bytes)
        }
    };
    (@one count) => { fn count(&mut self, meter: &$crate::flow::Meter, name: &str) { self.inner.count(meter, name) } };
    (@one count_passed) => {
        fn count_passed(&mut self, meter: &$crate::flow::Meter, name: &str) {
            self.inner.count_passed(meter, name)
        }
    };
    (@one gauge) => {
        fn gauge(&mut self, meter: &$crate::flow::Meter, name: &str, value: u64) {
            self.inner.gauge(meter, name, value)
        }
    };
    (@one logs_debug) => { fn logs_debug(&self) -> bool { self.inner.logs_debug() } };
    (@one log) => { fn log(&mut self, level: $crate::flow::Level, line: &str) { self.inner.log(level, line) } };
}

pub mod body;
pub mod calls;
pub mod chain;
pub mod fill;
pub mod header_cache;
pub mod local_reply;
pub mod memory;

use std::rc::Rc;
use std::sync::Arc;

pub use body::BodyChunks;

use crate::remote::RedisConfig;
use crate::store::SharedStore;
use crate::{Mode, Rejection};

/// What the host tells a flow about its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The request headers are complete; `end_of_stream`: the request has no body.
    RequestHeaders { end_of_stream: bool },
    /// A chunk of the request body arrived; `buffered`: the bytes the host holds so far (all of
    /// them, when earlier chunks were held); `end_of_stream`: this is the last chunk.
    RequestBody { buffered: usize, end_of_stream: bool },
    /// The request trailers arrived (they end the body).
    RequestTrailers,
    /// The response headers arrived; `end_of_stream`: the response has no body.
    ResponseHeaders { end_of_stream: bool },
    /// A chunk of the response body arrived (`buffered` as for the request).
    ResponseBody { buffered: usize, end_of_stream: bool },
    /// The response trailers arrived (they end the response).
    ResponseTrailers,
    /// The answer to a call this flow started ([`Host::call_redis`]); `body_size`: the size of
    /// its body, read with [`Host::call_answer`].
    CallAnswer { call: CallId, body_size: usize },
    /// The stream is over (Envoy's access-log point): the last chance to record an outcome.
    StreamEnd,
}

impl Event {
    /// The half of the stream the event belongs to (`None`: a call answer, the end of the stream).
    pub fn direction(self) -> Option<Direction> {
        match self {
            Event::RequestHeaders { .. } | Event::RequestBody { .. } | Event::RequestTrailers => Some(Direction::Request),
            Event::ResponseHeaders { .. } | Event::ResponseBody { .. } | Event::ResponseTrailers => Some(Direction::Response),
            Event::CallAnswer { .. } | Event::StreamEnd => None,
        }
    }
}

/// A half of the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Request,
    Response,
}

/// The host could not do what it was asked (the stream is gone, a host call failed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostFailed;

/// Why a header list could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadError {
    HostFailed,
    /// A value is not UTF-8 (never replaced: the caller decides).
    NotUtf8,
}

impl From<HostFailed> for ReadError {
    fn from(_: HostFailed) -> Self {
        ReadError::HostFailed
    }
}

/// A header list: names lower-case, pseudo-headers (`:method`, `:path`, ...) included.
pub type Headers = Vec<(String, String)>;

/// A header list as the host holds it (values are bytes).
pub type RawHeaders = Vec<(String, Vec<u8>)>;

/// Every value UTF-8, or [`ReadError::NotUtf8`].
pub fn utf8_headers(raw: RawHeaders) -> Result<Headers, ReadError> {
    raw.into_iter()
        .map(|(name, value)| String::from_utf8(value).map(|v| (name, v)).map_err(|_| ReadError::NotUtf8))
        .collect()
}

/// A value that is not UTF-8 kept as an empty value (so that a duplicate still counts as a
/// duplicate, and such a method or path matches no route).
pub fn lossy_headers(raw: RawHeaders) -> Headers {
    raw.into_iter().map(|(name, value)| (name, String::from_utf8(value).unwrap_or_default())).collect()
}

/// First value of a header (names lower-case).
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

/// A call in flight, named by the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CallId(pub u32);

/// What came back from a call: the HTTP status (`None`: no answer at all, which is how Envoy
/// reports a timeout or a connection failure) and the body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallAnswer {
    pub status: Option<u16>,
    pub body: Vec<u8>,
}

/// Where a flow's counters and log lines go: `<prefix>.<name>` counters (for example
/// `firebreak.rate_limit.per-ip`), log lines starting `firebreak <plugin>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meter {
    pub plugin: &'static str,
    pub prefix: Arc<str>,
}

impl Meter {
    pub fn new(plugin: &'static str, prefix: impl Into<Arc<str>>) -> Self {
        Meter { plugin, prefix: prefix.into() }
    }
}

/// A log level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

/// The stream as the host holds it, and what a flow can ask the host to do. Reads are on demand;
/// a host may cache what it read within one event (and must forget it when the flow writes).
pub trait Host {
    /// The current time, in milliseconds since the Unix epoch (`None`: the host has no clock).
    fn now_ms(&mut self) -> Option<u64>;

    /// Every request header, each value UTF-8 (a value that is not is [`ReadError::NotUtf8`],
    /// never replaced). Shared: a host reads the headers once per event, whichever flow asks.
    fn request_headers(&mut self) -> Result<Rc<Headers>, ReadError>;
    /// Every request header, a value that is not UTF-8 kept as an empty value ([`lossy_headers`]).
    fn request_headers_lossy(&mut self) -> Result<Rc<Headers>, HostFailed>;
    /// Lends the buffered request body, at most `size` bytes, to `visit` as the host holds it
    /// (its chunks, in order, not copied; valid only during the call): `visit` is called once,
    /// unless the host fails. See [`read_request_body`] to get a value out.
    fn with_request_body(&mut self, size: usize, visit: &mut dyn FnMut(BodyChunks<'_>)) -> Result<(), HostFailed>;
    /// The buffered request body, at most `size` bytes, copied into one buffer (for a reader
    /// that keeps it; a reader that only looks uses [`read_request_body`]).
    fn request_body(&mut self, size: usize) -> Result<Vec<u8>, HostFailed> {
        read_request_body(self, size, |body| body.to_vec())
    }
    fn request_trailers_raw(&mut self) -> Result<RawHeaders, HostFailed>;
    /// Sets (`Some`) or removes (`None`) a request header.
    fn set_request_header(&mut self, name: &str, value: Option<&str>) -> Result<(), HostFailed>;

    fn response_headers_raw(&mut self) -> Result<RawHeaders, HostFailed>;
    /// The buffered response body, at most `size` bytes.
    fn response_body(&mut self, size: usize) -> Result<Vec<u8>, HostFailed>;
    fn add_response_header(&mut self, name: &str, value: &str) -> Result<(), HostFailed>;
    /// The response came from the upstream (Envoy's `response.code_details` is `via_upstream`),
    /// not from a local reply or a reset.
    fn response_from_upstream(&mut self) -> bool;

    /// The downstream address Envoy computed (`source.address`, with its port).
    fn source_address(&mut self) -> Option<String>;

    /// The principal a request-signature earlier in this stream verified, if any. An error when
    /// the host cannot tell: the caller fails closed rather than take the request for an
    /// anonymous one.
    fn principal(&mut self) -> Result<Option<String>, HostFailed>;
    /// Hands the verified principal to later filters of this stream.
    fn set_principal(&mut self, principal: &str) -> Result<(), HostFailed>;
    /// The verified SHA-256 of this stream's `body_len`-byte body, if an earlier filter handed it over.
    fn body_sha256(&mut self, body_len: usize) -> Option<[u8; 32]>;
    /// Hands the verified SHA-256 of a `body_len`-byte body to later filters of this stream.
    fn set_body_sha256(&mut self, digest: &[u8; 32], body_len: usize);

    /// The shared data of this plugin (every worker of one Envoy).
    fn store(&self) -> &dyn SharedStore;

    /// Sends one webdis command (`POST /`, body in webdis path form) to `redis`; the answer comes
    /// as [`Event::CallAnswer`] with the returned id.
    fn call_redis(&mut self, redis: &RedisConfig, command: &[u8]) -> Result<CallId, HostFailed>;
    /// The answer being delivered ([`Event::CallAnswer`]); its body is read only when
    /// `body_size` (the event's) is at most `max_bytes`, else `None`.
    fn call_answer(&mut self, body_size: usize, max_bytes: usize) -> Option<CallAnswer>;

    /// Increments the counter `<meter.prefix>.<name>`.
    fn count(&mut self, meter: &Meter, name: &str);
    /// Counts a request that passed (the hot path: a host may batch these).
    fn count_passed(&mut self, meter: &Meter, name: &str);
    /// Sets the gauge `<meter.prefix>.<name>` (a fill level, [`fill`]). A host that exports no
    /// gauge ignores it.
    fn gauge(&mut self, _meter: &Meter, _name: &str, _value: u64) {}
    /// Whether debug lines are written (so a flow formats them only then).
    fn logs_debug(&self) -> bool;
    fn log(&mut self, level: Level, line: &str);

    fn request_trailers(&mut self) -> Result<Headers, ReadError> {
        utf8_headers(self.request_trailers_raw()?)
    }

    fn response_headers(&mut self) -> Result<Headers, ReadError> {
        utf8_headers(self.response_headers_raw()?)
    }
}

/// Reads the buffered request body (at most `size` bytes) in place: `read` gets its chunks, lent
/// by the host for the call, and its answer is returned. A host that fails, or that never lends
/// the body, is an error (the caller fails closed).
pub fn read_request_body<H: Host + ?Sized, T>(
    host: &mut H,
    size: usize,
    read: impl FnOnce(BodyChunks<'_>) -> T,
) -> Result<T, HostFailed> {
    let mut read = Some(read);
    let mut answer = None;
    host.with_request_body(size, &mut |body| {
        if let Some(read) = read.take() {
            answer = Some(read(body));
        }
    })?;
    answer.ok_or(HostFailed)
}

/// A response a flow sends as is instead of the upstream's (a stored answer replayed, an
/// operator's answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Headers,
    pub body: Vec<u8>,
}

/// What the flow wants done with the stream after an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Let the stream go on (the current headers or body chunk go to the next filter). After a
    /// call answer: resume the stream this flow stopped.
    Continue,
    /// Stop here: keep the body buffered, or wait for a call's answer.
    Hold,
    /// Answer the client with the rejection instead of forwarding (already logged and counted by
    /// [`reject`]).
    Reply(Rejection),
    /// Answer the client with this response instead of forwarding.
    Respond(Response),
}

/// `method=.. path=".."`: the context of a log line about a request, formatted only when a line
/// is written (the accepted path formats nothing). A flow that may write a line at a later event
/// keeps it from the headers' event: once the headers continue, Envoy's wasm host no longer hands
/// them to the module (the test host does the same).
pub struct RequestContext<'a> {
    pub method: &'a str,
    pub path: &'a str,
}

impl std::fmt::Display for RequestContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "method={} path={:?}", self.method, self.path)
    }
}

/// Refuses the request: one log line at `level` and the counters `rejected.<code>` (and
/// `rejected.<code>.<detail>`), then the reply. Every flow refuses through here.
pub fn reject(host: &mut dyn Host, meter: &Meter, level: Level, rejection: Rejection, context: &str) -> Step {
    host.log(level, &rejection.log_line(meter.plugin, context));
    for name in rejection.counter_names() {
        host.count(meter, &name);
    }
    Step::Reply(rejection)
}

/// Refuses the request in [`Mode::Enforce`] ([`reject`]: `Some(Step::Reply)`). In
/// [`Mode::ReportOnly`] writes one `would_reject` line at `level` and counts
/// `would_reject.<code>`, and returns `None`: the caller lets the request go on unchanged, as if
/// it had passed this check.
pub fn refuse(host: &mut dyn Host, meter: &Meter, mode: Mode, level: Level, rejection: Rejection, context: &str) -> Option<Step> {
    match mode {
        Mode::Enforce => Some(reject(host, meter, level, rejection, context)),
        Mode::ReportOnly => {
            host.log(level, &rejection.would_reject_log_line(meter.plugin, context));
            host.count(meter, &rejection.would_reject_counter_name());
            None
        }
    }
}

/// A filter's flow for one stream: one value per stream, fed every event in order.
pub trait Flow {
    fn on_event(&mut self, event: Event, host: &mut dyn Host) -> Step;
}

/// A configured filter: makes its flow for each stream (built once, at configure time).
pub trait FlowFactory: Send + Sync {
    fn new_flow(&self) -> Box<dyn Flow>;
    /// Where its counters and log lines go.
    fn meter(&self) -> Meter;
    /// Counters to define at configure time, so they show (as 0) before the first event.
    fn counters(&self) -> Vec<String>;
    /// The log lines of the accepted configuration.
    fn configured(&self) -> Vec<(Level, String)>;
    /// Every meter its flows count under, with the counters to define up front (a chain has one
    /// per stage).
    fn definitions(&self) -> Vec<(Meter, Vec<String>)> {
        vec![(self.meter(), self.counters())]
    }
    /// The bounded local tables whose fill levels the host exports as gauges ([`fill`]).
    fn stores(&self) -> Vec<fill::StoreTable> {
        Vec::new()
    }
}
