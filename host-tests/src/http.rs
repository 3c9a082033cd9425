//! The test-facing vocabulary: a request, how the upstream and callout clusters answer, and the
//! verdict a request gets.

use std::collections::BTreeMap;

/// A downstream request, as Envoy's HTTP connection manager hands it to the filter chain.
#[derive(Debug, Clone)]
pub struct Request {
    pub headers: Vec<(String, String)>,
    /// Body chunks, delivered one `on_request_body` call each (the last with end_of_stream).
    pub body_chunks: Vec<Vec<u8>>,
    pub trailers: Vec<(String, String)>,
    /// `source.address` as Envoy reports it: "ip:port".
    pub source_address: String,
    /// Properties already set by earlier filters (Envoy filter state), or overrides of built-in
    /// properties ("source.address", "request.time", "connection.mtls"). A path is dotted
    /// ("firebreak.principal": found by a module reading `["firebreak.principal"]` or
    /// `["firebreak", "principal"]`) or its exact segments separated by NUL
    /// ([`Request::property_segments`]: found only by that path).
    pub properties: Vec<(String, Vec<u8>)>,
    /// How the upstream answers this request (`None`: as the host's [`Upstream`] says).
    pub upstream: Option<Upstream>,
    /// The client goes away once the whole request has reached the upstream, before the
    /// answer: Envoy resets the stream (the filters see no response, then `on_log`).
    pub disconnect: bool,
    /// How the callouts this request causes are answered, by cluster, instead of the host's
    /// script ([`crate::PluginSpec::callouts`]). The cluster must exist there.
    pub callouts: BTreeMap<String, CalloutReply>,
}

impl Request {
    pub fn new(method: &str, path: &str) -> Request {
        Request {
            headers: vec![
                (":authority".into(), "api.example.com".into()),
                (":path".into(), path.into()),
                (":method".into(), method.into()),
                (":scheme".into(), "http".into()),
            ],
            body_chunks: Vec::new(),
            trailers: Vec::new(),
            source_address: "127.0.0.1:40000".into(),
            properties: Vec::new(),
            upstream: None,
            disconnect: false,
            callouts: BTreeMap::new(),
        }
    }

    pub fn get(path: &str) -> Request {
        Request::new("GET", path)
    }

    pub fn post(path: &str) -> Request {
        Request::new("POST", path)
    }

    /// Adds a header (names are lower-cased, as Envoy's codec does). Repeat for duplicates.
    pub fn header(mut self, name: &str, value: &str) -> Request {
        self.headers.push((name.to_ascii_lowercase(), value.to_string()));
        self
    }

    /// Replaces a pseudo-header or header wholly.
    pub fn set_header(mut self, name: &str, value: &str) -> Request {
        let name = name.to_ascii_lowercase();
        self.headers.retain(|(k, _)| *k != name);
        self.headers.push((name, value.to_string()));
        self
    }

    pub fn body(mut self, body: impl AsRef<[u8]>) -> Request {
        self.body_chunks = vec![body.as_ref().to_vec()];
        self
    }

    pub fn chunks<I: IntoIterator<Item = B>, B: AsRef<[u8]>>(mut self, chunks: I) -> Request {
        self.body_chunks = chunks.into_iter().map(|c| c.as_ref().to_vec()).collect();
        self
    }

    pub fn trailer(mut self, name: &str, value: &str) -> Request {
        self.trailers.push((name.to_ascii_lowercase(), value.to_string()));
        self
    }

    pub fn from(mut self, source_address: &str) -> Request {
        self.source_address = source_address.to_string();
        self
    }

    pub fn property(mut self, path: &str, value: impl AsRef<[u8]>) -> Request {
        self.properties.push((path.to_string(), value.as_ref().to_vec()));
        self
    }

    /// A property under exactly these path segments (as a module names them in
    /// `proxy_get_property`; a dotted segment stays one segment).
    pub fn property_segments(self, segments: &[&str], value: impl AsRef<[u8]>) -> Request {
        let path = segments.join("\0");
        self.property(&path, value)
    }

    /// This request gets this answer from the upstream (instead of the host's default).
    pub fn answered_by(mut self, upstream: Upstream) -> Request {
        self.upstream = Some(upstream);
        self
    }

    /// The callouts this request causes to `cluster` get this answer (instead of the host's).
    pub fn callout(mut self, cluster: &str, reply: CalloutReply) -> Request {
        self.callouts.insert(cluster.to_string(), reply);
        self
    }

    pub fn header_value(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub fn body_bytes(&self) -> Vec<u8> {
        self.body_chunks.concat()
    }
}

/// How the upstream service answers a forwarded request.
#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The upstream answers after this long. At or beyond the route timeout Envoy's router
    /// answers instead: `504 upstream request timeout` (`response_timeout`).
    pub delay_ms: u64,
    /// The upstream reads the request and closes the connection without answering: Envoy's
    /// router answers `503` (`upstream_reset_before_response_started{connection_termination}`).
    pub reset: bool,
    /// The upstream sends its headers (with the whole body's `content-length`) and only this
    /// many bytes of the body, then closes the connection: the filters see the headers and
    /// that part of the body, then Envoy resets the stream (the client gets no complete answer).
    pub body_cut_at: Option<usize>,
}

/// Envoy's `response.code_details` for an answer that came from the upstream.
pub const VIA_UPSTREAM: &str = "via_upstream";

/// What reaches the filters' encoder side for a forwarded request: the upstream's answer, or
/// the reply Envoy's router makes in its place.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterAnswer {
    /// `:status` first.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// `response.code_details`.
    pub details: String,
    /// How long the answer took (the fake clock moves by it).
    pub elapsed_ms: u64,
    /// The body is cut short (`body` is the part sent): the stream is reset after it.
    pub cut: bool,
}

impl RouterAnswer {
    /// The answer to a gRPC request (see [`is_grpc_request`]): the router's own replies (504,
    /// 503) become Envoy's gRPC local replies; an upstream's answer is left as it is.
    pub fn for_request(self, grpc: bool) -> RouterAnswer {
        if !grpc || self.details == VIA_UPSTREAM {
            return self;
        }
        let status = self.headers.first().and_then(|(_, v)| v.parse().ok()).unwrap_or(503);
        let headers = grpc_local_reply_headers(status, None, &self.body);
        RouterAnswer { headers, body: Vec::new(), ..self }
    }
}

/// Whether Envoy treats a request as gRPC (`Grpc::Common::isGrpcRequestHeaders`): its
/// `content-type` is `application/grpc`, or starts with `application/grpc+` or
/// `application/grpc;`, as the client sent it (before the filters).
pub fn is_grpc_request(headers: &[(String, String)]) -> bool {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .is_some_and(|(_, v)| v == "application/grpc" || v.starts_with("application/grpc+") || v.starts_with("application/grpc;"))
}

/// Envoy's `Grpc::Utility::httpToGrpcStatus`: the gRPC status of a local reply that names none.
pub fn http_to_grpc_status(status: u16) -> u32 {
    match status {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

/// The headers of Envoy's local reply to a gRPC request (`prepareLocalReply`, trailers only):
/// `:status 200`, `content-type: application/grpc`, `grpc-status` (`grpc_status` if it is a
/// gRPC status, 0..=16, else mapped from the HTTP status), `grpc-message` (the body,
/// percent-encoded, if any). The body is not sent.
pub fn grpc_local_reply_headers(status: u16, grpc_status: Option<i32>, body: &[u8]) -> Vec<(String, String)> {
    let code = match grpc_status {
        Some(g) if (0..=16).contains(&g) => g as u32,
        _ => http_to_grpc_status(status),
    };
    let mut headers = vec![
        (":status".to_string(), "200".to_string()),
        ("content-type".to_string(), "application/grpc".to_string()),
        ("grpc-status".to_string(), code.to_string()),
    ];
    let mut text = body;
    if text.last() == Some(&b'\n') {
        text = &text[..text.len() - 1];
    }
    if !text.is_empty() {
        headers.push(("grpc-message".to_string(), percent_encode(text)));
    }
    headers
}

/// Envoy's `PercentEncoding::encode` for `grpc-message`: `%` and bytes outside printable ASCII.
fn percent_encode(text: &[u8]) -> String {
    let mut out = String::new();
    for &b in text {
        if b == b'%' || !(b' '..=b'~').contains(&b) {
            out.push_str(&format!("%{b:02X}"));
        } else {
            out.push(b as char);
        }
    }
    out
}

impl Upstream {
    /// The answer the filters see, given the route timeout (0: none), as Envoy's router makes it.
    pub fn router_answer(&self, route_timeout_ms: u64) -> RouterAnswer {
        let local = |status: u16, body: &str, details: &str, elapsed_ms: u64| RouterAnswer {
            headers: vec![
                (":status".into(), status.to_string()),
                ("content-length".into(), body.len().to_string()),
                ("content-type".into(), "text/plain".into()),
            ],
            body: body.as_bytes().to_vec(),
            details: details.into(),
            elapsed_ms,
            cut: false,
        };
        if route_timeout_ms > 0 && self.delay_ms >= route_timeout_ms {
            return local(504, "upstream request timeout", "response_timeout", route_timeout_ms);
        }
        if self.reset {
            return local(
                503,
                "upstream connect error or disconnect/reset before headers. reset reason: connection termination",
                "upstream_reset_before_response_started{connection_termination}",
                self.delay_ms,
            );
        }
        let mut headers: Vec<(String, String)> = vec![(":status".into(), self.status.to_string())];
        headers.extend(self.headers.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.clone())));
        headers.push(("content-length".into(), self.body.len().to_string()));
        let (body, cut) = match self.body_cut_at {
            Some(n) if n < self.body.len() => (self.body[..n].to_vec(), true),
            _ => (self.body.clone(), false),
        };
        RouterAnswer { headers, body, details: VIA_UPSTREAM.into(), elapsed_ms: self.delay_ms, cut }
    }
}

impl Default for Upstream {
    fn default() -> Self {
        Upstream {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: br#"{"upstream":"ok"}"#.to_vec(),
            delay_ms: 0,
            reset: false,
            body_cut_at: None,
        }
    }
}

/// How a callout cluster answers an HTTP callout, as scripted by the test.
#[derive(Debug, Clone, PartialEq)]
pub enum CalloutReply {
    /// A response: `:status` is added to the headers.
    Respond { status: u16, headers: Vec<(String, String)>, body: Vec<u8> },
    /// The callout fails: the filter is called back with no headers (Envoy's `onFailure`).
    Fail,
    /// Nothing answers within the callout's timeout. Envoy's async client then answers itself
    /// with 504 `upstream request timeout`.
    Timeout,
    /// The cluster resets the connection before headers. Envoy's router answers 503.
    Reset,
    /// The callout stays pending until the test answers it by hand.
    Hold,
    /// A gRPC answer (for `proxy_grpc_call` and `proxy_grpc_stream` on this cluster).
    Grpc(GrpcAnswer),
}

impl CalloutReply {
    pub fn ok(body: impl AsRef<[u8]>) -> CalloutReply {
        CalloutReply::Respond { status: 200, headers: Vec::new(), body: body.as_ref().to_vec() }
    }

    pub fn status(status: u16, body: impl AsRef<[u8]>) -> CalloutReply {
        CalloutReply::Respond { status, headers: Vec::new(), body: body.as_ref().to_vec() }
    }
}

/// How a gRPC callout is answered.
#[derive(Debug, Clone, PartialEq)]
pub enum GrpcReply {
    /// Status 0 with this message.
    Ok(Vec<u8>),
    /// This status and message, no message body.
    Status(u32, String),
    /// The whole answer.
    Respond(GrpcAnswer),
    Hold,
}

impl GrpcReply {
    /// The answer this reply gives (`None`: held).
    pub fn answer(&self) -> Option<GrpcAnswer> {
        match self {
            GrpcReply::Ok(body) => Some(GrpcAnswer { body: body.clone(), ..GrpcAnswer::default() }),
            GrpcReply::Status(status, message) => {
                Some(GrpcAnswer { status: *status, message: message.clone(), ..GrpcAnswer::default() })
            }
            GrpcReply::Respond(a) => Some(a.clone()),
            GrpcReply::Hold => None,
        }
    }
}

/// A gRPC server's answer to a call or a stream: initial metadata, one message (none if
/// empty), trailing metadata and the status with its message.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GrpcAnswer {
    /// The gRPC status (0 OK, 14 UNAVAILABLE, ...).
    pub status: u32,
    /// `grpc-message`.
    pub message: String,
    pub body: Vec<u8>,
    pub initial_metadata: Vec<(String, String)>,
    pub trailers: Vec<(String, String)>,
    /// The server answers after this long (the host moves its clock; at or past the call's
    /// timeout, Envoy's gRPC client ends it instead).
    pub delay_ms: u64,
}

/// An HTTP or gRPC callout the filter made.
#[derive(Debug, Clone, PartialEq)]
pub struct Callout {
    pub token: u32,
    pub cluster: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub timeout_ms: u32,
    /// For gRPC: "service/method".
    pub grpc_method: Option<String>,
}

/// A reply the filter generated itself (`proxy_send_local_response`).
#[derive(Debug, Clone, PartialEq)]
pub struct LocalReply {
    pub status: u16,
    pub details: String,
    pub body: Vec<u8>,
    pub headers: Vec<(String, String)>,
    pub grpc_status: i32,
}

/// What the upstream received.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UpstreamRequest {
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub trailers: Vec<(String, String)>,
}

impl UpstreamRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// What a request got: the response the client saw and what reached the upstream.
#[derive(Debug, Clone, Default)]
pub struct Verdict {
    /// The response status the client saw; 0 when the stream was reset or never answered.
    pub status: u16,
    pub response_headers: Vec<(String, String)>,
    pub response_body: Vec<u8>,
    /// Set when the filter (or the host, on a trap) answered locally.
    pub local_reply: Option<LocalReply>,
    /// Envoy's `response.code_details` of the response the client got: `via_upstream`, the
    /// router's (`response_timeout`, ...), or a local reply's details.
    pub code_details: Option<String>,
    /// What the upstream received; `None` unless the whole request was forwarded.
    pub upstream: Option<UpstreamRequest>,
    /// The request headers went upstream (Envoy streams them before the body), even if the
    /// request was then cut short by a local reply from a body callback.
    pub upstream_headers_sent: bool,
    /// The filter reset the stream (`proxy_close_stream`).
    pub reset: bool,
    /// The request was left paused with nothing pending that could resume it.
    pub stalled: bool,
    /// The VM trapped while handling this stream (or had already failed): the message.
    pub trap: Option<String>,
    /// The callouts this stream made, in order.
    pub callouts: Vec<Callout>,
    /// Host calls made on this stream's behalf, by import name.
    pub host_calls: BTreeMap<String, u64>,
    /// Log lines written while this stream was the effective context.
    pub logs: Vec<String>,
    /// Strict-mode violations (unexpected host calls) made on this stream's behalf.
    pub violations: Vec<String>,
}

impl Verdict {
    pub fn forwarded(&self) -> bool {
        self.upstream.is_some()
    }

    /// The `error` field of a JSON response body, Firebreak's stable error code.
    pub fn error_code(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_slice(&self.response_body).ok()?;
        v.get("error")?.as_str().map(str::to_string)
    }

    pub fn response_header(&self, name: &str) -> Option<&str> {
        self.response_headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub fn upstream_header(&self, name: &str) -> Option<&str> {
        self.upstream.as_ref()?.header(name)
    }

    pub fn upstream_body(&self) -> Option<&[u8]> {
        self.upstream.as_ref().map(|u| u.body.as_slice())
    }

    /// Total host calls made on this stream's behalf (the performance budget counts these).
    pub fn host_call_total(&self) -> u64 {
        self.host_calls.values().sum()
    }
}
