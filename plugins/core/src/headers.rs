//! Header-name spellings that reach an upstream as the same header.
//!
//! HTTP header names are case-insensitive, and many upstreams also read `_` as `-`: CGI and
//! everything built on its conventions (`HTTP_X_FIREBREAK_PRINCIPAL`), nginx with
//! `underscores_in_headers`, several frameworks. So `x_firebreak_principal` and
//! `X_Firebreak-Principal` may be read as `x-firebreak-principal`. Envoy passes names with
//! underscores through unless `headers_with_underscores_action` says otherwise. A header that
//! carries identity must be handled in every such spelling.

/// Whether `name`, as received, is a spelling of `canonical` (a lower-case, `-`-separated name):
/// equal once ASCII-lowercased with `_` read as `-`.
pub fn is_spelling_of(name: &str, canonical: &str) -> bool {
    name.len() == canonical.len()
        && name.bytes().zip(canonical.bytes()).all(|(n, c)| {
            let n = if n == b'_' { b'-' } else { n.to_ascii_lowercase() };
            n == c
        })
}

/// What a request carries in the spellings of `canonical`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Spellings<'a> {
    /// How many header lines, in any spelling.
    pub count: usize,
    /// The distinct names as received that are not `canonical` itself (e.g. `x_firebreak_principal`).
    pub variants: Vec<&'a str>,
}

/// Every header line of `headers` that is a spelling of `canonical` (see [`is_spelling_of`]).
pub fn spellings<'a>(headers: &'a [(String, String)], canonical: &str) -> Spellings<'a> {
    let mut found = Spellings::default();
    for (name, _) in headers {
        if !is_spelling_of(name, canonical) {
            continue;
        }
        found.count += 1;
        if name != canonical && !found.variants.contains(&name.as_str()) {
            found.variants.push(name);
        }
    }
    found
}

/// A header name as configuration may give it: lower-case letters, digits, `-` and `_`, at most
/// 128 bytes, not a pseudo-header.
pub fn valid_header_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with(':')
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// A header name fit to carry identity: lower-case letters, digits and `-` (no `_`, whose
/// spellings upstreams disagree on), not a pseudo-header.
pub fn valid_identity_header_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_and_underscores_are_spellings_of_the_same_name() {
        for name in [
            "x-firebreak-principal",
            "x_firebreak_principal",
            "X_Firebreak-Principal",
            "X-FIREBREAK-PRINCIPAL",
            "x-firebreak_principal",
        ] {
            assert!(is_spelling_of(name, "x-firebreak-principal"), "{name}");
        }
        for name in [
            "x-firebreak-principals",
            "x-firebreak-principa",
            "xfirebreak-principal",
            "x-firebreak principal",
            "x.firebreak-principal",
            "",
        ] {
            assert!(!is_spelling_of(name, "x-firebreak-principal"), "{name}");
        }
        let h = |pairs: &[(&str, &str)]| pairs.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect::<Vec<_>>();
        let headers =
            h(&[("x-firebreak-principal", "a"), ("x_firebreak_principal", "b"), ("x_firebreak_principal", "c"), ("other", "d")]);
        assert_eq!(spellings(&headers, "x-firebreak-principal"), Spellings { count: 3, variants: vec!["x_firebreak_principal"] });
        assert_eq!(spellings(&headers, "x-absent"), Spellings::default());
        assert!(valid_identity_header_name("x-firebreak-principal"));
        assert!(!valid_identity_header_name("x_firebreak_principal"));
        assert!(!valid_identity_header_name("X-Upper"));
        assert!(!valid_identity_header_name(":path"));
    }
}
