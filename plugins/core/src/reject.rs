//! The one shape every Firebreak rejection takes: an HTTP status, a stable machine-readable code,
//! a JSON body `{"error": "<code>", "message": "..."}`, extra response headers, and the name of
//! the stats counter it increments.
//!
//! Every code any filter can send is a [`Code`], defined once in the table below with its status,
//! its code string (also the counter suffix `rejected.<code>`) and its default message. The
//! filters keep their own error enums as the vocabulary of their decisions; each maps them to a
//! [`Rejection`] built from a [`Code`], in one place per filter.
//!
//! A rejection may also carry an internal `detail` (a reason): it goes to the log line
//! (`reason=<detail>`) and to a second counter (`rejected.<code>.<detail>`), never to the client.
//! Two refusals that must look identical to a caller (an unknown key id and a wrong MAC: no
//! oracle for enumerating key ids) share status, code, message and headers and differ only there.

macro_rules! codes {
    ($($(#[$doc:meta])* $variant:ident = ($status:literal, $code:literal, $message:literal),)*) => {
        /// Every rejection code, with its status, code string and default message (one line each).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Code {
            $($(#[$doc])* $variant,)*
        }

        impl Code {
            /// Every code, in table order.
            pub const ALL: &'static [Code] = &[$(Code::$variant,)*];

            /// The HTTP status of the reply.
            #[inline(always)]
            pub const fn status(self) -> u16 {
                match self { $(Code::$variant => $status,)* }
            }

            /// The stable code string: the body's `error`, `x-firebreak-error`, the counter suffix.
            #[inline(always)]
            pub const fn as_str(self) -> &'static str {
                match self { $(Code::$variant => $code,)* }
            }

            /// The message sent when the caller gives no more specific one.
            #[inline(always)]
            pub const fn default_message(self) -> &'static str {
                match self { $(Code::$variant => $message,)* }
            }
        }
    };
}

codes! {
    // Every filter on a protected route (crate::route).
    PathNotCanonical = (400, "path_not_canonical", "the request path is not in canonical form (empty or dot segments, percent-encoded unreserved characters or separators, `;` parameters, backslashes, a trailing slash, control or non-ASCII bytes) and a spelling of it is protected; send the canonical path"),
    /// The host gave request headers that are not UTF-8 (rate-limit, replay-guard).
    RequestHeadersInvalid = (400, "request_headers_invalid", "request headers are not valid UTF-8"),
    BodyTooLarge = (413, "body_too_large", "the request body exceeds the configured maximum"),
    /// A tenant (key id, principal) used its quota of the shared tables.
    TenantQuotaExceeded = (429, "tenant_quota_exceeded", "this tenant has used its quota of records for the current window; retry later"),
    /// The cluster-wide state (Redis through its bridge) did not answer usably: never forwarded unchecked.
    FilterFailed = (500, "filter_failed", "the filter failed; the request was not forwarded"),
    StateUnavailable = (503, "state_unavailable", "the cluster-wide state is unavailable; the request was not forwarded"),

    // request-signature
    SignatureMissing = (401, "signature_missing", "this route requires Signature and Signature-Input headers"),
    HeaderDuplicated = (400, "header_duplicated", "a header that must appear once is repeated"),
    PrincipalHeaderSpoofed = (400, "principal_header_spoofed", "only the gateway sets the principal header, in any spelling"),
    SignatureMalformed = (400, "signature_malformed", "malformed signature"),
    SignatureParamMissing = (400, "signature_param_missing", "a required signature parameter is missing"),
    SignatureParamInvalid = (400, "signature_param_invalid", "a signature parameter is invalid"),
    SignatureAlgorithmUnsupported = (400, "signature_algorithm_unsupported", "only hmac-sha256 is accepted"),
    SignatureComponentUnsupported = (400, "signature_component_unsupported", "a covered component is not supported"),
    SignatureComponentMissing = (400, "signature_component_missing", "a covered component is absent from the request"),
    SignatureCoverageInsufficient = (401, "signature_coverage_insufficient", "the signature does not cover every required component"),
    KeyIdInvalid = (400, "key_id_invalid", "keyid must be 1 to 64 characters of A-Z a-z 0-9 - _ . :"),
    /// An unknown key id and a wrong MAC alike (the detail tells them apart, in the log only).
    SignatureInvalid = (401, "signature_invalid", "the signature does not verify"),
    KeyNotActive = (401, "key_not_active", "the key is outside its validity period"),
    SignatureStale = (401, "signature_stale", "created is older than the acceptance window"),
    SignatureFromFuture = (401, "signature_from_future", "created is in the future"),
    SignatureExpired = (401, "signature_expired", "the signature has expired"),
    ContentDigestMalformed = (400, "content_digest_malformed", "Content-Digest needs a sha-256 or sha-512 byte sequence"),
    ContentDigestMismatch = (401, "content_digest_mismatch", "Content-Digest does not match the body"),
    NonceReplayed = (409, "nonce_replayed", "this signature nonce was already used"),
    NonceStoreFull = (503, "nonce_store_full", "nonce store is full; refusing rather than forgetting"),

    // replay-guard
    IdempotencyKeyMissing = (400, "idempotency_key_missing", "this route requires an Idempotency-Key header"),
    IdempotencyKeyDuplicated = (400, "idempotency_key_duplicated", "Idempotency-Key must appear once"),
    IdempotencyKeyInvalid = (400, "idempotency_key_invalid", "Idempotency-Key is invalid"),
    PrincipalRequired = (401, "principal_required", "this route requires a verified principal (signed request)"),
    IdempotencyKeyMismatch = (422, "idempotency_key_mismatch", "this Idempotency-Key was used for a different request"),
    RequestInFlight = (409, "request_in_flight", "a request with this Idempotency-Key is still being processed; retry later"),
    OutcomeUnknown = (409, "outcome_unknown", "an earlier request with this Idempotency-Key was forwarded and its outcome is unknown; it is not forwarded again (check the operation's status before using a new key)"),
    DuplicateRequest = (409, "duplicate_request", "an identical request was just received; it is not forwarded twice"),
    ResponseNotStored = (409, "response_not_stored", "the request with this Idempotency-Key completed; its response was not stored and the operation is not repeated"),
    ReplayStoreFull = (503, "replay_store_full", "the idempotency store is full; refusing rather than forgetting"),
    /// The local store (shared data) failed, or the host could not give the verified principal.
    ReplayStateUnavailable = (503, "replay_state_unavailable", "the idempotency store is unavailable"),
    OperatorForbidden = (403, "operator_forbidden", "this principal may not clear idempotency keys"),
    ClearRequestInvalid = (400, "clear_request_invalid", "clear request is invalid"),
    KeyNotFound = (404, "key_not_found", "no live record for this key"),
    KeyNotClearable = (409, "key_not_clearable", "only outcome_unknown keys can be cleared"),

    // rate-limit
    RateLimited = (429, "rate_limited", "rate limit exceeded"),
    RateLimitUnauthenticated = (401, "rate_limit_unauthenticated", "the rate limit is per verified user and the request has none"),
    RateLimitClientUnknown = (503, "rate_limit_client_unknown", "the client address is unknown"),
    RateLimitStoreFull = (503, "rate_limit_store_full", "rate-limit table is full; refusing rather than forgetting"),
    /// The local store (shared data) failed, or the host could not give the headers or the
    /// principal (then with a detail: `headers_unreadable`, `principal_unreadable`).
    RateLimitUnavailable = (503, "rate_limit_unavailable", "rate-limit state is unavailable; refusing rather than forwarding unchecked"),

    // amount-limit
    AmountLimited = (429, "amount_limited", "the amount exceeds what remains of this budget for the current window"),
    /// The amount is missing or malformed (the detail says how: missing, wrong_type, negative,
    /// fractional, exponent, overflow, malformed).
    AmountInvalid = (400, "amount_invalid", "the amount is missing or malformed"),
    AmountCurrencyInvalid = (400, "amount_currency_invalid", "the currency is missing, not a string, or has no budget"),
    AmountKeyInvalid = (400, "amount_key_invalid", "a field the budget is kept per is missing, not a string, empty or too long"),
    /// Not one JSON document, a duplicated key anywhere, or no body.
    AmountBodyInvalid = (400, "amount_body_invalid", "the body must be one JSON document without duplicated keys"),
    AmountLimitUnauthenticated = (401, "amount_limit_unauthenticated", "the amount limit is per verified principal and the request has none"),
    AmountLimitStoreFull = (503, "amount_limit_store_full", "amount-limit table is full; refusing rather than forgetting"),
    /// The local store failed, or the host could not give the headers, the body, the clock or the principal.
    AmountLimitUnavailable = (503, "amount_limit_unavailable", "amount-limit state is unavailable; refusing rather than forwarding unchecked"),

    // env-guard
    ProductionCredential = (403, "production_credential_in_non_production", "a production credential was found; this environment is not production"),
    ProductionHost = (403, "production_host_in_non_production", "destination matches a production-only host; this environment is not production"),
    ContentEncodingNotInspectable = (415, "content_encoding_not_inspectable", "this content-encoding cannot be inspected; send identity, gzip or deflate"),
    BodyNotDecodable = (400, "body_not_decodable", "body is not valid data for its encoding"),
    BodyTooLargeToInspect = (413, "body_too_large_to_inspect", "body exceeds max_body_bytes; it cannot be inspected"),
    RequestNotInspectable = (400, "request_not_inspectable", "the request cannot be inspected"),
    EncodingTooDeep = (422, "encoding_too_deep", "a value is still encoded after too many layers of encoding; it cannot be inspected"),
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every internal reason ([`Rejection::with_detail`]) a rejection may carry, with its code.
pub const DETAILS: [(Code, &str); 26] = [
    (Code::SignatureInvalid, "unknown_key"),
    (Code::SignatureInvalid, "mac_mismatch"),
    (Code::RateLimitUnavailable, "headers_unreadable"),
    (Code::RateLimitUnavailable, "principal_unreadable"),
    (Code::AmountInvalid, "missing"),
    (Code::AmountInvalid, "wrong_type"),
    (Code::AmountInvalid, "negative"),
    (Code::AmountInvalid, "fractional"),
    (Code::AmountInvalid, "exponent"),
    (Code::AmountInvalid, "overflow"),
    (Code::AmountInvalid, "malformed"),
    (Code::AmountCurrencyInvalid, "missing"),
    (Code::AmountCurrencyInvalid, "wrong_type"),
    (Code::AmountCurrencyInvalid, "unknown"),
    (Code::AmountKeyInvalid, "missing"),
    (Code::AmountKeyInvalid, "wrong_type"),
    (Code::AmountKeyInvalid, "empty"),
    (Code::AmountKeyInvalid, "too_long"),
    (Code::AmountBodyInvalid, "empty"),
    (Code::AmountBodyInvalid, "not_json"),
    (Code::AmountBodyInvalid, "duplicate_key"),
    (Code::AmountLimitUnavailable, "headers_unreadable"),
    (Code::AmountLimitUnavailable, "principal_unreadable"),
    (Code::AmountLimitUnavailable, "body_unreadable"),
    (Code::AmountLimitUnavailable, "clock"),
    (Code::AmountLimitUnavailable, "store"),
];

/// Every rejection counter a filter may count: `rejected.<code>` for every code and
/// `rejected.<code>.<detail>` for every [`DETAILS`] entry. A host that must define its counters
/// up front (the native module) defines these under every meter.
pub fn rejection_counter_names() -> impl Iterator<Item = String> {
    let codes = Code::ALL.iter().map(|code| format!("rejected.{}", code.as_str()));
    codes.chain(DETAILS.iter().map(|(code, detail)| format!("rejected.{}.{detail}", code.as_str())))
}

/// Every would-be refusal counter of a report-only filter or rule: `would_reject.<code>` for every
/// code ([`crate::Mode::ReportOnly`]; the detail goes to the log line only).
pub fn would_reject_counter_names() -> impl Iterator<Item = String> {
    Code::ALL.iter().map(|code| format!("would_reject.{}", code.as_str()))
}

/// A request the gateway refuses to forward. Built only from a [`Code`] ([`Rejection::new`]):
/// `status` and `code` always come from the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: u16,
    /// Stable, machine-readable; also the suffix of the stats counter.
    pub code: &'static str,
    /// Human-readable; never contains a secret, a MAC or a signature base.
    pub message: String,
    pub headers: Vec<(String, String)>,
    /// Internal reason (logged and counted, never sent): tells apart refusals that must look the
    /// same to the client.
    pub detail: Option<&'static str>,
    kind: Code,
}

impl Rejection {
    /// The rejection for `code`, with its default message.
    #[inline(always)]
    pub fn new(code: Code) -> Self {
        Rejection {
            status: code.status(),
            code: code.as_str(),
            message: code.default_message().to_string(),
            headers: Vec::new(),
            detail: None,
            kind: code,
        }
    }

    /// The code this rejection was built from.
    pub fn kind(&self) -> Code {
        self.kind
    }

    /// Replaces the default message with one that names the case (a rule, a header, a location).
    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = message.into();
        self
    }

    /// Adds the internal reason (see [`Rejection::detail`]).
    pub fn with_detail(mut self, detail: &'static str) -> Self {
        self.detail = Some(detail);
        self
    }

    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// `{"error": "<code>", "message": "..."}`
    pub fn body(&self) -> Vec<u8> {
        serde_json::json!({ "error": self.code, "message": self.message }).to_string().into_bytes()
    }

    /// Every response header the client gets with this rejection, in order.
    pub fn response_headers(&self) -> Vec<(&str, &str)> {
        let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/json"), ("x-firebreak-error", self.code)];
        headers.extend(self.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())));
        headers
    }

    /// The stats counters (after the plugin's prefix) this rejection increments:
    /// `rejected.<code>`, and `rejected.<code>.<detail>` when it has a detail.
    pub fn counter_names(&self) -> Vec<String> {
        let mut names = vec![format!("rejected.{}", self.code)];
        if let Some(detail) = self.detail {
            names.push(format!("rejected.{}.{detail}", self.code));
        }
        names
    }

    /// The counter (after the plugin's prefix) a report-only filter or rule increments instead:
    /// `would_reject.<code>`.
    pub fn would_reject_counter_name(&self) -> String {
        format!("would_reject.{}", self.code)
    }

    /// The line a report-only filter or rule writes instead of [`Rejection::log_line`]:
    /// `firebreak <plugin> would_reject status=.. code=.. [reason=..] <context> msg=".."`.
    pub fn would_reject_log_line(&self, plugin: &str, context: &str) -> String {
        let reason = self.detail.map(|d| format!(" reason={d}")).unwrap_or_default();
        format!(
            "firebreak {plugin} would_reject status={} code={}{reason} {context} msg={:?}",
            self.status, self.code, self.message
        )
    }

    /// One greppable, table-like log line:
    /// `firebreak <plugin> reject status=.. code=.. [reason=..] <context> msg=".."`.
    pub fn log_line(&self, plugin: &str, context: &str) -> String {
        let reason = self.detail.map(|d| format!(" reason={d}")).unwrap_or_default();
        format!("firebreak {plugin} reject status={} code={}{reason} {context} msg={:?}", self.status, self.code, self.message)
    }
}

/// A configuration error: names the offending field so the log tells the operator what to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError { field: field.into(), message: message.into() }
    }

    /// The same error, seen from a configuration that holds this one at `section` (the chain:
    /// `filters[1].request_signature`): the field becomes `<section>.<field>`. An empty `section`
    /// leaves it as it is (a filter configured on its own).
    pub fn under(self, section: &str) -> Self {
        let field = match (section.is_empty(), self.field.is_empty()) {
            (true, _) => self.field,
            (false, true) => section.to_string(),
            (false, false) => format!("{section}.{}", self.field),
        };
        ConfigError { field, message: self.message }
    }

    /// Wraps a serde_json error: serde names the unknown or mistyped field in its message.
    pub fn from_json(error: serde_json::Error) -> Self {
        ConfigError::new("<configuration>", error.to_string())
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid configuration: field `{}`: {}", self.field, self.message)
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_section_prefixes_the_field() {
        let e = ConfigError::new("rules[0].key", "m");
        assert_eq!(e.clone().under("filters[2].rate_limit").field, "filters[2].rate_limit.rules[0].key");
        assert_eq!(e.clone().under(""), e);
        assert_eq!(ConfigError::new("", "m").under("filters[0].env_guard").field, "filters[0].env_guard");
    }

    #[test]
    fn body_is_the_documented_json_and_escapes_the_message() {
        let r = Rejection::new(Code::SignatureInvalid).with_message("bad \"quote\"");
        let v: serde_json::Value = serde_json::from_slice(&r.body()).unwrap();
        assert_eq!(v["error"], "signature_invalid");
        assert_eq!(v["message"], "bad \"quote\"");
    }

    #[test]
    fn the_detail_is_logged_and_counted_but_never_sent() {
        let plain = Rejection::new(Code::SignatureInvalid).with_message("no");
        let detailed = plain.clone().with_detail("unknown_key");
        assert_eq!((plain.body(), plain.response_headers()), (detailed.body(), detailed.response_headers()));
        assert!(!String::from_utf8(detailed.body()).unwrap().contains("unknown_key"));
        assert_eq!(plain.counter_names(), ["rejected.signature_invalid"]);
        assert_eq!(detailed.counter_names(), ["rejected.signature_invalid", "rejected.signature_invalid.unknown_key"]);
        assert!(!plain.log_line("p", "c").contains("reason="));
        assert!(detailed.log_line("p", "c").contains(" code=signature_invalid reason=unknown_key c "));
    }

    #[test]
    fn every_code_is_unique_lower_snake_case_with_an_error_status() {
        let mut seen = std::collections::HashSet::new();
        for code in Code::ALL {
            let s = code.as_str();
            assert!(seen.insert(s), "{s} twice");
            assert!(!s.is_empty() && !s.starts_with('_') && !s.ends_with('_') && !s.contains("__"), "{s}");
            assert!(s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'), "{s}");
            assert!((400..600).contains(&code.status()), "{s}: {}", code.status());
            assert!(!code.default_message().is_empty(), "{s}");
            let r = Rejection::new(*code);
            assert_eq!((r.status, r.code, r.kind(), r.counter_names()), (code.status(), s, *code, vec![format!("rejected.{s}")]));
        }
    }

    /// The codes each filter can send, and the README that documents them (the native module's
    /// own: a hook that failed).
    fn filters() -> [(&'static str, &'static [Code]); 6] {
        [
            ("amount-limit", crate::amount::CODES),
            ("native", &[Code::FilterFailed]),
            ("request-signature", crate::signature::CODES),
            ("replay-guard", crate::replay::CODES),
            ("rate-limit", crate::ratelimit::CODES),
            ("env-guard", crate::envguard::CODES),
        ]
    }

    /// `(status, code)` of every row of the README's `| Status | Code | When |` table (a row may
    /// name several codes: `` `a` / `b` ``).
    fn readme_codes(readme: &str) -> Vec<(u16, String)> {
        let mut rows = Vec::new();
        let mut in_table = false;
        for line in readme.lines() {
            if line.starts_with("| Status | Code | When |") {
                in_table = true;
                continue;
            }
            if in_table && !line.starts_with('|') {
                break;
            }
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            if !in_table || cells.len() < 4 || cells[1].starts_with("---") {
                continue;
            }
            for code in cells[2].split('`').skip(1).step_by(2) {
                rows.push((cells[1].parse().unwrap(), code.to_string()));
            }
        }
        rows
    }

    #[test]
    fn each_filter_readme_lists_exactly_the_codes_the_filter_can_send() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for (filter, codes) in filters() {
            let readme = std::fs::read_to_string(root.join(filter).join("README.md")).unwrap();
            let mut documented = readme_codes(&readme);
            let mut expected: Vec<(u16, String)> = codes.iter().map(|c| (c.status(), c.as_str().to_string())).collect();
            documented.sort();
            expected.sort();
            assert_eq!(documented, expected, "{filter}/README.md");
        }
        for code in Code::ALL {
            assert!(filters().iter().any(|(_, codes)| codes.contains(code)), "{code} is sent by no filter");
        }
    }
}
