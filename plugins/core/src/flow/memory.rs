//! An in-memory host for native tests: drives a [`Flow`] (one filter's, or a [`super::chain::Chain`])
//! through one exchange the way Envoy would, and records what reached the upstream and the client,
//! the counters, the log lines and the calls made.
//!
//! Like Envoy:
//! - a body chunk the flow answers [`Step::Continue`] to goes on and leaves the buffer; chunks it
//!   answers [`Step::Hold`] to stay buffered and the next event sees them all;
//! - a flow that holds waiting for a call is resumed by [`Step::Continue`] to the call's answer;
//! - a [`Step::Reply`] or [`Step::Respond`] ends the exchange: that is what the client gets;
//! - the stream's end ([`Event::StreamEnd`]) comes last, whatever happened.
//!
//! Calls are answered by the [`MemoryEnv::redis`] closure, in the order they were made, after the
//! event that made them. State that outlives one exchange (shared data, the clock, the fake Redis)
//! lives in the [`MemoryEnv`], so a scenario's requests see each other.

use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;

use super::body::{self, BodyChunks};
use super::local_reply::LocalReply;
use super::{
    CallAnswer, CallId, Direction, Event, Flow, Headers, Host, HostFailed, Level, Meter, RawHeaders, ReadError, Response, Step,
};
use crate::remote::RedisConfig;
use crate::store::{MemoryStore, SharedStore};
use crate::Rejection;

/// One request to drive through a flow.
#[derive(Debug, Clone, Default)]
pub struct MemoryRequest {
    pub headers: Headers,
    /// The body as it arrives, chunk by chunk (empty: no body).
    pub chunks: Vec<Vec<u8>>,
    /// Trailers (`None`: the last body chunk, or the headers, end the request).
    pub trailers: Option<Headers>,
    /// `source.address` (`None`: the host cannot tell).
    pub source_address: Option<String>,
    /// The principal an earlier filter (outside this flow) handed over.
    pub principal: Option<String>,
    /// The client goes away once the request reached the upstream: no response, then the end.
    pub disconnect: bool,
}

impl MemoryRequest {
    /// A request with its body in one chunk (none when `body` is empty).
    pub fn new(headers: Headers, body: &[u8]) -> Self {
        let chunks = if body.is_empty() { Vec::new() } else { vec![body.to_vec()] };
        MemoryRequest {
            headers,
            chunks,
            trailers: None,
            source_address: Some("127.0.0.1:40000".into()),
            principal: None,
            disconnect: false,
        }
    }
}

impl MemoryRequest {
    /// The same request with its body cut into chunks at `offsets` (in bytes from the body's
    /// start; out-of-range or repeated offsets are ignored), as Envoy may hold a body.
    pub fn split_at(mut self, offsets: &[usize]) -> Self {
        let body = self.chunks.concat();
        let mut cuts: Vec<usize> = offsets.iter().copied().filter(|at| *at > 0 && *at < body.len()).collect();
        cuts.sort_unstable();
        cuts.dedup();
        let mut chunks = Vec::new();
        let mut start = 0;
        for at in cuts.into_iter().chain(std::iter::once(body.len())) {
            chunks.push(body.get(start..at).unwrap_or_default().to_vec());
            start = at;
        }
        self.chunks = if body.is_empty() { Vec::new() } else { chunks };
        self
    }
}

/// What the upstream answers when a request reaches it.
#[derive(Debug, Clone)]
pub struct MemoryUpstream {
    pub status: u16,
    pub headers: Headers,
    pub chunks: Vec<Vec<u8>>,
    pub trailers: Option<Headers>,
    /// The answer came from the upstream (false: Envoy's own reply, e.g. a reset or a timeout).
    pub via_upstream: bool,
    /// The upstream closes the connection after these chunks: the last one does not end the
    /// response, and the stream ends there (the client gets no complete answer).
    pub cut: bool,
}

impl Default for MemoryUpstream {
    fn default() -> Self {
        MemoryUpstream { status: 200, headers: Vec::new(), chunks: Vec::new(), trailers: None, via_upstream: true, cut: false }
    }
}

/// A fake Redis bridge: the command (webdis path form) in, the answer out.
pub type FakeRedis = Box<dyn FnMut(&[u8]) -> CallAnswer>;

/// What outlives one exchange.
pub struct MemoryEnv {
    pub store: MemoryStore,
    /// The clock every read of this exchange sees (`None`: the host has no clock).
    pub now_ms: Option<u64>,
    /// Answers calls (`None`: every call fails to dispatch).
    pub redis: Option<FakeRedis>,
    /// Debug lines are written.
    pub debug: bool,
    /// Host calls made to fail.
    pub faults: Faults,
}

/// Host calls a test makes fail, as a broken or departing stream would.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    pub request_headers: bool,
    pub request_body: bool,
    pub request_trailers: bool,
    /// Setting or removing a request header, adding a response header, handing on the principal.
    pub writes: bool,
    /// Reading the principal an earlier filter handed on.
    pub principal: bool,
}

impl Default for MemoryEnv {
    fn default() -> Self {
        MemoryEnv {
            store: MemoryStore::default(),
            now_ms: Some(1_700_000_000_000),
            redis: None,
            debug: false,
            faults: Faults::default(),
        }
    }
}

/// What an exchange did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The rejection the client got instead of the upstream's answer.
    pub reply: Option<Rejection>,
    /// A response the flow sent instead of the upstream's (a stored one, an operator's).
    pub responded: Option<Response>,
    /// The request reached the upstream.
    pub forwarded: bool,
    /// The request as the upstream saw it: headers after the flow's changes, and the body.
    pub upstream_headers: Headers,
    pub forwarded_body: Vec<u8>,
    /// The response the client got from the upstream (headers after the flow's changes, body).
    pub client_headers: Headers,
    pub client_body: Vec<u8>,
    /// The stream stopped and nothing resumed it (Envoy's stream timeout would end it).
    pub stalled: bool,
    /// The stream was reset after the response started (a cut upstream answer).
    pub reset: bool,
    /// Every counter incremented, by full name (`<prefix>.<name>`).
    pub counters: BTreeMap<String, u64>,
    /// Every gauge set, by full name, with its last value.
    pub gauges: BTreeMap<String, u64>,
    /// Every log line, in order.
    pub logs: Vec<(Level, String)>,
    /// Every call made (the command sent), in order.
    pub calls: Vec<Vec<u8>>,
    /// How many times the flow read the request headers, body and trailers.
    pub reads: Reads,
    /// The facts handed to later filters.
    pub principal: Option<String>,
    pub body_sha256: Option<[u8; 32]>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reads {
    pub headers: usize,
    pub body: usize,
    pub trailers: usize,
}

impl Outcome {
    /// The request reached the upstream and the client got the upstream's answer.
    pub fn passed(&self) -> bool {
        self.forwarded && self.reply.is_none() && self.responded.is_none()
    }

    /// Counter `<prefix>.<name>` (prefix `firebreak.<filter>` or the rate-limit instance's).
    pub fn counter(&self, name: &str) -> u64 {
        self.counters.get(name).copied().unwrap_or(0)
    }

    /// The status the client got.
    pub fn status(&self, upstream: &MemoryUpstream) -> u16 {
        match (&self.reply, &self.responded) {
            (Some(rejection), _) => rejection.status,
            (None, Some(response)) => response.status,
            (None, None) => upstream.status,
        }
    }
}

/// The host of one exchange.
struct Memory<'a> {
    env: &'a mut MemoryEnv,
    request: &'a MemoryRequest,
    upstream: &'a MemoryUpstream,
    outcome: Outcome,
    request_headers: Headers,
    /// The request body held, as the chunks it arrived in (a flow reads them as chunks, as it
    /// does Envoy's buffer).
    request_buffer: Vec<Vec<u8>>,
    response_buffer: Vec<u8>,
    next_call: u32,
    queued: VecDeque<(CallId, Vec<u8>)>,
    answer: Option<CallAnswer>,
    /// The half of the stream the flow stopped, if any.
    stopped: Option<Direction>,
    /// The client got a reply or a response: nothing more goes anywhere.
    answered: bool,
    /// The upstream's response began: a reply now goes straight to the client.
    response_started: bool,
    /// The flow's own local reply, crossing the flow on its way to the client (as Envoy passes
    /// a filter's reply through its encoder side), waiting for a call's answer.
    reply: Option<LocalReply>,
}

fn raw(headers: &Headers) -> RawHeaders {
    headers.iter().map(|(n, v)| (n.clone(), v.clone().into_bytes())).collect()
}

impl Host for Memory<'_> {
    fn now_ms(&mut self) -> Option<u64> {
        self.env.now_ms
    }

    fn request_headers(&mut self) -> Result<Rc<Headers>, ReadError> {
        self.outcome.reads.headers += 1;
        if self.env.faults.request_headers {
            return Err(ReadError::HostFailed);
        }
        Ok(Rc::new(self.request_headers.clone()))
    }

    fn request_headers_lossy(&mut self) -> Result<Rc<Headers>, HostFailed> {
        self.request_headers().map_err(|_| HostFailed)
    }

    fn with_request_body(&mut self, size: usize, visit: &mut dyn FnMut(BodyChunks<'_>)) -> Result<(), HostFailed> {
        self.outcome.reads.body += 1;
        if self.env.faults.request_body {
            return Err(HostFailed);
        }
        body::lend(self.request_buffer.iter().map(Vec::as_slice), size, visit);
        Ok(())
    }

    fn request_trailers_raw(&mut self) -> Result<RawHeaders, HostFailed> {
        self.outcome.reads.trailers += 1;
        if self.env.faults.request_trailers {
            return Err(HostFailed);
        }
        self.request.trailers.as_ref().map(raw).ok_or(HostFailed)
    }

    fn set_request_header(&mut self, name: &str, value: Option<&str>) -> Result<(), HostFailed> {
        if self.env.faults.writes {
            return Err(HostFailed);
        }
        self.request_headers.retain(|(n, _)| n != name);
        if let Some(value) = value {
            self.request_headers.push((name.to_string(), value.to_string()));
        }
        Ok(())
    }

    fn response_headers_raw(&mut self) -> Result<RawHeaders, HostFailed> {
        let mut headers = vec![(":status".to_string(), self.upstream.status.to_string())];
        headers.extend(self.outcome.client_headers.iter().cloned());
        Ok(raw(&headers))
    }

    fn response_body(&mut self, size: usize) -> Result<Vec<u8>, HostFailed> {
        Ok(self.response_buffer.get(..size.min(self.response_buffer.len())).unwrap_or_default().to_vec())
    }

    fn add_response_header(&mut self, name: &str, value: &str) -> Result<(), HostFailed> {
        if self.env.faults.writes {
            return Err(HostFailed);
        }
        self.outcome.client_headers.push((name.to_string(), value.to_string()));
        Ok(())
    }

    fn response_from_upstream(&mut self) -> bool {
        self.upstream.via_upstream
    }

    fn source_address(&mut self) -> Option<String> {
        self.request.source_address.clone()
    }

    fn principal(&mut self) -> Result<Option<String>, HostFailed> {
        if self.env.faults.principal {
            return Err(HostFailed);
        }
        Ok(self.outcome.principal.clone())
    }

    fn set_principal(&mut self, principal: &str) -> Result<(), HostFailed> {
        if self.env.faults.writes {
            return Err(HostFailed);
        }
        self.outcome.principal = Some(principal.to_string());
        Ok(())
    }

    fn body_sha256(&mut self, _body_len: usize) -> Option<[u8; 32]> {
        self.outcome.body_sha256
    }

    fn set_body_sha256(&mut self, digest: &[u8; 32], _body_len: usize) {
        self.outcome.body_sha256 = Some(*digest);
    }

    fn store(&self) -> &dyn SharedStore {
        &self.env.store
    }

    fn call_redis(&mut self, _redis: &RedisConfig, command: &[u8]) -> Result<CallId, HostFailed> {
        if self.env.redis.is_none() {
            return Err(HostFailed);
        }
        self.next_call = self.next_call.wrapping_add(1);
        let call = CallId(self.next_call);
        self.outcome.calls.push(command.to_vec());
        self.queued.push_back((call, command.to_vec()));
        Ok(call)
    }

    fn call_answer(&mut self, body_size: usize, max_bytes: usize) -> Option<CallAnswer> {
        if body_size > max_bytes {
            return None;
        }
        self.answer.clone()
    }

    fn count(&mut self, meter: &Meter, name: &str) {
        *self.outcome.counters.entry(format!("{}.{name}", meter.prefix)).or_insert(0) += 1;
    }

    fn count_passed(&mut self, meter: &Meter, name: &str) {
        self.count(meter, name);
    }

    fn gauge(&mut self, meter: &Meter, name: &str, value: u64) {
        self.outcome.gauges.insert(format!("{}.{name}", meter.prefix), value);
    }

    fn logs_debug(&self) -> bool {
        self.env.debug
    }

    fn log(&mut self, level: Level, line: &str) {
        if level != Level::Debug || self.env.debug {
            self.outcome.logs.push((level, line.to_string()));
        }
    }
}

impl<'a> Memory<'a> {
    /// A fresh exchange: nothing buffered, nothing sent; the principal handed over is the request's.
    fn new(env: &'a mut MemoryEnv, request: &'a MemoryRequest, upstream: &'a MemoryUpstream) -> Self {
        let outcome = Outcome { principal: request.principal.clone(), ..Outcome::default() };
        Memory {
            env,
            request,
            upstream,
            outcome,
            request_headers: request.headers.clone(),
            request_buffer: Vec::new(),
            response_buffer: Vec::new(),
            next_call: 0,
            queued: VecDeque::new(),
            answer: None,
            stopped: None,
            answered: false,
            response_started: false,
            reply: None,
        }
    }

    /// One event, then the answers to the calls it made. False once the client is answered or
    /// the stream stalled.
    fn send(&mut self, flow: &mut dyn Flow, event: Event) -> bool {
        let step = flow.on_event(event, self);
        self.apply_step(flow, step, event.direction());
        self.answer_calls(flow);
        !self.answered
    }

    /// Applies a step; a reply sent before the response began first crosses the flow
    /// ([`LocalReply`]), as Envoy passes it through the filter's encoder side.
    fn apply_step(&mut self, flow: &mut dyn Flow, step: Step, direction: Option<Direction>) {
        let reply = if self.response_started || self.answered { None } else { LocalReply::of(&step) };
        self.apply(step, direction);
        if let Some(reply) = reply {
            self.reply = Some(reply);
            self.run_reply(flow, None);
        }
    }

    /// The pending local reply's events (after `answer`, a call's answer) to the flow.
    fn run_reply(&mut self, flow: &mut dyn Flow, answer: Option<Event>) {
        if let Some(mut reply) = self.reply.take() {
            if reply.run(flow, answer, self) == Step::Hold {
                self.reply = Some(reply);
            }
        }
    }

    fn answer_calls(&mut self, flow: &mut dyn Flow) {
        while let Some((call, command)) = self.queued.pop_front() {
            let answer = match self.env.redis.as_mut() {
                Some(redis) => redis(&command),
                None => CallAnswer::default(),
            };
            let body_size = answer.body.len();
            let event = Event::CallAnswer { call, body_size };
            if self.reply.is_some() {
                // The flow's own reply waits for this answer.
                self.answer = Some(answer);
                self.run_reply(flow, Some(event));
                self.answer = None;
                continue;
            }
            if self.answered {
                // The stream is over: the command ran, its answer goes nowhere.
                continue;
            }
            self.answer = Some(answer);
            let step = flow.on_event(event, self);
            self.answer = None;
            self.apply_step(flow, step, None);
        }
    }

    /// Applies a step; `direction`: the half of the stream whose event it answers (`None`: a call
    /// answer, which resumes what the flow stopped).
    fn apply(&mut self, step: Step, direction: Option<Direction>) {
        match step {
            Step::Continue => {
                let resumed = match direction {
                    Some(direction) => Some(direction),
                    None => self.stopped.take(),
                };
                if direction.is_some() {
                    self.stopped = None;
                }
                match resumed {
                    Some(Direction::Request) => self.forward_request_buffer(),
                    Some(Direction::Response) => self.outcome.client_body.append(&mut self.response_buffer),
                    None => {}
                }
            }
            Step::Hold => {
                if direction.is_some() {
                    self.stopped = direction;
                }
            }
            Step::Reply(rejection) => {
                self.outcome.reply = Some(rejection);
                self.answered = true;
            }
            Step::Respond(response) => {
                self.outcome.responded = Some(response);
                self.answered = true;
            }
        }
    }

    /// The held request chunks go on to the upstream.
    fn forward_request_buffer(&mut self) {
        for chunk in self.request_buffer.drain(..) {
            self.outcome.forwarded_body.extend_from_slice(&chunk);
        }
    }

    /// Whether the half of the stream went through (not stopped for good, not answered).
    fn through(&mut self, direction: Direction) -> bool {
        if self.answered {
            return false;
        }
        if self.stopped == Some(direction) {
            self.outcome.stalled = true;
            return false;
        }
        true
    }

    fn request_phase(&mut self, flow: &mut dyn Flow) -> bool {
        let request = self.request;
        let no_body = request.chunks.is_empty() && request.trailers.is_none();
        if !self.send(flow, Event::RequestHeaders { end_of_stream: no_body }) || !self.through(Direction::Request) {
            return false;
        }
        for (index, chunk) in request.chunks.iter().enumerate() {
            self.request_buffer.push(chunk.clone());
            let end_of_stream = index + 1 == request.chunks.len() && request.trailers.is_none();
            let buffered = self.request_buffer.iter().map(Vec::len).sum();
            let event = Event::RequestBody { buffered, end_of_stream };
            if !self.send(flow, event) {
                return false;
            }
        }
        if request.trailers.is_some() && !self.send(flow, Event::RequestTrailers) {
            return false;
        }
        if !self.through(Direction::Request) {
            return false;
        }
        // The end of the request: what is still buffered goes on.
        self.forward_request_buffer();
        self.outcome.forwarded = true;
        self.outcome.upstream_headers = self.request_headers.clone();
        true
    }

    fn response_phase(&mut self, flow: &mut dyn Flow) {
        let upstream = self.upstream;
        self.response_started = true;
        self.outcome.client_headers = upstream.headers.clone();
        let no_body = upstream.chunks.is_empty() && upstream.trailers.is_none() && !upstream.cut;
        if !self.send(flow, Event::ResponseHeaders { end_of_stream: no_body }) {
            return;
        }
        for (index, chunk) in upstream.chunks.iter().enumerate() {
            self.response_buffer.extend_from_slice(chunk);
            let end_of_stream = index + 1 == upstream.chunks.len() && upstream.trailers.is_none() && !upstream.cut;
            let event = Event::ResponseBody { buffered: self.response_buffer.len(), end_of_stream };
            if !self.send(flow, event) {
                return;
            }
        }
        if upstream.cut {
            // Reset: the client gets no complete answer.
            self.outcome.client_body.clear();
            self.outcome.reset = true;
            return;
        }
        if upstream.trailers.is_some() && !self.send(flow, Event::ResponseTrailers) {
            return;
        }
        if self.through(Direction::Response) {
            self.outcome.client_body.append(&mut self.response_buffer);
        }
    }
}

/// Drives `flow` through one exchange: the request, the upstream's answer if the request reaches
/// it, then the end of the stream.
pub fn exchange(flow: &mut dyn Flow, env: &mut MemoryEnv, request: &MemoryRequest, upstream: &MemoryUpstream) -> Outcome {
    let mut host = Memory::new(env, request, upstream);
    if host.request_phase(flow) && !request.disconnect {
        host.response_phase(flow);
    }
    host.answered = true;
    host.reply = None;
    let _ = flow.on_event(Event::StreamEnd, &mut host);
    host.answer_calls(flow);
    host.outcome
}

/// Drives `flow` through one request answered `200` with no body by the upstream, in a fresh
/// environment.
pub fn drive(flow: &mut dyn Flow, request: &MemoryRequest) -> Outcome {
    exchange(flow, &mut MemoryEnv::default(), request, &MemoryUpstream::default())
}

/// One event alone, with `request`'s whole body buffered and its upstream's headers as the
/// response: the step, and what the flow did meanwhile (calls are not answered).
pub fn step(
    flow: &mut dyn Flow,
    event: Event,
    env: &mut MemoryEnv,
    request: &MemoryRequest,
    upstream: &MemoryUpstream,
) -> (Step, Outcome) {
    let mut host = Memory::new(env, request, upstream);
    host.request_buffer = request.chunks.clone();
    host.response_buffer = upstream.chunks.concat();
    host.outcome.client_headers = upstream.headers.clone();
    let step = flow.on_event(event, &mut host);
    (step, host.outcome)
}
