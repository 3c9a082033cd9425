//! Shared by the integration tests: modules compiled once per test binary.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, OnceLock};

use firebreak_host_tests::{workspace_root, Module};

/// Builds (cargo no-ops when fresh) and compiles the host's own test filter, once per binary.
pub fn test_filter() -> Arc<Module> {
    static MODULE: OnceLock<Arc<Module>> = OnceLock::new();
    MODULE.get_or_init(|| Module::load(test_filter_path()).expect("test filter compiles")).clone()
}

pub fn test_filter_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| build_test_module("test-filter", "firebreak_test_filter.wasm")).clone()
}

/// The root-only test module (`host-tests/test-service`): no HTTP context, logs its ticks.
pub fn test_service() -> Arc<Module> {
    static MODULE: OnceLock<Arc<Module>> = OnceLock::new();
    MODULE.get_or_init(|| Module::load(test_service_path()).expect("test service compiles")).clone()
}

pub fn test_service_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| build_test_module("test-service", "firebreak_test_service.wasm")).clone()
}

/// The gRPC, buffer-limit and log test module (`host-tests/test-grpc`).
pub fn test_grpc_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| build_test_module("test-grpc", "firebreak_test_grpc.wasm")).clone()
}

/// Builds one of host-tests' own modules (each its own workspace) into target/test-filter.
fn build_test_module(dir: &str, wasm: &str) -> PathBuf {
    let root = workspace_root();
    let target = root.join("target/test-filter");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--quiet", "--release", "--target", "wasm32-wasip1", "--manifest-path"])
        .arg(root.join("host-tests").join(dir).join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building host-tests/{dir} failed");
    target.join("wasm32-wasip1/release").join(wasm)
}
