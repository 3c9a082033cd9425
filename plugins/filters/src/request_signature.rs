//! request-signature: rejects unsigned, forged, tampered, stale and replayed requests on the
//! configured routes before they reach the money API. Decisions live in
//! `firebreak_core::signature`; this file only moves data between Envoy and the core.

use std::rc::Rc;

use firebreak_core::remote::{Backend, RedisConfig};
use firebreak_core::replay::body_sha256_from_content_digest;
use firebreak_core::signature::{
    claim_nonce, client_principal_copies, nonce_claim_answer, nonce_claim_command, nonce_ttl_ms, verify_body, verify_headers,
    RequestView, SigError, SignaturePolicy, VerifiedHeaders,
};
use firebreak_glue::{self as glue, Counters, HostStore};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

const PLUGIN: &str = "request_signature";

/// A fresh root context of this filter; `on_configure` reads its configuration.
pub fn root() -> Box<dyn RootContext> {
    Box::new(SignatureRoot { policy: None, counters: Rc::new(Counters::new("firebreak.request_signature")), debug_log: false })
}

struct SignatureRoot {
    policy: Option<Rc<SignaturePolicy>>,
    counters: Rc<Counters>,
    debug_log: bool,
}

impl Context for SignatureRoot {}

impl RootContext for SignatureRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        self.policy = glue::load_bound_config(
            PLUGIN,
            |json| SignaturePolicy::from_json(json, &glue::env_var),
            SignaturePolicy::bind_tables,
        )
        .map(Rc::new);
        self.counters.define_all(&["accepted", "passed_unprotected", "rejected.tenant_quota_exceeded"]);
        self.debug_log = glue::debug_enabled();
        self.policy.is_some()
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let policy = self.policy.clone()?;
        Some(Box::new(SignatureFilter { policy, counters: self.counters.clone(), pending: None, debug_log: self.debug_log }))
    }
}

struct SignatureFilter {
    policy: Rc<SignaturePolicy>,
    counters: Rc<Counters>,
    /// Headers verified; waiting for the nonce claim (Redis) and/or the end of the body.
    pending: Option<Pending>,
    debug_log: bool,
}

struct Pending {
    verified: VerifiedHeaders,
    content_digest: Option<String>,
    context: String,
    /// The request had no body (headers ended the stream).
    headers_only: bool,
    /// Token of the Redis claim callout still in flight.
    claim_token: Option<u32>,
}

impl SignatureFilter {
    fn fail(&mut self, error: SigError, context: &str) -> Action {
        self.pending = None;
        glue::reject(PLUGIN, &self.counters, &error.rejection(), context);
        Action::Pause
    }

    /// Nonce recorded: hand the verified principal to the upstream and to later filters.
    fn publish_principal(&mut self, key_id: &str, context: &str) -> Result<(), Action> {
        if glue::set_request_header(&self.policy.principal_header, Some(key_id)).is_err() || glue::set_principal(key_id).is_err()
        {
            return Err(self.fail(SigError::StateUnavailable, context));
        }
        Ok(())
    }

    /// The whole body is known (possibly empty): check it against the signed Content-Digest.
    fn finish(&mut self, pending: &Pending, body: &[u8]) -> Action {
        if let Err(error) = verify_body(&self.policy, &pending.verified, pending.content_digest.as_deref(), body) {
            return self.fail(error, &pending.context);
        }
        // The Content-Digest verified against the whole body: its sha-256 is the body's, and
        // replay-guard (later in this stream) fingerprints with it instead of hashing the body
        // again (between separate modules only for large bodies: BODY_SHA256_MIN_BYTES). A failed
        // publish only makes replay-guard hash the body itself.
        if pending.verified.covers_content_digest {
            if let Some(digest) = pending.content_digest.as_deref().and_then(body_sha256_from_content_digest) {
                let _ = glue::publish_body_sha256(&digest, body.len());
            }
        }
        self.counters.count_passed("accepted");
        // Accepted requests are logged only when Envoy's wasm log level is debug: a log call is a
        // host call, and the counter already records every acceptance.
        if self.debug_log {
            glue::log(LogLevel::Debug, &format!("firebreak {PLUGIN} accept {}", pending.context));
        }
        Action::Continue
    }

    fn finish_body(&mut self, pending: Pending, size: usize) -> Action {
        match glue::request_body(size) {
            Ok(body) if body.len() as u64 > self.policy.max_body_bytes => self.fail(SigError::BodyTooLarge, &pending.context),
            Ok(body) => self.finish(&pending, &body),
            Err(_) => self.fail(SigError::StateUnavailable, &pending.context),
        }
    }

    /// After the nonce is recorded: either finish now (no body) or let the body come.
    fn after_claim(&mut self, pending: Pending) -> Action {
        if let Err(action) = self.publish_principal(&pending.verified.key_id.clone(), &pending.context) {
            return action;
        }
        if pending.headers_only {
            return self.finish(&pending, &[]);
        }
        // Envoy's proxy-wasm turns a paused header callback into "stop everything", so the body
        // would never reach this filter: the headers continue, and the body is held (below) until
        // it is complete and verified. Envoy's `buffer` filter before this one makes the whole
        // request present before any filter forwards its headers (see README).
        self.pending = Some(pending);
        Action::Continue
    }

    /// Starts the Redis claim; the request waits for its answer.
    fn claim_remotely(&mut self, redis: &RedisConfig, mut pending: Pending) -> Action {
        // The nonce and the key id's quota, in one script.
        let Some(command) = nonce_claim_command(&self.policy, redis, &pending.verified, nonce_ttl_ms(&self.policy)) else {
            return self.after_claim(pending);
        };
        match glue::dispatch_webdis(redis, &command) {
            Ok(token) => {
                pending.claim_token = Some(token);
                self.pending = Some(pending);
                Action::Pause
            }
            Err(status) => self.state_unavailable(pending, &format!("dispatch failed: {status:?}")),
        }
    }

    /// Redis or its bridge did not answer usably: fail closed, always (`failure_mode: open` is
    /// refused at configuration: an unrecorded nonce is a replay that cannot be refused).
    fn state_unavailable(&mut self, pending: Pending, why: &str) -> Action {
        let context = format!("{} store_error={why:?}", pending.context);
        self.fail(SigError::StateUnavailable, &context)
    }
}

impl Context for SignatureFilter {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _trailers: usize) {
        let Some(pending) = self.pending.take() else { return };
        if pending.claim_token != Some(token) {
            self.pending = Some(pending);
            return;
        }
        let pending = Pending { claim_token: None, ..pending };
        let (status, body) = glue::http_call_response(body_size);
        let action = match nonce_claim_answer(status, &body) {
            Ok(Ok(())) => self.after_claim(pending),
            Ok(Err(refusal)) => self.fail(refusal, &pending.context),
            Err(error) => self.state_unavailable(pending, &error.to_string()),
        };
        if action == Action::Continue {
            // A failed resume leaves the request paused; Envoy's stream timeout then ends it.
            let _ = glue::resume_request();
        }
    }
}

impl HttpContext for SignatureFilter {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let headers = match glue::request_headers() {
            Ok(headers) => headers,
            Err(_) => return self.fail(SigError::Malformed("request headers (not UTF-8)"), ""),
        };
        let method = glue::header(&headers, ":method").unwrap_or("");
        let path_and_query = glue::header(&headers, ":path").unwrap_or("");
        let path = firebreak_core::route::split_path(path_and_query).0;
        let context = format!("method={method} path={path:?}");

        // Only this filter may assert a principal: a client-supplied copy, in any spelling (case,
        // `_` for `-`), never survives, on any route; on a protected route another spelling or a
        // duplicate is refused.
        let scope = self.policy.scope(method, path_and_query);
        if scope == firebreak_core::route::Scope::NotCanonical {
            glue::reject(PLUGIN, &self.counters, &firebreak_core::route::not_canonical_rejection(), &context);
            return Action::Pause;
        }
        let protected = scope.applies();
        let client_principal = match client_principal_copies(&self.policy, &headers, protected) {
            Ok(names) => names,
            Err((error, name)) => return self.fail(error, &format!("{context} header={name:?}")),
        };
        for name in client_principal {
            if glue::set_request_header(name, None).is_err() {
                return self.fail(SigError::StateUnavailable, &context);
            }
        }
        if !protected {
            self.counters.count_passed("passed_unprotected");
            return Action::Continue;
        }

        if let Some(length) = glue::header(&headers, "content-length") {
            match length.trim().parse::<u64>() {
                Ok(n) if n > self.policy.max_body_bytes => return self.fail(SigError::BodyTooLarge, &context),
                Ok(_) => {}
                Err(_) => return self.fail(SigError::Malformed("content-length"), &context),
            }
        }
        let Some(now) = glue::now_ms() else {
            return self.fail(SigError::StateUnavailable, &context);
        };
        let view = RequestView {
            method,
            scheme: glue::header(&headers, ":scheme").unwrap_or("http"),
            authority: glue::header(&headers, ":authority").unwrap_or(""),
            path_and_query,
            headers: &headers,
        };
        let verified = match verify_headers(&self.policy, &view, now) {
            Ok(verified) => verified,
            Err(error) => return self.fail(error, &format!("{context} {}", key_context(&view))),
        };
        let pending = Pending {
            context: format!("{context} keyid={}", verified.key_id),
            content_digest: glue::header(&headers, "content-digest").map(str::to_string),
            verified,
            headers_only: end_of_stream,
            claim_token: None,
        };
        // The nonce is claimed after the MAC verified and before anything goes upstream, so of N
        // concurrent copies of one signed request N-1 are refused before Envoy forwards a byte.
        match &self.policy.state {
            Backend::Local => match claim_nonce(&self.policy, &HostStore, &pending.verified, now) {
                Ok(()) => self.after_claim(pending),
                Err(error) => self.fail(error, &pending.context),
            },
            Backend::Redis(redis) => {
                let redis = redis.clone();
                self.claim_remotely(&redis, pending)
            }
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(pending) = self.pending.take() else { return Action::Continue };
        if body_size as u64 > self.policy.max_body_bytes {
            return self.fail(SigError::BodyTooLarge, &pending.context);
        }
        if !end_of_stream || pending.claim_token.is_some() {
            self.pending = Some(pending);
            return Action::Pause;
        }
        self.finish_body(pending, body_size)
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        // Trailers end the body: verify what was buffered.
        let Some(pending) = self.pending.take() else { return Action::Continue };
        if pending.claim_token.is_some() {
            self.pending = Some(pending);
            return Action::Pause;
        }
        let size = usize::try_from(self.policy.max_body_bytes).unwrap_or(usize::MAX).saturating_add(1);
        self.finish_body(pending, size)
    }
}

/// The key id the client claims, for the log line of a rejection (never a MAC or a secret).
fn key_context(view: &RequestView<'_>) -> String {
    let input = view.header_values("signature-input").next().unwrap_or("");
    let key_id = input
        .split("keyid=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .filter(|k| firebreak_core::signature::valid_key_id(k))
        .unwrap_or("-");
    format!("keyid={key_id}")
}
