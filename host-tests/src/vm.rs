//! The per-VM state (one wasmtime `Store` per Envoy worker) and the host functions of
//! proxy-wasm ABI 0.2.1, implemented with Envoy's semantics.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use anyhow::{anyhow, Result};
use wasmtime::{Caller, Extern, Linker};
use wasmtime_wasi::p1::WasiP1Ctx;

use crate::abi::{self, buffer, map, HeaderMap, Status};
use crate::http::{Callout, LocalReply};
use crate::world::{lock, MetricKind, World};

/// A pending HTTP or gRPC callout.
#[derive(Debug, Clone)]
pub(crate) struct PendingCall {
    pub context: u32,
    pub callout: Callout,
    /// A gRPC stream (`proxy_grpc_stream`), answered once the module half-closes it.
    pub grpc_stream: bool,
    /// The module ended its side of the stream (`proxy_grpc_send` with end of stream, or
    /// `proxy_grpc_close`).
    pub half_closed: bool,
}

/// The response being delivered to `proxy_on_http_call_response` / gRPC callbacks.
#[derive(Default)]
pub(crate) struct CallResponse {
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    pub trailers: HeaderMap,
    pub grpc_status: Option<(u32, String)>,
}

#[derive(Default)]
pub(crate) struct StreamData {
    pub request_headers: HeaderMap,
    /// The request body buffered so far (Envoy's decoding buffer); `None` before any body.
    pub request_body: Option<Vec<u8>>,
    pub request_trailers: HeaderMap,
    pub response_headers: Option<HeaderMap>,
    pub response_body: Option<Vec<u8>>,
    pub response_trailers: HeaderMap,
    /// Filter state (`proxy_set_property`, or set by earlier filters), keyed as Envoy keys it:
    /// the exact path, segments joined by `\0`. Only an exact path reads it back.
    pub properties: BTreeMap<String, Vec<u8>>,
    /// Overrides of built-in properties ("source.address"), keyed by the dotted path.
    pub overrides: BTreeMap<String, Vec<u8>>,
    pub source_address: String,
    pub local_reply: Option<LocalReply>,
    /// `response.code_details` once a response (upstream, router or local reply) is under way.
    pub code_details: Option<String>,
    pub continue_request: bool,
    pub continue_response: bool,
    /// The header and trailer maps (`map::*`) Envoy no longer hands the module: its callback
    /// for them returned Continue (Envoy's wasm context drops its pointer to the map then).
    /// Readable again in `on_log` (Envoy's access-log phase).
    pub released: Vec<i32>,
    pub in_log: bool,
    pub reset: bool,
    pub host_calls: BTreeMap<String, u64>,
    pub logs: Vec<String>,
    pub violations: Vec<String>,
    pub callouts: Vec<Callout>,
    pub connection_id: u64,
}

/// Strict mode: which host calls are expected. `None` allows every call but still flags misuse
/// (a BadArgument, an out-of-bounds pointer, a callout to an unknown cluster, an unknown import).
#[derive(Debug, Clone, Default)]
pub struct Strict {
    pub allowed: Option<BTreeSet<String>>,
}

pub struct VmState {
    pub(crate) wasi: WasiP1Ctx,
    pub(crate) world: Arc<World>,
    pub(crate) worker: usize,
    pub(crate) vm_id: String,
    pub(crate) root_id: String,
    pub(crate) plugin_name: String,
    pub(crate) vm_config: Vec<u8>,
    pub(crate) plugin_config: Vec<u8>,
    pub(crate) root_context: u32,
    pub(crate) effective: u32,
    pub(crate) next_context: u32,
    pub(crate) streams: BTreeMap<u32, StreamData>,
    pub(crate) call_response: Option<CallResponse>,
    pub(crate) next_token: u32,
    pub(crate) pending: BTreeMap<u32, PendingCall>,
    /// HTTP callout clusters that exist (the scripted ones); others get BadArgument, as in Envoy.
    pub(crate) clusters: BTreeSet<String>,
    pub(crate) tick_period_ms: u32,
    /// When the root context's tick timer fires next (fake-clock nanos), as Envoy arms it:
    /// `proxy_set_tick_period_milliseconds` re-arms it at now + period (0 disarms it), and after
    /// each `on_tick` it is armed again at the firing time + the period then in force.
    pub(crate) tick_due: Option<u64>,
    pub(crate) root_logs: Vec<String>,
    pub(crate) root_calls: BTreeMap<String, u64>,
    pub(crate) root_violations: Vec<String>,
    pub(crate) strict: Option<Strict>,
    pub(crate) done_called: bool,
    pub(crate) listener_port: u16,
}

impl VmState {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        wasi: WasiP1Ctx,
        world: Arc<World>,
        worker: usize,
        vm_id: String,
        root_id: String,
        vm_config: Vec<u8>,
        plugin_config: Vec<u8>,
        clusters: BTreeSet<String>,
        strict: Option<Strict>,
    ) -> VmState {
        VmState {
            wasi,
            world,
            worker,
            vm_id,
            plugin_name: root_id.clone(),
            root_id,
            vm_config,
            plugin_config,
            root_context: 1,
            effective: 1,
            next_context: 2,
            streams: BTreeMap::new(),
            call_response: None,
            next_token: 1,
            pending: BTreeMap::new(),
            clusters,
            tick_period_ms: 0,
            tick_due: None,
            root_logs: Vec::new(),
            root_calls: BTreeMap::new(),
            root_violations: Vec::new(),
            strict,
            done_called: false,
            listener_port: 10000,
        }
    }

    fn stream(&mut self) -> Option<&mut StreamData> {
        let id = self.effective;
        self.streams.get_mut(&id)
    }

    /// Counts a host call against the effective context and checks it in strict mode.
    fn note(&mut self, name: &'static str) {
        let unexpected = match &self.strict {
            Some(Strict { allowed: Some(allowed) }) => !allowed.contains(name),
            _ => false,
        };
        let id = self.effective;
        let (calls, violations) = match self.streams.get_mut(&id) {
            Some(s) => (&mut s.host_calls, &mut s.violations),
            None => (&mut self.root_calls, &mut self.root_violations),
        };
        *calls.entry(name.to_string()).or_insert(0) += 1;
        if unexpected {
            violations.push(format!("unexpected host call {name}"));
        }
    }

    /// In strict mode, records a misuse (a call Envoy would refuse).
    fn misuse(&mut self, what: String) {
        if self.strict.is_none() {
            return;
        }
        let id = self.effective;
        match self.streams.get_mut(&id) {
            Some(s) => s.violations.push(what),
            None => self.root_violations.push(what),
        }
    }

    fn header_map(&mut self, kind: i32) -> Option<&mut HeaderMap> {
        if kind == map::HTTP_CALL_RESPONSE_HEADERS || kind == map::GRPC_RECEIVE_INITIAL_METADATA {
            return self.call_response.as_mut().map(|r| &mut r.headers);
        }
        if kind == map::HTTP_CALL_RESPONSE_TRAILERS || kind == map::GRPC_RECEIVE_TRAILING_METADATA {
            return self.call_response.as_mut().map(|r| &mut r.trailers);
        }
        let s = self.stream()?;
        if s.released.contains(&kind) && !s.in_log {
            return None;
        }
        match kind {
            map::HTTP_REQUEST_HEADERS => Some(&mut s.request_headers),
            map::HTTP_REQUEST_TRAILERS => Some(&mut s.request_trailers),
            map::HTTP_RESPONSE_HEADERS => s.response_headers.as_mut(),
            map::HTTP_RESPONSE_TRAILERS => Some(&mut s.response_trailers),
            _ => None,
        }
    }

    fn buffer(&mut self, kind: i32) -> Option<&mut Vec<u8>> {
        match kind {
            buffer::VM_CONFIGURATION => Some(&mut self.vm_config),
            buffer::PLUGIN_CONFIGURATION => Some(&mut self.plugin_config),
            buffer::HTTP_CALL_RESPONSE_BODY | buffer::GRPC_RECEIVE_BUFFER => self.call_response.as_mut().map(|r| &mut r.body),
            buffer::HTTP_REQUEST_BODY => self.stream()?.request_body.as_mut(),
            buffer::HTTP_RESPONSE_BODY => self.stream()?.response_body.as_mut(),
            _ => None,
        }
    }

    fn log(&mut self, line: String) {
        match self.stream() {
            Some(s) => s.logs.push(line),
            None => self.root_logs.push(line),
        }
    }

    /// Envoy's property tree, as far as filters use it. Strings are raw bytes, integers 8-byte
    /// little-endian, booleans one byte, timestamps nanoseconds since the epoch.
    fn property(&mut self, path: &[String]) -> Option<Vec<u8>> {
        let dotted = path.join(".");
        let int = |v: i64| v.to_le_bytes().to_vec();
        match dotted.as_str() {
            "plugin_name" => return Some(self.plugin_name.clone().into_bytes()),
            "plugin_root_id" => return Some(self.root_id.clone().into_bytes()),
            "plugin_vm_id" => return Some(self.vm_id.clone().into_bytes()),
            "listener_direction" => return Some(int(0)),
            _ => {}
        }
        let now = self.world.now_nanos();
        let port = self.listener_port;
        let s = self.stream()?;
        if let Some(v) = s.properties.get(&path.join("\0")) {
            return Some(v.clone());
        }
        if let Some(v) = s.overrides.get(&dotted) {
            return Some(v.clone());
        }
        let header = |s: &StreamData, name: &str| -> Option<Vec<u8>> {
            s.request_headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        };
        match dotted.as_str() {
            "request.path" => header(s, ":path"),
            "request.url_path" => header(s, ":path").map(|p| {
                let end = p.iter().position(|b| *b == b'?').unwrap_or(p.len());
                p[..end].to_vec()
            }),
            "request.query" => header(s, ":path").map(|p| match p.iter().position(|b| *b == b'?') {
                Some(i) => p[i + 1..].to_vec(),
                None => Vec::new(),
            }),
            "request.host" => header(s, ":authority"),
            "request.method" => header(s, ":method"),
            "request.scheme" => header(s, ":scheme"),
            "request.id" => header(s, "x-request-id"),
            "request.referer" => header(s, "referer"),
            "request.useragent" => header(s, "user-agent"),
            "request.protocol" => Some(b"HTTP/1.1".to_vec()),
            "request.time" => Some(int(now as i64)),
            "request.headers" => Some(abi::serialize_map(&s.request_headers)),
            "request.size" => Some(int(s.request_body.as_ref().map_or(0, |b| b.len()) as i64)),
            "response.headers" => s.response_headers.as_ref().map(|h| abi::serialize_map(h)),
            "response.code_details" => s.code_details.clone().map(String::into_bytes),
            "response.code" => s
                .response_headers
                .as_ref()
                .and_then(|h| h.iter().find(|(k, _)| k == ":status"))
                .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse::<i64>().ok())
                .map(int),
            "source.address" => Some(s.source_address.clone().into_bytes()),
            "source.port" => s.source_address.rsplit_once(':').and_then(|(_, p)| p.parse::<i64>().ok()).map(int),
            "destination.address" => Some(format!("127.0.0.1:{port}").into_bytes()),
            "destination.port" => Some(int(port as i64)),
            "connection.mtls" => Some(vec![0]),
            "connection.id" => Some(int(s.connection_id as i64)),
            _ => None,
        }
    }
}

type C<'a> = Caller<'a, VmState>;

fn memory(caller: &mut C<'_>) -> Option<wasmtime::Memory> {
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => Some(m),
        _ => None,
    }
}

/// Copies guest memory out, bounds-checked: a bad pointer is InvalidMemoryAccess, never a panic.
fn read(caller: &mut C<'_>, ptr: i32, len: i32) -> Result<Vec<u8>, Status> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let mem = memory(caller).ok_or(Status::InvalidMemoryAccess)?;
    let (ptr, len) = (ptr as u32 as usize, len as u32 as usize);
    mem.data(&*caller)
        .get(ptr..ptr.checked_add(len).ok_or(Status::InvalidMemoryAccess)?)
        .map(|s| s.to_vec())
        .ok_or(Status::InvalidMemoryAccess)
}

fn write(caller: &mut C<'_>, ptr: i32, bytes: &[u8]) -> Result<(), Status> {
    let mem = memory(caller).ok_or(Status::InvalidMemoryAccess)?;
    let ptr = ptr as u32 as usize;
    let end = ptr.checked_add(bytes.len()).ok_or(Status::InvalidMemoryAccess)?;
    mem.data_mut(&mut *caller)
        .get_mut(ptr..end)
        .ok_or(Status::InvalidMemoryAccess)?
        .copy_from_slice(bytes);
    Ok(())
}

fn write_u32(caller: &mut C<'_>, ptr: i32, v: u32) -> Result<(), Status> {
    write(caller, ptr, &v.to_le_bytes())
}

/// Envoy's `copyToPointerSize`: allocate in the guest (its `proxy_on_memory_allocate` or
/// `malloc`), copy, and store pointer and size. Empty data is pointer 0, size 0.
fn give(caller: &mut C<'_>, data: &[u8], ptr_ptr: i32, size_ptr: i32) -> Result<(), Status> {
    let mut ptr = 0u32;
    if !data.is_empty() {
        let alloc = caller
            .get_export("proxy_on_memory_allocate")
            .or_else(|| caller.get_export("malloc"))
            .and_then(|e| e.into_func())
            .ok_or(Status::InvalidMemoryAccess)?;
        let alloc = alloc.typed::<i32, i32>(&*caller).map_err(|_| Status::InvalidMemoryAccess)?;
        ptr = alloc.call(&mut *caller, data.len() as i32).map_err(|_| Status::InvalidMemoryAccess)? as u32;
        if ptr == 0 {
            return Err(Status::InvalidMemoryAccess);
        }
        write(caller, ptr as i32, data)?;
    }
    write_u32(caller, ptr_ptr, ptr)?;
    write_u32(caller, size_ptr, data.len() as u32)
}

fn status(r: Result<(), Status>) -> i32 {
    match r {
        Ok(()) => Status::Ok as i32,
        Err(s) => s as i32,
    }
}

/// Records misuse statuses in strict mode, then returns the code.
fn finish(caller: &mut C<'_>, name: &str, r: Result<(), Status>) -> i32 {
    if let Err(s @ (Status::BadArgument | Status::InvalidMemoryAccess | Status::Unimplemented)) = r {
        caller.data_mut().misuse(format!("{name} answered {s:?}"));
    }
    status(r)
}

fn text(bytes: Vec<u8>) -> String {
    String::from_utf8_lossy(&bytes).into_owned()
}

fn lower(k: &str) -> String {
    k.to_ascii_lowercase()
}

/// The host functions: one table, from which [`add_to_linker`] registers each (counted, and in
/// strict mode checked, under its name; its body returns a `Status`) and [`HOST_FUNCTIONS`] lists
/// them.
macro_rules! host_functions {
    ($($name:literal => |$caller:ident $(, $arg:ident : $ty:ty)*| $body:block;)*) => {
        /// Names of every import this host provides in module `env`.
        pub const HOST_FUNCTIONS: &[&str] = &[$($name),*];

        /// Adds every host function the proxy-wasm Rust SDK 0.2 (ABI 0.2.1) imports.
        pub(crate) fn add_to_linker(linker: &mut Linker<VmState>) -> Result<()> {
            $(
                linker.func_wrap("env", $name, move |mut $caller: Caller<'_, VmState> $(, $arg: $ty)*| -> i32 {
                    $caller.data_mut().note($name);
                    // The closure gives `?` a scope; every host function returns a Status.
                    #[allow(clippy::redundant_closure_call)]
                    let r: Result<(), Status> = (|| $body)();
                    finish(&mut $caller, $name, r)
                })?;
            )*
            Ok(())
        }
    };
}

host_functions! {
    "proxy_log" => |c, level: i32, ptr: i32, len: i32| {
        let msg = text(read(&mut c, ptr, len)?);
        let names = ["trace", "debug", "info", "warn", "error", "critical"];
        let level = names.get(level as usize).copied().unwrap_or("?");
        c.data_mut().log(format!("[{level}] {msg}"));
        Ok(())
    };
    // Info, as Envoy's wasm log level is in this project's configurations (`wasm:info`): modules
    // that log their happy path only at debug behave (and count host calls) as they do in Envoy.
    "proxy_get_log_level" => |c, ptr: i32| { write_u32(&mut c, ptr, 2) };
    "proxy_get_current_time_nanoseconds" => |c, ptr: i32| {
        let now = c.data().world.now_nanos();
        write(&mut c, ptr, &now.to_le_bytes())
    };
    "proxy_set_tick_period_milliseconds" => |c, ms: i32| {
        // Envoy's Wasm::setTimerPeriod: disable the running timer; a period above 0 arms a new
        // one at now + period.
        let now = c.data().world.now_nanos();
        let st = c.data_mut();
        st.tick_period_ms = ms as u32;
        st.tick_due = (ms as u32 > 0).then(|| now + ms as u32 as u64 * 1_000_000);
        Ok(())
    };

    // Buffers.
    "proxy_get_buffer_bytes" => |c, kind: i32, start: i32, max: i32, pp: i32, sp: i32| {
        let (start, max) = (start as u32 as usize, max as u32 as usize);
        let data = match c.data_mut().buffer(kind) {
            None => return Err(Status::NotFound),
            Some(b) => {
                if start > b.len() {
                    return Err(Status::BadArgument);
                }
                let end = start.saturating_add(max).min(b.len());
                b[start..end].to_vec()
            }
        };
        give(&mut c, &data, pp, sp)
    };
    "proxy_set_buffer_bytes" => |c, kind: i32, start: i32, size: i32, ptr: i32, len: i32| {
        let data = read(&mut c, ptr, len)?;
        let (start, size) = (start as u32 as usize, size as u32 as usize);
        if !(kind == buffer::HTTP_REQUEST_BODY || kind == buffer::HTTP_RESPONSE_BODY) {
            return Err(Status::NotFound);
        }
        let b = c.data_mut().buffer(kind).ok_or(Status::NotFound)?;
        // Envoy's Buffer::copyFrom: at 0, drain `size` bytes and prepend; at or past the end,
        // append; anything else is refused.
        if start == 0 {
            let drain = size.min(b.len());
            b.drain(..drain);
            b.splice(0..0, data);
            Ok(())
        } else if start >= b.len() {
            b.extend_from_slice(&data);
            Ok(())
        } else {
            Err(Status::BadArgument)
        }
    };

    // Header and trailer maps.
    "proxy_get_header_map_pairs" => |c, kind: i32, pp: i32, sp: i32| {
        let bytes = match c.data_mut().header_map(kind) {
            Some(m) => abi::serialize_map(m),
            None => abi::serialize_map(&[]),
        };
        give(&mut c, &bytes, pp, sp)
    };
    "proxy_set_header_map_pairs" => |c, kind: i32, ptr: i32, len: i32| {
        let pairs = abi::deserialize_map(&read(&mut c, ptr, len)?).ok_or(Status::BadArgument)?;
        let m = c.data_mut().header_map(kind).ok_or(Status::BadArgument)?;
        m.clear();
        m.extend(pairs.into_iter().map(|(k, v)| (lower(&k), v)));
        Ok(())
    };
    "proxy_get_header_map_value" => |c, kind: i32, kp: i32, kl: i32, pp: i32, sp: i32| {
        let key = lower(&text(read(&mut c, kp, kl)?));
        // Envoy returns the first of duplicated headers; a map it does not hand out (none yet,
        // or let go) is a BadArgument.
        let value = c
            .data_mut()
            .header_map(kind)
            .ok_or(Status::BadArgument)?
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
            .ok_or(Status::NotFound)?;
        give(&mut c, &value, pp, sp)
    };
    "proxy_add_header_map_value" => |c, kind: i32, kp: i32, kl: i32, vp: i32, vl: i32| {
        let key = lower(&text(read(&mut c, kp, kl)?));
        let value = read(&mut c, vp, vl)?;
        c.data_mut().header_map(kind).ok_or(Status::BadArgument)?.push((key, value));
        Ok(())
    };
    "proxy_replace_header_map_value" => |c, kind: i32, kp: i32, kl: i32, vp: i32, vl: i32| {
        let key = lower(&text(read(&mut c, kp, kl)?));
        let value = read(&mut c, vp, vl)?;
        let m = c.data_mut().header_map(kind).ok_or(Status::BadArgument)?;
        // Envoy's setCopy (since http_set_copy_replace_all_headers became the only behaviour):
        // every occurrence is removed and the new value is appended.
        m.retain(|(k, _)| *k != key);
        m.push((key, value));
        Ok(())
    };
    "proxy_remove_header_map_value" => |c, kind: i32, kp: i32, kl: i32| {
        let key = lower(&text(read(&mut c, kp, kl)?));
        c.data_mut().header_map(kind).ok_or(Status::BadArgument)?.retain(|(k, _)| *k != key);
        Ok(())
    };

    // Properties.
    "proxy_get_property" => |c, p: i32, l: i32, pp: i32, sp: i32| {
        let path = abi::split_path(&read(&mut c, p, l)?);
        let value = c.data_mut().property(&path).ok_or(Status::NotFound)?;
        give(&mut c, &value, pp, sp)
    };
    "proxy_set_property" => |c, p: i32, l: i32, vp: i32, vl: i32| {
        let path = abi::split_path(&read(&mut c, p, l)?).join("\0");
        let value = read(&mut c, vp, vl)?;
        let s = c.data_mut().stream().ok_or(Status::NotFound)?;
        s.properties.insert(path, value);
        Ok(())
    };

    // Shared data: Envoy's semantics, one store per host shared by all its VMs (workers).
    "proxy_get_shared_data" => |c, kp: i32, kl: i32, pp: i32, sp: i32, cp: i32| {
        let key = text(read(&mut c, kp, kl)?);
        let (world, worker, vm) = (c.data().world.clone(), c.data().worker, c.data().vm_id.clone());
        let found = world.with_turn(worker, || {
            let found = lock(&world.shared).get(&vm, &key);
            let d = match &found {
                Some((v, cas)) => format!("get {key} -> {:?} cas={cas}", String::from_utf8_lossy(v)),
                None => format!("get {key} -> absent"),
            };
            (found, d)
        });
        let (value, cas) = found.ok_or(Status::NotFound)?;
        give(&mut c, &value, pp, sp)?;
        write_u32(&mut c, cp, cas)
    };
    "proxy_set_shared_data" => |c, kp: i32, kl: i32, vp: i32, vl: i32, cas: i32| {
        let key = text(read(&mut c, kp, kl)?);
        let value = read(&mut c, vp, vl)?;
        let (world, worker, vm) = (c.data().world.clone(), c.data().worker, c.data().vm_id.clone());
        let r = world.with_turn(worker, || {
            let r = lock(&world.shared).set(&vm, &key, &value, cas as u32);
            (r, format!("set {key} = {:?} cas={} -> {r:?}", String::from_utf8_lossy(&value), cas as u32))
        });
        match r {
            Status::Ok => Ok(()),
            other => Err(other),
        }
    };

    // Shared queues.
    "proxy_register_shared_queue" => |c, np: i32, nl: i32, rp: i32| {
        let name = text(read(&mut c, np, nl)?);
        let (world, worker, vm, ctx) = (c.data().world.clone(), c.data().worker, c.data().vm_id.clone(), c.data().effective);
        let token =
            world.with_turn(worker, || (lock(&world.queues).register(&vm, &name, worker, ctx), format!("register queue {name}")));
        write_u32(&mut c, rp, token)
    };
    "proxy_resolve_shared_queue" => |c, vp: i32, vl: i32, np: i32, nl: i32, rp: i32| {
        let mut vm = text(read(&mut c, vp, vl)?);
        let name = text(read(&mut c, np, nl)?);
        if vm.is_empty() {
            vm = c.data().vm_id.clone();
        }
        let world = c.data().world.clone();
        let token = lock(&world.queues).resolve(&vm, &name).ok_or(Status::NotFound)?;
        write_u32(&mut c, rp, token)
    };
    "proxy_enqueue_shared_queue" => |c, token: i32, vp: i32, vl: i32| {
        let value = read(&mut c, vp, vl)?;
        let (world, worker) = (c.data().world.clone(), c.data().worker);
        world.with_turn(worker, || {
            let mut qs = lock(&world.queues);
            let r = match qs.by_token.get_mut(&(token as u32)) {
                None => Err(Status::NotFound),
                Some(q) => {
                    q.items.push_back(value);
                    let note = (q.owner_worker, q.owner_context, token as u32);
                    qs.ready.push(note);
                    Ok(())
                }
            };
            (r, format!("enqueue {token}"))
        })
    };
    "proxy_dequeue_shared_queue" => |c, token: i32, pp: i32, sp: i32| {
        let (world, worker) = (c.data().world.clone(), c.data().worker);
        let item = world.with_turn(worker, || {
            let mut qs = lock(&world.queues);
            let r = match qs.by_token.get_mut(&(token as u32)) {
                None => Err(Status::NotFound),
                Some(q) => q.items.pop_front().ok_or(Status::Empty),
            };
            (r, format!("dequeue {token}"))
        })?;
        give(&mut c, &item, pp, sp)
    };

    // Stream control.
    "proxy_continue_stream" => |c, kind: i32| {
        let s = c.data_mut().stream().ok_or(Status::NotFound)?;
        match kind {
            abi::stream::HTTP_REQUEST => s.continue_request = true,
            abi::stream::HTTP_RESPONSE => s.continue_response = true,
            _ => return Err(Status::BadArgument),
        }
        Ok(())
    };
    "proxy_close_stream" => |c, kind: i32| {
        let s = c.data_mut().stream().ok_or(Status::NotFound)?;
        match kind {
            abi::stream::HTTP_REQUEST | abi::stream::HTTP_RESPONSE => s.reset = true,
            _ => return Err(Status::BadArgument),
        }
        Ok(())
    };
    "proxy_send_local_response" => |c,
                                                    code: i32,
                                                    dp: i32,
                                                    dl: i32,
                                                    bp: i32,
                                                    bl: i32,
                                                    hp: i32,
                                                    hl: i32,
                                                    grpc: i32| {
        let details = text(read(&mut c, dp, dl)?);
        let body = read(&mut c, bp, bl)?;
        let headers = abi::deserialize_map(&read(&mut c, hp, hl)?).ok_or(Status::BadArgument)?;
        let s = c.data_mut().stream().ok_or(Status::NotFound)?;
        if s.local_reply.is_none() {
            s.local_reply = Some(LocalReply {
                status: code as u16,
                details,
                body,
                headers: headers.into_iter().map(|(k, v)| (lower(&k), text(v))).collect(),
                grpc_status: grpc,
            });
        }
        Ok(())
    };
    "proxy_set_effective_context" => |c, id: i32| {
        let id = id as u32;
        let st = c.data_mut();
        if id == st.root_context || st.streams.contains_key(&id) {
            st.effective = id;
            Ok(())
        } else {
            Err(Status::BadArgument)
        }
    };
    "proxy_done" => |c| {
        c.data_mut().done_called = true;
        Ok(())
    };

    // HTTP callouts.
    "proxy_http_call" => |c,
                                          up: i32,
                                          ul: i32,
                                          hp: i32,
                                          hl: i32,
                                          bp: i32,
                                          bl: i32,
                                          tp: i32,
                                          tl: i32,
                                          timeout: i32,
                                          rp: i32| {
        let cluster = text(read(&mut c, up, ul)?);
        let headers = abi::deserialize_map(&read(&mut c, hp, hl)?).ok_or(Status::BadArgument)?;
        let body = read(&mut c, bp, bl)?;
        let _trailers = abi::deserialize_map(&read(&mut c, tp, tl)?).ok_or(Status::BadArgument)?;
        if !c.data().clusters.contains(&cluster) {
            c.data_mut().misuse(format!("proxy_http_call to unknown cluster {cluster:?}"));
            return Err(Status::BadArgument);
        }
        // Envoy refuses a callout without :path, :method or :authority.
        for required in [":path", ":method", ":authority"] {
            if !headers.iter().any(|(k, _)| k == required) {
                return Err(Status::BadArgument);
            }
        }
        let st = c.data_mut();
        let token = st.next_token;
        st.next_token += 1;
        let callout = Callout {
            token,
            cluster,
            headers: headers.into_iter().map(|(k, v)| (k, text(v))).collect(),
            body,
            timeout_ms: timeout as u32,
            grpc_method: None,
        };
        let context = st.effective;
        if let Some(s) = st.streams.get_mut(&context) {
            s.callouts.push(callout.clone());
        }
        st.pending.insert(token, PendingCall { context, callout, grpc_stream: false, half_closed: false });
        write_u32(&mut c, rp, token)
    };

    // gRPC callouts (unary calls and streams).
    "proxy_grpc_call" => |c,
                                          up: i32,
                                          ul: i32,
                                          sp: i32,
                                          sl: i32,
                                          mp: i32,
                                          ml: i32,
                                          hp: i32,
                                          hl: i32,
                                          bp: i32,
                                          bl: i32,
                                          timeout: i32,
                                          rp: i32| {
        let cluster = text(read(&mut c, up, ul)?);
        let service = text(read(&mut c, sp, sl)?);
        let method = text(read(&mut c, mp, ml)?);
        let metadata = abi::deserialize_map(&read(&mut c, hp, hl)?).ok_or(Status::ParseFailure)?;
        let body = read(&mut c, bp, bl)?;
        if !c.data().clusters.contains(&cluster) {
            c.data_mut().misuse(format!("proxy_grpc_call to unknown cluster {cluster:?}"));
            return Err(Status::ParseFailure);
        }
        let st = c.data_mut();
        let token = st.next_token;
        st.next_token += 1;
        let callout = Callout {
            token,
            headers: grpc_headers(&cluster, &service, &method, metadata),
            cluster,
            body,
            timeout_ms: timeout as u32,
            grpc_method: Some(format!("{service}/{method}")),
        };
        let context = st.effective;
        if let Some(s) = st.streams.get_mut(&context) {
            s.callouts.push(callout.clone());
        }
        st.pending.insert(token, PendingCall { context, callout, grpc_stream: false, half_closed: false });
        write_u32(&mut c, rp, token)
    };
    "proxy_grpc_stream" => |c,
                                            up: i32,
                                            ul: i32,
                                            sp: i32,
                                            sl: i32,
                                            mp: i32,
                                            ml: i32,
                                            hp: i32,
                                            hl: i32,
                                            rp: i32| {
        let cluster = text(read(&mut c, up, ul)?);
        let service = text(read(&mut c, sp, sl)?);
        let method = text(read(&mut c, mp, ml)?);
        let metadata = abi::deserialize_map(&read(&mut c, hp, hl)?).ok_or(Status::ParseFailure)?;
        if !c.data().clusters.contains(&cluster) {
            c.data_mut().misuse(format!("proxy_grpc_stream to unknown cluster {cluster:?}"));
            return Err(Status::ParseFailure);
        }
        let st = c.data_mut();
        let token = st.next_token;
        st.next_token += 1;
        let callout = Callout {
            token,
            headers: grpc_headers(&cluster, &service, &method, metadata),
            cluster,
            body: Vec::new(),
            timeout_ms: 0,
            grpc_method: Some(format!("{service}/{method}")),
        };
        let context = st.effective;
        if let Some(s) = st.streams.get_mut(&context) {
            s.callouts.push(callout.clone());
        }
        st.pending.insert(token, PendingCall { context, callout, grpc_stream: true, half_closed: false });
        write_u32(&mut c, rp, token)
    };
    "proxy_grpc_send" => |c, token: i32, mp: i32, ml: i32, end: i32| {
        let message = read(&mut c, mp, ml)?;
        let st = c.data_mut();
        let call = st.pending.get_mut(&(token as u32)).filter(|p| p.grpc_stream).ok_or(Status::NotFound)?;
        if call.half_closed {
            return Err(Status::BadArgument);
        }
        call.callout.body.extend_from_slice(&message);
        call.half_closed = end != 0;
        let (context, body) = (call.context, call.callout.body.clone());
        // What the stream sent so far, in the stream's record of its callouts.
        if let Some(recorded) =
            st.streams.get_mut(&context).and_then(|s| s.callouts.iter_mut().find(|c| c.token == token as u32))
        {
            recorded.body = body;
        }
        Ok(())
    };
    // Envoy: cancel resets a call or a stream; no callback follows.
    "proxy_grpc_cancel" => |c, token: i32| {
        c.data_mut().pending.remove(&(token as u32)).map(|_| ()).ok_or(Status::NotFound)
    };
    // Envoy: close cancels a call; on a stream it half-closes (the answer still comes).
    "proxy_grpc_close" => |c, token: i32| {
        let pending = &mut c.data_mut().pending;
        match pending.get_mut(&(token as u32)) {
            Some(call) if call.grpc_stream => {
                call.half_closed = true;
                Ok(())
            }
            Some(_) => pending.remove(&(token as u32)).map(|_| ()).ok_or(Status::NotFound),
            None => Err(Status::NotFound),
        }
    };
    "proxy_get_status" => |c, cp: i32, pp: i32, sp: i32| {
        let (code, message) = c.data().call_response.as_ref().and_then(|r| r.grpc_status.clone()).unwrap_or((0, String::new()));
        write_u32(&mut c, cp, code)?;
        give(&mut c, message.as_bytes(), pp, sp)
    };
    "proxy_call_foreign_function" => |c, _np: i32, _nl: i32, _ap: i32, _al: i32, _rp: i32, _rs: i32| {
        let _ = &mut c;
        Err(Status::NotFound)
    };

    // Metrics.
    "proxy_define_metric" => |c, kind: i32, np: i32, nl: i32, rp: i32| {
        let name = text(read(&mut c, np, nl)?);
        let kind = match kind {
            0 => MetricKind::Counter,
            1 => MetricKind::Gauge,
            2 => MetricKind::Histogram,
            _ => return Err(Status::BadArgument),
        };
        let world = c.data().world.clone();
        let id = lock(&world.metrics).define(kind, &name);
        write_u32(&mut c, rp, id)
    };
    "proxy_increment_metric" => |c, id: i32, offset: i64| {
        let world = c.data().world.clone();
        let mut m = lock(&world.metrics);
        let def = m.defs.get_mut((id as u32 as usize).wrapping_sub(1)).ok_or(Status::NotFound)?;
        match def.0 {
            MetricKind::Counter if offset < 0 => Err(Status::BadArgument),
            MetricKind::Histogram => Err(Status::BadArgument),
            _ => {
                def.2 += offset;
                Ok(())
            }
        }
    };
    "proxy_record_metric" => |c, id: i32, value: i64| {
        let world = c.data().world.clone();
        let mut m = lock(&world.metrics);
        let def = m.defs.get_mut((id as u32 as usize).wrapping_sub(1)).ok_or(Status::NotFound)?;
        def.2 = value;
        Ok(())
    };
    "proxy_get_metric" => |c, id: i32, rp: i32| {
        let world = c.data().world.clone();
        let value = {
            let m = lock(&world.metrics);
            let def = m.defs.get((id as u32 as usize).wrapping_sub(1)).ok_or(Status::NotFound)?;
            if def.0 == MetricKind::Histogram {
                return Err(Status::BadArgument);
            }
            def.2
        };
        write(&mut c, rp, &value.to_le_bytes())
    };
}

pub(crate) fn anyhow_trap(e: wasmtime::Error) -> anyhow::Error {
    anyhow!("{e:?}")
}

/// A gRPC callout's request headers as the cluster gets them from Envoy's gRPC client:
/// `:method POST`, `:path /service/method`, `:authority` the cluster, `content-type`, then the
/// module's initial metadata.
fn grpc_headers(cluster: &str, service: &str, method: &str, metadata: HeaderMap) -> Vec<(String, String)> {
    let mut headers = vec![
        (":method".to_string(), "POST".to_string()),
        (":path".to_string(), format!("/{service}/{method}")),
        (":authority".to_string(), cluster.to_string()),
        ("content-type".to_string(), "application/grpc".to_string()),
    ];
    headers.extend(metadata.into_iter().map(|(k, v)| (lower(&k), text(v))));
    headers
}
