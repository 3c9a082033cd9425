//! A stream through Envoy's filter flow: the request delivered, the upstream's answer, the end.

use std::time::Duration;

use crate::abi::{Action, HeaderMap};
use crate::http::{is_grpc_request, LocalReply, Request, Upstream, UpstreamRequest, Verdict};

use super::module::PluginSpec;
use super::worker::Worker;

/// Where a stream is in Envoy's filter flow.
pub(crate) struct StreamRun {
    pub(crate) worker: usize,
    pub(crate) id: u32,
    pub(crate) request: Request,
    pub(crate) request_phase: RequestPhase,
    /// The client's end of stream reached the filter (headers, last body chunk or trailers).
    pub(crate) request_end_seen: bool,
    pub(crate) upstream_response_body: Vec<u8>,
    /// The upstream's body is cut short: the stream is reset after what was sent.
    pub(crate) response_cut: bool,
    pub(crate) upstream: Option<UpstreamRequest>,
    pub(crate) response_phase: ResponsePhase,
    pub(crate) progress: Progress,
    pub(crate) trap: Option<String>,
    /// Envoy's per-stream buffer limit (`PluginSpec::buffer_limit_bytes`).
    pub(crate) buffer_limit: u64,
    /// The response body already flushed to the client, piece by piece, before the last.
    pub(crate) response_sent: Vec<u8>,
}

/// How a body reaches the filter. Envoy's HTTP/1 codec hands over the body as it reads it,
/// without end of stream, and then an empty end of stream, so a filter that buffers a body
/// until its end holds all of it first: past the buffer limit, Envoy stops it. The host hands
/// over a body within the limit in one piece with end of stream (as before: the callbacks a
/// filter sees do not change), and a larger one whole without end of stream, then empty with it.
pub(crate) fn pieces(body: &[u8], limit: u64) -> Vec<&[u8]> {
    if body.len() as u64 > limit {
        vec![body, &[]]
    } else {
        vec![body]
    }
}

/// The request's side of the filter's flow.
#[derive(Debug, PartialEq)]
pub(crate) enum RequestPhase {
    /// The filter has not let the headers go (Pause from `on_request_headers` is
    /// StopAllIterationAndWatermark): Envoy withholds what the client sends next from it.
    Held(Withheld),
    /// The headers went upstream; the body and trailers pass through the filter.
    Released,
}

/// What the client sent while the filter held the headers, handed over when it continues.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Withheld {
    pub(crate) body: Vec<u8>,
    /// The withheld body ends the stream.
    pub(crate) body_end: bool,
    /// The trailers came too.
    pub(crate) trailers: bool,
}

/// The response's side of the filter's flow.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum ResponsePhase {
    /// No response yet.
    NotStarted,
    /// The response headers are at the filter (`on_response_headers`).
    HeadersAtFilter,
    /// The filter paused the headers: they (and the body, if `body_withheld`) wait for it.
    HeadersPaused { body_withheld: bool },
    /// The headers passed the filter (on their way to the client); the body is at the filter.
    BodyAtFilter,
    /// The headers passed; the filter paused the body (StopIterationAndBuffer).
    BodyPaused,
    /// The whole response passed the filter.
    Complete,
}

impl ResponsePhase {
    pub(crate) fn paused(self) -> bool {
        matches!(self, ResponsePhase::HeadersPaused { .. } | ResponsePhase::BodyPaused)
    }

    /// The response headers have passed the filter, on their way to the client.
    pub(crate) fn headers_sent(self) -> bool {
        matches!(self, ResponsePhase::BodyAtFilter | ResponsePhase::BodyPaused | ResponsePhase::Complete)
    }
}

/// Whether the stream can move on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Progress {
    Running,
    /// Paused with nothing pending that the script answers (a held callout, or none).
    Stalled,
    /// Ended: answered, reset or trapped.
    Done,
}

impl StreamRun {
    pub(crate) fn new(worker: usize, id: u32, request: Request) -> StreamRun {
        StreamRun {
            worker,
            id,
            request,
            request_phase: RequestPhase::Held(Withheld::default()),
            request_end_seen: false,
            upstream_response_body: Vec::new(),
            response_cut: false,
            upstream: None,
            response_phase: ResponsePhase::NotStarted,
            progress: Progress::Running,
            trap: None,
            buffer_limit: super::module::DEFAULT_BUFFER_LIMIT_BYTES,
            response_sent: Vec::new(),
        }
    }

    pub(crate) fn is_done(&self) -> bool {
        self.progress == Progress::Done
    }

    pub(crate) fn end(&mut self) {
        self.progress = Progress::Done;
    }

    fn released(&self) -> bool {
        self.request_phase == RequestPhase::Released
    }
}

impl Worker {
    /// Creates the stream context and delivers what the client sent, as Envoy does.
    pub(crate) fn open(&mut self, request: Request, connection_id: u64, buffer_limit: u64) -> StreamRun {
        let request = hcm_normalize(request, connection_id);
        let id = self.add_stream(&request, connection_id);
        let root = self.store.data().root_context;
        let mut run = StreamRun::new(self.index, id, request);
        run.buffer_limit = buffer_limit;
        if let Some(reason) = self.failed.clone() {
            // A failed VM answers every new stream with 503 (fail closed).
            self.stream(id).local_reply = Some(wasm_fail_reply());
            run.trap = Some(reason);
            run.end();
            return run;
        }
        if let Err(t) = self.ctx_call::<(i32, i32), ()>(root, "proxy_on_context_create", (id as i32, root as i32)) {
            run.trap = Some(t);
            run.end();
            return run;
        }
        self.deliver_request(&mut run);
        run
    }

    pub(crate) fn ended(&mut self, run: &mut StreamRun) -> bool {
        let s = self.stream(run.id);
        if s.local_reply.is_some() || s.reset {
            run.end();
        }
        run.is_done()
    }

    pub(crate) fn step(&mut self, run: &mut StreamRun, name: &str, params: (i32, i32, i32)) -> Option<Action> {
        let result = self.ctx_call::<(i32, i32, i32), i32>(run.id, name, params);
        self.note_callback(run.id, name, &result);
        match result {
            Ok(r) => Some(r.map(Action::from_raw).unwrap_or(Action::Continue)),
            Err(t) => {
                run.trap = Some(t);
                run.end();
                None
            }
        }
    }

    /// Lets the request go on upstream: the headers (the first time) and the body buffered so
    /// far. Returns what Envoy withheld from the filter while it held the headers.
    pub(crate) fn release_request(&mut self, run: &mut StreamRun) -> Withheld {
        let mut withheld = Withheld::default();
        if let RequestPhase::Held(w) = std::mem::replace(&mut run.request_phase, RequestPhase::Released) {
            withheld = w;
            let s = self.stream(run.id);
            let mut headers = from_map(&s.request_headers);
            http1_codec_headers(&mut headers, run.request.body_chunks.is_empty() && run.request.trailers.is_empty(), false);
            run.upstream = Some(UpstreamRequest { headers, body: Vec::new(), trailers: Vec::new() });
        }
        let s = self.stream(run.id);
        let pending = s.request_body.as_mut().map(std::mem::take).unwrap_or_default();
        if let Some(u) = run.upstream.as_mut() {
            u.body.extend_from_slice(&pending);
        }
        withheld
    }

    /// Delivers what the client sent. Envoy (proxy-wasm-cpp-host) turns Pause from a headers
    /// callback into StopAllIterationAndWatermark: the body is then withheld from the filter
    /// and handed to it in one piece when the stream is continued.
    pub(crate) fn deliver_request(&mut self, run: &mut StreamRun) {
        let id = run.id as i32;
        let chunks = run.request.body_chunks.clone();
        let has_trailers = !run.request.trailers.is_empty();
        let n = run.request.headers.len() as i32;
        let eos = chunks.is_empty() && !has_trailers;
        let Some(action) = self.step(run, "proxy_on_request_headers", (id, n, eos as i32)) else { return };
        if self.ended(run) {
            return;
        }
        if eos {
            run.request_end_seen = true;
        }
        if action == Action::Continue || self.take_continue(run.id) {
            // Nothing withheld yet: the body comes next.
            let _ = self.release_request(run);
        }
        for (i, chunk) in chunks.iter().enumerate() {
            let last_chunk = i + 1 == chunks.len() && !has_trailers;
            let parts = pieces(chunk, run.buffer_limit);
            for (j, part) in parts.iter().enumerate() {
                let last = last_chunk && j + 1 == parts.len();
                if let RequestPhase::Held(w) = &mut run.request_phase {
                    w.body.extend_from_slice(part);
                    w.body_end |= last;
                    continue;
                }
                self.body_callback(run, part, last);
                if run.is_done() {
                    return;
                }
            }
        }
        if has_trailers {
            if run.released() {
                self.trailers_callback(run);
            } else if let RequestPhase::Held(w) = &mut run.request_phase {
                w.trailers = true;
            }
        }
    }

    pub(crate) fn body_callback(&mut self, run: &mut StreamRun, data: &[u8], eos: bool) {
        let size = {
            let b = self.stream(run.id).request_body.get_or_insert_with(Vec::new);
            b.extend_from_slice(data);
            b.len() as i32
        };
        if eos {
            run.request_end_seen = true;
        }
        let Some(action) = self.step(run, "proxy_on_request_body", (run.id as i32, size, eos as i32)) else {
            return;
        };
        if self.ended(run) {
            return;
        }
        // Continue flushes what was buffered; Pause (StopIterationAndBuffer) keeps buffering.
        if action == Action::Continue || self.take_continue(run.id) {
            let _ = self.release_request(run);
        } else if self.stream(run.id).request_body.as_ref().is_some_and(|b| b.len() as u64 > run.buffer_limit) {
            // Envoy's requestDataTooLarge: 413 while the response has not started, else a reset.
            if run.response_phase.headers_sent() {
                self.stream(run.id).reset = true;
            } else {
                self.stream(run.id).local_reply = Some(too_large(413, "Payload Too Large", "request_payload_too_large"));
            }
            run.end();
        }
    }

    pub(crate) fn trailers_callback(&mut self, run: &mut StreamRun) {
        run.request_end_seen = true;
        let t = run.request.trailers.len() as i32;
        let result = self.ctx_call::<(i32, i32), i32>(run.id, "proxy_on_request_trailers", (run.id as i32, t));
        self.note_callback(run.id, "proxy_on_request_trailers", &result);
        let action = match result {
            Ok(r) => r.map(Action::from_raw).unwrap_or(Action::Continue),
            Err(t) => {
                run.trap = Some(t);
                run.end();
                return;
            }
        };
        if self.ended(run) {
            return;
        }
        if action == Action::Continue || self.take_continue(run.id) {
            let _ = self.release_request(run);
        }
    }

    pub(crate) fn take_continue(&mut self, id: u32) -> bool {
        std::mem::take(&mut self.stream(id).continue_request)
    }

    /// The request is fully forwarded: nothing of it is held by the filter or withheld from it.
    pub(crate) fn request_complete(&mut self, run: &mut StreamRun) -> bool {
        let held = self.stream(run.id).request_body.as_ref().is_some_and(|b| !b.is_empty());
        run.released() && run.request_end_seen && !held
    }

    /// Moves the stream on as far as the scripts allow. Returns true when it is done.
    pub(crate) fn drive(&mut self, run: &mut StreamRun, spec: &PluginSpec) -> bool {
        if run.progress == Progress::Stalled {
            run.progress = Progress::Running;
        }
        loop {
            if run.is_done() || self.ended(run) {
                return true;
            }
            if self.take_continue(run.id) {
                let withheld = self.release_request(run);
                // Envoy now hands the filter the body it withheld, in one piece.
                if !withheld.body.is_empty() || withheld.body_end {
                    self.body_callback(run, &withheld.body, withheld.body_end);
                }
                if withheld.trailers && !run.is_done() {
                    self.trailers_callback(run);
                }
                continue;
            }
            if run.response_phase.paused() && std::mem::take(&mut self.stream(run.id).continue_response) {
                if run.response_phase == (ResponsePhase::HeadersPaused { body_withheld: true }) {
                    run.response_phase = ResponsePhase::BodyAtFilter;
                    self.response_body_callback(run);
                } else {
                    run.response_phase = ResponsePhase::Complete;
                }
                continue;
            }
            if run.response_phase == ResponsePhase::Complete {
                run.end();
                return true;
            }
            let waiting_on_filter = !self.request_complete(run) || run.response_phase.paused();
            if waiting_on_filter {
                // Only a callout answer can resume it.
                if !self.answer_next_callout(run.id, spec, &run.request.callouts) {
                    run.progress = Progress::Stalled;
                    return false;
                }
                continue;
            }
            if run.response_phase == ResponsePhase::NotStarted && run.request.disconnect {
                // The client reset the stream while the upstream was working on it.
                self.stream(run.id).reset = true;
                run.end();
                return true;
            }
            if run.response_phase == ResponsePhase::NotStarted {
                run.response_phase = ResponsePhase::HeadersAtFilter;
                let upstream = run.request.upstream.clone().unwrap_or_else(|| spec.upstream.clone());
                self.deliver_response(run, &upstream, spec.route_timeout_ms);
                continue;
            }
            run.response_phase = ResponsePhase::Complete;
        }
    }

    pub(crate) fn deliver_response(&mut self, run: &mut StreamRun, upstream: &Upstream, route_timeout_ms: u64) {
        let id = run.id as i32;
        let answer = upstream.router_answer(route_timeout_ms).for_request(is_grpc_request(&run.request.headers));
        // The upstream (or the router's timer) took this long.
        self.store.data().world.advance(Duration::from_millis(answer.elapsed_ms));
        let headers = answer.headers;
        self.stream(run.id).code_details = Some(answer.details);
        let n = headers.len() as i32;
        let has_body = !answer.body.is_empty() || answer.cut;
        self.stream(run.id).response_headers = Some(to_map(&headers));
        self.stream(run.id).response_body = Some(Vec::new());
        run.upstream_response_body = answer.body;
        run.response_cut = answer.cut;
        let Some(action) = self.step(run, "proxy_on_response_headers", (id, n, !has_body as i32)) else { return };
        if self.ended(run) {
            return;
        }
        let continued = std::mem::take(&mut self.stream(run.id).continue_response);
        if action == Action::Pause && !continued {
            if run.response_cut {
                // The upstream closes while Envoy holds the response: the stream is reset.
                self.stream(run.id).reset = true;
                run.end();
                return;
            }
            run.response_phase = ResponsePhase::HeadersPaused { body_withheld: has_body };
            return;
        }
        if has_body {
            run.response_phase = ResponsePhase::BodyAtFilter;
            self.response_body_callback(run);
        } else {
            run.response_phase = ResponsePhase::Complete;
        }
    }

    pub(crate) fn response_body_callback(&mut self, run: &mut StreamRun) {
        let body = std::mem::take(&mut run.upstream_response_body);
        let cut = run.response_cut;
        let parts = pieces(&body, run.buffer_limit);
        let mut action = Action::Continue;
        for (j, part) in parts.iter().enumerate() {
            let last = j + 1 == parts.len();
            // After Continue the filter's buffer went to the client; after Pause (buffering) the
            // next piece is added to it.
            let size = {
                let b = self.stream(run.id).response_body.get_or_insert_with(Vec::new);
                if action == Action::Continue {
                    run.response_sent.append(b);
                }
                b.extend_from_slice(part);
                b.len()
            };
            let eos = last && !cut;
            if !(cut && last && part.is_empty()) {
                let Some(a) = self.step(run, "proxy_on_response_body", (run.id as i32, size as i32, eos as i32)) else {
                    return;
                };
                action = a;
            }
            if self.ended(run) {
                return;
            }
            if std::mem::take(&mut self.stream(run.id).continue_response) {
                action = Action::Continue;
            }
            if action == Action::Pause && size as u64 > run.buffer_limit {
                // Envoy's responseDataTooLarge: the headers went to the client, so its 500
                // local reply can only reset the stream.
                self.stream(run.id).reset = true;
                run.end();
                return;
            }
        }
        if cut {
            // Envoy's router: the upstream reset after the response started; the downstream
            // stream is reset (the filters next see on_log).
            self.stream(run.id).reset = true;
            run.end();
            return;
        }
        run.response_phase = if action == Action::Pause { ResponsePhase::BodyPaused } else { ResponsePhase::Complete };
    }

    /// Ends the stream (`on_log`, `on_done`, `on_delete`) and says what it got.
    pub(crate) fn finish(&mut self, mut run: StreamRun, spec: &PluginSpec) -> Verdict {
        let id = run.id;
        // A local reply replaces the response. Sent on the request path, it then goes through
        // the filter's own encoder callbacks, as Envoy's does; sent on the response path (or on a
        // trap), it goes straight to the client.
        let local = self.stream(id).local_reply.clone();
        if local.is_some() && run.response_phase.headers_sent() {
            // Envoy: the response headers already went to the client; all it can do is reset.
            self.stream(id).reset = true;
        } else if let Some(reply) = &local {
            let run_encoder = run.trap.is_none() && self.failed.is_none() && run.response_phase == ResponsePhase::NotStarted;
            let grpc = is_grpc_request(&run.request.headers);
            let head = run.request.header_value(":method") == Some("HEAD");
            let headers = local_reply_headers(reply, grpc, head);
            let body = local_reply_body(reply, grpc, head);
            let n = headers.len() as i32;
            {
                let s = self.stream(id);
                s.code_details = Some(reply.details.clone());
                s.response_headers = Some(to_map(&headers));
                s.response_body = Some(body.clone());
            }
            if run_encoder {
                let _ = self.ctx_call::<(i32, i32, i32), i32>(
                    id,
                    "proxy_on_response_headers",
                    (id as i32, n, body.is_empty() as i32),
                );
                if !body.is_empty() {
                    let _ =
                        self.ctx_call::<(i32, i32, i32), i32>(id, "proxy_on_response_body", (id as i32, body.len() as i32, 1));
                }
            }
        }
        if let Some(t) = &self.failed {
            run.trap.get_or_insert_with(|| t.clone());
        }
        if self.failed.is_none() {
            self.call_on_log(id);
            let _ = self.ctx_call::<(i32,), i32>(id, "proxy_on_done", (id as i32,));
            let _ = self.ctx_call::<(i32,), ()>(id, "proxy_on_delete", (id as i32,));
        }
        let complete = self.request_complete(&mut run);
        let headers_sent = run.upstream.is_some();
        // Callouts still pending die with the stream.
        self.store.data_mut().pending.retain(|_, c| c.context != id);
        let _ = spec;
        let s = self.store.data_mut().streams.remove(&id).unwrap_or_default();
        let mut response_headers = s.response_headers.as_ref().map(from_map).unwrap_or_default();
        let body_empty = s.response_body.as_ref().is_none_or(|b| b.is_empty());
        http1_codec_headers(&mut response_headers, body_empty, run.request.header_value(":method") == Some("HEAD"));
        let stalled = run.progress == Progress::Stalled;
        let status = if s.reset || stalled {
            0
        } else {
            response_headers.iter().find(|(k, _)| k == ":status").and_then(|(_, v)| v.parse().ok()).unwrap_or(0)
        };
        Verdict {
            status,
            response_headers,
            response_body: if s.reset || stalled {
                Vec::new()
            } else if local.is_some() {
                s.response_body.unwrap_or_default()
            } else {
                // What went to the client piece by piece, then the rest.
                let mut body = std::mem::take(&mut run.response_sent);
                body.extend(s.response_body.unwrap_or_default());
                body
            },
            local_reply: s.local_reply,
            code_details: if s.reset || stalled { None } else { s.code_details },
            upstream: if complete {
                run.upstream.map(|mut u| {
                    // The trailers as the filter left them.
                    if !run.request.trailers.is_empty() {
                        u.trailers = from_map(&s.request_trailers);
                    }
                    u
                })
            } else {
                None
            },
            upstream_headers_sent: headers_sent,
            reset: s.reset,
            stalled,
            trap: run.trap,
            callouts: s.callouts,
            host_calls: s.host_calls,
            logs: s.logs,
            violations: s.violations,
        }
    }
}

/// What Envoy's HTTP connection manager adds before the filters run, and what a client sends.
/// (Public for the native runs of the scenario files, `tests/env_guard_native.rs`.)
pub fn hcm_normalize(mut request: Request, connection_id: u64) -> Request {
    // A body with trailers goes chunked (HTTP/1.1): no content-length.
    if !request.body_chunks.is_empty() && request.trailers.is_empty() && request.header_value("content-length").is_none() {
        let len = request.body_bytes().len().to_string();
        request = request.header("content-length", &len);
    }
    if request.header_value("x-forwarded-proto").is_none() {
        request = request.header("x-forwarded-proto", "http");
    }
    if request.header_value("x-request-id").is_none() {
        let id = format!("00000000-0000-4000-8000-{:012x}", connection_id);
        request = request.header("x-request-id", &id);
    }
    request
}

/// What Envoy answers when a VM fails under a stream (`failStream`).
pub(crate) fn wasm_fail_reply() -> LocalReply {
    LocalReply { status: 503, details: "wasm_fail_stream".into(), body: Vec::new(), headers: Vec::new(), grpc_status: 14 }
}

/// The response headers of a local reply: Envoy's own, then the filter's (which replace). To a
/// gRPC request (`grpc`): Envoy's gRPC reply (status 200, `grpc-status`, `grpc-message`), then
/// the filter's headers.
pub(crate) fn local_reply_headers(reply: &LocalReply, grpc: bool, head: bool) -> Vec<(String, String)> {
    let mut headers = if grpc {
        // To a HEAD request, no `grpc-message`.
        let text: &[u8] = if head { &[] } else { &reply.body };
        crate::http::grpc_local_reply_headers(reply.status, Some(reply.grpc_status), text)
    } else {
        // Envoy's `sendLocalReply`: `content-length` and `text/plain` only with a body (the
        // HTTP/1 codec adds `content-length: 0`, or to a HEAD request `transfer-encoding:
        // chunked`, to a headers-only reply); to a HEAD request the body's length is kept and
        // the body left out.
        let mut h = vec![(":status".to_string(), reply.status.to_string())];
        if !reply.body.is_empty() {
            h.push(("content-length".into(), reply.body.len().to_string()));
            h.push(("content-type".into(), "text/plain".into()));
        }
        h
    };
    for (k, v) in &reply.headers {
        headers.retain(|(hk, _)| hk != k);
        headers.push((k.clone(), v.clone()));
    }
    headers
}

/// The body a local reply sends: none to a gRPC request (its text is the `grpc-message`), none
/// to a HEAD request (Envoy encodes the reply headers-only).
pub(crate) fn local_reply_body(reply: &LocalReply, grpc: bool, head: bool) -> Vec<u8> {
    if grpc || head {
        Vec::new()
    } else {
        reply.body.clone()
    }
}

/// Envoy's HTTP/1 codec on a headers-only message without `content-length` (after the
/// filters): it adds `content-length: 0`, except on GET and HEAD requests and on 1xx, 204 and
/// 304 responses; a response to a HEAD request (`to_head`) gets `transfer-encoding: chunked`.
pub(crate) fn http1_codec_headers(headers: &mut Vec<(String, String)>, end_stream: bool, to_head: bool) {
    if !end_stream || headers.iter().any(|(k, _)| k == "content-length" || k == "transfer-encoding") {
        return;
    }
    if to_head {
        headers.push(("transfer-encoding".into(), "chunked".into()));
        return;
    }
    let get = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let exempt = match (get(":status"), get(":method")) {
        (Some(status), _) => status.starts_with('1') || status == "204" || status == "304",
        (None, Some(method)) => method == "GET" || method == "HEAD",
        (None, None) => true,
    };
    if !exempt {
        headers.push(("content-length".into(), "0".into()));
    }
}

/// Whether a property a request carries names its path's segments exactly (NUL-separated, as
/// the ABI sends a path): filter state set by an earlier filter under that path. Any other is
/// a dotted path, found by every path whose segments joined with dots spell it (so
/// `firebreak.principal` is found as `["firebreak.principal"]` and `["firebreak", "principal"]`),
/// and overrides a built-in property of that name ("source.address").
pub(crate) fn is_segment_path(path: &str) -> bool {
    path.contains('\0')
}

pub(crate) fn to_map(h: &[(String, String)]) -> HeaderMap {
    h.iter().map(|(k, v)| (k.clone(), v.clone().into_bytes())).collect()
}

pub(crate) fn from_map(h: &HeaderMap) -> Vec<(String, String)> {
    h.iter().map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned())).collect()
}

/// Envoy's local reply when a filter buffers more than the buffer limit.
pub(crate) fn too_large(status: u16, body: &str, details: &str) -> LocalReply {
    LocalReply { status, details: details.into(), body: body.as_bytes().to_vec(), headers: Vec::new(), grpc_status: -1 }
}
