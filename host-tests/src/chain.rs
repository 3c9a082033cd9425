//! A chain of filters, as Envoy iterates an HTTP filter chain: each filter is its own plugin
//! (own module, VMs, configuration), all share one world, and each stream's filter state
//! (properties set by earlier filters) is shared along the chain.
//!
//! Envoy's iteration, per filter: headers Continue → the next filter gets the headers at once;
//! Pause → StopAllIterationAndWatermark: the body is withheld from this filter and everything
//! after it until it continues. Body Pause buffers in this filter; Continue passes what it holds
//! on. A local reply ends the request and travels back through the encoder side of every
//! filter that had seen the request, in reverse order. The response crosses the filters in
//! reverse order with the same rules.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::abi::HeaderMap;
use crate::host::{
    from_map, hcm_normalize, http1_codec_headers, is_segment_path, local_reply_body, local_reply_headers, pieces, to_map,
    too_large, Host, Module, PluginSpec, StartError, Worker,
};
use crate::http::{Request, Upstream, UpstreamRequest, Verdict};
use crate::world::{lock, World};

/// Several plugins in one Envoy filter chain.
pub struct Chain {
    hosts: Vec<Host>,
    world: Arc<World>,
    upstream: Upstream,
    next_connection: u64,
}

#[derive(Default, Clone)]
struct Stage {
    id: u32,
    created: bool,
    /// Envoy lets each filter send one local reply per stream.
    local_sent: bool,
    headers_passed: bool,
    withheld: Vec<u8>,
    withheld_eos: bool,
    eos_seen: bool,
    eos_passed: bool,
    /// Request trailers reached this filter; withheld until its headers and body have passed.
    trailers_seen: bool,
    trailers_withheld: bool,
    trailers_passed: bool,
    resp_seen: bool,
    resp_passed: bool,
    resp_withheld: Vec<u8>,
    resp_withheld_eos: bool,
    resp_eos_seen: bool,
    resp_eos_passed: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum Side {
    Request,
    Response,
}

struct Flow<'a> {
    /// This worker's VM of every filter, in chain order.
    workers: Vec<&'a mut Worker>,
    specs: &'a [PluginSpec],
    request: Request,
    connection: u64,
    stages: Vec<Stage>,
    filter_state: BTreeMap<String, Vec<u8>>,
    upstream: Option<UpstreamRequest>,
    upstream_eos: bool,
    request_ended: bool,
    local_sent: bool,
    local_reply: Option<crate::http::LocalReply>,
    /// `response.code_details` of the response crossing the encoder side.
    code_details: Option<String>,
    response_headers: Option<HeaderMap>,
    response_body: Vec<u8>,
    response_eos: bool,
    reset: bool,
    trap: Option<String>,
}

impl Chain {
    /// Starts every filter (in chain order) in one world. Fails with the index of the filter
    /// that refused to start.
    pub fn start(filters: Vec<(Arc<Module>, PluginSpec)>, upstream: Upstream) -> Result<Chain, (usize, StartError)> {
        let start = filters.first().map(|(_, s)| s.clock_start_nanos).unwrap_or(crate::DEFAULT_START_NANOS);
        let world = Arc::new(World::new(start));
        let mut hosts = Vec::new();
        for (i, (module, spec)) in filters.into_iter().enumerate() {
            hosts.push(Host::start_in(module, spec, world.clone()).map_err(|e| (i, e))?);
        }
        Ok(Chain { hosts, world, upstream, next_connection: 0 })
    }

    pub fn workers(&self) -> usize {
        self.hosts.iter().map(|h| h.workers.len()).min().unwrap_or(1)
    }

    pub fn send(&mut self, request: Request) -> Verdict {
        self.send_on(0, request)
    }

    pub fn send_on(&mut self, worker: usize, request: Request) -> Verdict {
        self.next_connection += 1;
        let connection = self.next_connection;
        let specs: Vec<PluginSpec> = self.hosts.iter().map(|h| h.spec.clone()).collect();
        let workers: Vec<&mut Worker> = self.hosts.iter_mut().map(|h| &mut h.workers[worker]).collect();
        let v = Flow::new(workers, &specs, request, connection).run(&self.upstream);
        for h in self.hosts.iter_mut() {
            h.pump_queues();
        }
        v
    }

    /// Requests on several workers at once, each through the whole chain; `schedule` decides who
    /// makes each shared-data or queue operation next, as in [`Host::race`].
    pub fn race(&mut self, requests: Vec<(usize, Request)>, schedule: &[usize]) -> Vec<Verdict> {
        let specs: Vec<PluginSpec> = self.hosts.iter().map(|h| h.spec.clone()).collect();
        let n_workers = self.workers();
        let mut jobs: Vec<Vec<(usize, Request, u64)>> = (0..n_workers).map(|_| Vec::new()).collect();
        for (i, (w, r)) in requests.into_iter().enumerate() {
            self.next_connection += 1;
            if let Some(list) = jobs.get_mut(w) {
                list.push((i, r, self.next_connection));
            }
        }
        // Transpose: per worker index, that worker's VM of every filter.
        let mut per_worker: Vec<Vec<&mut Worker>> = (0..n_workers).map(|_| Vec::new()).collect();
        for h in self.hosts.iter_mut() {
            for (w, worker) in h.workers.iter_mut().enumerate().take(n_workers) {
                per_worker[w].push(worker);
            }
        }
        self.world.set_schedule(schedule);
        let world = self.world.clone();
        let upstream = &self.upstream;
        let specs = &specs;
        let mut results: Vec<(usize, Verdict)> = Vec::new();
        std::thread::scope(|scope| {
            let mut handles = Vec::new();
            for (w, (mut workers, list)) in per_worker.into_iter().zip(jobs).enumerate() {
                if list.is_empty() {
                    continue;
                }
                let world = world.clone();
                handles.push(scope.spawn(move || {
                    let mut out = Vec::new();
                    for (i, request, connection) in list {
                        let flow_workers: Vec<&mut Worker> = workers.iter_mut().map(|x| &mut **x).collect();
                        out.push((i, Flow::new(flow_workers, specs, request, connection).run(upstream)));
                    }
                    world.finished(w);
                    out
                }));
            }
            for h in handles {
                results.extend(h.join().unwrap_or_default());
            }
        });
        self.world.clear_schedule();
        for h in self.hosts.iter_mut() {
            h.pump_queues();
        }
        results.sort_by_key(|(i, _)| *i);
        results.into_iter().map(|(_, v)| v).collect()
    }

    /// Advances the fake clock, firing every filter's ticks at their own times (as
    /// [`Host::advance`]; ties in chain order, then worker order).
    pub fn advance(&mut self, by: Duration) {
        let target = self.world.now_nanos() + by.as_nanos() as u64;
        let slots: Vec<(usize, usize)> = self
            .hosts
            .iter()
            .enumerate()
            .flat_map(|(h, host)| (0..host.workers.len()).map(move |w| (h, w)))
            .collect();
        loop {
            let dues = slots.iter().enumerate().map(|(k, &(h, w))| (k, self.hosts[h].workers[w].tick_due()));
            let Some((due, k)) = crate::host::next_tick(dues, target) else { break };
            let (h, w) = slots[k];
            self.world.advance_to(due);
            self.hosts[h].workers[w].fire_tick();
            self.hosts[h].pump_queues();
        }
        self.world.advance_to(target);
        for h in self.hosts.iter_mut() {
            h.pump_queues();
        }
    }

    pub fn now_nanos(&self) -> u64 {
        self.world.now_nanos()
    }

    /// Every filter's root-context log lines, per worker VM (filter by filter).
    pub fn all_root_logs(&self) -> Vec<Vec<String>> {
        self.hosts.iter().flat_map(|h| h.all_root_logs()).collect()
    }

    pub fn shared_data(&self, vm_id: &str, key: &str) -> Option<(Vec<u8>, u32)> {
        lock(&self.world.shared).get(vm_id, key)
    }

    pub fn host(&self, index: usize) -> &Host {
        &self.hosts[index]
    }
}

impl<'a> Flow<'a> {
    fn new(workers: Vec<&'a mut Worker>, specs: &'a [PluginSpec], request: Request, connection: u64) -> Flow<'a> {
        let request = hcm_normalize(request, connection);
        let n = workers.len();
        let filter_state = request.properties.iter().filter(|(k, _)| is_segment_path(k)).cloned().collect();
        Flow {
            workers,
            specs,
            request,
            connection,
            stages: vec![Stage::default(); n],
            filter_state,
            upstream: None,
            upstream_eos: false,
            request_ended: false,
            local_sent: false,
            local_reply: None,
            code_details: None,
            response_headers: None,
            response_body: Vec::new(),
            response_eos: false,
            reset: false,
            trap: None,
        }
    }

    fn route_timeout_ms(&self) -> u64 {
        self.specs.first().map(|s| s.route_timeout_ms).unwrap_or(crate::host::DEFAULT_ROUTE_TIMEOUT_MS)
    }

    fn n(&self) -> usize {
        self.stages.len()
    }

    fn worker(&mut self, k: usize) -> &mut Worker {
        &mut *self.workers[k]
    }

    fn done(&self) -> bool {
        self.reset || (self.response_eos && self.response_headers.is_some())
    }

    /// Calls a stream callback of filter k with the chain's filter state, then settles what the
    /// filter did (local reply, reset, continue).
    fn callback(&mut self, k: usize, side: Side, name: &str, params: (i32, i32, i32)) {
        let id = self.stages[k].id;
        let state = self.filter_state.clone();
        let w = self.worker(k);
        if w.failed.is_some() {
            return;
        }
        w.stream(id).properties = state;
        let r = w.ctx_call::<(i32, i32, i32), i32>(id, name, params);
        w.note_callback(id, name, &r);
        let w = self.worker(k);
        self.filter_state = w.stream(id).properties.clone();
        match r {
            Err(t) => {
                self.trap.get_or_insert(t);
                let reply = crate::host::wasm_fail_reply();
                self.local(k, reply, side);
            }
            Ok(action) => {
                if action.unwrap_or(0) == 0 {
                    let s = self.worker(k).stream(id);
                    match side {
                        Side::Request => s.continue_request = true,
                        Side::Response => s.continue_response = true,
                    }
                } else if name.ends_with("_body") {
                    self.check_buffer_limit(k, side);
                }
                self.settle(k, side);
            }
        }
    }

    /// Filter k buffers a body (Pause from a body callback): past the buffer limit, Envoy's
    /// 413 (request) or 500 (response) while the client has no response headers, else a reset.
    fn check_buffer_limit(&mut self, k: usize, side: Side) {
        let id = self.stages[k].id;
        let limit = self.specs.first().map(|s| s.buffer_limit_bytes).unwrap_or(crate::host::DEFAULT_BUFFER_LIMIT_BYTES);
        let client_has_headers = self.response_headers.is_some();
        let s = self.worker(k).stream(id);
        let held = match side {
            Side::Request => s.request_body.as_ref(),
            Side::Response => s.response_body.as_ref(),
        };
        if held.is_none_or(|b| b.len() as u64 <= limit) || s.local_reply.is_some() {
            return;
        }
        if client_has_headers {
            match side {
                // The request had reached the upstream whole: only the client's stream is reset.
                Side::Response => self.reset = true,
                Side::Request => s.reset = true,
            }
        } else {
            s.local_reply = Some(match side {
                Side::Request => too_large(413, "Payload Too Large", "request_payload_too_large"),
                Side::Response => too_large(500, "Internal Server Error", "response_payload_too_large"),
            });
        }
    }

    /// `proxy_on_request_trailers` of filter k (two parameters), settled like any callback.
    fn trailers_callback(&mut self, k: usize) {
        let id = self.stages[k].id;
        let state = self.filter_state.clone();
        let w = self.worker(k);
        if w.failed.is_some() {
            return;
        }
        w.stream(id).properties = state;
        let n = w.stream(id).request_trailers.len() as i32;
        let r = w.ctx_call::<(i32, i32), i32>(id, "proxy_on_request_trailers", (id as i32, n));
        w.note_callback(id, "proxy_on_request_trailers", &r);
        let w = self.worker(k);
        self.filter_state = w.stream(id).properties.clone();
        match r {
            Err(t) => {
                self.trap.get_or_insert(t);
                self.local(k, crate::host::wasm_fail_reply(), Side::Request);
            }
            Ok(action) => {
                if action.unwrap_or(0) == 0 {
                    self.worker(k).stream(id).continue_request = true;
                }
                self.settle(k, Side::Request);
            }
        }
    }

    /// Request trailers arriving at filter k (k = n: the upstream).
    fn req_trailers(&mut self, k: usize, trailers: HeaderMap) {
        if self.request_ended {
            return;
        }
        if k == self.n() {
            if let Some(u) = self.upstream.as_mut() {
                u.trailers = from_map(&trailers);
            }
            self.upstream_eos = true;
            return;
        }
        if !self.stages[k].created {
            return;
        }
        let id = self.stages[k].id;
        self.worker(k).stream(id).request_trailers = trailers;
        self.stages[k].trailers_seen = true;
        let st = &self.stages[k];
        if !st.headers_passed || !st.withheld.is_empty() {
            self.stages[k].trailers_withheld = true;
            return;
        }
        self.trailers_callback(k);
    }

    /// Passes filter k's trailers on once everything before them has gone.
    fn pass_trailers(&mut self, k: usize) {
        let st = &self.stages[k];
        if !st.trailers_seen || st.trailers_withheld || st.trailers_passed || !st.headers_passed || !st.withheld.is_empty() {
            return;
        }
        let id = self.stages[k].id;
        let held = self.worker(k).stream(id).request_body.as_ref().is_some_and(|b| !b.is_empty());
        if held {
            return;
        }
        self.stages[k].trailers_passed = true;
        let trailers = self.worker(k).stream(id).request_trailers.clone();
        self.req_trailers(k + 1, trailers);
    }

    fn settle(&mut self, k: usize, side: Side) {
        let id = self.stages[k].id;
        let s = self.worker(k).stream(id);
        let reply = s.local_reply.take();
        let reset = std::mem::take(&mut s.reset);
        let cont_req = std::mem::take(&mut s.continue_request);
        let cont_resp = std::mem::take(&mut s.continue_response);
        if reset {
            self.reset = true;
            self.request_ended = true;
            return;
        }
        if let Some(reply) = reply {
            self.local(k, reply, side);
            return;
        }
        if cont_req && !self.request_ended {
            if !self.stages[k].headers_passed {
                self.pass_headers(k);
            } else {
                self.flush(k);
            }
            self.pass_trailers(k);
        }
        if cont_resp && self.stages[k].resp_seen {
            if !self.stages[k].resp_passed {
                self.pass_resp_headers(k);
            } else {
                self.resp_flush(k);
            }
        }
    }

    /// A local reply from filter k: the request ends; the reply crosses the encoder side of the
    /// filters that saw the request (from k's side onward on the response path).
    fn local(&mut self, k: usize, reply: crate::http::LocalReply, side: Side) {
        // Each filter sends at most one.
        if self.stages[k].local_sent || self.reset {
            return;
        }
        self.stages[k].local_sent = true;
        self.local_sent = true;
        self.request_ended = true;
        self.local_reply = Some(reply.clone());
        let grpc = crate::http::is_grpc_request(&self.request.headers);
        let head = self.request.header_value(":method") == Some("HEAD");
        let headers = to_map(&local_reply_headers(&reply, grpc, head));
        let reply = crate::http::LocalReply { body: local_reply_body(&reply, grpc, head), ..reply };
        if side == Side::Request || self.response_headers.is_none() {
            self.code_details = Some(reply.details.clone());
        }
        let eos = reply.body.is_empty();
        if side == Side::Response {
            // Envoy: the response has started, so the reply goes straight to the client,
            // bypassing the filters (or, if the client already has the response headers, the
            // stream is reset).
            if self.response_headers.is_some() {
                self.reset = true;
            } else {
                self.response_headers = Some(headers);
                self.response_body = reply.body;
                self.response_eos = true;
            }
            return;
        }
        // On the request path it crosses the encoder side of every filter that saw the request.
        let start = self.stages.iter().rposition(|s| s.created);
        self.resp_headers(start, headers, eos);
        if !eos {
            self.resp_data(start, reply.body, true);
        }
    }

    fn req_headers(&mut self, k: usize, headers: HeaderMap, eos: bool) {
        if self.request_ended {
            return;
        }
        if k == self.n() {
            let mut headers = from_map(&headers);
            http1_codec_headers(&mut headers, eos, false);
            self.upstream = Some(UpstreamRequest { headers, body: Vec::new(), trailers: Vec::new() });
            self.upstream_eos = eos;
            return;
        }
        let request = self.request.clone();
        let connection = self.connection;
        if let Some(reason) = self.worker(k).failed.clone() {
            // Fail closed: a stream meeting a failed VM gets 503.
            self.trap.get_or_insert(reason);
            self.local(k, crate::host::wasm_fail_reply(), Side::Request);
            return;
        }
        let w = self.worker(k);
        let id = w.add_stream(&request, connection);
        w.stream(id).request_headers = headers.clone();
        let root = w.store.data().root_context;
        self.stages[k].id = id;
        self.stages[k].created = true;
        if let Err(t) = self.worker(k).ctx_call::<(i32, i32), ()>(root, "proxy_on_context_create", (id as i32, root as i32)) {
            self.trap.get_or_insert(t);
            self.local(k, crate::host::wasm_fail_reply(), Side::Request);
            return;
        }
        if eos {
            self.stages[k].eos_seen = true;
        }
        self.callback(k, Side::Request, "proxy_on_request_headers", (id as i32, headers.len() as i32, eos as i32));
    }

    fn pass_headers(&mut self, k: usize) {
        self.stages[k].headers_passed = true;
        let id = self.stages[k].id;
        let headers = self.worker(k).stream(id).request_headers.clone();
        let st = &self.stages[k];
        let eos = st.eos_seen && st.withheld.is_empty() && !st.withheld_eos;
        if eos {
            self.stages[k].eos_passed = true;
        }
        self.req_headers(k + 1, headers, eos);
        let st = &mut self.stages[k];
        if !st.withheld.is_empty() || st.withheld_eos {
            let data = std::mem::take(&mut st.withheld);
            let e = std::mem::take(&mut st.withheld_eos);
            self.body_at(k, data, e);
        }
        if std::mem::take(&mut self.stages[k].trailers_withheld) && !self.request_ended {
            self.trailers_callback(k);
        }
    }

    fn req_data(&mut self, k: usize, data: Vec<u8>, eos: bool) {
        if self.request_ended {
            return;
        }
        if k == self.n() {
            if let Some(u) = self.upstream.as_mut() {
                u.body.extend_from_slice(&data);
            }
            self.upstream_eos |= eos;
            return;
        }
        if !self.stages[k].created {
            return;
        }
        if !self.stages[k].headers_passed {
            self.stages[k].withheld.extend_from_slice(&data);
            self.stages[k].withheld_eos |= eos;
            return;
        }
        self.body_at(k, data, eos);
    }

    fn body_at(&mut self, k: usize, data: Vec<u8>, eos: bool) {
        if self.request_ended {
            return;
        }
        let id = self.stages[k].id;
        let size = {
            let b = self.worker(k).stream(id).request_body.get_or_insert_with(Vec::new);
            b.extend_from_slice(&data);
            b.len()
        };
        if eos {
            self.stages[k].eos_seen = true;
        }
        self.callback(k, Side::Request, "proxy_on_request_body", (id as i32, size as i32, eos as i32));
    }

    fn flush(&mut self, k: usize) {
        let id = self.stages[k].id;
        let data = self.worker(k).stream(id).request_body.as_mut().map(std::mem::take).unwrap_or_default();
        let st = &mut self.stages[k];
        let eos = st.eos_seen && !st.eos_passed && st.withheld.is_empty() && !st.withheld_eos;
        if eos {
            st.eos_passed = true;
        }
        if !data.is_empty() || eos {
            self.req_data(k + 1, data, eos);
        }
    }

    /// Response headers arriving at filter `k` (None: past the first filter, to the client).
    fn resp_headers(&mut self, k: Option<usize>, headers: HeaderMap, eos: bool) {
        let Some(k) = k else {
            self.response_headers = Some(headers);
            self.response_eos |= eos;
            return;
        };
        if !self.stages[k].created || self.worker(k).failed.is_some() {
            // A filter that never saw the request (or whose VM failed) lets it through.
            self.stages[k].resp_seen = true;
            self.stages[k].resp_passed = true;
            self.stages[k].resp_eos_seen = eos;
            self.stages[k].resp_eos_passed = eos;
            return self.resp_headers(k.checked_sub(1), headers, eos);
        }
        let id = self.stages[k].id;
        let details = self.code_details.clone();
        self.worker(k).stream(id).code_details = details;
        self.worker(k).stream(id).response_headers = Some(headers.clone());
        self.worker(k).stream(id).response_body = Some(Vec::new());
        self.stages[k].resp_seen = true;
        if eos {
            self.stages[k].resp_eos_seen = true;
        }
        self.callback(k, Side::Response, "proxy_on_response_headers", (id as i32, headers.len() as i32, eos as i32));
    }

    fn pass_resp_headers(&mut self, k: usize) {
        self.stages[k].resp_passed = true;
        let id = self.stages[k].id;
        let headers = self.worker(k).stream(id).response_headers.clone().unwrap_or_default();
        let st = &self.stages[k];
        let eos = st.resp_eos_seen && st.resp_withheld.is_empty() && !st.resp_withheld_eos;
        if eos {
            self.stages[k].resp_eos_passed = true;
        }
        self.resp_headers(k.checked_sub(1), headers, eos);
        let st = &mut self.stages[k];
        if !st.resp_withheld.is_empty() || st.resp_withheld_eos {
            let data = std::mem::take(&mut st.resp_withheld);
            let e = std::mem::take(&mut st.resp_withheld_eos);
            self.resp_body_at(k, data, e);
        }
    }

    fn resp_data(&mut self, k: Option<usize>, data: Vec<u8>, eos: bool) {
        let Some(k) = k else {
            self.response_body.extend_from_slice(&data);
            self.response_eos |= eos;
            return;
        };
        if !self.stages[k].created || self.worker(k).failed.is_some() {
            return self.resp_data(k.checked_sub(1), data, eos);
        }
        if !self.stages[k].resp_passed {
            self.stages[k].resp_withheld.extend_from_slice(&data);
            self.stages[k].resp_withheld_eos |= eos;
            return;
        }
        self.resp_body_at(k, data, eos);
    }

    fn resp_body_at(&mut self, k: usize, data: Vec<u8>, eos: bool) {
        let id = self.stages[k].id;
        let size = {
            let b = self.worker(k).stream(id).response_body.get_or_insert_with(Vec::new);
            b.extend_from_slice(&data);
            b.len()
        };
        if eos {
            self.stages[k].resp_eos_seen = true;
        }
        self.callback(k, Side::Response, "proxy_on_response_body", (id as i32, size as i32, eos as i32));
    }

    fn resp_flush(&mut self, k: usize) {
        let id = self.stages[k].id;
        let data = self.worker(k).stream(id).response_body.as_mut().map(std::mem::take).unwrap_or_default();
        let st = &mut self.stages[k];
        let eos = st.resp_eos_seen && !st.resp_eos_passed && st.resp_withheld.is_empty() && !st.resp_withheld_eos;
        if eos {
            st.resp_eos_passed = true;
        }
        if !data.is_empty() || eos {
            self.resp_data(k.checked_sub(1), data, eos);
        }
    }

    fn run(&mut self, upstream: &Upstream) -> Verdict {
        let headers = to_map(&self.request.headers);
        let chunks = self.request.body_chunks.clone();
        let trailers = to_map(&self.request.trailers);
        let has_trailers = !trailers.is_empty();
        self.req_headers(0, headers, chunks.is_empty() && !has_trailers);
        let limit = self.specs.first().map(|s| s.buffer_limit_bytes).unwrap_or(crate::host::DEFAULT_BUFFER_LIMIT_BYTES);
        for (i, chunk) in chunks.iter().enumerate() {
            let last_chunk = i + 1 == chunks.len() && !has_trailers;
            let parts = pieces(chunk, limit);
            for (j, part) in parts.iter().enumerate() {
                self.req_data(0, part.to_vec(), last_chunk && j + 1 == parts.len());
            }
        }
        if has_trailers {
            self.req_trailers(0, trailers);
        }
        let mut response_started = false;
        let mut stalled = false;
        loop {
            if self.done() {
                break;
            }
            if !self.request_ended && self.upstream.is_some() && self.upstream_eos && !response_started && self.request.disconnect
            {
                // The client reset the stream while the upstream was working on it.
                self.reset = true;
                break;
            }
            if !self.request_ended && self.upstream.is_some() && self.upstream_eos && !response_started {
                response_started = true;
                let answer = self
                    .request
                    .upstream
                    .as_ref()
                    .unwrap_or(upstream)
                    .router_answer(self.route_timeout_ms())
                    .for_request(crate::http::is_grpc_request(&self.request.headers));
                if let Some(w) = self.workers.first() {
                    // The upstream (or the router's timer) took this long.
                    w.store.data().world.advance(Duration::from_millis(answer.elapsed_ms));
                }
                self.code_details = Some(answer.details);
                let last = self.n().checked_sub(1);
                let eos = answer.body.is_empty() && !answer.cut;
                self.resp_headers(last, to_map(&answer.headers), eos);
                if !answer.body.is_empty() {
                    let limit =
                        self.specs.first().map(|s| s.buffer_limit_bytes).unwrap_or(crate::host::DEFAULT_BUFFER_LIMIT_BYTES);
                    let parts = pieces(&answer.body, limit);
                    for (j, part) in parts.iter().enumerate() {
                        self.resp_data(last, part.to_vec(), j + 1 == parts.len() && !answer.cut);
                    }
                }
                if answer.cut {
                    // The upstream closed mid-body after the response started: Envoy resets.
                    self.reset = true;
                }
                continue;
            }
            // Blocked on a filter: only a callout answer can move it.
            let mut answered = false;
            for k in 0..self.n() {
                if !self.stages[k].created {
                    continue;
                }
                let id = self.stages[k].id;
                let spec = self.specs[k].clone();
                let state = self.filter_state.clone();
                self.worker(k).stream(id).properties = state;
                let overrides = self.request.callouts.clone();
                if self.worker(k).answer_next_callout(id, &spec, &overrides) {
                    answered = true;
                    let side = if self.stages[k].resp_seen { Side::Response } else { Side::Request };
                    self.filter_state = self.worker(k).stream(id).properties.clone();
                    self.settle(k, side);
                    break;
                }
            }
            if !answered {
                stalled = true;
                break;
            }
        }
        self.finish(stalled)
    }

    fn finish(&mut self, stalled: bool) -> Verdict {
        let mut v = Verdict::default();
        for k in 0..self.n() {
            if !self.stages[k].created {
                continue;
            }
            let id = self.stages[k].id;
            let w = self.worker(k);
            if w.failed.is_none() {
                w.call_on_log(id);
                let _ = w.ctx_call::<(i32,), i32>(id, "proxy_on_done", (id as i32,));
                let _ = w.ctx_call::<(i32,), ()>(id, "proxy_on_delete", (id as i32,));
            }
            w.store.data_mut().pending.retain(|_, c| c.context != id);
            let s = w.store.data_mut().streams.remove(&id).unwrap_or_default();
            for (name, n) in s.host_calls {
                *v.host_calls.entry(name).or_insert(0) += n;
            }
            v.logs.extend(s.logs);
            v.violations.extend(s.violations);
            v.callouts.extend(s.callouts);
        }
        let mut headers = self.response_headers.as_ref().map(from_map).unwrap_or_default();
        http1_codec_headers(&mut headers, self.response_body.is_empty(), self.request.header_value(":method") == Some("HEAD"));
        v.status = if self.reset || stalled {
            0
        } else {
            headers.iter().find(|(k, _)| k == ":status").and_then(|(_, s)| s.parse().ok()).unwrap_or(0)
        };
        if !(self.reset || stalled) {
            v.response_body = std::mem::take(&mut self.response_body);
            v.response_headers = headers;
        }
        v.local_reply = self.local_reply.take();
        v.code_details = if self.reset || stalled { None } else { self.code_details.take() };
        v.upstream_headers_sent = self.upstream.is_some();
        v.upstream = if self.upstream_eos && !self.request_ended { self.upstream.take() } else { None };
        // A local reply after the whole request reached the upstream still counts as forwarded.
        if v.upstream.is_none() && self.upstream_eos && self.local_sent {
            v.upstream = self.upstream.take();
        }
        v.reset = self.reset;
        v.stalled = stalled;
        v.trap = self.trap.take();
        v
    }
}
