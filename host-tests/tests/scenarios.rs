//! Scenario files: every file in host-tests/scenarios passes in the host, and every case real
//! Envoy can run gets the same verdict from the host and from Envoy (the host's fidelity).

mod common;

use std::path::PathBuf;
use std::process::Command;

use firebreak_host_tests::envoy::default_envoy;
use firebreak_host_tests::runner::{run, Mode, Options};
use firebreak_host_tests::workspace_root;

fn scenarios_dir() -> PathBuf {
    workspace_root().join("host-tests/scenarios")
}

/// The product modules the scenario files name must exist: `bash scripts/build.sh` builds them.
fn require_modules() {
    common::test_filter_path();
    let wasm = workspace_root().join("target/wasm32-wasip1/release/request_signature.wasm");
    assert!(wasm.exists(), "{} is missing: run `bash scripts/build.sh` first", wasm.display());
}

#[test]
fn every_scenario_file_passes_in_the_host() {
    require_modules();
    let report = run(&[scenarios_dir()], &Options { mode: Mode::Host, ..Options::default() }).unwrap();
    println!("{}", report.table());
    assert!(report.rows.len() > 40);
    assert_eq!(report.failures(), 0, "\n{}", report.table());
}

#[test]
fn scenario_files_agree_between_the_host_and_real_envoy() {
    let envoy = default_envoy();
    if !envoy.exists() && std::env::var("FIREBREAK_SKIP_ENVOY").is_ok() {
        eprintln!("skipped: no Envoy at {} and FIREBREAK_SKIP_ENVOY is set", envoy.display());
        return;
    }
    assert!(envoy.exists(), "no Envoy at {}: run `bash scripts/setup.sh`", envoy.display());
    require_modules();
    let report = run(&[scenarios_dir()], &Options { mode: Mode::Both, ..Options::default() }).unwrap();
    println!("{}", report.table());
    let compared = report.rows.iter().filter(|(_, e, _)| e.as_ref().is_some_and(|e| e.observed.is_some())).count();
    assert!(compared >= 30, "only {compared} cases ran through Envoy");
    assert_eq!(report.failures(), 0, "\n{}", report.table());
}

#[test]
fn a_wrong_expectation_fails_in_the_host_and_in_envoy() {
    let dir = std::env::temp_dir().join(format!("firebreak-wrong-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("wrong.yaml");
    std::fs::write(
        &file,
        "name: wrong on purpose\nplugin: { configuration: {} }\ncases:\n  - name: deny expected to pass\n    request: { headers: { x-test-deny: \"403\" } }\n    expect: { status: 200, forwarded: true }\n",
    )
    .unwrap();
    let mode = if default_envoy().exists() { Mode::Both } else { Mode::Host };
    let options = Options { mode, module: Some(common::test_filter_path()), ..Options::default() };
    let report = run(&[file], &options).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(report.failures(), 1, "\n{}", report.table());
    let table = report.table();
    assert!(table.contains("host: status 403 (want 200)"), "{table}");
    if mode == Mode::Both {
        assert!(table.contains("envoy: status 403 (want 200)"), "{table}");
    }
}

#[test]
fn the_runner_runs_a_module_built_outside_the_project() {
    // The test filter has its own workspace, lock file and release profile: to the runner it is
    // anyone's module, given with --module.
    let out = Command::new(env!("CARGO_BIN_EXE_firebreak-scenarios"))
        .arg("--module")
        .arg(common::test_filter_path())
        .arg(scenarios_dir().join("test-filter-trap.yaml"))
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}{}", String::from_utf8_lossy(&out.stderr));
    assert!(table.contains("4 passed, 0 failed"), "{table}");
}
