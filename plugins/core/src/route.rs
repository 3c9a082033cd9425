//! Which requests a policy applies to: a set of methods and a path prefix or exact path.

use serde::Deserialize;

use crate::ConfigError;

/// Raw route as written in configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Upper-case methods; empty or absent means every method.
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub path_prefix: Option<String>,
    #[serde(default)]
    pub path_exact: Option<String>,
}

/// A validated route matcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteMatch {
    methods: Vec<String>,
    path: PathMatch,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PathMatch {
    Prefix(String),
    Exact(String),
}

impl RouteMatch {
    pub fn parse(raw: &RouteConfig, field: &str) -> Result<Self, ConfigError> {
        let path = match (&raw.path_prefix, &raw.path_exact) {
            (Some(prefix), None) => PathMatch::Prefix(prefix.clone()),
            (None, Some(exact)) => PathMatch::Exact(exact.clone()),
            _ => {
                return Err(ConfigError::new(
                    field,
                    "exactly one of `path_prefix` and `path_exact` is required",
                ))
            }
        };
        let text = match &path {
            PathMatch::Prefix(p) | PathMatch::Exact(p) => p,
        };
        if !text.starts_with('/') {
            return Err(ConfigError::new(field, "paths must start with `/`"));
        }
        for method in &raw.methods {
            if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(ConfigError::new(
                    format!("{field}.methods"),
                    format!("`{method}` is not an upper-case HTTP method"),
                ));
            }
        }
        Ok(RouteMatch { methods: raw.methods.clone(), path })
    }

    /// `path` is the request path without its query.
    pub fn matches(&self, method: &str, path: &str) -> bool {
        let method_ok = self.methods.is_empty() || self.methods.iter().any(|m| m == method);
        method_ok
            && match &self.path {
                PathMatch::Prefix(prefix) => path.starts_with(prefix.as_str()),
                PathMatch::Exact(exact) => path == exact,
            }
    }
}

/// Parses a list of routes, naming the failing index in errors.
pub fn parse_routes(raw: &[RouteConfig], field: &str) -> Result<Vec<RouteMatch>, ConfigError> {
    raw.iter()
        .enumerate()
        .map(|(i, r)| RouteMatch::parse(r, &format!("{field}[{i}]")))
        .collect()
}

/// Splits `:path` into path and query (without the `?`).
pub fn split_path(path_and_query: &str) -> (&str, Option<&str>) {
    match path_and_query.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path_and_query, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_and_methods() {
        let r = RouteMatch::parse(
            &RouteConfig { methods: vec!["POST".into()], path_prefix: Some("/v1/".into()), path_exact: None },
            "routes[0]",
        )
        .unwrap();
        assert!(r.matches("POST", "/v1/transfers"));
        assert!(!r.matches("GET", "/v1/transfers"));
        assert!(!r.matches("POST", "/v2/x"));
    }

    #[test]
    fn bad_routes_name_the_field() {
        let e = RouteMatch::parse(
            &RouteConfig { methods: vec!["post".into()], path_prefix: Some("/".into()), path_exact: None },
            "routes[3]",
        )
        .unwrap_err();
        assert_eq!(e.field, "routes[3].methods");
        let e = RouteMatch::parse(&RouteConfig { methods: vec![], path_prefix: None, path_exact: None }, "r").unwrap_err();
        assert_eq!(e.field, "r");
    }
}
