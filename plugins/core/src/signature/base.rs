//! RFC 9421 components and the signature base.

use sfv::{BareItem, InnerList, Item, ListSerializer};

/// The parts of a request a signature can cover, as Envoy presents them to the filter.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// `:method`
    pub method: &'a str,
    /// `:scheme`, as Envoy sees the downstream request (`http` on a plaintext listener).
    pub scheme: &'a str,
    /// `:authority`
    pub authority: &'a str,
    /// `:path`, with the query.
    pub path_and_query: &'a str,
    /// Every header, names in lower case, duplicates kept in order.
    pub headers: &'a [(String, String)],
}

impl<'a> RequestView<'a> {
    pub fn path(&self) -> &'a str {
        let path = crate::route::split_path(self.path_and_query).0;
        if path.is_empty() {
            "/"
        } else {
            path
        }
    }

    pub fn query(&self) -> Option<&'a str> {
        crate::route::split_path(self.path_and_query).1
    }

    /// All values of a header (lower-case name).
    pub fn header_values<'n>(&self, name: &'n str) -> impl Iterator<Item = &'a str> + 'n
    where
        'a: 'n,
    {
        let headers: &'a [(String, String)] = self.headers;
        headers.iter().filter(move |(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn header_count(&self, name: &str) -> usize {
        self.header_values(name).count()
    }

    /// RFC 9421 2.2.3: host in lower case, the scheme's default port removed.
    pub fn normalized_authority(&self) -> String {
        let lower = self.authority.to_ascii_lowercase();
        let default_port = match self.scheme {
            "https" => ":443",
            _ => ":80",
        };
        match lower.strip_suffix(default_port) {
            Some(host) => host.to_string(),
            None => lower,
        }
    }

    pub fn target_uri(&self) -> String {
        format!("{}://{}{}", self.scheme, self.normalized_authority(), self.path_and_query)
    }
}

/// A component identifier this verifier supports. Parameters on components (`sf`, `key`, `bs`,
/// `req`, `tr`, `name`) are refused rather than half-implemented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component<'a> {
    Method,
    Authority,
    Path,
    Query,
    TargetUri,
    Scheme,
    RequestTarget,
    /// A header field, lower-case name.
    Field(&'a str),
}

impl<'a> Component<'a> {
    /// Parses a bare component name as it appears in `Signature-Input`.
    pub fn parse(name: &'a str) -> Option<Component<'a>> {
        Some(match name {
            "@method" => Component::Method,
            "@authority" => Component::Authority,
            "@path" => Component::Path,
            "@query" => Component::Query,
            "@target-uri" => Component::TargetUri,
            "@scheme" => Component::Scheme,
            "@request-target" => Component::RequestTarget,
            _ if name.starts_with('@') => return None,
            _ if !name.is_empty()
                && name.len() <= 64
                && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_') =>
            {
                Component::Field(name)
            }
            _ => return None,
        })
    }

    pub fn name(&self) -> &'a str {
        match self {
            Component::Method => "@method",
            Component::Authority => "@authority",
            Component::Path => "@path",
            Component::Query => "@query",
            Component::TargetUri => "@target-uri",
            Component::Scheme => "@scheme",
            Component::RequestTarget => "@request-target",
            Component::Field(name) => name,
        }
    }

    /// The component's value, or `None` when the request does not have it (RFC 9421: an error).
    pub fn value(&self, request: &RequestView<'_>) -> Option<String> {
        let mut out = String::new();
        self.write_value(request, &mut out).then_some(out)
    }

    /// Appends the component's value to `out`; `false` (and `out` as it may be) when the request
    /// does not have it.
    pub fn write_value(&self, request: &RequestView<'_>, out: &mut String) -> bool {
        match self {
            Component::Method => out.push_str(request.method),
            Component::Authority => push_normalized_authority(request, out),
            Component::Path => out.push_str(request.path()),
            Component::Query => {
                out.push('?');
                out.push_str(request.query().unwrap_or(""));
            }
            Component::TargetUri => {
                out.push_str(request.scheme);
                out.push_str("://");
                push_normalized_authority(request, out);
                out.push_str(request.path_and_query);
            }
            Component::Scheme => push_lowercase(out, request.scheme),
            Component::RequestTarget => out.push_str(request.path_and_query),
            Component::Field(name) => {
                let mut values = request.header_values(name);
                let Some(first) = values.next() else { return false };
                out.push_str(first.trim());
                for value in values {
                    out.push_str(", ");
                    out.push_str(value.trim());
                }
            }
        }
        true
    }
}

fn push_lowercase(out: &mut String, s: &str) {
    out.extend(s.chars().map(|c| c.to_ascii_lowercase()));
}

/// [`RequestView::normalized_authority`], appended to `out` without a copy of its own.
fn push_normalized_authority(request: &RequestView<'_>, out: &mut String) {
    let default_port = match request.scheme {
        "https" => ":443",
        _ => ":80",
    };
    let authority = request.authority;
    let host = match authority
        .len()
        .checked_sub(default_port.len())
        .and_then(|at| authority.get(at..).map(|tail| (at, tail)))
    {
        Some((at, tail)) if tail.eq_ignore_ascii_case(default_port) => authority.get(..at).unwrap_or(authority),
        _ => authority,
    };
    push_lowercase(out, host);
}

/// Serializes `Signature-Input`'s inner list the way RFC 8941 does (the `@signature-params` value).
pub fn serialize_signature_params(list: &InnerList) -> Option<String> {
    let mut ser = ListSerializer::new();
    {
        let mut inner = ser.inner_list();
        inner.items(&list.items);
        let _ = inner.finish().parameters(&list.params);
    }
    ser.finish()
}

/// Builds the signature base (RFC 9421 2.5). `params_value` is the `@signature-params` value:
/// the serialization of the signature's inner list. Fails with the name of a component the
/// request lacks (or whose value holds a line break).
pub fn signature_base(components: &[Component<'_>], params_value: &str, request: &RequestView<'_>) -> Result<String, String> {
    let mut base = String::with_capacity(256 + params_value.len());
    for component in components {
        base.push('"');
        base.push_str(component.name());
        base.push_str("\": ");
        let start = base.len();
        if !component.write_value(request, &mut base) {
            return Err(component.name().to_string());
        }
        if base.get(start..).is_some_and(|value| value.contains(['\n', '\r'])) {
            return Err(component.name().to_string());
        }
        base.push('\n');
    }
    base.push_str("\"@signature-params\": ");
    base.push_str(params_value);
    Ok(base)
}

/// An inner list of plain string items from component names (client side).
pub fn inner_list(components: &[Component<'_>], params: sfv::Parameters) -> InnerList {
    InnerList::with_params(
        components
            .iter()
            .filter_map(|c| sfv::String::from_string(c.name().to_string()).ok())
            .map(|s| Item::new(BareItem::String(s)))
            .collect(),
        params,
    )
}
