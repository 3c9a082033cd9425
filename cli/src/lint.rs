//! `firebreak lint <paths...> --config <env-guard config>`: the deploy-time gate of incident 4.
//! Scans the configuration of a non-production environment for protected production credentials
//! with the very detector the env-guard filter runs (`firebreak_core::envguard::Detector`).
//!
//! What is read, per file:
//! - `*.yaml`, `*.yml`: every document (`---`), every string scalar (keys included), with:
//!   Kubernetes `Secret` manifests' `data:` values base64-decoded and `stringData:` taken as is;
//!   string scalars that hold JSON (Envoy's `StringValue` plugin configuration) parsed and walked;
//!   production-only hosts named in any value (except under `production_hosts` itself).
//! - `*.json`: every string value (and key), same rules.
//! - `.env`, `.env.*`, `*.env`: `KEY=VALUE` lines (`export`, single/double quotes, `#` comments).
//! - every text file, those above included: each line, as free text (tokens and their decodings).
//!   This also covers files of any other type, and YAML/JSON that does not parse.
//!
//! Line numbers: YAML and JSON parsers do not report positions for values, so a structured
//! finding is located by searching the file for the value's text (its first line), from the
//! previous finding onwards; when the value is written differently in the file (escapes, folded
//! scalars) the line of its key is used, else the line of the first matching text. A finding at
//! the same line with the same label is reported once (the structured one, which says more).
//!
//! Skipped: directories `.git`, `target`, `.venv`, `node_modules`; symbolic links; files larger
//! than 16 MiB and files with a NUL byte in their first 8 KiB (binary) are reported on stderr.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use firebreak_core::envguard::{Detector, GuardPolicy};
use serde::Deserialize;

pub const SKIP_DIRS: &[&str] = &[".git", "target", ".venv", "node_modules"];
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Debug, Clone, clap::Args)]
pub struct LintArgs {
    /// Files and directories to scan.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// The env-guard configuration (JSON or YAML), or a fingerprints file
    /// (`<label> <sha256> [<length>]` per line, `#` comments).
    #[arg(long)]
    pub config: PathBuf,
}

/// One finding: never carries the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub path: String,
    pub line: usize,
    pub label: String,
    pub how: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {} ({})", self.path, self.line, self.label, self.how)
    }
}

#[derive(Debug, Default)]
pub struct Report {
    pub findings: Vec<Finding>,
    pub files_scanned: usize,
    /// Files skipped, with the reason (printed on stderr).
    pub skipped: Vec<String>,
    exclude: Option<PathBuf>,
}

/// Reads the detector from an env-guard configuration (JSON/YAML) or a fingerprints file.
pub fn load_detector(path: &Path) -> Result<Detector, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("--config {}: {e}", path.display()))?;
    let value: Option<serde_json::Value> = serde_yaml::from_str(&text).ok();
    let policy = match value {
        Some(value @ serde_json::Value::Object(_)) => GuardPolicy::from_value(value),
        _ => {
            let mut credentials = Vec::new();
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let mut parts = line.split_whitespace();
                let bad = || format!("--config {}:{}: expected `<label> <sha256> [<length>]`", path.display(), n + 1);
                match (parts.next(), parts.next(), parts.next(), parts.next()) {
                    (Some(label), Some(sha), None, None) => credentials.push(serde_json::json!({"label": label, "sha256": sha})),
                    (Some(label), Some(sha), Some(length), None) => {
                        let length: u64 = length.parse().map_err(|_| bad())?;
                        credentials.push(serde_json::json!({"label": label, "sha256": sha, "length": length}))
                    }
                    _ => return Err(bad()),
                }
            }
            GuardPolicy::from_value(serde_json::json!({
                "environment": "lint", "production": false, "protected_credentials": credentials,
            }))
        }
    }
    .map_err(|e| format!("--config {}: {e}", path.display()))?;
    if policy.detector.is_empty() {
        return Err(format!("--config {}: nothing to look for (no credentials, patterns or hosts)", path.display()));
    }
    Ok(policy.detector)
}

/// Walks `paths` and scans every file except `exclude` (the guard configuration itself, which
/// names production hosts and patterns on purpose).
pub fn lint_paths(detector: &Detector, paths: &[PathBuf], exclude: Option<&Path>) -> Result<Report, String> {
    let mut report = Report { exclude: exclude.and_then(|p| p.canonicalize().ok()), ..Report::default() };
    for path in paths {
        let meta = std::fs::symlink_metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if meta.is_dir() {
            walk(detector, path, &mut report)?;
        } else {
            lint_file(detector, path, &mut report);
        }
    }
    Ok(report)
}

fn walk(detector: &Detector, dir: &Path, report: &mut Report) -> Result<(), String> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(Result::ok)
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        if meta.is_dir() {
            let name = entry.file_name();
            if SKIP_DIRS.iter().any(|s| name.to_str() == Some(*s)) {
                continue;
            }
            walk(detector, &path, report)?;
        } else if meta.is_file() {
            lint_file(detector, &path, report);
        }
    }
    Ok(())
}

fn lint_file(detector: &Detector, path: &Path, report: &mut Report) {
    let shown = path.display().to_string();
    if report.exclude.is_some() && path.canonicalize().ok() == report.exclude {
        return;
    }
    match std::fs::metadata(path) {
        Ok(meta) if meta.len() > MAX_FILE_BYTES => {
            report.skipped.push(format!("{shown}: larger than {MAX_FILE_BYTES} bytes, not scanned"));
            return;
        }
        Err(e) => {
            report.skipped.push(format!("{shown}: {e}"));
            return;
        }
        Ok(_) => {}
    }
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            report.skipped.push(format!("{shown}: {e}"));
            return;
        }
    };
    if bytes.iter().take(8192).any(|b| *b == 0) {
        report.skipped.push(format!("{shown}: binary, not scanned"));
        return;
    }
    let text = String::from_utf8_lossy(&bytes);
    report.files_scanned += 1;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    report.findings.extend(scan_text_file(detector, &shown, name, &text));
}

/// Scans one file's text; `name` (the file name) picks the structured reader.
pub fn scan_text_file(detector: &Detector, shown: &str, name: &str, text: &str) -> Vec<Finding> {
    let lower = name.to_ascii_lowercase();
    let mut scanner = Scanner { detector, text, shown, cursor: 0, out: Vec::new() };
    if lower.ends_with(".yaml") || lower.ends_with(".yml") {
        scanner.yaml();
    } else if lower.ends_with(".json") {
        if let Ok(value) = serde_json::from_str::<serde_json::Value>(text) {
            scanner.json(&value, "json $", false);
        }
    } else if lower == ".env" || lower.starts_with(".env.") || lower.ends_with(".env") {
        scanner.dotenv();
    }
    let mut findings = scanner.out;
    // Every line as free text: catches comments, other file types, and what the parsers missed.
    for (n, line) in text.lines().enumerate() {
        if let Some(hit) = detector.scan(line.as_bytes(), &[]) {
            let how = if hit.how.is_empty() { "text".to_string() } else { format!("text, {}", hit.how.join(", ")) };
            let finding = Finding { path: shown.to_string(), line: n + 1, label: hit.label.clone(), how };
            if !findings.iter().any(|f| f.line == finding.line && f.label == finding.label) {
                findings.push(finding);
            }
        }
    }
    findings.sort_by(|a, b| a.line.cmp(&b.line).then(a.label.cmp(&b.label)));
    findings.dedup_by(|a, b| a.line == b.line && a.label == b.label);
    findings
}

struct Scanner<'a> {
    detector: &'a Detector,
    text: &'a str,
    shown: &'a str,
    /// Byte offset of the previous located finding.
    cursor: usize,
    out: Vec<Finding>,
}

impl Scanner<'_> {
    fn yaml(&mut self) {
        for document in serde_yaml::Deserializer::from_str(self.text) {
            let Ok(value) = serde_yaml::Value::deserialize(document) else {
                // Unparseable YAML: the line-by-line scan still covers it.
                return;
            };
            let Ok(value) = serde_json::to_value(&value) else { continue };
            let is_secret = value.get("kind").and_then(|k| k.as_str()) == Some("Secret");
            if is_secret {
                self.k8s_secret(&value);
            }
            self.json(&value, "yaml", is_secret);
        }
    }

    /// Kubernetes Secret: `data` values are base64.
    fn k8s_secret(&mut self, doc: &serde_json::Value) {
        let Some(data) = doc.get("data").and_then(|d| d.as_object()) else { return };
        for (key, value) in data {
            let Some(encoded) = value.as_str() else { continue };
            let compact: String = encoded.chars().filter(|c| !c.is_whitespace()).collect();
            let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(compact.as_bytes()) else { continue };
            if let Some(hit) = self.detector.scan(&decoded, &["base64"]) {
                let how = format!("kubernetes Secret data.{key}{}", how_list(&hit));
                let line = self.locate(&[encoded, &format!("{key}:")]);
                self.push(line, hit.label, how);
            }
        }
    }

    /// Every string (and key) of a parsed document. `in_secret`: `data` of a Secret is handled
    /// by [`Self::k8s_secret`].
    fn json(&mut self, value: &serde_json::Value, path: &str, in_secret: bool) {
        match value {
            serde_json::Value::String(s) => self.string(s, path),
            serde_json::Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    self.json(item, &format!("{path}[{i}]"), false);
                }
            }
            serde_json::Value::Object(map) => {
                for (key, item) in map {
                    if let Some(hit) = self.detector.scan(key.as_bytes(), &[]) {
                        let line = self.locate(&[key]);
                        self.push(line, hit.label, format!("{} key", path_text(path)));
                    }
                    let child = if path.ends_with('$') || path == "yaml" {
                        format!("{path}{}{key}", if path == "yaml" { " " } else { "." })
                    } else {
                        format!("{path}.{key}")
                    };
                    if in_secret && key == "data" {
                        continue;
                    }
                    if key == "production_hosts" {
                        // The guard's own list of production hosts is not a use of them.
                        continue;
                    }
                    self.json(item, &child, false);
                }
            }
            _ => {}
        }
    }

    fn string(&mut self, s: &str, path: &str) {
        let key = path.rsplit(['.', ' ']).next().unwrap_or("");
        let key = key.split('[').next().unwrap_or(key);
        // JSON inside a string (Envoy's StringValue plugin configuration): walk it instead, for a
        // precise location.
        let trimmed = s.trim_start();
        if (trimmed.starts_with('{') || trimmed.starts_with('[')) && !path.contains(" json ") {
            if let Ok(inner) = serde_json::from_str::<serde_json::Value>(s) {
                self.json(&inner, &format!("{path} json $"), false);
                return;
            }
        }
        if let Some(hit) = self.detector.scan(s.as_bytes(), &[]) {
            // A multi-line value: point at the line that carries the credential.
            let line_needle =
                s.lines().find(|l| self.detector.scan(l.as_bytes(), &[]).is_some()).unwrap_or_else(|| first_line(s));
            let line = self.locate(&[line_needle, first_line(s), &format!("{key}:"), &format!("\"{key}\"")]);
            self.push(line, hit.label.clone(), format!("{}{}", path_text(path), how_list(&hit)));
            return;
        }
        if let Some(rule) = self.detector.production_host_in_text(s.as_bytes()) {
            let rule = rule.text();
            let line = self.locate(&[first_line(s), &format!("{key}:")]);
            self.push(line, "production_host".to_string(), format!("`{rule}` in {}", path_text(path)));
        }
    }

    fn dotenv(&mut self) {
        for (n, raw) in self.text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
            let Some((key, value)) = line.split_once('=') else { continue };
            let key = key.trim();
            let value = dotenv_value(value.trim());
            if let Some(hit) = self.detector.scan(value.as_bytes(), &[]) {
                let how = format!(".env {key}{}", how_list(&hit));
                self.push(n + 1, hit.label, how);
            } else if let Some(rule) = self.detector.production_host_in_text(value.as_bytes()) {
                let rule = rule.text();
                self.push(n + 1, "production_host".to_string(), format!("`{rule}` in .env {key}"));
            }
        }
    }

    fn push(&mut self, line: usize, label: String, how: String) {
        self.out.push(Finding { path: self.shown.to_string(), line, label, how });
    }

    /// The 1-based line of the first needle found (from the cursor on, then from the start).
    fn locate(&mut self, needles: &[&str]) -> usize {
        for needle in needles.iter().map(|n| n.trim()).filter(|n| !n.is_empty() && *n != ":") {
            let from = self.text.get(self.cursor..).and_then(|rest| rest.find(needle)).map(|i| i + self.cursor);
            if let Some(at) = from.or_else(|| self.text.find(needle)) {
                self.cursor = at;
                return line_of(self.text, at);
            }
        }
        line_of(self.text, self.cursor)
    }
}

/// `, base64, url-encoded`: the decodings that revealed a hit, appended to its location.
fn how_list(hit: &firebreak_core::envguard::Hit) -> String {
    hit.how.iter().map(|h| format!(", {h}")).collect()
}

fn path_text(path: &str) -> String {
    path.to_string()
}

fn first_line(s: &str) -> &str {
    s.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("")
}

fn line_of(text: &str, at: usize) -> usize {
    text.get(..at).map_or(1, |head| head.bytes().filter(|b| *b == b'\n').count() + 1)
}

/// A `.env` value: quotes removed (double quotes understand `\n`, `\"`, `\\`), inline `#`
/// comments of unquoted values dropped.
pub fn dotenv_value(value: &str) -> String {
    if let Some(rest) = value.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = rest.chars();
        while let Some(c) = chars.next() {
            match c {
                '"' => break,
                '\\' => match chars.next() {
                    Some('n') => out.push('\n'),
                    Some(other) => out.push(other),
                    None => break,
                },
                c => out.push(c),
            }
        }
        out
    } else if let Some(rest) = value.strip_prefix('\'') {
        rest.split('\'').next().unwrap_or("").to_string()
    } else {
        value.split(" #").next().unwrap_or(value).trim().to_string()
    }
}

/// `firebreak lint`: the report text and the exit code (1 when anything was found, 0 if clean).
pub fn run(args: &LintArgs) -> Result<(String, i32), String> {
    let detector = load_detector(&args.config)?;
    let report = lint_paths(&detector, &args.paths, Some(&args.config))?;
    for skipped in &report.skipped {
        eprintln!("firebreak lint: skipped {skipped}");
    }
    let mut out = String::new();
    for finding in &report.findings {
        out.push_str(&format!("{finding}\n"));
    }
    if report.findings.is_empty() {
        eprintln!("firebreak lint: {} files scanned, no protected production credential found", report.files_scanned);
        Ok((out, 0))
    } else {
        eprintln!(
            "firebreak lint: {} finding(s) in {} files scanned: production credentials must not be deployed to this environment",
            report.findings.len(),
            report.files_scanned
        );
        Ok((out, 1))
    }
}
