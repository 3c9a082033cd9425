//! amount-limit's flow driven through the in-memory host: the incident-1 pattern, exact
//! arithmetic at the budget's edge, every malformed body, per-currency and per-key budgets,
//! report-only rules, the verified principal as a key, and budgets on a fake Redis bridge
//! (the arithmetic of [`super::redis::AMOUNT_GCRA_SCRIPT`] in Rust) shared by two instances.

use std::cell::Cell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use crate::filters::{configure, Setup};
use crate::flow::memory::{exchange, MemoryEnv, MemoryRequest, MemoryUpstream, Outcome};
use crate::flow::{CallAnswer, FlowFactory};

const T0: u64 = 1_700_000_000_000;

const WITHDRAWALS: &str = r#"{"name":"withdrawals","routes":[{"methods":["POST"],"path_exact":"/v1/withdrawals"}],"amount_pointer":"/amount","amount_format":"minor_units","currency_pointer":"/currency","key":["/account"],"budgets":{"USD":{"exponent":2,"amount_minor":20,"window_s":86400},"JPY":{"exponent":0,"amount_minor":1000,"window_s":86400}}}"#;

fn config(rules: &[&str], extra: &str) -> String {
    format!(r#"{{"rules":[{}]{extra}}}"#, rules.join(","))
}

fn instance(json: &str, env: &MemoryEnv) -> Arc<dyn FlowFactory> {
    let setup = Setup { env: &|_| None, store: &env.store, entropy: [5; 32] };
    match configure("amount_limit", json.as_bytes(), &setup) {
        Ok(factory) => factory,
        Err(error) => panic!("{json}: {error:?}"),
    }
}

fn post(path: &str, body: &str) -> MemoryRequest {
    let headers = vec![
        (":method".to_string(), "POST".to_string()),
        (":path".to_string(), path.to_string()),
        (":authority".to_string(), "api.example.com".to_string()),
        ("content-type".to_string(), "application/json".to_string()),
    ];
    MemoryRequest::new(headers, body.as_bytes())
}

fn withdraw(account: &str, amount: &str, currency: &str) -> MemoryRequest {
    post("/v1/withdrawals", &format!(r#"{{"account":"{account}","amount":{amount},"currency":"{currency}"}}"#))
}

fn send(factory: &Arc<dyn FlowFactory>, env: &mut MemoryEnv, request: &MemoryRequest) -> Outcome {
    exchange(&mut *factory.new_flow(), env, request, &MemoryUpstream::default())
}

fn code(outcome: &Outcome) -> Option<&'static str> {
    outcome.reply.as_ref().map(|r| r.code)
}

fn header<'a>(outcome: &'a Outcome, name: &str) -> Option<&'a str> {
    outcome.reply.as_ref()?.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

#[test]
fn twenty_withdrawals_of_five_from_a_budget_of_twenty_forward_twenty() {
    let mut env = MemoryEnv { now_ms: Some(T0), ..MemoryEnv::default() };
    let factory = instance(&config(&[WITHDRAWALS], ""), &env);
    let mut forwarded = 0;
    let mut refused = Vec::new();
    for _ in 0..20 {
        let outcome = send(&factory, &mut env, &withdraw("acc-1", "5", "USD"));
        if outcome.passed() {
            forwarded += 5;
        } else {
            assert!(!outcome.forwarded);
            refused.push(outcome);
        }
    }
    assert_eq!(forwarded, 20, "the ledger never exceeds the budget");
    assert_eq!(refused.len(), 16);
    let first = &refused[0];
    assert_eq!((first.reply.as_ref().unwrap().status, code(first)), (429, Some("amount_limited")));
    assert_eq!(header(first, "ratelimit-policy"), Some("\"withdrawals.USD\";q=20;w=86400"));
    assert_eq!(header(first, "ratelimit"), Some("\"withdrawals.USD\";r=0;t=86400"));
    // Five units come back after 5 * 86400 / 20 s.
    assert_eq!(header(first, "retry-after"), Some("21600"));
    assert_eq!(first.counter("firebreak.amount_limit.rule.withdrawals.limited"), 1);
    assert_eq!(first.counter("firebreak.amount_limit.rejected.amount_limited"), 1);
    assert!(first
        .logs
        .iter()
        .any(|(_, l)| l.contains("code=amount_limited") && l.contains("rule=withdrawals currency=USD amount_minor=5 key=")));
    assert!(!first.logs.iter().any(|(_, l)| l.contains("acc-1")), "account numbers are not logged");
    // Another account has its own budget.
    assert!(send(&factory, &mut env, &withdraw("acc-2", "20", "USD")).passed());
    // Twelve hours later half the budget is back, exactly.
    env.now_ms = Some(T0 + 43_200_000);
    assert!(send(&factory, &mut env, &withdraw("acc-1", "10", "USD")).passed());
    assert_eq!(code(&send(&factory, &mut env, &withdraw("acc-1", "1", "USD"))), Some("amount_limited"));
}

#[test]
fn at_the_budget_passes_and_one_minor_unit_over_does_not() {
    let mut env = MemoryEnv::default();
    let factory = instance(&config(&[WITHDRAWALS], ""), &env);
    assert!(send(&factory, &mut env, &withdraw("a", "19", "USD")).passed());
    assert!(send(&factory, &mut env, &withdraw("a", "1", "USD")).passed(), "exactly at the budget");
    let over = send(&factory, &mut env, &withdraw("a", "1", "USD"));
    assert_eq!(code(&over), Some("amount_limited"));
    // A single amount of the whole budget passes on a fresh key; one unit more never does.
    assert!(send(&factory, &mut env, &withdraw("b", "20", "USD")).passed());
    let never = send(&factory, &mut env, &withdraw("c", "21", "USD"));
    assert_eq!(code(&never), Some("amount_limited"));
    assert!(never.reply.unwrap().message.contains("exceeds the whole budget"));
    assert!(send(&factory, &mut env, &withdraw("c", "20", "USD")).passed(), "the refusal cost nothing");
}

#[test]
fn each_currency_has_its_own_budget() {
    let mut env = MemoryEnv::default();
    let factory = instance(&config(&[WITHDRAWALS], ""), &env);
    assert!(send(&factory, &mut env, &withdraw("a", "20", "USD")).passed());
    assert!(send(&factory, &mut env, &withdraw("a", "1000", "JPY")).passed(), "JPY has its own 1000");
    assert_eq!(code(&send(&factory, &mut env, &withdraw("a", "1", "JPY"))), Some("amount_limited"));
    assert_eq!(code(&send(&factory, &mut env, &withdraw("a", "1", "USD"))), Some("amount_limited"));
}

#[test]
fn every_malformed_body_is_refused_with_its_code_and_never_forwarded() {
    let mut env = MemoryEnv::default();
    let factory = instance(&config(&[WITHDRAWALS], r#","max_body_bytes":512"#), &env);
    let cases: Vec<(String, u16, &str, &str)> = vec![
        (r#"{"account":"a","currency":"USD"}"#.into(), 400, "amount_invalid", "missing"),
        (r#"{"account":"a","amount":null,"currency":"USD"}"#.into(), 400, "amount_invalid", "missing"),
        (r#"{"account":"a","amount":-5,"currency":"USD"}"#.into(), 400, "amount_invalid", "negative"),
        (r#"{"account":"a","amount":5.5,"currency":"USD"}"#.into(), 400, "amount_invalid", "fractional"),
        (r#"{"account":"a","amount":5.0,"currency":"USD"}"#.into(), 400, "amount_invalid", "fractional"),
        (r#"{"account":"a","amount":5e0,"currency":"USD"}"#.into(), 400, "amount_invalid", "exponent"),
        (r#"{"account":"a","amount":18446744073709551616,"currency":"USD"}"#.into(), 400, "amount_invalid", "overflow"),
        (r#"{"account":"a","amount":"5","currency":"USD"}"#.into(), 400, "amount_invalid", "wrong_type"),
        (r#"{"account":"a","amount":1,"amount":5,"currency":"USD"}"#.into(), 400, "amount_body_invalid", "duplicate_key"),
        (r#"{"account":"a","amount":5,"currency":"USD","currency":"JPY"}"#.into(), 400, "amount_body_invalid", "duplicate_key"),
        (r#"{"account":"a","amount":5,"currency":"USD","x":{"y":1,"y":2}}"#.into(), 400, "amount_body_invalid", "duplicate_key"),
        (r#"{"account":"a","amount":5,"currency":"EUR"}"#.into(), 400, "amount_currency_invalid", "unknown"),
        (r#"{"account":"a","amount":5,"currency":"usd"}"#.into(), 400, "amount_currency_invalid", "unknown"),
        (r#"{"account":"a","amount":5}"#.into(), 400, "amount_currency_invalid", "missing"),
        (r#"{"account":"a","amount":5,"currency":840}"#.into(), 400, "amount_currency_invalid", "wrong_type"),
        (r#"{"amount":5,"currency":"USD"}"#.into(), 400, "amount_key_invalid", "missing"),
        (r#"{"account":17,"amount":5,"currency":"USD"}"#.into(), 400, "amount_key_invalid", "wrong_type"),
        (r#"{"account":"","amount":5,"currency":"USD"}"#.into(), 400, "amount_key_invalid", "empty"),
        (format!(r#"{{"account":"{}","amount":5,"currency":"USD"}}"#, "a".repeat(257)), 400, "amount_key_invalid", "too_long"),
        ("amount=5&currency=USD".into(), 400, "amount_body_invalid", "not_json"),
        (r#"{"account":"a","amount":5,"currency":"USD"} {}"#.into(), 400, "amount_body_invalid", "not_json"),
        (format!(r#"{{"account":"a","amount":5,"currency":"USD","pad":"{}"}}"#, "x".repeat(512)), 413, "body_too_large", ""),
    ];
    for (body, status, expected, detail) in cases {
        let outcome = send(&factory, &mut env, &post("/v1/withdrawals", &body));
        let reply = outcome.reply.as_ref().unwrap_or_else(|| panic!("{body}: passed"));
        assert_eq!((reply.status, reply.code), (status, expected), "{body}");
        assert!(!outcome.forwarded, "{body}");
        if !detail.is_empty() {
            assert_eq!(reply.detail, Some(detail), "{body}");
            assert_eq!(outcome.counter(&format!("firebreak.amount_limit.rejected.{expected}.{detail}")), 1, "{body}");
        }
        assert!(
            crate::reject::DETAILS.iter().all(|(c, _)| c.as_str() != expected)
                || detail.is_empty()
                || crate::reject::DETAILS.contains(&(reply.kind(), detail)),
            "{body}: detail not declared"
        );
    }
    // No body at all.
    let empty = send(&factory, &mut env, &post("/v1/withdrawals", ""));
    assert_eq!((code(&empty), empty.reply.as_ref().unwrap().detail), (Some("amount_body_invalid"), Some("empty")));
    // A content-length over the bound is refused before the body comes.
    let mut big = post("/v1/withdrawals", "{}");
    big.headers.push(("content-length".into(), "100000".into()));
    assert_eq!(code(&send(&factory, &mut env, &big)), Some("body_too_large"));
    // Nothing of all that consumed the budget.
    assert!(send(&factory, &mut env, &withdraw("a", "20", "USD")).passed());
}

#[test]
fn the_currency_the_upstream_assumes_when_the_field_is_absent() {
    let rule = WITHDRAWALS.replace(r#""key""#, r#""currency_when_absent":"JPY","key""#);
    let mut env = MemoryEnv::default();
    let factory = instance(&config(&[&rule], ""), &env);
    assert!(send(&factory, &mut env, &post("/v1/withdrawals", r#"{"account":"a","amount":1000}"#)).passed());
    let over = send(&factory, &mut env, &post("/v1/withdrawals", r#"{"account":"a","amount":1}"#));
    assert_eq!(header(&over, "ratelimit-policy"), Some("\"withdrawals.JPY\";q=1000;w=86400"));
    let null = send(&factory, &mut env, &post("/v1/withdrawals", r#"{"account":"a","amount":1,"currency":null}"#));
    assert_eq!(null.reply.map(|r| (r.code, r.detail)), Some(("amount_currency_invalid", Some("missing"))), "null is not absent");
}

#[test]
fn decimal_formats_read_the_currency_exponent() {
    let rule = WITHDRAWALS.replace("minor_units", "decimal_string");
    let mut env = MemoryEnv::default();
    let factory = instance(&config(&[&rule], ""), &env);
    assert!(send(&factory, &mut env, &withdraw("a", "\"0.19\"", "USD")).passed());
    let over = send(&factory, &mut env, &withdraw("a", "\"0.02\"", "USD"));
    assert_eq!(code(&over), Some("amount_limited"), "19 + 2 minor units > 20");
    assert!(send(&factory, &mut env, &withdraw("a", "\"0.01\"", "USD")).passed());
    let fractional = send(&factory, &mut env, &withdraw("b", "\"0.001\"", "USD"));
    assert_eq!(fractional.reply.as_ref().map(|r| (r.code, r.detail)), Some(("amount_invalid", Some("fractional"))));
    let jpy = send(&factory, &mut env, &withdraw("b", "\"1.5\"", "JPY"));
    assert_eq!(jpy.reply.as_ref().map(|r| r.detail), Some(Some("fractional")), "JPY has no minor unit");
    assert!(send(&factory, &mut env, &withdraw("b", "\"1000\"", "JPY")).passed());
    let number = send(&factory, &mut env, &withdraw("c", "0.01", "USD"));
    assert_eq!(number.reply.as_ref().map(|r| r.detail), Some(Some("wrong_type")), "a number where a string is expected");
}

#[test]
fn other_routes_pass_untouched_and_spellings_of_the_route_are_refused() {
    let mut env = MemoryEnv::default();
    let factory = instance(&config(&[WITHDRAWALS], ""), &env);
    let other = send(&factory, &mut env, &post("/v1/transfers", "not json"));
    assert!(other.passed());
    assert!(other.counters.is_empty() && other.logs.is_empty());
    let spelled = send(&factory, &mut env, &post("/v1/%77ithdrawals", r#"{"account":"a","amount":500,"currency":"USD"}"#));
    assert_eq!(code(&spelled), Some("path_not_canonical"));
}

#[test]
fn a_body_in_chunks_and_trailers_is_read_whole() {
    let mut env = MemoryEnv::default();
    let factory = instance(&config(&[WITHDRAWALS], ""), &env);
    let mut request = withdraw("a", "15", "USD");
    let body = request.chunks.concat();
    request.chunks = body.chunks(7).map(<[u8]>::to_vec).collect();
    let outcome = send(&factory, &mut env, &request);
    assert!(outcome.passed());
    assert_eq!(outcome.forwarded_body, body);
    request.trailers = Some(vec![("x-checksum".into(), "1".into())]);
    let outcome = send(&factory, &mut env, &request);
    assert_eq!(code(&outcome), Some("amount_limited"), "15 + 15 > 20, read at the trailers");
}

#[test]
fn report_only_counts_and_logs_then_the_switch_to_enforce_refuses_the_same_request() {
    let report = WITHDRAWALS.replace(r#""key""#, r#""mode":"report_only","key""#);
    let mut env = MemoryEnv::default();
    let factory = instance(&config(&[&report], ""), &env);
    for _ in 0..4 {
        assert!(send(&factory, &mut env, &withdraw("a", "5", "USD")).passed());
    }
    let would = send(&factory, &mut env, &withdraw("a", "5", "USD"));
    assert!(would.passed(), "report-only never refuses");
    assert_eq!(would.counter("firebreak.amount_limit.would_reject.amount_limited"), 1);
    assert_eq!(would.counter("firebreak.amount_limit.rule.withdrawals.would_limit"), 1);
    assert!(would.logs.iter().any(|(_, l)| l.contains("would_reject") && l.contains("code=amount_limited")));
    let malformed = send(&factory, &mut env, &withdraw("a", "-5", "USD"));
    assert!(malformed.passed());
    assert_eq!(malformed.counter("firebreak.amount_limit.would_reject.amount_invalid"), 1);
    // The same requests under the enforced rule.
    let mut env = MemoryEnv::default();
    let factory = instance(&config(&[WITHDRAWALS], ""), &env);
    for _ in 0..4 {
        assert!(send(&factory, &mut env, &withdraw("a", "5", "USD")).passed());
    }
    assert_eq!(code(&send(&factory, &mut env, &withdraw("a", "5", "USD"))), Some("amount_limited"));
    assert_eq!(code(&send(&factory, &mut env, &withdraw("a", "-5", "USD"))), Some("amount_invalid"));
}

#[test]
fn a_request_refused_by_one_rule_costs_nothing_in_another() {
    let per_beneficiary = r#"{"name":"beneficiary","routes":[{"methods":["POST"],"path_exact":"/v1/withdrawals"}],"amount_pointer":"/amount","amount_format":"minor_units","key":["principal","/to/iban"],"budgets":{"USD":{"exponent":2,"amount_minor":30,"window_s":3600}}}"#;
    let per_account = WITHDRAWALS
        .replace(r#""currency_pointer":"/currency","#, "")
        .replace(r#","JPY":{"exponent":0,"amount_minor":1000,"window_s":86400}"#, "");
    let mut env = MemoryEnv::default();
    let factory = instance(&config(&[&per_account, per_beneficiary], ""), &env);
    let body = |account: &str, amount: u32| format!(r#"{{"account":"{account}","amount":{amount},"to":{{"iban":"DE89"}}}}"#);
    let signed = |account: &str, amount: u32| {
        let mut r = post("/v1/withdrawals", &body(account, amount));
        r.principal = Some("alice".into());
        r
    };
    let unsigned = send(&factory, &mut env, &post("/v1/withdrawals", &body("a", 1)));
    assert_eq!(code(&unsigned), Some("amount_limit_unauthenticated"));
    assert!(send(&factory, &mut env, &signed("a", 20)).passed());
    // Account a is spent: refused, and the beneficiary's budget is not charged.
    assert_eq!(code(&send(&factory, &mut env, &signed("a", 10))), Some("amount_limited"));
    assert!(send(&factory, &mut env, &signed("b", 10)).passed(), "beneficiary: 20 + 10 = 30");
    let over = send(&factory, &mut env, &signed("c", 1));
    assert_eq!(header(&over, "ratelimit-policy"), Some("\"beneficiary.USD\";q=30;w=3600"));
    // Another principal paying the same IBAN has its own budget.
    let mut bob = signed("c", 1);
    bob.principal = Some("bob".into());
    assert!(send(&factory, &mut env, &bob).passed());
}

#[test]
fn host_and_store_failures_fail_closed() {
    let mut env = MemoryEnv::default();
    let factory = instance(&config(&[WITHDRAWALS], ""), &env);
    env.now_ms = None;
    assert_eq!(code(&send(&factory, &mut env, &withdraw("a", "5", "USD"))), Some("amount_limit_unavailable"));
    env.now_ms = Some(T0);
    env.faults.request_body = true;
    let unreadable = send(&factory, &mut env, &withdraw("a", "5", "USD"));
    assert_eq!(unreadable.reply.map(|r| (r.code, r.detail)), Some(("amount_limit_unavailable", Some("body_unreadable"))));
    // A table of one slot: a second key in debt finds it full.
    let mut env = MemoryEnv::default();
    let factory = instance(&config(&[WITHDRAWALS], r#","table":{"buckets":1,"slots_per_bucket":1}"#), &env);
    // (Two tenants: each has a quota of one new record in a table of one.)
    let mut first = withdraw("a", "5", "USD");
    first.principal = Some("p1".into());
    assert!(send(&factory, &mut env, &first).passed());
    let mut second = withdraw("b", "5", "USD");
    second.principal = Some("p2".into());
    let full = send(&factory, &mut env, &second);
    assert_eq!(full.reply.map(|r| (r.status, r.code)), Some((503, "amount_limit_store_full")));
}

#[test]
fn no_tenant_can_fill_the_table_others_need() {
    let mut env = MemoryEnv::default();
    let table = r#","table":{"buckets":4,"slots_per_bucket":4,"quota_per_tenant":2}"#;
    let factory = instance(&config(&[WITHDRAWALS], table), &env);
    let by = |principal: &str, account: &str| {
        let mut r = withdraw(account, "5", "USD");
        r.principal = Some(principal.into());
        r
    };
    assert!(send(&factory, &mut env, &by("mallory", "a1")).passed());
    assert!(send(&factory, &mut env, &by("mallory", "a2")).passed());
    let third = send(&factory, &mut env, &by("mallory", "a3"));
    assert_eq!(third.reply.as_ref().map(|r| (r.status, r.code)), Some((429, "tenant_quota_exceeded")));
    assert!(!third.forwarded);
    assert!(send(&factory, &mut env, &by("mallory", "a1")).passed(), "a record it holds is not a new one");
    assert!(send(&factory, &mut env, &by("alice", "a3")).passed(), "another tenant");
    // Without a principal, the client address is the tenant.
    assert!(send(&factory, &mut env, &withdraw("b1", "5", "USD")).passed());
    assert!(send(&factory, &mut env, &withdraw("b2", "5", "USD")).passed());
    assert_eq!(code(&send(&factory, &mut env, &withdraw("b3", "5", "USD"))), Some("tenant_quota_exceeded"));
}

/// [`super::redis::AMOUNT_GCRA_SCRIPT`] in Rust behind a fake webdis, on a clock the test moves:
/// the budgets (`records`: the value as the script writes it, `<t0>:<debt>:<counted_until_ms>`,
/// or the previous version's `<t0>:<debt>`, and its expiry in ms) and the tenants' counts of
/// records per quota window (`counts`: the value, `<window end ms>:<count>` or the previous
/// version's `<count>`, and its expiry in ms). Keys expire on the clock, as on Redis.
struct FakeBridge {
    records: HashMap<String, (String, u64)>,
    counts: HashMap<String, (String, u64)>,
    now_ms: Rc<Cell<u64>>,
}

impl FakeBridge {
    fn new(now_ms: Rc<Cell<u64>>) -> Self {
        FakeBridge { records: HashMap::new(), counts: HashMap::new(), now_ms }
    }

    /// The live records (test view).
    fn live_records(&self) -> usize {
        let now = self.now_ms.get();
        self.records.values().filter(|(_, expires)| *expires > now).count()
    }

    fn answer(&mut self, command: &[u8]) -> CallAnswer {
        let sha1 = crate::remote::SCRIPTS.iter().find(|(text, _)| *text == super::redis::AMOUNT_GCRA_SCRIPT).unwrap().1;
        assert!(command.starts_with(format!("EVALSHA/{sha1}/").as_bytes()));
        let command = crate::remote::eval_fallback(command).unwrap();
        let parts: Vec<String> = std::str::from_utf8(&command)
            .unwrap()
            .split('/')
            .map(|p| percent_encoding::percent_decode_str(p).decode_utf8().unwrap().into_owned())
            .collect();
        assert_eq!(parts[1], super::redis::AMOUNT_GCRA_SCRIPT);
        let n: usize = parts[2].parse::<usize>().unwrap() - 1;
        let keys = &parts[3..3 + n];
        let quota_key = &parts[3 + n];
        assert!(quota_key.starts_with("t:amt:quota:"), "{quota_key}");
        let enforced: usize = parts[4 + n].parse().unwrap();
        let args: Vec<u64> = parts[5 + n..].iter().map(|a| a.parse().unwrap()).collect();
        assert_eq!(args.len(), 3 * n + 2);
        let (limit, quota_window_ms) = (args[3 * n], args[3 * n + 1]);
        let now_ms = self.now_ms.get();
        let now = now_ms / 1000;
        self.records.retain(|_, (_, expires)| *expires > now_ms);
        self.counts.retain(|_, (_, expires)| *expires > now_ms);
        let mut state = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let (b, w, c) = (args[3 * i], args[3 * i + 1], args[3 * i + 2]);
            let (mut d, mut s, mut stamp) = (0, now, 0);
            if let Some((value, _)) = self.records.get(key) {
                let fields: Vec<u64> = value.split(':').map(|f| f.parse().unwrap()).collect();
                let (t0, debt) = match fields[..] {
                    [t0, debt] => (t0, debt),
                    [t0, debt, counted] => {
                        stamp = counted;
                        (t0, debt)
                    }
                    _ => panic!("foreign record {value}"),
                };
                s = s.max(t0);
                let el = now.saturating_sub(t0);
                if el < w {
                    d = debt.saturating_sub(el * b);
                }
            }
            state.push((b, w, c, d, s, stamp));
        }
        let refused = state.iter().take(enforced).any(|(b, w, c, d, _, _)| d + c > b * w);
        let (mut held, mut end) = (0, now_ms + quota_window_ms);
        if let Some((value, expires)) = self.counts.get(quota_key) {
            match value.split_once(':') {
                Some((e, count)) => (end, held) = (e.parse().unwrap(), count.parse().unwrap()),
                None => (end, held) = (*expires, value.parse().unwrap()),
            }
        }
        let (mut quota, mut opened) = (0, 0);
        let mut take: Vec<bool> = state.iter().map(|(b, w, c, d, _, _)| !refused && d + c <= b * w).collect();
        for (i, (.., stamp)) in state.iter_mut().enumerate() {
            if take[i] && *stamp <= now_ms {
                if held + opened < limit {
                    opened += 1;
                    *stamp = end;
                } else if i < enforced {
                    quota = 1;
                } else {
                    take[i] = false;
                    if quota == 0 {
                        quota = 2;
                    }
                }
            }
        }
        if quota == 1 {
            take.iter_mut().for_each(|t| *t = false);
            opened = 0;
        }
        if opened > 0 {
            self.counts.insert(quota_key.clone(), (format!("{end}:{}", held + opened), end));
        }
        let mut out = vec![quota];
        for (i, (b, w, c, mut d, s, stamp)) in state.into_iter().enumerate() {
            let h = b * w;
            let fits = d + c <= h;
            let retry = if fits { 0 } else { (d + c - h).div_ceil(b) };
            if take[i] {
                d += c;
                let expires = now_ms + (d.div_ceil(b) + 1) * 1000;
                self.records.insert(keys[i].clone(), (format!("{s}:{d}:{stamp}"), expires));
            }
            out.extend([u64::from(fits), u64::from(take[i]), (h - d) / w, d.div_ceil(b), retry]);
        }
        let values: Vec<String> = out.iter().map(u64::to_string).collect();
        CallAnswer { status: Some(200), body: format!(r#"{{"EVAL":[{}]}}"#, values.join(",")).into_bytes() }
    }
}

const REDIS: &str = r#","state":{"backend":"redis","cluster":"bridge","key_prefix":"t","failure_mode":"closed"}"#;

#[test]
fn redis_budgets_are_shared_by_two_instances() {
    let clock = Rc::new(Cell::new(T0));
    let bridge = Rc::new(std::cell::RefCell::new(FakeBridge::new(clock.clone())));
    let env_with = |bridge: &Rc<std::cell::RefCell<FakeBridge>>| {
        let bridge = bridge.clone();
        MemoryEnv { redis: Some(Box::new(move |c| bridge.borrow_mut().answer(c))), ..MemoryEnv::default() }
    };
    let (mut one, mut two) = (env_with(&bridge), env_with(&bridge));
    let a = instance(&config(&[WITHDRAWALS], REDIS), &one);
    let b = instance(&config(&[WITHDRAWALS], REDIS), &two);
    let mut forwarded = 0;
    for i in 0..20 {
        let (factory, env) = if i % 2 == 0 { (&a, &mut one) } else { (&b, &mut two) };
        let outcome = send(factory, env, &withdraw("acc-1", "5", "USD"));
        assert_eq!(outcome.calls.len(), 1);
        if outcome.passed() {
            forwarded += 5;
        } else {
            assert_eq!(code(&outcome), Some("amount_limited"));
            assert_eq!(header(&outcome, "ratelimit"), Some("\"withdrawals.USD\";r=0;t=86400"));
        }
    }
    assert_eq!(forwarded, 20);
    let over = send(&a, &mut one, &withdraw("acc-2", "21", "USD"));
    assert_eq!(header(&over, "retry-after"), Some("86400"));
    // Malformed bodies never reach Redis.
    let malformed = send(&a, &mut one, &withdraw("acc-2", "-1", "USD"));
    assert!(malformed.calls.is_empty());
}

/// The per-tenant quota on Redis, in the budget script: only a new record counts; a tenant over
/// its quota gets `429 tenant_quota_exceeded` and nothing is written; its existing records are
/// still charged; another tenant (or client address) still passes; the count expires with the
/// longest window.
#[test]
fn a_tenant_over_its_quota_on_redis_is_refused_and_writes_nothing() {
    let clock = Rc::new(Cell::new(T0));
    let bridge = Rc::new(std::cell::RefCell::new(FakeBridge::new(clock.clone())));
    let shared = bridge.clone();
    let mut env = MemoryEnv { redis: Some(Box::new(move |c| shared.borrow_mut().answer(c))), ..MemoryEnv::default() };
    let json = config(&[WITHDRAWALS], &format!(r#","table":{{"quota_per_tenant":2}}{REDIS}"#));
    let factory = instance(&json, &env);
    let by = |principal: &str, account: &str| {
        let mut r = withdraw(account, "5", "USD");
        r.principal = Some(principal.into());
        r
    };
    assert!(send(&factory, &mut env, &by("mallory", "a1")).passed());
    assert!(send(&factory, &mut env, &by("mallory", "a2")).passed());
    let (records, counts) = (bridge.borrow().records.clone(), bridge.borrow().counts.clone());
    let third = send(&factory, &mut env, &by("mallory", "a3"));
    assert_eq!(third.reply.as_ref().map(|r| (r.status, r.code)), Some((429, "tenant_quota_exceeded")));
    assert!(!third.forwarded);
    assert_eq!(third.calls.len(), 1);
    assert_eq!(third.counter("firebreak.amount_limit.rejected.tenant_quota_exceeded"), 1);
    assert_eq!((&bridge.borrow().records, &bridge.borrow().counts), (&records, &counts), "nothing written");
    assert_eq!(counts.len(), 1);
    let end = T0 + 86_401_000;
    assert!(counts.values().all(|(value, expires)| (value.as_str(), *expires) == (&*format!("{end}:2"), end)), "{counts:?}");
    // A record it holds is charged as usual (not a new one), up to its budget: 4 * 5 of 20.
    for _ in 0..3 {
        assert!(send(&factory, &mut env, &by("mallory", "a1")).passed());
    }
    assert_eq!(bridge.borrow().counts, counts);
    let limited = send(&factory, &mut env, &by("mallory", "a1"));
    assert_eq!(code(&limited), Some("amount_limited"), "the budget still decides an existing record");
    assert!(send(&factory, &mut env, &by("alice", "a3")).passed(), "another tenant");
    // Without a principal, the client address is the tenant.
    assert!(send(&factory, &mut env, &withdraw("b1", "5", "USD")).passed());
    assert!(send(&factory, &mut env, &withdraw("b2", "5", "USD")).passed());
    assert_eq!(code(&send(&factory, &mut env, &withdraw("b3", "5", "USD"))), Some("tenant_quota_exceeded"));
    let mut elsewhere = withdraw("b3", "5", "USD");
    elsewhere.source_address = Some("192.0.2.7:1234".into());
    assert!(send(&factory, &mut env, &elsewhere).passed());
    // A refusal by the budget never counts against the quota (nothing is opened).
    let mut whole = withdraw("c1", "21", "USD");
    whole.principal = Some("carol".into());
    assert_eq!(code(&send(&factory, &mut env, &whole)), Some("amount_limited"));
    assert!(bridge.borrow().counts.len() == 4, "{:?}", bridge.borrow().counts);
    // Once the count has expired (the longest window and a second), the tenant opens new ones.
    bridge.borrow_mut().counts.clear();
    clock.set(T0 + 86_401_000);
    assert!(send(&factory, &mut env, &by("mallory", "a3")).passed());
}

/// A report-only rule's new record over the tenant's quota on Redis is reported
/// (`would_reject.tenant_quota_exceeded`) and not written, as on the local backend; the enforced
/// rule's charge goes on. An enforced rule's new record over the quota refuses the request, and
/// the report-only rule's record is not written either.
#[test]
fn a_report_only_rules_new_record_over_the_quota_on_redis_is_reported_not_written() {
    let clock = Rc::new(Cell::new(T0));
    let bridge = Rc::new(std::cell::RefCell::new(FakeBridge::new(clock)));
    let shared = bridge.clone();
    let mut env = MemoryEnv { redis: Some(Box::new(move |c| shared.borrow_mut().answer(c))), ..MemoryEnv::default() };
    let shadow = WITHDRAWALS
        .replace(r#""name":"withdrawals""#, r#""name":"shadow""#)
        .replace(r#""key""#, r#""mode":"report_only","key""#);
    let json = config(&[&shadow, WITHDRAWALS], &format!(r#","table":{{"quota_per_tenant":3}}{REDIS}"#));
    let factory = instance(&json, &env);
    // Two new records (the enforced rule's and the report-only rule's).
    assert!(send(&factory, &mut env, &withdraw("a1", "5", "USD")).passed());
    assert_eq!(bridge.borrow().records.len(), 2);
    // The third new record fits; the fourth (report-only) is left out and reported.
    let second = send(&factory, &mut env, &withdraw("a2", "5", "USD"));
    assert!(second.passed());
    assert_eq!(second.counter("firebreak.amount_limit.would_reject.tenant_quota_exceeded"), 1);
    assert_eq!(second.counter("firebreak.amount_limit.rule.withdrawals.allowed"), 1);
    assert_eq!(second.counter("firebreak.amount_limit.rule.shadow.allowed"), 0);
    assert!(second
        .logs
        .iter()
        .any(|(_, l)| l.contains("would_reject") && l.contains("code=tenant_quota_exceeded")));
    assert_eq!(bridge.borrow().records.len(), 3);
    // The enforced rule's new record is over the quota: refused, nothing written.
    let third = send(&factory, &mut env, &withdraw("a3", "5", "USD"));
    assert_eq!(code(&third), Some("tenant_quota_exceeded"));
    assert_eq!(bridge.borrow().records.len(), 3);
    assert!(bridge.borrow().counts.values().all(|(value, _)| value.ends_with(":3")));
    // Existing records (both rules) are charged without the quota.
    let again = send(&factory, &mut env, &withdraw("a1", "5", "USD"));
    assert!(again.passed());
    assert_eq!(again.counter("firebreak.amount_limit.rule.shadow.allowed"), 1);
}

#[test]
fn redis_failures_follow_the_failure_mode() {
    for (mode, expect_pass) in [("closed", false), ("open", true)] {
        let json = config(&[WITHDRAWALS], &REDIS.replace("closed", mode));
        for answer in [
            None,
            Some((Some(503), "")),
            Some((Some(200), r#"{"EVAL":[false,"ERR firebreak: foreign amount-limit record"]}"#)),
            Some((Some(200), r#"{"EVAL":[1,1]}"#)),
            Some((Some(200), r#"{"EVAL":[1,1,1,0,20,0]}"#)),
            Some((Some(200), r#"{"EVAL":[3,1,1,0,20,0]}"#)),
        ] {
            let mut env = match answer {
                None => MemoryEnv::default(),
                Some((status, body)) => {
                    let body = body.as_bytes().to_vec();
                    MemoryEnv {
                        redis: Some(Box::new(move |_| CallAnswer { status, body: body.clone() })),
                        ..MemoryEnv::default()
                    }
                }
            };
            let factory = instance(&json, &env);
            let outcome = send(&factory, &mut env, &withdraw("a", "5", "USD"));
            assert_eq!(outcome.passed(), expect_pass, "{mode} {answer:?}");
            assert_eq!(outcome.counter("firebreak.amount_limit.redis.failed"), 1, "{mode} {answer:?}");
            if expect_pass {
                assert_eq!(outcome.counter("firebreak.amount_limit.state_unavailable_failed_open"), 1);
            } else {
                assert_eq!(code(&outcome), Some("state_unavailable"));
            }
        }
    }
}

#[test]
fn every_counter_is_declared_at_configure_time() {
    let env = MemoryEnv::default();
    let factory = instance(&config(&[WITHDRAWALS], REDIS), &env);
    let declared = factory.counters();
    for name in [
        "allowed",
        "redis.calls",
        "redis.failed",
        "rule.withdrawals.limited",
        "rule.withdrawals.allowed",
        "rule.withdrawals.would_limit",
    ] {
        assert!(declared.iter().any(|d| d == name), "{name}");
    }
    assert!(!declared.iter().any(|d| d.starts_with("would_reject.")), "no report-only rule");
    // A report-only rule's would-be refusals (any code, e.g. a new record over the tenant quota)
    // are declared: the native module counts only declared counters.
    let report = WITHDRAWALS.replace(r#""key""#, r#""mode":"report_only","key""#);
    let declared = instance(&config(&[&report], REDIS), &env).counters();
    for name in ["would_reject.tenant_quota_exceeded", "would_reject.amount_limited", "would_reject.state_unavailable"] {
        assert!(declared.iter().any(|d| d == name), "{name}");
    }
}

/// The local budget table and its tenant quota table are exported as fill gauges
/// (`store.budgets.*`, `store.budget_quotas.*`); budgets on Redis have none.
#[test]
fn local_budget_tables_are_listed_for_the_fill_gauges_and_redis_ones_are_not() {
    let env = MemoryEnv::default();
    let local = instance(&config(&[WITHDRAWALS], ""), &env);
    let names: Vec<&str> = local.stores().iter().map(|s| s.name).collect();
    assert_eq!(names, ["budgets", "budget_quotas"]);
    assert!(local.stores().iter().all(|s| s.meter.prefix.as_ref() == "firebreak.amount_limit"));
    let remote = instance(&config(&[WITHDRAWALS], REDIS), &env);
    assert!(remote.stores().is_empty());
}

/// Budgets of a short window (9 s: a quota window of 10 s); one minor unit drains in a second,
/// so a record charged 1 lives 2 s after its last charge.
const SHORT: &str = r#"{"name":"withdrawals","routes":[{"methods":["POST"],"path_exact":"/v1/withdrawals"}],"amount_pointer":"/amount","amount_format":"minor_units","currency_pointer":"/currency","key":["/account"],"budgets":{"USD":{"exponent":2,"amount_minor":20,"window_s":9}}}"#;

/// One amount-limit instance (or several, sharing one store or one fake Redis) on a clock the
/// test moves, with a view of the live records and the tenant's quota count.
struct Bench {
    env: MemoryEnv,
    factories: Vec<Arc<dyn FlowFactory>>,
    policy: super::AmountPolicy,
    clock: Rc<Cell<u64>>,
    bridge: Option<Rc<std::cell::RefCell<FakeBridge>>>,
}

impl Bench {
    fn new(redis: bool, table: &str, instances: usize) -> Self {
        Bench::with_rules(redis, &[SHORT], table, instances)
    }

    fn with_rules(redis: bool, rules: &[&str], table: &str, instances: usize) -> Self {
        let clock = Rc::new(Cell::new(T0));
        let (mut env, bridge, extra) = if redis {
            let bridge = Rc::new(std::cell::RefCell::new(FakeBridge::new(clock.clone())));
            let shared = bridge.clone();
            let env = MemoryEnv { redis: Some(Box::new(move |c| shared.borrow_mut().answer(c))), ..MemoryEnv::default() };
            (env, Some(bridge), format!(r#","table":{{{table}}}{REDIS}"#))
        } else {
            (MemoryEnv::default(), None, format!(r#","table":{{{table}}}"#))
        };
        env.now_ms = Some(T0);
        let json = config(rules, &extra);
        let factories = (0..instances).map(|_| instance(&json, &env)).collect();
        let mut policy = super::AmountPolicy::from_json(json.as_bytes()).unwrap();
        policy.bind_tables(&env.store, [5; 32]).unwrap();
        Bench { env, factories, policy, clock, bridge }
    }

    fn at(&mut self, now_ms: u64) {
        self.env.now_ms = Some(now_ms);
        self.clock.set(now_ms);
    }

    fn send_on(&mut self, worker: usize, principal: &str, account: &str) -> Outcome {
        let mut request = withdraw(account, "1", "USD");
        request.principal = Some(principal.into());
        let factory = self.factories[worker % self.factories.len()].clone();
        send(&factory, &mut self.env, &request)
    }

    fn send(&mut self, principal: &str, account: &str) -> Outcome {
        self.send_on(0, principal, account)
    }

    fn live(&self) -> usize {
        match &self.bridge {
            Some(bridge) => bridge.borrow().live_records(),
            None => self.policy.table.live_records(&self.env.store, self.clock.get()).unwrap() as usize,
        }
    }

    /// Units counted in the tenant's running quota window.
    fn used(&self, principal: &str) -> u64 {
        let tenant = crate::quota::tenant(&self.policy.key_hasher(), "principal", principal);
        match &self.bridge {
            Some(bridge) => {
                let Backend::Redis(redis) = &self.policy.state else { panic!() };
                let key = super::redis::quota_key(redis, tenant);
                let now = self.clock.get();
                bridge
                    .borrow()
                    .counts
                    .get(&key)
                    .filter(|(_, e)| *e > now)
                    .map_or(0, |(v, _)| v.rsplit(':').next().unwrap().parse().unwrap())
            }
            None => u64::from(self.policy.quota.used(&self.env.store, tenant, self.clock.get()).unwrap()),
        }
    }

    /// Rewrites the record of `account` in the previous version's format (no window stamp).
    fn downgrade(&mut self, account: &str) {
        let body = format!(r#"{{"account":"{account}","amount":1,"currency":"USD"}}"#);
        let hash = super::charge(&self.policy, 0, &super::extract::parse_document(body.as_bytes()), None).unwrap().hash;
        let now = self.clock.get();
        match &self.bridge {
            Some(bridge) => {
                let Backend::Redis(redis) = &self.policy.state else { panic!() };
                let key = super::redis::redis_key(redis, hash);
                let mut bridge = bridge.borrow_mut();
                let (value, _) = bridge.records.get_mut(&key).unwrap();
                let fields: Vec<&str> = value.split(':').collect();
                assert_eq!(fields.len(), 3, "{value}");
                *value = format!("{}:{}", fields[0], fields[1]);
            }
            None => {
                let (written, _) = self
                    .policy
                    .table
                    .update_with_expiry(&self.env.store, hash, now, None, |current| {
                        let (payload, expires_at_ms) = current.unwrap();
                        assert_eq!(payload.len(), usize::from(super::budget::RECORD_LEN));
                        crate::store::Update::Write {
                            payload: payload[..super::budget::OLD_RECORD_LEN].to_vec(),
                            expires_at_ms,
                            result: (),
                        }
                    })
                    .unwrap();
                written
            }
        }
    }
}

use crate::remote::Backend;

fn quota_refused(outcome: &Outcome) -> bool {
    !outcome.forwarded && outcome.reply.as_ref().map(|r| (r.status, r.code)) == Some((429, "tenant_quota_exceeded"))
}

/// The keep-alive attack: a tenant of quota `L` opens records and keeps every one alive by
/// charging it a minor unit every second, across many quota windows, while trying a new record
/// every second. Its live records never exceed `2 L` (the previous version only counted openings:
/// they grew by `L` per window), and the excess is refused `429 tenant_quota_exceeded`.
#[test]
fn a_tenant_cannot_keep_more_than_twice_its_quota_of_records_alive() {
    for redis in [false, true] {
        const L: usize = 3;
        let mut bench = Bench::new(redis, &format!(r#""buckets":16,"slots_per_bucket":8,"quota_per_tenant":{L}"#), 1);
        let mut kept: Vec<String> = Vec::new();
        let (mut refused, mut most) = (0, 0);
        for second in 0..80u64 {
            bench.at(T0 + second * 1000 + 300);
            // A new record first (at the start of a quota window, while the records of the last
            // one are still alive), then a re-charge of every record it keeps (a refused one
            // expires).
            let account = format!("m{second}");
            let outcome = bench.send("mallory", &account);
            if outcome.passed() {
                kept.push(account);
            } else {
                assert!(quota_refused(&outcome), "{:?}", outcome.reply);
                refused += 1;
            }
            let mut still = Vec::new();
            for account in kept.drain(..) {
                let outcome = bench.send("mallory", &account);
                if outcome.passed() {
                    still.push(account);
                } else {
                    assert!(quota_refused(&outcome), "{:?}", outcome.reply);
                    refused += 1;
                }
            }
            kept = still;
            most = most.max(bench.live());
            assert!(bench.live() <= 2 * L, "redis={redis} second {second}: {} live records", bench.live());
        }
        assert!(most > L, "redis={redis}: the attack reached {most} live records");
        assert!(refused > 60, "redis={redis}: {refused} refusals");
        // Another tenant is not affected.
        assert!(bench.send("alice", "a1").passed(), "redis={redis}");
    }
}

/// A record costs one unit per quota window, however often it is charged in it (here a record
/// from an earlier window, charged three times: one unit), and costs one again in the next
/// window. A tenant at its quota cannot charge a record it has not charged in this window.
#[test]
fn a_record_costs_one_unit_per_quota_window() {
    for redis in [false, true] {
        let mut bench = Bench::new(redis, r#""quota_per_tenant":2"#, 1);
        assert!(bench.send("mallory", "a").passed());
        assert!(bench.send("mallory", "a").passed(), "charged twice in one window: one unit");
        assert_eq!(bench.used("mallory"), 1, "redis={redis}");
        assert!(bench.send("mallory", "b").passed());
        assert_eq!(bench.used("mallory"), 2, "redis={redis}");
        assert!(quota_refused(&bench.send("mallory", "c")), "redis={redis}");
        assert!(bench.send("mallory", "a").passed(), "redis={redis}: a record counted in this window");
        // Keep `a` and `b` alive into the next quota window (each lives 2 s after a charge).
        for second in 1..=10 {
            bench.at(T0 + second * 1000);
            assert!(bench.send("mallory", "a").passed(), "redis={redis} second {second}");
            assert!(bench.send("mallory", "b").passed() || second == 10, "redis={redis} second {second}");
        }
        // Second 10: `a` opened the next window (a unit); charging it again is free.
        assert_eq!(bench.used("mallory"), 2, "redis={redis}: a and b counted in the new window");
        assert!(bench.send("mallory", "a").passed());
        assert!(bench.send("mallory", "b").passed());
        assert_eq!(bench.used("mallory"), 2, "redis={redis}");
        let c = bench.send("mallory", "c");
        assert!(quota_refused(&c), "redis={redis}: a third record in the new window: {:?}", c.reply);
    }
}

/// A record of the previous version (no window stamp: 16 bytes locally, `<t0>:<debt>` on Redis)
/// is read, never refused as foreign, and counted at its next charge. On Redis, a count of the
/// previous version (`<count>`, its end from its TTL) is read too.
#[test]
fn records_of_the_previous_format_are_read_and_counted() {
    for redis in [false, true] {
        let mut bench = Bench::new(redis, r#""quota_per_tenant":2"#, 1);
        assert!(bench.send("mallory", "a").passed());
        bench.downgrade("a");
        assert_eq!(bench.used("mallory"), 1);
        assert!(bench.send("mallory", "a").passed(), "redis={redis}: an old record is read");
        assert_eq!(bench.used("mallory"), 2, "redis={redis}: and counted");
        assert!(bench.send("mallory", "a").passed());
        assert_eq!(bench.used("mallory"), 2, "redis={redis}: then stamped");
        assert!(quota_refused(&bench.send("mallory", "b")), "redis={redis}");
        // The budget still holds across the format change: 1 + 1 + 1 of 20 taken.
        for _ in 0..17 {
            assert!(bench.send("mallory", "a").passed());
        }
        assert_eq!(code(&bench.send("mallory", "a")), Some("amount_limited"), "redis={redis}");
    }
    // A count of the previous version on Redis: `1` (one record opened), expiring in 4 s.
    let mut bench = Bench::new(true, r#""quota_per_tenant":2"#, 1);
    let Backend::Redis(redis) = &bench.policy.state else { panic!() };
    let tenant = crate::quota::tenant(&bench.policy.key_hasher(), "principal", "mallory");
    let key = super::redis::quota_key(redis, tenant);
    bench.bridge.as_ref().unwrap().borrow_mut().counts.insert(key.clone(), ("1".into(), T0 + 4_000));
    assert!(bench.send("mallory", "a").passed());
    assert_eq!(bench.bridge.as_ref().unwrap().borrow().counts[&key], (format!("{}:2", T0 + 4_000), T0 + 4_000));
    assert!(quota_refused(&bench.send("mallory", "b")));
    bench.at(T0 + 4_000);
    assert!(bench.send("mallory", "b").passed(), "the old count's window ended");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 6, ..Default::default() })]
    /// With leases (`quota_lease > 1`) and several workers (each policy its own lease cache,
    /// one shared table), a tenant that re-charges every record it ever opened, at random times,
    /// never holds more than `2 * quota` live records.
    #[test]
    fn leases_keep_the_live_records_bound(
        limit in 32usize..48, lease in 2u64..3, workers in 1usize..4,
        steps in proptest::collection::vec((0usize..4, 200u64..1_500), 30..45),
    ) {
        let table = format!(r#""buckets":64,"slots_per_bucket":8,"quota_per_tenant":{limit},"quota_lease":{lease}"#);
        let mut bench = Bench::new(false, &table, workers);
        let mut now = T0;
        let pool = 3 * limit;
        for (worker, step) in steps {
            now += step;
            bench.at(now);
            for account in 0..pool {
                let outcome = bench.send_on(worker + account, "mallory", &format!("m{account}"));
                proptest::prop_assert!(outcome.passed() || quota_refused(&outcome), "{:?}", outcome.reply);
            }
            proptest::prop_assert!(bench.live() <= 2 * limit, "{} live records, limit {}", bench.live(), limit);
        }
    }
}

/// Several enforced rules: every record to count is counted before anything is written, so a
/// tenant whose quota cannot count them all is refused with nothing written (on the local
/// backend too, where the charges are separate writes).
#[test]
fn several_enforced_records_over_the_quota_write_nothing() {
    let other = SHORT.replace(r#""name":"withdrawals""#, r#""name":"per-account-2""#);
    for redis in [false, true] {
        let mut bench = Bench::with_rules(redis, &[SHORT, &other], r#""quota_per_tenant":3"#, 1);
        assert!(bench.send("mallory", "a").passed(), "two records, two units");
        assert_eq!((bench.live(), bench.used("mallory")), (2, 2));
        let over = bench.send("mallory", "b");
        assert!(quota_refused(&over), "redis={redis}: two more records, one unit left: {:?}", over.reply);
        assert_eq!(bench.live(), 2, "redis={redis}: nothing written");
        assert!(bench.send("mallory", "a").passed(), "redis={redis}: both counted in this window");
    }
}
