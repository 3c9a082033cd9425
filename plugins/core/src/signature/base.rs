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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Component {
    Method,
    Authority,
    Path,
    Query,
    TargetUri,
    Scheme,
    RequestTarget,
    /// A header field, lower-case name.
    Field(String),
}

impl Component {
    /// Parses a bare component name as it appears in `Signature-Input`.
    pub fn parse(name: &str) -> Option<Component> {
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
                Component::Field(name.to_string())
            }
            _ => return None,
        })
    }

    pub fn name(&self) -> &str {
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
        Some(match self {
            Component::Method => request.method.to_string(),
            Component::Authority => request.normalized_authority(),
            Component::Path => request.path().to_string(),
            Component::Query => format!("?{}", request.query().unwrap_or("")),
            Component::TargetUri => request.target_uri(),
            Component::Scheme => request.scheme.to_ascii_lowercase(),
            Component::RequestTarget => request.path_and_query.to_string(),
            Component::Field(name) => {
                let values: Vec<&str> = request.header_values(name).map(str::trim).collect();
                if values.is_empty() {
                    return None;
                }
                values.join(", ")
            }
        })
    }
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

/// Builds the signature base (RFC 9421 2.5). Fails with the name of a component the request lacks.
pub fn signature_base(components: &[Component], params_value: &str, request: &RequestView<'_>) -> Result<String, String> {
    let mut base = String::new();
    for component in components {
        let value = component.value(request).ok_or_else(|| component.name().to_string())?;
        if value.contains('\n') || value.contains('\r') {
            return Err(component.name().to_string());
        }
        base.push('"');
        base.push_str(component.name());
        base.push_str("\": ");
        base.push_str(&value);
        base.push('\n');
    }
    base.push_str("\"@signature-params\": ");
    base.push_str(params_value);
    Ok(base)
}

/// An inner list of plain string items from component names (client side).
pub fn inner_list(components: &[Component], params: sfv::Parameters) -> InnerList {
    InnerList::with_params(
        components
            .iter()
            .filter_map(|c| sfv::String::from_string(c.name().to_string()).ok())
            .map(|s| Item::new(BareItem::String(s)))
            .collect(),
        params,
    )
}
