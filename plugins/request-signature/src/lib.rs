//! request-signature: rejects unsigned, forged, tampered, stale and replayed requests on the
//! configured routes before they reach the money API. Decisions live in
//! `firebreak_core::signature`; this file only moves data between Envoy and the core.

use std::rc::Rc;

use firebreak_core::signature::{
    claim_nonce, verify_body, verify_headers, RequestView, SigError, SignaturePolicy, VerifiedHeaders,
};
use firebreak_core::Rejection;
use firebreak_glue::{self as glue, Counters, HostStore};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

const PLUGIN: &str = "request_signature";

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(SignatureRoot { policy: None, counters: Rc::new(Counters::new("firebreak.request_signature")) })
    });
}}

struct SignatureRoot {
    policy: Option<Rc<SignaturePolicy>>,
    counters: Rc<Counters>,
}

impl Context for SignatureRoot {}

impl RootContext for SignatureRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        self.policy = glue::load_config(PLUGIN, |json| SignaturePolicy::from_json(json, &glue::env_var)).map(Rc::new);
        self.counters.define_all(&["accepted", "passed_unprotected"]);
        self.policy.is_some()
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let policy = self.policy.clone()?;
        Some(Box::new(SignatureFilter { policy, counters: self.counters.clone(), pending: None }))
    }
}

struct SignatureFilter {
    policy: Rc<SignaturePolicy>,
    counters: Rc<Counters>,
    /// Headers verified, waiting for the end of the body.
    pending: Option<Pending>,
}

struct Pending {
    verified: VerifiedHeaders,
    content_digest: Option<String>,
    context: String,
}

impl Context for SignatureFilter {}

impl SignatureFilter {
    fn reject(&mut self, rejection: &Rejection, context: &str) -> Action {
        self.pending = None;
        glue::reject(PLUGIN, &self.counters, rejection, context);
        Action::Pause
    }

    fn fail(&mut self, error: SigError, context: &str) -> Action {
        self.reject(&error.rejection(), context)
    }

    /// Headers verified: record the nonce, then hand the principal to the upstream and to later
    /// filters. The nonce is claimed here, before any byte goes upstream, so of N concurrent
    /// copies of one signed request N-1 are refused before Envoy forwards anything.
    fn accept_headers(&mut self, verified: &VerifiedHeaders, context: &str) -> Result<(), Action> {
        let Some(now) = glue::now_ms() else {
            return Err(self.fail(SigError::StateUnavailable, context));
        };
        if let Err(error) = claim_nonce(&self.policy, &HostStore, verified, now) {
            return Err(self.fail(error, context));
        }
        if glue::set_request_header(&self.policy.principal_header, Some(&verified.key_id)).is_err()
            || glue::set_principal(&verified.key_id).is_err()
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
        self.counters.increment("accepted");
        glue::log(LogLevel::Debug, &format!("firebreak {PLUGIN} accept {}", pending.context));
        Action::Continue
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
        let context = format!("method={method} path={:?}", firebreak_core::route::split_path(path_and_query).0);

        // Only this filter may assert a principal: a client-supplied copy never survives, on any
        // route. Duplicates are refused below on protected routes before they are stripped.
        let client_principal = headers.iter().filter(|(n, _)| *n == self.policy.principal_header).count();
        let protected = self.policy.applies_to(method, firebreak_core::route::split_path(path_and_query).0);
        if protected && client_principal > 1 {
            return self.fail(SigError::DuplicateHeader(self.policy.principal_header.clone()), &context);
        }
        if client_principal > 0 && glue::set_request_header(&self.policy.principal_header, None).is_err() {
            return self.fail(SigError::StateUnavailable, &context);
        }
        if !protected {
            self.counters.increment("passed_unprotected");
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
        let context = format!("{context} keyid={}", verified.key_id);
        if let Err(action) = self.accept_headers(&verified, &context) {
            return action;
        }
        let pending = Pending {
            verified,
            content_digest: glue::header(&headers, "content-digest").map(str::to_string),
            context,
        };
        if end_of_stream {
            return self.finish(&pending, &[]);
        }
        // Envoy's proxy-wasm turns a paused header callback into "stop everything", so the body
        // would never reach this filter: the headers continue, and the body is held (below) until
        // it is complete and verified. Put Envoy's `buffer` filter before this one so that the
        // whole request is in hand before any filter forwards its headers (see README).
        self.pending = Some(pending);
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(pending) = self.pending.take() else { return Action::Continue };
        if body_size as u64 > self.policy.max_body_bytes {
            return self.fail(SigError::BodyTooLarge, &pending.context);
        }
        if !end_of_stream {
            self.pending = Some(pending);
            return Action::Pause;
        }
        self.finish_body(pending, body_size)
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        // Trailers end the body: verify what was buffered.
        let Some(pending) = self.pending.take() else { return Action::Continue };
        let size = usize::try_from(self.policy.max_body_bytes).unwrap_or(usize::MAX).saturating_add(1);
        self.finish_body(pending, size)
    }
}

impl SignatureFilter {
    fn finish_body(&mut self, pending: Pending, size: usize) -> Action {
        match glue::request_body(size) {
            Ok(body) if body.len() as u64 > self.policy.max_body_bytes => self.fail(SigError::BodyTooLarge, &pending.context),
            Ok(body) => self.finish(&pending, &body),
            Err(_) => self.fail(SigError::StateUnavailable, &pending.context),
        }
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
