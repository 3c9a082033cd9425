//! Scenario files: every file in host-tests/scenarios passes in the host, and every case real
//! Envoy can run gets the same verdict from the host and from Envoy (the host's fidelity), and
//! the verdict the file expects from real Envoy on the native module (`libfirebreak.so`).

mod common;

use std::path::PathBuf;
use std::process::Command;

use firebreak_host_tests::envoy::{default_envoy, default_native_dir, NATIVE_LIBRARY};
use firebreak_host_tests::runner::{run, Mode, Options, Report};
use firebreak_host_tests::scenario::Outcome;
use firebreak_host_tests::workspace_root;

fn scenarios_dir() -> PathBuf {
    workspace_root().join("host-tests/scenarios")
}

/// The product modules the scenario files name must exist: `bash scripts/build.sh` builds them.
fn require_modules() {
    common::test_filter_path();
    common::test_service_path();
    common::test_grpc_path();
    let wasm = workspace_root().join("target/wasm32-wasip1/release/request_signature.wasm");
    assert!(wasm.exists(), "{} is missing: run `bash scripts/build.sh` first", wasm.display());
}

/// The native module the native runs load: `bash scripts/build.sh` builds it.
fn require_native_module() {
    let library = default_native_dir().join(NATIVE_LIBRARY);
    assert!(library.exists(), "{} is missing: run `bash scripts/build.sh` first", library.display());
}

/// Whether the pinned Envoy is there; without it, only with FIREBREAK_SKIP_ENVOY set, the tests
/// that need it run what they can without.
fn envoy_present() -> bool {
    let envoy = default_envoy();
    if envoy.exists() {
        return true;
    }
    if std::env::var("FIREBREAK_SKIP_ENVOY").is_ok() {
        eprintln!("no Envoy at {}: skipping the Envoy runs (FIREBREAK_SKIP_ENVOY)", envoy.display());
        return false;
    }
    panic!("no Envoy at {}: run `bash scripts/setup.sh` (or set FIREBREAK_SKIP_ENVOY)", envoy.display());
}

/// Every scenario file passes in the host, and every case Envoy can run gets the same verdict
/// from real Envoy. Without Envoy (only with FIREBREAK_SKIP_ENVOY set) the host half still runs.
#[test]
fn scenario_files_pass_in_the_host_and_agree_with_real_envoy() {
    require_modules();
    let mode = if envoy_present() { Mode::Both } else { Mode::Host };
    let report = run(&[scenarios_dir()], &Options { mode, ..Options::default() }).unwrap();
    println!("{}", report.table());
    assert!(report.rows.len() > 40);
    if mode == Mode::Both {
        let compared = report.rows.iter().filter(|(_, e, _)| e.as_ref().is_some_and(|e| e.observed.is_some())).count();
        assert!(compared >= 30, "only {compared} cases ran through Envoy");
    }
    assert_eq!(report.failures(), 0, "\n{}", report.table());
}

/// The files and cases of a one-runtime report: files with a case that ran, cases that ran (a
/// request sent, or the start refused as expected), and the skipped cases by reason.
struct Counts {
    files: usize,
    cases: usize,
    skipped: std::collections::BTreeMap<String, usize>,
}

fn counts(report: &Report) -> Counts {
    let mut files = std::collections::BTreeSet::new();
    let mut counts = Counts { files: 0, cases: 0, skipped: Default::default() };
    for (row, _, _) in &report.rows {
        match &row.outcome {
            Outcome::Skipped(reason) => *counts.skipped.entry(reason.clone()).or_default() += 1,
            _ => {
                files.insert(row.file.clone());
                counts.cases += 1;
            }
        }
    }
    counts.files = files.len();
    counts
}

/// Every Firebreak scenario file through real Envoy with the native module (`libfirebreak.so`) in
/// place of its wasm module(s): every case Envoy can run gets the verdict the file expects. The
/// test filters' files are skipped (not Firebreak filters), and so are the cases Envoy mode skips;
/// host-call budgets do not apply.
#[test]
fn scenario_files_pass_on_the_native_module_in_real_envoy() {
    require_native_module();
    if !envoy_present() {
        return;
    }
    let report = run(&[scenarios_dir()], &Options { mode: Mode::EnvoyNative, ..Options::default() }).unwrap();
    println!("{}", report.table());
    let counts = counts(&report);
    println!("native in Envoy: {} files, {} cases; skipped: {:#?}", counts.files, counts.cases, counts.skipped);
    assert!(counts.files >= 19, "only {} files ran on the native module", counts.files);
    assert!(counts.cases >= 160, "only {} cases ran on the native module", counts.cases);
    let test_filter_skips = report.rows.iter().filter(|(row, _, _)| {
        matches!(&row.outcome, Outcome::Skipped(reason) if reason.starts_with("firebreak_test_filter.wasm is not a Firebreak filter"))
    });
    assert!(test_filter_skips.count() >= 60, "the test filters' files must be skipped, by name");
    assert_eq!(report.failures(), 0, "\n{}", report.table());
}

/// A case whose verdict on the native module differs from the file's fails the native run, with
/// what differed; the plugin's `env` reaches the module through Envoy's environment.
#[test]
fn a_wrong_expectation_fails_on_the_native_module() {
    require_native_module();
    if !envoy_present() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("firebreak-wrong-native-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("wrong-native.yaml");
    // The module's file name only names the native filter: the file need not exist.
    let secret = "YS1zZWNyZXQtb2YtYXQtbGVhc3QtdGhpcnR5LXR3by1ieXRlcyEh";
    let yaml = format!(
        r#"name: wrong on purpose, natively
module: request_signature.wasm
plugin:
  configuration:
    routes: [{{ methods: [POST], path_prefix: /v1/ }}]
    keys: [{{ id: k1, secret_env: WRONG_ON_PURPOSE_KEY }}]
    max_age_seconds: 300
  env: {{ WRONG_ON_PURPOSE_KEY: {secret} }}
cases:
  - name: signed with the key from the environment
    request: {{ method: POST, path: /v1/pay, body: "{{}}" }}
    sign: {{ key_id: k1, secret_b64: {secret}, nonce: n-1 }}
    expect: {{ status: 200, forwarded: true }}
  - name: unsigned expected to pass
    request: {{ method: POST, path: /v1/pay, body: "{{}}" }}
    expect: {{ status: 200, forwarded: true }}
"#
    );
    std::fs::write(&file, yaml).unwrap();
    let report = run(&[file], &Options { mode: Mode::EnvoyNative, ..Options::default() }).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let table = report.table();
    assert_eq!((report.passes(), report.failures()), (1, 1), "\n{table}");
    assert!(table.contains("native: status 401 (want 200); forwarded false (want true)"), "{table}");
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
/// one-module chain, in the host and in real Envoy, and on the native module's `chain`.
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
    let native = (mode == Mode::Both).then(|| run(&files, &Options { mode: Mode::EnvoyNative, ..Options::default() }).unwrap());
    let _ = std::fs::remove_dir_all(&dir);
    println!("{}", report.table());
    assert!(report.rows.len() >= 10);
    assert_eq!(report.failures(), 0, "\n{}", report.table());
    if let Some(native) = native {
        println!("{}", native.table());
        assert!(counts(&native).cases >= 15, "\n{}", native.table());
        assert_eq!(native.failures(), 0, "\n{}", native.table());
    }
}
