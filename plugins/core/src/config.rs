//! Typed configuration values whose errors still name their field.
//!
//! serde's errors do not carry a field path, and the configuration errors must (see
//! [`ConfigError`]). A field that takes one of an enum's spellings is therefore read as a
//! [`Choice`]: serde reads the string and parses it into the enum (its spellings come from the
//! enum's own `#[serde(rename_all = ...)]`), and the caller, which knows the field's full path,
//! turns an unknown spelling into a [`ConfigError`] at that path. The validated policy holds the
//! enum itself, which cannot be invalid.

use serde::de::{DeserializeOwned, Deserializer, IntoDeserializer};
use serde::Deserialize;

use crate::ConfigError;

/// One of `T`'s spellings, or why the configured text is none of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice<T>(Result<T, String>);

impl<T: Copy> Choice<T> {
    /// The value, or a configuration error at `field` (the full path, e.g. `rules[0].key`).
    pub fn get(&self, field: impl Into<String>) -> Result<T, ConfigError> {
        self.0.clone().map_err(|message| ConfigError::new(field, message))
    }
}

impl<T> From<T> for Choice<T> {
    fn from(value: T) -> Self {
        Choice(Ok(value))
    }
}

impl<T: Default> Default for Choice<T> {
    fn default() -> Self {
        Choice(Ok(T::default()))
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Choice<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Anything but a string is a type error of the whole document, as for a `String` field.
        let text = String::deserialize(deserializer)?;
        let parsed = T::deserialize(IntoDeserializer::<serde::de::value::Error>::into_deserializer(text.as_str()));
        Ok(Choice(parsed.map_err(|e| e.to_string())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum Mode {
        #[default]
        Closed,
        IpAndUser,
    }

    #[derive(Debug, Deserialize)]
    struct Raw {
        #[serde(default)]
        mode: Choice<Mode>,
    }

    #[test]
    fn a_spelling_parses_and_an_unknown_one_is_an_error_at_the_callers_path() {
        let raw: Raw = serde_json::from_str(r#"{"mode": "ip_and_user"}"#).unwrap();
        assert_eq!(raw.mode.get("a.mode"), Ok(Mode::IpAndUser));
        let raw: Raw = serde_json::from_str("{}").unwrap();
        assert_eq!(raw.mode.get("a.mode"), Ok(Mode::Closed));
        let raw: Raw = serde_json::from_str(r#"{"mode": "Closed"}"#).unwrap();
        let error = raw.mode.get("rules[3].mode").unwrap_err();
        assert_eq!(error.field, "rules[3].mode");
        assert_eq!(error.message, "unknown variant `Closed`, expected `closed` or `ip_and_user`");
        // Not a string: a type error of the document, as before.
        assert!(serde_json::from_str::<Raw>(r#"{"mode": 1}"#).is_err());
    }
}
