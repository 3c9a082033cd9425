//! Firebreak's proxy-wasm test host: the host side of proxy-wasm ABI 0.2.1 on wasmtime, with
//! Envoy's semantics (shared data CAS, header maps, buffering, local replies, traps, callouts),
//! several workers over one shared-data store with test-chosen interleavings, a fake clock per
//! host, and a scenario runner that also replays the same scenarios through real Envoy.
//!
//! ```no_run
//! use firebreak_host_tests::{Host, Module, Request};
//! let module = Module::load("target/wasm32-wasip1/release/request_signature.wasm").unwrap();
//! let mut host = Host::builder(&module).config(r#"{"keys": []}"#).start().unwrap();
//! let verdict = host.send(Request::post("/pay").body("{}"));
//! assert_eq!(verdict.status, 401);
//! ```

pub mod abi;
mod chain;
pub mod envoy;
mod host;
mod http;
pub mod runner;
pub mod scenario;
mod vm;
mod world;

pub use abi::{Action, Status};
pub use chain::Chain;
pub use host::{
    hcm_normalize, Host, HostBuilder, Module, PluginSpec, StartError, DEFAULT_BUFFER_LIMIT_BYTES, DEFAULT_ROUTE_TIMEOUT_MS,
};
pub use http::{
    Callout, CalloutReply, GrpcAnswer, GrpcReply, LocalReply, Request, RouterAnswer, Upstream, UpstreamRequest, Verdict,
    VIA_UPSTREAM,
};
pub use vm::{Strict, HOST_FUNCTIONS};
pub use world::{MetricKind, DEFAULT_START_NANOS};

/// The workspace root (where `target/` lives), found from this crate's manifest directory.
pub fn workspace_root() -> std::path::PathBuf {
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}
