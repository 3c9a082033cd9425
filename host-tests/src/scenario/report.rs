//! What a case observed, how it compares with its expectation and with the other runtime, and
//! the report's table.

use std::path::Path;

use base64::Engine as _;

use super::schema::{Expect, HeaderValue};
use crate::http::Verdict;

/// What one request got, in terms both the host and real Envoy can report.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observed {
    pub status: u16,
    pub error: Option<String>,
    pub forwarded: bool,
    pub upstream_headers: Vec<(String, String)>,
    pub upstream_body: Option<Vec<u8>>,
    pub upstream_trailers: Vec<(String, String)>,
    pub response_headers: Vec<(String, String)>,
    pub response_body: Vec<u8>,
    pub host_calls: Option<u64>,
    /// (level, message) of the module's log lines during the case, where the runtime shows them.
    pub logs: Option<Vec<(String, String)>>,
    /// (cluster, headers) of the HTTP callouts made during the case.
    pub callouts: Option<Vec<ObservedCallout>>,
    pub trap: Option<bool>,
    /// How many whole seconds the runtime's clock moved on since the file's first request: a
    /// countdown (`retry-after`, RateLimit's `t=`, a message's `retry in N s`) Envoy reports on
    /// its real clock may be this much lower than the host's on its fake one. 0 for the host.
    pub clock_moved_s: u64,
}

/// An HTTP callout a module made: its cluster and headers.
pub type ObservedCallout = (String, Vec<(String, String)>);

/// Splits the host's `[level] message` log lines.
pub fn host_log_lines(lines: &[String]) -> Vec<(String, String)> {
    lines
        .iter()
        .map(|l| match l.strip_prefix('[').and_then(|r| r.split_once("] ")) {
            Some((level, message)) => (level.to_string(), message.to_string()),
            None => (String::new(), l.clone()),
        })
        .collect()
}

/// Whether one header expectation holds; the problem otherwise.
fn header_problem(what: &str, list: &[(String, String)], name: &str, want: &Option<HeaderValue>) -> Option<String> {
    let all: Vec<&str> = list.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect();
    let ok = match want {
        None => all.is_empty(),
        Some(HeaderValue::One(v)) => all.first() == Some(&v.as_str()),
        Some(HeaderValue::All(vs)) => all.len() == vs.len() && all.iter().zip(vs).all(|(a, b)| *a == b),
    };
    (!ok).then(|| match want {
        Some(HeaderValue::All(vs)) => format!("{what} {name} {all:?} (want {vs:?})"),
        Some(HeaderValue::One(v)) => format!("{what} {name} {:?} (want {v:?})", all.first()),
        None => format!("{what} {name} {:?} (want absent)", all.first()),
    })
}

impl Observed {
    pub fn from_verdict(v: &Verdict) -> Observed {
        Observed {
            status: v.status,
            error: v.error_code(),
            forwarded: v.forwarded(),
            upstream_headers: v.upstream.as_ref().map(|u| u.headers.clone()).unwrap_or_default(),
            upstream_body: v.upstream.as_ref().map(|u| u.body.clone()),
            upstream_trailers: v.upstream.as_ref().map(|u| u.trailers.clone()).unwrap_or_default(),
            response_headers: v.response_headers.clone(),
            response_body: v.response_body.clone(),
            host_calls: Some(v.host_call_total()),
            logs: Some(host_log_lines(&v.logs)),
            callouts: Some(v.callouts.iter().map(|c| (c.cluster.clone(), c.headers.clone())).collect()),
            trap: Some(v.trap.is_some()),
            clock_moved_s: 0,
        }
    }

    /// Log, callout and trap expectations (all a case without a request can check).
    pub fn check_effects(&self, e: &Expect) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(logs) = &self.logs {
            for want in &e.logs {
                let found = logs.iter().any(|(level, message)| want.matches(level, message));
                if found == want.absent {
                    let what = if want.absent { "unwanted log line" } else { "no log line" };
                    let shown: Vec<String> = logs.iter().map(|(l, m)| format!("[{l}] {m}")).collect();
                    out.push(format!("{what} {want:?}; logged: {shown:?}"));
                }
            }
        }
        if let (Some(want), Some(got)) = (&e.callouts, &self.callouts) {
            let mut left: Vec<&(String, Vec<(String, String)>)> = got.iter().collect();
            for c in want {
                let hit = left.iter().position(|(cluster, headers)| {
                    *cluster == c.cluster && c.headers.iter().all(|(k, v)| header_problem("", headers, k, v).is_none())
                });
                match hit {
                    Some(i) => {
                        left.remove(i);
                    }
                    None => out.push(format!("no callout to {} with {:?}; made: {got:?}", c.cluster, c.headers)),
                }
            }
            if !left.is_empty() {
                out.push(format!("unexpected callouts: {left:?}"));
            }
        }
        if let (Some(want), Some(got)) = (e.trap, self.trap) {
            if want != got {
                out.push(format!("trap {got} (want {want})"));
            }
        }
        out
    }

    /// Every value of a header, in order.
    fn values<'a>(list: &'a [(String, String)], name: &str) -> Vec<&'a str> {
        list.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect()
    }

    /// Differences from the expectation, one line each.
    pub fn check(&self, e: &Expect) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(s) = e.status {
            if s != self.status {
                out.push(format!("status {} (want {s})", self.status));
            }
        }
        if let Some(err) = &e.error {
            if *err != self.error {
                out.push(format!("error {:?} (want {err:?})", self.error));
            }
        }
        if let Some(f) = e.forwarded {
            if f != self.forwarded {
                out.push(format!("forwarded {} (want {f})", self.forwarded));
            }
        }
        for (k, want) in &e.upstream_headers {
            out.extend(header_problem("upstream header", &self.upstream_headers, k, want));
        }
        if let Some(b) = &e.upstream_body {
            let got = self.upstream_body.as_ref().map(|b| String::from_utf8_lossy(b).into_owned());
            if got.as_deref() != Some(b.as_str()) {
                out.push(format!("upstream body {got:?} (want {b:?})"));
            }
        }
        if let Some(b) = &e.upstream_body_base64 {
            let got = self.upstream_body.as_ref().map(|b| base64::engine::general_purpose::STANDARD.encode(b));
            if got.as_deref() != Some(b.trim()) {
                out.push(format!("upstream body (base64) {got:?} (want {b:?})"));
            }
        }
        for (k, want) in &e.upstream_trailers {
            out.extend(header_problem("upstream trailer", &self.upstream_trailers, k, want));
        }
        for (k, want) in &e.response_headers {
            out.extend(header_problem("response header", &self.response_headers, k, want));
        }
        if let Some(c) = &e.response_body_contains {
            if !String::from_utf8_lossy(&self.response_body).contains(c.as_str()) {
                out.push(format!("response body {:?} lacks {c:?}", String::from_utf8_lossy(&self.response_body)));
            }
        }
        if let Some(b) = &e.response_body {
            if self.response_body != b.as_bytes() {
                out.push(format!("response body {:?} (want {b:?})", String::from_utf8_lossy(&self.response_body)));
            }
        }
        if let (Some(max), Some(n)) = (e.max_host_calls, self.host_calls) {
            if n > max {
                out.push(format!("{n} host calls (budget {max})"));
            }
        }
        out.extend(self.check_effects(e));
        out
    }

    /// Where the host (`self`) and Envoy (`other`) disagree on anything both observe: status,
    /// the `error` field, whether the request was forwarded, every upstream header, trailer and
    /// the upstream body, every response header and the response body, whatever the case
    /// expects. The headers in [`UPSTREAM_HEADERS_NOT_COMPARED`] and
    /// [`RESPONSE_HEADERS_NOT_COMPARED`] are left out, and for a `signed` request those in
    /// [`SIGNED_HEADERS_NOT_COMPARED`]; a reset stream (status 0 in both) has no
    /// response to compare.
    pub fn disagreements(&self, other: &Observed, signed: bool) -> Vec<String> {
        let mut out = Vec::new();
        if self.status != other.status {
            out.push(format!("status host={} envoy={}", self.status, other.status));
        }
        if self.error != other.error {
            out.push(format!("error host={:?} envoy={:?}", self.error, other.error));
        }
        if self.forwarded != other.forwarded {
            out.push(format!("forwarded host={} envoy={}", self.forwarded, other.forwarded));
        }
        if self.forwarded && other.forwarded {
            let mut skip = names(UPSTREAM_HEADERS_NOT_COMPARED);
            if signed {
                skip.extend(names(SIGNED_HEADERS_NOT_COMPARED));
            }
            out.extend(header_disagreements("upstream header", &self.upstream_headers, &other.upstream_headers, &skip));
            out.extend(header_disagreements("upstream trailer", &self.upstream_trailers, &other.upstream_trailers, &[]));
            if self.upstream_body != other.upstream_body {
                out.push(format!("upstream body host={:?} envoy={:?}", lossy(&self.upstream_body), lossy(&other.upstream_body)));
            }
        }
        if self.status != 0 || other.status != 0 {
            let skip = names(RESPONSE_HEADERS_NOT_COMPARED);
            let slack = other.clock_moved_s;
            for &(name, countdowns) in COUNTDOWN_HEADERS {
                let (a, b) = (Observed::values(&self.response_headers, name), Observed::values(&other.response_headers, name));
                let close = a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| countdowns_agree(x, y, slack, countdowns));
                if !close {
                    out.push(format!("response header {name} host={a:?} envoy={b:?}"));
                }
            }
            let skip: Vec<&str> = skip.into_iter().chain(COUNTDOWN_HEADERS.iter().map(|(name, _)| *name)).collect();
            out.extend(header_disagreements("response header", &self.response_headers, &other.response_headers, &skip));
            // Only a local reply's message counts down (`retry in N s`); a forwarded or stored
            // body is compared byte for byte.
            let local_reply = !self.forwarded && !other.forwarded;
            let same_body = match (std::str::from_utf8(&self.response_body), std::str::from_utf8(&other.response_body)) {
                (Ok(a), Ok(b)) if local_reply => countdowns_agree(a, b, slack, Countdowns::After(&["retry in "])),
                _ => self.response_body == other.response_body,
            };
            if !same_body {
                out.push(format!(
                    "response body host={:?} envoy={:?}",
                    String::from_utf8_lossy(&self.response_body),
                    String::from_utf8_lossy(&other.response_body)
                ));
            }
        }
        out
    }
}

/// Request headers the upstream gets from Envoy that `--mode both` does not compare, and why.
pub const UPSTREAM_HEADERS_NOT_COMPARED: &[(&str, &str)] = &[
    ("x-request-id", "Envoy makes a random UUID per request; the host a fixed one per connection"),
    ("x-envoy-expected-rq-timeout-ms", "added by Envoy's router after the filters, which never see it"),
    (":scheme", "not on the HTTP/1.1 wire the upstream server reads (the filters see it in both)"),
    ("transfer-encoding", "`chunked`: how Envoy frames a body with trailers on the HTTP/1.1 wire, after the filters"),
];

/// Upstream headers not compared for a request the runner signs (`sign:`), and why.
pub const SIGNED_HEADERS_NOT_COMPARED: &[(&str, &str)] = &[
    ("signature", "signed at each runtime's own clock (the host's fake one, Envoy's real one)"),
    ("signature-input", "its `created` is each runtime's own clock"),
];

/// Response headers the client gets from Envoy that `--mode both` does not compare, and why.
pub const RESPONSE_HEADERS_NOT_COMPARED: &[(&str, &str)] = &[
    ("date", "added by Envoy's codec with the real time, after the filters"),
    ("server", "added by Envoy's connection manager (`envoy`) after the filters"),
    ("x-envoy-upstream-service-time", "added by Envoy's router with the real upstream time"),
    ("connection", "`close`, Envoy's answer to the runner's `connection: close` (HTTP/1.1 hop-by-hop)"),
];

/// Response headers whose numbers count down with the clock (each runtime reads its own), and
/// which of their numbers do.
const COUNTDOWN_HEADERS: &[(&str, Countdowns)] =
    &[("retry-after", Countdowns::Whole), ("ratelimit", Countdowns::After(&[";t="]))];

/// Which numbers of a text count down with the clock.
#[derive(Debug, Clone, Copy)]
pub enum Countdowns {
    /// The text is one number (`Retry-After`'s delay-seconds).
    Whole,
    /// The digits right after one of these (RateLimit's `;t=`, a refusal's `retry in `).
    After(&'static [&'static str]),
}

/// `host` and `envoy` are the same text but where a countdown number (`countdowns`) is lower in
/// `envoy` by at most `slack` seconds: the seconds its real clock moved on while the host's fake
/// one stood still. Every other number is compared as text, as the rest is.
pub fn countdowns_agree(host: &str, envoy: &str, slack: u64, countdowns: Countdowns) -> bool {
    if host == envoy {
        return true;
    }
    let (a, b) = (digit_runs(host, countdowns), digit_runs(envoy, countdowns));
    a.len() == b.len()
        && a.iter().zip(&b).all(|(x, y)| match (x, y) {
            (Run::Countdown(x), Run::Countdown(y)) => {
                let (Ok(a), Ok(b)) = (x.parse::<u64>(), y.parse::<u64>()) else { return false };
                // Each written as its number is (no leading zero), the later one not higher.
                a.to_string() == *x && b.to_string() == *y && b <= a && a - b <= slack
            }
            (Run::Text(x), Run::Text(y)) => x == y,
            _ => false,
        })
}

#[derive(Debug)]
enum Run<'a> {
    /// Digits that count down with the clock.
    Countdown(&'a str),
    /// Anything else (other digits included), compared as text.
    Text(&'a str),
}

/// `text` cut into runs of ASCII digits and of everything else, the countdown digit runs marked.
fn digit_runs(text: &str, countdowns: Countdowns) -> Vec<Run<'_>> {
    let mut out = Vec::new();
    let mut rest = text;
    let mut before = "";
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let len = if digits > 0 { digits } else { rest.bytes().take_while(|b| !b.is_ascii_digit()).count() };
        let (run, tail) = rest.split_at(len);
        let countdown = digits > 0
            && match countdowns {
                Countdowns::Whole => run.len() == text.len(),
                Countdowns::After(prefixes) => prefixes.iter().any(|p| before.ends_with(p)),
            };
        out.push(if countdown { Run::Countdown(run) } else { Run::Text(run) });
        before = run;
        rest = tail;
    }
    out
}

fn names(list: &[(&'static str, &str)]) -> Vec<&'static str> {
    list.iter().map(|(name, _)| *name).collect()
}

fn lossy(body: &Option<Vec<u8>>) -> Option<String> {
    body.as_ref().map(|b| String::from_utf8_lossy(b).into_owned())
}

/// Every header name either side has (but those in `skip`), where their values differ (all
/// values of the name, in order).
fn header_disagreements(what: &str, host: &[(String, String)], envoy: &[(String, String)], skip: &[&str]) -> Vec<String> {
    let mut all: Vec<String> = host.iter().chain(envoy).map(|(k, _)| k.to_ascii_lowercase()).collect();
    all.sort();
    all.dedup();
    let mut out = Vec::new();
    for name in all.iter().filter(|n| !skip.contains(&n.as_str())) {
        let (a, b) = (Observed::values(host, name), Observed::values(envoy, name));
        if a != b {
            out.push(format!("{what} {name} host={a:?} envoy={b:?}"));
        }
    }
    out
}

/// One row of the report.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub file: String,
    pub case: String,
    pub outcome: Outcome,
    pub observed: Option<Observed>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Pass,
    Fail(Vec<String>),
    Skipped(String),
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Fail(_) => "FAIL",
            Outcome::Skipped(_) => "skip",
        }
    }
}

pub(crate) fn outcome(problems: Vec<String>) -> Outcome {
    if problems.is_empty() {
        Outcome::Pass
    } else {
        Outcome::Fail(problems)
    }
}

/// The pass/fail table: `columns` names the runtimes of each row's two results (the second is
/// `-` when a run has one).
pub fn render_table(rows: &[(CaseResult, Option<CaseResult>, Vec<String>)], columns: [&str; 2]) -> String {
    let [first, second] = columns;
    let mut out = String::new();
    let w = rows.iter().map(|(h, _, _)| h.case.chars().count()).max().unwrap_or(4).clamp(4, 70);
    out.push_str(&format!("{:<36} {:<w$} {:<6} {:<5}  details\n", "file", "case", first, second));
    for (host, envoy, mismatch) in rows {
        let file = Path::new(&host.file).file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        let envoy_label = match envoy {
            None => "-",
            Some(e) => e.outcome.label(),
        };
        let mut details = Vec::new();
        match &host.outcome {
            Outcome::Fail(p) => details.push(format!("{first}: {}", p.join("; "))),
            Outcome::Skipped(r) => details.push(format!("{first} skipped: {r}")),
            Outcome::Pass => {}
        }
        if let Some(e) = envoy {
            match &e.outcome {
                Outcome::Fail(p) => details.push(format!("{second}: {}", p.join("; "))),
                Outcome::Skipped(r) => details.push(format!("{second} skipped: {r}")),
                Outcome::Pass => {}
            }
        }
        if !mismatch.is_empty() {
            details.push(format!("MISMATCH {first}/{second}: {}", mismatch.join("; ")));
        }
        let case: String = host.case.chars().take(w).collect();
        out.push_str(&format!(
            "{:<36} {:<w$} {:<6} {:<5}  {}\n",
            file,
            case,
            host.outcome.label(),
            envoy_label,
            details.join(" | ")
        ));
    }
    out
}
