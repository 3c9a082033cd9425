//! A filter's *flow*, independent of the host: the events it receives, the steps it answers
//! with, and what it wants recorded.
//!
//! A host (the proxy-wasm adapter of a filter, or [`memory::MemoryHost`] in native tests) turns
//! what Envoy tells it into an [`Event`], hands the flow a [`Request`] to read the request from on
//! demand, and applies the [`Output`]: first its [`Record`]s in order (counters, log lines), then
//! its [`Step`]. The host decides nothing.
//!
//! The request is read on demand, not pushed with the event: a flow that lets a request through
//! on its headers alone never reads its body, and a flow that needs no clock never asks for it,
//! so moving a flow here adds no host call.
//!
//! Only what env-guard (the first flow moved here, `crate::envguard::flow`) needs is defined so
//! far. The other flows will add what they need: callouts (a command to send and its answer as an
//! event), stored responses to replay, facts handed to later stages of a chain (the verified
//! principal, the body digest), response events and ticks.

pub mod memory;

use crate::Rejection;

/// What the host tells a flow about the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The request headers are complete; `end_of_stream`: the request has no body.
    RequestHeaders { end_of_stream: bool },
    /// A chunk of the request body arrived; `buffered`: the bytes the host holds so far (all of
    /// them, when earlier chunks were held); `end_of_stream`: this is the last chunk.
    RequestBody { buffered: usize, end_of_stream: bool },
    /// The request trailers arrived (they end the body).
    RequestTrailers,
}

/// The request could not be read (gone, or not UTF-8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unreadable;

/// A header list: names lower-case, pseudo-headers (`:method`, `:path`, ...) included.
pub type Headers = Vec<(String, String)>;

/// The request as the host holds it, read on demand.
pub trait Request {
    /// The current time, in milliseconds since the Unix epoch (`None`: the host has no clock).
    fn now_ms(&mut self) -> Option<u64>;
    fn headers(&mut self) -> Result<Headers, Unreadable>;
    /// The buffered body, at most `size` bytes.
    fn body(&mut self, size: usize) -> Result<Vec<u8>, Unreadable>;
    fn trailers(&mut self) -> Result<Headers, Unreadable>;
}

/// What the flow wants done with the request after an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Let the request go on (the current headers or body chunk go to the next filter).
    Continue,
    /// Keep the body buffered: wait for more of it.
    Hold,
    /// Answer the client with the rejection instead of forwarding.
    Reply(Reply),
}

/// A rejection to send, and its one log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub rejection: Rejection,
    /// The level of its log line (`Rejection::log_line`).
    pub level: Level,
    /// What the log line says about the request (never a secret).
    pub context: String,
}

/// A log level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
    Error,
}

/// Something the host records, in order, before it applies the step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Increment the counter `<prefix>.<name>` now.
    Count(String),
    /// Count a request that passed (the hot path: a host may batch these, as the chain does).
    CountPassed(&'static str),
    /// One log line.
    Log(Level, String),
}

/// A flow's answer to one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub records: Vec<Record>,
    pub step: Step,
}

impl Output {
    pub fn new(step: Step) -> Self {
        Output { records: Vec::new(), step }
    }
}

/// A filter's flow for one request: one value per request, fed every event in order.
pub trait Flow {
    fn on_event(&mut self, event: Event, request: &mut dyn Request) -> Output;
}
