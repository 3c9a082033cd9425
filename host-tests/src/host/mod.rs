//! The host: a module compiled once ([`module`]), instantiated once per worker ([`worker`]),
//! each stream driven as Envoy drives it ([`stream`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};

use crate::http::{Callout, CalloutReply, GrpcReply, Request, Verdict};
use crate::world::{lock, MetricKind, World};

mod module;
mod stream;
mod worker;

pub use module::{HostBuilder, Module, PluginSpec, StartError, DEFAULT_BUFFER_LIMIT_BYTES, DEFAULT_ROUTE_TIMEOUT_MS};
pub use stream::hcm_normalize;
pub(crate) use stream::{
    from_map, http1_codec_headers, is_segment_path, local_reply_body, local_reply_headers, pieces, to_map, too_large,
    wasm_fail_reply, StreamRun,
};
pub(crate) use worker::{next_tick, Worker};

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
        let mut run = w.open(request, connection, spec.buffer_limit_bytes);
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
        let mut run = w.open(request, connection, spec.buffer_limit_bytes);
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
            if !run.is_done() {
                // `drive` moves a stalled stream on again.
                self.workers[run.worker].drive(run, &spec);
            }
        }
        self.pump_queues();
    }

    /// Finishes a stream opened with [`Host::open`] and returns its verdict.
    pub fn finish(&mut self, handle: usize) -> Verdict {
        let spec = self.spec.clone();
        let mut placeholder = StreamRun::new(0, 0, Request::get("/"));
        placeholder.end();
        let mut run = std::mem::replace(&mut self.open[handle], placeholder);
        let w = &mut self.workers[run.worker];
        if !run.is_done() {
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
                        let mut run = w.open(req, conn, spec.buffer_limit_bytes);
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
