//! The one shape every Firebreak rejection takes: an HTTP status, a stable machine-readable code,
//! a JSON body `{"error": "<code>", "message": "..."}`, extra response headers, and the name of
//! the stats counter it increments. Plugins map their decision enums into this in one place.
//!
//! A rejection may also carry an internal `detail` (a reason): it goes to the log line
//! (`reason=<detail>`) and to a second counter (`rejected.<code>.<detail>`), never to the client.
//! Two refusals that must look identical to a caller (an unknown key id and a wrong MAC: no
//! oracle for enumerating key ids) share status, code, message and headers and differ only there.

/// A request the gateway refuses to forward.
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
}

impl Rejection {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Rejection { status, code, message: message.into(), headers: Vec::new(), detail: None }
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
        serde_json::json!({ "error": self.code, "message": self.message })
            .to_string()
            .into_bytes()
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

    /// One greppable, table-like log line:
    /// `firebreak <plugin> reject status=.. code=.. [reason=..] <context> msg=".."`.
    pub fn log_line(&self, plugin: &str, context: &str) -> String {
        let reason = self.detail.map(|d| format!(" reason={d}")).unwrap_or_default();
        format!(
            "firebreak {plugin} reject status={} code={}{reason} {context} msg={:?}",
            self.status, self.code, self.message
        )
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
    fn body_is_the_documented_json_and_escapes_the_message() {
        let r = Rejection::new(401, "signature_invalid", "bad \"quote\"");
        let v: serde_json::Value = serde_json::from_slice(&r.body()).unwrap();
        assert_eq!(v["error"], "signature_invalid");
        assert_eq!(v["message"], "bad \"quote\"");
    }

    #[test]
    fn the_detail_is_logged_and_counted_but_never_sent() {
        let plain = Rejection::new(401, "signature_invalid", "no");
        let detailed = plain.clone().with_detail("unknown_key");
        assert_eq!((plain.body(), plain.response_headers()), (detailed.body(), detailed.response_headers()));
        assert!(!String::from_utf8(detailed.body()).unwrap().contains("unknown_key"));
        assert_eq!(plain.counter_names(), ["rejected.signature_invalid"]);
        assert_eq!(detailed.counter_names(), ["rejected.signature_invalid", "rejected.signature_invalid.unknown_key"]);
        assert!(!plain.log_line("p", "c").contains("reason="));
        assert!(detailed.log_line("p", "c").contains(" code=signature_invalid reason=unknown_key c "));
    }
}
