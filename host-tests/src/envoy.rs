//! Runs a scenario file through real Envoy: a generated bootstrap (listener, HTTP connection
//! manager, the wasm filter on V8 or the native module in its place, the router), an upstream and
//! callout clusters served by threads of this process that record what they receive and answer as
//! the scenario scripts.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _, Result};
use firebreak_core::filters;
use serde_json::json;

use crate::http::{Request, Upstream};
use crate::scenario::{
    answered_by, build_request, value_bytes, CalloutSpec, CaseResult, Expect, Observed, Outcome, ScenarioFile,
};

/// The Envoy the project pins (installed by scripts/setup.sh), unless `FIREBREAK_ENVOY` says.
pub fn default_envoy() -> PathBuf {
    if let Ok(p) = std::env::var("FIREBREAK_ENVOY") {
        return PathBuf::from(p);
    }
    crate::workspace_root().join(".venv/bin/envoy")
}

/// The native module's directory (`libfirebreak.so`, from `bash scripts/build.sh`), unless
/// `FIREBREAK_NATIVE_DIR` says.
pub fn default_native_dir() -> PathBuf {
    if let Ok(p) = std::env::var("FIREBREAK_NATIVE_DIR") {
        return PathBuf::from(p);
    }
    crate::workspace_root().join("target/native")
}

/// What runs a scenario's filters in Envoy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Runtime {
    /// The scenario's wasm modules on V8.
    Wasm,
    /// The Firebreak engine as an Envoy dynamic module (`libfirebreak.so` in this directory), one
    /// `dynamic_modules` filter in place of each wasm module.
    Native { dir: PathBuf },
}

/// The native module's `filter_name` for a wasm module file: `<filter>.wasm` is that filter,
/// `firebreak_chain.wasm` the chain; `None` for a module that is not a Firebreak filter.
pub fn native_filter_name(module: &Path) -> Option<&'static str> {
    let stem = module.file_stem()?.to_str()?;
    if stem == "firebreak_chain" {
        return Some(filters::CHAIN);
    }
    filters::FILTERS.iter().copied().find(|filter| *filter == stem)
}

/// Why a file cannot run on the native module, if it cannot: a module that is not a Firebreak
/// filter (the test filters), named.
fn native_skip_reason(modules: &[PathBuf]) -> Option<String> {
    let foreign = modules.iter().find(|module| native_filter_name(module).is_none())?;
    let name = foreign.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    Some(format!("{name} is not a Firebreak filter: the native module runs only Firebreak's"))
}

/// A request as an HTTP/1.1 server received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub trailers: Vec<(String, String)>,
}

/// How a test server answers.
#[derive(Debug, Clone)]
enum Answer {
    /// The response (after `delay_ms`; or, with `reset`, a closed connection instead).
    Respond(Upstream),
    /// Read the request, then say nothing for this long.
    Silence(Duration),
    /// Read the request, then close the connection.
    Reset,
}

/// A tiny HTTP/1.1 server on a thread: records requests, answers by its script.
struct TestServer {
    port: u16,
    received: Arc<Mutex<Vec<Received>>>,
    /// Connections Envoy closed while the server was waiting to answer (a reset request).
    abandoned: Arc<std::sync::atomic::AtomicUsize>,
    /// How the next request is answered (the runner sets it per case).
    answer: Arc<Mutex<Answer>>,
    stop: Arc<AtomicBool>,
}

impl TestServer {
    fn start(answer: Answer) -> Result<TestServer> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        listener.set_nonblocking(true)?;
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let answer = Arc::new(Mutex::new(answer));
        let abandoned = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (rec, st, ans, ab) = (received.clone(), stop.clone(), answer.clone(), abandoned.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (rec, answer, st, ab) = (rec.clone(), ans.clone(), st.clone(), ab.clone());
                        std::thread::spawn(move || serve(conn, rec, answer, st, ab));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(TestServer { port, received, abandoned, answer, stop })
    }

    fn set_answer(&self, answer: Answer) {
        if let Ok(mut a) = self.answer.lock() {
            *a = answer;
        }
    }

    fn count(&self) -> usize {
        self.received.lock().map(|r| r.len()).unwrap_or(0)
    }

    fn since(&self, n: usize) -> Vec<Received> {
        self.received.lock().map(|r| r[n.min(r.len())..].to_vec()).unwrap_or_default()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn serve(
    conn: TcpStream,
    received: Arc<Mutex<Vec<Received>>>,
    answer: Arc<Mutex<Answer>>,
    stop: Arc<AtomicBool>,
    abandoned: Arc<std::sync::atomic::AtomicUsize>,
) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let mut writer = match conn.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(conn);
    // Waits, noticing (once) when Envoy closes the connection meanwhile.
    let Ok(peeker) = writer.try_clone() else { return };
    let wait = |d: Duration| {
        let until = Instant::now() + d;
        let mut closed = false;
        while Instant::now() < until && !stop.load(Ordering::SeqCst) {
            if !closed && peeker.set_nonblocking(true).is_ok() {
                if let Ok(0) = peeker.peek(&mut [0u8; 1]) {
                    closed = true;
                    abandoned.fetch_add(1, Ordering::SeqCst);
                }
                let _ = peeker.set_nonblocking(false);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    loop {
        let Ok(Some((start, headers, body, trailers))) = read_message(&mut reader, true) else { return };
        let mut parts = start.split_whitespace();
        let method = parts.next().unwrap_or_default().to_string();
        let path = parts.next().unwrap_or_default().to_string();
        // The answer in force when the request arrived.
        let Ok(answer) = answer.lock().map(|a| a.clone()) else { return };
        if let Ok(mut r) = received.lock() {
            r.push(Received { method, path, headers, body, trailers });
        }
        match &answer {
            Answer::Respond(u) => {
                wait(Duration::from_millis(u.delay_ms));
                if u.reset {
                    let _ = writer.shutdown(Shutdown::Both);
                    return;
                }
                let mut out = format!("HTTP/1.1 {} X\r\n", u.status);
                for (k, v) in &u.headers {
                    out.push_str(&format!("{k}: {v}\r\n"));
                }
                out.push_str(&format!("content-length: {}\r\n\r\n", u.body.len()));
                let mut bytes = out.into_bytes();
                match u.body_cut_at {
                    Some(n) if n < u.body.len() => {
                        // Headers and part of the body, then the connection closes.
                        bytes.extend_from_slice(&u.body[..n]);
                        let _ = writer.write_all(&bytes);
                        let _ = writer.flush();
                        std::thread::sleep(Duration::from_millis(50));
                        let _ = writer.shutdown(Shutdown::Both);
                        return;
                    }
                    _ => bytes.extend_from_slice(&u.body),
                }
                if writer.write_all(&bytes).is_err() {
                    return;
                }
            }
            Answer::Silence(d) => {
                wait(*d);
                let _ = writer.shutdown(Shutdown::Both);
                return;
            }
            Answer::Reset => {
                let _ = writer.shutdown(Shutdown::Both);
                return;
            }
        }
    }
}

/// Start line, headers, body, trailers.
type Message = (String, Vec<(String, String)>, Vec<u8>, Vec<(String, String)>);

/// Reads one HTTP/1.1 message with the shared reader (`tools/http1`: start line, headers, body
/// by content-length or chunked with trailers; for a response without either, to the end of
/// the connection).
fn read_message(reader: &mut impl BufRead, is_request: bool) -> Result<Option<Message>> {
    read_kind(reader, if is_request { firebreak_http1::Kind::Request } else { firebreak_http1::Kind::Response })
}

/// A response (to a HEAD request: no body).
fn read_response(reader: &mut impl BufRead, to_head: bool) -> Result<Option<Message>> {
    read_kind(reader, if to_head { firebreak_http1::Kind::ResponseToHead } else { firebreak_http1::Kind::Response })
}

fn read_kind(reader: &mut impl BufRead, kind: firebreak_http1::Kind) -> Result<Option<Message>> {
    let limits = firebreak_http1::Limits { max_head: 1 << 20, max_body: usize::MAX, max_headers: 256 };
    Ok(firebreak_http1::read_message(reader, kind, &limits)?.map(|m| (m.start, m.headers, m.body, m.trailers)))
}

fn string_value(bytes: Vec<u8>) -> serde_json::Value {
    json!({"@type": "type.googleapis.com/google.protobuf.StringValue", "value": String::from_utf8_lossy(&bytes)})
}

/// One `envoy.filters.http.wasm` filter per module, on V8, with its plugin section.
fn wasm_filters(scenario: &ScenarioFile, modules: &[PathBuf]) -> Result<Vec<serde_json::Value>> {
    let mut http_filters = Vec::new();
    for (module, plugin_section) in modules.iter().zip(scenario.plugins()) {
        let mut vm_config = json!({
            "vm_id": plugin_section.vm_id,
            "runtime": "envoy.wasm.runtime.v8",
            "code": {"local": {"filename": module.display().to_string()}},
        });
        let vm_bytes = value_bytes(&plugin_section.vm_configuration)?;
        if !vm_bytes.is_empty() {
            vm_config["configuration"] = string_value(vm_bytes);
        }
        if !plugin_section.env.is_empty() {
            vm_config["environment_variables"] = json!({"key_values": plugin_section.env});
        }
        let mut plugin = json!({
            "name": plugin_section.name.clone().unwrap_or_else(|| format!("firebreak{}", http_filters.len())),
            "root_id": plugin_section.root_id,
            "vm_config": vm_config,
        });
        let config = value_bytes(&plugin_section.configuration)?;
        if !config.is_empty() {
            plugin["configuration"] = string_value(config);
        }
        http_filters.push(json!({"name": "envoy.filters.http.wasm", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": plugin}}));
    }
    Ok(http_filters)
}

/// One `envoy.filters.http.dynamic_modules` filter per module, in order: the native module's filter
/// the module file names, with the plugin's configuration as its JSON (the plugin's environment
/// goes into Envoy's, see [`native_environment`]).
fn native_filters(scenario: &ScenarioFile, modules: &[PathBuf]) -> Result<Vec<serde_json::Value>> {
    let mut http_filters = Vec::new();
    for (module, plugin_section) in modules.iter().zip(scenario.plugins()) {
        let filter_name = native_filter_name(module).ok_or_else(|| anyhow!("{}: not a Firebreak filter", module.display()))?;
        http_filters.push(json!({"name": "envoy.filters.http.dynamic_modules", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter",
            "dynamic_module_config": {"name": "firebreak"},
            "filter_name": filter_name,
            "filter_config": string_value(value_bytes(&plugin_section.configuration)?)}}));
    }
    Ok(http_filters)
}

/// Envoy's own environment in native mode: where the module is, and every plugin's `env` (the
/// native module reads `secret_env` from the process, one environment for every filter: two
/// plugins may not give one variable different values).
fn native_environment(scenario: &ScenarioFile, dir: &Path) -> Result<BTreeMap<String, String>> {
    let mut env = BTreeMap::new();
    for (name, value) in scenario.plugins().iter().flat_map(|plugin| plugin.env.iter()) {
        if env.insert(name.clone(), value.clone()).is_some_and(|earlier| earlier != *value) {
            bail!("two plugins give {name} different values: the native module has one environment");
        }
    }
    env.insert("ENVOY_DYNAMIC_MODULES_SEARCH_PATH".into(), dir.display().to_string());
    Ok(env)
}

/// The scenario's filters, in Envoy's order, as `runtime` runs them.
pub fn scenario_filters(scenario: &ScenarioFile, modules: &[PathBuf], runtime: &Runtime) -> Result<Vec<serde_json::Value>> {
    match runtime {
        Runtime::Wasm => wasm_filters(scenario, modules),
        Runtime::Native { .. } => native_filters(scenario, modules),
    }
}

/// The Envoy bootstrap for a scenario: listener and admin on ports Envoy picks, `http_filters`
/// (the scenario's, see [`scenario_filters`]) before the router.
pub fn bootstrap(
    scenario: &ScenarioFile,
    mut http_filters: Vec<serde_json::Value>,
    upstream_port: u16,
    clusters: &BTreeMap<String, u16>,
    grpc_clusters: &BTreeMap<String, u16>,
    admin_path: &Path,
) -> Result<serde_json::Value> {
    let cluster = |name: &str, port: u16| {
        json!({
            "name": name,
            "connect_timeout": "1s",
            "type": "STATIC",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}
        })
    };
    let mut upstream_cluster = cluster("upstream", upstream_port);
    upstream_cluster["per_connection_buffer_limit_bytes"] = json!(scenario.buffer_limit_bytes());
    // HTTP/1 drops trailers unless told to keep them (both sides of Envoy).
    upstream_cluster["typed_extension_protocol_options"] = json!({
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http_protocol_options": {"enable_trailers": true}}
        }
    });
    let mut all = vec![upstream_cluster];
    for (name, port) in clusters {
        all.push(cluster(name, *port));
    }
    // gRPC clusters speak HTTP/2 (cleartext) to the gRPC server.
    for (name, port) in grpc_clusters {
        let mut c = cluster(name, *port);
        c["typed_extension_protocol_options"] = json!({
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}
            }
        });
        all.push(c);
    }
    let ms = scenario.route_timeout_ms();
    let route_timeout = format!("{}.{:03}s", ms / 1000, ms % 1000);
    http_filters.push(json!({"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}));
    Ok(json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [{
                "name": "main",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "per_connection_buffer_limit_bytes": scenario.buffer_limit_bytes(),
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "ingress",
                        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"],
                            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream", "timeout": route_timeout}}]}]},
                        "http_protocol_options": {"enable_trailers": true},
                        "http_filters": http_filters
                    }
                }]}]
            }],
            "clusters": all
        },
        "admin_address_path": admin_path.display().to_string(),
    }))
}

/// A running Envoy, killed (by its own handle) when dropped.
struct Envoy {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

enum Started {
    Running(Envoy),
    /// Envoy exited while loading the configuration: its log.
    Refused(String),
}

/// How to start one Envoy: its binary, its `--concurrency`, and what to add to its environment.
struct Launch<'a> {
    envoy_bin: &'a Path,
    concurrency: u32,
    env: BTreeMap<String, String>,
}

fn start_envoy(launch: &Launch<'_>, config: &serde_json::Value, dir: &Path) -> Result<Started> {
    std::fs::create_dir_all(dir)?;
    let mut config = config.clone();
    let admin_path = PathBuf::from(config["admin_address_path"].as_str().unwrap_or_default());
    let _ = std::fs::remove_file(&admin_path);
    if let Some(obj) = config.as_object_mut() {
        obj.remove("admin_address_path");
    }
    let cfg_path = dir.join("envoy.yaml");
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&config)?)?;
    let log = dir.join("envoy.log");
    let child = Command::new(launch.envoy_bin)
        .envs(&launch.env)
        .arg("-c")
        .arg(&cfg_path)
        .arg("--concurrency")
        .arg(launch.concurrency.to_string())
        // The wasm log and the native module's (`dynamic_modules`) at info, as the host reports
        // it to modules (`proxy_get_log_level`), so scenarios can check the modules' lines on
        // either runtime. Envoy's log goes to stderr, which flushes each line (`--log-path`
        // flushes every 10 s), into envoy.log: read per case, kept on failure.
        .args([
            "--use-dynamic-base-id",
            "-l",
            "warning",
            "--component-log-level",
            "wasm:info,dynamic_modules:info",
            "--admin-address-path",
        ])
        .arg(&admin_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&log)?))
        .spawn()
        .with_context(|| format!("starting {}", launch.envoy_bin.display()))?;
    let mut envoy = Envoy { child, port: 0, log: log.clone() };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = envoy.child.try_wait()? {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let _ = status;
            return Ok(Started::Refused(text));
        }
        if Instant::now() > deadline {
            bail!("Envoy did not become ready; log: {}", std::fs::read_to_string(&log).unwrap_or_default());
        }
        if let Ok(addr) = std::fs::read_to_string(&admin_path) {
            let addr = addr.trim().to_string();
            if let Ok((status, body)) = admin_get(&addr, "/ready") {
                if status == 200 && body.contains("LIVE") {
                    let (_, listeners) = admin_get(&addr, "/listeners?format=json")?;
                    let v: serde_json::Value = serde_json::from_str(&listeners)?;
                    envoy.port = v["listener_statuses"][0]["local_address"]["socket_address"]["port_value"]
                        .as_u64()
                        .ok_or_else(|| anyhow!("no listener port in {listeners}"))? as u16;
                    return Ok(Started::Running(envoy));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn admin_get(addr: &str, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n").as_bytes())?;
    let mut reader = BufReader::new(s);
    let (start, _, body, _) = read_message(&mut reader, false)?.ok_or_else(|| anyhow!("no answer"))?;
    let status = start.split_whitespace().nth(1).unwrap_or("0").parse()?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Sends a request to Envoy and reads the response. A reset is status 0.
/// Status, headers (with `:status`) and body of a response.
type Response = (u16, Vec<(String, String)>, Vec<u8>);

/// A request as a client writes it on an HTTP/1.1 connection.
fn request_bytes(request: &Request) -> Vec<u8> {
    let method = request.header_value(":method").unwrap_or("GET");
    let path = request.header_value(":path").unwrap_or("/");
    let authority = request.header_value(":authority").unwrap_or("localhost");
    let body = request.body_bytes();
    let mut out = format!("{method} {path} HTTP/1.1\r\nhost: {authority}\r\n");
    for (k, v) in &request.headers {
        if k.starts_with(':') || k == "content-length" || k == "host" {
            continue;
        }
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    let chunked = !request.trailers.is_empty();
    if chunked {
        out.push_str("transfer-encoding: chunked\r\n");
    } else if !body.is_empty() || method != "GET" {
        out.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    out.push_str("connection: close\r\n\r\n");
    let mut bytes = out.into_bytes();
    if chunked {
        // One chunk, then the trailers.
        if !body.is_empty() {
            bytes.extend_from_slice(format!("{:x}\r\n", body.len()).as_bytes());
            bytes.extend_from_slice(&body);
            bytes.extend_from_slice(b"\r\n");
        }
        bytes.extend_from_slice(b"0\r\n");
        for (k, v) in &request.trailers {
            bytes.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
        }
        bytes.extend_from_slice(b"\r\n");
    } else {
        bytes.extend_from_slice(&body);
    }
    bytes
}

fn send(port: u16, request: &Request) -> Result<Response> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(15)))?;
    s.write_all(&request_bytes(request))?;
    let mut reader = BufReader::new(s);
    let head = request.header_value(":method") == Some("HEAD");
    match read_response(&mut reader, head) {
        Ok(Some((start, headers, body, _))) => {
            let status: u16 = start.split_whitespace().nth(1).unwrap_or("0").parse()?;
            let mut h = vec![(":status".to_string(), status.to_string())];
            h.extend(headers);
            Ok((status, h, body))
        }
        Ok(None) | Err(_) => Ok((0, Vec::new(), Vec::new())),
    }
}

/// Sends a request, waits until the upstream has it, then closes the connection (the client
/// goes away before the answer); returns once Envoy has given up the upstream request too.
fn send_and_disconnect(port: u16, request: &Request, upstream: &TestServer, before: usize) -> Result<Response> {
    let abandoned = upstream.abandoned.load(Ordering::SeqCst);
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.write_all(&request_bytes(request))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while upstream.count() <= before {
        if Instant::now() > deadline {
            bail!("the upstream never got the request");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = s.shutdown(Shutdown::Both);
    drop(s);
    // Envoy resets the upstream request when the downstream goes away; the stream (and its
    // on_log) ends in that same event.
    while upstream.abandoned.load(Ordering::SeqCst) <= abandoned {
        if Instant::now() > deadline {
            bail!("Envoy kept the upstream request after the client left");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(50));
    Ok((0, Vec::new(), Vec::new()))
}

/// The library `Runtime::Native` loads from its directory (`dynamic_module_config.name: firebreak`).
pub const NATIVE_LIBRARY: &str = "libfirebreak.so";

/// The modules as Envoy loads them, and how to start Envoy for `runtime`.
fn prepare<'a>(
    scenario: &ScenarioFile,
    modules: &[PathBuf],
    runtime: &Runtime,
    envoy_bin: &'a Path,
) -> Result<(Vec<PathBuf>, Launch<'a>)> {
    let concurrency = scenario.envoy_concurrency.unwrap_or(2);
    match runtime {
        Runtime::Wasm => {
            let mut canonical = Vec::new();
            for module in modules {
                canonical.push(std::fs::canonicalize(module).with_context(|| module.display().to_string())?);
            }
            Ok((canonical, Launch { envoy_bin, concurrency, env: BTreeMap::new() }))
        }
        Runtime::Native { dir } => {
            let library = dir.join(NATIVE_LIBRARY);
            let dir = std::fs::canonicalize(dir)
                .ok()
                .filter(|dir| dir.join(NATIVE_LIBRARY).is_file())
                .ok_or_else(|| anyhow!("{} is missing: run `bash scripts/build.sh` first", library.display()))?;
            let env = native_environment(scenario, &dir)?;
            Ok((modules.to_vec(), Launch { envoy_bin, concurrency, env }))
        }
    }
}

/// Whether Envoy's log says it refused the scenario's filter configuration (rather than failing
/// for another reason).
fn refused_configuration(log: &str, runtime: &Runtime) -> bool {
    match runtime {
        Runtime::Wasm => log.contains("Unable to create Wasm") || log.contains("Failed to configure"),
        Runtime::Native { .. } => log.contains("config_error field="),
    }
}

/// Every case of a file that does not run, with the reason (one row for a file without cases).
fn skipped_rows(file: &str, scenario: &ScenarioFile, reason: &str) -> Vec<CaseResult> {
    let skipped = |case: &str| CaseResult {
        file: file.to_string(),
        case: case.to_string(),
        outcome: Outcome::Skipped(reason.to_string()),
        observed: None,
    };
    if scenario.cases.is_empty() {
        let what = if scenario.expects_start_failure() { "plugin refuses to start" } else { "plugin start" };
        return vec![skipped(what)];
    }
    scenario.cases.iter().map(|case| skipped(&case.name)).collect()
}

/// Runs a scenario file through real Envoy, its filters run by `runtime`.
pub fn run_envoy(
    file: &Path,
    scenario: &ScenarioFile,
    modules: &[PathBuf],
    runtime: &Runtime,
    envoy_bin: &Path,
    work_dir: &Path,
) -> Vec<CaseResult> {
    let fname = file.display().to_string();
    let row = |case: &str, outcome: Outcome, observed: Option<Observed>| CaseResult {
        file: fname.clone(),
        case: case.to_string(),
        outcome,
        observed,
    };
    if let (Runtime::Native { .. }, Some(reason)) = (runtime, native_skip_reason(modules)) {
        return skipped_rows(&fname, scenario, &reason);
    }
    let (modules, launch) = match prepare(scenario, modules, runtime, envoy_bin) {
        Ok(prepared) => prepared,
        Err(e) => return vec![row("(module)", Outcome::Fail(vec![format!("{e:#}")]), None)],
    };
    let result = (|| -> Result<Vec<CaseResult>> {
        let default_upstream = scenario.upstream_reply()?;
        let upstream = TestServer::start(Answer::Respond(default_upstream.clone()))?;
        let mut servers = Vec::new();
        let mut clusters = BTreeMap::new();
        let grpc_names = scenario.grpc_clusters();
        let mut grpc = if grpc_names.is_empty() { None } else { Some(GrpcUpstream::start(&grpc_names)?) };
        let grpc_ports = grpc.as_ref().map(|g| g.ports.clone()).unwrap_or_default();
        for (name, spec) in &scenario.callout_clusters() {
            if grpc_names.contains(name) {
                continue;
            }
            let server = TestServer::start(callout_answer(spec)?)?;
            clusters.insert(name.clone(), server.port);
            servers.push((name.clone(), server));
        }
        let admin_path = work_dir.join("admin.address");
        let filters = scenario_filters(scenario, &modules, runtime)?;
        let config = bootstrap(scenario, filters, upstream.port, &clusters, &grpc_ports, &admin_path)?;
        let envoy = match start_envoy(&launch, &config, work_dir)? {
            Started::Refused(log) => {
                let refused = refused_configuration(&log, runtime);
                return Ok(vec![if scenario.expects_start_failure() && refused {
                    row("plugin refuses to start", Outcome::Pass, None)
                } else {
                    row("plugin start", Outcome::Fail(vec![format!("Envoy exited: {}", last_lines(&log, 5))]), None)
                }]);
            }
            Started::Running(e) => e,
        };
        if scenario.expects_start_failure() {
            return Ok(vec![row("plugin refuses to start", Outcome::Fail(vec!["Envoy started the plugin".into()]), None)]);
        }
        let mut out = Vec::new();
        // Envoy's log read so far (none: the first case sees the plugin's start).
        let mut log_offset = 0usize;
        // When the first request was sent (real clock, ms), and the real time slept since for
        // `real_time` cases (which the host's fake clock advances too).
        let mut first_request_ms: Option<u64> = None;
        let mut advanced_ms = 0u64;
        for case in &scenario.cases {
            if let Some(reason) = scenario.host_only_reason(case) {
                log_offset = log_len(&envoy.log);
                out.push(row(&case.name, Outcome::Skipped(reason), None));
                continue;
            }
            if case.real_time {
                // The fake clock's advance, in real time.
                std::thread::sleep(Duration::from_millis(case.advance_ms));
                if first_request_ms.is_some() {
                    advanced_ms = advanced_ms.saturating_add(case.advance_ms);
                }
            }
            let Some(spec) = &case.request else {
                let (lines, _) = log_since(&envoy.log, &mut log_offset);
                let observed = Observed { logs: Some(lines), ..Observed::default() };
                let problems = observed.check_effects(&Expect { trap: None, ..case.expect.clone() });
                out.push(row(&case.name, if problems.is_empty() { Outcome::Pass } else { Outcome::Fail(problems) }, None));
                continue;
            };
            // Each cluster answers this case's callouts as the case says, or as the file does.
            let answers = scenario.case_callouts(case);
            for (name, server) in &servers {
                if let Some(spec) = answers.get(name) {
                    server.set_answer(callout_answer(spec)?);
                }
            }
            if let Some(g) = &mut grpc {
                g.set_answers(&answers, &grpc_names)?;
            }
            let callouts_before: Vec<usize> = servers.iter().map(|(_, s)| s.count()).collect();
            let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
            let now = now_ms / 1000;
            let first_request_ms = *first_request_ms.get_or_insert(now_ms);
            let request = match build_request(spec, case.sign.as_ref(), now).and_then(|q| answered_by(q, case.upstream.as_ref()))
            {
                Ok(r) => r,
                Err(e) => {
                    out.push(row(&case.name, Outcome::Fail(vec![format!("{e:#}")]), None));
                    continue;
                }
            };
            upstream.set_answer(Answer::Respond(request.upstream.clone().unwrap_or_else(|| default_upstream.clone())));
            let before = upstream.count();
            let (status, response_headers, response_body) = if request.disconnect {
                send_and_disconnect(envoy.port, &request, &upstream, before)?
            } else {
                send(envoy.port, &request)?
            };
            // The upstream has the request before Envoy answers; allow its thread a moment.
            std::thread::sleep(Duration::from_millis(5));
            let got = upstream.since(before);
            let seen = got.first();
            let upstream_headers = seen.map(pseudo_headers).unwrap_or_default();
            let observed = Observed {
                status,
                error: serde_json::from_slice::<serde_json::Value>(&response_body)
                    .ok()
                    .and_then(|v| v.get("error")?.as_str().map(str::to_string)),
                forwarded: seen.is_some(),
                upstream_headers,
                upstream_body: seen.map(|r| r.body.clone()),
                upstream_trailers: seen.map(|r| r.trailers.clone()).unwrap_or_default(),
                response_headers,
                response_body,
                host_calls: None,
                ..Observed::default()
            };
            let (logs, trap) = log_since(&envoy.log, &mut log_offset);
            let mut observed = observed;
            observed.logs = Some(logs);
            observed.trap = Some(trap);
            let mut callouts = Vec::new();
            for ((name, server), before) in servers.iter().zip(&callouts_before) {
                for r in server.since(*before) {
                    callouts.push((name.clone(), pseudo_headers(&r)));
                }
            }
            if let Some(g) = &mut grpc {
                callouts.extend(g.take()?);
            }
            observed.callouts = Some(callouts);
            // Whole seconds Envoy's clock moved beyond what the host's fake one moved too.
            let answered_s = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            observed.clock_moved_s = answered_s.saturating_sub(first_request_ms.saturating_add(advanced_ms) / 1000);
            let problems = observed.check(&case.expect);
            out.push(row(&case.name, if problems.is_empty() { Outcome::Pass } else { Outcome::Fail(problems) }, Some(observed)));
        }
        drop(servers);
        let _ = &envoy.log;
        Ok(out)
    })();
    match result {
        Ok(rows) => rows,
        Err(e) => vec![row("(envoy)", Outcome::Fail(vec![format!("{e:#}")]), None)],
    }
}

/// How a callout cluster's test server answers `spec`.
fn callout_answer(spec: &CalloutSpec) -> Result<Answer> {
    spec.check()?;
    Ok(match spec {
        CalloutSpec::Respond { status, headers, .. } => Answer::Respond(Upstream {
            status: *status,
            headers: headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            body: spec.body()?,
            ..Upstream::default()
        }),
        CalloutSpec::Word(w) if w == "timeout" => Answer::Silence(Duration::from_secs(10)),
        CalloutSpec::Grpc { .. } => bail!("a gRPC answer for an HTTP cluster"),
        CalloutSpec::Word(_) => Answer::Reset,
    })
}

/// A request a test server received, its headers as the filters name them (`:method`, `:path`,
/// `:authority` for `host`).
fn pseudo_headers(r: &Received) -> Vec<(String, String)> {
    let mut headers = vec![(":method".to_string(), r.method.clone()), (":path".to_string(), r.path.clone())];
    headers.extend(r.headers.iter().map(|(k, v)| {
        if k == "host" {
            (":authority".to_string(), v.clone())
        } else {
            (k.clone(), v.clone())
        }
    }));
    headers
}

fn log_len(log: &Path) -> usize {
    std::fs::metadata(log).map(|m| m.len() as usize).unwrap_or(0)
}

/// The modules' log lines (level, message) Envoy wrote since `offset` (moved to the end), and
/// whether a VM trapped (proxy-wasm-cpp-host's `Function: ... failed` line).
fn log_since(log: &Path, offset: &mut usize) -> (Vec<(String, String)>, bool) {
    let bytes = std::fs::read(log).unwrap_or_default();
    let start = (*offset).min(bytes.len());
    // Only whole lines; a line being written is read next time.
    let end = bytes[start..].iter().rposition(|b| *b == b'\n').map(|i| start + i + 1).unwrap_or(start);
    *offset = end;
    let text = String::from_utf8_lossy(&bytes[start..end]);
    let mut lines = Vec::new();
    let mut trap = false;
    for line in text.lines() {
        if line.contains("Function: ") && line.contains(" failed") {
            trap = true;
        }
        lines.extend(wasm_log_line(line).or_else(|| native_log_line(line)));
    }
    (lines, trap)
}

/// The native module's lines (`envoy_dynamic_module_callback_log`, Envoy's `dynamic_modules`
/// logger): `[time][thread][level][dynamic_modules] [source:line] message`, where Envoy 1.40
/// gives the module's lines an empty source (`[:]`). The message is the module's line as it
/// wrote it, the same `firebreak <plugin> ...` text the wasm module hands `proxy_log`.
fn native_log_line(line: &str) -> Option<(String, String)> {
    let at = line.find("][dynamic_modules] ")?;
    let level = &line[line[..at].rfind('[')? + 1..at];
    let rest = &line[at + "][dynamic_modules] ".len()..];
    let message = match rest.strip_prefix('[') {
        Some(source) => source.split_once("] ")?.1,
        None => rest,
    };
    Some((level.to_string(), message.to_string()))
}

/// `[time][thread][level][wasm] [source:line] wasm log <plugin> <root_id> <vm_id>: message`.
fn wasm_log_line(line: &str) -> Option<(String, String)> {
    let at = line.find("][wasm] ")?;
    let level = &line[line[..at].rfind('[')? + 1..at];
    let rest = &line[line.find(" wasm log")? + " wasm log".len()..];
    let (_, message) = rest.split_once(": ")?;
    Some((level.to_string(), message.to_string()))
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" / ")
}

/// The gRPC callout clusters: `host-tests/grpc_upstream.py` (grpcio, in the project's .venv, or
/// `FIREBREAK_PYTHON`), one server per cluster, driven over its stdin and stdout.
struct GrpcUpstream {
    child: Child,
    stdin: std::process::ChildStdin,
    stdout: BufReader<std::process::ChildStdout>,
    ports: BTreeMap<String, u16>,
}

impl GrpcUpstream {
    fn start(clusters: &std::collections::BTreeSet<String>) -> Result<GrpcUpstream> {
        let root = crate::workspace_root();
        let python = std::env::var_os("FIREBREAK_PYTHON")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join(".venv/bin/python"));
        let mut child = Command::new(&python)
            .arg(root.join("host-tests/grpc_upstream.py"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| {
                format!("starting the gRPC test server with {} (bash scripts/setup.sh installs grpcio)", python.display())
            })?;
        let stdin = child.stdin.take().ok_or_else(|| anyhow!("gRPC test server: no stdin"))?;
        let stdout = BufReader::new(child.stdout.take().ok_or_else(|| anyhow!("gRPC test server: no stdout"))?);
        let mut g = GrpcUpstream { child, stdin, stdout, ports: BTreeMap::new() };
        let reply = g.command(&json!({ "clusters": clusters }))?;
        let ports = reply
            .get("ports")
            .and_then(|p| p.as_object())
            .ok_or_else(|| anyhow!("gRPC test server: no ports"))?;
        for (name, port) in ports {
            let port = port
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .ok_or_else(|| anyhow!("gRPC test server: bad port"))?;
            g.ports.insert(name.clone(), port);
        }
        Ok(g)
    }

    fn command(&mut self, command: &serde_json::Value) -> Result<serde_json::Value> {
        // One line out, one line back: the server answers every command.
        writeln!(self.stdin, "{command}")?;
        self.stdin.flush()?;
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("the gRPC test server exited (is grpcio installed? bash scripts/setup.sh)");
        }
        serde_json::from_str(&line).context("the gRPC test server's answer")
    }

    /// Sets each gRPC cluster's answer for the next case.
    fn set_answers(&mut self, answers: &BTreeMap<String, CalloutSpec>, grpc: &std::collections::BTreeSet<String>) -> Result<()> {
        let mut out = serde_json::Map::new();
        for name in grpc {
            let Some(CalloutSpec::Grpc { grpc: spec }) = answers.get(name) else {
                bail!("gRPC cluster {name:?}: a case answers it with an HTTP answer");
            };
            let a = spec.answer()?;
            out.insert(
                name.clone(),
                json!({
                    "status": a.status,
                    "message": a.message,
                    "body_b64": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &a.body),
                    "initial_metadata": a.initial_metadata,
                    "trailers": a.trailers,
                    "delay_ms": a.delay_ms,
                }),
            );
        }
        self.command(&json!({ "answers": out }))?;
        Ok(())
    }

    /// The calls the servers received since the last `take`: (cluster, headers as the filters
    /// name them: `:method`, `:path`, `:authority` (the cluster, as Envoy's gRPC client sets
    /// it), then the metadata).
    fn take(&mut self) -> Result<Vec<crate::scenario::ObservedCallout>> {
        let reply = self.command(&json!({ "take": true }))?;
        let mut out = Vec::new();
        for call in reply.get("calls").and_then(|c| c.as_array()).cloned().unwrap_or_default() {
            let cluster = call.get("cluster").and_then(|c| c.as_str()).unwrap_or_default().to_string();
            let mut headers = vec![
                (":method".to_string(), "POST".to_string()),
                (":path".to_string(), call.get("path").and_then(|c| c.as_str()).unwrap_or_default().to_string()),
                (":authority".to_string(), cluster.clone()),
            ];
            for pair in call.get("metadata").and_then(|m| m.as_array()).cloned().unwrap_or_default() {
                if let (Some(k), Some(v)) = (pair.get(0).and_then(|k| k.as_str()), pair.get(1).and_then(|v| v.as_str())) {
                    headers.push((k.to_string(), v.to_string()));
                }
            }
            out.push((cluster, headers));
        }
        Ok(out)
    }
}

impl Drop for GrpcUpstream {
    fn drop(&mut self) {
        // Its own child, by its handle.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
