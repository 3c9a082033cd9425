//! request-signature's flow: when it reads the headers, where it claims the nonce (the shared
//! data, or Redis through [`Calls`]), when it publishes the principal, how it holds the body until
//! it is complete, and how a failure becomes a reply with its counters and log lines. The
//! decisions it calls are in [`super::verify`]; a host only applies the [`Step`]s.
//!
//! One request, top to bottom:
//! 1. Headers. A path that is not canonical is refused. Every client copy of the principal header
//!    is removed (on a protected route another spelling or a duplicate is refused). A request
//!    outside the protected scope passes (`passed_unprotected`). Otherwise: a `content-length` over
//!    `max_body_bytes` is refused, the signature is verified (MAC, time, coverage), then the nonce
//!    is claimed: in the shared data at once, or on Redis (the request is held until the answer;
//!    an unusable answer fails closed, always). Once it is recorded the principal is published
//!    (request header and fact). A request without a body is finished at once; otherwise the
//!    headers continue and the body is held.
//! 2. Body chunks are held until the last one; a body over `max_body_bytes` is refused; the whole
//!    body is then checked against the signed `Content-Digest` (`accepted`).
//! 3. Trailers end the body: what was buffered is checked.

use std::fmt::Display;
use std::sync::Arc;

use crate::flow::calls::Calls;
use crate::flow::{
    header, read_request_body, refuse, reject, CallId, Event, Flow, FlowFactory, Host, Level, Meter, RequestContext, Step,
};
use crate::remote::{Backend, RedisConfig};
use crate::replay::body_sha256_from_content_digest;
use crate::route::{not_canonical_rejection, split_path, Scope};
use crate::Mode;

use super::{
    claim_nonce, client_principal_copies, nonce_claim_answer, nonce_claim_command, nonce_ttl_ms, valid_key_id, verify_body,
    verify_headers, RequestView, SigError, SignaturePolicy, VerifiedHeaders,
};

/// The log lines' plugin name.
pub const PLUGIN: &str = "request_signature";

/// Counters defined up front (shown as 0 before the first request).
pub const COUNTERS: &[&str] = &["accepted", "passed_unprotected", "rejected.tenant_quota_exceeded"];

/// Where request-signature's counters and log lines go.
pub fn meter() -> Meter {
    Meter::new(PLUGIN, "firebreak.request_signature")
}

/// request-signature's flow for one request.
pub struct SignatureFlow {
    policy: Arc<SignaturePolicy>,
    meter: Meter,
    /// Headers verified; waiting for the nonce claim (Redis) and/or the end of the body.
    pending: Option<Pending>,
    /// The Redis claim still in flight (at most one); what it is for is `pending`.
    claims: Calls<()>,
}

struct Pending {
    verified: VerifiedHeaders,
    content_digest: Option<String>,
    /// The request had no body (headers ended the stream).
    headers_only: bool,
    /// `method=.. path=".."`, read with the headers: once they continue, a wasm host (Envoy)
    /// no longer hands them to the body's events or a callout's answer.
    request: String,
}

impl SignatureFlow {
    pub fn new(policy: Arc<SignaturePolicy>) -> Self {
        SignatureFlow { policy, meter: meter(), pending: None, claims: Calls::default() }
    }
}

impl Flow for SignatureFlow {
    fn on_event(&mut self, event: Event, host: &mut dyn Host) -> Step {
        match event {
            Event::RequestHeaders { end_of_stream } => self.headers(host, end_of_stream),
            Event::RequestBody { buffered, end_of_stream } => self.body(host, buffered, end_of_stream),
            Event::RequestTrailers => self.trailers(host),
            Event::CallAnswer { call, body_size } => self.claim_answer(host, call, body_size),
            _ => Step::Continue,
        }
    }
}

impl SignatureFlow {
    fn headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> Step {
        let headers = match host.request_headers() {
            Ok(headers) => headers,
            Err(_) => {
                let step = self.fail(host, SigError::Malformed("request headers (not UTF-8)"), &"");
                return self.unverified(host, step);
            }
        };
        let method = header(&headers, ":method").unwrap_or("");
        let path_and_query = header(&headers, ":path").unwrap_or("");
        let path = split_path(path_and_query).0;
        // Formatted only when a line is written.
        let context = RequestContext { method, path };

        // Only this filter may assert a principal: a client-supplied copy, in any spelling (case,
        // `_` for `-`), never survives, on any route; on a protected route another spelling or a
        // duplicate is refused.
        let scope = self.policy.scope(method, path_and_query);
        if scope == Scope::NotCanonical {
            let refused =
                refuse(host, &self.meter, self.policy.mode, Level::Warn, not_canonical_rejection(), &context.to_string());
            return self.unverified(host, refused.unwrap_or(Step::Continue));
        }
        let protected = scope.applies();
        let client_principal = match client_principal_copies(&self.policy, &headers, protected) {
            Ok(names) => names,
            Err((error, name)) => {
                let step = self.fail(host, error, &format!("{context} header={name:?}"));
                return self.unverified(host, step);
            }
        };
        for name in client_principal {
            if host.set_request_header(name, None).is_err() {
                // Never forwarded with a client's principal, in either mode.
                return self.fail_closed(host, SigError::StateUnavailable, &context);
            }
        }
        if !protected {
            host.count_passed(&self.meter, "passed_unprotected");
            return Step::Continue;
        }

        if let Some(length) = header(&headers, "content-length") {
            match length.trim().parse::<u64>() {
                Ok(n) if n > self.policy.max_body_bytes => return self.fail(host, SigError::BodyTooLarge, &context),
                Ok(_) => {}
                Err(_) => return self.fail(host, SigError::Malformed("content-length"), &context),
            }
        }
        let Some(now) = host.now_ms() else {
            return self.fail(host, SigError::StateUnavailable, &context);
        };
        let view = RequestView {
            method,
            scheme: header(&headers, ":scheme").unwrap_or("http"),
            authority: header(&headers, ":authority").unwrap_or(""),
            path_and_query,
            headers: &headers,
        };
        let verified = match verify_headers(&self.policy, &view, now) {
            Ok(verified) => verified,
            Err(error) => return self.fail(host, error, &format!("{context} {}", key_context(&view))),
        };
        // What outlives this callback (a body to wait for, a Redis claim) is copied; a request
        // decided now reads the headers in place and formats its line only when one is written.
        let kept = !(end_of_stream && policy_is_local(&self.policy));
        let read = InCallback { request: &context, content_digest: header(&headers, "content-digest") };
        let pending = Pending {
            content_digest: if kept { header(&headers, "content-digest").map(str::to_string) } else { None },
            verified,
            headers_only: end_of_stream,
            request: if kept { context.to_string() } else { String::new() },
        };
        // The nonce is claimed after the MAC verified and before anything goes upstream, so of N
        // concurrent copies of one signed request N-1 are refused before Envoy forwards a byte.
        let policy = self.policy.clone();
        match &policy.state {
            Backend::Local => match claim_nonce(&policy, host.store(), &pending.verified, now) {
                Ok(()) => self.after_claim(host, pending, Some(read)),
                Err(error) => self.fail_verified(host, error, &pending, &context),
            },
            Backend::Redis(redis) => self.claim_remotely(host, redis, pending),
        }
    }

    fn body(&mut self, host: &mut dyn Host, buffered: usize, end_of_stream: bool) -> Step {
        let Some(pending) = self.pending.take() else { return Step::Continue };
        if buffered as u64 > self.policy.max_body_bytes {
            return self.fail_verified(host, SigError::BodyTooLarge, &pending, &pending.request);
        }
        if !end_of_stream || self.claims.waiting() {
            self.pending = Some(pending);
            return Step::Hold;
        }
        self.finish_body(host, pending, buffered)
    }

    fn trailers(&mut self, host: &mut dyn Host) -> Step {
        // Trailers end the body: verify what was buffered.
        let Some(pending) = self.pending.take() else { return Step::Continue };
        if self.claims.waiting() {
            self.pending = Some(pending);
            return Step::Hold;
        }
        let size = usize::try_from(self.policy.max_body_bytes).unwrap_or(usize::MAX).saturating_add(1);
        self.finish_body(host, pending, size)
    }

    /// The answer of the Redis claim: the nonce is recorded (go on), refused (a replay, the key
    /// id's quota), or the answer is unusable (fail closed).
    fn claim_answer(&mut self, host: &mut dyn Host, call: CallId, body_size: usize) -> Step {
        // The whole answer is read, whatever its size (as the bridge's answer always was).
        let Some(((), delivered)) = self.claims.deliver(host, call, body_size, usize::MAX) else { return Step::Hold };
        let Some(pending) = self.pending.take() else { return Step::Hold };
        let answer = match delivered {
            Ok(answer) => answer,
            Err(error) => return self.state_unavailable(host, pending, &error.to_string()),
        };
        // A Continue resumes the request this flow held; a failed resume leaves it paused and
        // Envoy's stream timeout then ends it.
        match nonce_claim_answer(answer.status, &answer.body) {
            Ok(Ok(())) => self.after_claim(host, pending, None),
            Ok(Err(refusal)) => self.fail_verified(host, refusal, &pending, &pending.request),
            Err(error) => self.state_unavailable(host, pending, &error.to_string()),
        }
    }

    /// Refuses the request (one log line, the `rejected.<code>` counters) and forgets it: a claim
    /// still in flight is answered to nobody. In report-only mode the refusal is counted
    /// (`would_reject.<code>`) and logged instead, and the request goes on as one this filter did
    /// not verify: no principal is handed on, nothing more is checked.
    fn fail(&mut self, host: &mut dyn Host, error: SigError, context: &dyn Display) -> Step {
        self.pending = None;
        self.claims = Calls::default();
        refuse(host, &self.meter, self.policy.mode, Level::Warn, error.rejection(), &context.to_string())
            .unwrap_or(Step::Continue)
    }

    /// Refuses the request in either mode: a host failure that would let a client's principal
    /// through, or leave ours half handed on.
    fn fail_closed(&mut self, host: &mut dyn Host, error: SigError, context: &dyn Display) -> Step {
        self.pending = None;
        self.claims = Calls::default();
        reject(host, &self.meter, Level::Warn, error.rejection(), &context.to_string())
    }

    /// After a header-time refusal that came before the client's principal copies were removed:
    /// in report-only mode (`step` is `Continue`) the request goes on, but never with one of them
    /// (removed here, in any spelling; a removal that fails refuses the request).
    fn unverified(&mut self, host: &mut dyn Host, step: Step) -> Step {
        if step != Step::Continue {
            return step;
        }
        let Ok(headers) = host.request_headers_lossy() else {
            return self.fail_closed(host, SigError::StateUnavailable, &"principal_unremovable");
        };
        let names: Vec<String> = client_principal_copies(&self.policy, &headers, false)
            .map(|names| names.into_iter().map(str::to_string).collect())
            .unwrap_or_default();
        for name in names {
            if host.set_request_header(&name, None).is_err() {
                return self.fail_closed(host, SigError::StateUnavailable, &"principal_unremovable");
            }
        }
        Step::Continue
    }

    /// Refuses a request whose headers verified, with their context (read again: a refusal is
    /// the only time it is written).
    /// `request`: the request's line (`pending.request`, or the headers' own while they are read).
    fn fail_verified(&mut self, host: &mut dyn Host, error: SigError, pending: &Pending, request: &dyn Display) -> Step {
        let context = verified_context(request, pending);
        self.fail(host, error, &context)
    }

    /// Nonce recorded: hand the verified principal to the upstream and to later filters.
    fn publish_principal(&mut self, host: &mut dyn Host, pending: &Pending, request: &dyn Display) -> Result<(), Step> {
        let key_id = pending.verified.key_id.as_str();
        if host.set_request_header(&self.policy.principal_header, Some(key_id)).is_err() || host.set_principal(key_id).is_err() {
            // Refused in either mode: the principal may be half handed on.
            let context = verified_context(request, pending);
            return Err(self.fail_closed(host, SigError::StateUnavailable, &context));
        }
        Ok(())
    }

    /// The whole body is known (possibly empty) and was checked against the signed
    /// Content-Digest (`checked`: its size, or why it does not match).
    fn finish(&mut self, host: &mut dyn Host, pending: &Pending, checked: Result<usize, SigError>, read: InCallback<'_>) -> Step {
        let InCallback { request, content_digest } = read;
        let body_len = match checked {
            Ok(body_len) => body_len,
            Err(error) => return self.fail_verified(host, error, pending, request),
        };
        // The Content-Digest verified against the whole body: its sha-256 is the body's, and
        // replay-guard (later in this stream) fingerprints with it instead of hashing the body
        // again (between separate modules only for large bodies: BODY_SHA256_MIN_BYTES). A failed
        // publish only makes replay-guard hash the body itself.
        if pending.verified.covers_content_digest {
            if let Some(digest) = content_digest.and_then(body_sha256_from_content_digest) {
                host.set_body_sha256(&digest, body_len);
            }
        }
        host.count_passed(&self.meter, "accepted");
        // Accepted requests are logged only when Envoy's wasm log level is debug: a log call is a
        // host call, and the counter already records every acceptance.
        if host.logs_debug() {
            let line = format!("firebreak {PLUGIN} accept {}", verified_context(request, pending));
            host.log(Level::Debug, &line);
        }
        Step::Continue
    }

    fn finish_body(&mut self, host: &mut dyn Host, pending: Pending, size: usize) -> Step {
        // The body's chunks as the host holds them, hashed in place.
        let policy = &self.policy;
        let checked = read_request_body(host, size, |body| {
            let body_len = body.len();
            verify_body(policy, &pending.verified, pending.content_digest.as_deref(), body).map(|()| body_len)
        });
        match checked {
            Ok(checked) => self.finish(host, &pending, checked, pending.kept()),
            Err(_) => self.fail_verified(host, SigError::StateUnavailable, &pending, &pending.request),
        }
    }

    /// After the nonce is recorded: either finish now (no body) or let the body come.
    /// `read`: the headers' own while they are read (`None`: what the pending request kept).
    fn after_claim(&mut self, host: &mut dyn Host, pending: Pending, read: Option<InCallback<'_>>) -> Step {
        let read = read.unwrap_or_else(|| pending.kept());
        if let Err(step) = self.publish_principal(host, &pending, read.request) {
            return step;
        }
        if pending.headers_only {
            let checked = verify_body(&self.policy, &pending.verified, read.content_digest, b"").map(|()| 0);
            return self.finish(host, &pending, checked, read);
        }
        // Envoy's proxy-wasm turns a paused header callback into "stop everything", so the body
        // would never reach this filter: the headers continue, and the body is held (below) until
        // it is complete and verified. Envoy's `buffer` filter before this one makes the whole
        // request present before any filter forwards its headers (see README).
        self.pending = Some(pending);
        Step::Continue
    }

    /// Starts the Redis claim; the request waits for its answer.
    fn claim_remotely(&mut self, host: &mut dyn Host, redis: &RedisConfig, pending: Pending) -> Step {
        // The nonce and the key id's quota, in one script.
        let Some(command) = nonce_claim_command(&self.policy, redis, &pending.verified, nonce_ttl_ms(&self.policy)) else {
            return self.after_claim(host, pending, None);
        };
        match self.claims.start(host, redis, &command, ()) {
            Ok(()) => {
                self.pending = Some(pending);
                Step::Hold
            }
            // The host names no reason (the proxy-wasm status is not carried through `Host`).
            Err(((), _)) => self.state_unavailable(host, pending, "dispatch failed"),
        }
    }

    /// Redis or its bridge did not answer usably: fail closed, always (`failure_mode: open` is
    /// refused at configuration: an unrecorded nonce is a replay that cannot be refused).
    fn state_unavailable(&mut self, host: &mut dyn Host, pending: Pending, why: &str) -> Step {
        let context = format!("{} store_error={why:?}", verified_context(&pending.request, &pending));
        self.fail(host, SigError::StateUnavailable, &context)
    }
}

/// `method=.. path=".." keyid=..` of a request whose headers verified.
fn verified_context(request: &dyn Display, pending: &Pending) -> String {
    format!("{request} keyid={}", pending.verified.key_id)
}

/// A request's line and Content-Digest: read from the headers during their callback, or what a
/// pending request kept of them.
#[derive(Clone, Copy)]
struct InCallback<'a> {
    request: &'a dyn Display,
    content_digest: Option<&'a str>,
}

impl Pending {
    fn kept(&self) -> InCallback<'_> {
        InCallback { request: &self.request, content_digest: self.content_digest.as_deref() }
    }
}

fn policy_is_local(policy: &SignaturePolicy) -> bool {
    matches!(policy.state, Backend::Local)
}

/// The key id the client claims, for the log line of a rejection (never a MAC or a secret).
fn key_context(view: &RequestView<'_>) -> String {
    let input = view.header_values("signature-input").next().unwrap_or("");
    let key_id = input
        .split("keyid=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .filter(|k| valid_key_id(k))
        .unwrap_or("-");
    format!("keyid={key_id}")
}

/// What the nonce quota lets one key id do, for the operator sizing `nonce_store`: its nonces
/// per window and the sustained rate of signed requests that makes (a busier key id is refused
/// `tenant_quota_exceeded`).
fn nonce_quota_line(policy: &SignaturePolicy) -> String {
    let quota = &policy.nonce_quota;
    let window_s = (quota.window_ms.get() / 1000).max(1);
    let per_second = u64::from(quota.limit.get()) / window_s;
    format!(
        "firebreak {PLUGIN} nonce_quota per_key_id={} window_s={window_s} sustained_per_key_id_per_s={per_second} lease={}",
        quota.limit, quota.lease
    )
}

/// request-signature, configured (its tables bound).
pub struct SignatureFactory {
    pub policy: Arc<SignaturePolicy>,
}

impl FlowFactory for SignatureFactory {
    fn new_flow(&self) -> Box<dyn Flow> {
        Box::new(SignatureFlow::new(self.policy.clone()))
    }

    fn meter(&self) -> Meter {
        meter()
    }

    fn counters(&self) -> Vec<String> {
        let mut names: Vec<String> = COUNTERS.iter().map(|name| name.to_string()).collect();
        if self.policy.mode == Mode::ReportOnly {
            names.extend(crate::would_reject_counter_names());
        }
        names
    }

    fn configured(&self) -> Vec<(Level, String)> {
        // `firebreak request_signature configured` is the host's line (`glue::load_config`).
        let mut lines = vec![(Level::Info, nonce_quota_line(&self.policy))];
        if self.policy.mode == Mode::ReportOnly {
            lines.push((Level::Warn, format!("firebreak {PLUGIN} mode=report_only nothing_refused")));
        }
        lines
    }

    /// The nonce table and its per-tenant quota records (local state only).
    fn stores(&self) -> Vec<crate::flow::fill::StoreTable> {
        use crate::flow::fill::StoreTable;
        if self.policy.state != crate::remote::Backend::Local {
            return Vec::new();
        }
        vec![
            StoreTable::new(meter(), "nonces", &self.policy.nonce_table),
            StoreTable::new(meter(), "nonce_quotas", &self.policy.nonce_quota.table),
        ]
    }
}

/// Configures request-signature ([`crate::filters::Configure`]): parses the configuration (keys
/// from `secret_env` through `setup.env`) and binds its local tables.
pub fn configure(json: &[u8], setup: &crate::filters::Setup<'_>) -> Result<Arc<dyn FlowFactory>, crate::ConfigError> {
    let mut policy = SignaturePolicy::from_json(json, setup.env)?;
    policy.bind_tables(setup.store, setup.entropy)?;
    Ok(Arc::new(SignatureFactory { policy: Arc::new(policy) }))
}
