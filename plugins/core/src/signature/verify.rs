//! Verification of one request against a [`SignaturePolicy`].
//!
//! Split in the order a proxy sees the request:
//! 1. [`verify_headers`] parses and checks everything the headers carry, including the MAC;
//! 2. [`verify_body`] checks `Content-Digest` against the exact body bytes and coverage of a body;
//! 3. [`claim_nonce`] records the nonce, only once everything else verified.

use std::borrow::Cow;

use hmac::Mac;
use subtle::ConstantTimeEq;

use super::base::{signature_base, Component, RequestView};
use super::config::{valid_key_id, SignaturePolicy};
use super::digest::{verify_content_digest, DigestError};
use super::fields::{self, Bare, FieldError, Member, Want};
use crate::quota::QuotaError;
use crate::store::{KeyHash, SharedStore, TableError, Update};
use crate::{Code, Rejection};

/// Headers a request may carry at most once; a second copy is an attack or a bug, never guessed at.
pub const SINGLE_VALUED_HEADERS: &[&str] = &["signature", "signature-input", "content-digest"];

/// Longest accepted nonce.
pub const MAX_NONCE_LEN: usize = 128;
/// Longest accepted `Signature` / `Signature-Input` value.
pub const MAX_SIGNATURE_HEADER_LEN: usize = 4096;

/// Every way verification can fail. Mapped to a status and stable code in [`SigError::rejection`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SigError {
    Missing,
    DuplicateHeader(String),
    /// On a protected route, the client sent the principal header in another spelling (case,
    /// `_` for `-`): an attempt to assert an identity past an upstream that merges spellings.
    PrincipalHeaderSpoofed,
    Malformed(&'static str),
    LabelNotFound,
    MultipleSignatures,
    ParamMissing(&'static str),
    ParamInvalid(&'static str),
    UnsupportedAlgorithm,
    UnsupportedComponent(String),
    DuplicateComponent(String),
    ComponentMissing(String),
    CoverageInsufficient(String),
    KeyIdInvalid,
    /// No key has this id. Looks exactly like [`SigError::InvalidSignature`] to the client.
    UnknownKey,
    /// The MAC verified, but the key is outside its validity period (only a holder of the
    /// key's secret can learn this).
    KeyNotActive,
    Stale,
    FromFuture,
    Expired,
    /// The MAC does not verify. Looks exactly like [`SigError::UnknownKey`] to the client.
    InvalidSignature,
    BodyTooLarge,
    ContentDigestMalformed,
    ContentDigestMismatch,
    NonceReplayed,
    NonceStoreFull,
    TenantQuotaExceeded,
    StateUnavailable,
}

/// The one refusal for "this signature does not verify", whatever the internal reason: an
/// unknown key id and a wrong MAC get the same status, code, message and headers (no oracle for
/// enumerating key ids); the reason goes only to the log line and the detail counter.
fn signature_invalid(reason: &'static str) -> Rejection {
    Rejection::new(Code::SignatureInvalid).with_detail(reason)
}

impl SigError {
    /// The rejection code (status, code string, default message: [`Code`]).
    pub fn code(&self) -> Code {
        use SigError::*;
        match self {
            Missing => Code::SignatureMissing,
            DuplicateHeader(_) => Code::HeaderDuplicated,
            PrincipalHeaderSpoofed => Code::PrincipalHeaderSpoofed,
            Malformed(_) | LabelNotFound | MultipleSignatures | DuplicateComponent(_) => Code::SignatureMalformed,
            ParamMissing(_) => Code::SignatureParamMissing,
            ParamInvalid(_) => Code::SignatureParamInvalid,
            UnsupportedAlgorithm => Code::SignatureAlgorithmUnsupported,
            UnsupportedComponent(_) => Code::SignatureComponentUnsupported,
            ComponentMissing(_) => Code::SignatureComponentMissing,
            CoverageInsufficient(_) => Code::SignatureCoverageInsufficient,
            KeyIdInvalid => Code::KeyIdInvalid,
            UnknownKey | InvalidSignature => Code::SignatureInvalid,
            KeyNotActive => Code::KeyNotActive,
            Stale => Code::SignatureStale,
            FromFuture => Code::SignatureFromFuture,
            Expired => Code::SignatureExpired,
            BodyTooLarge => Code::BodyTooLarge,
            ContentDigestMalformed => Code::ContentDigestMalformed,
            ContentDigestMismatch => Code::ContentDigestMismatch,
            NonceReplayed => Code::NonceReplayed,
            NonceStoreFull => Code::NonceStoreFull,
            TenantQuotaExceeded => Code::TenantQuotaExceeded,
            StateUnavailable => Code::StateUnavailable,
        }
    }

    pub fn rejection(&self) -> Rejection {
        use SigError::*;
        let rejection = Rejection::new(self.code());
        match self {
            DuplicateHeader(h) => rejection.with_message(format!("header `{h}` must appear once")),
            Malformed(what) => rejection.with_message(format!("malformed {what}")),
            LabelNotFound => rejection.with_message("the configured signature label is missing"),
            MultipleSignatures => rejection.with_message("exactly one signature is accepted"),
            ParamMissing(p) => rejection.with_message(format!("signature parameter `{p}` is required")),
            ParamInvalid(p) => rejection.with_message(format!("signature parameter `{p}` is invalid")),
            UnsupportedComponent(c) => rejection.with_message(format!("component `{c}` is not supported")),
            DuplicateComponent(c) => rejection.with_message(format!("component `{c}` is listed twice")),
            ComponentMissing(c) => rejection.with_message(format!("covered component `{c}` is absent from the request")),
            CoverageInsufficient(c) => rejection.with_message(format!("the signature must cover `{c}`")),
            UnknownKey => signature_invalid("unknown_key"),
            InvalidSignature => signature_invalid("mac_mismatch"),
            TenantQuotaExceeded => {
                rejection.with_message("this key id has recorded its quota of nonces for the current window; retry later")
            }
            StateUnavailable => rejection.with_message("replay state is unavailable"),
            _ => rejection,
        }
    }
}

/// A signature whose MAC verified over the headers; the body and nonce are still to be checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedHeaders {
    pub key_id: String,
    pub nonce: Option<String>,
    pub created: u64,
    /// The signature covers `content-digest` (and so the body, once [`verify_body`] passes).
    pub covers_content_digest: bool,
    /// When the nonce may be forgotten: after this the signature is no longer acceptable anyway.
    pub nonce_expires_at_ms: u64,
}

/// The client-supplied copies of the principal header, in every spelling (case, `_` for `-`; see
/// [`crate::headers`]): only the filter may assert a principal. Returns the distinct names to
/// remove from the request, on every route. On a protected route a copy in another spelling than
/// the configured one is refused (`400 principal_header_spoofed`: no legitimate hop sends it), and
/// so are two copies (`400 header_duplicated`); one copy under the exact name is removed (an
/// outer gateway may have set it; this filter sets its own).
pub fn client_principal_copies<'a>(
    policy: &SignaturePolicy,
    headers: &'a [(String, String)],
    protected: bool,
) -> Result<Vec<&'a str>, (SigError, &'a str)> {
    let found = crate::headers::spellings(headers, &policy.principal_header);
    if protected {
        if let Some(variant) = found.variants.first() {
            return Err((SigError::PrincipalHeaderSpoofed, variant));
        }
        if found.count > 1 {
            return Err((SigError::DuplicateHeader(policy.principal_header.clone()), ""));
        }
    }
    let mut names = found.variants;
    if let Some((name, _)) = headers.iter().find(|(n, _)| *n == policy.principal_header) {
        names.push(name);
    }
    Ok(names)
}

/// Checks the headers: presence and uniqueness, structure, policy coverage, time, key, MAC.
pub fn verify_headers(policy: &SignaturePolicy, request: &RequestView<'_>, now_ms: u64) -> Result<VerifiedHeaders, SigError> {
    // One pass over the headers: the single-valued ones counted, the two fields found.
    let (mut input, mut signature) = (None, None);
    let (mut inputs, mut signatures, mut digests, mut principals) = (0usize, 0usize, 0usize, 0usize);
    for (name, value) in request.headers {
        match name.as_str() {
            "signature" => {
                signatures += 1;
                signature = signature.or(Some(value.as_str()));
            }
            "signature-input" => {
                inputs += 1;
                input = input.or(Some(value.as_str()));
            }
            "content-digest" => digests += 1,
            _ => {}
        }
        if *name == policy.principal_header {
            principals += 1;
        }
    }
    // In the order of SINGLE_VALUED_HEADERS, then the principal header.
    for (name, count) in SINGLE_VALUED_HEADERS
        .iter()
        .copied()
        .zip([signatures, inputs, digests])
        .chain([(policy.principal_header.as_str(), principals)])
    {
        if count > 1 {
            return Err(SigError::DuplicateHeader(name.to_string()));
        }
    }
    let (Some(input), Some(signature)) = (input, signature) else {
        return Err(SigError::Missing);
    };
    if input.len() > MAX_SIGNATURE_HEADER_LEN || signature.len() > MAX_SIGNATURE_HEADER_LEN {
        return Err(SigError::Malformed("signature header (too long)"));
    }
    // Both fields in one pass each, keeping only the member under the label (no maps, no copies).
    let malformed_input = |e: FieldError| match e {
        FieldError::DuplicateParameter => SigError::Malformed("Signature-Input (a parameter is repeated)"),
        FieldError::DuplicateLabel => SigError::Malformed("Signature-Input (the label is repeated)"),
        FieldError::TooManyParameters => SigError::Malformed("Signature-Input (too many parameters)"),
        FieldError::Syntax => SigError::Malformed("Signature-Input"),
    };
    let want = match &policy.label {
        Some(label) => Want::Label(label),
        None => Want::First,
    };
    let inputs = fields::dictionary(input, want).map_err(malformed_input)?;
    let want = match (&policy.label, inputs.member) {
        (Some(label), _) => Want::Label(label),
        (None, Some((label, _))) => Want::Label(label),
        (None, None) => Want::First,
    };
    let signatures = fields::dictionary(signature, want).map_err(|_| SigError::Malformed("Signature"))?;
    if policy.label.is_none() && (inputs.members != 1 || signatures.members != 1) {
        return Err(SigError::MultipleSignatures);
    }
    let covered = match inputs.member {
        Some((_, Member::InnerList(list))) => list,
        Some((_, Member::Item(..))) => return Err(SigError::Malformed("Signature-Input")),
        None => return Err(SigError::LabelNotFound),
    };
    let provided_mac = match signatures.member {
        Some((_, Member::Item(Bare::ByteSequence(raw), _))) => raw,
        Some(_) => return Err(SigError::Malformed("Signature")),
        None => return Err(SigError::LabelNotFound),
    };

    // Parameters.
    let mut created = None;
    let mut expires = None;
    let mut nonce: Option<Cow<'_, str>> = None;
    let mut key_id: Option<Cow<'_, str>> = None;
    let mut alg: Option<Cow<'_, str>> = None;
    for param in covered.params.iter() {
        let (name, value) = param.map_err(malformed_input)?;
        match (name, value) {
            ("created", Bare::Integer(v)) => created = Some(v),
            ("expires", Bare::Integer(v)) => expires = Some(v),
            ("nonce", Bare::String(v)) => nonce = Some(v.value()),
            ("keyid", Bare::String(v)) => key_id = Some(v.value()),
            ("alg", Bare::String(v)) => alg = Some(v.value()),
            ("tag", Bare::String(_)) => {}
            ("created", _) => return Err(SigError::ParamInvalid("created")),
            ("expires", _) => return Err(SigError::ParamInvalid("expires")),
            ("nonce", _) => return Err(SigError::ParamInvalid("nonce")),
            ("keyid", _) => return Err(SigError::ParamInvalid("keyid")),
            ("alg", _) => return Err(SigError::ParamInvalid("alg")),
            ("tag", _) => return Err(SigError::ParamInvalid("tag")),
            _ => return Err(SigError::Malformed("Signature-Input (unknown parameter)")),
        }
    }
    let created = created.ok_or(SigError::ParamMissing("created"))?;
    let key_id = key_id.ok_or(SigError::ParamMissing("keyid"))?;
    if policy.require_nonce && nonce.is_none() {
        return Err(SigError::ParamMissing("nonce"));
    }
    if let Some(n) = &nonce {
        if n.is_empty() || n.len() > MAX_NONCE_LEN {
            return Err(SigError::ParamInvalid("nonce"));
        }
    }
    if !valid_key_id(&key_id) {
        return Err(SigError::KeyIdInvalid);
    }
    let created = u64::try_from(created).map_err(|_| SigError::ParamInvalid("created"))?;
    if created == 0 {
        return Err(SigError::ParamInvalid("created"));
    }

    // Components: parsed strictly, each at most once. Names are borrowed from the field (a name
    // with an escape is no supported component).
    let mut components: Vec<Component<'_>> = Vec::with_capacity(8);
    for item in covered.items() {
        let (bare, params) = item.map_err(malformed_input)?;
        let Bare::String(name) = bare else {
            return Err(SigError::Malformed("Signature-Input (component is not a string)"));
        };
        if !params.is_empty() {
            return Err(SigError::UnsupportedComponent(format!("{};{}", name.value(), "params")));
        }
        let component = Component::parse(name.raw()).ok_or_else(|| SigError::UnsupportedComponent(name.value().into_owned()))?;
        if components.contains(&component) {
            return Err(SigError::DuplicateComponent(component.name().to_string()));
        }
        components.push(component);
    }

    // Policy: the verifier decides what must be covered, never the client.
    let covers = |c: &Component| components.contains(c);
    let target_uri = covers(&Component::TargetUri);
    if policy.require_default_coverage {
        if !covers(&Component::Method) {
            return Err(SigError::CoverageInsufficient("@method".into()));
        }
        if !(covers(&Component::Authority) || target_uri) {
            return Err(SigError::CoverageInsufficient("@authority".into()));
        }
        if !(covers(&Component::Path) || target_uri || covers(&Component::RequestTarget)) {
            return Err(SigError::CoverageInsufficient("@path".into()));
        }
        if request.query().is_some() && !(covers(&Component::Query) || target_uri || covers(&Component::RequestTarget)) {
            return Err(SigError::CoverageInsufficient("@query".into()));
        }
    }
    for header in &policy.covered_headers_when_present {
        if request.header_count(header) > 0 && !covers(&Component::Field(header)) {
            return Err(SigError::CoverageInsufficient(header.clone()));
        }
    }
    let covers_content_digest = covers(&Component::Field("content-digest"));

    // Time.
    let now_s = now_ms / 1000;
    if created > now_s.saturating_add(policy.future_skew_seconds) {
        return Err(SigError::FromFuture);
    }
    if now_s.saturating_sub(created) > policy.max_age_seconds.get() {
        return Err(SigError::Stale);
    }
    let mut accept_until = created.saturating_add(policy.max_age_seconds.get());
    if let Some(expires) = expires {
        let expires = u64::try_from(expires).map_err(|_| SigError::ParamInvalid("expires"))?;
        if expires <= created {
            return Err(SigError::ParamInvalid("expires"));
        }
        if now_s >= expires {
            return Err(SigError::Expired);
        }
        accept_until = accept_until.min(expires);
    }

    // Key and MAC. Nothing the client learns depends on whether the key id exists before the
    // MAC verified: an `alg` naming no supported algorithm is refused whatever the key; an unknown
    // key id costs a MAC (with the decoy key) and is refused exactly like a wrong MAC; a key's
    // validity period and pinned algorithm are reported only to a request whose MAC verified.
    let alg = match &alg {
        Some(name) => Some(super::config::Algorithm::from_name(name).ok_or(SigError::UnsupportedAlgorithm)?),
        None => None,
    };
    let key = policy.key(&key_id);
    // `@signature-params` is the serialization of the inner list (RFC 9421 2.3): the received
    // bytes when they are in canonical form (what every signer that serializes sends), else the
    // canonical form written from what was parsed (what a verifier that re-serializes, as this
    // one did, uses). Either way the value is the serialization of exactly what this verifier
    // acts on; a repeated parameter, which could be read two ways, was refused above.
    let canonical: String;
    let params_value = if covered.canonical {
        covered.value
    } else {
        let mut out = String::with_capacity(covered.value.len());
        fields::write_canonical(&covered, &mut out).ok_or(SigError::Malformed("Signature-Input"))?;
        canonical = out;
        &canonical
    };
    let base = signature_base(&components, params_value, request).map_err(SigError::ComponentMissing)?;
    // MAC over the signature base, compared in constant time.
    let mut mac = key.unwrap_or(&policy.decoy_key).mac.clone();
    mac.update(base.as_bytes());
    let expected = mac.finalize().into_bytes();
    let mut mac_buffer = [0u8; 64];
    let mac_ok = fields::decode_byte_sequence(provided_mac, &mut mac_buffer)
        .is_some_and(|provided| provided.len() == expected.len() && bool::from(expected.as_slice().ct_eq(provided)));
    let Some(key) = key else { return Err(SigError::UnknownKey) };
    if !mac_ok {
        return Err(SigError::InvalidSignature);
    }
    if alg.is_some_and(|alg| alg != key.algorithm) {
        return Err(SigError::UnsupportedAlgorithm);
    }
    if key.not_before.is_some_and(|nb| now_s < nb) || key.not_after.is_some_and(|na| now_s > na) {
        return Err(SigError::KeyNotActive);
    }

    Ok(VerifiedHeaders {
        key_id: key_id.into_owned(),
        nonce: nonce.map(Cow::into_owned),
        created,
        covers_content_digest,
        nonce_expires_at_ms: accept_until.saturating_add(1).saturating_mul(1000),
    })
}

/// Checks the body the proxy will forward: its size, and that `Content-Digest` vouches for it.
pub fn verify_body<'b>(
    policy: &SignaturePolicy,
    verified: &VerifiedHeaders,
    content_digest: Option<&str>,
    body: impl Into<crate::flow::BodyChunks<'b>>,
) -> Result<(), SigError> {
    let body = body.into();
    if body.len() as u64 > policy.max_body_bytes {
        return Err(SigError::BodyTooLarge);
    }
    if !verified.covers_content_digest {
        if body.is_empty() || !policy.require_default_coverage {
            return Ok(());
        }
        return Err(SigError::CoverageInsufficient("content-digest".into()));
    }
    let header = content_digest.ok_or_else(|| SigError::ComponentMissing("content-digest".into()))?;
    verify_content_digest(header, body).map_err(|e| match e {
        DigestError::Malformed => SigError::ContentDigestMalformed,
        DigestError::Mismatch => SigError::ContentDigestMismatch,
    })
}

/// The key a nonce is recorded under (local table or Redis: [`SignaturePolicy::key_hasher`]).
pub fn nonce_key(policy: &SignaturePolicy, verified: &VerifiedHeaders) -> Option<KeyHash> {
    let nonce = verified.nonce.as_ref()?;
    Some(policy.key_hasher().of(&[b"nonce", verified.key_id.as_bytes(), nonce.as_bytes()]))
}

/// Milliseconds a nonce must stay recorded on Redis (shared by replicas) from the moment it is
/// claimed. Independent of the claiming replica's clock: a replica whose clock runs ahead would
/// otherwise shorten it, and a replica whose clock runs behind would still accept the signature
/// after the nonce is gone. Any replica accepts a signature at most `max_age_seconds` after and
/// `future_skew_seconds` before its `created` by its own clock; two replicas' clocks differ by at
/// most `max_replica_clock_skew_seconds`: so the last acceptance anywhere is at most
/// `max_age + future_skew + replica_skew` seconds (plus the second `created` is rounded to) after
/// the claim.
pub fn nonce_ttl_ms(policy: &SignaturePolicy) -> u64 {
    policy
        .max_age_seconds
        .get()
        .saturating_add(policy.future_skew_seconds)
        .saturating_add(policy.max_replica_clock_skew_seconds)
        .saturating_add(1)
        .saturating_mul(1000)
}

/// Records the nonce: exactly one of any number of concurrent identical requests wins.
///
/// Order: one read of the nonce's bucket (a replay is refused there, without touching the key
/// id's quota); then the key id's quota (one read-modify-write; a refusal records no nonce);
/// then the nonce, committed against the first read (one write when nothing changed).
pub fn claim_nonce(
    policy: &SignaturePolicy,
    store: &dyn SharedStore,
    verified: &VerifiedHeaders,
    now_ms: u64,
) -> Result<(), SigError> {
    let Some(key) = nonce_key(policy, verified) else { return Ok(()) };
    let expires_at_ms = verified.nonce_expires_at_ms;
    let table_error = |e: TableError| match e {
        TableError::Full => SigError::NonceStoreFull,
        _ => SigError::StateUnavailable,
    };
    let snapshot = policy.nonce_table.read(store, key).map_err(table_error)?;
    if snapshot.live(key, now_ms).is_some() {
        return Err(SigError::NonceReplayed);
    }
    policy
        .nonce_quota
        .charge(store, crate::quota::tenant(&policy.key_hasher(), "key_id", &verified.key_id), now_ms)
        .map_err(|e| match e {
            QuotaError::Exceeded => SigError::TenantQuotaExceeded,
            QuotaError::Table(e) => table_error(e),
        })?;
    let (won, _) = policy
        .nonce_table
        .update_from(store, key, now_ms, Some(snapshot), |current| match current {
            Some(_) => Update::Keep(false),
            None => Update::Write { payload: Vec::new(), expires_at_ms, result: true },
        })
        .map_err(table_error)?;
    if won {
        Ok(())
    } else {
        Err(SigError::NonceReplayed)
    }
}

/// Kind of the Redis keys counting a key id's nonces (`<prefix>:sig:quota:<hash>`).
pub const NONCE_QUOTA_KIND: &str = "sig:quota";

/// The Redis form of [`claim_nonce`]: one script ([`SET_NX_WITHIN_QUOTA_SCRIPT`]) records the
/// nonce (`<prefix>:sig:nonce:<hash>`, `PX ttl_ms`) unless it is recorded already, within the key
/// id's quota (`<prefix>:sig:quota:<hash>`, created with the window as its TTL). The window is
/// the longer of the quota's window and `ttl_ms`, so a key id never holds more than twice its
/// quota of live nonces. `None` when the signature carries no nonce.
///
/// [`SET_NX_WITHIN_QUOTA_SCRIPT`]: crate::remote::SET_NX_WITHIN_QUOTA_SCRIPT
pub fn nonce_claim_command(
    policy: &SignaturePolicy,
    redis: &crate::remote::RedisConfig,
    verified: &VerifiedHeaders,
    ttl_ms: u64,
) -> Option<Vec<u8>> {
    let key = nonce_key(policy, verified)?;
    let tenant = crate::quota::tenant(&policy.key_hasher(), "key_id", &verified.key_id);
    let ttl_ms = ttl_ms.max(1);
    let window = policy.nonce_quota.window_ms.get().max(ttl_ms);
    Some(crate::remote::eval_command_keys(
        crate::remote::SET_NX_WITHIN_QUOTA_SCRIPT,
        &[&redis.key("sig:nonce", key), &redis.key(NONCE_QUOTA_KIND, tenant)],
        &[&ttl_ms.to_string(), &policy.nonce_quota.limit.get().to_string(), &window.to_string()],
    ))
}

/// The bridge's answer to [`nonce_claim_command`]: recorded, or the refusal (a replay, the key
/// id's quota); `Err` when the answer is unusable (the caller fails closed).
pub fn nonce_claim_answer(http_status: Option<u16>, body: &[u8]) -> Result<Result<(), SigError>, crate::remote::RemoteError> {
    match crate::remote::parse_reply("EVAL", http_status, body)? {
        crate::remote::Reply::Integer(1) => Ok(Ok(())),
        crate::remote::Reply::Integer(0) => Ok(Err(SigError::NonceReplayed)),
        crate::remote::Reply::Integer(2) => Ok(Err(SigError::TenantQuotaExceeded)),
        other => Err(crate::remote::RemoteError::Malformed(format!("unexpected nonce claim reply: {other:?}"))),
    }
}
