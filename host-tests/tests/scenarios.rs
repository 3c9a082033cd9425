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

/// Every scenario file passes in the host, and every case Envoy can run gets the same verdict
/// from real Envoy. Without Envoy (only with FIREBREAK_SKIP_ENVOY set) the host half still runs.
#[test]
fn scenario_files_pass_in_the_host_and_agree_with_real_envoy() {
    require_modules();
    let envoy = default_envoy();
    let mode = if envoy.exists() {
        Mode::Both
    } else if std::env::var("FIREBREAK_SKIP_ENVOY").is_ok() {
        eprintln!("no Envoy at {}: host only (FIREBREAK_SKIP_ENVOY)", envoy.display());
        Mode::Host
    } else {
        panic!("no Envoy at {}: run `bash scripts/setup.sh` (or set FIREBREAK_SKIP_ENVOY)", envoy.display());
    };
    let report = run(&[scenarios_dir()], &Options { mode, ..Options::default() }).unwrap();
    println!("{}", report.table());
    assert!(report.rows.len() > 40);
    if mode == Mode::Both {
        let compared = report.rows.iter().filter(|(_, e, _)| e.as_ref().is_some_and(|e| e.observed.is_some())).count();
        assert!(compared >= 30, "only {compared} cases ran through Envoy");
    }
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
