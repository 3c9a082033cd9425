//! The thin proxy-wasm layer every Firebreak filter shares.
//!
//! Everything here calls `proxy_wasm::hostcalls` directly and handles each `Result`: the SDK's
//! context-trait helpers `unwrap` host statuses, and a panic traps the VM and fails every stream
//! on that worker.

pub mod host;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::time::UNIX_EPOCH;

use firebreak_core::store::{SharedStore, StoreError};
use firebreak_core::{ConfigError, Rejection};
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType, MetricType, Status};

/// Shared data of this plugin's VM id, with Envoy's semantics.
pub struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        match hostcalls::get_shared_data(key) {
            Ok((Some(value), Some(cas))) => Ok(Some((value, cas))),
            Ok((None, _)) => Ok(None),
            // A value without a CAS token cannot be updated safely.
            Ok((Some(_), None)) => Err(StoreError::Unavailable),
            Err(_) => Err(StoreError::Unavailable),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        match hostcalls::set_shared_data(key, Some(value), Some(cas)) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(StoreError::CasMismatch),
            Err(_) => Err(StoreError::Unavailable),
        }
    }
}

/// 32 random bytes from the host (WASI `random_get`): the entropy a new shared-data table's
/// placement secret is made of. `None` if the host cannot give them (the configuration fails).
pub fn random_32() -> Option<[u8; 32]> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).ok()?;
    Some(bytes)
}

/// Loads a configuration and binds its shared-data tables ([`firebreak_core::store::BucketTable::bind`]):
/// a failure is a configuration error like any other (named field, one log line).
pub fn load_bound_config<T>(
    plugin: &str,
    parse: impl FnOnce(&[u8]) -> Result<T, ConfigError>,
    bind: impl FnOnce(&mut T, &dyn SharedStore, [u8; 32]) -> Result<(), ConfigError>,
) -> Option<T> {
    load_config(plugin, |json| {
        let mut config = parse(json)?;
        let entropy =
            random_32().ok_or_else(|| ConfigError::new("", "the host gave no random bytes for the table placement secret"))?;
        bind(&mut config, &HostStore, entropy)?;
        Ok(config)
    })
}

/// Milliseconds since the Unix epoch from the host's clock; `None` if the host cannot tell.
/// In chain mode the stages of one callback share one reading (they run within microseconds).
pub fn now_ms() -> Option<u64> {
    let chain_mode = CHAIN_MODE.with(Cell::get);
    if chain_mode {
        if let Some(now) = CALLBACK_NOW_MS.with(Cell::get) {
            return Some(now);
        }
    }
    let now = hostcalls::get_current_time().ok()?;
    let since = now.duration_since(UNIX_EPOCH).ok()?;
    let now = u64::try_from(since.as_millis()).ok()?;
    if chain_mode {
        CALLBACK_NOW_MS.with(|cached| cached.set(Some(now)));
    }
    Some(now)
}

/// Whether Envoy's log level for this VM lets debug lines through (read once, at configure time).
pub fn debug_enabled() -> bool {
    matches!(hostcalls::get_log_level(), Ok(LogLevel::Trace | LogLevel::Debug))
}

pub fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

/// Reads and parses the plugin configuration. On failure logs one line naming the field and
/// returns `None`: `on_configure` then returns false and the plugin does not start.
/// In a chain (one module running several filters), a stage's configuration is its section of
/// the chain's configuration, and its field names are reported under that section.
pub fn load_config<T>(plugin: &str, parse: impl FnOnce(&[u8]) -> Result<T, ConfigError>) -> Option<T> {
    let (bytes, section) = match STAGE_CONFIG.with(|stage| stage.borrow_mut().take()) {
        Some(stage) => (stage.bytes, stage.section),
        None => (plugin_configuration(plugin)?, String::new()),
    };
    match parse(&bytes) {
        Ok(config) => {
            log(LogLevel::Info, &format!("firebreak {plugin} configured"));
            Some(config)
        }
        Err(error) => {
            let error = error.under(&section);
            log(LogLevel::Critical, &format!("firebreak {plugin} config_error field={} {error}", error.field));
            None
        }
    }
}

/// The configuration bytes Envoy gave this plugin (`None` if unreadable; logged).
pub fn plugin_configuration(plugin: &str) -> Option<Vec<u8>> {
    match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
        Ok(bytes) => Some(bytes.unwrap_or_default()),
        Err(status) => {
            log(LogLevel::Critical, &format!("firebreak {plugin} config_error cannot read configuration: {status:?}"));
            None
        }
    }
}

struct StageConfig {
    bytes: Vec<u8>,
    /// Where the stage's section sits in the chain's configuration (`filters[1].rate_limit`).
    section: String,
}

thread_local! {
    static STAGE_CONFIG: RefCell<Option<StageConfig>> = const { RefCell::new(None) };
    static CHAIN_MODE: Cell<bool> = const { Cell::new(false) };
    static DEFERRED_RESUME: Cell<Option<Direction>> = const { Cell::new(None) };
}

/// Runs `configure` (a stage's `on_configure`) with `bytes` as its configuration; its
/// configuration errors are reported under `section` ([`ConfigError::under`]).
pub fn configure_stage(bytes: Vec<u8>, section: String, configure: impl FnOnce() -> bool) -> bool {
    STAGE_CONFIG.with(|stage| *stage.borrow_mut() = Some(StageConfig { bytes, section }));
    let configured = configure();
    STAGE_CONFIG.with(|stage| stage.borrow_mut().take());
    configured
}

/// Which half of the stream a filter resumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Request,
    Response,
}

/// Called once by the chain module: from then on a filter's resume is handed to the chain (which
/// runs the stages after it before resuming the stream) instead of going to Envoy.
pub fn enter_chain_mode() {
    CHAIN_MODE.with(|mode| mode.set(true));
}

/// The resume a stage asked for since the last call, if any (chain mode only).
pub fn take_deferred_resume() -> Option<Direction> {
    DEFERRED_RESUME.with(Cell::take)
}

fn resume(direction: Direction) -> Result<(), Status> {
    if CHAIN_MODE.with(Cell::get) {
        DEFERRED_RESUME.with(|deferred| deferred.set(Some(direction)));
        return Ok(());
    }
    resume_stream(direction)
}

/// Resumes the stream in Envoy, whatever the mode (the chain's own resume).
pub fn resume_stream(direction: Direction) -> Result<(), Status> {
    match direction {
        Direction::Request => hostcalls::resume_http_request(),
        Direction::Response => hostcalls::resume_http_response(),
    }
}

/// An environment variable given to the VM (`vm_config.environment_variables`).
pub fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Envoy stats counters, named `<prefix>.<name>`, defined on first use per worker.
pub struct Counters {
    prefix: String,
    ids: RefCell<HashMap<String, u32>>,
}

impl Counters {
    pub fn new(prefix: impl Into<String>) -> Self {
        Counters { prefix: prefix.into(), ids: RefCell::new(HashMap::new()) }
    }

    /// Defines the counters up front so they show (as 0) before the first event.
    pub fn define_all(&self, names: &[&str]) {
        for name in names {
            let _ = self.id(name);
        }
    }

    fn id(&self, name: &str) -> Option<u32> {
        if let Some(id) = self.ids.borrow().get(name) {
            return Some(*id);
        }
        let id = hostcalls::define_metric(MetricType::Counter, &format!("{}.{}", self.prefix, name)).ok()?;
        self.ids.borrow_mut().insert(name.to_string(), id);
        Some(id)
    }

    pub fn increment(&self, name: &str) {
        if let Some(id) = self.id(name) {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }

    /// Counts a request that passed (the hot path). In chain mode the count is kept in the VM
    /// and written by the chain's tick ([`flush_counts`]): no host call per request, the counter
    /// lags by at most the tick period. Elsewhere, and for refusals and failures (always
    /// [`Counters::increment`]), the counter is written at once.
    pub fn count_passed(&self, name: &str) {
        if !CHAIN_MODE.with(Cell::get) {
            return self.increment(name);
        }
        if let Some(id) = self.id(name) {
            PENDING_COUNTS.with(|pending| *pending.borrow_mut().entry(id).or_insert(0) += 1);
        }
    }
}

thread_local! {
    /// Counts of passed requests not yet written to Envoy, by metric id (chain mode).
    static PENDING_COUNTS: RefCell<HashMap<u32, u64>> = RefCell::new(HashMap::new());
}

/// Writes the counts [`Counters::count_passed`] kept (one host call per counter that moved).
pub fn flush_counts() {
    let pending = PENDING_COUNTS.with(|pending| std::mem::take(&mut *pending.borrow_mut()));
    for (id, count) in pending {
        let _ = hostcalls::increment_metric(id, i64::try_from(count).unwrap_or(i64::MAX));
    }
}

/// Asks Envoy to call the root context's `on_tick` every `period`.
pub fn set_tick_period(period: std::time::Duration) -> Result<(), Status> {
    hostcalls::set_tick_period(period)
}

/// Sends the rejection as a local reply: status, JSON body, headers; plus one log line and
/// the counter `rejected.<code>` (and `rejected.<code>.<detail>` when it has an internal detail).
pub fn reject(plugin: &str, counters: &Counters, rejection: &Rejection, context: &str) {
    reject_at(LogLevel::Warn, plugin, counters, rejection, context)
}

/// [`reject`] with the log line at `level` (env-guard logs its findings at error level).
pub fn reject_at(level: LogLevel, plugin: &str, counters: &Counters, rejection: &Rejection, context: &str) {
    log(level, &rejection.log_line(plugin, context));
    for name in rejection.counter_names() {
        counters.increment(&name);
    }
    let body = rejection.body();
    if hostcalls::send_http_response(u32::from(rejection.status), rejection.response_headers(), Some(&body)).is_err() {
        // Cannot answer: reset the stream rather than let it through.
        let _ = hostcalls::reset_http_request();
    }
}

/// Why request headers could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    Unavailable,
    NotUtf8,
}

/// All request headers (pseudo-headers included), in one host call. Non-UTF-8 values are an
/// error, never replaced.
pub fn request_headers() -> Result<Vec<(String, String)>, HeaderError> {
    raw_request_headers()?
        .into_iter()
        .map(|(name, value)| String::from_utf8(value).map(|v| (name, v)).map_err(|_| HeaderError::NotUtf8))
        .collect()
}

/// All request headers, a value that is not UTF-8 kept as an empty value (so that a duplicate
/// still counts as a duplicate, and such a method or path matches no route).
pub fn request_headers_lossy() -> Result<Vec<(String, String)>, HeaderError> {
    Ok(raw_request_headers()?
        .into_iter()
        .map(|(name, value)| (name, String::from_utf8(value).unwrap_or_default()))
        .collect())
}

type RawHeaders = Vec<(String, Vec<u8>)>;

// In chain mode the stages of one callback share one read of the request headers, of the request
// body and of the clock. The chain empties these at the start of every callback; a header write
// empties the headers.
thread_local! {
    static CALLBACK_HEADERS: RefCell<Option<RawHeaders>> = const { RefCell::new(None) };
    static CALLBACK_BODY: RefCell<Option<(usize, Vec<u8>)>> = const { RefCell::new(None) };
    static CALLBACK_NOW_MS: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Called by the chain when Envoy enters it (a callback, a callout answer): what the previous
/// callback read may have changed since.
pub fn begin_callback() {
    CALLBACK_HEADERS.with(|cache| cache.borrow_mut().take());
    CALLBACK_BODY.with(|cache| cache.borrow_mut().take());
    CALLBACK_NOW_MS.with(|cached| cached.set(None));
}

fn raw_request_headers() -> Result<RawHeaders, HeaderError> {
    let chain_mode = CHAIN_MODE.with(Cell::get);
    if chain_mode {
        if let Some(headers) = CALLBACK_HEADERS.with(|cache| cache.borrow().clone()) {
            return Ok(headers);
        }
    }
    let raw = hostcalls::get_map_bytes(MapType::HttpRequestHeaders).map_err(|_| HeaderError::Unavailable)?;
    if chain_mode {
        CALLBACK_HEADERS.with(|cache| *cache.borrow_mut() = Some(raw.clone()));
    }
    Ok(raw)
}

/// All request trailers, in one host call. Non-UTF-8 values are an error, never replaced.
pub fn request_trailers() -> Result<Vec<(String, String)>, HeaderError> {
    let raw = hostcalls::get_map_bytes(MapType::HttpRequestTrailers).map_err(|_| HeaderError::Unavailable)?;
    raw.into_iter()
        .map(|(name, value)| String::from_utf8(value).map(|v| (name, v)).map_err(|_| HeaderError::NotUtf8))
        .collect()
}

pub fn set_request_header(name: &str, value: Option<&str>) -> Result<(), Status> {
    CALLBACK_HEADERS.with(|cache| cache.borrow_mut().take());
    hostcalls::set_map_value(MapType::HttpRequestHeaders, name, value)
}

/// The buffered request body so far (at most `size` bytes).
pub fn request_body(size: usize) -> Result<Vec<u8>, Status> {
    let chain_mode = CHAIN_MODE.with(Cell::get);
    if chain_mode {
        let cached =
            CALLBACK_BODY.with(|cache| cache.borrow().as_ref().filter(|(asked, _)| *asked == size).map(|(_, body)| body.clone()));
        if let Some(body) = cached {
            return Ok(body);
        }
    }
    let body = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, size)?.unwrap_or_default();
    if chain_mode {
        CALLBACK_BODY.with(|cache| *cache.borrow_mut() = Some((size, body.clone())));
    }
    Ok(body)
}

/// First value of a header from a list read by [`request_headers`].
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

/// Filter-state property other Firebreak filters read the verified principal from.
pub const PRINCIPAL_PROPERTY: &str = "firebreak.principal";

pub fn set_principal(principal: &str) -> Result<(), Status> {
    if CHAIN_MODE.with(Cell::get) {
        STREAM_FACTS.with(|facts| facts.borrow_mut().principal = Some(principal.to_string()));
    }
    // Also in chain mode: the property is the principal's contract with anything after the chain.
    hostcalls::set_property(vec![PRINCIPAL_PROPERTY], Some(principal.as_bytes()))
}

/// The principal verified by the request-signature filter earlier in this chain, if any (in
/// chain mode from the stream's facts when a stage of this chain verified it). An error when the
/// host cannot tell (or holds something that is not UTF-8): the caller fails closed rather than
/// take the request for one without a principal.
pub fn principal() -> Result<Option<String>, Status> {
    if let Some(principal) = STREAM_FACTS.with(|facts| facts.borrow().principal.clone()) {
        return Ok(Some(principal));
    }
    let Some(bytes) = hostcalls::get_property(vec![PRINCIPAL_PROPERTY])? else { return Ok(None) };
    let principal = String::from_utf8(bytes).map_err(|_| Status::SerializationFailure)?;
    Ok(Some(principal).filter(|p| !p.is_empty()))
}

/// Filter-state property holding the SHA-256 of the request body (64 lower-case hex digits),
/// set by request-signature only once a signed `sha-256` Content-Digest verified against the
/// whole body. Later filters of the stream use it instead of reading and hashing the body.
pub const BODY_SHA256_PROPERTY: &str = "firebreak.body_sha256";

/// Between separate modules, bodies shorter than this are hashed again rather than handed over:
/// the hand-over costs two host calls (the set and the get), hashing a few hundred bytes costs
/// less. In chain mode the hand-over is in memory, whatever the size.
pub const BODY_SHA256_MIN_BYTES: usize = 1024;

/// Hands the verified SHA-256 of a `body_len`-byte body to later filters of this stream.
pub fn publish_body_sha256(digest: &[u8; 32], body_len: usize) -> Result<(), Status> {
    if CHAIN_MODE.with(Cell::get) {
        STREAM_FACTS.with(|facts| facts.borrow_mut().body_sha256 = Some(*digest));
        return Ok(());
    }
    if body_len < BODY_SHA256_MIN_BYTES {
        return Ok(());
    }
    hostcalls::set_property(vec![BODY_SHA256_PROPERTY], Some(hex::encode(digest).as_bytes()))
}

/// The verified SHA-256 of this stream's `body_len`-byte body, published by request-signature
/// earlier in this stream, if any (a property that is not 64 hex digits counts as absent).
pub fn verified_body_sha256(body_len: usize) -> Option<[u8; 32]> {
    if let Some(digest) = STREAM_FACTS.with(|facts| facts.borrow().body_sha256) {
        return Some(digest);
    }
    if body_len < BODY_SHA256_MIN_BYTES {
        return None;
    }
    let bytes = hostcalls::get_property(vec![BODY_SHA256_PROPERTY]).ok()??;
    let mut digest = [0u8; 32];
    hex::decode_to_slice(bytes, &mut digest).ok()?;
    Some(digest)
}

/// What the stages of a chain hand each other within one stream, in memory (chain mode).
#[derive(Debug, Default)]
pub struct StreamFacts {
    principal: Option<String>,
    body_sha256: Option<[u8; 32]>,
}

thread_local! {
    /// The facts of the stream whose callback is running (always empty outside chain mode).
    static STREAM_FACTS: RefCell<StreamFacts> = RefCell::new(StreamFacts::default());
}

/// The chain, when Envoy enters it for a stream: that stream's facts become the running ones.
pub fn enter_stream(facts: StreamFacts) {
    STREAM_FACTS.with(|current| *current.borrow_mut() = facts);
}

/// The chain, when Envoy's call returns: the running stream's facts, to keep with the stream.
pub fn leave_stream() -> StreamFacts {
    STREAM_FACTS.with(|current| std::mem::take(&mut *current.borrow_mut()))
}

/// Sends one webdis command (`POST /`, body in webdis path form) to the Redis bridge cluster.
/// The answer arrives in `on_http_call_response` with the returned token.
pub fn dispatch_webdis(config: &firebreak_core::remote::RedisConfig, command: &[u8]) -> Result<u32, Status> {
    let length = command.len().to_string();
    hostcalls::dispatch_http_call(
        &config.cluster,
        vec![
            (":method", "POST"),
            (":path", "/"),
            (":authority", &config.authority),
            ("content-type", "text/plain"),
            ("content-length", &length),
        ],
        Some(command),
        vec![],
        std::time::Duration::from_millis(u64::from(config.timeout_ms.get())),
    )
}

/// The status and body of the callout answer being delivered (`None` status: no answer at all,
/// which is how Envoy reports a timeout or a connection failure).
pub fn http_call_response(body_size: usize) -> (Option<u16>, Vec<u8>) {
    let status = hostcalls::get_map(MapType::HttpCallResponseHeaders)
        .ok()
        .and_then(|headers| headers.into_iter().find(|(n, _)| n == ":status"))
        .and_then(|(_, v)| v.parse::<u16>().ok());
    let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
        .ok()
        .flatten()
        .unwrap_or_default();
    (status, body)
}

pub fn resume_request() -> Result<(), Status> {
    resume(Direction::Request)
}

/// All response headers (`:status` included), in one host call. Non-UTF-8 values are an error.
pub fn response_headers() -> Result<Vec<(String, String)>, HeaderError> {
    let raw = hostcalls::get_map_bytes(MapType::HttpResponseHeaders).map_err(|_| HeaderError::Unavailable)?;
    raw.into_iter()
        .map(|(name, value)| String::from_utf8(value).map(|v| (name, v)).map_err(|_| HeaderError::NotUtf8))
        .collect()
}

/// The current response body chunk (when earlier chunks were continued), at most `size` bytes.
pub fn response_body(size: usize) -> Result<Vec<u8>, Status> {
    Ok(hostcalls::get_buffer(BufferType::HttpResponseBody, 0, size)?.unwrap_or_default())
}

/// A host property as UTF-8 text (e.g. `["response", "code_details"]`); `None` when absent or unreadable.
pub fn property_string(path: &[&str]) -> Option<String> {
    let bytes = hostcalls::get_property(path.to_vec()).ok()??;
    String::from_utf8(bytes).ok()
}

/// Answers locally with a given response (e.g. a stored one). On failure resets the stream
/// rather than let the request through.
pub fn send_response(status: u16, headers: &[(String, String)], body: &[u8]) {
    let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    if hostcalls::send_http_response(u32::from(status), headers, Some(body)).is_err() {
        let _ = hostcalls::reset_http_request();
    }
}

/// Resumes a response paused by this filter (e.g. while a state update was in flight).
pub fn resume_response() -> Result<(), Status> {
    resume(Direction::Response)
}
