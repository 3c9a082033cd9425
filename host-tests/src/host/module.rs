//! A module compiled once, what a plugin is started with, and why it may not start.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context as _, Result};
use wasmtime::{Config, Engine, InstancePre, Linker};

use crate::http::{CalloutReply, GrpcReply, Upstream};
use crate::vm::{self, Strict, VmState};
use crate::world::DEFAULT_START_NANOS;

use super::Host;

/// A proxy-wasm module compiled once. Cheap to share (`Arc`) across tests and threads; every
/// [`Host`] instantiates it per worker from the pre-linked `InstancePre`.
pub struct Module {
    pub(crate) engine: Engine,
    pub(crate) pre: InstancePre<VmState>,
    name: String,
    unknown_imports: Vec<String>,
}

impl Module {
    pub fn load(path: impl AsRef<Path>) -> Result<Arc<Module>> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).with_context(|| format!("reading proxy-wasm module {}", path.display()))?;
        Module::from_bytes(&path.display().to_string(), &bytes)
    }

    pub fn from_bytes(name: &str, bytes: &[u8]) -> Result<Arc<Module>> {
        let config = Config::new();
        let engine = Engine::new(&config).map_err(vm::anyhow_trap)?;
        let module = wasmtime::Module::new(&engine, bytes).map_err(|e| anyhow!("compiling {name}: {e:?}"))?;
        let abi = ["proxy_abi_version_0_2_1", "proxy_abi_version_0_2_0"];
        if !module.exports().any(|e| abi.contains(&e.name())) {
            let found: Vec<String> = module
                .exports()
                .map(|e| e.name().to_string())
                .filter(|n| n.starts_with("proxy_abi_version"))
                .collect();
            bail!("{name}: not a proxy-wasm ABI 0.2.x module (ABI exports: {found:?}); this host implements 0.2.1");
        }
        let mut linker: Linker<VmState> = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |s: &mut VmState| &mut s.wasi).map_err(vm::anyhow_trap)?;
        vm::add_to_linker(&mut linker)?;
        // Imports we do not provide trap when called (Envoy would refuse to load some of them;
        // strict mode reports the trap as the violation it is).
        linker.define_unknown_imports_as_traps(&module).map_err(vm::anyhow_trap)?;
        let pre = linker.instantiate_pre(&module).map_err(vm::anyhow_trap)?;
        let unknown_imports = module
            .imports()
            .filter(|i| match i.module() {
                "env" => !vm::HOST_FUNCTIONS.contains(&i.name()),
                "wasi_snapshot_preview1" | "wasi_unstable" => false,
                _ => true,
            })
            .map(|i| format!("{}.{}", i.module(), i.name()))
            .collect();
        Ok(Arc::new(Module { engine, pre, name: name.to_string(), unknown_imports }))
    }

    /// Imports this host does not implement (they trap if called). Empty for modules built with
    /// the proxy-wasm Rust SDK 0.2.
    pub fn unknown_imports(&self) -> &[String] {
        &self.unknown_imports
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Everything a plugin is started with, and how the world around it answers.
#[derive(Debug, Clone)]
pub struct PluginSpec {
    /// `plugin_config.configuration` (what `on_configure` reads).
    pub configuration: Vec<u8>,
    /// `vm_config.configuration` (what `on_vm_start` reads).
    pub vm_configuration: Vec<u8>,
    pub root_id: String,
    pub vm_id: String,
    /// `vm_config.environment_variables.key_values`.
    pub env: Vec<(String, String)>,
    /// Envoy worker threads: one VM each, one shared-data store for all.
    pub workers: usize,
    pub strict: Option<Strict>,
    pub clock_start_nanos: u64,
    /// Seeds WASI randomness (`random_get`): each worker gets its own stream derived from it, so
    /// runs are reproducible while VMs still differ, as in Envoy.
    pub random_seed: u64,
    pub upstream: Upstream,
    /// The route's timeout (Envoy's `route.timeout`; 0 = none): an upstream slower than this
    /// gets the router's 504 instead of its answer.
    pub route_timeout_ms: u64,
    /// Envoy's per-stream buffer limit (`per_connection_buffer_limit_bytes`, 1 MiB by default):
    /// a filter that buffers more of a body gets 413 (request) or 500 (response) if the
    /// response has not started, else the stream is reset.
    pub buffer_limit_bytes: u64,
    /// HTTP callout clusters and how each answers. A cluster not listed does not exist.
    pub callouts: BTreeMap<String, CalloutReply>,
    pub grpc: BTreeMap<String, GrpcReply>,
}

impl Default for PluginSpec {
    fn default() -> Self {
        PluginSpec {
            configuration: Vec::new(),
            vm_configuration: Vec::new(),
            root_id: String::new(),
            vm_id: String::new(),
            env: Vec::new(),
            workers: 1,
            strict: None,
            clock_start_nanos: DEFAULT_START_NANOS,
            random_seed: 0x5eed_f12e_b2ea_c0de,
            upstream: Upstream::default(),
            route_timeout_ms: DEFAULT_ROUTE_TIMEOUT_MS,
            buffer_limit_bytes: DEFAULT_BUFFER_LIMIT_BYTES,
            callouts: BTreeMap::new(),
            grpc: BTreeMap::new(),
        }
    }
}

/// Envoy's default route timeout (15 s).
pub const DEFAULT_ROUTE_TIMEOUT_MS: u64 = 15_000;

/// Envoy's default `per_connection_buffer_limit_bytes`: 1 MiB.
pub const DEFAULT_BUFFER_LIMIT_BYTES: u64 = 1024 * 1024;

/// Why a plugin did not start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartError {
    Instantiate(String),
    VmStartFailed,
    /// `on_configure` returned false: Envoy does not start the plugin.
    ConfigureFailed {
        logs: Vec<String>,
    },
    Trap(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Instantiate(e) => write!(f, "instantiation failed: {e}"),
            StartError::VmStartFailed => write!(f, "on_vm_start returned false"),
            StartError::ConfigureFailed { logs } => {
                write!(f, "on_configure returned false; logs: {logs:?}")
            }
            StartError::Trap(e) => write!(f, "trapped while starting: {e}"),
        }
    }
}

impl std::error::Error for StartError {}

pub struct HostBuilder {
    pub(crate) module: Arc<Module>,
    pub(crate) spec: PluginSpec,
}

impl HostBuilder {
    pub fn config(mut self, configuration: impl AsRef<[u8]>) -> Self {
        self.spec.configuration = configuration.as_ref().to_vec();
        self
    }
    pub fn vm_config(mut self, configuration: impl AsRef<[u8]>) -> Self {
        self.spec.vm_configuration = configuration.as_ref().to_vec();
        self
    }
    pub fn root_id(mut self, root_id: &str) -> Self {
        self.spec.root_id = root_id.to_string();
        self
    }
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.spec.env.push((key.to_string(), value.to_string()));
        self
    }
    pub fn workers(mut self, n: usize) -> Self {
        self.spec.workers = n.max(1);
        self
    }
    /// Strict mode: misuse of any host call is a violation.
    pub fn strict(mut self) -> Self {
        self.spec.strict.get_or_insert_with(Strict::default);
        self
    }
    /// Strict mode with an allow-list: any other host call is a violation.
    pub fn allow_only(mut self, names: &[&str]) -> Self {
        let allowed: BTreeSet<String> = names.iter().map(|s| s.to_string()).collect();
        self.spec.strict = Some(Strict { allowed: Some(allowed) });
        self
    }
    pub fn clock_start(mut self, unix_nanos: u64) -> Self {
        self.spec.clock_start_nanos = unix_nanos;
        self
    }
    pub fn upstream(mut self, upstream: Upstream) -> Self {
        self.spec.upstream = upstream;
        self
    }
    pub fn buffer_limit_bytes(mut self, bytes: u64) -> Self {
        self.spec.buffer_limit_bytes = bytes;
        self
    }

    pub fn route_timeout_ms(mut self, ms: u64) -> Self {
        self.spec.route_timeout_ms = ms;
        self
    }
    pub fn callout(mut self, cluster: &str, reply: CalloutReply) -> Self {
        self.spec.callouts.insert(cluster.to_string(), reply);
        self
    }
    pub fn grpc(mut self, cluster: &str, reply: GrpcReply) -> Self {
        self.spec.grpc.insert(cluster.to_string(), reply);
        self
    }
    pub fn spec(mut self, spec: PluginSpec) -> Self {
        self.spec = spec;
        self
    }
    pub fn start(self) -> std::result::Result<Host, StartError> {
        Host::start(self.module, self.spec)
    }
}
