//! One Envoy worker: its VM, the calls into it, callouts answered, ticks.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use wasmtime::{Store, WasmParams, WasmResults};
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtxBuilder};

use crate::http::{CalloutReply, GrpcAnswer, GrpcReply, Request};
use crate::vm::{CallResponse, StreamData, VmState};
use crate::world::World;

use super::module::{Module, PluginSpec, StartError};
use super::stream::{is_segment_path, to_map, wasm_fail_reply};

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
    pub(crate) instance: wasmtime::Instance,
    pub(crate) failed: Option<String>,
    pub(crate) output: wasmtime_wasi::p2::pipe::MemoryOutputPipe,
}

impl Worker {
    pub(crate) fn new(module: &Module, world: Arc<World>, index: usize, spec: &PluginSpec) -> Result<Worker, StartError> {
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
    pub(crate) fn call<P: WasmParams, R: WasmResults>(&mut self, name: &str, params: P) -> Result<Option<R>, String> {
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

    pub(crate) fn fail(&mut self, message: String) {
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
        self.release_before(context, name);
        self.store.data_mut().effective = context;
        let r = self.call(name, params);
        let root = self.store.data().root_context;
        self.store.data_mut().effective = root;
        r
    }

    /// Envoy's wasm context lets go of a stream's header or trailer map when the callback for it
    /// returns Continue (a pause keeps it): the module cannot read or change it at later
    /// events, until `on_log`.
    pub(crate) fn note_callback(&mut self, id: u32, name: &str, result: &Result<Option<i32>, String>) {
        let kind = match name {
            "proxy_on_request_headers" => crate::abi::map::HTTP_REQUEST_HEADERS,
            "proxy_on_request_trailers" => crate::abi::map::HTTP_REQUEST_TRAILERS,
            "proxy_on_response_headers" => crate::abi::map::HTTP_RESPONSE_HEADERS,
            "proxy_on_response_trailers" => crate::abi::map::HTTP_RESPONSE_TRAILERS,
            _ => return,
        };
        if matches!(result, Ok(None | Some(0))) {
            let s = self.stream(id);
            if !s.released.contains(&kind) {
                s.released.push(kind);
            }
        }
    }

    /// At an event past a map's own, the map is let go whether its callback continued or the
    /// module resumed the stream later (Envoy 1.40 hands none of the request headers to
    /// `on_request_body` after a paused and resumed `on_request_headers` either).
    fn release_before(&mut self, id: u32, name: &str) {
        use crate::abi::map;
        let kinds: &[i32] = match name {
            "proxy_on_request_body" | "proxy_on_request_trailers" => &[map::HTTP_REQUEST_HEADERS],
            "proxy_on_response_headers" => &[map::HTTP_REQUEST_HEADERS, map::HTTP_REQUEST_TRAILERS],
            "proxy_on_response_body" | "proxy_on_response_trailers" => {
                &[map::HTTP_REQUEST_HEADERS, map::HTTP_REQUEST_TRAILERS, map::HTTP_RESPONSE_HEADERS]
            }
            _ => return,
        };
        let Some(s) = self.store.data_mut().streams.get_mut(&id) else { return };
        for kind in kinds {
            if !s.released.contains(kind) {
                s.released.push(*kind);
            }
        }
    }

    /// `proxy_on_log`: Envoy's access-log phase hands the module every map again.
    pub(crate) fn call_on_log(&mut self, id: u32) {
        self.stream(id).in_log = true;
        let _ = self.ctx_call::<(i32,), ()>(id, "proxy_on_log", (id as i32,));
        self.stream(id).in_log = false;
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

    /// Answers the oldest pending callout of this stream by the script (the request's own
    /// answers, `overrides`, first). False if none can be.
    pub(crate) fn answer_next_callout(&mut self, id: u32, spec: &PluginSpec, overrides: &BTreeMap<String, CalloutReply>) -> bool {
        let http_reply = |cluster: &str| overrides.get(cluster).or_else(|| spec.callouts.get(cluster));
        // A gRPC callout: the cluster's `Grpc` answer (or the Rust API's `grpc`); other answers
        // end it as Envoy's gRPC client would see them.
        let grpc_reply = |cluster: &str| -> GrpcReply {
            match http_reply(cluster) {
                Some(CalloutReply::Grpc(a)) => GrpcReply::Respond(a.clone()),
                Some(CalloutReply::Hold) => GrpcReply::Hold,
                Some(CalloutReply::Timeout) => GrpcReply::Status(4, "upstream request timeout".into()),
                Some(CalloutReply::Reset | CalloutReply::Fail) => GrpcReply::Status(14, String::new()),
                Some(CalloutReply::Respond { .. }) | None => spec.grpc.get(cluster).cloned().unwrap_or(GrpcReply::Hold),
            }
        };
        let next = self.store.data().pending.iter().find_map(|(token, call)| {
            if call.context != id {
                return None;
            }
            let hold = match &call.callout.grpc_method {
                None => matches!(http_reply(&call.callout.cluster), Some(CalloutReply::Hold) | None),
                // A stream is answered once the module has ended its side.
                Some(_) => grpc_reply(&call.callout.cluster) == GrpcReply::Hold || (call.grpc_stream && !call.half_closed),
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
                let reply = grpc_reply(&call.callout.cluster);
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
            // An HTTP callout to a gRPC cluster: not modelled, it fails.
            CalloutReply::Fail | CalloutReply::Grpc(_) => None,
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

    /// Delivers a gRPC answer as Envoy's gRPC client does. A call (`proxy_grpc_call`): status 0
    /// is `proxy_on_grpc_receive` with the message, any other `proxy_on_grpc_close` (the
    /// message through `proxy_get_status`); metadata is not delivered. A stream: the initial
    /// metadata (the response headers; none for a trailers-only answer: no message and no
    /// initial metadata), the message if any, the trailing metadata (`grpc-status`,
    /// `grpc-message`, the answer's trailers), then `proxy_on_grpc_close`.
    pub(crate) fn answer_grpc(&mut self, token: u32, reply: GrpcReply) -> bool {
        let Some(call) = self.store.data_mut().pending.remove(&token) else { return false };
        let Some(mut answer) = reply.answer() else {
            self.store.data_mut().pending.insert(token, call);
            return false;
        };
        // A late answer: the clock moves by the wait. A call's timeout passing first ends it as
        // Envoy's own timer does: 14 UNAVAILABLE, `upstream request timeout{response_timeout}`.
        // (Envoy also sends the timeout as `grpc-timeout`; a server that enforces it, as grpcio
        // does, may answer 4 DEADLINE_EXCEEDED first: a race, so not in a scenario file.)
        let timeout = call.callout.timeout_ms as u64;
        let mut details = "via_upstream";
        if !call.grpc_stream && timeout > 0 && answer.delay_ms >= timeout {
            self.store.data().world.advance(Duration::from_millis(timeout));
            answer = GrpcAnswer { status: 14, message: "upstream request timeout".into(), ..GrpcAnswer::default() };
            details = "response_timeout";
        } else if answer.delay_ms > 0 {
            self.store.data().world.advance(Duration::from_millis(answer.delay_ms));
        }
        let ctx = call.context;
        let (c, t) = (ctx as i32, token as i32);
        // Envoy's gRPC client gives the module the server's message with the response's
        // details appended (`message{via_upstream}`, or `via_upstream` alone).
        let message = if answer.message.is_empty() { details.to_string() } else { format!("{}{{{details}}}", answer.message) };
        let status = Some((answer.status, message));
        let mut ok = true;
        if call.grpc_stream {
            let trailers_only = answer.body.is_empty() && answer.initial_metadata.is_empty();
            // The response headers (Envoy's router adds its `x-envoy-upstream-service-time`); in
            // a trailers-only answer they are the trailing metadata.
            let mut headers =
                vec![(":status".to_string(), "200".to_string()), ("content-type".to_string(), "application/grpc".to_string())];
            headers.extend(answer.initial_metadata.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.clone())));
            headers.push(("x-envoy-upstream-service-time".to_string(), "0".to_string()));
            let mut trailing = vec![("grpc-status".to_string(), answer.status.to_string())];
            if !answer.message.is_empty() {
                trailing.push(("grpc-message".to_string(), answer.message.clone()));
            }
            trailing.extend(answer.trailers.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.clone())));
            let initial = if trailers_only {
                trailing = headers.into_iter().chain(trailing).collect();
                Vec::new()
            } else {
                headers
            };
            let n = initial.len() as i32;
            self.store.data_mut().call_response = Some(CallResponse { headers: to_map(&initial), ..Default::default() });
            ok &= self
                .ctx_call::<(i32, i32, i32), ()>(ctx, "proxy_on_grpc_receive_initial_metadata", (c, t, n))
                .is_ok();
            if ok && !answer.body.is_empty() {
                let size = answer.body.len() as i32;
                self.store.data_mut().call_response = Some(CallResponse { body: answer.body.clone(), ..Default::default() });
                ok &= self.ctx_call::<(i32, i32, i32), ()>(ctx, "proxy_on_grpc_receive", (c, t, size)).is_ok();
            }
            if ok {
                let n = trailing.len() as i32;
                self.store.data_mut().call_response = Some(CallResponse { trailers: to_map(&trailing), ..Default::default() });
                ok &= self
                    .ctx_call::<(i32, i32, i32), ()>(ctx, "proxy_on_grpc_receive_trailing_metadata", (c, t, n))
                    .is_ok();
            }
            if ok {
                self.store.data_mut().call_response = Some(CallResponse { grpc_status: status, ..Default::default() });
                ok &= self
                    .ctx_call::<(i32, i32, i32), ()>(ctx, "proxy_on_grpc_close", (c, t, answer.status as i32))
                    .is_ok();
            }
        } else if answer.status == 0 {
            let size = answer.body.len() as i32;
            self.store.data_mut().call_response =
                Some(CallResponse { body: answer.body, grpc_status: status, ..Default::default() });
            ok = self.ctx_call::<(i32, i32, i32), ()>(ctx, "proxy_on_grpc_receive", (c, t, size)).is_ok();
        } else {
            self.store.data_mut().call_response = Some(CallResponse { grpc_status: status, ..Default::default() });
            ok = self
                .ctx_call::<(i32, i32, i32), ()>(ctx, "proxy_on_grpc_close", (c, t, answer.status as i32))
                .is_ok();
        }
        self.store.data_mut().call_response = None;
        ok
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
