//! What the VMs of one host share, as Envoy's workers share it: shared data (with CAS), shared
//! queues, metrics, and (ours, not Envoy's) the fake clock and the interleaving schedule.
//! One `World` per [`crate::Host`]: nothing is global, so tests run in parallel.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::abi::Status;

/// 2026-01-01T00:00:00Z: the fake clock's default start, so tests are reproducible.
pub const DEFAULT_START_NANOS: u64 = 1_767_225_600 * 1_000_000_000;

#[derive(Default)]
pub(crate) struct SharedData {
    /// (vm_id, key) → (value, cas). Envoy scopes shared data by vm_id.
    entries: HashMap<(String, String), (Vec<u8>, u32)>,
    next_cas: u32,
}

impl SharedData {
    pub(crate) fn get(&self, vm_id: &str, key: &str) -> Option<(Vec<u8>, u32)> {
        self.entries.get(&(vm_id.to_string(), key.to_string())).cloned()
    }

    /// Envoy's `SharedData::set`: a present key with a non-zero, different CAS is a mismatch;
    /// otherwise the value is written and gets a fresh CAS. An absent key is inserted whatever the
    /// CAS. Nothing is ever deleted (an empty value is a value).
    pub(crate) fn set(&mut self, vm_id: &str, key: &str, value: &[u8], cas: u32) -> Status {
        let next = self.bump();
        match self.entries.get_mut(&(vm_id.to_string(), key.to_string())) {
            Some(entry) => {
                if cas != 0 && cas != entry.1 {
                    return Status::CasMismatch;
                }
                *entry = (value.to_vec(), next);
            }
            None => {
                self.entries.insert((vm_id.to_string(), key.to_string()), (value.to_vec(), next));
            }
        }
        Status::Ok
    }

    fn bump(&mut self) -> u32 {
        self.next_cas = self.next_cas.wrapping_add(1);
        if self.next_cas == 0 {
            self.next_cas = 1;
        }
        self.next_cas
    }
}

pub(crate) struct Queue {
    pub vm_id: String,
    pub name: String,
    /// The worker whose root context registered the queue last (Envoy: it gets `on_queue_ready`).
    pub owner_worker: usize,
    pub owner_context: u32,
    pub items: VecDeque<Vec<u8>>,
}

#[derive(Default)]
pub(crate) struct Queues {
    pub by_token: BTreeMap<u32, Queue>,
    /// (worker, root context, token) notifications not yet delivered.
    pub ready: Vec<(usize, u32, u32)>,
}

impl Queues {
    pub(crate) fn register(&mut self, vm_id: &str, name: &str, worker: usize, context: u32) -> u32 {
        for (token, q) in self.by_token.iter_mut() {
            if q.vm_id == vm_id && q.name == name {
                q.owner_worker = worker;
                q.owner_context = context;
                return *token;
            }
        }
        let token = self.by_token.len() as u32 + 1;
        self.by_token.insert(
            token,
            Queue {
                vm_id: vm_id.to_string(),
                name: name.to_string(),
                owner_worker: worker,
                owner_context: context,
                items: VecDeque::new(),
            },
        );
        token
    }

    pub(crate) fn resolve(&self, vm_id: &str, name: &str) -> Option<u32> {
        self.by_token.iter().find(|(_, q)| q.vm_id == vm_id && q.name == name).map(|(t, _)| *t)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

#[derive(Default)]
pub(crate) struct Metrics {
    pub defs: Vec<(MetricKind, String, i64)>,
}

impl Metrics {
    pub(crate) fn define(&mut self, kind: MetricKind, name: &str) -> u32 {
        if let Some(i) = self.defs.iter().position(|(k, n, _)| *k == kind && n == name) {
            return i as u32 + 1;
        }
        self.defs.push((kind, name.to_string(), 0));
        self.defs.len() as u32
    }
}

/// The test's choice of who goes next: entry `k` lets that worker make the k-th shared-data or
/// queue operation. Workers that finish are skipped. Empty: free running.
#[derive(Default)]
struct Schedule {
    order: VecDeque<usize>,
    finished: Vec<usize>,
    active: bool,
}

pub(crate) struct World {
    pub(crate) shared: Mutex<SharedData>,
    pub(crate) queues: Mutex<Queues>,
    pub(crate) metrics: Mutex<Metrics>,
    clock_nanos: AtomicU64,
    schedule: Mutex<Schedule>,
    turn: Condvar,
    /// Every shared-data/queue operation, in the order it happened: (worker, description).
    pub(crate) trace: Mutex<Vec<(usize, String)>>,
}

impl World {
    pub(crate) fn new(start_nanos: u64) -> World {
        World {
            shared: Mutex::new(SharedData::default()),
            queues: Mutex::new(Queues::default()),
            metrics: Mutex::new(Metrics::default()),
            clock_nanos: AtomicU64::new(start_nanos),
            schedule: Mutex::new(Schedule::default()),
            turn: Condvar::new(),
            trace: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn now_nanos(&self) -> u64 {
        self.clock_nanos.load(Ordering::SeqCst)
    }

    /// Moves the clock forward to `nanos` (never back).
    pub(crate) fn advance_to(&self, nanos: u64) {
        self.clock_nanos.fetch_max(nanos, Ordering::SeqCst);
    }

    pub(crate) fn advance(&self, by: Duration) {
        self.clock_nanos.fetch_add(by.as_nanos() as u64, Ordering::SeqCst);
    }

    pub(crate) fn set_schedule(&self, order: &[usize]) {
        let mut s = lock(&self.schedule);
        s.order = order.iter().copied().collect();
        s.finished.clear();
        s.active = !order.is_empty();
    }

    pub(crate) fn clear_schedule(&self) {
        let mut s = lock(&self.schedule);
        s.order.clear();
        s.active = false;
        self.turn.notify_all();
    }

    pub(crate) fn finished(&self, worker: usize) {
        let mut s = lock(&self.schedule);
        s.finished.push(worker);
        self.turn.notify_all();
    }

    /// Blocks until it is `worker`'s turn for one shared operation, runs it, and passes the turn.
    pub(crate) fn with_turn<R>(&self, worker: usize, what: impl FnOnce() -> (R, String)) -> R {
        {
            let mut s = lock(&self.schedule);
            loop {
                if !s.active {
                    break;
                }
                while let Some(head) = s.order.front().copied() {
                    if s.finished.contains(&head) {
                        s.order.pop_front();
                    } else {
                        break;
                    }
                }
                match s.order.front() {
                    None => break,
                    Some(&head) if head == worker => break,
                    Some(_) => {
                        let (guard, timeout) =
                            self.turn.wait_timeout(s, Duration::from_secs(10)).unwrap_or_else(|e| e.into_inner());
                        s = guard;
                        if timeout.timed_out() {
                            // A schedule that names a worker which never makes another shared
                            // operation would deadlock: give up on the schedule, loudly.
                            lock(&self.trace).push((worker, "schedule abandoned: deadlock".to_string()));
                            s.active = false;
                        }
                    }
                }
            }
        }
        let (result, description) = what();
        lock(&self.trace).push((worker, description));
        let mut s = lock(&self.schedule);
        if s.active && s.order.front() == Some(&worker) {
            s.order.pop_front();
        }
        self.turn.notify_all();
        result
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cas_semantics_are_envoys() {
        let mut d = SharedData::default();
        assert!(d.get("vm", "k").is_none());
        // Absent key: inserted whatever the CAS.
        assert_eq!(d.set("vm", "k", b"a", 12345), Status::Ok);
        let (v, cas) = d.get("vm", "k").unwrap();
        assert_eq!(v, b"a");
        assert_ne!(cas, 0);
        // Non-matching CAS fails and leaves the value alone.
        assert_eq!(d.set("vm", "k", b"b", cas + 1), Status::CasMismatch);
        assert_eq!(d.get("vm", "k").unwrap().0, b"a");
        // Matching CAS writes and bumps.
        assert_eq!(d.set("vm", "k", b"b", cas), Status::Ok);
        let (_, cas2) = d.get("vm", "k").unwrap();
        assert_ne!(cas2, cas);
        // The old token is now stale.
        assert_eq!(d.set("vm", "k", b"c", cas), Status::CasMismatch);
        // CAS 0 is unconditional.
        assert_eq!(d.set("vm", "k", b"d", 0), Status::Ok);
        // An empty value does not delete.
        assert_eq!(d.set("vm", "k", b"", 0), Status::Ok);
        assert_eq!(d.get("vm", "k").unwrap().0, b"");
        // Scoped by vm_id.
        assert!(d.get("other", "k").is_none());
    }
}
