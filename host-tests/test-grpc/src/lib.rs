//! `firebreak-test-grpc`: a small proxy-wasm filter for the host's gRPC, buffer-limit and log
//! tests, driven by request headers:
//! - `x-grpc-call: cluster`     → a unary gRPC call (`test.Echo/Call`) with the message in
//!   `x-grpc-send` (default `ping`) and initial metadata `x-grpc-md: k=v` (one pair). The answer
//!   goes upstream as request headers: `x-grpc-status` (the status the module got),
//!   `x-grpc-message` (`proxy_get_status`'s message, on failure), `x-grpc-body` (the message);
//! - `x-grpc-stream: cluster`   → a gRPC stream (`test.Echo/Stream`): one message sent with end
//!   of stream; the initial metadata (`x-grpc-initial`), messages (`x-grpc-body`), trailing
//!   metadata (`x-grpc-trailing`) and close status (`x-grpc-status`, `x-grpc-message`) go upstream;
//! - `x-grpc-reply: <grpc status>[:<message>]` → `send_grpc_response` (HTTP 200, the status);
//! - `x-http-reply: <status>[:<grpc status>][:<body>]` → `proxy_send_local_response` with that
//!   gRPC status (`-` or absent: -1, not set);
//! - `x-trap`                   → panic (trap) in `on_request_headers`;
//! - `x-hold: request` → hold the request body until its end (StopIterationAndBuffer), then
//!   log its size; `x-hold: response` → the same with the response body.
//!
//! Every event is logged (info) as `test-grpc: ...`.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, GrpcStatusCode, LogLevel};
use std::time::Duration;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
}}

struct Root;

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        log("test-grpc: configured");
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream { hold_request: false, hold_response: false, stream_seen: Vec::new() }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    hold_request: bool,
    hold_response: bool,
    /// What a gRPC stream delivered, as (header, value), set upstream when it closes.
    stream_seen: Vec<(String, String)>,
}

fn log(message: &str) {
    let _ = proxy_wasm::hostcalls::log(LogLevel::Info, message);
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The `x-` entries of a metadata map but Envoy's own `x-envoy-*` (the others, `:status`,
/// `content-type`, ..., are the gRPC server's), as `k=v;k=v`.
fn pairs(list: Vec<(String, Vec<u8>)>) -> String {
    list.into_iter()
        .filter(|(k, _)| k.starts_with("x-") && !k.starts_with("x-envoy-")).map(|(k, v)| format!("{k}={}", text(&v))).collect::<Vec<_>>().join(";")
}

impl Stream {
    /// The status (and, for a failure or a stream's close, `proxy_get_status`'s message).
    fn status_headers(&mut self, status: u32, stream: bool) {
        self.set_http_request_header("x-grpc-status", Some(&status.to_string()));
        if status != 0 || stream {
            let (_, message) = self.get_grpc_status();
            let message = message.unwrap_or_default();
            log(&format!("test-grpc: closed status={status} message={message}"));
            self.set_http_request_header("x-grpc-message", Some(&message));
        }
    }
}

impl Context for Stream {
    fn on_grpc_call_response(&mut self, _token: u32, status: u32, size: usize) {
        log(&format!("test-grpc: call answered status={status} size={size}"));
        self.status_headers(status, false);
        if status == 0 {
            let body = self.get_grpc_call_response_body(0, size).unwrap_or_default();
            self.set_http_request_header("x-grpc-body", Some(&text(&body)));
        }
        self.resume_http_request();
    }

    fn on_grpc_stream_initial_metadata(&mut self, _token: u32, _n: u32) {
        let md = pairs(self.get_grpc_stream_initial_metadata());
        log(&format!("test-grpc: stream initial metadata {md}"));
        self.stream_seen.push(("x-grpc-initial".into(), md));
    }

    fn on_grpc_stream_message(&mut self, _token: u32, size: usize) {
        let body = self.get_grpc_stream_message(0, size).unwrap_or_default();
        log(&format!("test-grpc: stream message size={size}"));
        self.stream_seen.push(("x-grpc-body".into(), text(&body)));
    }

    fn on_grpc_stream_trailing_metadata(&mut self, _token: u32, _n: u32) {
        let md = pairs(self.get_grpc_stream_trailing_metadata());
        log(&format!("test-grpc: stream trailing metadata {md}"));
        self.stream_seen.push(("x-grpc-trailing".into(), md));
    }

    fn on_grpc_stream_close(&mut self, _token: u32, status: u32) {
        log(&format!("test-grpc: stream closed status={status}"));
        for (k, v) in std::mem::take(&mut self.stream_seen) {
            self.add_http_request_header(&k, &v);
        }
        self.status_headers(status, true);
        self.resume_http_request();
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _n: usize, _end_of_stream: bool) -> Action {
        if self.get_http_request_header("x-trap").is_some() {
            panic!("x-trap asked for a trap");
        }
        match self.get_http_request_header("x-hold").as_deref() {
            Some("request") => self.hold_request = true,
            Some("response") => self.hold_response = true,
            _ => {}
        }
        if let Some(spec) = self.get_http_request_header("x-grpc-reply") {
            let (status, message) = spec.split_once(':').map(|(s, m)| (s, Some(m))).unwrap_or((spec.as_str(), None));
            let code = grpc_code(status.parse().unwrap_or(2));
            log(&format!("test-grpc: grpc reply {status}"));
            let _ = proxy_wasm::hostcalls::send_grpc_response(code, message, vec![]);
            return Action::Pause;
        }
        if let Some(spec) = self.get_http_request_header("x-http-reply") {
            let mut parts = spec.splitn(3, ':');
            let status: u32 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(403);
            let grpc: i32 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(-1);
            let body = parts.next().unwrap_or("");
            log(&format!("test-grpc: http reply {status} grpc={grpc}"));
            send_local(status, body, grpc);
            return Action::Pause;
        }
        let message = self.get_http_request_header("x-grpc-send").unwrap_or_else(|| "ping".into());
        if let Some(cluster) = self.get_http_request_header("x-grpc-call") {
            let md = self.get_http_request_header("x-grpc-md");
            let metadata: Vec<(&str, &[u8])> =
                md.as_deref().and_then(|m| m.split_once('=')).map(|(k, v)| vec![(k, v.as_bytes())]).unwrap_or_default();
            let r = self.dispatch_grpc_call(
                &cluster,
                "test.Echo",
                "Call",
                metadata,
                Some(message.as_bytes()),
                Duration::from_millis(2000),
            );
            log(&format!("test-grpc: call to {cluster}: {}", if r.is_ok() { "dispatched" } else { "refused" }));
            return match r {
                Ok(_) => Action::Pause,
                Err(_) => {
                    self.set_http_request_header("x-grpc-status", Some("refused"));
                    Action::Continue
                }
            };
        }
        if let Some(cluster) = self.get_http_request_header("x-grpc-stream") {
            let r = self.open_grpc_stream(&cluster, "test.Echo", "Stream", vec![]);
            log(&format!("test-grpc: stream to {cluster}: {}", if r.is_ok() { "opened" } else { "refused" }));
            return match r {
                Ok(token) => {
                    self.send_grpc_stream_message(token, Some(message.as_bytes()), true);
                    Action::Pause
                }
                Err(_) => {
                    self.set_http_request_header("x-grpc-status", Some("refused"));
                    Action::Continue
                }
            };
        }
        Action::Continue
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if !self.hold_request {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        log(&format!("test-grpc: request body held whole, {size} bytes"));
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _end_of_stream: bool) -> Action {
        self.set_http_response_header("x-test-grpc", Some("seen"));
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if !self.hold_response {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        log(&format!("test-grpc: response body held whole, {size} bytes"));
        Action::Continue
    }
}

/// `proxy_send_local_response` with a gRPC status of the module's choice (-1: none).
fn send_local(status: u32, body: &str, grpc: i32) {
    #[link(wasm_import_module = "env")]
    extern "C" {
        fn proxy_send_local_response(
            status_code: u32,
            details_data: *const u8,
            details_size: usize,
            body_data: *const u8,
            body_size: usize,
            headers_data: *const u8,
            headers_size: usize,
            grpc_status: i32,
        ) -> u32;
    }
    let details = "test_grpc_reply";
    // An empty header map: a u32 count of 0.
    let headers = [0u8; 4];
    // SAFETY: every pointer and size pair describes a live slice for the duration of the call.
    unsafe {
        proxy_send_local_response(
            status,
            details.as_ptr(),
            details.len(),
            body.as_ptr(),
            body.len(),
            headers.as_ptr(),
            headers.len(),
            grpc,
        );
    }
}

fn grpc_code(n: u32) -> GrpcStatusCode {
    use GrpcStatusCode::*;
    match n {
        0 => Ok,
        1 => Cancelled,
        3 => InvalidArgument,
        4 => DeadlineExceeded,
        5 => NotFound,
        7 => PermissionDenied,
        8 => ResourceExhausted,
        13 => Internal,
        14 => Unavailable,
        16 => Unauthenticated,
        _ => Unknown,
    }
}
