//! Scenario files: a module, its configuration, requests and the verdicts they must get.
//! The same file runs in the test host and through real Envoy (see [`crate::envoy`]).
//!
//! ```yaml
//! name: replay guard rejects a reused nonce
//! module: ../../target/wasm32-wasip1/release/request_signature.wasm  # relative to this file
//! plugin:
//!   root_id: ""
//!   configuration: { keys: [...] }      # a mapping is sent as JSON; a string as is
//!   env: { FIREBREAK_KEY: "..." }       # vm_config.environment_variables
//! workers: 2
//! upstream: { status: 200, headers: { content-type: application/json }, body: '{"ok":true}' }
//! callouts: { authz: { status: 200, body: granted } }   # or fail | timeout | reset | hold
//!   # grpc_check: { grpc: { status: 0, message: "", body: ok, initial_metadata: {}, trailers: {} } }
//! buffer_limit_bytes: 1048576           # Envoy's per-stream buffer limit (the default)
//! expect_start: ok                      # or fail: on_configure refuses the configuration
//! cases:
//!   - name: signed request is forwarded
//!     request: { method: POST, path: /pay, headers: { x-a: "1" }, body: '{"amount":1}' }
//!     sign: { key_id: k1, secret_b64: c2VjcmV0, nonce: n-1, created_offset: 0 }
//!     expect: { status: 200, forwarded: true, upstream_headers: { x-a: "1", x-gone: null } }
//!   - name: the upstream answers this case its own way
//!     request: { method: POST, path: /pay, body_base64: H4sI..., trailers: { x-t: "1" } }
//!     upstream: { status: 503, body: oops }   # or delay_ms: 1500 (past route_timeout_ms), reset: true
//!     expect: { status: 503, response_body: oops, upstream_trailers: { x-t: "1" } }
//!   - name: host-only steps
//!     host_only: needs the fake clock
//!     advance_ms: 60000                 # real_time: true waits that long in Envoy instead
//!     request: { path: / }              # body_bytes: N for a large body
//!     expect: { status: 401, error: signature_expired }
//! ```

mod report;
mod run;
mod schema;

pub use report::*;
pub use run::*;
pub use schema::*;
