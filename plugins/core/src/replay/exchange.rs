//! One request/response exchange through the replay guard, in the order a proxy sees it.
//!
//! 1. [`Exchange::begin`]: header-time checks (route, `Idempotency-Key`, principal, length);
//! 2. [`Exchange::claim_request`]: once the whole body is in hand, the fingerprint and the claim;
//! 3. [`Exchange::on_claim`]: the store's answer (now or later) becomes forward / reject / replay;
//! 4. [`Exchange::on_response_headers`] / [`Exchange::on_response_body`]: capture the answer;
//! 5. [`Exchange::finish`]: what the answer proves, written back to the record.

use sfv::{BareItem, Item, Parser};
use sha2::{Digest, Sha256};

use crate::store::{KeyHash, KeyHasher};
use crate::{Code, Rejection};

use super::config::{KeyMode, OnUncertain, ReplayPolicy};
use super::record::StoredResponse;
use super::state::{ClaimAnswer, ClaimRequest, FinishRequest, Outcome, Owner, StateError};

/// The request header carrying the key (draft-ietf-httpapi-idempotency-key-header).
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// Response header naming the original status when a completed response cannot be replayed.
pub const ORIGINAL_STATUS_HEADER: &str = "x-firebreak-original-status";

/// Every way the guard refuses a request. Mapped to status and code in [`ReplayError::rejection`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayError {
    /// A spelling of the path that could reach a protected route is not canonical (crate::route).
    PathNotCanonical,
    KeyMissing,
    KeyDuplicated,
    KeyInvalid(&'static str),
    PrincipalRequired,
    BodyTooLarge,
    Mismatch,
    InFlight,
    OutcomeUnknown,
    Duplicate,
    NotStored {
        status: u16,
    },
    StoreFull,
    TenantQuotaExceeded,
    StateUnavailable,
    /// The cluster-wide store (Redis) did not answer usably in time: never forwarded unchecked.
    RemoteUnavailable,
    OperatorForbidden,
    ClearRequestInvalid(&'static str),
    ClearNotFound,
    ClearRefused(&'static str),
}

impl ReplayError {
    /// The rejection code (status, code string, default message: [`Code`]).
    pub fn code(&self) -> Code {
        use ReplayError::*;
        match self {
            PathNotCanonical => Code::PathNotCanonical,
            KeyMissing => Code::IdempotencyKeyMissing,
            KeyDuplicated => Code::IdempotencyKeyDuplicated,
            KeyInvalid(_) => Code::IdempotencyKeyInvalid,
            PrincipalRequired => Code::PrincipalRequired,
            BodyTooLarge => Code::BodyTooLarge,
            Mismatch => Code::IdempotencyKeyMismatch,
            InFlight => Code::RequestInFlight,
            OutcomeUnknown => Code::OutcomeUnknown,
            Duplicate => Code::DuplicateRequest,
            NotStored { .. } => Code::ResponseNotStored,
            StoreFull => Code::ReplayStoreFull,
            TenantQuotaExceeded => Code::TenantQuotaExceeded,
            StateUnavailable => Code::ReplayStateUnavailable,
            RemoteUnavailable => Code::StateUnavailable,
            OperatorForbidden => Code::OperatorForbidden,
            ClearRequestInvalid(_) => Code::ClearRequestInvalid,
            ClearNotFound => Code::KeyNotFound,
            ClearRefused(_) => Code::KeyNotClearable,
        }
    }

    pub fn rejection(&self) -> Rejection {
        use ReplayError::*;
        let rejection = Rejection::new(self.code());
        match self {
            KeyInvalid(why) => rejection.with_message(format!("Idempotency-Key {why}")),
            InFlight | StoreFull => rejection.with_header("retry-after", "1"),
            NotStored { status } => rejection
                .with_message(format!("the request with this Idempotency-Key completed with status {status}; its response was not stored and the operation is not repeated"))
                .with_header(ORIGINAL_STATUS_HEADER, status.to_string()),
            TenantQuotaExceeded => rejection
                .with_message("this principal has claimed its quota of idempotency records for the current window; retry later"),
            RemoteUnavailable => rejection
                .with_message("the cluster-wide idempotency store is unreachable or did not answer in time; the request was not forwarded")
                .with_header("retry-after", "1"),
            ClearRequestInvalid(why) => rejection.with_message(format!("clear request: {why}")),
            ClearRefused(state) => rejection.with_message(format!("the key is {state}; only outcome_unknown keys can be cleared")),
            _ => rejection,
        }
    }
}

impl From<StateError> for ReplayError {
    fn from(error: StateError) -> Self {
        match error {
            StateError::Full => ReplayError::StoreFull,
            StateError::Unavailable => ReplayError::StateUnavailable,
            StateError::Remote => ReplayError::RemoteUnavailable,
            StateError::QuotaExceeded => ReplayError::TenantQuotaExceeded,
        }
    }
}

/// The request as the guard sees it at header time.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    pub method: &'a str,
    /// `:path` including the query.
    pub path_and_query: &'a str,
    /// Every request header (lower-case names), repeated headers repeated.
    pub headers: &'a [(String, String)],
    /// The principal verified by the request-signature filter, if any.
    pub principal: Option<&'a str>,
}

/// The verdict on a claim answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Forward,
    Reject(ReplayError),
    /// Answer with this stored response; the marker header is already added.
    Replay(StoredResponse),
}

/// What the guard does with the answer's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Classification {
    /// The answer is the outcome: store it and replay it to retries.
    Completed,
    /// The answer proves nothing executed, or the route allows repeating: free the key.
    Release,
    /// The answer does not tell: lock the key as `outcome_unknown`.
    Unknown,
}

/// Pure: what an answer proves. `via_upstream` is false for a local reply (timeout, reset,
/// another filter): the request was forwarded and the answer says nothing about the operation.
pub fn classify(policy: &ReplayPolicy, on_uncertain: OnUncertain, status: u16, via_upstream: bool) -> Classification {
    let uncertain = match on_uncertain {
        OnUncertain::Lock => Classification::Unknown,
        OnUncertain::Release => Classification::Release,
    };
    if !via_upstream || !(200..500).contains(&status) {
        return uncertain;
    }
    if policy.not_executed_statuses.contains(&status) {
        return Classification::Release;
    }
    Classification::Completed
}

/// SHA-256 of the empty body (a request without one), known without hashing.
pub const EMPTY_BODY_SHA256: [u8; 32] = [
    0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24, 0x27, 0xae, 0x41, 0xe4, 0x64,
    0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
];

/// SHA-256 of the exact body bytes, as the fingerprint uses it (fed chunk by chunk).
pub fn body_sha256<'b>(body: impl Into<crate::flow::BodyChunks<'b>>) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for chunk in body.into().iter() {
        hasher.update(chunk);
    }
    hasher.finalize().into()
}

/// The `sha-256` member of a Content-Digest header (RFC 9530), if it has exactly one of 32 bytes.
/// Only meaningful once the header was verified against the body (request-signature's
/// `verify_body`): it is then the SHA-256 of the body, and the fingerprint may use it instead
/// of hashing the body again.
pub fn body_sha256_from_content_digest(content_digest: &str) -> Option<[u8; 32]> {
    let dict: sfv::Dictionary = Parser::new(content_digest).parse().ok()?;
    match dict.get("sha-256")? {
        sfv::ListEntry::Item(Item { bare_item: BareItem::ByteSequence(bytes), .. }) => bytes.as_slice().try_into().ok(),
        _ => None,
    }
}

/// Parses an `Idempotency-Key` value: an sf-string of 1 to `max_len` characters.
pub fn parse_idempotency_key(value: &str, max_len: usize) -> Result<String, ReplayError> {
    parse_key(value, max_len).map(std::borrow::Cow::into_owned)
}

/// [`parse_idempotency_key`], borrowed from the value when it is a plain sf-string.
fn parse_key(value: &str, max_len: usize) -> Result<std::borrow::Cow<'_, str>, ReplayError> {
    // A bound before parsing: an sf-string of max_len characters needs at most 2 * max_len + 2.
    if value.len() > max_len.saturating_mul(2).saturating_add(2) + 64 {
        return Err(ReplayError::KeyInvalid("is too long"));
    }
    // The common form, a plain sf-string (no escapes, no parameters; RFC 8941 §4.2: leading and
    // trailing spaces discarded), read in place; anything else goes to the full parser.
    let trimmed = value.trim_matches(' ');
    if let Some(key) = trimmed.strip_prefix('"').and_then(|rest| rest.strip_suffix('"')) {
        if trimmed.len() >= 2 && key.bytes().all(|b| (0x20..=0x7e).contains(&b) && b != b'"' && b != b'\\') {
            return checked_key(key, max_len).map(std::borrow::Cow::Borrowed);
        }
    }
    let item: Item = Parser::new(value).parse().map_err(|_| {
        ReplayError::KeyInvalid("must be a structured-field string, e.g. \"8e03978e-40d5-43e8-bc93-6894a57f9324\"")
    })?;
    let BareItem::String(key) = item.bare_item else {
        return Err(ReplayError::KeyInvalid("must be a structured-field string (in double quotes)"));
    };
    checked_key(key.as_str(), max_len).map(|key| std::borrow::Cow::Owned(key.to_string()))
}

fn checked_key(key: &str, max_len: usize) -> Result<&str, ReplayError> {
    if key.is_empty() {
        return Err(ReplayError::KeyInvalid("must not be empty"));
    }
    if key.len() > max_len {
        return Err(ReplayError::KeyInvalid("is too long"));
    }
    Ok(key)
}

/// Where a key lives: scoped to (principal or anonymous, route name, key).
/// Under the policy's hasher ([`ReplayPolicy::key_hasher`]).
pub fn key_hash(hasher: &KeyHasher, route: &str, principal: Option<&str>, key: &str) -> KeyHash {
    let scope: &[u8] = if principal.is_some() { b"p" } else { b"-" };
    hasher.of(&[b"key", scope, principal.unwrap_or("").as_bytes(), route.as_bytes(), key.as_bytes()])
}

/// Whose quota a claim counts on: the verified principal; without one, every anonymous request
/// of the route (anonymous callers cannot be told apart; routes that need per-caller isolation
/// set `require_principal`).
pub fn tenant_of(hasher: &KeyHasher, route: &str, principal: Option<&str>) -> KeyHash {
    match principal.filter(|p| !p.is_empty()) {
        Some(principal) => crate::quota::tenant(hasher, "principal", principal),
        None => crate::quota::tenant(hasher, "route", route),
    }
}

/// An operator's request to clear a key: `POST <operator_clear.path>` with this JSON body.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClear {
    route: String,
    /// The principal the key belongs to; absent or null for anonymous keys.
    #[serde(default)]
    principal: Option<String>,
    /// The key's characters (the sf-string's content, without quotes).
    idempotency_key: String,
}

/// The operator endpoint, at header time: `None` when the request is not for it; otherwise
/// whether this principal may use it. `log context` for the line.
pub fn operator_request(policy: &ReplayPolicy, facts: &RequestFacts<'_>) -> Option<(Result<(), ReplayError>, String)> {
    let op = policy.operator_clear.as_ref()?;
    let (path, _) = crate::route::split_path(facts.path_and_query);
    if path != op.path {
        return None;
    }
    let principal = facts.principal.filter(|p| !p.is_empty());
    let context = format!("operator_clear method={} operator={}", facts.method, principal.unwrap_or("-"));
    if facts.method != "POST" {
        return Some((Err(ReplayError::ClearRequestInvalid("use POST")), context));
    }
    let allowed = principal.is_some_and(|p| op.principals.iter().any(|o| o == p));
    Some((if allowed { Ok(()) } else { Err(ReplayError::OperatorForbidden) }, context))
}

/// Parses an operator's clear request into the key's address and a log context.
pub fn parse_clear(policy: &ReplayPolicy, body: &[u8]) -> Result<(KeyHash, String), ReplayError> {
    let raw: RawClear = serde_json::from_slice(body)
        .map_err(|_| ReplayError::ClearRequestInvalid("expected {\"route\", \"principal\", \"idempotency_key\"}"))?;
    let route = policy
        .routes
        .iter()
        .find(|r| r.name == raw.route)
        .ok_or(ReplayError::ClearRequestInvalid("unknown route"))?;
    let key = raw.idempotency_key;
    if key.is_empty() || key.len() > policy.max_key_length || !key.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return Err(ReplayError::ClearRequestInvalid("idempotency_key is not a valid key"));
    }
    let principal = raw.principal.filter(|p| !p.is_empty());
    let context = format!(
        "route={} principal={} key={}",
        route.name,
        principal.as_deref().unwrap_or("-"),
        hex8(&Sha256::digest(key.as_bytes()))
    );
    Ok((key_hash(&policy.key_hasher(), &route.name, principal.as_deref(), &key), context))
}

/// `route=.. method=.. path=".." principal=..` and, with a key, its short hash (the key itself is
/// never logged: the hash correlates the lines of one key).
fn log_context(route: &str, method: &str, path: &str, principal: Option<&str>, key: Option<&str>) -> String {
    let mut context = format!("route={route} method={method} path={path:?} principal={}", principal.unwrap_or("-"));
    if let Some(key) = key {
        context.push_str(" key=");
        context.push_str(&hex8(&Sha256::digest(key.as_bytes())));
    }
    context
}

fn hex8(bytes: &[u8]) -> String {
    hex::encode(bytes.get(..4).unwrap_or(bytes))
}

/// Capture of the upstream's answer.
#[derive(Debug, Clone, Default)]
struct Capture {
    status: Option<u16>,
    via_upstream: bool,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The body passed `max_stored_body_bytes`: the outcome is recorded without it.
    overflow: bool,
    /// A Firebreak refusal by a filter after this one (a local reply carrying
    /// `x-firebreak-error`, e.g. amount-limit's 429): the request was never forwarded.
    refused_here: bool,
}

/// What an exchange keeps of its request's text (method, path and query, principal, key), in
/// one string: one allocation instead of one per part.
#[derive(Debug, Clone)]
struct RequestText {
    text: String,
    method_end: usize,
    path_end: usize,
    principal_end: Option<usize>,
    key_end: Option<usize>,
}

impl RequestText {
    fn new(method: &str, path_and_query: &str, principal: Option<&str>, key: Option<&str>) -> Self {
        let (p, k) = (principal.unwrap_or(""), key.unwrap_or(""));
        let mut text = String::with_capacity(method.len() + path_and_query.len() + p.len() + k.len());
        text.push_str(method);
        let method_end = text.len();
        text.push_str(path_and_query);
        let path_end = text.len();
        text.push_str(p);
        let principal_end = principal.map(|_| text.len());
        text.push_str(k);
        let key_end = key.map(|_| text.len());
        RequestText { text, method_end, path_end, principal_end, key_end }
    }

    fn method(&self) -> &str {
        self.text.get(..self.method_end).unwrap_or("")
    }

    fn path_and_query(&self) -> &str {
        self.text.get(self.method_end..self.path_end).unwrap_or("")
    }

    fn principal(&self) -> Option<&str> {
        self.principal_end.map(|end| self.text.get(self.path_end..end).unwrap_or(""))
    }

    fn key(&self) -> Option<&str> {
        let start = self.principal_end.unwrap_or(self.path_end);
        self.key_end.map(|end| self.text.get(start..end).unwrap_or(""))
    }
}

/// One exchange on a protected route.
#[derive(Debug, Clone)]
pub struct Exchange {
    route: usize,
    /// The key's address ([`key_hash`]), computed once: the header-time peek and the claim share it.
    key_hash: Option<KeyHash>,
    /// Method, path and query, principal, key.
    request: RequestText,
    /// Set once the request was claimed and forwarded with a key; `None` after finishing.
    owner: Option<Owner>,
    capture: Capture,
}

impl Exchange {
    /// Header-time checks. `Ok(None)`: the route is not protected.
    pub fn begin(policy: &ReplayPolicy, facts: &RequestFacts<'_>) -> Result<Option<Exchange>, (ReplayError, String)> {
        let (path, _) = crate::route::split_path(facts.path_and_query);
        let index = match policy.route_for(facts.method, path) {
            crate::route::Scope::In(index) => index,
            crate::route::Scope::Out => return Ok(None),
            crate::route::Scope::NotCanonical => {
                let context = format!("method={} path={:?}", facts.method, path);
                return Err((ReplayError::PathNotCanonical, context));
            }
        };
        let Some(route) = policy.routes.get(index) else { return Ok(None) };
        let principal = facts.principal.filter(|p| !p.is_empty());
        // The log context is formatted only for a refusal (a line is written then).
        let context = |key: Option<&str>| log_context(&route.name, facts.method, path, principal, key);
        let fail = |error: ReplayError, key: Option<&str>| Err((error, context(key)));
        if route.require_principal && principal.is_none() {
            return fail(ReplayError::PrincipalRequired, None);
        }
        let key = if route.key_mode == KeyMode::Ignored {
            None
        } else {
            let mut values = facts.headers.iter().filter(|(n, _)| n == IDEMPOTENCY_KEY_HEADER).map(|(_, v)| v.as_str());
            match (values.next(), values.next()) {
                (Some(_), Some(_)) => return fail(ReplayError::KeyDuplicated, None),
                (Some(value), None) => match parse_key(value, policy.max_key_length) {
                    Ok(key) => Some(key),
                    Err(error) => return fail(error, None),
                },
                (None, _) => None,
            }
        };
        if key.is_none() && route.key_mode == KeyMode::Required {
            return fail(ReplayError::KeyMissing, None);
        }
        for (name, value) in facts.headers {
            if name == "content-length" {
                match value.trim().parse::<u64>() {
                    Ok(n) if n > policy.max_body_bytes => return fail(ReplayError::BodyTooLarge, key.as_deref()),
                    _ => {}
                }
            }
        }
        let key_hash = key.as_deref().map(|key| key_hash(&policy.key_hasher(), &route.name, principal, key));
        Ok(Some(Exchange {
            route: index,
            key_hash,
            request: RequestText::new(facts.method, facts.path_and_query, principal, key.as_deref()),
            owner: None,
            capture: Capture::default(),
        }))
    }

    /// For log lines: route, method, path, principal, short key hash. Never the key or a secret.
    /// Formatted on demand (a refusal, a debug line), never on the accepted path.
    pub fn context(&self, policy: &ReplayPolicy) -> String {
        let request = &self.request;
        let (path, _) = crate::route::split_path(request.path_and_query());
        log_context(self.route_name(policy), request.method(), path, request.principal(), request.key())
    }

    /// The verified principal the request came with, if any.
    pub fn principal(&self) -> Option<&str> {
        self.request.principal()
    }

    pub fn route_name<'p>(&self, policy: &'p ReplayPolicy) -> &'p str {
        policy.routes.get(self.route).map_or("-", |r| r.name.as_str())
    }

    pub fn has_key(&self) -> bool {
        self.request.key_end.is_some()
    }

    /// Refuses a body larger than `max_body_bytes` (checked on every chunk).
    pub fn check_body_size(&self, policy: &ReplayPolicy, size: u64) -> Result<(), ReplayError> {
        if size > policy.max_body_bytes {
            return Err(ReplayError::BodyTooLarge);
        }
        Ok(())
    }

    /// SHA-256 of (principal, method, path and query, SHA-256 of the exact body bytes).
    pub fn fingerprint(&self, body: &[u8]) -> [u8; 32] {
        self.fingerprint_of_body_sha256(&body_sha256(body))
    }

    /// [`Exchange::fingerprint`] from the body's SHA-256 (e.g. the one request-signature verified
    /// against the signed Content-Digest): the same value as from the body itself.
    pub fn fingerprint_of_body_sha256(&self, body_sha256: &[u8; 32]) -> [u8; 32] {
        let mut hasher = Sha256::new();
        let principal = self.request.principal().map(str::as_bytes);
        let parts: [&[u8]; 5] = [
            if principal.is_some() { b"p" } else { b"-" },
            principal.unwrap_or(b""),
            self.request.method().as_bytes(),
            self.request.path_and_query().as_bytes(),
            body_sha256.as_slice(),
        ];
        for part in parts {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part);
        }
        hasher.finalize().into()
    }

    /// Where this request's key lives (header time), if it carries one.
    pub fn key_address(&self, policy: &ReplayPolicy) -> Option<KeyHash> {
        policy.routes.get(self.route)?;
        self.key_hash
    }

    /// The claim to make once the body is complete. `None`: nothing to claim (a route with
    /// optional keys and collapse off); forward.
    pub fn claim_request(&self, policy: &ReplayPolicy, body: &[u8], claim_id: u64) -> Option<ClaimRequest> {
        self.claim_request_of_body_sha256(policy, &body_sha256(body), claim_id)
    }

    /// [`Exchange::claim_request`] from the body's SHA-256 instead of the body.
    pub fn claim_request_of_body_sha256(
        &self,
        policy: &ReplayPolicy,
        body_sha256: &[u8; 32],
        claim_id: u64,
    ) -> Option<ClaimRequest> {
        let route = policy.routes.get(self.route)?;
        let fingerprint = self.fingerprint_of_body_sha256(body_sha256);
        let hasher = policy.key_hasher();
        let tenant = tenant_of(&hasher, &route.name, self.request.principal());
        match self.key_hash {
            Some(key) => Some(ClaimRequest::Key { key, fingerprint, claim_id, tenant }),
            None => route.collapse_window_ms.map(|window_ms| ClaimRequest::Collapse {
                key: hasher.of(&[b"dup", route.name.as_bytes(), &fingerprint]),
                window_ms,
                tenant,
            }),
        }
    }

    /// The store's answer to the claim becomes the verdict.
    pub fn on_claim(&mut self, policy: &ReplayPolicy, answer: Result<ClaimAnswer, StateError>) -> Decision {
        match answer {
            Err(error) => Decision::Reject(error.into()),
            Ok(ClaimAnswer::Forward { owner }) => {
                self.owner = owner;
                Decision::Forward
            }
            Ok(ClaimAnswer::InFlight) => Decision::Reject(ReplayError::InFlight),
            Ok(ClaimAnswer::OutcomeUnknown { .. }) => Decision::Reject(ReplayError::OutcomeUnknown),
            Ok(ClaimAnswer::Mismatch) => Decision::Reject(ReplayError::Mismatch),
            Ok(ClaimAnswer::Duplicate) => Decision::Reject(ReplayError::Duplicate),
            Ok(ClaimAnswer::NotStored { status }) => Decision::Reject(ReplayError::NotStored { status }),
            Ok(ClaimAnswer::Replay(mut response)) => {
                response.headers.push((policy.replay_marker_header.clone(), "true".to_string()));
                Decision::Replay(response)
            }
        }
    }

    /// This exchange owns a key and its answer still has to be recorded.
    pub fn owns_key(&self) -> bool {
        self.owner.is_some()
    }

    /// The answer's status line and headers. `via_upstream`: Envoy's `response.code_details`
    /// is `via_upstream` (the answer came from the upstream, not from a local reply).
    pub fn on_response_headers(&mut self, policy: &ReplayPolicy, status: u16, via_upstream: bool, headers: &[(String, String)]) {
        if self.owner.is_none() {
            return;
        }
        self.capture.status = Some(status);
        self.capture.via_upstream = via_upstream;
        // Every Firebreak refusal is a local reply with `x-firebreak-error`, sent before the
        // request is forwarded; Envoy's own local replies after forwarding (timeout, reset) never
        // carry it, and an upstream's answer is `via_upstream`.
        self.capture.refused_here = !via_upstream && headers.iter().any(|(name, _)| name == "x-firebreak-error");
        self.capture.headers = headers
            .iter()
            .filter(|(name, _)| policy.stored_headers.iter().any(|s| s == name))
            .cloned()
            .collect();
    }

    /// One chunk of the answer's body (bounded copy; beyond the bound only the fact is kept).
    pub fn on_response_body(&mut self, policy: &ReplayPolicy, chunk: &[u8]) {
        if self.owner.is_none() || self.capture.overflow {
            return;
        }
        let limit = usize::try_from(policy.max_stored_body_bytes).unwrap_or(usize::MAX);
        if self.capture.body.len().saturating_add(chunk.len()) > limit {
            self.capture.overflow = true;
            self.capture.body = Vec::new();
            return;
        }
        self.capture.body.extend_from_slice(chunk);
    }

    /// How much more body the capture wants (to size a host read); 0 once it overflowed.
    pub fn body_room(&self, policy: &ReplayPolicy) -> usize {
        if self.owner.is_none() || self.capture.overflow {
            return 0;
        }
        usize::try_from(policy.max_stored_body_bytes)
            .unwrap_or(usize::MAX)
            .saturating_sub(self.capture.body.len())
    }

    /// What the exchange proves, to write to the record; `None` when there is nothing to write
    /// (no key owned, or already finished). `complete`: the answer ended normally; false when
    /// the stream ended without a complete answer (reset, downstream gone).
    pub fn finish(&mut self, policy: &ReplayPolicy, complete: bool) -> Option<FinishRequest> {
        let owner = self.owner.take()?;
        let on_uncertain = policy.routes.get(self.route).map_or(OnUncertain::Lock, |r| r.on_uncertain);
        let capture = std::mem::take(&mut self.capture);
        let outcome = match capture.status {
            // A later Firebreak filter refused the request: it was not forwarded, nothing happened.
            Some(_) if capture.refused_here => Outcome::Release,
            // No answer at all (reset, timeout before headers, worker going away).
            None => match on_uncertain {
                OnUncertain::Lock => Outcome::Unknown { status: 0 },
                OnUncertain::Release => Outcome::Release,
            },
            Some(status) => match classify(policy, on_uncertain, status, capture.via_upstream) {
                Classification::Release => Outcome::Release,
                Classification::Unknown => Outcome::Unknown { status },
                Classification::Completed => Outcome::Completed {
                    status,
                    // A body cut short is not the answer: record the status only.
                    response: (complete && !capture.overflow).then_some(StoredResponse {
                        status,
                        headers: capture.headers,
                        body: capture.body,
                    }),
                },
            },
        };
        Some(FinishRequest { owner, outcome })
    }
}

#[cfg(test)]
mod key_tests {
    use super::*;

    /// The full parser's answer, as before the in-place form.
    fn by_sfv(value: &str, max_len: usize) -> Result<String, ReplayError> {
        let item: Item = Parser::new(value).parse().map_err(|_| ReplayError::KeyInvalid("syntax"))?;
        let BareItem::String(key) = item.bare_item else { return Err(ReplayError::KeyInvalid("type")) };
        checked_key(key.as_str(), max_len).map(str::to_string)
    }

    #[test]
    fn the_empty_body_digest_is_sha256_of_nothing() {
        assert_eq!(EMPTY_BODY_SHA256, body_sha256(&[]));
        assert_eq!(EMPTY_BODY_SHA256.as_slice(), Sha256::digest(b"").as_slice());
    }

    #[test]
    fn the_plain_string_form_reads_as_the_full_parser_does() {
        let mut values: Vec<String> = [
            r#""a""#,
            r#""""#,
            r#"  "a b"  "#,
            "\"a\"\t",
            "\t\"a\"",
            r#""a\"b""#,
            r#""a\\b""#,
            r#""a"x"#,
            r#"""a""#,
            "\"é\"",
            r#""a";p=1"#,
            r#""a" ;p"#,
            r#""#,
            r#"""#,
            r#"a"#,
            "\"\u{7f}\"",
            "\"\u{1f}\"",
            r#""~ !#$%&'()*+,-./09:;<=>?@AZ[]^_`az{|}""#,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for b in 0u8..=127 {
            values.push(format!("\"k{}\"", b as char));
        }
        for value in &values {
            for max_len in [1, 2, 255] {
                let ours = parse_idempotency_key(value, max_len).map_err(|e| matches!(e, ReplayError::KeyInvalid(_)));
                let oracle = by_sfv(value, max_len).map_err(|e| matches!(e, ReplayError::KeyInvalid(_)));
                assert_eq!(ours, oracle, "{value:?} max_len {max_len}");
            }
        }
    }
}
