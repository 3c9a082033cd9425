//! Fill levels of the bounded shared-data tables, exported as gauges.
//!
//! Every local table a filter configured (request-signature's nonces and their per-tenant quota
//! records, replay-guard's idempotency keys, collapse fingerprints and their quota records,
//! rate-limit's budgets and leases) has a fixed capacity, `buckets * slots_per_bucket` records,
//! and refuses a new record when the record's bucket is full (fail closed: `nonce_store_full`,
//! `replay_store_full`, `state_unavailable`). An operator wants to see a table fill up before it
//! refuses.
//!
//! Shared data cannot be enumerated, and its records expire without any event, so a count kept
//! where records are inserted would never come down. Instead the host sweeps each table a few
//! buckets at a time, on a timer ([`FillLevels::tick`]: the proxy-wasm root context's tick; the
//! native module at most once per [`TICK_MS`] at the end of a stream), counting the records that
//! are live when their bucket is read. When a sweep reaches the table's last bucket the three
//! gauges of the table are set, under the filter's meter:
//!
//! - `store.<table>.used`: the live records counted by the last complete sweep (each bucket read
//!   once during that sweep, so the figure is at most one sweep old);
//! - `store.<table>.capacity`: `buckets * slots_per_bucket`;
//! - `store.<table>.fill_permille`: `used * 1000 / capacity`, an integer (gauges are integers).
//!
//! A tick reads a tenth ([`SWEEP_TICKS`]) of all the tables' buckets, at most
//! [`MAX_BUCKETS_PER_TICK`] (one shared-data get each; an absent bucket is a cheap miss), so every
//! gauge is refreshed about every 10 s (the demo's 27,136 buckets: 2,714 gets a second).
//! Every proxy-wasm worker sweeps (its root context cannot know it is not alone); they set the
//! same gauges with the same figures. A bucket
//! that cannot be read (host failure, bytes this code did not write) abandons that table's sweep:
//! its gauges keep their last value rather than show a figure that missed buckets.
//!
//! One bucket full is enough to refuse a record (the placement is a keyed hash, so records spread
//! evenly, and a table refuses well before it is 100% full): alert well below 1000.

use crate::store::{BucketTable, SharedStore};

use super::Meter;

/// How often a host sweeps (milliseconds).
pub const TICK_MS: u64 = 1000;

/// A complete sweep of every table takes about this many ticks ([`FillLevels::budget`]).
pub const SWEEP_TICKS: u32 = 10;

/// At most this many buckets are read per tick, over all tables (bigger tables take longer than
/// [`SWEEP_TICKS`] to sweep).
pub const MAX_BUCKETS_PER_TICK: u32 = 4096;

/// The gauges of each table, after `store.<table>.`.
pub const GAUGES: [&str; 3] = ["used", "capacity", "fill_permille"];

/// A bounded table whose fill level is exported, under `meter` as `store.<name>.*`.
#[derive(Debug, Clone)]
pub struct StoreTable {
    pub meter: Meter,
    /// `nonces`, `nonce_quotas`, `keys`, `key_quotas`, `collapse`, `collapse_quotas`, `budgets`,
    /// `leases` (no dot: Envoy's tag extraction reads the table from the stat name).
    pub name: &'static str,
    pub table: BucketTable,
}

impl StoreTable {
    pub fn new(meter: Meter, name: &'static str, table: &BucketTable) -> Self {
        StoreTable { meter, name, table: table.clone() }
    }

    /// `store.<name>.<gauge>` for each of [`GAUGES`].
    pub fn gauge_names(&self) -> Vec<String> {
        GAUGES.iter().map(|gauge| format!("store.{}.{gauge}", self.name)).collect()
    }
}

/// Where a sweep sets its gauges: `(meter, name after the meter's prefix, value)`.
pub type SetGauge<'a> = dyn FnMut(&Meter, &str, u64) + 'a;

/// The sweeps of every table of one configuration (one per worker in proxy-wasm, one per
/// configuration in the native module).
#[derive(Debug, Default)]
pub struct FillLevels {
    sweeps: Vec<Sweep>,
    /// The sweep the next tick starts with (every table gets its turn).
    next: usize,
}

#[derive(Debug)]
struct Sweep {
    store: StoreTable,
    /// The next bucket to read.
    cursor: u32,
    /// Live records counted in the buckets before `cursor`.
    live: u64,
}

impl FillLevels {
    pub fn new(tables: Vec<StoreTable>) -> Self {
        FillLevels { sweeps: tables.into_iter().map(|store| Sweep { store, cursor: 0, live: 0 }).collect(), next: 0 }
    }

    /// No table to sweep (no timer needed).
    pub fn is_empty(&self) -> bool {
        self.sweeps.is_empty()
    }

    /// The gauges to define at configure time, by meter.
    pub fn definitions(&self) -> Vec<(Meter, Vec<String>)> {
        self.sweeps.iter().map(|sweep| (sweep.store.meter.clone(), sweep.store.gauge_names())).collect()
    }

    /// The capacity gauges, set once at configure time (the fill gauges start at 0).
    pub fn set_capacities(&self, set: &mut SetGauge<'_>) {
        for sweep in &self.sweeps {
            set(&sweep.store.meter, &format!("store.{}.capacity", sweep.store.name), sweep.store.table.capacity());
        }
    }

    /// The buckets one tick reads: a [`SWEEP_TICKS`]th of every table's, at least 1, at most
    /// [`MAX_BUCKETS_PER_TICK`].
    pub fn budget(&self) -> u32 {
        let total: u64 = self.sweeps.iter().map(|sweep| u64::from(sweep.store.table.buckets())).sum();
        let share = total.div_ceil(u64::from(SWEEP_TICKS)).max(1);
        u32::try_from(share).unwrap_or(MAX_BUCKETS_PER_TICK).min(MAX_BUCKETS_PER_TICK)
    }

    /// One tick: reads at most `budget` buckets, continuing each table's sweep where the last tick
    /// left it, and sets the gauges of every table whose sweep completed.
    pub fn tick(&mut self, store: &dyn SharedStore, now_ms: u64, budget: u32, set: &mut SetGauge<'_>) {
        let count = self.sweeps.len();
        let mut budget = budget;
        for turn in 0..count {
            if budget == 0 {
                break;
            }
            let index = (self.next + turn) % count;
            let Some(sweep) = self.sweeps.get_mut(index) else { continue };
            budget -= sweep.step(store, now_ms, budget, set);
        }
        self.next = if count == 0 { 0 } else { (self.next + 1) % count };
    }
}

impl Sweep {
    /// Reads up to `budget` buckets of this table; the number read.
    fn step(&mut self, store: &dyn SharedStore, now_ms: u64, budget: u32, set: &mut SetGauge<'_>) -> u32 {
        let table = &self.store.table;
        let read = budget.min(table.buckets().saturating_sub(self.cursor));
        match table.live_in_buckets(store, self.cursor, read, now_ms) {
            Ok(live) => {
                self.live += live;
                self.cursor += read;
            }
            Err(_) => {
                // Abandon this sweep: the gauges keep their last complete figure.
                self.cursor = 0;
                self.live = 0;
                return read;
            }
        }
        if self.cursor >= table.buckets() {
            let capacity = table.capacity();
            let used = self.live.min(capacity);
            let meter = &self.store.meter;
            let name = self.store.name;
            set(meter, &format!("store.{name}.used"), used);
            set(meter, &format!("store.{name}.capacity"), capacity);
            set(meter, &format!("store.{name}.fill_permille"), permille(used, capacity));
            self.cursor = 0;
            self.live = 0;
        }
        read
    }
}

/// `used * 1000 / capacity`, rounded down (0 for an empty capacity, which a table cannot have).
pub fn permille(used: u64, capacity: u64) -> u64 {
    if capacity == 0 {
        return 0;
    }
    u64::try_from(u128::from(used) * 1000 / u128::from(capacity)).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{KeyHash, MemoryStore, Update};
    use std::collections::BTreeMap;
    use std::num::{NonZeroU16, NonZeroU32};

    fn table(prefix: &str, buckets: u32, slots: u16) -> BucketTable {
        BucketTable::new(prefix, NonZeroU32::new(buckets).unwrap(), NonZeroU16::new(slots).unwrap(), 0)
    }

    fn insert(store: &MemoryStore, table: &BucketTable, key: u32, expires_at_ms: u64) {
        let key = KeyHash::of(&[&key.to_be_bytes()]);
        table
            .update(store, key, 0, |_| Update::Write { payload: Vec::new(), expires_at_ms, result: () })
            .unwrap();
    }

    fn run(levels: &mut FillLevels, store: &MemoryStore, now_ms: u64, budget: u32) -> BTreeMap<String, u64> {
        let mut set = BTreeMap::new();
        levels.tick(store, now_ms, budget, &mut |meter: &Meter, name: &str, value: u64| {
            set.insert(format!("{}.{name}", meter.prefix), value);
        });
        set
    }

    #[test]
    fn a_complete_sweep_sets_used_capacity_and_permille_and_expired_records_do_not_count() {
        let store = MemoryStore::default();
        let nonces = table("n", 8, 4);
        for key in 0..10 {
            insert(&store, &nonces, key, 1_000);
        }
        for key in 10..13 {
            insert(&store, &nonces, key, 50);
        }
        let meter = Meter::new("request_signature", "firebreak.request_signature");
        let mut levels = FillLevels::new(vec![StoreTable::new(meter, "nonces", &nonces)]);
        assert_eq!(levels.definitions()[0].1, ["store.nonces.used", "store.nonces.capacity", "store.nonces.fill_permille"]);
        // 8 buckets, 3 per tick: nothing is set until the sweep reaches the last bucket.
        assert!(run(&mut levels, &store, 100, 3).is_empty());
        assert!(run(&mut levels, &store, 100, 3).is_empty());
        let set = run(&mut levels, &store, 100, 3);
        assert_eq!(set["firebreak.request_signature.store.nonces.used"], 10, "the 3 expired records are not counted");
        assert_eq!(set["firebreak.request_signature.store.nonces.capacity"], 32);
        assert_eq!(set["firebreak.request_signature.store.nonces.fill_permille"], 312);
        // The next sweep sees the records expire.
        let set = run(&mut levels, &store, 2_000, 8);
        assert_eq!(set["firebreak.request_signature.store.nonces.used"], 0);
        assert_eq!(set["firebreak.request_signature.store.nonces.fill_permille"], 0);
    }

    #[test]
    fn the_budget_is_shared_by_every_table_and_each_gets_its_turn() {
        let store = MemoryStore::default();
        let a = table("a", 4, 1);
        let b = table("b", 4, 1);
        insert(&store, &b, 1, 1_000);
        let meter = Meter::new("replay_guard", "firebreak.replay_guard");
        let mut levels =
            FillLevels::new(vec![StoreTable::new(meter.clone(), "keys", &a), StoreTable::new(meter, "collapse", &b)]);
        let mut seen = BTreeMap::new();
        for _ in 0..4 {
            seen.extend(run(&mut levels, &store, 0, 2));
        }
        assert_eq!(seen["firebreak.replay_guard.store.keys.used"], 0);
        assert_eq!(seen["firebreak.replay_guard.store.collapse.used"], 1);
        assert_eq!(seen["firebreak.replay_guard.store.collapse.fill_permille"], 250);
    }

    #[test]
    fn an_unreadable_bucket_abandons_the_sweep_and_keeps_the_last_figure() {
        let store = MemoryStore::default();
        let keys = table("k", 2, 2);
        insert(&store, &keys, 1, 1_000);
        let meter = Meter::new("replay_guard", "firebreak.replay_guard");
        let mut levels = FillLevels::new(vec![StoreTable::new(meter, "keys", &keys)]);
        assert_eq!(run(&mut levels, &store, 0, 2)["firebreak.replay_guard.store.keys.used"], 1);
        store.set("k:0", b"\x07garbage", 0).unwrap();
        assert!(run(&mut levels, &store, 0, 2).is_empty(), "no figure from a sweep that missed a bucket");
    }

    #[test]
    fn a_tick_reads_a_tenth_of_the_buckets_within_bounds() {
        let meter = Meter::new("replay_guard", "firebreak.replay_guard");
        let levels = |buckets: &[u32]| {
            FillLevels::new(buckets.iter().map(|b| StoreTable::new(meter.clone(), "keys", &table("t", *b, 1))).collect())
        };
        assert_eq!(levels(&[1024, 256]).budget(), 128);
        assert_eq!(levels(&[1]).budget(), 1);
        assert_eq!(levels(&[1 << 20, 1 << 20]).budget(), MAX_BUCKETS_PER_TICK);
        assert_eq!(FillLevels::default().budget(), 1);
    }

    #[test]
    fn permille_is_exact_integer_arithmetic() {
        assert_eq!(permille(0, 10), 0);
        assert_eq!(permille(9, 10), 900);
        assert_eq!(permille(10, 10), 1000);
        assert_eq!(permille(1, 3), 333);
        assert_eq!(permille(u64::MAX, u64::MAX), 1000);
        assert_eq!(permille(1, 0), 0);
    }
}
