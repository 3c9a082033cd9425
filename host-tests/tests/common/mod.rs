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
    PATH.get_or_init(|| {
        let root = workspace_root();
        let target = root.join("target/test-filter");
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--quiet", "--release", "--target", "wasm32-wasip1", "--manifest-path"])
            .arg(root.join("host-tests/test-filter/Cargo.toml"))
            .arg("--target-dir")
            .arg(&target)
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building host-tests/test-filter failed");
        target.join("wasm32-wasip1/release/firebreak_test_filter.wasm")
    })
    .clone()
}
