//! An in-memory host for native tests: drives a [`Flow`] through one request the way Envoy
//! would (headers, body chunks, trailers) and records what reached the client, the counters and
//! the log lines.
//!
//! Like Envoy: a body chunk the flow answers [`Step::Continue`] to goes on to the upstream and
//! leaves the buffer; chunks it answers [`Step::Hold`] to stay buffered and the next event sees
//! them all. A [`Step::Reply`] ends the request (its log line and `rejected.<code>` counters are
//! recorded as the proxy-wasm glue records them).

use std::collections::BTreeMap;

use super::{Event, Flow, Headers, Level, Record, Reply, Request, Step, Unreadable};

/// One request to drive through a flow.
#[derive(Debug, Clone, Default)]
pub struct MemoryRequest {
    pub headers: Headers,
    /// The body as it arrives, chunk by chunk (empty: no body).
    pub chunks: Vec<Vec<u8>>,
    /// Trailers (`None`: the last body chunk, or the headers, end the request).
    pub trailers: Option<Headers>,
    pub now_ms: u64,
}

impl MemoryRequest {
    /// A request with its body in one chunk (none when `body` is empty).
    pub fn new(headers: Headers, body: &[u8]) -> Self {
        let chunks = if body.is_empty() { Vec::new() } else { vec![body.to_vec()] };
        MemoryRequest { headers, chunks, trailers: None, now_ms: 0 }
    }
}

/// What a request did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The reply the client got instead of the upstream's answer.
    pub reply: Option<Reply>,
    /// The body bytes that went on to the upstream (when there is no reply).
    pub forwarded_body: Vec<u8>,
    /// Every counter the flow (or its reply) incremented, by name after the plugin's prefix.
    pub counters: BTreeMap<String, u64>,
    /// Every log line, in order.
    pub logs: Vec<(Level, String)>,
    /// How many times the flow read the headers, the body and the trailers.
    pub reads: Reads,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reads {
    pub headers: usize,
    pub body: usize,
    pub trailers: usize,
}

impl Outcome {
    pub fn forwarded(&self) -> bool {
        self.reply.is_none()
    }

    pub fn counter(&self, name: &str) -> u64 {
        self.counters.get(name).copied().unwrap_or(0)
    }
}

/// The request as the flow sees it during one event.
struct Held<'a> {
    request: &'a MemoryRequest,
    buffer: &'a [u8],
    reads: &'a mut Reads,
}

impl Request for Held<'_> {
    fn now_ms(&mut self) -> Option<u64> {
        Some(self.request.now_ms)
    }

    fn headers(&mut self) -> Result<Headers, Unreadable> {
        self.reads.headers += 1;
        Ok(self.request.headers.clone())
    }

    fn body(&mut self, size: usize) -> Result<Vec<u8>, Unreadable> {
        self.reads.body += 1;
        Ok(self.buffer.get(..size.min(self.buffer.len())).unwrap_or_default().to_vec())
    }

    fn trailers(&mut self) -> Result<Headers, Unreadable> {
        self.reads.trailers += 1;
        self.request.trailers.clone().ok_or(Unreadable)
    }
}

/// Drives `flow` through `request`; `plugin` names the reply's log line.
pub fn drive(plugin: &str, flow: &mut dyn Flow, request: &MemoryRequest) -> Outcome {
    let mut outcome = Outcome::default();
    let mut buffer: Vec<u8> = Vec::new();
    let no_body = request.chunks.is_empty() && request.trailers.is_none();
    if apply(plugin, flow, Event::RequestHeaders { end_of_stream: no_body }, request, &mut buffer, &mut outcome) {
        return outcome;
    }
    for (index, chunk) in request.chunks.iter().enumerate() {
        buffer.extend_from_slice(chunk);
        let end_of_stream = index + 1 == request.chunks.len() && request.trailers.is_none();
        let event = Event::RequestBody { buffered: buffer.len(), end_of_stream };
        if apply(plugin, flow, event, request, &mut buffer, &mut outcome) {
            return outcome;
        }
    }
    if request.trailers.is_some() && apply(plugin, flow, Event::RequestTrailers, request, &mut buffer, &mut outcome) {
        return outcome;
    }
    // The end of the request: what is still buffered goes on.
    outcome.forwarded_body.append(&mut buffer);
    outcome
}

/// One event: records what the flow asks for, applies its step. True when the flow replied.
fn apply(
    plugin: &str,
    flow: &mut dyn Flow,
    event: Event,
    request: &MemoryRequest,
    buffer: &mut Vec<u8>,
    outcome: &mut Outcome,
) -> bool {
    let output = flow.on_event(event, &mut Held { request, buffer, reads: &mut outcome.reads });
    for record in output.records {
        match record {
            Record::Count(name) => *outcome.counters.entry(name).or_insert(0) += 1,
            Record::CountPassed(name) => *outcome.counters.entry(name.to_string()).or_insert(0) += 1,
            Record::Log(level, line) => outcome.logs.push((level, line)),
        }
    }
    match output.step {
        Step::Continue => {
            outcome.forwarded_body.append(buffer);
            false
        }
        Step::Hold => false,
        Step::Reply(reply) => {
            outcome.logs.push((reply.level, reply.rejection.log_line(plugin, &reply.context)));
            for name in reply.rejection.counter_names() {
                *outcome.counters.entry(name).or_insert(0) += 1;
            }
            outcome.forwarded_body.clear();
            outcome.reply = Some(reply);
            true
        }
    }
}
