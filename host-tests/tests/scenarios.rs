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

/// A scenario file's chain of separate modules rewritten as the one-module chain
/// (`firebreak_chain.wasm`, one `filters` section per module, in order): same cases, same
/// expectations.
fn as_one_module(file: &std::path::Path) -> String {
    use serde_yaml::{Mapping, Value};
    let mut doc: Value = serde_yaml::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    let top = doc.as_mapping_mut().unwrap();
    let chain = top.remove("chain").unwrap();
    let mut sections = Vec::new();
    let mut env = Mapping::new();
    for filter in chain.as_sequence().unwrap() {
        let module = filter["module"].as_str().unwrap();
        let name = std::path::Path::new(module).file_stem().unwrap().to_str().unwrap().to_string();
        let mut section = Mapping::new();
        section.insert(Value::from(name), filter["plugin"]["configuration"].clone());
        sections.push(Value::Mapping(section));
        if let Some(vars) = filter["plugin"]["env"].as_mapping() {
            env.extend(vars.clone());
        }
    }
    let mut configuration = Mapping::new();
    configuration.insert("filters".into(), Value::Sequence(sections));
    let mut plugin = Mapping::new();
    for field in ["name", "root_id", "vm_id"] {
        plugin.insert(field.into(), "firebreak".into());
    }
    plugin.insert("configuration".into(), Value::Mapping(configuration));
    plugin.insert("env".into(), Value::Mapping(env));
    let module = workspace_root().join("target/wasm32-wasip1/release/firebreak_chain.wasm");
    top.insert("module".into(), module.to_str().unwrap().into());
    top.insert("plugin".into(), Value::Mapping(plugin));
    let name = format!("{} [one module]", top["name"].as_str().unwrap());
    top.insert("name".into(), name.into());
    serde_yaml::to_string(&doc).unwrap()
}

/// The product's chain scenarios give the same verdicts when the filters run as stages of the
/// one-module chain, in the host and in real Envoy.
#[test]
fn chain_scenarios_pass_as_one_module() {
    require_modules();
    let dir = std::env::temp_dir().join(format!("firebreak-one-module-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut files = Vec::new();
    for entry in std::fs::read_dir(scenarios_dir()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if name.starts_with("chain-") && !name.contains("test-filter") {
            // Its own file name: the runner names its run files after the scenario file.
            let one_module = dir.join(format!("one-module-{name}"));
            std::fs::write(&one_module, as_one_module(&path)).unwrap();
            files.push(one_module);
        }
    }
    assert!(files.len() >= 2, "no product chain scenarios found");
    let mode = if default_envoy().exists() { Mode::Both } else { Mode::Host };
    let report = run(&files, &Options { mode, ..Options::default() }).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    println!("{}", report.table());
    assert!(report.rows.len() >= 10);
    assert_eq!(report.failures(), 0, "\n{}", report.table());
}
