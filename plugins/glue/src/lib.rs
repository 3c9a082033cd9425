//! The proxy-wasm host of Firebreak's engine: [`host::EnvoyHost`] answers a core flow's `Host`
//! calls with proxy-wasm host calls, [`host::FlowContext`] is the one `HttpContext` every module
//! runs. This file holds what those need besides: shared data, randomness, configuration bytes,
//! logs and counters.
//!
//! Everything here calls `proxy_wasm::hostcalls` directly and handles each `Result`: the SDK's
//! context-trait helpers `unwrap` host statuses, and a panic traps the VM and fails every stream
//! on that worker. Nothing here is global: what a module's streams share is in [`host::Module`].

pub mod host;

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::UNIX_EPOCH;

use firebreak_core::store::{SharedStore, StoreError};
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MetricType, Status};

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

/// Milliseconds since the Unix epoch from the host's clock; `None` if the host cannot tell.
pub fn now_ms() -> Option<u64> {
    let now = hostcalls::get_current_time().ok()?;
    let since = now.duration_since(UNIX_EPOCH).ok()?;
    u64::try_from(since.as_millis()).ok()
}

/// Whether Envoy's log level for this VM lets debug lines through (read once, at configure time).
pub fn debug_enabled() -> bool {
    matches!(hostcalls::get_log_level(), Ok(LogLevel::Trace | LogLevel::Debug))
}

pub fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
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

/// An environment variable given to the VM (`vm_config.environment_variables`).
pub fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Asks Envoy to call the root context's `on_tick` every `period`.
pub fn set_tick_period(period: std::time::Duration) -> Result<(), Status> {
    hostcalls::set_tick_period(period)
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

    pub fn id(&self, name: &str) -> Option<u32> {
        if let Some(id) = self.ids.borrow().get(name) {
            return Some(*id);
        }
        let id = hostcalls::define_metric(MetricType::Counter, &format!("{}.{}", self.prefix, name)).ok()?;
        self.ids.borrow_mut().insert(name.to_string(), id);
        Some(id)
    }

    pub fn increment(&self, name: &str) {
        if let Some(id) = self.id(name) {
            add(id, 1);
        }
    }
}

/// Defines the gauge `name` (configure time); its id, or `None` if Envoy refused.
pub fn define_gauge(name: &str) -> Option<u32> {
    hostcalls::define_metric(MetricType::Gauge, name).ok()
}

/// Sets the gauge `id` to `value`.
pub fn set_gauge(id: u32, value: u64) {
    let _ = hostcalls::record_metric(id, value);
}

/// Adds `count` to the counter `id`.
pub fn add(id: u32, count: u64) {
    let _ = hostcalls::increment_metric(id, i64::try_from(count).unwrap_or(i64::MAX));
}

/// Filter-state property other Firebreak modules read the verified principal from.
pub const PRINCIPAL_PROPERTY: &str = "firebreak.principal";

/// Filter-state property holding the SHA-256 of the request body (64 lower-case hex digits),
/// set by request-signature only once a signed `sha-256` Content-Digest verified against the
/// whole body. Later modules of the stream use it instead of reading and hashing the body.
pub const BODY_SHA256_PROPERTY: &str = "firebreak.body_sha256";

/// Between separate modules, bodies shorter than this are hashed again rather than handed over:
/// the hand-over costs two host calls (the set and the get), hashing a few hundred bytes costs
/// less. Within one chain module the hand-over is in memory, whatever the size.
pub const BODY_SHA256_MIN_BYTES: usize = 1024;

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

/// A host property as UTF-8 text (e.g. `["response", "code_details"]`); `None` when absent or unreadable.
pub fn property_string(path: &[&str]) -> Option<String> {
    let bytes = hostcalls::get_property(path.to_vec()).ok()??;
    String::from_utf8(bytes).ok()
}
