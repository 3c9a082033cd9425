//! The engine's flows natively, through core's in-memory host (`core::flow::memory`): each filter
//! and the whole chain on the same pre-signed accepted requests, as time per request. This is the
//! decision code and flow a host runs per request, without any host's own cost; run under
//! `valgrind --tool=callgrind` it gives repeatable instruction counts per request.

use std::time::Instant;

use firebreak_core::filters::{configure, configure_chain, Setup};
use firebreak_core::flow::memory::{exchange, MemoryEnv, MemoryRequest, MemoryUpstream};
use firebreak_core::flow::FlowFactory;
use firebreak_host_tests::DEFAULT_START_NANOS;
use serde_json::{json, Value};

use crate::micro::{chain_sections, inputs};
use crate::Args;

fn factory(name: &str, env: &MemoryEnv) -> Result<std::sync::Arc<dyn FlowFactory>, String> {
    let setup = Setup { env: &|_: &str| None, store: &env.store, entropy: [7; 32] };
    let sections = chain_sections();
    if name == "chain" {
        let filters: Vec<Value> = sections
            .iter()
            .map(|(n, c)| serde_json::from_str::<Value>(c).map(|c| json!({ *n: c })).map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
        let config = json!({ "filters": filters }).to_string();
        return configure_chain(config.as_bytes(), &setup).map(|c| std::sync::Arc::new(c) as _).map_err(|e| e.to_string());
    }
    let (_, config) = sections.iter().find(|(n, _)| *n == name).ok_or_else(|| format!("unknown filter {name}"))?;
    configure(name, config.as_bytes(), &setup).map_err(|e| e.to_string())
}

/// (allocations, reallocations) so far on this thread (zeros without the `count-allocs` feature).
fn alloc_count() -> (u64, u64) {
    #[cfg(feature = "count-allocs")]
    return crate::allocs::count();
    #[cfg(not(feature = "count-allocs"))]
    (0, 0)
}

/// `firebreak-bench flows [--filter chain|<filter>|all] [--count N] [--size B] [--reps R]`
pub fn run(args: &Args) -> Result<(), String> {
    let count: usize = args.num("count", 5000)?;
    let size: usize = args.num("size", 0)?;
    let reps: usize = args.num("reps", 3)?;
    let which = args.get("filter").unwrap_or("all");
    let names: Vec<&str> = if which == "all" {
        vec!["request_signature", "replay_guard", "rate_limit", "env_guard", "chain"]
    } else {
        vec![which]
    };
    let secret = crate::micro::base64_decode(crate::SECRET_B64)?;
    let now_ms = DEFAULT_START_NANOS / 1_000_000;
    let requests: Vec<MemoryRequest> = inputs(size, count, now_ms / 1000, &secret)?
        .into_iter()
        .map(|i| {
            let mut r = MemoryRequest::new(i.headers, &i.body);
            r.principal = Some(crate::KEY_ID.to_string());
            r
        })
        .collect();
    let upstream = MemoryUpstream::default();
    let mut out = serde_json::Map::new();
    for name in names {
        let mut best = f64::MAX;
        let mut allocs = (0u64, 0u64);
        for _ in 0..reps {
            // A fresh store per repetition: every request is new to it.
            let mut env = MemoryEnv { now_ms: Some(now_ms), ..MemoryEnv::default() };
            let factory = factory(name, &env)?;
            let start = Instant::now();
            allocs = (0, 0);
            for (i, request) in requests.iter().enumerate() {
                let mut flow = factory.new_flow();
                let before = alloc_count();
                let outcome = exchange(flow.as_mut(), &mut env, request, &upstream);
                let after = alloc_count();
                allocs = (allocs.0 + after.0 - before.0, allocs.1 + after.1 - before.1);
                if !outcome.passed() {
                    return Err(format!("{name}: request {i} refused: {:?}", outcome.reply));
                }
            }
            best = best.min(start.elapsed().as_secs_f64() * 1e9 / count as f64);
        }
        eprintln!("flows {name:18} {size:6} B  {best:8.0} ns/req");
        let mut row = json!({"ns_per_request": best, "size": size, "count": count});
        if cfg!(feature = "count-allocs") {
            // Per request, in `exchange` (the flow and core's in-memory test host together).
            row["allocs_per_request"] = json!(allocs.0 as f64 / count as f64);
            row["reallocs_per_request"] = json!(allocs.1 as f64 / count as f64);
        }
        out.insert(name.to_string(), row);
    }
    println!("{}", serde_json::to_string_pretty(&Value::Object(out)).map_err(|e| e.to_string())?);
    Ok(())
}
