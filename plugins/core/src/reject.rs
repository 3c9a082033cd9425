//! The one shape every Firebreak rejection takes: an HTTP status, a stable machine-readable code,
//! a JSON body `{"error": "<code>", "message": "..."}`, extra response headers, and the name of
//! the stats counter it increments. Plugins map their decision enums into this in one place.

/// A request the gateway refuses to forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: u16,
    /// Stable, machine-readable; also the suffix of the stats counter.
    pub code: &'static str,
    /// Human-readable; never contains a secret, a MAC or a signature base.
    pub message: String,
    pub headers: Vec<(String, String)>,
}

impl Rejection {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Rejection { status, code, message: message.into(), headers: Vec::new() }
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

    /// One greppable, table-like log line: `firebreak <plugin> reject status=.. code=.. <context> msg=".."`.
    pub fn log_line(&self, plugin: &str, context: &str) -> String {
        format!(
            "firebreak {plugin} reject status={} code={} {context} msg={:?}",
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
}
