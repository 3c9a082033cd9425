//! Micro-benchmarks: each decision core built natively against the same code inside its wasm
//! module, run by the test host (host-tests, wasmtime) on the same inputs; host calls per
//! accepted request, as counted by the test host; the whole chain as four separate modules
//! against the one-module chain (`firebreak_chain.wasm`) on the same requests.
//!
//! "wasm" is the whole filter callback path in the test host (the module's callbacks, its host
//! calls, the host's own bookkeeping); "wasm net" subtracts the same module answering the same
//! request on a route it does not protect (one header read, continue), which leaves the decision
//! code plus the host calls it needs (body copy, shared data, header and property writes).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use firebreak_core::signature::{claim_nonce, verify_body, verify_headers, RequestView, SignaturePolicy};
use firebreak_core::store::MemoryStore;
use firebreak_host_tests::{Chain, Host, Module, PluginSpec, Request, Upstream, Verdict, DEFAULT_START_NANOS};
use serde_json::{json, Value};

use crate::requests::header_block;
use crate::{body, Args, AUTHORITY, KEY_ID, PATH, SECRET_B64};

/// A request as the filter sees it: pseudo-headers first, then the headers, and the body.
#[derive(Clone)]
pub(crate) struct Input {
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl Input {
    fn to_host(&self, path: &str) -> Request {
        let mut r = Request::post(path).set_header(":authority", AUTHORITY);
        for (name, value) in self.headers.iter().filter(|(n, _)| !n.starts_with(':')) {
            r = r.header(name, value);
        }
        if !self.body.is_empty() {
            r = r.body(&self.body);
        }
        r
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Parses one pre-signed header block back into (name, value) pairs, pseudo-headers included.
fn parse_block(block: &str, body: Vec<u8>) -> Input {
    let mut lines = block.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or("POST").to_string();
    let path = parts.next().unwrap_or(PATH).to_string();
    let mut headers = vec![
        (":authority".to_string(), AUTHORITY.to_string()),
        (":path".to_string(), path),
        (":method".to_string(), method),
        (":scheme".to_string(), "http".to_string()),
    ];
    for line in lines.filter(|l| !l.is_empty()) {
        if let Some((name, value)) = line.split_once(": ") {
            if name != "host" {
                headers.push((name.to_string(), value.to_string()));
            }
        }
    }
    Input { headers, body }
}

pub(crate) fn inputs(size: usize, count: usize, created: u64, secret: &[u8]) -> Result<Vec<Input>, String> {
    let body = body(size);
    (0..count as u64)
        .map(|i| header_block(size, i, created, secret, &body).map(|b| parse_block(&b, body.clone())))
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Nanoseconds per request of `send` over fresh copies of `requests` on a fresh host.
fn time_wasm(module: &Arc<Module>, config: &str, requests: &[Request], check: &dyn Fn(&Verdict) -> bool) -> Result<(f64, Verdict), String> {
    let mut host = Host::builder(module).config(config).start().map_err(|e| e.to_string())?;
    time_requests(requests, &mut |r| host.send(r), check)
}

/// Nanoseconds per request of `send` over fresh copies of `requests`; the last verdict.
fn time_requests(requests: &[Request], send: &mut dyn FnMut(Request) -> Verdict, check: &dyn Fn(&Verdict) -> bool) -> Result<(f64, Verdict), String> {
    let batch: Vec<Request> = requests.to_vec();
    let mut last = Verdict::default();
    let mut bad = 0usize;
    let start = Instant::now();
    for request in batch {
        last = send(request);
        if !check(&last) {
            bad += 1;
        }
    }
    let ns = start.elapsed().as_nanos() as f64 / requests.len().max(1) as f64;
    if bad > 0 {
        return Err(format!("{bad} of {} requests got an unexpected verdict in the test host (last: status {}, {:?}, trap {:?})",
            requests.len(), last.status, last.error_code(), last.trap));
    }
    Ok((ns, last))
}

/// Runs bench/core-wasm (the coreloop compiled to wasm32-wasip1) in wasmtime on `input`.
fn run_core_wasm(path: &Path, input: &str) -> Result<String, String> {
    use wasmtime::{Engine, Linker, Module as WasmModule, Store};
    use wasmtime_wasi::p2::pipe::{MemoryInputPipe, MemoryOutputPipe};
    let engine = Engine::default();
    let module = WasmModule::from_file(&engine, path).map_err(|e| format!("{e:?}"))?;
    let mut linker: Linker<wasmtime_wasi::p1::WasiP1Ctx> = Linker::new(&engine);
    wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |t| t).map_err(|e| format!("{e:?}"))?;
    let stdout = MemoryOutputPipe::new(1 << 20);
    let wasi = wasmtime_wasi::WasiCtxBuilder::new()
        .stdin(MemoryInputPipe::new(input.as_bytes().to_vec()))
        .stdout(stdout.clone())
        .inherit_stderr()
        .build_p1();
    let mut store = Store::new(&engine, wasi);
    let instance = linker.instantiate(&mut store, &module).map_err(|e| format!("{e:?}"))?;
    let start = instance.get_typed_func::<(), ()>(&mut store, "_start").map_err(|e| format!("{e:?}"))?;
    start.call(&mut store, ()).map_err(|e| format!("core-wasm: {e:?}"))?;
    drop(store);
    String::from_utf8(stdout.contents().to_vec()).map_err(|e| e.to_string())
}

/// The same decision code natively and compiled to wasm (wasmtime), on the same inputs.
fn core_compare(core_wasm: Option<&Path>, inputs: &[Input], config: &str, now_ms: u64, reps: usize) -> Result<Value, String> {
    let requests: Vec<Value> = inputs
        .iter()
        .map(|i| json!({"headers": i.headers.iter().map(|(n, v)| json!([n, v])).collect::<Vec<_>>(), "body": String::from_utf8_lossy(&i.body)}))
        .collect();
    let input = json!({"config": config, "now_ms": now_ms, "reps": reps, "requests": requests}).to_string();
    let parse = |out: &str| -> Result<(f64, u64), String> {
        let v: Value = serde_json::from_str(out.trim()).map_err(|e| format!("{e}: {out}"))?;
        let times: Vec<f64> = v["ns_per_request"].as_array().ok_or("ns_per_request")?.iter().filter_map(Value::as_f64).collect();
        Ok((median(times), v["accepted"].as_u64().unwrap_or(0)))
    };
    let (native, native_ok) = parse(&crate::coreloop::run(&input)?)?;
    let Some(path) = core_wasm.filter(|p| p.exists()) else {
        return Ok(json!({"native_ns": native, "wasm_ns": null, "ratio": null, "accepted": native_ok}));
    };
    let (wasm, wasm_ok) = parse(&run_core_wasm(path, &input)?)?;
    if wasm_ok != native_ok || native_ok != inputs.len() as u64 {
        return Err(format!("core loop accepted {native_ok} natively and {wasm_ok} in wasm of {}", inputs.len()));
    }
    Ok(json!({"native_ns": native, "wasm_ns": wasm, "ratio": wasm / native, "accepted": native_ok}))
}

fn signature_config() -> String {
    json!({
        "routes": [{"methods": ["POST"], "path_prefix": "/v1/"}],
        "keys": [{"id": KEY_ID, "secret_base64": SECRET_B64}],
        "max_age_seconds": 3600,
        "future_skew_seconds": 5,
        "max_body_bytes": 65536,
        "covered_headers_when_present": ["idempotency-key"],
    })
    .to_string()
}

/// As in the macro benchmark: one rule per user from a trusted header, 1,000 users, a budget
/// never spent.
fn rate_limit_config() -> String {
    json!({
        "name": "bench",
        "rules": [{"name": "per-user", "routes": [{"methods": ["POST"], "path_prefix": "/v1/"}], "key": "user",
                   "requests": 1000000, "per_seconds": 1, "burst": 1000000}],
        "trusted_user_header": "x-bench-client",
        "table": {"buckets": 16384, "slots_per_bucket": 16},
    })
    .to_string()
}

fn env_guard_config() -> String {
    use sha2::Digest;
    let production_key = b"bench-production-push-key-never-sent";
    let fingerprint: String = sha2::Sha256::digest(production_key).iter().map(|b| format!("{b:02x}")).collect();
    json!({
        "environment": "uat",
        "production": false,
        "protected_credentials": [{"label": "apns-prod", "sha256": fingerprint, "length": production_key.len()}],
        "patterns": [{"label": "stripe-live", "prefix": "sk_live_"}],
        "production_hosts": ["api.push.apple.com", "*.prod.example.com"],
        "routes": [{"path_prefix": "/v1/"}],
        "max_body_bytes": 65536,
        "max_decoded_bytes": 262144,
        "over_limit": "block",
    })
    .to_string()
}

/// Alone, replay-guard runs without request-signature, so without a principal; in the chain it
/// requires the principal request-signature verified, as on a money route.
fn replay_guard_config(require_principal: bool) -> String {
    json!({
        "routes": [{"name": "transfers", "match": {"methods": ["POST"], "path_exact": PATH}, "idempotency_key": "required",
                    "require_principal": require_principal}],
        "key_store": {"buckets": 16384, "slots_per_bucket": 16},
    })
    .to_string()
}

fn signature(wasm_dir: &Path, core_wasm: Option<&Path>, iterations: usize, reps: usize, sizes: &[usize]) -> Result<Value, String> {
    let path = wasm_dir.join("request_signature.wasm");
    if !path.exists() {
        return Ok(json!({"missing": path}));
    }
    let module = Module::load(&path).map_err(|e| format!("{e:#}"))?;
    let config = signature_config();
    let policy = SignaturePolicy::from_json(config.as_bytes(), &|_| None).map_err(|e| format!("{e:?}"))?;
    let created = DEFAULT_START_NANOS / 1_000_000_000;
    let now_ms = DEFAULT_START_NANOS / 1_000_000;
    let secret = base64_decode(SECRET_B64)?;
    let mut out = serde_json::Map::new();
    let mut host_calls = Value::Null;
    let mut host_calls_unprotected = Value::Null;
    for &size in sizes {
        let n = if size >= 8192 { iterations / 2 } else { iterations }.max(100);
        let inputs = inputs(size, n, created, &secret)?;
        let accepted: Vec<Request> = inputs.iter().map(|i| i.to_host(PATH)).collect();
        let unprotected: Vec<Request> = inputs.iter().map(|i| i.to_host("/bench/unprotected")).collect();
        let (mut native, mut wasm, mut wasm_base) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..reps {
            // Native: the same three steps the filter takes, over a store with Envoy's semantics.
            let store = MemoryStore::default();
            let start = Instant::now();
            for input in &inputs {
                let path = input.header(":path").unwrap_or(PATH);
                let view = RequestView { method: "POST", scheme: "http", authority: AUTHORITY, path_and_query: path, headers: &input.headers };
                let verified = verify_headers(&policy, &view, now_ms).map_err(|e| format!("native verify: {e:?}"))?;
                claim_nonce(&policy, &store, &verified, now_ms).map_err(|e| format!("native nonce: {e:?}"))?;
                verify_body(&policy, &verified, input.header("content-digest"), &input.body).map_err(|e| format!("native body: {e:?}"))?;
            }
            native.push(start.elapsed().as_nanos() as f64 / n as f64);

            let (ns, verdict) = time_wasm(&module, &config, &accepted, &|v| v.status == 200 && v.forwarded())?;
            wasm.push(ns);
            host_calls = json!({"total": verdict.host_call_total(), "by_call": verdict.host_calls});
            let (ns, verdict) = time_wasm(&module, &config, &unprotected, &|v| v.status == 200 && v.forwarded())?;
            wasm_base.push(ns);
            host_calls_unprotected = json!({"total": verdict.host_call_total(), "by_call": verdict.host_calls});
        }
        let (native, wasm, base) = (median(native), median(wasm), median(wasm_base));
        let core = core_compare(core_wasm, &inputs, &config, now_ms, reps)?;
        out.insert(size.to_string(), json!({
            "core": core,
            "iterations": n,
            "native_ns": native,
            "wasm_ns": wasm,
            "wasm_unprotected_ns": base,
            "wasm_net_ns": wasm - base,
            "ratio": wasm / native,
            "net_ratio": (wasm - base) / native,
        }));
    }
    Ok(json!({"module": path, "sizes": out, "host_calls_accepted": host_calls, "host_calls_unprotected": host_calls_unprotected}))
}

/// The generic comparison: `native` decides input i (fresh state per repetition, created by
/// `fresh`); the module decides the same inputs in a fresh test host; the same module on a
/// route it does not guard gives the host's own per-request cost.
#[allow(clippy::too_many_arguments)]
fn compare<S>(
    module_name: &str,
    wasm_dir: &Path,
    config: &str,
    label: &str,
    inputs: &[Input],
    reps: usize,
    fresh: &dyn Fn() -> S,
    native: &dyn Fn(&S, &Input) -> Result<(), String>,
    unguarded_path: &str,
) -> Result<Option<(Value, Value, Value)>, String> {
    let path = wasm_dir.join(format!("{module_name}.wasm"));
    if !path.exists() {
        return Ok(None);
    }
    let module = Module::load(&path).map_err(|e| format!("{e:#}"))?;
    let accepted: Vec<Request> = inputs.iter().map(|i| i.to_host(PATH)).collect();
    let unprotected: Vec<Request> = inputs.iter().map(|i| i.to_host(unguarded_path)).collect();
    let n = inputs.len();
    let (mut nat, mut wasm, mut base) = (Vec::new(), Vec::new(), Vec::new());
    let (mut hc, mut hcu) = (Value::Null, Value::Null);
    for _ in 0..reps {
        let state = fresh();
        let start = Instant::now();
        for input in inputs {
            native(&state, input)?;
        }
        nat.push(start.elapsed().as_nanos() as f64 / n as f64);
        let (ns, verdict) = time_wasm(&module, config, &accepted, &|v| v.status == 200 && v.forwarded())?;
        wasm.push(ns);
        hc = json!({"total": verdict.host_call_total(), "by_call": verdict.host_calls});
        let (ns, verdict) = time_wasm(&module, config, &unprotected, &|v| v.status == 200 && v.forwarded())?;
        base.push(ns);
        hcu = json!({"total": verdict.host_call_total(), "by_call": verdict.host_calls});
    }
    let (native, wasm, base) = (median(nat), median(wasm), median(base));
    let row = json!({
        "iterations": n, "native_ns": native, "wasm_ns": wasm, "wasm_unprotected_ns": base,
        "wasm_net_ns": wasm - base, "ratio": wasm / native, "net_ratio": (wasm - base) / native,
    });
    let _ = label;
    Ok(Some((row, hc, hcu)))
}

fn rate_limit(wasm_dir: &Path, iterations: usize, reps: usize) -> Result<Value, String> {
    use firebreak_core::ratelimit::{self, RateLimitPolicy, RequestFacts};
    let config = rate_limit_config();
    let policy = RateLimitPolicy::from_json(config.as_bytes()).map_err(|e| format!("{e:?}"))?;
    let secret = base64_decode(SECRET_B64)?;
    let created = DEFAULT_START_NANOS / 1_000_000_000;
    let now_ms = DEFAULT_START_NANOS / 1_000_000;
    let inputs = inputs(0, iterations, created, &secret)?;
    let ip: std::net::IpAddr = "127.0.0.1".parse().map_err(|_| "ip")?;
    let user_source = policy.user_source.clone();
    let native = |store: &MemoryStore, input: &Input| -> Result<(), String> {
        let user = ratelimit::resolve_user(&user_source, None, &input.headers);
        let facts = RequestFacts { method: "POST", path: PATH, client_ip: Some(ip), user: user.as_deref() };
        let decision = ratelimit::check(&policy, store, &facts, now_ms);
        match decision.rejection {
            None => Ok(()),
            Some(r) => Err(format!("native rate limit rejected: {}", r.code)),
        }
    };
    match compare("rate_limit", wasm_dir, &config, "rate-limit check", &inputs, reps, &MemoryStore::default, &native, "/bench/unprotected")? {
        None => Ok(json!({"missing": wasm_dir.join("rate_limit.wasm")})),
        Some((row, hc, hcu)) => Ok(json!({"sizes": {"check (1,000 users)": row}, "host_calls_accepted": hc, "host_calls_unprotected": hcu})),
    }
}

fn env_guard(wasm_dir: &Path, iterations: usize, reps: usize, sizes: &[usize]) -> Result<Value, String> {
    use firebreak_core::envguard::{check_body, check_headers, GuardPolicy};
    let config = env_guard_config();
    let policy = GuardPolicy::from_json(config.as_bytes()).map_err(|e| format!("{e:?}"))?;
    let secret = base64_decode(SECRET_B64)?;
    let created = DEFAULT_START_NANOS / 1_000_000_000;
    let native = |_: &(), input: &Input| -> Result<(), String> {
        let plan = check_headers(&policy, &input.headers).map_err(|e| format!("native env guard headers: {e:?}"))?;
        check_body(&policy, &plan, &input.body).map_err(|e| format!("native env guard body: {e:?}"))?;
        Ok(())
    };
    let mut rows = serde_json::Map::new();
    let (mut hc, mut hcu) = (Value::Null, Value::Null);
    for &size in sizes {
        let n = if size >= 8192 { iterations / 2 } else { iterations }.max(100);
        let inputs = inputs(size, n, created, &secret)?;
        match compare("env_guard", wasm_dir, &config, "scan", &inputs, reps, &|| (), &native, "/bench/unprotected")? {
            None => return Ok(json!({"missing": wasm_dir.join("env_guard.wasm")})),
            Some((row, h, hu)) => {
                rows.insert(size.to_string(), row);
                (hc, hcu) = (h, hu);
            }
        }
    }
    Ok(json!({"sizes": rows, "host_calls_accepted": hc, "host_calls_unprotected": hcu}))
}

/// replay-guard: the wasm module in the test host only (its decision spans the request and the
/// response, over `replay::Exchange` and `LocalState`; no native driver yet), and host calls.
fn replay_guard(wasm_dir: &Path, iterations: usize, reps: usize) -> Result<Value, String> {
    let path = wasm_dir.join("replay_guard.wasm");
    if !path.exists() {
        return Ok(json!({"missing": path}));
    }
    let config = replay_guard_config(false);
    let module = Module::load(&path).map_err(|e| format!("{e:#}"))?;
    let secret = base64_decode(SECRET_B64)?;
    let inputs = inputs(1024, iterations, DEFAULT_START_NANOS / 1_000_000_000, &secret)?;
    let accepted: Vec<Request> = inputs.iter().map(|i| i.to_host(PATH)).collect();
    let unprotected: Vec<Request> = inputs.iter().map(|i| i.to_host("/bench/unprotected")).collect();
    let (mut wasm, mut base) = (Vec::new(), Vec::new());
    let (mut hc, mut hcu) = (Value::Null, Value::Null);
    for _ in 0..reps {
        let (ns, v) = time_wasm(&module, &config, &accepted, &|v| v.status == 200 && v.forwarded())?;
        wasm.push(ns);
        hc = json!({"total": v.host_call_total(), "by_call": v.host_calls});
        let (ns, v) = time_wasm(&module, &config, &unprotected, &|v| v.status == 200 && v.forwarded())?;
        base.push(ns);
        hcu = json!({"total": v.host_call_total(), "by_call": v.host_calls});
    }
    let (wasm, base) = (median(wasm), median(base));
    Ok(json!({
        "sizes": {"new key, 1024 B body, response stored": {
            "iterations": iterations, "native_ns": null, "wasm_ns": wasm, "wasm_unprotected_ns": base,
            "wasm_net_ns": wasm - base, "ratio": null, "net_ratio": null}},
        "native_note": "no native driver yet (the decision spans request and response)",
        "host_calls_accepted": hc, "host_calls_unprotected": hcu,
    }))
}

/// The chain's filters, in the order of the benchmark's chain (replay-guard last), with the
/// configurations of the per-filter rows (replay-guard requiring request-signature's principal).
pub(crate) fn chain_sections() -> Vec<(&'static str, String)> {
    vec![
        ("request_signature", signature_config()),
        ("rate_limit", rate_limit_config()),
        ("env_guard", env_guard_config()),
        ("replay_guard", replay_guard_config(true)),
    ]
}

/// Host calls of the whole chain on one accepted request, in two forms on the same requests:
/// four separate modules in one filter chain (host-tests `Chain`, one VM each; the calls summed
/// over the modules) and the one-module chain (`firebreak_chain.wasm`, the same configurations
/// as its sections). Not timed: the test host's own cost per filter-chain step is no guide to
/// Envoy's (the macro benchmark measures both forms in Envoy).
fn chain(wasm_dir: &Path) -> Result<Value, String> {
    const REQUESTS: usize = 20;
    let sections = chain_sections();
    let mut paths: Vec<PathBuf> = sections.iter().map(|(name, _)| wasm_dir.join(format!("{name}.wasm"))).collect();
    paths.push(wasm_dir.join("firebreak_chain.wasm"));
    if let Some(missing) = paths.iter().find(|p| !p.exists()) {
        return Ok(json!({"missing": missing}));
    }
    let load = |p: &PathBuf| Module::load(p).map_err(|e| format!("{e:#}"));
    let mut specs = Vec::new();
    for ((name, config), path) in sections.iter().zip(&paths) {
        let spec = PluginSpec { configuration: config.clone().into_bytes(), root_id: name.to_string(), vm_id: name.to_string(), ..PluginSpec::default() };
        specs.push((load(path)?, spec));
    }
    let one_module = load(&paths[sections.len()])?;
    let chain_sections = sections
        .iter()
        .map(|(name, config)| serde_json::from_str::<Value>(config).map(|c| json!({ *name: c })).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, String>>()?;
    let chain_config = json!({ "filters": chain_sections }).to_string();

    let secret = base64_decode(SECRET_B64)?;
    let inputs = inputs(1024, REQUESTS, DEFAULT_START_NANOS / 1_000_000_000, &secret)?;
    let requests: Vec<Request> = inputs.iter().map(|i| i.to_host(PATH)).collect();
    let accepted = |v: &Verdict| v.status == 200 && v.forwarded();
    let host_calls = |v: &Verdict| json!({"total": v.host_call_total(), "by_call": v.host_calls});

    let mut separate = Chain::start(specs, Upstream::default()).map_err(|(i, e)| format!("chain filter {i}: {e}"))?;
    let (_, last_separate) = time_requests(&requests, &mut |r| separate.send(r), &accepted)?;
    let mut one = Host::builder(&one_module).config(&chain_config).root_id("firebreak").start().map_err(|e| e.to_string())?;
    let (_, last_one) = time_requests(&requests, &mut |r| one.send(r), &accepted)?;
    Ok(json!({
        "members": sections.iter().map(|(name, _)| *name).collect::<Vec<_>>(),
        "input": "new key, 1024 B body",
        "separate_modules": {"host_calls_accepted": host_calls(&last_separate)},
        "one_module": {"host_calls_accepted": host_calls(&last_one)},
    }))
}

pub(crate) fn base64_decode(s: &str) -> Result<Vec<u8>, String> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).map_err(|e| e.to_string())
}

pub fn run(args: &Args) -> Result<(), String> {
    let wasm_dir = PathBuf::from(args.req("wasm-dir")?);
    let iterations: usize = args.num("iterations", 4000)?;
    let reps: usize = args.num("reps", 5)?;
    let sizes = args.sizes()?;
    let core_wasm = args.get("core-wasm").map(PathBuf::from);
    let mut result = serde_json::Map::new();
    result.insert("sha256_backend".into(), json!(if cfg!(feature = "soft-sha") { "soft (portable)" } else { "native default (CPU SHA extensions when present)" }));
    result.insert("iterations".into(), json!(iterations));
    result.insert("reps".into(), json!(reps));
    let mut filters = serde_json::Map::new();
    let run_one = |name: &str, f: &dyn Fn() -> Result<Value, String>| -> Value {
        match f() {
            Ok(v) => v,
            Err(e) => {
                eprintln!("micro {name}: {e}");
                json!({"error": e})
            }
        }
    };
    filters.insert("request_signature".into(), run_one("request_signature", &|| signature(&wasm_dir, core_wasm.as_deref(), iterations, reps, &sizes)));
    filters.insert("rate_limit".into(), run_one("rate_limit", &|| rate_limit(&wasm_dir, iterations, reps)));
    filters.insert("replay_guard".into(), run_one("replay_guard", &|| replay_guard(&wasm_dir, iterations, reps)));
    filters.insert("env_guard".into(), run_one("env_guard", &|| env_guard(&wasm_dir, iterations, reps, &sizes)));
    result.insert("filters".into(), Value::Object(filters));
    result.insert("chain".into(), run_one("chain", &|| chain(&wasm_dir)));
    println!("{}", serde_json::to_string_pretty(&Value::Object(result)).map_err(|e| e.to_string())?);
    Ok(())
}

/// `firebreak-bench calls --wasm-dir DIR --size S`: the host calls each module makes per accepted
/// request at body size S, as the test host counts them (the last of 20 requests on one host):
/// each filter's module with the micro-benchmark's configuration, and the one-module chain with
/// those as its sections. The cost breakdown of docs/benchmarks.md prices them with the host-call
/// table measured in Envoy. Prints JSON.
pub fn calls(args: &Args) -> Result<(), String> {
    const REQUESTS: usize = 20;
    let wasm_dir = PathBuf::from(args.req("wasm-dir")?);
    let size: usize = args.num("size", 0)?;
    let secret = base64_decode(SECRET_B64)?;
    let inputs = inputs(size, REQUESTS, DEFAULT_START_NANOS / 1_000_000_000, &secret)?;
    let requests: Vec<Request> = inputs.iter().map(|i| i.to_host(PATH)).collect();
    let chain_config = {
        let sections = chain_sections()
            .iter()
            .map(|(name, config)| serde_json::from_str::<Value>(config).map(|c| json!({ *name: c })).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, String>>()?;
        json!({ "filters": sections }).to_string()
    };
    let modules = [
        ("request_signature", signature_config()),
        ("rate_limit", rate_limit_config()),
        ("env_guard", env_guard_config()),
        ("replay_guard", replay_guard_config(false)),
        ("firebreak_chain", chain_config),
    ];
    let mut out = serde_json::Map::new();
    for (name, config) in modules {
        let path = wasm_dir.join(format!("{name}.wasm"));
        let counted = (|| -> Result<Value, String> {
            if !path.exists() {
                return Err(format!("missing {}", path.display()));
            }
            let module = Module::load(&path).map_err(|e| format!("{e:#}"))?;
            let root = if name == "firebreak_chain" { "firebreak" } else { name };
            let mut host = Host::builder(&module).config(&config).root_id(root).start().map_err(|e| e.to_string())?;
            let (_, last) = time_requests(&requests, &mut |r| host.send(r), &|v| v.status == 200 && v.forwarded())?;
            Ok(json!({"total": last.host_call_total(), "by_call": last.host_calls}))
        })();
        out.insert(name.to_string(), counted.unwrap_or_else(|e| json!({"error": e})));
    }
    let result = json!({"size": size, "requests": REQUESTS, "modules": out});
    println!("{}", serde_json::to_string_pretty(&result).map_err(|e| e.to_string())?);
    Ok(())
}
