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

#[cfg(test)]
mod tests {
    //! The ladder's cut between steps 3 and 4 relies on the order of `verify_headers`: the time
    //! check comes before the signature base and the MAC. If the engine ever checks the MAC first,
    //! step 3 would measure the MAC too: these tests fail first.

    use firebreak_core::signature::{sign, verify_headers, RequestView, SigError, SignRequest, SignaturePolicy};

    const SECRET: &[u8] = b"demo-client-secret-do-not-use-in-production!";
    const CREATED: u64 = 1_790_000_000;

    fn policy() -> SignaturePolicy {
        let json = br#"{"routes": [{"methods": ["POST"], "path_prefix": "/v1/"}],
            "keys": [{"id": "demo-client", "secret_base64": "ZGVtby1jbGllbnQtc2VjcmV0LWRvLW5vdC11c2UtaW4tcHJvZHVjdGlvbiE="}],
            "max_age_seconds": 300, "future_skew_seconds": 5, "max_body_bytes": 65536}"#;
        SignaturePolicy::from_json(json, &|_| None).unwrap()
    }

    /// The headers of a signed `POST /v1/transfers` (signed with `secret`).
    fn signed(secret: &[u8]) -> Vec<(String, String)> {
        let headers = vec![("content-type".to_string(), "application/json".to_string())];
        let request = SignRequest {
            method: "POST",
            scheme: "http",
            authority: "bench.firebreak",
            path_and_query: "/v1/transfers",
            headers: &headers,
            body: b"",
            key_id: "demo-client",
            secret,
            created: CREATED,
            expires: None,
            nonce: Some("n-1"),
            label: "sig1",
            components: None,
            extra_covered_headers: &[],
        };
        let mut all = headers.clone();
        all.extend(sign(&request).unwrap().pairs());
        all
    }

    fn verify(headers: &[(String, String)], now_ms: u64) -> Result<(), SigError> {
        let view = RequestView {
            method: "POST",
            scheme: "http",
            authority: "bench.firebreak",
            path_and_query: "/v1/transfers",
            headers,
        };
        verify_headers(&policy(), &view, now_ms).map(|_| ())
    }

    #[test]
    fn a_clock_at_zero_stops_verification_before_the_mac() {
        let good = signed(SECRET);
        assert_eq!(verify(&good, CREATED * 1000), Ok(()));
        assert_eq!(verify(&good, 0), Err(SigError::FromFuture));
        // A wrong MAC is found only with the real clock: at 0 the time check refused it first.
        let mut forged = good.clone();
        let other = signed(b"another-secret-of-the-same-length-as-the-one");
        for (name, value) in &mut forged {
            if name == "signature" {
                *value = other.iter().find(|(n, _)| n == "signature").unwrap().1.clone();
            }
        }
        assert_eq!(verify(&forged, CREATED * 1000), Err(SigError::InvalidSignature));
        assert_eq!(verify(&forged, 0), Err(SigError::FromFuture));
    }
}
