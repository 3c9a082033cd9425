//! The scenario file format: what a file, a case and an expectation say.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context as _, Result};
use base64::Engine as _;
use serde::Deserialize;

use crate::host::PluginSpec;
use crate::http::{CalloutReply, GrpcAnswer, Upstream};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioFile {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Path to the module, relative to the scenario file. The runner's `--module` overrides it.
    #[serde(default)]
    pub module: Option<String>,
    #[serde(default)]
    pub plugin: PluginSection,
    #[serde(default = "one")]
    pub workers: usize,
    #[serde(default)]
    pub upstream: Option<UpstreamSpec>,
    #[serde(default)]
    pub callouts: BTreeMap<String, CalloutSpec>,
    /// "ok" (default) or "fail": the plugin must refuse to start.
    #[serde(default)]
    pub expect_start: Option<String>,
    /// The whole file runs only in the host (give the reason).
    #[serde(default)]
    pub host_only: Option<String>,
    /// Strict mode (host): a misused host call is a failure of the case.
    #[serde(default)]
    pub strict: bool,
    /// Strict mode with an allow-list (host): any other host call fails the case.
    #[serde(default)]
    pub allow_host_calls: Option<Vec<String>>,
    /// Envoy's `--concurrency` in Envoy mode (default 2). With 1, every request meets the same
    /// VM, so what happens after a trap is deterministic there too.
    #[serde(default)]
    pub envoy_concurrency: Option<u32>,
    /// The route's timeout (Envoy's `route.timeout`), in both modes. Default 5000.
    #[serde(default)]
    pub route_timeout_ms: Option<u64>,
    /// The per-stream buffer limit (Envoy's `per_connection_buffer_limit_bytes` on the listener
    /// and the upstream cluster), in both modes. Default Envoy's, 1 MiB.
    #[serde(default)]
    pub buffer_limit_bytes: Option<u64>,
    /// Several filters in one chain, in Envoy's order (instead of `module` and `plugin`).
    #[serde(default)]
    pub chain: Vec<ChainFilter>,
    #[serde(default)]
    pub cases: Vec<Case>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainFilter {
    /// Relative to the scenario file.
    pub module: String,
    #[serde(default)]
    pub plugin: PluginSection,
}

fn one() -> usize {
    1
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSection {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub root_id: String,
    #[serde(default)]
    pub vm_id: String,
    #[serde(default)]
    pub configuration: Option<serde_yaml::Value>,
    #[serde(default)]
    pub vm_configuration: Option<serde_yaml::Value>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// How the upstream answers: the file's `upstream:` (every request) or a case's (that request).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSpec {
    #[serde(default = "ok_status")]
    pub status: u16,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub body: String,
    /// The body as base64 (binary answers); replaces `body`.
    #[serde(default)]
    pub body_base64: Option<String>,
    /// A body of this many bytes (`x`); replaces `body` (large bodies).
    #[serde(default)]
    pub body_bytes: Option<usize>,
    /// Answer after this long; at or beyond `route_timeout_ms` Envoy's router answers
    /// `504 upstream request timeout` instead (the host moves its fake clock by the wait).
    #[serde(default)]
    pub delay_ms: u64,
    /// Read the request, then close the connection without answering: Envoy's router answers 503.
    #[serde(default)]
    pub reset: bool,
    /// Send the headers and only this many bytes of the body, then close the connection:
    /// the filters see a partial body, then Envoy resets the stream (status 0 to the client).
    #[serde(default)]
    pub body_cut_at: Option<usize>,
}

impl UpstreamSpec {
    pub fn to_upstream(&self) -> Result<Upstream> {
        let body = match (&self.body_base64, self.body_bytes) {
            (_, Some(n)) => vec![b'x'; n],
            (Some(b), None) => base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .context("upstream.body_base64 is not base64")?,
            (None, None) => self.body.clone().into_bytes(),
        };
        Ok(Upstream {
            status: self.status,
            headers: self.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            body,
            delay_ms: self.delay_ms,
            reset: self.reset,
            body_cut_at: self.body_cut_at,
        })
    }
}

fn ok_status() -> u16 {
    200
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum CalloutSpec {
    /// fail | timeout | reset | hold
    Word(String),
    /// A gRPC answer: the cluster is a gRPC (HTTP/2) cluster.
    Grpc { grpc: GrpcSpec },
    Respond {
        #[serde(default = "ok_status")]
        status: u16,
        #[serde(default)]
        headers: BTreeMap<String, String>,
        #[serde(default)]
        body: String,
        /// The body as base64 (binary answers); replaces `body`.
        #[serde(default)]
        body_base64: Option<String>,
        /// A `grpc:` answer that did not read as one (an unknown field, a wrong type): kept
        /// here so that the error is reported instead of an HTTP answer silently taken.
        #[serde(default)]
        grpc: Option<serde_yaml::Value>,
    },
}

/// A gRPC cluster's answer to a call or a stream (`grpc:` under a callout cluster).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcSpec {
    /// The gRPC status (0: OK).
    #[serde(default)]
    pub status: u32,
    /// `grpc-message`.
    #[serde(default)]
    pub message: String,
    /// The response message (none if empty).
    #[serde(default)]
    pub body: String,
    #[serde(default)]
    pub body_base64: Option<String>,
    /// Initial metadata (the response headers), seen by streams.
    #[serde(default)]
    pub initial_metadata: BTreeMap<String, String>,
    /// Trailing metadata, seen by streams.
    #[serde(default)]
    pub trailers: BTreeMap<String, String>,
    /// Answer after this long (at or past the call's timeout, Envoy's gRPC client gives up).
    #[serde(default)]
    pub delay_ms: u64,
}

impl GrpcSpec {
    pub fn answer(&self) -> Result<GrpcAnswer> {
        if self.status > 16 {
            return Err(anyhow!("grpc status {} is not a gRPC status (0..=16)", self.status));
        }
        let body = match &self.body_base64 {
            Some(b) => base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .context("grpc body_base64 is not base64")?,
            None => self.body.clone().into_bytes(),
        };
        let pairs = |m: &BTreeMap<String, String>| m.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.clone())).collect();
        Ok(GrpcAnswer {
            status: self.status,
            message: self.message.clone(),
            body,
            initial_metadata: pairs(&self.initial_metadata),
            trailers: pairs(&self.trailers),
            delay_ms: self.delay_ms,
        })
    }
}

impl CalloutSpec {
    /// Status 200, no headers, an empty body.
    pub fn default_answer() -> CalloutSpec {
        CalloutSpec::Respond { status: 200, headers: BTreeMap::new(), body: String::new(), body_base64: None, grpc: None }
    }

    /// An error if a `grpc:` answer did not read as one.
    pub fn check(&self) -> Result<()> {
        if let CalloutSpec::Respond { grpc: Some(v), .. } = self {
            serde_yaml::from_value::<GrpcSpec>(v.clone()).context("a callout's grpc: answer")?;
            return Err(anyhow!("a callout's grpc: answer has fields besides grpc:"));
        }
        Ok(())
    }

    pub fn reply(&self) -> Result<CalloutReply> {
        self.check()?;
        Ok(match self {
            CalloutSpec::Word(w) => match w.as_str() {
                "fail" => CalloutReply::Fail,
                "timeout" => CalloutReply::Timeout,
                "reset" => CalloutReply::Reset,
                "hold" => CalloutReply::Hold,
                other => return Err(anyhow!("unknown callout answer {other:?}")),
            },
            CalloutSpec::Grpc { grpc } => CalloutReply::Grpc(grpc.answer()?),
            CalloutSpec::Respond { status, headers, .. } => CalloutReply::Respond {
                status: *status,
                headers: headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                body: self.body()?,
            },
        })
    }

    /// The body of a `Respond` answer (`body_base64` decoded, or `body`).
    pub fn body(&self) -> Result<Vec<u8>> {
        match self {
            CalloutSpec::Respond { body_base64: Some(b), .. } => base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .context("callout body_base64 is not base64"),
            CalloutSpec::Respond { body, .. } => Ok(body.clone().into_bytes()),
            CalloutSpec::Word(_) | CalloutSpec::Grpc { .. } => Ok(Vec::new()),
        }
    }

    /// Whether real Envoy can be made to answer this way.
    pub fn envoy_can(&self) -> bool {
        !matches!(self, CalloutSpec::Word(w) if w == "fail" || w == "hold")
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(untagged)]
pub enum Headers {
    #[default]
    None,
    Map(BTreeMap<String, String>),
    List(Vec<(String, String)>),
}

impl Headers {
    pub fn pairs(&self) -> Vec<(String, String)> {
        match self {
            Headers::None => Vec::new(),
            Headers::Map(m) => m.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            Headers::List(l) => l.clone(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestSpec {
    #[serde(default = "get")]
    pub method: String,
    #[serde(default = "slash")]
    pub path: String,
    #[serde(default = "authority")]
    pub authority: String,
    #[serde(default)]
    pub headers: Headers,
    #[serde(default)]
    pub body: Option<String>,
    /// The body as base64, for binary bodies (gzip, deflate); replaces `body`.
    #[serde(default)]
    pub body_base64: Option<String>,
    /// A body of this many bytes (`x`); replaces `body` (large bodies).
    #[serde(default)]
    pub body_bytes: Option<usize>,
    /// The client disconnects once the upstream has the whole request, before the answer (give
    /// the case an upstream `delay_ms` so that it has not answered by then).
    #[serde(default)]
    pub disconnect: bool,
    /// Request trailers (host: `on_request_trailers`; Envoy: a chunked body with trailers).
    #[serde(default)]
    pub trailers: Headers,
    /// Body delivered in several `on_request_body` calls (host only; Envoy gets the whole).
    #[serde(default)]
    pub chunks: Vec<String>,
    /// `source.address` (host only: Envoy reports the real peer, 127.0.0.1:<port>).
    #[serde(default)]
    pub source: Option<String>,
    /// Properties set by earlier filters, or built-in ones overridden (host only).
    #[serde(default)]
    pub properties: Properties,
}

/// A request's properties: a mapping of dotted paths to values, or a list of `{ path, value }`
/// whose path is dotted or a list of segments.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(untagged)]
pub enum Properties {
    #[default]
    None,
    Map(BTreeMap<String, String>),
    List(Vec<PropertyEntry>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PropertyEntry {
    pub path: PropertyPath,
    pub value: String,
}

/// A property path: dotted (`firebreak.principal`: found by a module reading it as one segment
/// or split at the dots) or its segments (`[a.b, c]`: found only by exactly that path).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PropertyPath {
    Dotted(String),
    Segments(Vec<String>),
}

impl Properties {
    /// (path, value): a dotted path as written, segments joined by NUL (as the ABI sends them).
    pub fn pairs(&self) -> Vec<(String, String)> {
        match self {
            Properties::None => Vec::new(),
            Properties::Map(m) => m.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            Properties::List(l) => l
                .iter()
                .map(|e| {
                    let path = match &e.path {
                        PropertyPath::Dotted(d) => d.clone(),
                        PropertyPath::Segments(s) => s.join("\0"),
                    };
                    (path, e.value.clone())
                })
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.pairs().is_empty()
    }
}

fn get() -> String {
    "GET".into()
}
fn slash() -> String {
    "/".into()
}
fn authority() -> String {
    "api.example.com".into()
}

/// Signs the request at run time (created = now + offset) with firebreak-core's client signer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignSpec {
    pub key_id: String,
    /// The shared secret, base64.
    pub secret_b64: String,
    #[serde(default)]
    pub components: Option<Vec<String>>,
    #[serde(default)]
    pub extra_covered_headers: Vec<String>,
    #[serde(default)]
    pub created_offset: i64,
    #[serde(default)]
    pub expires_offset: Option<i64>,
    #[serde(default)]
    pub nonce: Option<String>,
    #[serde(default = "label")]
    pub label: String,
    /// Sign this body instead of the one sent (to make a digest mismatch).
    #[serde(default)]
    pub body_override: Option<String>,
    /// Flip a character of the signature after signing.
    #[serde(default)]
    pub tamper: bool,
    /// Sign as if the request used this method (to show a method changed in flight).
    #[serde(default)]
    pub method: Option<String>,
    /// Sign as if the request had this path and query (to show a path changed in flight).
    #[serde(default)]
    pub path: Option<String>,
}

fn label() -> String {
    "sig1".into()
}

/// An expected header value: one string (the first value, as `proxy_get_header_map_value` reads
/// it) or a list (every value, in order: repeated headers).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum HeaderValue {
    One(String),
    All(Vec<String>),
}

/// A log line the module must (or, with `absent: true`, must not) write during the case.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogExpect {
    /// trace | debug | info | warn | error | critical (any when absent).
    #[serde(default)]
    pub level: Option<String>,
    /// The whole message.
    #[serde(default)]
    pub text: Option<String>,
    /// A part of the message.
    #[serde(default)]
    pub contains: Option<String>,
    #[serde(default)]
    pub absent: bool,
}

impl LogExpect {
    pub(crate) fn matches(&self, level: &str, message: &str) -> bool {
        self.level.as_deref().is_none_or(|l| normalize_level(l) == normalize_level(level))
            && self.text.as_deref().is_none_or(|t| t == message)
            && self.contains.as_deref().is_none_or(|c| message.contains(c))
    }
}

/// Envoy says `warning`, the host (and the ABI's names) `warn`.
fn normalize_level(level: &str) -> &str {
    match level {
        "warning" => "warn",
        other => other,
    }
}

/// An HTTP callout the module must make during the case: its cluster and the named headers
/// (`:method`, `:path`, `:authority` included; `null`: absent).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalloutExpect {
    pub cluster: String,
    #[serde(default)]
    pub headers: BTreeMap<String, Option<HeaderValue>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    #[serde(default)]
    pub status: Option<u16>,
    /// The `error` field of the JSON body; `null` means "no error field".
    #[serde(default, deserialize_with = "some")]
    pub error: Option<Option<String>>,
    #[serde(default)]
    pub forwarded: Option<bool>,
    /// Header → value the upstream saw (a list: every value); `null` means absent.
    #[serde(default)]
    pub upstream_headers: BTreeMap<String, Option<HeaderValue>>,
    #[serde(default)]
    pub upstream_body: Option<String>,
    /// The body the upstream got, as base64 (binary bodies).
    #[serde(default)]
    pub upstream_body_base64: Option<String>,
    /// Trailer → value the upstream saw; `null` means absent.
    #[serde(default)]
    pub upstream_trailers: BTreeMap<String, Option<HeaderValue>>,
    #[serde(default)]
    pub response_headers: BTreeMap<String, Option<HeaderValue>>,
    #[serde(default)]
    pub response_body_contains: Option<String>,
    /// The whole response body the client got.
    #[serde(default)]
    pub response_body: Option<String>,
    /// Host-call budget for this request (host only).
    #[serde(default)]
    pub max_host_calls: Option<u64>,
    /// Log lines written during the case (since the previous case; the first case includes the
    /// plugin's start). Host: every context's `proxy_log`; Envoy: its `wasm` log, or on the
    /// native module its `dynamic_modules` log; core: the flow's lines.
    #[serde(default)]
    pub logs: Vec<LogExpect>,
    /// The HTTP callouts made during the case, in any order, and no others.
    #[serde(default)]
    pub callouts: Option<Vec<CalloutExpect>>,
    /// Whether the module traps in this case (host: the trap; Envoy: its `Function: ... failed`
    /// log line). Without it a trap fails the case unless it expects status 503 (or, on a gRPC
    /// request, `grpc-status: "14"`).
    #[serde(default)]
    pub trap: Option<bool>,
}

fn some<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Ok(Some(Option::<String>::deserialize(d)?))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    /// Runs only in the host (give the reason).
    #[serde(default)]
    pub host_only: Option<String>,
    #[serde(default)]
    pub worker: usize,
    /// Advance the fake clock (and fire ticks) before the request. Host only, unless
    /// `real_time`.
    #[serde(default)]
    pub advance_ms: u64,
    /// Envoy mode: wait `advance_ms` of real time instead of skipping the case (for checks that
    /// hold whatever the exact times: ticks that must have fired by then).
    #[serde(default)]
    pub real_time: bool,
    #[serde(default)]
    pub request: Option<RequestSpec>,
    #[serde(default)]
    pub sign: Option<SignSpec>,
    /// How the upstream answers this request (instead of the file's `upstream`).
    #[serde(default)]
    pub upstream: Option<UpstreamSpec>,
    /// How the callouts this case causes are answered, by cluster (instead of the file's
    /// `callouts`; a cluster named only in cases answers other cases with status 200).
    #[serde(default)]
    pub callouts: BTreeMap<String, CalloutSpec>,
    #[serde(default)]
    pub expect: Expect,
    /// Requests on several workers with a chosen interleaving of shared-data operations.
    #[serde(default)]
    pub race: Option<RaceSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RaceSpec {
    pub requests: Vec<RaceRequest>,
    #[serde(default)]
    pub schedule: Vec<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RaceRequest {
    pub worker: usize,
    pub request: RequestSpec,
    #[serde(default)]
    pub sign: Option<SignSpec>,
    #[serde(default)]
    pub upstream: Option<UpstreamSpec>,
    #[serde(default)]
    pub expect: Expect,
}

impl ScenarioFile {
    pub fn load(path: &Path) -> Result<ScenarioFile> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// The module of every filter, in chain order (one for a single-filter file).
    pub fn module_paths(&self, file: &Path, override_path: Option<&Path>) -> Result<Vec<PathBuf>> {
        if self.chain.is_empty() {
            return Ok(vec![self.module_path(file, override_path)?]);
        }
        let dir = file.parent().unwrap_or(Path::new("."));
        Ok(self.chain.iter().map(|f| dir.join(&f.module)).collect())
    }

    /// Each filter's plugin section, in chain order.
    pub fn plugins(&self) -> Vec<&PluginSection> {
        if self.chain.is_empty() {
            vec![&self.plugin]
        } else {
            self.chain.iter().map(|f| &f.plugin).collect()
        }
    }

    pub fn module_path(&self, file: &Path, override_path: Option<&Path>) -> Result<PathBuf> {
        if let Some(p) = override_path {
            return Ok(p.to_path_buf());
        }
        let m = self.module.as_ref().ok_or_else(|| anyhow!("{}: no module (pass --module)", file.display()))?;
        Ok(file.parent().unwrap_or(Path::new(".")).join(m))
    }

    pub fn expects_start_failure(&self) -> bool {
        self.expect_start.as_deref() == Some("fail")
    }

    pub fn plugin_spec(&self) -> Result<PluginSpec> {
        self.plugin_spec_for(&self.plugin)
    }

    pub fn plugin_spec_for(&self, plugin: &PluginSection) -> Result<PluginSpec> {
        let mut callouts = BTreeMap::new();
        for (k, v) in self.callout_clusters() {
            callouts.insert(k, v.reply()?);
        }
        Ok(PluginSpec {
            configuration: value_bytes(&plugin.configuration)?,
            vm_configuration: value_bytes(&plugin.vm_configuration)?,
            root_id: plugin.root_id.clone(),
            vm_id: plugin.vm_id.clone(),
            env: plugin.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            workers: self.workers.max(1),
            callouts,
            upstream: self.upstream_reply()?,
            route_timeout_ms: self.route_timeout_ms(),
            buffer_limit_bytes: self.buffer_limit_bytes(),
            strict: if self.strict || self.allow_host_calls.is_some() {
                Some(crate::vm::Strict { allowed: self.allow_host_calls.as_ref().map(|l| l.iter().cloned().collect()) })
            } else {
                None
            },
            ..PluginSpec::default()
        })
    }

    /// Every callout cluster the file or its cases name, with the file's answer (a cluster named
    /// only in cases answers status 200 with an empty body, the default answer).
    pub fn callout_clusters(&self) -> BTreeMap<String, CalloutSpec> {
        let mut clusters = self.callouts.clone();
        for case in &self.cases {
            for (name, spec) in &case.callouts {
                // A gRPC cluster's default answer is status 0 with no message.
                clusters.entry(name.clone()).or_insert_with(|| match spec {
                    CalloutSpec::Grpc { .. } => CalloutSpec::Grpc { grpc: GrpcSpec::default() },
                    _ => CalloutSpec::default_answer(),
                });
            }
        }
        clusters
    }

    /// The callout clusters answered with `grpc:` (HTTP/2 clusters served by a gRPC server in
    /// Envoy mode).
    pub fn grpc_clusters(&self) -> std::collections::BTreeSet<String> {
        let mut out: std::collections::BTreeSet<String> = self
            .callouts
            .iter()
            .filter(|(_, s)| matches!(s, CalloutSpec::Grpc { .. }))
            .map(|(k, _)| k.clone())
            .collect();
        for case in &self.cases {
            out.extend(case.callouts.iter().filter(|(_, s)| matches!(s, CalloutSpec::Grpc { .. })).map(|(k, _)| k.clone()));
        }
        out
    }

    /// How a case's callouts are answered: the case's answers over the file's, every cluster.
    pub fn case_callouts(&self, case: &Case) -> BTreeMap<String, CalloutSpec> {
        let mut clusters = self.callout_clusters();
        clusters.extend(case.callouts.iter().map(|(k, v)| (k.clone(), v.clone())));
        clusters
    }

    pub fn upstream_reply(&self) -> Result<Upstream> {
        match &self.upstream {
            None => Ok(Upstream::default()),
            Some(u) => u.to_upstream(),
        }
    }

    /// The route timeout both modes use (Envoy's bootstrap and the host's router).
    /// The per-stream buffer limit, Envoy's default (1 MiB) unless the file sets one.
    pub fn buffer_limit_bytes(&self) -> u64 {
        self.buffer_limit_bytes.unwrap_or(crate::host::DEFAULT_BUFFER_LIMIT_BYTES)
    }

    pub fn route_timeout_ms(&self) -> u64 {
        self.route_timeout_ms.unwrap_or(5000)
    }

    /// Why a case cannot run through Envoy, if it cannot.
    pub fn host_only_reason(&self, case: &Case) -> Option<String> {
        if let Some(r) = &self.host_only {
            return Some(r.clone());
        }
        if let Some(r) = &case.host_only {
            return Some(r.clone());
        }
        if case.race.is_some() {
            return Some("interleaved workers".into());
        }
        if case.advance_ms > 0 && !case.real_time {
            return Some("fake clock".into());
        }
        if let Some(r) = &case.request {
            if r.source.is_some() || !r.properties.is_empty() || !r.chunks.is_empty() {
                return Some("source/properties/chunks are host-only".into());
            }
        }
        if self.case_callouts(case).values().any(|c| !c.envoy_can()) {
            return Some("a callout answer Envoy cannot produce (fail/hold)".into());
        }
        None
    }
}

/// Plugin configuration: a string is sent as is; anything else as JSON.
pub fn value_bytes(v: &Option<serde_yaml::Value>) -> Result<Vec<u8>> {
    Ok(match v {
        None | Some(serde_yaml::Value::Null) => Vec::new(),
        Some(serde_yaml::Value::String(s)) => s.clone().into_bytes(),
        Some(other) => serde_json::to_vec(&serde_json::to_value(other)?)?,
    })
}

/// Finds scenario files: each argument is a file or a directory of `*.yaml`/`*.yml` files.
pub fn collect_files(args: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for a in args {
        if a.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(a)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
                .collect();
            found.sort();
            files.extend(found);
        } else {
            files.push(a.clone());
        }
    }
    Ok(files)
}
