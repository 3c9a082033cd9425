//! `firebreak-wasm-trim <module.wasm>...`: drops the proxy-wasm callback exports a module's
//! filter does not act on, rewriting each file in place (idempotent).
//!
//! Envoy's proxy-wasm host looks each callback up once when it loads a module and, for one the
//! module does not export, answers for it (`Continue`) without entering the VM. The Rust SDK
//! exports every callback, so a filter that never looks at the response would still be entered
//! for its headers, each body chunk and the access-log point. Which events a filter acts on is
//! declared by the engine (`firebreak_core::filters::events_used`, checked by core's tests); the
//! mapping to proxy-wasm export names lives here, with the rest of the proxy-wasm specifics.
//! A module that is not one filter's (the chain, a test module) is left as it is.

use std::path::Path;
use std::process::ExitCode;

use firebreak_core::filters::{events_used, EventKind};
use wasm_encoder::{ExportKind, ExportSection, RawSection, Section};
use wasmparser::{ExternalKind, Parser, Payload};

/// The proxy-wasm export through which Envoy delivers each kind of event.
fn export_of(kind: EventKind) -> &'static str {
    match kind {
        EventKind::RequestHeaders => "proxy_on_request_headers",
        EventKind::RequestBody => "proxy_on_request_body",
        EventKind::RequestTrailers => "proxy_on_request_trailers",
        EventKind::ResponseHeaders => "proxy_on_response_headers",
        EventKind::ResponseBody => "proxy_on_response_body",
        EventKind::ResponseTrailers => "proxy_on_response_trailers",
        EventKind::CallAnswer => "proxy_on_http_call_response",
        EventKind::StreamEnd => "proxy_on_log",
    }
}

fn kind_of(kind: ExternalKind) -> ExportKind {
    match kind {
        ExternalKind::Func | ExternalKind::FuncExact => ExportKind::Func,
        ExternalKind::Table => ExportKind::Table,
        ExternalKind::Memory => ExportKind::Memory,
        ExternalKind::Global => ExportKind::Global,
        ExternalKind::Tag => ExportKind::Tag,
    }
}

/// The module without the exports named in `unused`; every other section byte for byte.
fn trim(bytes: &[u8], unused: &[&str]) -> Result<(Vec<u8>, Vec<String>), String> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut removed = Vec::new();
    for payload in Parser::new(0).parse_all(bytes) {
        let payload = payload.map_err(|e| e.to_string())?;
        match &payload {
            Payload::Version { range, .. } => out.extend_from_slice(bytes.get(range.clone()).ok_or("truncated header")?),
            Payload::ExportSection(reader) => {
                let mut section = ExportSection::new();
                for export in reader.clone() {
                    let export = export.map_err(|e| e.to_string())?;
                    if unused.contains(&export.name) {
                        removed.push(export.name.to_string());
                    } else {
                        section.export(export.name, kind_of(export.kind), export.index);
                    }
                }
                section.append_to(&mut out);
            }
            other => {
                if let Some((id, range)) = other.as_section() {
                    let data = bytes.get(range).ok_or("section out of bounds")?;
                    RawSection { id, data }.append_to(&mut out);
                }
            }
        }
    }
    Ok((out, removed))
}

fn run(path: &Path) -> Result<String, String> {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    let Some(used) = events_used(stem).filter(|_| stem != firebreak_core::filters::CHAIN) else {
        return Ok(format!("{}: not one filter's module, left as it is", path.display()));
    };
    let unused: Vec<&str> = EventKind::ALL.iter().filter(|k| !used.contains(k)).map(|k| export_of(*k)).collect();
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let (trimmed, removed) = trim(&bytes, &unused).map_err(|e| format!("{}: {e}", path.display()))?;
    // The result must still be a valid module.
    wasmparser::validate(&trimmed).map_err(|e| format!("{}: trimmed module invalid: {e}", path.display()))?;
    // A new file renamed over the old one: never written through a hard link (cargo links the
    // module to its copy under deps/, and a `cp -al` of target/ shares every file).
    let fresh = path.with_extension("wasm.trimmed");
    std::fs::write(&fresh, &trimmed).map_err(|e| format!("{}: {e}", fresh.display()))?;
    std::fs::rename(&fresh, path).map_err(|e| format!("{}: {e}", path.display()))?;
    let what = match (unused.is_empty(), removed.is_empty()) {
        (true, _) => "nothing (its filter acts on every event)".to_string(),
        (false, true) => "nothing (already trimmed)".to_string(),
        (false, false) => removed.join(", "),
    };
    Ok(format!("{}: removed {what}", path.display()))
}

fn main() -> ExitCode {
    let paths: Vec<String> = std::env::args().skip(1).collect();
    if paths.is_empty() {
        eprintln!("usage: firebreak-wasm-trim <module.wasm>...");
        return ExitCode::from(2);
    }
    for path in paths {
        match run(Path::new(&path)) {
            Ok(line) => println!("{line}"),
            Err(error) => {
                eprintln!("firebreak-wasm-trim: {error}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
