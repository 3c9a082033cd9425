//! `firebreak-test-filter`: a proxy-wasm filter whose behaviour is driven by request headers, so
//! the host's tests (and real Envoy, for fidelity) can exercise every host-function category:
//! headers, bodies, local replies, properties, shared data with CAS, queues, timers, time, HTTP and
//! gRPC callouts, metrics, panics and configuration failure.
//!
//! Plugin configuration (a JSON object; only these keys are read, by substring, to stay tiny):
//! - `"reject": true`  → `on_configure` returns false (the plugin must not start);
//! - `"tick_ms": N`    → the root context ticks every N ms and counts ticks in shared key `ticks`.
//!
//! Request headers (all optional):
//! - `x-test-panic`             → panic (trap) in `on_request_headers`;
//! - `x-test-reset`             → reset the stream (`proxy_close_stream`);
//! - `x-test-deny-plain: <status>[:<body>]` → local reply with no headers of the filter's own;
//! - `x-test-deny: <status>`    → local reply `{"error":"denied"}` with that status;
//! - `x-test-add: name=value`   → add a request header;  `x-test-remove: name` → remove one;
//! - `x-dup` (repeated)         → its first value is copied to `x-first-dup`;
//! - `x-test-claim: key`        → get-then-set claim of a shared key; 409 `replay` if taken;
//! - `x-test-counter: key`      → CAS-increment a shared counter; its new value → `x-counter`;
//! - `x-test-callout: cluster`  → HTTP callout; 200 → continue with `x-callout-body`,
//!                                 other status → 403 `callout_denied`, failure → 503 `callout_failed`;
//! - `x-test-grpc: cluster`     → gRPC callout; status 0 → continue, else 503 `grpc_failed`;
//! - `x-test-body: buffer`      → buffer the whole body; "deny" in it → 400 `body_denied`,
//!                                 a body `headers?` → 200 `x-request-headers-seen: <n>` (the
//!                                 request headers still readable at the body's event),
//!                                 otherwise it is upper-cased before it is forwarded;
//! - `x-test-props`             → copy properties into `x-prop-*` request headers (`portable`:
//!   all but `source.address`);
//! - `x-test-prop: a/b,c`       → `x-prop` = the properties at paths `["a", "b"]` and `["c"]`
//!   (`<none>` if absent), joined by commas;
//! - `x-test-enqueue: message`  → enqueue on `test_queue`; the root copies it to shared `queue_last`;
//! - `x-test-time`              → `x-now-ms` = the host's current time;
//! - `x-test-env: NAME`         → `x-env` = the VM's environment variable NAME;
//! - `x-test-random`            → `x-random` = a value from WASI randomness;
//! - `x-test-print: text`       → print it on stdout (WASI).
//! - request trailers: `x-deny-trailer` → 400 `trailer_denied`; else `x-trailers-seen` += 1;
//! - `x-test-read: key`         → `x-read` = the shared value (or `<absent>`);
//! - `x-test-response-callout: cluster` → pause the response for a callout; its status →
//!                                 response header `x-response-callout`;
//! - `x-test-deny-response`     → local reply 502 `response_denied` from `on_response_headers`;
//! - `x-test-response-body`     → buffer the response body; "leak" in it → 502 `response_leak`,
//!                                 otherwise it is upper-cased.
//! Every response gets `x-test-filter: seen`, `x-upstream-status` and `x-code-details`
//! (`response.code_details`); every request increments counter `test_filter.requests`.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType, Status};
use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { counter: Rc::new(Cell::new(None)), queue: None })
    });
}}

struct Root {
    counter: Rc<Cell<Option<u32>>>,
    queue: Option<u32>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        true
    }

    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self
            .get_plugin_configuration()
            .map(|c| String::from_utf8_lossy(&c).into_owned())
            .unwrap_or_default();
        if config.contains("\"reject\": true") || config.contains("\"reject\":true") {
            proxy_wasm::hostcalls::log(LogLevel::Error, "test-filter: rejected configuration")
                .ok();
            return false;
        }
        if let Some(ms) = number_after(&config, "\"tick_ms\":") {
            self.set_tick_period(Duration::from_millis(ms));
        }
        self.counter
            .set(proxy_wasm::hostcalls::define_metric(MetricType::Counter, "test_filter.requests").ok());
        self.queue = proxy_wasm::hostcalls::register_shared_queue("test_queue").ok();
        true
    }

    fn on_tick(&mut self) {
        cas_increment("ticks");
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        if let Ok(Some(message)) = proxy_wasm::hostcalls::dequeue_shared_queue(queue_id) {
            let _ = proxy_wasm::hostcalls::set_shared_data("queue_last", Some(&message), None);
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream { counter: self.counter.clone(), buffer_body: false, deny_response: false, buffer_response: false, response_callout: None, in_response: false }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    counter: Rc<Cell<Option<u32>>>,
    buffer_body: bool,
    deny_response: bool,
    buffer_response: bool,
    response_callout: Option<String>,
    in_response: bool,
}

fn number_after(text: &str, key: &str) -> Option<u64> {
    let rest = text[text.find(key)? + key.len()..].trim_start();
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// Read-modify-write with CAS, retried on mismatch. Returns the new value.
fn cas_increment(key: &str) -> u64 {
    loop {
        let (value, cas) = proxy_wasm::hostcalls::get_shared_data(key).unwrap_or((None, None));
        let current: u64 = value
            .and_then(|v| String::from_utf8(v).ok())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let next = current + 1;
        match proxy_wasm::hostcalls::set_shared_data(key, Some(next.to_string().as_bytes()), cas) {
            Ok(()) => return next,
            Err(Status::CasMismatch) => continue,
            Err(_) => return 0,
        }
    }
}

impl Stream {
    fn reject(&self, status: u32, code: &str) -> Action {
        let body = format!("{{\"error\":\"{code}\"}}");
        self.send_http_response(
            status,
            vec![("content-type", "application/json"), ("x-denied", "1")],
            Some(body.as_bytes()),
        );
        Action::Pause
    }

    fn prop(&self, path: Vec<&str>) -> String {
        match self.get_property(path) {
            Some(bytes) if bytes.len() == 8 && !bytes.is_ascii() => {
                let mut raw = [0u8; 8];
                raw.copy_from_slice(&bytes);
                i64::from_le_bytes(raw).to_string()
            }
            Some(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            None => "<none>".to_string(),
        }
    }
}

impl Context for Stream {
    fn on_http_call_response(&mut self, _token: u32, num_headers: usize, body_size: usize, _n: usize) {
        if self.in_response {
            let status = self.get_http_call_response_header(":status").unwrap_or_else(|| "none".into());
            self.set_http_response_header("x-response-callout", Some(&status));
            self.resume_http_response();
            return;
        }
        if num_headers == 0 {
            self.reject(503, "callout_failed");
            return;
        }
        let status = self.get_http_call_response_header(":status").unwrap_or_default();
        if status != "200" {
            self.reject(403, "callout_denied");
            return;
        }
        let body = self
            .get_http_call_response_body(0, body_size)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        self.add_http_request_header("x-callout-body", &body);
        self.resume_http_request();
    }

    fn on_grpc_call_response(&mut self, _token: u32, status_code: u32, _size: usize) {
        if status_code != 0 {
            self.reject(503, "grpc_failed");
            return;
        }
        self.add_http_request_header("x-grpc", "ok");
        self.resume_http_request();
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(id) = self.counter.get() {
            let _ = proxy_wasm::hostcalls::increment_metric(id, 1);
        }
        if self.get_http_request_header("x-test-panic").is_some() {
            panic!("x-test-panic asked for a trap");
        }
        if self.get_http_request_header("x-test-reset").is_some() {
            self.reset_http_request();
            return Action::Pause;
        }
        if let Some(spec) = self.get_http_request_header("x-test-deny-plain") {
            // "<status>" or "<status>:<body>": no headers of the filter's own.
            let (status, body) = spec.split_once(':').unwrap_or((spec.as_str(), ""));
            let body = (!body.is_empty()).then_some(body.as_bytes());
            self.send_http_response(status.parse().unwrap_or(403), vec![], body);
            return Action::Pause;
        }
        if let Some(status) = self.get_http_request_header("x-test-deny") {
            return self.reject(status.parse().unwrap_or(403), "denied");
        }
        if let Some(first) = self.get_http_request_header("x-dup") {
            self.set_http_request_header("x-first-dup", Some(&first));
        }
        if let Some(spec) = self.get_http_request_header("x-test-add") {
            if let Some((name, value)) = spec.split_once('=') {
                self.add_http_request_header(name, value);
            }
        }
        if let Some(name) = self.get_http_request_header("x-test-remove") {
            self.set_http_request_header(&name, None);
        }
        if let Some(which) = self.get_http_request_header("x-test-props") {
            let pairs = [
                ("x-prop-source-address", vec!["source", "address"]),
                ("x-prop-path", vec!["request", "path"]),
                ("x-prop-method", vec!["request", "method"]),
                ("x-prop-root-id", vec!["plugin_root_id"]),
                ("x-prop-upstream", vec!["firebreak_upstream"]),
            ];
            for (header, path) in pairs {
                // `portable`: not the peer's address, which differs from run to run in Envoy.
                if which == "portable" && header == "x-prop-source-address" {
                    continue;
                }
                let value = self.prop(path);
                self.set_http_request_header(header, Some(&value));
            }
            self.set_property(vec!["firebreak_test"], Some(b"stored"));
            let back = self.prop(vec!["firebreak_test"]);
            self.set_http_request_header("x-prop-roundtrip", Some(&back));
        }
        if let Some(paths) = self.get_http_request_header("x-test-prop") {
            let values: Vec<String> = paths.split(',').map(|path| self.prop(path.split('/').collect())).collect();
            self.set_http_request_header("x-prop", Some(&values.join(",")));
        }
        if self.get_http_request_header("x-test-time").is_some() {
            let ms = self
                .get_current_time()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0);
            self.set_http_request_header("x-now-ms", Some(&ms.to_string()));
        }
        if let Some(text) = self.get_http_request_header("x-test-print") {
            println!("test-filter prints {text}");
        }
        if self.get_http_request_header("x-test-random").is_some() {
            use std::hash::BuildHasher;
            let value = std::collections::hash_map::RandomState::new().hash_one(1u8);
            self.set_http_request_header("x-random", Some(&value.to_string()));
        }
        if let Some(name) = self.get_http_request_header("x-test-env") {
            let value = std::env::var(&name).unwrap_or_else(|_| "<unset>".to_string());
            self.set_http_request_header("x-env", Some(&value));
        }
        if let Some(message) = self.get_http_request_header("x-test-enqueue") {
            if let Ok(Some(queue)) = proxy_wasm::hostcalls::resolve_shared_queue("", "test_queue") {
                let _ = proxy_wasm::hostcalls::enqueue_shared_queue(queue, Some(message.as_bytes()));
            }
        }
        if let Some(key) = self.get_http_request_header("x-test-counter") {
            let n = cas_increment(&key);
            self.set_http_request_header("x-counter", Some(&n.to_string()));
        }
        if let Some(key) = self.get_http_request_header("x-test-claim") {
            let (value, cas) = self.get_shared_data(&key);
            if value.is_some() {
                return self.reject(409, "replay");
            }
            if self.set_shared_data(&key, Some(b"claimed"), cas).is_err() {
                return self.reject(409, "replay");
            }
            self.set_http_request_header("x-claim", Some("won"));
        }
        self.deny_response = self.get_http_request_header("x-test-deny-response").is_some();
        self.buffer_response = self.get_http_request_header("x-test-response-body").is_some();
        self.response_callout = self.get_http_request_header("x-test-response-callout");
        if let Some(key) = self.get_http_request_header("x-test-read") {
            let value = self
                .get_shared_data(&key)
                .0
                .map(|v| String::from_utf8_lossy(&v).into_owned())
                .unwrap_or_else(|| "<absent>".to_string());
            self.set_http_request_header("x-read", Some(&value));
        }
        if let Some(body_mode) = self.get_http_request_header("x-test-body") {
            self.buffer_body = body_mode == "buffer";
        }
        if let Some(cluster) = self.get_http_request_header("x-test-callout") {
            let headers = vec![(":method", "GET"), (":path", "/check"), (":authority", "authz")];
            return match self.dispatch_http_call(&cluster, headers, None, vec![], Duration::from_millis(500)) {
                Ok(_) => Action::Pause,
                Err(_) => self.reject(503, "callout_failed"),
            };
        }
        if let Some(cluster) = self.get_http_request_header("x-test-grpc") {
            return match self.dispatch_grpc_call(
                &cluster,
                "test.Check",
                "Check",
                vec![],
                Some(b"ping"),
                Duration::from_millis(500),
            ) {
                Ok(_) => Action::Pause,
                Err(_) => self.reject(503, "grpc_failed"),
            };
        }
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !self.buffer_body {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = self.get_http_request_body(0, body_size).unwrap_or_default();
        if body.windows(4).any(|w| w == b"deny") {
            return self.reject(400, "body_denied");
        }
        if body == b"headers?" {
            // How many request headers the host still hands over after on_request_headers
            // continued (Envoy: none). Pairs only: a value read of a map let go is a BadArgument,
            // which the SDK turns into a panic.
            let seen = self.get_http_request_headers().len().to_string();
            self.send_http_response(200, vec![("x-request-headers-seen", seen.as_str())], None);
            return Action::Pause;
        }
        let upper = body.to_ascii_uppercase();
        self.set_http_request_body(0, body_size, &upper);
        Action::Continue
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        if self.get_http_request_trailer("x-deny-trailer").is_some() {
            return self.reject(400, "trailer_denied");
        }
        let seen = self.get_http_request_trailer("x-trailers-seen").and_then(|v| v.parse::<u32>().ok()).unwrap_or(0);
        self.set_http_request_trailer("x-trailers-seen", Some(&(seen + 1).to_string()));
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !self.buffer_response {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = self.get_http_response_body(0, body_size).unwrap_or_default();
        if body.windows(4).any(|w| w == b"leak") {
            return self.reject(502, "response_leak");
        }
        self.set_http_response_body(0, body_size, &body.to_ascii_uppercase());
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.in_response = true;
        if let Some(cluster) = self.response_callout.take() {
            let headers = vec![(":method", "GET"), (":path", "/check"), (":authority", "authz")];
            if self.dispatch_http_call(&cluster, headers, None, vec![], Duration::from_millis(500)).is_ok() {
                return Action::Pause;
            }
        }
        if std::mem::take(&mut self.deny_response) {
            return self.reject(502, "response_denied");
        }
        self.set_http_response_header("x-test-filter", Some("seen"));
        let details = self.get_property(vec!["response", "code_details"]).unwrap_or_default();
        self.set_http_response_header("x-code-details", Some(&String::from_utf8_lossy(&details)));
        let upstream_status = self.get_http_response_header(":status").unwrap_or_default();
        self.set_http_response_header("x-upstream-status", Some(&upstream_status));
        Action::Continue
    }
}
