//! Whether a filter, or one of its rules, refuses what it decides to refuse or only reports it.
//!
//! Security engineers roll a new rule out in report-only mode first: everything is decided,
//! counted and logged as in enforce mode, and nothing is refused. A would-be refusal counts
//! `would_reject.<code>` instead of `rejected.<code>` and logs one `would_reject` line
//! ([`crate::flow::refuse`]). Switching is a configuration change: `"mode": "enforce"` or
//! `"mode": "report_only"` (enforce when absent).

use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// A refusal is sent to the client.
    #[default]
    Enforce,
    /// A refusal is counted and logged as `would_reject`; the request goes on unchanged.
    ReportOnly,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::ReportOnly => "report_only",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_reads_its_two_spellings_and_refuses_any_other() {
        assert_eq!(serde_json::from_str::<Mode>("\"enforce\"").unwrap(), Mode::Enforce);
        assert_eq!(serde_json::from_str::<Mode>("\"report_only\"").unwrap(), Mode::ReportOnly);
        for wrong in ["\"report\"", "\"Enforce\"", "\"\"", "true", "0"] {
            assert!(serde_json::from_str::<Mode>(wrong).is_err(), "{wrong}");
        }
        assert_eq!(Mode::default(), Mode::Enforce);
    }
}
