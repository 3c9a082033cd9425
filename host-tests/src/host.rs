//! The host: a module compiled once, instantiated once per worker, driven as Envoy drives it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use wasmtime::{Config, Engine, InstancePre, Linker, Store, WasmParams, WasmResults};
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtxBuilder};

use crate::abi::{Action, HeaderMap};
use crate::http::{Callout, CalloutReply, GrpcReply, LocalReply, Request, Upstream, UpstreamRequest, Verdict};
use crate::vm::{self, CallResponse, StreamData, Strict, VmState};
use crate::world::{lock, MetricKind, World, DEFAULT_START_NANOS};

/// A proxy-wasm module compiled once. Cheap to share (`Arc`) across tests and threads; every
/// [`Host`] instantiates it per worker from the pre-linked `InstancePre`.
pub struct Module {
    engine: Engine,
    pre: InstancePre<VmState>,
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
            callouts: BTreeMap::new(),
            grpc: BTreeMap::new(),
        }
    }
}

/// Envoy's default route timeout (15 s).
pub const DEFAULT_ROUTE_TIMEOUT_MS: u64 = 15_000;

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
    module: Arc<Module>,
    spec: PluginSpec,
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

struct FakeWall(Arc<World>);
impl HostWallClock for FakeWall {
    fn resolution(&self) -> Duration {
        Duration::from_nanos(1)
    }
    fn now(&self) -> Duration {
        Duration::from_nanos(self.0.now_nanos())
    }
}
struct FakeMono(Arc<World>);
impl HostMonotonicClock for FakeMono {
    fn resolution(&self) -> u64 {
        1
    }
    fn now(&self) -> u64 {
        self.0.now_nanos()
    }
}

/// One Envoy worker: one VM instance of the module.
pub(crate) struct Worker {
    pub(crate) index: usize,
    pub(crate) store: Store<VmState>,
    instance: wasmtime::Instance,
    pub(crate) failed: Option<String>,
    output: wasmtime_wasi::p2::pipe::MemoryOutputPipe,
}

/// Where a stream is in Envoy's filter flow.
pub(crate) struct StreamRun {
    pub worker: usize,
    pub(crate) id: u32,
    request: Request,
    headers_released: bool,
    request_eos_seen: bool,
    /// Body the client sent while the filter had paused its headers (Envoy buffers it).
    withheld: Vec<u8>,
    withheld_eos: bool,
    trailers_pending: bool,
    upstream_response_body: Vec<u8>,
    /// The upstream's body is cut short: the stream is reset after what was sent.
    response_cut: bool,
    response_body_withheld: bool,
    upstream: Option<UpstreamRequest>,
    response_started: bool,
    response_done: bool,
    response_paused: bool,
    /// The response headers have passed the filter (on their way to the client).
    response_headers_sent: bool,
    done: bool,
    stalled: bool,
    trap: Option<String>,
}

impl Worker {
    fn new(module: &Module, world: Arc<World>, index: usize, spec: &PluginSpec) -> Result<Worker, StartError> {
        // Envoy logs what a module prints; the host keeps it for the test.
        let output = wasmtime_wasi::p2::pipe::MemoryOutputPipe::new(1 << 20);
        let wasi = WasiCtxBuilder::new()
            .envs(&spec.env)
            .stdout(output.clone())
            .stderr(output.clone())
            .wall_clock(FakeWall(world.clone()))
            .monotonic_clock(FakeMono(world.clone()))
            .insecure_random_seed(index as u128)
            .secure_random(<rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(
                spec.random_seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            ))
            .insecure_random(<rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(
                spec.random_seed.rotate_left(17) ^ index as u64,
            ))
            .build_p1();
        let mut clusters: BTreeSet<String> = spec.callouts.keys().cloned().collect();
        clusters.extend(spec.grpc.keys().cloned());
        let state = VmState::new(
            wasi,
            world.clone(),
            index,
            spec.vm_id.clone(),
            spec.root_id.clone(),
            spec.vm_configuration.clone(),
            spec.configuration.clone(),
            clusters,
            spec.strict.clone(),
        );
        let mut store = Store::new(&module.engine, state);
        let instance = module.pre.instantiate(&mut store).map_err(|e| StartError::Instantiate(format!("{e:?}")))?;
        let mut w = Worker { index, store, instance, failed: None, output };
        // Reactor initialisation, as proxy-wasm-cpp-host does it.
        for init in ["_initialize", "_start"] {
            if w.instance.get_func(&mut w.store, init).is_some() {
                w.call::<(), ()>(init, ()).map_err(StartError::Trap)?;
                break;
            }
        }
        let root = w.store.data().root_context;
        w.call::<(i32, i32), ()>("proxy_on_context_create", (root as i32, 0)).map_err(StartError::Trap)?;
        let vm_size = spec.vm_configuration.len() as i32;
        if w.call::<(i32, i32), i32>("proxy_on_vm_start", (root as i32, vm_size)).map_err(StartError::Trap)? == Some(0) {
            return Err(StartError::VmStartFailed);
        }
        let size = spec.configuration.len() as i32;
        if w.call::<(i32, i32), i32>("proxy_on_configure", (root as i32, size)).map_err(StartError::Trap)? == Some(0) {
            return Err(StartError::ConfigureFailed { logs: w.store.data().root_logs.clone() });
        }
        Ok(w)
    }

    /// Calls an export if the module has it. A trap fails the VM: every in-flight stream gets
    /// Envoy's 503, and so does every later one (fail closed).
    fn call<P: WasmParams, R: WasmResults>(&mut self, name: &str, params: P) -> Result<Option<R>, String> {
        if let Some(reason) = &self.failed {
            return Err(reason.clone());
        }
        let Some(f) = self.instance.get_func(&mut self.store, name) else { return Ok(None) };
        let f = match f.typed::<P, R>(&self.store) {
            Ok(f) => f,
            Err(e) => {
                // An export with another signature is another ABI: fail loudly, never skip it.
                let message = format!("{name}: unexpected signature: {e:?}");
                self.fail(message.clone());
                return Err(message);
            }
        };
        match f.call(&mut self.store, params) {
            Ok(r) => Ok(Some(r)),
            Err(e) => {
                let message = format!("{name}: {e:?}");
                self.fail(message.clone());
                Err(message)
            }
        }
    }

    fn fail(&mut self, message: String) {
        self.failed = Some(message);
        for s in self.store.data_mut().streams.values_mut() {
            if s.local_reply.is_none() {
                s.local_reply = Some(wasm_fail_reply());
            }
        }
    }

    pub(crate) fn ctx_call<P: WasmParams, R: WasmResults>(
        &mut self,
        context: u32,
        name: &str,
        params: P,
    ) -> Result<Option<R>, String> {
        self.store.data_mut().effective = context;
        let r = self.call(name, params);
        let root = self.store.data().root_context;
        self.store.data_mut().effective = root;
        r
    }

    pub(crate) fn stream(&mut self, id: u32) -> &mut StreamData {
        self.store.data_mut().streams.entry(id).or_default()
    }

    /// Adds a stream's data (no callback yet); returns its context id.
    pub(crate) fn add_stream(&mut self, request: &Request, connection_id: u64) -> u32 {
        let st = self.store.data_mut();
        let id = st.next_context;
        st.next_context += 1;
        let data = StreamData {
            request_headers: to_map(&request.headers),
            request_trailers: to_map(&request.trailers),
            properties: request.properties.iter().filter(|(k, _)| is_segment_path(k)).cloned().collect(),
            overrides: request.properties.iter().filter(|(k, _)| !is_segment_path(k)).cloned().collect(),
            source_address: request.source_address.clone(),
            connection_id,
            ..StreamData::default()
        };
        st.streams.insert(id, data);
        id
    }

    /// Creates the stream context and delivers what the client sent, as Envoy does.
    pub(crate) fn open(&mut self, request: Request, connection_id: u64) -> StreamRun {
        let request = hcm_normalize(request, connection_id);
        let id = self.add_stream(&request, connection_id);
        let root = self.store.data().root_context;
        let mut run = StreamRun {
            worker: self.index,
            id,
            request,
            headers_released: false,
            request_eos_seen: false,
            withheld: Vec::new(),
            withheld_eos: false,
            trailers_pending: false,
            upstream_response_body: Vec::new(),
            response_cut: false,
            response_body_withheld: false,
            upstream: None,
            response_started: false,
            response_done: false,
            response_paused: false,
            response_headers_sent: false,
            done: false,
            stalled: false,
            trap: None,
        };
        if let Some(reason) = self.failed.clone() {
            // A failed VM answers every new stream with 503 (fail closed).
            self.stream(id).local_reply = Some(wasm_fail_reply());
            run.trap = Some(reason);
            run.done = true;
            return run;
        }
        if let Err(t) = self.ctx_call::<(i32, i32), ()>(root, "proxy_on_context_create", (id as i32, root as i32)) {
            run.trap = Some(t);
            run.done = true;
            return run;
        }
        self.deliver_request(&mut run);
        run
    }

    fn ended(&mut self, run: &mut StreamRun) -> bool {
        let s = self.stream(run.id);
        if s.local_reply.is_some() || s.reset {
            run.done = true;
        }
        run.done
    }

    fn step(&mut self, run: &mut StreamRun, name: &str, params: (i32, i32, i32)) -> Option<Action> {
        match self.ctx_call::<(i32, i32, i32), i32>(run.id, name, params) {
            Ok(r) => Some(r.map(Action::from_raw).unwrap_or(Action::Continue)),
            Err(t) => {
                run.trap = Some(t);
                run.done = true;
                None
            }
        }
    }

    fn release_request(&mut self, run: &mut StreamRun) {
        if !run.headers_released {
            run.headers_released = true;
            let s = self.stream(run.id);
            run.upstream =
                Some(UpstreamRequest { headers: from_map(&s.request_headers), body: Vec::new(), trailers: Vec::new() });
        }
        let s = self.stream(run.id);
        let pending = s.request_body.as_mut().map(std::mem::take).unwrap_or_default();
        if let Some(u) = run.upstream.as_mut() {
            u.body.extend_from_slice(&pending);
        }
    }

    /// Delivers what the client sent. Envoy (proxy-wasm-cpp-host) turns Pause from a headers
    /// callback into StopAllIterationAndWatermark: the body is then withheld from the filter
    /// and handed to it in one piece when the stream is continued.
    fn deliver_request(&mut self, run: &mut StreamRun) {
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
            run.request_eos_seen = true;
        }
        if action == Action::Continue || self.take_continue(run.id) {
            self.release_request(run);
        }
        for (i, chunk) in chunks.iter().enumerate() {
            let last = i + 1 == chunks.len() && !has_trailers;
            if !run.headers_released {
                run.withheld.extend_from_slice(chunk);
                run.withheld_eos |= last;
                continue;
            }
            self.body_callback(run, chunk, last);
            if run.done {
                return;
            }
        }
        if has_trailers {
            if run.headers_released {
                self.trailers_callback(run);
            } else {
                run.trailers_pending = true;
            }
        }
    }

    fn body_callback(&mut self, run: &mut StreamRun, data: &[u8], eos: bool) {
        let size = {
            let b = self.stream(run.id).request_body.get_or_insert_with(Vec::new);
            b.extend_from_slice(data);
            b.len() as i32
        };
        if eos {
            run.request_eos_seen = true;
        }
        let Some(action) = self.step(run, "proxy_on_request_body", (run.id as i32, size, eos as i32)) else {
            return;
        };
        if self.ended(run) {
            return;
        }
        // Continue flushes what was buffered; Pause (StopIterationAndBuffer) keeps buffering.
        if action == Action::Continue || self.take_continue(run.id) {
            self.release_request(run);
        }
    }

    fn trailers_callback(&mut self, run: &mut StreamRun) {
        run.trailers_pending = false;
        run.request_eos_seen = true;
        let t = run.request.trailers.len() as i32;
        let action = match self.ctx_call::<(i32, i32), i32>(run.id, "proxy_on_request_trailers", (run.id as i32, t)) {
            Ok(r) => r.map(Action::from_raw).unwrap_or(Action::Continue),
            Err(t) => {
                run.trap = Some(t);
                run.done = true;
                return;
            }
        };
        if self.ended(run) {
            return;
        }
        if action == Action::Continue || self.take_continue(run.id) {
            self.release_request(run);
        }
    }

    fn take_continue(&mut self, id: u32) -> bool {
        std::mem::take(&mut self.stream(id).continue_request)
    }

    /// The request is fully forwarded: nothing of it is held by the filter or withheld from it.
    fn request_complete(&mut self, run: &mut StreamRun) -> bool {
        let held = self.stream(run.id).request_body.as_ref().is_some_and(|b| !b.is_empty());
        run.headers_released
            && run.request_eos_seen
            && !held
            && run.withheld.is_empty()
            && !run.withheld_eos
            && !run.trailers_pending
    }

    /// Moves the stream on as far as the scripts allow. Returns true when it is done.
    pub(crate) fn drive(&mut self, run: &mut StreamRun, spec: &PluginSpec) -> bool {
        run.stalled = false;
        loop {
            if run.done || self.ended(run) {
                return true;
            }
            if self.take_continue(run.id) {
                self.release_request(run);
                // Envoy now hands the filter the body it withheld, in one piece.
                if !run.withheld.is_empty() || run.withheld_eos {
                    let data = std::mem::take(&mut run.withheld);
                    let eos = std::mem::take(&mut run.withheld_eos);
                    self.body_callback(run, &data, eos);
                }
                if run.trailers_pending && !run.done {
                    self.trailers_callback(run);
                }
                continue;
            }
            if run.response_paused && std::mem::take(&mut self.stream(run.id).continue_response) {
                run.response_paused = false;
                run.response_headers_sent = true;
                if std::mem::take(&mut run.response_body_withheld) {
                    self.response_body_callback(run);
                } else {
                    run.response_done = true;
                }
                continue;
            }
            if run.response_done {
                run.done = true;
                return true;
            }
            let waiting_on_filter = !self.request_complete(run) || run.response_paused;
            if waiting_on_filter {
                // Only a callout answer can resume it.
                if !self.answer_next_callout(run.id, spec, &run.request.callouts) {
                    run.stalled = true;
                    return false;
                }
                continue;
            }
            if !run.response_started && run.request.disconnect {
                // The client reset the stream while the upstream was working on it.
                self.stream(run.id).reset = true;
                run.done = true;
                return true;
            }
            if !run.response_started {
                run.response_started = true;
                let upstream = run.request.upstream.clone().unwrap_or_else(|| spec.upstream.clone());
                self.deliver_response(run, &upstream, spec.route_timeout_ms);
                continue;
            }
            run.response_done = true;
        }
    }

    fn deliver_response(&mut self, run: &mut StreamRun, upstream: &Upstream, route_timeout_ms: u64) {
        let id = run.id as i32;
        let answer = upstream.router_answer(route_timeout_ms);
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
                run.done = true;
                return;
            }
            run.response_paused = true;
            run.response_body_withheld = has_body;
            return;
        }
        run.response_headers_sent = true;
        if has_body {
            self.response_body_callback(run);
        } else {
            run.response_done = true;
        }
    }

    fn response_body_callback(&mut self, run: &mut StreamRun) {
        let body = std::mem::take(&mut run.upstream_response_body);
        let size = body.len() as i32;
        let cut = run.response_cut;
        self.stream(run.id).response_body = Some(body);
        let mut action = Action::Continue;
        if !(cut && size == 0) {
            let Some(a) = self.step(run, "proxy_on_response_body", (run.id as i32, size, !cut as i32)) else { return };
            action = a;
        }
        if self.ended(run) {
            return;
        }
        if cut {
            // Envoy's router: the upstream reset after the response started; the downstream
            // stream is reset (the filters next see on_log).
            self.stream(run.id).reset = true;
            run.done = true;
            return;
        }
        let continued = std::mem::take(&mut self.stream(run.id).continue_response);
        if action == Action::Pause && !continued {
            run.response_paused = true;
        } else {
            run.response_done = true;
        }
    }

    /// Answers the oldest pending callout of this stream by the script (the request's own
    /// answers, `overrides`, first). False if none can be.
    pub(crate) fn answer_next_callout(&mut self, id: u32, spec: &PluginSpec, overrides: &BTreeMap<String, CalloutReply>) -> bool {
        let http_reply = |cluster: &str| overrides.get(cluster).or_else(|| spec.callouts.get(cluster));
        let next = self.store.data().pending.iter().find_map(|(token, call)| {
            if call.context != id {
                return None;
            }
            let hold = match &call.callout.grpc_method {
                None => matches!(http_reply(&call.callout.cluster), Some(CalloutReply::Hold) | None),
                Some(_) => matches!(spec.grpc.get(&call.callout.cluster), Some(GrpcReply::Hold) | None),
            };
            (!hold).then_some(*token)
        });
        let Some(token) = next else { return false };
        let call = self.store.data().pending[&token].clone();
        match &call.callout.grpc_method {
            None => {
                let Some(reply) = http_reply(&call.callout.cluster).cloned() else { return false };
                self.answer_http(token, reply);
            }
            Some(_) => {
                let reply = spec.grpc[&call.callout.cluster].clone();
                self.answer_grpc(token, reply);
            }
        }
        true
    }

    /// Delivers an HTTP callout's outcome (`proxy_on_http_call_response`).
    pub(crate) fn answer_http(&mut self, token: u32, reply: CalloutReply) -> bool {
        let Some(call) = self.store.data_mut().pending.remove(&token) else { return false };
        let response = match reply {
            CalloutReply::Respond { status, headers, body } => {
                let mut h = vec![(":status".to_string(), status.to_string())];
                h.extend(headers.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v)));
                h.push(("content-length".into(), body.len().to_string()));
                Some(CallResponse { headers: to_map(&h), body, ..Default::default() })
            }
            CalloutReply::Timeout => Some(envoy_reply(504, "upstream request timeout")),
            CalloutReply::Reset => Some(envoy_reply(
                503,
                "upstream connect error or disconnect/reset before headers. reset reason: connection termination",
            )),
            CalloutReply::Fail => None,
            CalloutReply::Hold => {
                self.store.data_mut().pending.insert(token, call);
                return false;
            }
        };
        let (nh, nb, nt) = match &response {
            Some(r) => (r.headers.len(), r.body.len(), r.trailers.len()),
            None => (0, 0, 0),
        };
        self.store.data_mut().call_response = Some(response.unwrap_or_default());
        let r = self.ctx_call::<(i32, i32, i32, i32, i32), ()>(
            call.context,
            "proxy_on_http_call_response",
            (call.context as i32, token as i32, nh as i32, nb as i32, nt as i32),
        );
        self.store.data_mut().call_response = None;
        r.is_ok()
    }

    pub(crate) fn answer_grpc(&mut self, token: u32, reply: GrpcReply) -> bool {
        let Some(call) = self.store.data_mut().pending.remove(&token) else { return false };
        let ctx = call.context;
        let r = match reply {
            GrpcReply::Ok(message) => {
                let size = message.len() as i32;
                self.store.data_mut().call_response =
                    Some(CallResponse { body: message, grpc_status: Some((0, String::new())), ..Default::default() });
                self.ctx_call::<(i32, i32, i32), ()>(ctx, "proxy_on_grpc_receive", (call.context as i32, token as i32, size))
            }
            GrpcReply::Status(code, message) => {
                self.store.data_mut().call_response =
                    Some(CallResponse { grpc_status: Some((code, message)), ..Default::default() });
                self.ctx_call::<(i32, i32, i32), ()>(ctx, "proxy_on_grpc_close", (call.context as i32, token as i32, code as i32))
            }
            GrpcReply::Hold => {
                self.store.data_mut().pending.insert(token, call);
                return false;
            }
        };
        self.store.data_mut().call_response = None;
        r.is_ok()
    }

    /// Ends the stream (`on_log`, `on_done`, `on_delete`) and says what it got.
    pub(crate) fn finish(&mut self, mut run: StreamRun, spec: &PluginSpec) -> Verdict {
        let id = run.id;
        // A local reply replaces the response. Sent on the request path, it then goes through
        // the filter's own encoder callbacks, as Envoy's does; sent on the response path (or on a
        // trap), it goes straight to the client.
        let local = self.stream(id).local_reply.clone();
        if local.is_some() && run.response_headers_sent {
            // Envoy: the response headers already went to the client; all it can do is reset.
            self.stream(id).reset = true;
        } else if let Some(reply) = &local {
            let run_encoder = run.trap.is_none() && self.failed.is_none() && !run.response_started;
            let headers = local_reply_headers(reply);
            let n = headers.len() as i32;
            {
                let s = self.stream(id);
                s.code_details = Some(reply.details.clone());
                s.response_headers = Some(to_map(&headers));
                s.response_body = Some(reply.body.clone());
            }
            if run_encoder {
                run.response_started = true;
                let _ = self.ctx_call::<(i32, i32, i32), i32>(
                    id,
                    "proxy_on_response_headers",
                    (id as i32, n, reply.body.is_empty() as i32),
                );
                if !reply.body.is_empty() {
                    let _ = self.ctx_call::<(i32, i32, i32), i32>(
                        id,
                        "proxy_on_response_body",
                        (id as i32, reply.body.len() as i32, 1),
                    );
                }
            }
        }
        if let Some(t) = &self.failed {
            run.trap.get_or_insert_with(|| t.clone());
        }
        if self.failed.is_none() {
            let _ = self.ctx_call::<(i32,), ()>(id, "proxy_on_log", (id as i32,));
            let _ = self.ctx_call::<(i32,), i32>(id, "proxy_on_done", (id as i32,));
            let _ = self.ctx_call::<(i32,), ()>(id, "proxy_on_delete", (id as i32,));
        }
        let complete = self.request_complete(&mut run);
        let headers_sent = run.upstream.is_some();
        // Callouts still pending die with the stream.
        self.store.data_mut().pending.retain(|_, c| c.context != id);
        let _ = spec;
        let s = self.store.data_mut().streams.remove(&id).unwrap_or_default();
        let response_headers = s.response_headers.as_ref().map(from_map).unwrap_or_default();
        let status = if s.reset || run.stalled {
            0
        } else {
            response_headers.iter().find(|(k, _)| k == ":status").and_then(|(_, v)| v.parse().ok()).unwrap_or(0)
        };
        Verdict {
            status,
            response_headers,
            response_body: if s.reset || run.stalled { Vec::new() } else { s.response_body.unwrap_or_default() },
            local_reply: s.local_reply,
            code_details: if s.reset || run.stalled { None } else { s.code_details },
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
            stalled: run.stalled,
            trap: run.trap,
            callouts: s.callouts,
            host_calls: s.host_calls,
            logs: s.logs,
            violations: s.violations,
        }
    }

    /// When this worker's root context ticks next, if its timer is armed and the VM alive.
    pub(crate) fn tick_due(&self) -> Option<u64> {
        if self.failed.is_some() {
            return None;
        }
        self.store.data().tick_due
    }

    /// Fires the root context's tick (the clock is at its due time) and re-arms the timer as
    /// Envoy's Wasm::tickHandler does: at now + the period in force after `on_tick`.
    pub(crate) fn fire_tick(&mut self) {
        let now = self.store.data().world.now_nanos();
        let root = self.store.data().root_context;
        let _ = self.ctx_call::<(i32,), ()>(root, "proxy_on_tick", (root as i32,));
        // A period set during on_tick has re-armed the timer at now + period; Envoy then arms it
        // again with the period in force, which comes to the same. A trap stops it.
        let period = self.store.data().tick_period_ms as u64 * 1_000_000;
        self.store.data_mut().tick_due = (period > 0 && self.failed.is_none()).then_some(now + period);
    }
}

/// The next tick due at or before `target` among `dues` (worker position, due time): the
/// earliest, ties in order.
pub(crate) fn next_tick(dues: impl Iterator<Item = (usize, Option<u64>)>, target: u64) -> Option<(u64, usize)> {
    dues.filter_map(|(i, due)| due.map(|d| (d, i))).filter(|(d, _)| *d <= target).min()
}

fn envoy_reply(status: u16, body: &str) -> CallResponse {
    let headers = vec![
        (":status".to_string(), status.to_string()),
        ("content-length".to_string(), body.len().to_string()),
        ("content-type".to_string(), "text/plain".to_string()),
    ];
    CallResponse { headers: to_map(&headers), body: body.as_bytes().to_vec(), ..Default::default() }
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

/// The response headers of a local reply: Envoy's own, then the filter's (which replace).
pub(crate) fn local_reply_headers(reply: &LocalReply) -> Vec<(String, String)> {
    let mut headers = vec![(":status".to_string(), reply.status.to_string())];
    headers.push(("content-length".into(), reply.body.len().to_string()));
    if !reply.body.is_empty() {
        headers.push(("content-type".into(), "text/plain".into()));
    }
    for (k, v) in &reply.headers {
        headers.retain(|(hk, _)| hk != k);
        headers.push((k.clone(), v.clone()));
    }
    headers
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

/// A running plugin: one VM per worker over one module, one shared world (shared data, queues,
/// metrics, fake clock). Each test makes its own; nothing is global.
pub struct Host {
    module: Arc<Module>,
    pub(crate) world: Arc<World>,
    pub(crate) workers: Vec<Worker>,
    pub(crate) spec: PluginSpec,
    next_connection: u64,
    /// Streams opened with [`Host::open`] and not finished yet.
    open: Vec<StreamRun>,
}

impl Host {
    pub fn builder(module: &Arc<Module>) -> HostBuilder {
        HostBuilder { module: module.clone(), spec: PluginSpec::default() }
    }

    pub fn start(module: Arc<Module>, spec: PluginSpec) -> std::result::Result<Host, StartError> {
        let world = Arc::new(World::new(spec.clock_start_nanos));
        Host::start_in(module, spec, world)
    }

    /// Starts a plugin in an existing world (the other filters of a chain share it).
    pub(crate) fn start_in(module: Arc<Module>, spec: PluginSpec, world: Arc<World>) -> std::result::Result<Host, StartError> {
        let mut workers = Vec::new();
        for i in 0..spec.workers.max(1) {
            workers.push(Worker::new(&module, world.clone(), i, &spec)?);
        }
        let mut host = Host { module, world, workers, spec, next_connection: 0, open: Vec::new() };
        host.pump_queues();
        Ok(host)
    }

    pub fn module(&self) -> &Arc<Module> {
        &self.module
    }

    pub fn spec(&self) -> &PluginSpec {
        &self.spec
    }

    /// Sends a request through worker 0 and runs it to the end, answering callouts by the script.
    pub fn send(&mut self, request: Request) -> Verdict {
        self.send_on(0, request)
    }

    pub fn send_on(&mut self, worker: usize, request: Request) -> Verdict {
        self.try_send_on(worker, request).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Host::send_on`], but a strict-mode violation is an error.
    pub fn try_send_on(&mut self, worker: usize, request: Request) -> Result<Verdict> {
        let verdict = self.run_on(worker, request)?;
        if self.spec.strict.is_some() && !verdict.violations.is_empty() {
            bail!("strict mode: {:?}", verdict.violations);
        }
        Ok(verdict)
    }

    /// Runs a request and returns its verdict, strict-mode violations included in it.
    pub fn run_on(&mut self, worker: usize, request: Request) -> Result<Verdict> {
        let connection = self.connection();
        let spec = self.spec.clone();
        let w = self.workers.get_mut(worker).ok_or_else(|| anyhow!("no worker {worker}"))?;
        let mut run = w.open(request, connection);
        w.drive(&mut run, &spec);
        let verdict = w.finish(run, &spec);
        self.pump_queues();
        Ok(verdict)
    }

    /// Opens a stream on a worker and runs it as far as it goes without held callouts. Answer
    /// them with [`Host::answer`], then collect the verdict with [`Host::finish`].
    pub fn open(&mut self, worker: usize, request: Request) -> usize {
        let connection = self.connection();
        let spec = self.spec.clone();
        let w = &mut self.workers[worker];
        let mut run = w.open(request, connection);
        w.drive(&mut run, &spec);
        self.open.push(run);
        self.pump_queues();
        self.open.len() - 1
    }

    /// Callouts waiting for an answer, on every worker: (worker, callout).
    pub fn pending_callouts(&self) -> Vec<(usize, Callout)> {
        let mut out = Vec::new();
        for w in &self.workers {
            for call in w.store.data().pending.values() {
                out.push((w.index, call.callout.clone()));
            }
        }
        out
    }

    /// Answers an HTTP callout by hand; the stream that made it moves on.
    pub fn answer(&mut self, worker: usize, token: u32, reply: CalloutReply) {
        self.workers[worker].answer_http(token, reply);
        self.redrive();
    }

    pub fn answer_grpc(&mut self, worker: usize, token: u32, reply: GrpcReply) {
        self.workers[worker].answer_grpc(token, reply);
        self.redrive();
    }

    fn redrive(&mut self) {
        let spec = self.spec.clone();
        for run in self.open.iter_mut() {
            if !run.done {
                run.stalled = false;
                self.workers[run.worker].drive(run, &spec);
            }
        }
        self.pump_queues();
    }

    /// Finishes a stream opened with [`Host::open`] and returns its verdict.
    pub fn finish(&mut self, handle: usize) -> Verdict {
        let spec = self.spec.clone();
        let placeholder = StreamRun {
            worker: 0,
            id: 0,
            request: Request::get("/"),
            headers_released: false,
            request_eos_seen: false,
            withheld: Vec::new(),
            withheld_eos: false,
            trailers_pending: false,
            upstream_response_body: Vec::new(),
            response_cut: false,
            response_body_withheld: false,
            upstream: None,
            response_started: false,
            response_done: false,
            response_paused: false,
            response_headers_sent: false,
            done: true,
            stalled: false,
            trap: None,
        };
        let mut run = std::mem::replace(&mut self.open[handle], placeholder);
        let w = &mut self.workers[run.worker];
        if !run.done {
            w.drive(&mut run, &spec);
        }
        let v = w.finish(run, &spec);
        self.pump_queues();
        v
    }

    /// Runs requests on several workers at once; `schedule` decides who makes each shared-data
    /// or queue operation next (entry k: the worker that makes the k-th). Workers missing from
    /// the rest of the schedule run freely once it is used up. Verdicts come back in order.
    pub fn race(&mut self, requests: Vec<(usize, Request)>, schedule: &[usize]) -> Vec<Verdict> {
        let spec = self.spec.clone();
        let mut per_worker: BTreeMap<usize, Vec<(usize, Request, u64)>> = BTreeMap::new();
        for (i, (w, r)) in requests.into_iter().enumerate() {
            let c = self.connection();
            per_worker.entry(w).or_default().push((i, r, c));
        }
        self.world.set_schedule(schedule);
        let world = self.world.clone();
        let mut results: Vec<(usize, Verdict)> = Vec::new();
        std::thread::scope(|scope| {
            let mut handles = Vec::new();
            for w in self.workers.iter_mut() {
                let Some(jobs) = per_worker.remove(&w.index) else { continue };
                let spec = &spec;
                let world = world.clone();
                handles.push(scope.spawn(move || {
                    let mut out = Vec::new();
                    for (i, req, conn) in jobs {
                        let mut run = w.open(req, conn);
                        w.drive(&mut run, spec);
                        out.push((i, w.finish(run, spec)));
                    }
                    world.finished(w.index);
                    out
                }));
            }
            for h in handles {
                results.extend(h.join().unwrap_or_default());
            }
        });
        self.world.clear_schedule();
        self.pump_queues();
        results.sort_by_key(|(i, _)| *i);
        results.into_iter().map(|(_, v)| v).collect()
    }

    /// Every shared-data and queue operation so far, in order: (worker, what).
    pub fn shared_trace(&self) -> Vec<(usize, String)> {
        lock(&self.world.trace).clone()
    }

    /// Advances the fake clock, firing due ticks on every worker.
    pub fn advance(&mut self, by: Duration) {
        let target = self.world.now_nanos() + by.as_nanos() as u64;
        // Each tick at its own time, in time order across workers; what a tick enqueues is
        // delivered before the next one. A tick whose time already passed (the clock moved
        // during a request) fires at once.
        while let Some((due, i)) = next_tick(self.workers.iter().map(Worker::tick_due).enumerate(), target) {
            self.world.advance_to(due);
            self.workers[i].fire_tick();
            self.pump_queues();
        }
        self.world.advance_to(target);
        self.pump_queues();
    }

    pub fn now_nanos(&self) -> u64 {
        self.world.now_nanos()
    }

    /// Delivers queue notifications (Envoy posts them to the registering worker).
    pub(crate) fn pump_queues(&mut self) {
        loop {
            let ready = std::mem::take(&mut lock(&self.world.queues).ready);
            if ready.is_empty() {
                return;
            }
            for (worker, context, token) in ready {
                if let Some(w) = self.workers.get_mut(worker) {
                    let _ = w.ctx_call::<(i32, i32), ()>(context, "proxy_on_queue_ready", (context as i32, token as i32));
                }
            }
        }
    }

    pub fn shared_data(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        lock(&self.world.shared).get(&self.spec.vm_id, key)
    }

    /// Writes shared data as another VM would (Envoy's semantics).
    pub fn set_shared_data(&self, key: &str, value: &[u8], cas: u32) -> crate::abi::Status {
        lock(&self.world.shared).set(&self.spec.vm_id, key, value, cas)
    }

    pub fn metric(&self, name: &str) -> Option<i64> {
        lock(&self.world.metrics).defs.iter().find(|(_, n, _)| n == name).map(|(_, _, v)| *v)
    }

    pub fn metrics(&self) -> Vec<(String, MetricKind, i64)> {
        lock(&self.world.metrics).defs.iter().map(|(k, n, v)| (n.clone(), *k, *v)).collect()
    }

    /// Log lines written by root contexts of a worker.
    pub fn root_logs(&self, worker: usize) -> Vec<String> {
        self.workers[worker].store.data().root_logs.clone()
    }

    /// Root-context log lines of every worker, per worker.
    pub fn all_root_logs(&self) -> Vec<Vec<String>> {
        self.workers.iter().map(|w| w.store.data().root_logs.clone()).collect()
    }

    /// Host calls made by a worker's root context, by name.
    pub fn root_host_calls(&self, worker: usize) -> BTreeMap<String, u64> {
        self.workers[worker].store.data().root_calls.clone()
    }

    pub fn root_violations(&self, worker: usize) -> Vec<String> {
        self.workers[worker].store.data().root_violations.clone()
    }

    pub fn tick_period_ms(&self, worker: usize) -> u32 {
        self.workers[worker].store.data().tick_period_ms
    }

    pub fn failed(&self, worker: usize) -> Option<String> {
        self.workers[worker].failed.clone()
    }

    /// What the worker's VM wrote to stdout and stderr (Envoy puts it in its log).
    pub fn guest_output(&self, worker: usize) -> String {
        String::from_utf8_lossy(&self.workers[worker].output.contents()).into_owned()
    }

    pub fn done_called(&self, worker: usize) -> bool {
        self.workers[worker].store.data().done_called
    }

    fn connection(&mut self) -> u64 {
        self.next_connection += 1;
        self.next_connection
    }
}
