//! Client side: the headers that make a request acceptable to the verifier.

use base64::Engine;
use hmac::Mac;
use sfv::{BareItem, Parameters};

use super::base::{inner_list, serialize_signature_params, signature_base, Component, RequestView};
use super::digest::content_digest_sha256;

/// What to sign. `headers` must already hold every header field to be covered except
/// `content-digest`, which [`sign`] computes from `body`.
#[derive(Debug, Clone)]
pub struct SignRequest<'a> {
    pub method: &'a str,
    pub scheme: &'a str,
    pub authority: &'a str,
    pub path_and_query: &'a str,
    pub headers: &'a [(String, String)],
    pub body: &'a [u8],
    pub key_id: &'a str,
    pub secret: &'a [u8],
    /// Unix seconds.
    pub created: u64,
    pub expires: Option<u64>,
    pub nonce: Option<&'a str>,
    pub label: &'a str,
    /// `None`: @method, @authority, @path, @query when there is a query, content-digest when
    /// there is a body, and every header named in `extra_covered_headers`.
    pub components: Option<Vec<String>>,
    pub extra_covered_headers: &'a [String],
}

/// Headers to add to the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedHeaders {
    pub signature_input: String,
    pub signature: String,
    pub content_digest: Option<String>,
}

impl SignedHeaders {
    pub fn pairs(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Some(d) = &self.content_digest {
            out.push(("content-digest".to_string(), d.clone()));
        }
        out.push(("signature-input".to_string(), self.signature_input.clone()));
        out.push(("signature".to_string(), self.signature.clone()));
        out
    }
}

/// Signs with HMAC-SHA256. Fails (with a message) on an unsupported component name or a
/// component the request lacks.
pub fn sign(request: &SignRequest<'_>) -> Result<SignedHeaders, String> {
    let content_digest = (!request.body.is_empty()).then(|| content_digest_sha256(request.body));
    let mut headers = request.headers.to_vec();
    if let Some(d) = &content_digest {
        headers.retain(|(n, _)| n != "content-digest");
        headers.push(("content-digest".to_string(), d.clone()));
    }
    let view = RequestView {
        method: request.method,
        scheme: request.scheme,
        authority: request.authority,
        path_and_query: request.path_and_query,
        headers: &headers,
    };
    let names: Vec<String> = match &request.components {
        Some(names) => names.clone(),
        None => {
            let mut names = vec!["@method".to_string(), "@authority".to_string(), "@path".to_string()];
            if view.query().is_some() {
                names.push("@query".to_string());
            }
            if content_digest.is_some() {
                names.push("content-digest".to_string());
            }
            names.extend(request.extra_covered_headers.iter().cloned());
            names
        }
    };
    let components = names
        .iter()
        .map(|n| Component::parse(n.as_str()).ok_or_else(|| format!("unsupported component `{n}`")))
        .collect::<Result<Vec<_>, _>>()?;

    let mut params = Parameters::new();
    let key = |k: &str| sfv::Key::from_string(k.to_string()).map_err(|(e, _)| e.to_string());
    let string = |v: &str| sfv::String::from_string(v.to_string()).map(BareItem::String).map_err(|(e, _)| e.to_string());
    params.insert(key("created")?, BareItem::Integer(sfv::Integer::try_from(request.created).map_err(|e| e.to_string())?));
    if let Some(expires) = request.expires {
        params.insert(key("expires")?, BareItem::Integer(sfv::Integer::try_from(expires).map_err(|e| e.to_string())?));
    }
    params.insert(key("keyid")?, string(request.key_id)?);
    if let Some(nonce) = request.nonce {
        params.insert(key("nonce")?, string(nonce)?);
    }
    params.insert(key("alg")?, string("hmac-sha256")?);
    let list = inner_list(&components, params);
    let params_value = serialize_signature_params(&list).ok_or("cannot serialize signature parameters")?;
    let base = signature_base(&components, &params_value, &view).map_err(|c| format!("the request has no `{c}` to cover"))?;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(request.secret).map_err(|e| e.to_string())?;
    mac.update(base.as_bytes());
    let tag = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    Ok(SignedHeaders {
        signature_input: format!("{}={}", request.label, params_value),
        signature: format!("{}=:{}:", request.label, tag),
        content_digest,
    })
}
