//! The request-level decisions: where in a request to look, and the rejection for each finding.

use crate::flow::BodyChunks;
use crate::route::split_path;
use crate::{Code, Rejection};

use super::body::{decode, parse_codings, Coding, DecodeError};
use super::config::{GuardPolicy, OverLimit};
use super::detect::{base64_decoded_max, Budget, Detector, Found, Hit, MAX_DEPTH};

/// Stable error codes (the strings of their [`Code`]s).
pub const CODE_CREDENTIAL: &str = Code::ProductionCredential.as_str();
pub const CODE_HOST: &str = Code::ProductionHost.as_str();
pub const CODE_ENCODING: &str = Code::ContentEncodingNotInspectable.as_str();
pub const CODE_UNDECODABLE: &str = Code::BodyNotDecodable.as_str();
pub const CODE_TOO_LARGE: &str = Code::BodyTooLargeToInspect.as_str();
pub const CODE_UNREADABLE: &str = Code::RequestNotInspectable.as_str();

/// A value still encoded after this many layers (the detector's [`MAX_DEPTH`]) is refused with
/// [`CODE_TOO_DEEP`].
pub const CODE_TOO_DEEP: &str = Code::EncodingTooDeep.as_str();

/// Where in a request a finding was made (the `<where>` of the `detected.<label>.<where>` counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    Header,
    Path,
    Query,
    Body,
    Host,
}

impl Place {
    pub const ALL: [Place; 5] = [Place::Header, Place::Path, Place::Query, Place::Body, Place::Host];

    pub fn name(self) -> &'static str {
        match self {
            Place::Header => "header",
            Place::Path => "path",
            Place::Query => "query",
            Place::Body => "body",
            Place::Host => "host",
        }
    }
}

/// Why env-guard refuses a request. Mapped to a [`Rejection`] in one place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuardError {
    /// A protected credential: its label and where it was found (never the value).
    Credential { label: String, place: Place, location: String },
    /// A production-only destination.
    ProductionHost { rule: String },
    /// A Content-Encoding the guard cannot look through.
    UnsupportedEncoding { coding: String },
    /// The body does not decode as its Content-Encoding says.
    Undecodable { coding: &'static str },
    /// Larger than `max_body_bytes` / `max_decoded_bytes` with `over_limit: block`.
    TooLarge { decoded: bool },
    /// Still encoded after [`MAX_DEPTH`] layers (where, and the layers undone so far).
    TooDeep { place: Place, location: String },
    /// Request headers or body could not be read (e.g. a header value that is not UTF-8).
    Unreadable(&'static str),
}

impl GuardError {
    pub fn code(&self) -> &'static str {
        self.rejection_code().as_str()
    }

    /// The rejection code (status, code string, default message: [`Code`]).
    pub fn rejection_code(&self) -> Code {
        match self {
            GuardError::Credential { .. } => Code::ProductionCredential,
            GuardError::ProductionHost { .. } => Code::ProductionHost,
            GuardError::UnsupportedEncoding { .. } => Code::ContentEncodingNotInspectable,
            GuardError::Undecodable { .. } => Code::BodyNotDecodable,
            GuardError::TooLarge { .. } => Code::BodyTooLargeToInspect,
            GuardError::TooDeep { .. } => Code::EncodingTooDeep,
            GuardError::Unreadable(_) => Code::RequestNotInspectable,
        }
    }

    pub fn rejection(&self, environment: &str) -> Rejection {
        let message = match self {
            GuardError::Credential { label, location, .. } => {
                format!("production credential `{label}` found in {location}; environment `{environment}` is not production")
            }
            GuardError::ProductionHost { rule } => {
                format!("destination matches production-only host `{rule}`; environment `{environment}` is not production")
            }
            GuardError::UnsupportedEncoding { coding } => {
                format!("content-encoding `{coding}` cannot be inspected; send identity, gzip or deflate")
            }
            GuardError::TooDeep { location, .. } => {
                format!("{location} is still encoded after {MAX_DEPTH} layers of encoding; it cannot be inspected")
            }
            GuardError::Undecodable { coding } => format!("body is not valid {coding} data"),
            GuardError::TooLarge { decoded: true } => {
                "decoded content exceeds max_decoded_bytes; it cannot be inspected".to_string()
            }
            GuardError::TooLarge { decoded: false } => "body exceeds max_body_bytes; it cannot be inspected".to_string(),
            GuardError::Unreadable(what) => format!("{what} cannot be inspected"),
        };
        Rejection::new(self.rejection_code()).with_message(message)
    }

    /// `label=.. where=..` for the log line (never a value).
    pub fn log_context(&self) -> String {
        match self {
            GuardError::Credential { label, place, location } => {
                format!("label={label} where={} location={location:?}", place.name())
            }
            GuardError::ProductionHost { rule } => format!("label=production_host where=host host={rule:?}"),
            GuardError::TooDeep { place, location } => format!("where={} location={location:?}", place.name()),
            _ => String::new(),
        }
    }

    /// The `detected.<label>.<where>` counter for a finding.
    pub fn detection_counter(&self) -> Option<String> {
        match self {
            GuardError::Credential { label, place, .. } => Some(format!("detected.{label}.{}", place.name())),
            GuardError::ProductionHost { .. } => Some("detected.production_host.host".to_string()),
            _ => None,
        }
    }
}

/// What the body needs, decided from the headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyPlan {
    pub codings: Vec<Coding>,
    pub kind: BodyKind,
    /// The header decodings used up `max_decoded_bytes` with `over_limit: pass`: some header
    /// was not inspected to the bottom (count it as passed uninspected).
    pub headers_uninspected: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyKind {
    Json,
    Form,
    /// `multipart/*` with its `boundary` parameter (empty when it has none: a body is then
    /// refused as not decodable).
    Multipart(String),
    Text,
}

/// The body kind a `Content-Type` value declares (media types compared without case).
pub fn body_kind(content_type: &str) -> BodyKind {
    let mut params = content_type.split(';');
    let media = params.next().unwrap_or("").trim().as_bytes();
    let ends_with = |suffix: &[u8]| {
        media.len() >= suffix.len() && media.get(media.len() - suffix.len()..).is_some_and(|end| end.eq_ignore_ascii_case(suffix))
    };
    let starts_with = |prefix: &[u8]| media.get(..prefix.len()).is_some_and(|start| start.eq_ignore_ascii_case(prefix));
    if media.eq_ignore_ascii_case(b"application/json") || ends_with(b"+json") {
        BodyKind::Json
    } else if media.eq_ignore_ascii_case(b"application/x-www-form-urlencoded") {
        BodyKind::Form
    } else if starts_with(b"multipart/") {
        let boundary = params
            .filter_map(|p| p.split_once('='))
            .find(|(name, _)| name.trim().eq_ignore_ascii_case("boundary"))
            .map(|(_, value)| {
                let value = value.trim();
                value.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(value).to_string()
            })
            .unwrap_or_default();
        BodyKind::Multipart(boundary)
    } else {
        BodyKind::Text
    }
}

/// A body that was inspected, or let through uninspected because of `over_limit: pass`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyOutcome {
    Clean,
    Uninspected,
}

/// A name (header, parameter, JSON key) printed in a message only when it is short, tame, and
/// not itself a credential.
fn safe_name(detector: &Detector, name: &str) -> String {
    let tame = !name.is_empty()
        && name.len() <= 48
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    if tame && detector.scan(name.as_bytes(), &[]).is_none() {
        name.to_string()
    } else {
        "?".to_string()
    }
}

fn found(hit: Hit, place: Place, location: String) -> GuardError {
    let location = format!("{location}{}", hit.how_suffix());
    GuardError::Credential { label: hit.label, place, location }
}

/// One inspection (the headers, the trailers, or the body): the detector's decoding budget
/// (`max_decoded_bytes`), and whether something was let through uninspected.
struct Inspector<'a> {
    policy: &'a GuardPolicy,
    budget: Budget,
    uninspected: bool,
}

impl<'a> Inspector<'a> {
    fn new(policy: &'a GuardPolicy) -> Self {
        Inspector { policy, budget: Budget::new(policy.max_decoded_bytes.get()), uninspected: false }
    }

    fn detector(&self) -> &'a Detector {
        &self.policy.detector
    }

    /// Inspects one value found `depth` encoding layers down; `location` is built only for a
    /// finding.
    fn value(
        &mut self,
        data: &[u8],
        how: &[&'static str],
        depth: u8,
        place: Place,
        location: impl FnOnce() -> String,
    ) -> Result<(), GuardError> {
        match self.policy.detector.inspect(data, how, depth, &mut self.budget) {
            None => Ok(()),
            Some(found) => self.verdict(found, place, location()),
        }
    }

    fn verdict(&mut self, found: Found, place: Place, location: String) -> Result<(), GuardError> {
        match found {
            Found::Credential(hit) => Err(self::found(hit, place, location)),
            Found::TooDeep(how) => {
                let how = if how.is_empty() { String::new() } else { format!(" ({})", how.join(", ")) };
                Err(GuardError::TooDeep { place, location: format!("{location}{how}") })
            }
            Found::OverBudget => self.over_budget(),
        }
    }

    /// The decodings of this inspection exceed `max_decoded_bytes`: `over_limit` decides, as for
    /// a body whose Content-Encoding decodes to more than that.
    fn over_budget(&mut self) -> Result<(), GuardError> {
        match self.policy.over_limit {
            OverLimit::Block => Err(GuardError::TooLarge { decoded: true }),
            OverLimit::Pass => {
                self.uninspected = true;
                Ok(())
            }
        }
    }

    /// A header or trailer (`what`: "header" or "trailer"); names are lower-cased.
    fn header(&mut self, what: &str, name: &str, value: &str) -> Result<(), GuardError> {
        let detector = self.detector();
        // A credential sent as a header name.
        if let Some(hit) = detector.exact(name.as_bytes(), &[]) {
            return Err(found(hit, Place::Header, format!("{what} name")));
        }
        match name {
            "authorization" | "proxy-authorization" => self.authorization(what, name, value),
            "cookie" => self.cookies(what, value),
            _ => self.value(value.as_bytes(), &[], 0, Place::Header, || format!("{what} {}", safe_name(detector, name))),
        }
    }

    /// `Authorization: Bearer <token>` / `Basic <base64(user:pass)>` decoded, then the whole
    /// value (any other scheme, and a Basic value that is not standard base64).
    fn authorization(&mut self, what: &str, name: &str, value: &str) -> Result<(), GuardError> {
        let detector = self.detector();
        let at = || format!("{what} {name}");
        let trimmed = value.trim();
        let (scheme, rest) = trimmed.split_once([' ', '\t']).unwrap_or((trimmed, ""));
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("bearer") {
            self.value(rest.as_bytes(), &["bearer"], 0, Place::Header, at)?;
        } else if scheme.eq_ignore_ascii_case("basic") && base64_decoded_max(rest.len()) >= detector.shortest_match() {
            use base64::Engine as _;
            if let Ok(pair) = base64::engine::general_purpose::STANDARD.decode(rest) {
                if let Some(hit) = detector.exact(&pair, &["basic"]) {
                    return Err(found(hit, Place::Header, at()));
                }
                if let Some(colon) = pair.iter().position(|b| *b == b':') {
                    let user = pair.get(..colon).unwrap_or_default();
                    let password = pair.get(colon + 1..).unwrap_or_default();
                    self.value(password, &["basic password"], 1, Place::Header, at)?;
                    if let Some(hit) = detector.exact(user, &["basic user"]) {
                        return Err(found(hit, Place::Header, at()));
                    }
                }
                self.value(&pair, &["basic"], 1, Place::Header, at)?;
            }
        }
        self.value(value.as_bytes(), &[], 0, Place::Header, at)
    }

    /// `Cookie: a=1; b="2"`: each cookie's value (quotes removed) and name.
    fn cookies(&mut self, what: &str, value: &str) -> Result<(), GuardError> {
        let detector = self.detector();
        for cookie in value.split(';') {
            let cookie = cookie.trim();
            let (name, value) = cookie.split_once('=').unwrap_or(("", cookie));
            let (name, value) = (name.trim(), value.trim());
            let value = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(value);
            if let Some(hit) = detector.exact(name.as_bytes(), &[]) {
                return Err(found(hit, Place::Header, format!("{what} cookie name")));
            }
            self.value(value.as_bytes(), &[], 0, Place::Header, || format!("{what} cookie {}", safe_name(detector, name)))?;
        }
        Ok(())
    }

    fn path(&mut self, path_and_query: &str) -> Result<(), GuardError> {
        let detector = self.detector();
        let (path, query) = split_path(path_and_query);
        if let Some(query) = query {
            for (name, value) in form_urlencoded::parse(query.as_bytes()) {
                self.value(value.as_bytes(), &[], 0, Place::Query, || format!("query param {}", safe_name(detector, &name)))?;
                if let Some(hit) = detector.exact(name.as_bytes(), &[]) {
                    return Err(found(hit, Place::Query, "query param name".to_string()));
                }
            }
            self.value(query.as_bytes(), &[], 0, Place::Query, || "query string".to_string())?;
        }
        self.value(path.as_bytes(), &[], 0, Place::Path, || "path".to_string())
    }

    /// A body (or a multipart part) of `kind`, found `depth` layers down. `at`: `body`, or
    /// `body part 2.1`.
    fn content(&mut self, kind: &BodyKind, data: &[u8], depth: u8, how: &[&'static str], at: &str) -> Result<(), GuardError> {
        let detector = self.detector();
        match kind {
            BodyKind::Json => {
                if let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) {
                    return match json_walk(self, &value, how, depth) {
                        Some((found, steps)) => {
                            let location = format!("{at} json {}", json_location(detector, &steps));
                            self.verdict(found, Place::Body, location)
                        }
                        None => Ok(()),
                    };
                }
            }
            BodyKind::Form => {
                for (name, value) in form_urlencoded::parse(data) {
                    self.value(value.as_bytes(), how, depth, Place::Body, || {
                        format!("{at} form field {}", safe_name(detector, &name))
                    })?;
                }
            }
            BodyKind::Multipart(boundary) => return self.multipart(data, boundary, depth, how, at),
            BodyKind::Text => {}
        }
        // Text, and the fall-back for JSON that does not parse and for form bodies.
        self.value(data, how, depth, Place::Body, || format!("{at} text"))
    }

    /// A `multipart/*` body: the preamble and epilogue as text, and each part (its headers, its
    /// body decoded by its `Content-Transfer-Encoding` and `Content-Encoding`, as its own
    /// `Content-Type` says, nested multiparts included), each a layer deeper.
    fn multipart(&mut self, data: &[u8], boundary: &str, depth: u8, how: &[&'static str], at: &str) -> Result<(), GuardError> {
        let not_multipart = GuardError::Undecodable { coding: "multipart" };
        if boundary.is_empty() || boundary.len() > 200 {
            return Err(not_multipart);
        }
        let delimiter = format!("--{boundary}");
        let delimiter = delimiter.as_bytes();
        // Delimiter lines: at the start of a line, followed by `--` (the close delimiter) or by
        // white space only up to the end of the line.
        let mut lines: Vec<(usize, usize, bool)> = Vec::new(); // (start, content start, close)
        let mut start = 0;
        while start <= data.len() {
            let rest = data.get(start..).unwrap_or_default();
            let line_len = rest.iter().position(|b| *b == b'\n').unwrap_or(rest.len());
            let line = rest.get(..line_len).unwrap_or_default();
            if let Some(after) = line.strip_prefix(delimiter) {
                let close = after.starts_with(b"--");
                let padding = if close { after.get(2..).unwrap_or_default() } else { after };
                if padding.iter().all(|b| b.is_ascii_whitespace()) {
                    lines.push((start, start + line_len + 1, close));
                }
            }
            start += line_len + 1;
        }
        let Some(&(first, _, _)) = lines.first() else { return Err(not_multipart) };
        let preamble = data.get(..first).unwrap_or_default();
        self.value(preamble, how, depth, Place::Body, || format!("{at} multipart preamble"))?;
        let part_depth = depth.saturating_add(1);
        for (i, &(_, content, close)) in lines.iter().enumerate() {
            let end = lines.get(i + 1).map_or(data.len(), |next| next.0);
            let mut part = data.get(content.min(end)..end).unwrap_or_default();
            if close {
                self.value(part, how, depth, Place::Body, || format!("{at} multipart epilogue"))?;
                break;
            }
            // The line break before the next delimiter belongs to it.
            if i + 1 < lines.len() {
                part = part.strip_suffix(b"\n").unwrap_or(part);
                part = part.strip_suffix(b"\r").unwrap_or(part);
            }
            let part_at = if at == "body" { format!("body part {}", i + 1) } else { format!("{at}.{}", i + 1) };
            self.part(part, part_depth, how, &part_at)?;
        }
        Ok(())
    }

    fn part(&mut self, part: &[u8], depth: u8, how: &[&'static str], at: &str) -> Result<(), GuardError> {
        if depth > MAX_DEPTH {
            if part.iter().all(|b| b.is_ascii_whitespace()) {
                return Ok(());
            }
            return Err(GuardError::TooDeep { place: Place::Body, location: format!("{at} (nested multipart)") });
        }
        let Some((head, body)) = split_part(part) else {
            // No blank line: no body; everything is looked at as text.
            return self.value(part, how, depth, Place::Body, || format!("{at} text"));
        };
        let detector = self.detector();
        let headers = part_headers(head);
        for (name, value) in &headers {
            if let Some(hit) = detector.exact(name.as_bytes(), how) {
                return Err(found(hit, Place::Body, format!("{at} header name")));
            }
            self.value(value.as_bytes(), how, depth, Place::Body, || format!("{at} header {}", safe_name(detector, name)))?;
        }
        let header = |wanted: &str| headers.iter().find(|(n, _)| n == wanted).map(|(_, v)| v.trim());
        let mut how = how.to_vec();
        let mut depth = depth;
        let decoded;
        let mut data = body;
        let transfer = header("content-transfer-encoding").unwrap_or("").to_ascii_lowercase();
        match transfer.as_str() {
            "" | "7bit" | "8bit" | "binary" => {}
            "base64" | "quoted-printable" => {
                if !self.budget.take(data.len()) {
                    return self.over_budget();
                }
                decoded = if transfer == "base64" {
                    decode_base64_part(data)
                } else {
                    quoted_printable::decode(data, quoted_printable::ParseMode::Robust).ok()
                };
                let coding = if transfer == "base64" { "base64" } else { "quoted-printable" };
                data = decoded.as_deref().ok_or(GuardError::Undecodable { coding })?;
                how.push(coding);
                depth = depth.saturating_add(1);
            }
            other => {
                let name: String = other.chars().filter(|c| c.is_ascii_graphic()).take(32).collect();
                return Err(GuardError::UnsupportedEncoding { coding: format!("{name} (multipart transfer encoding)") });
            }
        }
        let codings = parse_codings(headers.iter().filter(|(n, _)| n == "content-encoding").map(|(_, v)| v.as_str()))
            .map_err(|coding| GuardError::UnsupportedEncoding { coding })?;
        let inflated;
        if !codings.is_empty() {
            match decode(data, &codings, self.budget.left()) {
                Ok(d) => {
                    self.budget.take(d.len());
                    inflated = d;
                    data = &inflated;
                }
                Err(DecodeError::TooLarge) => {
                    self.budget.take(usize::MAX);
                    return self.over_budget();
                }
                Err(DecodeError::Invalid(coding)) => return Err(GuardError::Undecodable { coding: coding.name() }),
            }
            how.extend(codings.iter().rev().map(|c| c.name()));
            depth = depth.saturating_add(u8::try_from(codings.len()).unwrap_or(u8::MAX));
        }
        if depth > MAX_DEPTH {
            if data.len() < detector.shortest_match() {
                return Ok(());
            }
            return Err(GuardError::TooDeep { place: Place::Body, location: format!("{at} ({})", how.join(", ")) });
        }
        let kind = body_kind(header("content-type").unwrap_or("text/plain"));
        self.content(&kind, data, depth, &how, at)
    }
}

/// A part's header block and body, split at the first empty line (CRLF or LF line endings).
/// `None` when there is no empty line.
fn split_part(part: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut start = 0;
    loop {
        let rest = part.get(start..)?;
        let line_len = rest.iter().position(|b| *b == b'\n')?;
        let line = rest.get(..line_len)?;
        if line.is_empty() || line == b"\r" {
            return Some((part.get(..start)?, part.get(start + line_len + 1..)?));
        }
        start += line_len + 1;
    }
}

/// `Name: value` lines (folded lines joined), names lower-cased.
fn part_headers(head: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(head);
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = headers.last_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
            continue;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        } else if !line.trim().is_empty() {
            // Not a header: still looked at.
            headers.push((String::new(), line.to_string()));
        }
    }
    headers
}

/// A part's base64 body: white space ignored, padding optional, standard or URL-safe alphabet.
fn decode_base64_part(data: &[u8]) -> Option<Vec<u8>> {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    use base64::Engine as _;
    const LENIENT: GeneralPurposeConfig = GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true);
    let compact: Vec<u8> = data.iter().copied().filter(|b| !b.is_ascii_whitespace()).collect();
    let url_safe = compact.iter().any(|b| matches!(b, b'-' | b'_'));
    let alphabet = if url_safe { &base64::alphabet::URL_SAFE } else { &base64::alphabet::STANDARD };
    GeneralPurpose::new(alphabet, LENIENT).decode(&compact).ok()
}

/// `name` lower-case, borrowed when it is already.
fn lower_case(name: &str) -> std::borrow::Cow<'_, str> {
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(name.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(name)
    }
}

/// Checks everything known at header time: destination host, every header and pseudo-header
/// (Authorization schemes decoded, cookies split), path, query parameters, Content-Encoding.
/// Returns how to treat the body.
pub fn check_headers(policy: &GuardPolicy, headers: &[(String, String)]) -> Result<BodyPlan, GuardError> {
    let detector = &policy.detector;
    let value = |name: &str| headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str());
    let authority = value(":authority").or_else(|| value("host")).unwrap_or("");
    if let Some(rule) = detector.production_host(authority) {
        return Err(GuardError::ProductionHost { rule: rule.text() });
    }
    let mut inspector = Inspector::new(policy);
    for (name, value) in headers {
        // (Hosts hand names lower-case already: copied only when they are not.)
        let name = lower_case(name);
        // Every header and pseudo-header is inspected: none is skipped for cost (the detector
        // hashes only candidates of a protected length). `:authority`/`host` were also checked
        // against the production-only hosts above.
        if name == ":path" {
            inspector.path(value)?;
        } else {
            inspector.header("header", &name, value)?;
        }
    }
    let codings =
        parse_codings(headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case("content-encoding")).map(|(_, v)| v.as_str()))
            .map_err(|coding| GuardError::UnsupportedEncoding { coding })?;
    let kind = body_kind(value("content-type").unwrap_or(""));
    Ok(BodyPlan { codings, kind, headers_uninspected: inspector.uninspected })
}

/// Request trailers (HTTP/2, chunked HTTP/1.1): inspected as headers are.
pub fn check_trailers(policy: &GuardPolicy, trailers: &[(String, String)]) -> Result<(), GuardError> {
    let mut inspector = Inspector::new(policy);
    for (name, value) in trailers {
        inspector.header("trailer", &lower_case(name), value)?;
    }
    Ok(())
}

/// What to do when the body is (or will be) larger than `max_body_bytes`.
pub fn over_limit(policy: &GuardPolicy) -> Result<BodyOutcome, GuardError> {
    match policy.over_limit {
        OverLimit::Block => Err(GuardError::TooLarge { decoded: false }),
        OverLimit::Pass => Ok(BodyOutcome::Uninspected),
    }
}

/// Inspects the complete body: decodes its Content-Encoding (bounded), then looks at JSON string
/// values at any depth, form fields, multipart parts, or raw text.
///
/// The detector checks whole values (fingerprints of whole candidates, patterns, JSON documents,
/// base64 and percent decodings), so it reads the body as one slice: borrowed when the host holds
/// it in one chunk, else joined once (after the size checks), so that a credential split across
/// chunks is seen whole.
pub fn check_body<'b>(policy: &GuardPolicy, plan: &BodyPlan, body: impl Into<BodyChunks<'b>>) -> Result<BodyOutcome, GuardError> {
    let body = body.into();
    if body.is_empty() {
        return Ok(BodyOutcome::Clean);
    }
    if body.len() > policy.max_body_bytes.get() {
        return over_limit(policy);
    }
    let body = body.contiguous();
    let decoded;
    let data = if plan.codings.is_empty() {
        body.as_ref()
    } else {
        match decode(&body, &plan.codings, policy.max_decoded_bytes.get()) {
            Ok(d) => {
                decoded = d;
                decoded.as_slice()
            }
            Err(DecodeError::TooLarge) => {
                return match policy.over_limit {
                    OverLimit::Block => Err(GuardError::TooLarge { decoded: true }),
                    OverLimit::Pass => Ok(BodyOutcome::Uninspected),
                }
            }
            Err(DecodeError::Invalid(coding)) => return Err(GuardError::Undecodable { coding: coding.name() }),
        }
    };
    let how: Vec<&'static str> = plan.codings.iter().rev().map(|c| c.name()).collect();
    let mut inspector = Inspector::new(policy);
    inspector.content(&plan.kind, data, 0, &how, "body")?;
    Ok(if inspector.uninspected { BodyOutcome::Uninspected } else { BodyOutcome::Clean })
}

/// One step from a JSON document's root to a finding.
enum JsonStep<'a> {
    Index(usize),
    Key(&'a str),
    /// The finding is the key itself (the last step).
    TheKey,
}

/// Every string (and key) of a JSON document; returns the finding and the steps to it,
/// innermost first (built only for a finding: a clean document costs no location strings).
fn json_walk<'a>(
    inspector: &mut Inspector,
    value: &'a serde_json::Value,
    how: &[&'static str],
    depth: u8,
) -> Option<(Found, Vec<JsonStep<'a>>)> {
    let detector = inspector.detector();
    match value {
        serde_json::Value::String(s) => {
            detector.inspect(s.as_bytes(), how, depth, &mut inspector.budget).map(|found| (found, Vec::new()))
        }
        serde_json::Value::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
            json_walk(inspector, item, how, depth).map(|(found, mut steps)| {
                steps.push(JsonStep::Index(i));
                (found, steps)
            })
        }),
        serde_json::Value::Object(map) => map.iter().find_map(|(key, item)| {
            if let Some(hit) = detector.exact(key.as_bytes(), how) {
                return Some((Found::Credential(hit), vec![JsonStep::TheKey]));
            }
            json_walk(inspector, item, how, depth).map(|(found, mut steps)| {
                steps.push(JsonStep::Key(key));
                (found, steps)
            })
        }),
        _ => None,
    }
}

/// `$.push.targets[0].key`, from [`json_walk`]'s steps (innermost first); a key that is not a
/// tame name is printed as `["?"]`.
fn json_location(detector: &Detector, steps: &[JsonStep]) -> String {
    let mut at = String::from("$");
    for step in steps.iter().rev() {
        match step {
            JsonStep::Index(i) => at.push_str(&format!("[{i}]")),
            JsonStep::Key(key) => {
                let name = safe_name(detector, key);
                if name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                    at.push('.');
                    at.push_str(&name);
                } else {
                    at.push_str(&format!("[{name:?}]"));
                }
            }
            JsonStep::TheKey => at.push_str(" (a key)"),
        }
    }
    at
}
