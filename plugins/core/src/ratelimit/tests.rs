//! Rate-limit decisions against the in-memory store with Envoy's semantics and a fake clock.

use std::net::IpAddr;
use std::sync::Arc;

use super::*;
use crate::store::{MemoryStore, StoreError};

fn policy(json: &str) -> RateLimitPolicy {
    RateLimitPolicy::from_json(json.as_bytes()).unwrap()
}

fn rule(name: &str, key: &str, requests: u32, per_seconds: u32, burst: u32, extra: &str) -> String {
    format!(
        r#"{{"name":"{name}","routes":[{{"methods":["POST"],"path_prefix":"/v1/"}}],"key":"{key}","requests":{requests},"per_seconds":{per_seconds},"burst":{burst}{extra}}}"#
    )
}

fn instance(name: &str, rules: &[String], extra: &str) -> RateLimitPolicy {
    policy(&format!(r#"{{"name":"{name}","rules":[{}]{extra}}}"#, rules.join(",")))
}

fn ip(text: &str) -> Option<IpAddr> {
    client::parse_source_address(text)
}

fn facts<'a>(client: &str, user: Option<&'a str>) -> RequestFacts<'a> {
    RequestFacts { method: "POST", path: "/v1/transfers", client_ip: ip(client), user }
}

fn admitted(p: &RateLimitPolicy, store: &dyn SharedStore, f: &RequestFacts<'_>, now: u64) -> bool {
    check(p, store, f, now).rejection.is_none()
}

fn count_admitted(p: &RateLimitPolicy, store: &dyn SharedStore, f: &RequestFacts<'_>, now: u64, n: usize) -> usize {
    (0..n).filter(|_| admitted(p, store, f, now)).count()
}

const T0: u64 = 1_700_000_000_000;

#[test]
fn burst_then_throttle_with_the_documented_429() {
    let p = instance("edge", &[rule("per-ip", "ip", 1, 10, 3, "")], "");
    let store = MemoryStore::default();
    let f = facts("10.0.0.1:4000", None);
    assert_eq!(count_admitted(&p, &store, &f, T0, 3), 3);
    let d = check(&p, &store, &f, T0 + 1);
    let r = d.rejection.expect("fourth request is limited");
    assert_eq!((r.status, r.code), (429, "rate_limited"));
    let header = |name: &str| r.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
    // The next token is 10 s after the first admission: 9.999 s from now, rounded up.
    assert_eq!(header("retry-after"), Some("10"));
    assert_eq!(header("ratelimit-policy"), Some("\"per-ip\";q=3;w=30"));
    assert_eq!(header("ratelimit"), Some("\"per-ip\";r=0;t=30"));
    let body: serde_json::Value = serde_json::from_slice(&r.body()).unwrap();
    assert_eq!(body["error"], "rate_limited");
    assert!(
        matches!(&d.events[..], [Event::Limited { rule, key, retry_after_ms: 9999 }] if rule == "per-ip" && key == "ip=10.0.0.1/32")
    );
}

#[test]
fn refill_admits_one_request_per_interval() {
    let p = instance("edge", &[rule("r", "ip", 1, 10, 2, "")], "");
    let store = MemoryStore::default();
    let f = facts("10.0.0.1:1", None);
    assert_eq!(count_admitted(&p, &store, &f, T0, 5), 2);
    assert_eq!(count_admitted(&p, &store, &f, T0 + 9_999, 5), 0);
    assert_eq!(count_admitted(&p, &store, &f, T0 + 10_000, 5), 1);
    assert_eq!(count_admitted(&p, &store, &f, T0 + 60_000, 5), 2, "refills to the burst, not beyond");
}

/// Issue 6, accuracy: under 5x overload for an hour of fake time the admitted count is exactly
/// burst + rate * time.
#[test]
fn incident_1_five_times_overload_admits_exactly_the_configured_rate() {
    let p = instance("edge", &[rule("r", "ip", 10, 1, 20, "")], "");
    let store = MemoryStore::default();
    let f = facts("10.0.0.1:1", None);
    let seconds = 3600u64;
    let mut admitted_total = 0u64;
    // 50 requests per second, one every 20 ms.
    for step in 0..(seconds * 50) {
        if admitted(&p, &store, &f, T0 + step * 20) {
            admitted_total += 1;
        }
    }
    // The last request is at T0 + 3600 s - 20 ms: 35,999 intervals of 100 ms have fully elapsed.
    assert_eq!(admitted_total, 20 + 35_999);
}

/// A fixed window would admit 2 * limit around its boundary; GCRA admits at most
/// burst + rate * d in any interval of length d.
#[test]
fn no_double_burst_at_any_boundary() {
    let p = instance("edge", &[rule("r", "ip", 10, 60, 10, "")], "");
    let store = MemoryStore::default();
    let f = facts("10.0.0.1:1", None);
    let mut times = Vec::new();
    // One attempt every 100 ms for 5 minutes.
    for step in 0..3000u64 {
        let now = T0 + step * 100;
        if admitted(&p, &store, &f, now) {
            times.push(now);
        }
    }
    for (i, start) in times.iter().enumerate() {
        let in_window = times[i..].iter().take_while(|t| **t < start + 60_000).count();
        assert!(in_window <= 10 + 10, "{in_window} admitted in one minute from {start}");
    }
    // And no minute ever sees 2 * (burst + rate): the first minute is the burst plus refill.
    let first_minute = times.iter().filter(|t| **t < T0 + 60_000).count();
    assert_eq!(first_minute, 10 + 9);
}

#[test]
fn two_users_are_independent() {
    let p = instance("per-user", &[rule("u", "user", 1, 60, 2, "")], "");
    let store = MemoryStore::default();
    let alice = facts("10.0.0.1:1", Some("alice"));
    let bob = facts("10.0.0.1:2", Some("bob"));
    assert_eq!(count_admitted(&p, &store, &alice, T0, 10), 2);
    assert_eq!(count_admitted(&p, &store, &bob, T0, 10), 2, "bob is not slowed by alice from the same IP");
    assert_eq!(count_admitted(&p, &store, &alice, T0, 1), 0);
}

#[test]
fn ipv6_neighbours_in_one_prefix_share_a_budget() {
    let p = instance("edge", &[rule("r", "ip", 1, 60, 2, "")], "");
    let store = MemoryStore::default();
    assert!(admitted(&p, &store, &facts("[2001:db8:1:2::1]:1", None), T0));
    assert!(admitted(&p, &store, &facts("[2001:db8:1:2:dead:beef::9]:2", None), T0));
    assert!(!admitted(&p, &store, &facts("[2001:db8:1:2::3]:3", None), T0), "same /64, budget spent");
    assert!(admitted(&p, &store, &facts("[2001:db8:1:3::1]:1", None), T0), "next /64 is another client");

    let p48 = instance("edge48", &[rule("r", "ip", 1, 60, 1, "")], r#","ipv6_prefix":48"#);
    assert!(admitted(&p48, &store, &facts("[2001:db8:1:2::1]:1", None), T0));
    assert!(!admitted(&p48, &store, &facts("[2001:db8:1:ffff::1]:1", None), T0));
}

#[test]
fn ipv4_clients_are_separate_by_default() {
    let p = instance("edge", &[rule("r", "ip", 1, 60, 1, "")], "");
    let store = MemoryStore::default();
    assert!(admitted(&p, &store, &facts("10.0.0.1:1", None), T0));
    assert!(admitted(&p, &store, &facts("10.0.0.2:1", None), T0));
    assert!(!admitted(&p, &store, &facts("10.0.0.1:9", None), T0), "the port is not part of the key");
    assert!(!admitted(&p, &store, &facts("[::ffff:10.0.0.1]:9", None), T0), "mapped IPv4 is the same client");
}

#[test]
fn the_most_restrictive_rule_decides_and_a_refusal_costs_nothing_elsewhere() {
    let p = instance("edge", &[rule("loose", "ip", 100, 60, 100, ""), rule("strict", "user", 1, 60, 2, "")], "");
    let store = MemoryStore::default();
    let alice = facts("10.0.0.1:1", Some("alice"));
    assert_eq!(count_admitted(&p, &store, &alice, T0, 10), 2);
    let d = check(&p, &store, &alice, T0);
    let r = d.rejection.unwrap();
    assert!(r.message.contains("`strict`"), "{}", r.message);
    let policy = r.headers.iter().find(|(n, _)| n == "ratelimit-policy").unwrap();
    assert_eq!(policy.1, "\"loose\";q=100;w=60, \"strict\";q=2;w=120");
    // The 8 refused requests were not charged to `loose`: bob behind the same IP has 98 left.
    let bob = facts("10.0.0.1:2", Some("bob"));
    let d = check(&p, &store, &bob, T0);
    assert!(d.rejection.is_none());
    // The IP rule then limits both users together.
    let mut total = 1;
    for i in 0..200 {
        let user = format!("user{i}");
        if admitted(&p, &store, &facts("10.0.0.1:3", Some(&user)), T0) {
            total += 1;
        }
    }
    assert_eq!(total, 100 - 2);
}

#[test]
fn report_only_rules_count_but_never_block() {
    let p = instance("edge", &[rule("trial", "ip", 1, 60, 1, r#","mode":"report_only""#)], "");
    let store = MemoryStore::default();
    let f = facts("10.0.0.1:1", None);
    let decisions: Vec<_> = (0..3).map(|_| check(&p, &store, &f, T0)).collect();
    assert!(decisions.iter().all(|d| d.rejection.is_none()));
    assert_eq!(decisions[0].events, vec![Event::Allowed { rule: "trial".into() }]);
    assert!(matches!(&decisions[2].events[..], [Event::WouldLimit { rule, .. }] if rule == "trial"));
}

#[test]
fn report_only_rules_are_not_charged_for_requests_an_enforced_rule_refuses() {
    let p =
        instance("edge", &[rule("trial", "ip", 1, 60, 5, r#","mode":"report_only""#), rule("enforced", "ip", 1, 60, 1, "")], "");
    let store = MemoryStore::default();
    let f = facts("10.0.0.1:1", None);
    assert_eq!(count_admitted(&p, &store, &f, T0, 10), 1);
    let other = instance("edge", &[rule("trial", "ip", 1, 60, 5, r#","mode":"report_only""#)], "");
    // Same instance name, same rule and quota: the same record. One admission was charged.
    let would: usize = (0..10)
        .filter(|_| check(&other, &store, &f, T0).events.iter().any(|e| matches!(e, Event::WouldLimit { .. })))
        .count();
    assert_eq!(would, 10 - 4);
}

#[test]
fn a_user_rule_without_a_verified_user_is_refused_or_falls_back_to_the_ip() {
    let p = instance("u", &[rule("u", "user", 1, 60, 1, "")], "");
    let store = MemoryStore::default();
    let r = check(&p, &store, &facts("10.0.0.1:1", None), T0).rejection.unwrap();
    assert_eq!((r.status, r.code), (401, "rate_limit_unauthenticated"));
    let r = check(&p, &store, &facts("10.0.0.1:1", Some("")), T0).rejection.unwrap();
    assert_eq!(r.code, "rate_limit_unauthenticated", "an empty user is no user");

    let p = instance("u2", &[rule("u", "user", 1, 60, 1, r#","missing_user":"by_ip""#)], "");
    assert!(admitted(&p, &store, &facts("10.0.0.1:1", None), T0));
    assert!(!admitted(&p, &store, &facts("10.0.0.1:2", None), T0));
    assert!(admitted(&p, &store, &facts("10.0.0.1:2", Some("alice")), T0), "verified users keep their own budget");
}

#[test]
fn odd_user_names_are_quoted_in_the_key_and_stay_distinct() {
    let p = instance("e", &[rule("u", "user", 1, 60, 1, "")], "");
    let store = MemoryStore::default();
    let d = check(&p, &store, &facts("10.0.0.1:1", Some("a b")), T0);
    assert!(d.rejection.is_none());
    let d = check(&p, &store, &facts("10.0.0.1:1", Some("a b")), T0);
    assert!(matches!(&d.events[..], [Event::Limited { key, .. }] if key == "user=\"a b\""));
    assert!(admitted(&p, &store, &facts("10.0.0.1:1", Some("a")), T0));
}

#[test]
fn ip_and_user_is_one_budget_per_pair() {
    let p = instance("e", &[rule("pair", "ip_and_user", 1, 60, 1, "")], "");
    let store = MemoryStore::default();
    assert!(admitted(&p, &store, &facts("10.0.0.1:1", Some("alice")), T0));
    assert!(!admitted(&p, &store, &facts("10.0.0.1:1", Some("alice")), T0));
    assert!(admitted(&p, &store, &facts("10.0.0.2:1", Some("alice")), T0));
    assert!(admitted(&p, &store, &facts("10.0.0.1:1", Some("bob")), T0));
}

#[test]
fn an_unknown_client_address_fails_closed() {
    let p = instance("e", &[rule("r", "ip", 1, 60, 1, "")], "");
    let store = MemoryStore::default();
    let f = RequestFacts { method: "POST", path: "/v1/x", client_ip: None, user: None };
    let r = check(&p, &store, &f, T0).rejection.unwrap();
    assert_eq!((r.status, r.code), (503, "rate_limit_client_unknown"));
}

#[test]
fn other_routes_and_methods_are_not_limited_and_touch_no_state() {
    struct NoStore;
    impl SharedStore for NoStore {
        fn get(&self, _: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
            panic!("no state for unmatched requests")
        }
        fn set(&self, _: &str, _: &[u8], _: u32) -> Result<(), StoreError> {
            panic!("no state for unmatched requests")
        }
    }
    let p = instance("e", &[rule("r", "ip", 1, 60, 1, "")], "");
    for (method, path) in [("GET", "/v1/transfers"), ("POST", "/v2/transfers"), ("POST", "/v")] {
        let f = RequestFacts { method, path, client_ip: None, user: None };
        assert_eq!(check(&p, &NoStore, &f, T0), Decision::allow(Vec::new()));
    }
}

#[test]
fn a_full_table_fails_closed_and_reuses_slots_once_keys_are_refilled() {
    let p = instance("e", &[rule("r", "ip", 1, 10, 1, "")], r#","table":{"buckets":1,"slots_per_bucket":2}"#);
    let store = MemoryStore::default();
    assert!(admitted(&p, &store, &facts("10.0.0.1:1", None), T0));
    assert!(admitted(&p, &store, &facts("10.0.0.2:1", None), T0));
    let r = check(&p, &store, &facts("10.0.0.3:1", None), T0).rejection.unwrap();
    assert_eq!((r.status, r.code), (503, "rate_limit_store_full"));
    // Keys already in the table are still limited: nothing was forgotten.
    assert!(!admitted(&p, &store, &facts("10.0.0.1:1", None), T0 + 1));
    // Once a key's TAT has passed its record equals a fresh key's: its slot is reused.
    assert!(admitted(&p, &store, &facts("10.0.0.3:1", None), T0 + 10_000));
    assert_eq!(p.table.live_records(&store, T0 + 10_000), Ok(1));

    let open =
        instance("o", &[rule("r", "ip", 1, 10, 1, r#","fail_open":true"#)], r#","table":{"buckets":1,"slots_per_bucket":1}"#);
    assert!(admitted(&open, &store, &facts("10.0.0.1:1", None), T0));
    let d = check(&open, &store, &facts("10.0.0.2:1", None), T0);
    assert!(d.rejection.is_none());
    assert_eq!(d.events, vec![Event::Error { rule: "r".into(), error: RuleError::StoreFull, blocked: false }]);
}

#[test]
fn a_failing_or_corrupt_store_fails_closed() {
    struct Down;
    impl SharedStore for Down {
        fn get(&self, _: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
            Err(StoreError::Unavailable)
        }
        fn set(&self, _: &str, _: &[u8], _: u32) -> Result<(), StoreError> {
            Err(StoreError::Unavailable)
        }
    }
    let p = instance("e", &[rule("r", "ip", 1, 60, 1, "")], "");
    let r = check(&p, &Down, &facts("10.0.0.1:1", None), T0).rejection.unwrap();
    assert_eq!((r.status, r.code), (503, "rate_limit_unavailable"));
    let two = instance("e", &[rule("a", "ip", 1, 60, 1, ""), rule("b", "ip", 2, 60, 1, "")], "");
    let r = check(&two, &Down, &facts("10.0.0.1:1", None), T0).rejection.unwrap();
    assert_eq!(r.code, "rate_limit_unavailable");

    let store = MemoryStore::default();
    let single = instance("c", &[rule("r", "ip", 1, 60, 1, "")], r#","table":{"buckets":1,"slots_per_bucket":1}"#);
    store.set("firebreak.rl.c:0", b"garbage", 0).unwrap();
    let r = check(&single, &store, &facts("10.0.0.1:1", None), T0).rejection.unwrap();
    assert_eq!(r.code, "rate_limit_unavailable");
}

#[test]
fn a_fail_open_rule_whose_store_fails_is_reported_once_and_the_others_still_decide() {
    /// Fails every operation on the first bucket key it is asked for.
    struct FirstBucketDown {
        store: MemoryStore,
        down: std::sync::Mutex<Option<String>>,
    }
    impl FirstBucketDown {
        fn is_down(&self, key: &str) -> bool {
            let mut down = self.down.lock().unwrap();
            down.get_or_insert_with(|| key.to_string()) == key
        }
    }
    impl SharedStore for FirstBucketDown {
        fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
            if self.is_down(key) {
                return Err(StoreError::Unavailable);
            }
            self.store.get(key)
        }
        fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
            if self.is_down(key) {
                return Err(StoreError::Unavailable);
            }
            self.store.set(key, value, cas)
        }
    }
    let p = instance(
        "fo",
        &[rule("open", "ip", 1, 60, 1, r#","fail_open":true"#), rule("closed", "user", 1, 60, 1, "")],
        r#","table":{"buckets":64}"#,
    );
    let store = FirstBucketDown { store: MemoryStore::default(), down: Default::default() };
    let f = facts("10.0.0.1:1", Some("bob"));
    // The open rule is read first: its bucket is the one that is down.
    let d = check(&p, &store, &f, T0);
    assert!(d.rejection.is_none(), "{:?}", d.rejection);
    let open_errors = d.events.iter().filter(|e| matches!(e, Event::Error { rule, .. } if rule == "open")).count();
    assert_eq!(open_errors, 1);
    assert!(d.events.contains(&Event::Allowed { rule: "closed".into() }));
    let d = check(&p, &store, &f, T0);
    assert_eq!(d.rejection.map(|r| r.code), Some("rate_limited"), "the working rule still limits");
}

#[test]
fn two_instances_never_share_a_budget() {
    let store = MemoryStore::default();
    let a = instance("before-signature", &[rule("r", "ip", 1, 60, 1, "")], "");
    let b = instance("after-signature", &[rule("r", "ip", 1, 60, 1, "")], "");
    let f = facts("10.0.0.1:1", None);
    assert!(admitted(&a, &store, &f, T0));
    assert!(admitted(&b, &store, &f, T0));
    assert!(!admitted(&a, &store, &f, T0));
}

#[test]
fn allowed_responses_carry_the_headers_when_configured() {
    let p = instance("e", &[rule("r", "ip", 1, 1, 5, "")], r#","response_headers":true"#);
    let store = MemoryStore::default();
    let d = check(&p, &store, &facts("10.0.0.1:1", None), T0);
    assert_eq!(
        d.response_headers,
        vec![("ratelimit-policy".into(), "\"r\";q=5;w=5".into()), ("ratelimit".into(), "\"r\";r=4;t=1".into())]
    );
    let quiet = instance("q", &[rule("r", "ip", 1, 1, 5, "")], "");
    assert!(check(&quiet, &store, &facts("10.0.0.1:1", None), T0).response_headers.is_empty());
}

#[test]
fn trusted_user_header_is_used_only_when_configured_and_unambiguous() {
    let h = |pairs: &[(&str, &str)]| pairs.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect::<Vec<_>>();
    let principal = UserSource::Principal;
    assert_eq!(resolve_user(&principal, Some("alice".into()), &h(&[("x-user", "mallory")])), Some("alice".into()));
    assert_eq!(resolve_user(&principal, None, &h(&[("x-user", "mallory")])), None, "client headers never name the user");
    let header = UserSource::TrustedHeader("x-user".into());
    assert_eq!(resolve_user(&header, None, &h(&[("x-user", "bob")])), Some("bob".into()));
    assert_eq!(resolve_user(&header, None, &h(&[("x-user", "bob"), ("x-user", "eve")])), None);
    assert_eq!(resolve_user(&header, None, &h(&[("x-user", " ")])), None);
    assert_eq!(resolve_user(&header, Some("alice".into()), &h(&[])), None);
    // Only the exact name; another spelling (which an upstream may read as the same header, and
    // which the trusted hop may not strip) is never a user, and makes the real one ambiguous.
    for variant in ["x_user", "X_User", "X-USER"] {
        assert_eq!(resolve_user(&header, None, &h(&[(variant, "mallory")])), None, "{variant}");
        assert_eq!(resolve_user(&header, None, &h(&[("x-user", "bob"), (variant, "mallory")])), None, "{variant}");
    }
}

/// A store that lets another worker write between our read and our write, `n` times.
struct Interleaved<'a> {
    store: &'a MemoryStore,
    other: Box<dyn Fn() + 'a>,
    remaining: std::cell::Cell<u32>,
}

impl SharedStore for Interleaved<'_> {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        self.store.get(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        if self.remaining.get() > 0 {
            self.remaining.set(self.remaining.get() - 1);
            (self.other)();
        }
        self.store.set(key, value, cas)
    }
}

#[test]
fn a_worker_interleaved_between_read_and_write_does_not_double_spend() {
    let p = instance("e", &[rule("r", "ip", 1, 60, 2, "")], "");
    let store = MemoryStore::default();
    let f = facts("10.0.0.1:1", None);
    let other_admitted = std::cell::Cell::new(0);
    // Worker B admits a request while worker A is between its read and its write, twice.
    let worker_a = Interleaved {
        store: &store,
        other: Box::new(|| {
            if admitted(&p, &store, &f, T0) {
                other_admitted.set(other_admitted.get() + 1);
            }
        }),
        remaining: std::cell::Cell::new(2),
    };
    let a = admitted(&p, &worker_a, &f, T0);
    assert_eq!(other_admitted.get(), 2);
    assert!(!a, "A re-read after its CAS failed and saw the burst spent by B");
    assert!(!admitted(&p, &store, &f, T0));
}

#[test]
fn threads_hammering_one_key_share_exactly_one_budget() {
    let p = Arc::new(instance("e", &[rule("r", "ip", 1, 3600, 50, "")], ""));
    let store = Arc::new(MemoryStore::default());
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let (p, store) = (p.clone(), store.clone());
            std::thread::spawn(move || {
                let f = facts("10.0.0.1:1", None);
                let mut admitted_here = 0;
                let mut errors = 0;
                for _ in 0..200 {
                    match check(&p, &*store, &f, T0).rejection {
                        None => admitted_here += 1,
                        Some(r) if r.code == "rate_limited" => {}
                        Some(_) => errors += 1,
                    }
                }
                (admitted_here, errors)
            })
        })
        .collect();
    let results: Vec<(u32, u32)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let total: u32 = results.iter().map(|r| r.0).sum();
    let errors: u32 = results.iter().map(|r| r.1).sum();
    assert_eq!(total + errors, 50, "never more than the burst; contention may only refuse");
    assert_eq!(total, 50, "with 8 threads and 32 CAS attempts nothing should stay contended");
}

/// A reload that changes the budget table's geometry is refused (the budgets would be looked for
/// in other buckets: every limited key would get a fresh budget); the same geometry adopts the
/// stored placement secret and the spent budget survives.
#[test]
fn a_reload_that_changes_the_table_geometry_is_refused_and_budgets_survive_the_same_one() {
    let store = MemoryStore::default();
    let r = rule("per-ip", "ip", 1, 60, 1, "");
    let mut a = instance("geo", std::slice::from_ref(&r), r#","table":{"buckets":64,"slots_per_bucket":4}"#);
    a.bind_tables(&store, [1; 32]).unwrap();
    assert!(admitted(&a, &store, &facts("10.0.0.1", None), T0));
    assert!(!admitted(&a, &store, &facts("10.0.0.1", None), T0));
    for (table, field) in [
        (r#","table":{"buckets":128,"slots_per_bucket":4}"#, "table.buckets"),
        (r#","table":{"buckets":64,"slots_per_bucket":8}"#, "table.slots_per_bucket"),
    ] {
        let mut b = instance("geo", std::slice::from_ref(&r), table);
        assert_eq!(b.bind_tables(&store, [2; 32]).unwrap_err().field, field);
    }
    let mut same = instance("geo", &[r], r#","table":{"buckets":64,"slots_per_bucket":4}"#);
    same.bind_tables(&store, [3; 32]).unwrap();
    assert!(!admitted(&same, &store, &facts("10.0.0.1", None), T0), "the spent budget is found");
}
