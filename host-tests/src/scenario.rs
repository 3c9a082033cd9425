//! Scenario files: a module, its configuration, requests and the verdicts they must get.
//! The same file runs in the test host and through real Envoy (see [`crate::envoy`]).
//!
//! ```yaml
//! name: replay guard rejects a reused nonce
//! module: ../../target/wasm32-wasip1/release/request_signature.wasm  # relative to this file
//! plugin:
//!   root_id: ""
//!   configuration: { keys: [...] }      # a mapping is sent as JSON; a string as is
//!   env: { FIREBREAK_KEY: "..." }       # vm_config.environment_variables
//! workers: 2
//! upstream: { status: 200, headers: { content-type: application/json }, body: '{"ok":true}' }
//! callouts: { authz: { status: 200, body: granted } }   # or fail | timeout | reset | hold
//! expect_start: ok                      # or fail: on_configure refuses the configuration
//! cases:
//!   - name: signed request is forwarded
//!     request: { method: POST, path: /pay, headers: { x-a: "1" }, body: '{"amount":1}' }
//!     sign: { key_id: k1, secret_b64: c2VjcmV0, nonce: n-1, created_offset: 0 }
//!     expect: { status: 200, forwarded: true, upstream_headers: { x-a: "1", x-gone: null } }
//!   - name: the upstream answers this case its own way
//!     request: { method: POST, path: /pay, body_base64: H4sI..., trailers: { x-t: "1" } }
//!     upstream: { status: 503, body: oops }   # or delay_ms: 1500 (past route_timeout_ms), reset: true
//!     expect: { status: 503, response_body: oops, upstream_trailers: { x-t: "1" } }
//!   - name: host-only steps
//!     host_only: needs the fake clock
//!     advance_ms: 60000
//!     request: { path: / }
//!     expect: { status: 401, error: signature_expired }
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context as _, Result};
use base64::Engine as _;
use serde::Deserialize;

use crate::chain::Chain;
use crate::host::{Host, Module, PluginSpec, StartError};
use crate::http::{CalloutReply, Request, Upstream, Verdict};

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
        let body = match &self.body_base64 {
            Some(b) => base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .context("upstream.body_base64 is not base64")?,
            None => self.body.clone().into_bytes(),
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
    },
}

impl CalloutSpec {
    /// Status 200, no headers, an empty body.
    pub fn default_answer() -> CalloutSpec {
        CalloutSpec::Respond { status: 200, headers: BTreeMap::new(), body: String::new(), body_base64: None }
    }

    pub fn reply(&self) -> Result<CalloutReply> {
        Ok(match self {
            CalloutSpec::Word(w) => match w.as_str() {
                "fail" => CalloutReply::Fail,
                "timeout" => CalloutReply::Timeout,
                "reset" => CalloutReply::Reset,
                "hold" => CalloutReply::Hold,
                other => return Err(anyhow!("unknown callout answer {other:?}")),
            },
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
            CalloutSpec::Word(_) => Ok(Vec::new()),
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
    fn matches(&self, level: &str, message: &str) -> bool {
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
    /// plugin's start). Host: every context's `proxy_log`; Envoy: its `wasm` log.
    #[serde(default)]
    pub logs: Vec<LogExpect>,
    /// The HTTP callouts made during the case, in any order, and no others.
    #[serde(default)]
    pub callouts: Option<Vec<CalloutExpect>>,
    /// Whether the module traps in this case (host: the trap; Envoy: its `Function: ... failed`
    /// log line). Without it a trap fails the case unless it expects status 503.
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
    /// Advance the fake clock (and fire ticks) before the request. Host only.
    #[serde(default)]
    pub advance_ms: u64,
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
            for name in case.callouts.keys() {
                clusters.entry(name.clone()).or_insert_with(CalloutSpec::default_answer);
            }
        }
        clusters
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
        if case.advance_ms > 0 {
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

/// The request with the case's own upstream answer, if it has one.
pub fn answered_by(request: Request, upstream: Option<&UpstreamSpec>) -> Result<Request> {
    Ok(match upstream {
        Some(u) => request.answered_by(u.to_upstream()?),
        None => request,
    })
}

/// The request with the case's own callout answers (cluster → answer), if it has any.
pub fn with_callouts(mut request: Request, callouts: &BTreeMap<String, CalloutSpec>) -> Result<Request> {
    for (cluster, spec) in callouts {
        request = request.callout(cluster, spec.reply()?);
    }
    Ok(request)
}

/// Builds the request a case sends; `now_secs` is the clock signatures are created against.
pub fn build_request(spec: &RequestSpec, sign: Option<&SignSpec>, now_secs: u64) -> Result<Request> {
    let mut r = Request::new(&spec.method, &spec.path).set_header(":authority", &spec.authority);
    for (k, v) in spec.headers.pairs() {
        r = r.header(&k, &v);
    }
    if !spec.chunks.is_empty() {
        r = r.chunks(spec.chunks.iter());
    } else if let Some(b) = &spec.body_base64 {
        r = r.body(
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .context("request.body_base64 is not base64")?,
        );
    } else if let Some(b) = &spec.body {
        r = r.body(b);
    }
    for (k, v) in spec.trailers.pairs() {
        r = r.trailer(&k, &v);
    }
    r.disconnect = spec.disconnect;
    if let Some(s) = &spec.source {
        r = r.from(s);
    }
    for (k, v) in spec.properties.pairs() {
        r = r.property(&k, v);
    }
    if let Some(sign) = sign {
        for (k, v) in sign_headers(spec, sign, &r, now_secs)? {
            r = r.set_header(&k, &v);
        }
    }
    Ok(r)
}

fn sign_headers(spec: &RequestSpec, sign: &SignSpec, r: &Request, now_secs: u64) -> Result<Vec<(String, String)>> {
    use firebreak_core::signature::sign::{sign as sign_request, SignRequest};
    let secret = base64::engine::general_purpose::STANDARD
        .decode(&sign.secret_b64)
        .context("sign.secret_b64 is not base64")?;
    let body = match &sign.body_override {
        Some(b) => b.clone().into_bytes(),
        None => r.body_bytes(),
    };
    let headers: Vec<(String, String)> = r.headers.iter().filter(|(k, _)| !k.starts_with(':')).cloned().collect();
    let created = (now_secs as i64 + sign.created_offset).max(0) as u64;
    let request = SignRequest {
        method: sign.method.as_deref().unwrap_or(&spec.method),
        scheme: "http",
        authority: &spec.authority,
        path_and_query: sign.path.as_deref().unwrap_or(&spec.path),
        headers: &headers,
        body: &body,
        key_id: &sign.key_id,
        secret: &secret,
        created,
        expires: sign.expires_offset.map(|o| (now_secs as i64 + o).max(0) as u64),
        nonce: sign.nonce.as_deref(),
        label: &sign.label,
        components: sign.components.clone(),
        extra_covered_headers: &sign.extra_covered_headers,
    };
    let signed = sign_request(&request).map_err(|e| anyhow!("signing: {e}"))?;
    let mut pairs = signed.pairs();
    if sign.tamper {
        for (k, v) in pairs.iter_mut() {
            if k == "signature" {
                // Flip one base64 character inside the :...: byte sequence.
                if let Some(i) = v.find(':') {
                    let c = v.as_bytes()[i + 1];
                    let flipped = if c == b'A' { 'B' } else { 'A' };
                    v.replace_range(i + 1..i + 2, &flipped.to_string());
                }
            }
        }
    }
    Ok(pairs)
}

/// What one request got, in terms both the host and real Envoy can report.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observed {
    pub status: u16,
    pub error: Option<String>,
    pub forwarded: bool,
    pub upstream_headers: Vec<(String, String)>,
    pub upstream_body: Option<Vec<u8>>,
    pub upstream_trailers: Vec<(String, String)>,
    pub response_headers: Vec<(String, String)>,
    pub response_body: Vec<u8>,
    pub host_calls: Option<u64>,
    /// (level, message) of the module's log lines during the case, where the runtime shows them.
    pub logs: Option<Vec<(String, String)>>,
    /// (cluster, headers) of the HTTP callouts made during the case.
    pub callouts: Option<Vec<ObservedCallout>>,
    pub trap: Option<bool>,
}

/// An HTTP callout a module made: its cluster and headers.
pub type ObservedCallout = (String, Vec<(String, String)>);

/// Splits the host's `[level] message` log lines.
pub fn host_log_lines(lines: &[String]) -> Vec<(String, String)> {
    lines
        .iter()
        .map(|l| match l.strip_prefix('[').and_then(|r| r.split_once("] ")) {
            Some((level, message)) => (level.to_string(), message.to_string()),
            None => (String::new(), l.clone()),
        })
        .collect()
}

/// Whether one header expectation holds; the problem otherwise.
fn header_problem(what: &str, list: &[(String, String)], name: &str, want: &Option<HeaderValue>) -> Option<String> {
    let all: Vec<&str> = list.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect();
    let ok = match want {
        None => all.is_empty(),
        Some(HeaderValue::One(v)) => all.first() == Some(&v.as_str()),
        Some(HeaderValue::All(vs)) => all.len() == vs.len() && all.iter().zip(vs).all(|(a, b)| *a == b),
    };
    (!ok).then(|| match want {
        Some(HeaderValue::All(vs)) => format!("{what} {name} {all:?} (want {vs:?})"),
        Some(HeaderValue::One(v)) => format!("{what} {name} {:?} (want {v:?})", all.first()),
        None => format!("{what} {name} {:?} (want absent)", all.first()),
    })
}

impl Observed {
    pub fn from_verdict(v: &Verdict) -> Observed {
        Observed {
            status: v.status,
            error: v.error_code(),
            forwarded: v.forwarded(),
            upstream_headers: v.upstream.as_ref().map(|u| u.headers.clone()).unwrap_or_default(),
            upstream_body: v.upstream.as_ref().map(|u| u.body.clone()),
            upstream_trailers: v.upstream.as_ref().map(|u| u.trailers.clone()).unwrap_or_default(),
            response_headers: v.response_headers.clone(),
            response_body: v.response_body.clone(),
            host_calls: Some(v.host_call_total()),
            logs: Some(host_log_lines(&v.logs)),
            callouts: Some(v.callouts.iter().map(|c| (c.cluster.clone(), c.headers.clone())).collect()),
            trap: Some(v.trap.is_some()),
        }
    }

    /// Log, callout and trap expectations (all a case without a request can check).
    pub fn check_effects(&self, e: &Expect) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(logs) = &self.logs {
            for want in &e.logs {
                let found = logs.iter().any(|(level, message)| want.matches(level, message));
                if found == want.absent {
                    let what = if want.absent { "unwanted log line" } else { "no log line" };
                    let shown: Vec<String> = logs.iter().map(|(l, m)| format!("[{l}] {m}")).collect();
                    out.push(format!("{what} {want:?}; logged: {shown:?}"));
                }
            }
        }
        if let (Some(want), Some(got)) = (&e.callouts, &self.callouts) {
            let mut left: Vec<&(String, Vec<(String, String)>)> = got.iter().collect();
            for c in want {
                let hit = left.iter().position(|(cluster, headers)| {
                    *cluster == c.cluster && c.headers.iter().all(|(k, v)| header_problem("", headers, k, v).is_none())
                });
                match hit {
                    Some(i) => {
                        left.remove(i);
                    }
                    None => out.push(format!("no callout to {} with {:?}; made: {got:?}", c.cluster, c.headers)),
                }
            }
            if !left.is_empty() {
                out.push(format!("unexpected callouts: {left:?}"));
            }
        }
        if let (Some(want), Some(got)) = (e.trap, self.trap) {
            if want != got {
                out.push(format!("trap {got} (want {want})"));
            }
        }
        out
    }

    /// Every value of a header, in order.
    fn values<'a>(list: &'a [(String, String)], name: &str) -> Vec<&'a str> {
        list.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect()
    }

    /// Differences from the expectation, one line each.
    pub fn check(&self, e: &Expect) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(s) = e.status {
            if s != self.status {
                out.push(format!("status {} (want {s})", self.status));
            }
        }
        if let Some(err) = &e.error {
            if *err != self.error {
                out.push(format!("error {:?} (want {err:?})", self.error));
            }
        }
        if let Some(f) = e.forwarded {
            if f != self.forwarded {
                out.push(format!("forwarded {} (want {f})", self.forwarded));
            }
        }
        for (k, want) in &e.upstream_headers {
            out.extend(header_problem("upstream header", &self.upstream_headers, k, want));
        }
        if let Some(b) = &e.upstream_body {
            let got = self.upstream_body.as_ref().map(|b| String::from_utf8_lossy(b).into_owned());
            if got.as_deref() != Some(b.as_str()) {
                out.push(format!("upstream body {got:?} (want {b:?})"));
            }
        }
        if let Some(b) = &e.upstream_body_base64 {
            let got = self.upstream_body.as_ref().map(|b| base64::engine::general_purpose::STANDARD.encode(b));
            if got.as_deref() != Some(b.trim()) {
                out.push(format!("upstream body (base64) {got:?} (want {b:?})"));
            }
        }
        for (k, want) in &e.upstream_trailers {
            out.extend(header_problem("upstream trailer", &self.upstream_trailers, k, want));
        }
        for (k, want) in &e.response_headers {
            out.extend(header_problem("response header", &self.response_headers, k, want));
        }
        if let Some(c) = &e.response_body_contains {
            if !String::from_utf8_lossy(&self.response_body).contains(c.as_str()) {
                out.push(format!("response body {:?} lacks {c:?}", String::from_utf8_lossy(&self.response_body)));
            }
        }
        if let Some(b) = &e.response_body {
            if self.response_body != b.as_bytes() {
                out.push(format!("response body {:?} (want {b:?})", String::from_utf8_lossy(&self.response_body)));
            }
        }
        if let (Some(max), Some(n)) = (e.max_host_calls, self.host_calls) {
            if n > max {
                out.push(format!("{n} host calls (budget {max})"));
            }
        }
        out.extend(self.check_effects(e));
        out
    }

    /// Where the host (`self`) and Envoy (`other`) disagree on anything both observe: status,
    /// the `error` field, whether the request was forwarded, every upstream header, trailer and
    /// the upstream body, every response header and the response body, whatever the case
    /// expects. The headers in [`UPSTREAM_HEADERS_NOT_COMPARED`] and
    /// [`RESPONSE_HEADERS_NOT_COMPARED`] are left out, and for a `signed` request those in
    /// [`SIGNED_HEADERS_NOT_COMPARED`]; a reset stream (status 0 in both) has no
    /// response to compare.
    pub fn disagreements(&self, other: &Observed, signed: bool) -> Vec<String> {
        let mut out = Vec::new();
        if self.status != other.status {
            out.push(format!("status host={} envoy={}", self.status, other.status));
        }
        if self.error != other.error {
            out.push(format!("error host={:?} envoy={:?}", self.error, other.error));
        }
        if self.forwarded != other.forwarded {
            out.push(format!("forwarded host={} envoy={}", self.forwarded, other.forwarded));
        }
        if self.forwarded && other.forwarded {
            let mut skip = names(UPSTREAM_HEADERS_NOT_COMPARED);
            if signed {
                skip.extend(names(SIGNED_HEADERS_NOT_COMPARED));
            }
            out.extend(header_disagreements("upstream header", &self.upstream_headers, &other.upstream_headers, &skip));
            out.extend(header_disagreements("upstream trailer", &self.upstream_trailers, &other.upstream_trailers, &[]));
            if self.upstream_body != other.upstream_body {
                out.push(format!("upstream body host={:?} envoy={:?}", lossy(&self.upstream_body), lossy(&other.upstream_body)));
            }
        }
        if self.status != 0 || other.status != 0 {
            let skip = names(RESPONSE_HEADERS_NOT_COMPARED);
            out.extend(header_disagreements("response header", &self.response_headers, &other.response_headers, &skip));
            if self.response_body != other.response_body {
                out.push(format!(
                    "response body host={:?} envoy={:?}",
                    String::from_utf8_lossy(&self.response_body),
                    String::from_utf8_lossy(&other.response_body)
                ));
            }
        }
        out
    }
}

/// Request headers the upstream gets from Envoy that `--mode both` does not compare, and why.
pub const UPSTREAM_HEADERS_NOT_COMPARED: &[(&str, &str)] = &[
    ("x-request-id", "Envoy makes a random UUID per request; the host a fixed one per connection"),
    ("x-envoy-expected-rq-timeout-ms", "added by Envoy's router after the filters, which never see it"),
    (":scheme", "not on the HTTP/1.1 wire the upstream server reads (the filters see it in both)"),
    ("transfer-encoding", "`chunked`: how Envoy frames a body with trailers on the HTTP/1.1 wire, after the filters"),
];

/// Upstream headers not compared for a request the runner signs (`sign:`), and why.
pub const SIGNED_HEADERS_NOT_COMPARED: &[(&str, &str)] = &[
    ("signature", "signed at each runtime's own clock (the host's fake one, Envoy's real one)"),
    ("signature-input", "its `created` is each runtime's own clock"),
];

/// Response headers the client gets from Envoy that `--mode both` does not compare, and why.
pub const RESPONSE_HEADERS_NOT_COMPARED: &[(&str, &str)] = &[
    ("date", "added by Envoy's codec with the real time, after the filters"),
    ("server", "added by Envoy's connection manager (`envoy`) after the filters"),
    ("x-envoy-upstream-service-time", "added by Envoy's router with the real upstream time"),
    ("connection", "`close`, Envoy's answer to the runner's `connection: close` (HTTP/1.1 hop-by-hop)"),
];

fn names(list: &[(&'static str, &str)]) -> Vec<&'static str> {
    list.iter().map(|(name, _)| *name).collect()
}

fn lossy(body: &Option<Vec<u8>>) -> Option<String> {
    body.as_ref().map(|b| String::from_utf8_lossy(b).into_owned())
}

/// Every header name either side has (but those in `skip`), where their values differ (all
/// values of the name, in order).
fn header_disagreements(what: &str, host: &[(String, String)], envoy: &[(String, String)], skip: &[&str]) -> Vec<String> {
    let mut all: Vec<String> = host.iter().chain(envoy).map(|(k, _)| k.to_ascii_lowercase()).collect();
    all.sort();
    all.dedup();
    let mut out = Vec::new();
    for name in all.iter().filter(|n| !skip.contains(&n.as_str())) {
        let (a, b) = (Observed::values(host, name), Observed::values(envoy, name));
        if a != b {
            out.push(format!("{what} {name} host={a:?} envoy={b:?}"));
        }
    }
    out
}

/// One row of the report.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub file: String,
    pub case: String,
    pub outcome: Outcome,
    pub observed: Option<Observed>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Pass,
    Fail(Vec<String>),
    Skipped(String),
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Fail(_) => "FAIL",
            Outcome::Skipped(_) => "skip",
        }
    }
}

fn outcome(problems: Vec<String>) -> Outcome {
    if problems.is_empty() {
        Outcome::Pass
    } else {
        Outcome::Fail(problems)
    }
}

/// Modules compiled once per run, keyed by path (owned by the caller: no global state).
#[derive(Default)]
pub struct ModuleCache {
    modules: BTreeMap<PathBuf, Arc<Module>>,
}

impl ModuleCache {
    pub fn get(&mut self, path: &Path) -> Result<Arc<Module>> {
        if let Some(m) = self.modules.get(path) {
            return Ok(m.clone());
        }
        let m = Module::load(path)?;
        self.modules.insert(path.to_path_buf(), m.clone());
        Ok(m)
    }
}

/// One plugin, or a chain of them, behind the same calls.
enum Target {
    Single(Box<Host>),
    Chain(Chain),
}

impl Target {
    fn advance(&mut self, by: Duration) {
        match self {
            Target::Single(h) => h.advance(by),
            Target::Chain(c) => c.advance(by),
        }
    }
    fn now_nanos(&self) -> u64 {
        match self {
            Target::Single(h) => h.now_nanos(),
            Target::Chain(c) => c.now_nanos(),
        }
    }
    fn root_logs(&self) -> Vec<Vec<String>> {
        match self {
            Target::Single(h) => h.all_root_logs(),
            Target::Chain(c) => c.all_root_logs(),
        }
    }
    /// Root-context lines logged since `seen` (lines per VM), and the new counts.
    fn root_logs_since(&self, seen: &[usize]) -> (Vec<String>, Vec<usize>) {
        let all = self.root_logs();
        let counts = all.iter().map(Vec::len).collect();
        let new = all
            .into_iter()
            .enumerate()
            .flat_map(|(i, l)| l.into_iter().skip(seen.get(i).copied().unwrap_or(0)))
            .collect();
        (new, counts)
    }
    fn send_on(&mut self, worker: usize, request: Request) -> Verdict {
        match self {
            Target::Single(h) => h
                .run_on(worker, request)
                .unwrap_or_else(|e| Verdict { violations: vec![e.to_string()], ..Verdict::default() }),
            Target::Chain(c) => c.send_on(worker, request),
        }
    }
    fn race(&mut self, requests: Vec<(usize, Request)>, schedule: &[usize]) -> Option<Vec<Verdict>> {
        // Both run every worker on its own thread under the schedule.
        match self {
            Target::Single(h) => Some(h.race(requests, schedule)),
            Target::Chain(c) => Some(c.race(requests, schedule)),
        }
    }
}

/// Runs a scenario file in the test host: `modules` in chain order (one for a single filter).
pub fn run_host(file: &Path, scenario: &ScenarioFile, modules: Vec<Arc<Module>>) -> Vec<CaseResult> {
    let fname = file.display().to_string();
    let row = |case: &str, outcome: Outcome, observed: Option<Observed>| CaseResult {
        file: fname.clone(),
        case: case.to_string(),
        outcome,
        observed,
    };
    let mut specs = Vec::new();
    for plugin in scenario.plugins() {
        match scenario.plugin_spec_for(plugin) {
            Ok(s) => specs.push(s),
            Err(e) => return vec![row("(scenario)", Outcome::Fail(vec![format!("{e:#}")]), None)],
        }
    }
    let started = if scenario.chain.is_empty() {
        let module = modules.into_iter().next();
        let spec = specs.into_iter().next();
        match (module, spec) {
            (Some(m), Some(s)) => Host::start(m, s).map(|h| Target::Single(Box::new(h))),
            _ => return vec![row("(scenario)", Outcome::Fail(vec!["no module".into()]), None)],
        }
    } else {
        let upstream = match scenario.upstream_reply() {
            Ok(u) => u,
            Err(e) => return vec![row("(scenario)", Outcome::Fail(vec![format!("{e:#}")]), None)],
        };
        Chain::start(modules.into_iter().zip(specs).collect(), upstream)
            .map(Target::Chain)
            .map_err(|(_, e)| e)
    };
    let mut host = match started {
        Ok(h) if scenario.expects_start_failure() => {
            drop(h);
            return vec![row("plugin refuses to start", Outcome::Fail(vec!["plugin started".into()]), None)];
        }
        Ok(h) => h,
        Err(StartError::ConfigureFailed { .. } | StartError::VmStartFailed) if scenario.expects_start_failure() => {
            return vec![row("plugin refuses to start", Outcome::Pass, None)];
        }
        Err(e) => return vec![row("plugin start", Outcome::Fail(vec![e.to_string()]), None)],
    };
    let mut out = Vec::new();
    // Root-context log lines already reported (none: the first case sees the plugin's start).
    let mut seen_logs: Vec<usize> = Vec::new();
    for case in &scenario.cases {
        if case.advance_ms > 0 {
            host.advance(Duration::from_millis(case.advance_ms));
        }
        let now_secs = host.now_nanos() / 1_000_000_000;
        if let Some(race) = &case.race {
            let mut requests = Vec::new();
            for r in &race.requests {
                match build_request(&r.request, r.sign.as_ref(), now_secs).and_then(|q| answered_by(q, r.upstream.as_ref())) {
                    Ok(req) => requests.push((r.worker, req)),
                    Err(e) => {
                        out.push(row(&case.name, Outcome::Fail(vec![format!("{e:#}")]), None));
                        continue;
                    }
                }
            }
            let Some(verdicts) = host.race(requests, &race.schedule) else {
                out.push(row(&case.name, Outcome::Fail(vec!["race is not supported in a chain".into()]), None));
                continue;
            };
            let mut problems = Vec::new();
            for (i, (v, r)) in verdicts.iter().zip(&race.requests).enumerate() {
                for p in Observed::from_verdict(v).check(&r.expect) {
                    problems.push(format!("request {i} (worker {}): {p}", r.worker));
                }
            }
            out.push(row(&case.name, outcome(problems), None));
            continue;
        }
        let Some(spec) = &case.request else {
            // No request (a root-only module, or the clock moving): the logs, ticks included.
            let (lines, counts) = host.root_logs_since(&seen_logs);
            seen_logs = counts;
            let observed = Observed { logs: Some(host_log_lines(&lines)), ..Observed::default() };
            out.push(row(&case.name, outcome(observed.check_effects(&case.expect)), None));
            continue;
        };
        let request = match build_request(spec, case.sign.as_ref(), now_secs)
            .and_then(|q| answered_by(q, case.upstream.as_ref()))
            .and_then(|q| with_callouts(q, &case.callouts))
        {
            Ok(r) => r,
            Err(e) => {
                out.push(row(&case.name, Outcome::Fail(vec![format!("{e:#}")]), None));
                continue;
            }
        };
        if case.worker >= scenario.workers.max(1) {
            out.push(row(&case.name, Outcome::Fail(vec![format!("no worker {}", case.worker)]), None));
            continue;
        }
        let verdict = host.send_on(case.worker, request);
        let mut observed = Observed::from_verdict(&verdict);
        // Root-context lines (ticks, queue deliveries, a callout's root) come before the stream's.
        let (lines, counts) = host.root_logs_since(&seen_logs);
        seen_logs = counts;
        if let Some(logs) = observed.logs.as_mut() {
            logs.splice(0..0, host_log_lines(&lines));
        }
        let mut problems = observed.check(&case.expect);
        for v in &verdict.violations {
            problems.push(format!("strict: {v}"));
        }
        if let Some(t) = &verdict.trap {
            if case.expect.status != Some(503) && case.expect.trap.is_none() {
                problems.push(format!("trap: {t}"));
            }
        }
        out.push(row(&case.name, outcome(problems), Some(observed)));
    }
    out
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

/// The pass/fail table: `columns` names the runtimes of each row's two results (the second is
/// `-` when a run has one).
pub fn render_table(rows: &[(CaseResult, Option<CaseResult>, Vec<String>)], columns: [&str; 2]) -> String {
    let [first, second] = columns;
    let mut out = String::new();
    let w = rows.iter().map(|(h, _, _)| h.case.chars().count()).max().unwrap_or(4).clamp(4, 70);
    out.push_str(&format!("{:<36} {:<w$} {:<6} {:<5}  details\n", "file", "case", first, second));
    for (host, envoy, mismatch) in rows {
        let file = Path::new(&host.file).file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        let envoy_label = match envoy {
            None => "-",
            Some(e) => e.outcome.label(),
        };
        let mut details = Vec::new();
        match &host.outcome {
            Outcome::Fail(p) => details.push(format!("{first}: {}", p.join("; "))),
            Outcome::Skipped(r) => details.push(format!("{first} skipped: {r}")),
            Outcome::Pass => {}
        }
        if let Some(e) = envoy {
            match &e.outcome {
                Outcome::Fail(p) => details.push(format!("{second}: {}", p.join("; "))),
                Outcome::Skipped(r) => details.push(format!("{second} skipped: {r}")),
                Outcome::Pass => {}
            }
        }
        if !mismatch.is_empty() {
            details.push(format!("MISMATCH {first}/{second}: {}", mismatch.join("; ")));
        }
        let case: String = host.case.chars().take(w).collect();
        out.push_str(&format!(
            "{:<36} {:<w$} {:<6} {:<5}  {}\n",
            file,
            case,
            host.outcome.label(),
            envoy_label,
            details.join(" | ")
        ));
    }
    out
}
