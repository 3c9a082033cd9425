//! Runs proxy-wasm scenario files (any module, ours or anyone's) and prints a pass/fail table.
//!
//!   firebreak-scenarios [--mode host|envoy|envoy-native|both] [--module M.wasm] [--envoy PATH]
//!                       [--native-dir DIR] FILE_OR_DIR...
//!
//! `host` (default) runs in the wasmtime test host; `envoy` through real Envoy; `envoy-native`
//! through real Envoy with the native module (`DIR/libfirebreak.so`, default `target/native`) in
//! place of each Firebreak wasm module; `both` runs host and Envoy and fails when they disagree.
//! Exit status 1 on any failure.

use std::path::PathBuf;

use firebreak_host_tests::runner::{run, Mode, Options};

fn main() {
    let mut options = Options::default();
    let mut paths = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--mode" => {
                options.mode = match args.next().as_deref() {
                    Some("host") => Mode::Host,
                    Some("envoy") => Mode::Envoy,
                    Some("envoy-native") => Mode::EnvoyNative,
                    Some("both") => Mode::Both,
                    other => usage(&format!("unknown mode {other:?}")),
                }
            }
            "--module" => options.module = Some(PathBuf::from(args.next().unwrap_or_else(|| usage("--module needs a path")))),
            "--envoy" => options.envoy = PathBuf::from(args.next().unwrap_or_else(|| usage("--envoy needs a path"))),
            "--native-dir" => {
                options.native_dir = PathBuf::from(args.next().unwrap_or_else(|| usage("--native-dir needs a directory")))
            }
            "-h" | "--help" => usage(""),
            _ => paths.push(PathBuf::from(a)),
        }
    }
    if paths.is_empty() {
        usage("no scenario files");
    }
    match run(&paths, &options) {
        Ok(report) => {
            print!("{}", report.table());
            std::process::exit(if report.failures() == 0 { 0 } else { 1 });
        }
        Err(e) => {
            eprintln!("firebreak-scenarios: {e:#}");
            std::process::exit(2);
        }
    }
}

fn usage(problem: &str) -> ! {
    if !problem.is_empty() {
        eprintln!("firebreak-scenarios: {problem}");
    }
    eprintln!(
        "usage: firebreak-scenarios [--mode host|envoy|envoy-native|both] [--module M.wasm] [--envoy PATH] [--native-dir DIR] FILE_OR_DIR..."
    );
    std::process::exit(2);
}
