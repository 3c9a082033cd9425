//! request-signature, returning early: the accepted path of `core::signature::flow` up to a step
//! (1 to 5, fixed by the build: `crate::STEP`), through core's public functions, with the host
//! calls the module makes up to there.
//! Every step continues the request; nothing is refused, counted or logged (a benchmark request
//! that would be refused simply goes on: the benchmark checks the full module's row for that).
//!
//! 1. the request header map (one `proxy_get_header_map_pairs`, as UTF-8 headers);
//! 2. the route (canonical scope), the client copies of the principal header, `content-length`,
//!    the clock (one `proxy_get_current_time_nanoseconds`);
//! 3. the signature parsed and checked up to the time check (`verify_headers` with a clock at 0:
//!    structure, parameters, components, coverage; it stops before the signature base and the MAC);
//! 4. `verify_headers` with the real clock: + the signature base and the HMAC-SHA256;
//! 5. `claim_nonce` in shared data (bucket reads and writes: the nonce table and the key id's quota).
//!
//! The rest of the full module (step 6, the real `request_signature.wasm`): publishing the
//! principal (a header and a property), the body's Content-Digest, the `accepted` counter, and the
//! engine's flow machinery around the steps.

use std::hint::black_box;
use std::rc::Rc;
use std::sync::Arc;

use firebreak_core::flow::{header, utf8_headers};
use firebreak_core::signature::{claim_nonce, client_principal_copies, verify_headers, RequestView, SignaturePolicy};
use firebreak_glue::{self as glue, HostStore};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MapType};

use crate::STEP;

pub fn root() -> Box<dyn RootContext> {
    Box::new(Root { policy: None })
}

struct Root {
    policy: Option<Arc<SignaturePolicy>>,
}

impl Context for Root {}

impl RootContext for Root {
    /// request-signature's own configuration, configured as its module does (tables bound).
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(json) = glue::plugin_configuration("bench_ladder") else { return false };
        let Some(entropy) = glue::random_32() else { return false };
        let mut policy = match firebreak_core::signature::SignaturePolicy::from_json(&json, &glue::env_var) {
            Ok(policy) => policy,
            Err(error) => {
                glue::log(LogLevel::Critical, &format!("bench_ladder config_error field={} {error}", error.field));
                return false;
            }
        };
        if let Err(error) = policy.bind_tables(&HostStore, entropy) {
            glue::log(LogLevel::Critical, &format!("bench_ladder config_error field={} {error}", error.field));
            return false;
        }
        glue::log(LogLevel::Info, &format!("bench_ladder configured: request-signature up to step {STEP}"));
        self.policy = Some(Arc::new(policy));
        true
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream { policy: self.policy.clone()? }))
    }
}

struct Stream {
    policy: Arc<SignaturePolicy>,
}

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        steps(&self.policy);
        Action::Continue
    }
}

/// The steps up to [`STEP`] (a constant of the build: the code after it is not in the module);
/// returns at the first that does not pass.
fn steps(policy: &SignaturePolicy) {
    // 1. The header map, as the engine's hosts read it (UTF-8, shared behind an Rc).
    let Ok(raw) = hostcalls::get_map_bytes(MapType::HttpRequestHeaders) else { return };
    let Ok(headers) = utf8_headers(raw) else { return };
    let headers = black_box(Rc::new(headers));
    if STEP < 2 {
        return;
    }
    // 2. Route, principal copies, content-length, clock.
    let method = header(&headers, ":method").unwrap_or("");
    let path_and_query = header(&headers, ":path").unwrap_or("");
    if !black_box(policy.scope(method, path_and_query)).applies() {
        return;
    }
    let Ok(copies) = client_principal_copies(policy, &headers, true) else { return };
    black_box(copies);
    if let Some(length) = header(&headers, "content-length") {
        match length.trim().parse::<u64>() {
            Ok(n) if n <= policy.max_body_bytes => {}
            _ => return,
        }
    }
    let Some(now) = glue::now_ms() else { return };
    if STEP < 3 {
        return;
    }
    let view = RequestView {
        method,
        scheme: header(&headers, ":scheme").unwrap_or("http"),
        authority: header(&headers, ":authority").unwrap_or(""),
        path_and_query,
        headers: &headers,
    };
    // 3. Parsed and checked up to the time check: a clock at 0 makes every signature one "from
    //    the future", refused before the signature base is built and the MAC computed.
    if STEP < 4 {
        let _ = black_box(verify_headers(policy, &view, black_box(0)));
        return;
    }
    // 4. + the signature base and the MAC.
    let Ok(verified) = verify_headers(policy, &view, now) else { return };
    let verified = black_box(verified);
    if STEP < 5 {
        return;
    }
    // 5. + the nonce claimed in shared data.
    let _ = black_box(claim_nonce(policy, &HostStore, &verified, now));
}
