//! `firebreak lint` and `firebreak fingerprint`, run as the real binary on planted trees.
//! Incident 4: production push credentials deployed to UAT must fail the deploy.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use base64::Engine as _;

/// FAKE demo credentials (documented as fake): never real keys.
const PROD: &str = "FAKE-apns-prod-key-firebreak-demo-0001";
const PROD_FP: &str = "0e66bad553a33fe1a876eeaf7621c6b18c2d577e65fdfabf4ab6868e104fda7d";
const UAT: &str = "FAKE-apns-uat-key-firebreak-demo-0001";

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_firebreak"))
}

/// A fresh directory under the system temp dir.
fn tree() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!("firebreak-lint-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst)));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, text).unwrap();
    path
}

fn guard_config(dir: &Path) -> PathBuf {
    write(
        dir,
        "guard/env-guard.json",
        &format!(
            r#"{{"environment":"uat","production":false,
                "protected_credentials":[{{"label":"apns-prod","sha256":"{PROD_FP}","length":{}}}],
                "patterns":[{{"label":"stripe-live","prefix":"sk_live_"}}],
                "production_hosts":["api.push.apple.com"]}}"#,
            PROD.len()
        ),
    )
}

fn lint(config: &Path, paths: &[&Path]) -> (i32, String, String) {
    let out: Output = bin().arg("lint").args(paths).arg("--config").arg(config).output().unwrap();
    (out.status.code().unwrap(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[test]
fn incident4_prod_push_key_in_a_kubernetes_secret_fails_the_deploy() {
    let dir = tree();
    let config = guard_config(&dir);
    let secret = write(
        &dir,
        "deploy/push-secret.yaml",
        &format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: push-config\ndata:\n  MODE: uat\n---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: push\ntype: Opaque\ndata:\n  UAT_KEY: {}\n  APNS_KEY: {}\n",
            b64(UAT),
            b64(PROD)
        ),
    );
    let (code, out, err) = lint(&config, &[&dir.join("deploy")]);
    assert_eq!(code, 1, "{out}{err}");
    let expected = format!("{}:15: apns-prod (kubernetes Secret data.APNS_KEY, base64)\n", secret.display());
    assert_eq!(out, expected);
    assert!(!out.contains(PROD) && !err.contains(PROD) && !out.contains(&b64(PROD)));
}

#[test]
fn incident4_prod_push_key_in_a_dotenv_file_fails_the_deploy() {
    let dir = tree();
    let config = guard_config(&dir);
    let env = write(
        &dir,
        "app/.env",
        &format!("# uat settings\nPUSH_MODE=sandbox\nexport APNS_KEY=\"{PROD}\" # copied from prod\nUAT_KEY='{UAT}'\n"),
    );
    let (code, out, _) = lint(&config, &[&dir]);
    assert_eq!(code, 1);
    assert_eq!(out, format!("{}:3: apns-prod (.env APNS_KEY)\n", env.display()));
}

#[test]
fn a_clean_tree_passes() {
    let dir = tree();
    let config = guard_config(&dir);
    write(
        &dir,
        "deploy/secret.yaml",
        &format!("apiVersion: v1\nkind: Secret\nmetadata: {{name: push}}\ndata:\n  APNS_KEY: {}\n", b64(UAT)),
    );
    write(&dir, "deploy/.env", &format!("APNS_KEY={UAT}\nHOST=api.sandbox.push.apple.com\n"));
    write(&dir, "deploy/app.json", &format!(r#"{{"push":{{"key":"{UAT}","host":"api.sandbox.push.apple.com"}}}}"#));
    write(&dir, "README.md", "Push keys live in the vault. Stripe test keys look like sk_test_123.\n");
    // The guard's own configuration (fingerprints, patterns, production hosts) is clean, also
    // when it is embedded in an Envoy configuration under the scanned tree.
    write(
        &dir,
        "envoy/sidecar.yaml",
        &format!(
            "http_filters:\n- name: envoy.filters.http.wasm\n  typed_config:\n    config:\n      configuration:\n        value: |\n          {{\"environment\": \"uat\", \"production\": false,\n           \"protected_credentials\": [{{\"label\": \"apns-prod\", \"sha256\": \"{PROD_FP}\"}}],\n           \"patterns\": [{{\"label\": \"stripe-live\", \"prefix\": \"sk_live_\"}}],\n           \"production_hosts\": [\"api.push.apple.com\"]}}\n"
        ),
    );
    // Skipped directories hold the key: not scanned.
    write(&dir, ".git/config", PROD);
    write(&dir, "target/debug/x.env", &format!("K={PROD}\n"));
    write(&dir, ".venv/lib/site.yaml", &format!("k: {PROD}\n"));
    let (code, out, err) = lint(&config, &[&dir]);
    assert_eq!((code, out.as_str()), (0, ""), "{err}");
    assert!(err.contains("no protected production credential found"), "{err}");
}

#[test]
fn envoy_yaml_istio_json_and_text_are_all_read() {
    let dir = tree();
    let config = guard_config(&dir);
    // Envoy: the key inside the JSON plugin configuration string of a wasm filter.
    let envoy = write(
        &dir,
        "envoy.yaml",
        &format!(
            "static_resources:\n  listeners:\n  - name: egress\n    filter_chains:\n    - filters:\n      - name: wasm\n        configuration:\n          value: |\n            {{\"provider\": {{\"url\": \"https://push.example\",\n              \"key\": \"{PROD}\"}}}}\n"
        ),
    );
    // Istio: a ServiceEntry that sends UAT traffic to the production push host.
    let istio = write(
        &dir,
        "istio/push.yaml",
        "apiVersion: networking.istio.io/v1beta1\nkind: ServiceEntry\nmetadata:\n  name: apns\nspec:\n  hosts:\n  - api.push.apple.com\n  ports:\n  - number: 443\n    name: https\n    protocol: TLS\n",
    );
    // JSON: nested, and URL-encoded inside a URL.
    let json = write(
        &dir,
        "app/config.json",
        &format!("{{\n  \"push\": {{\n    \"url\": \"https://p.example/send?key={}\"\n  }}\n}}\n", PROD.replace('-', "%2D")),
    );
    // Plain text with a live Stripe key.
    let text = write(&dir, "notes/runbook.txt", "step 1\nexport STRIPE=sk_live_4eC39HqLyjWDarjtT1zdp7dc\n");
    // Multi-line block scalar, base64 of a document that carries the key.
    let block = write(
        &dir,
        "deploy/cm.yaml",
        &format!("kind: ConfigMap\ndata:\n  blob: |\n    header\n    {}\n", b64(&format!("{{\"key\":\"{PROD}\"}}"))),
    );
    let (code, out, err) = lint(&config, &[&dir]);
    assert_eq!(code, 1, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    let expect = [
        format!("{}:5: apns-prod (yaml data.blob, base64)", block.display()),
        format!("{}:3: apns-prod (json $.push.url, url-encoded)", json.display()),
        format!("{}:10: apns-prod (yaml static_resources.listeners[0].filter_chains[0].filters[0].configuration.value json $.provider.key)", envoy.display()),
        format!("{}:7: production_host (`api.push.apple.com` in yaml spec.hosts[0])", istio.display()),
        format!("{}:2: stripe-live (text)", text.display()),
    ];
    for e in &expect {
        assert!(lines.contains(&e.as_str()), "missing {e}\n---\n{out}");
    }
    assert_eq!(lines.len(), expect.len(), "{out}");
}

#[test]
fn fingerprints_file_works_as_config() {
    let dir = tree();
    let fps = write(&dir, "fingerprints.txt", &format!("# label sha256\napns-prod {PROD_FP}\n"));
    let env = write(&dir, "x/.env.uat", &format!("A={PROD}\n"));
    let (code, out, _) = lint(&fps, &[&dir.join("x")]);
    assert_eq!((code, out), (1, format!("{}:1: apns-prod (.env A)\n", env.display())));
    // With the length `fingerprint --label` prints.
    let fps = write(&dir, "fingerprints-len.txt", &format!("apns-prod {PROD_FP} {}\n", PROD.len()));
    let (code, out, _) = lint(&fps, &[&dir.join("x")]);
    assert_eq!((code, out), (1, format!("{}:1: apns-prod (.env A)\n", env.display())));
}

#[test]
fn usage_and_config_errors_exit_2() {
    let dir = tree();
    let bad_fp = write(
        &dir,
        "bad.json",
        r#"{"environment":"uat","production":false,"protected_credentials":[{"label":"a","sha256":"not-hex"}]}"#,
    );
    let (code, _, err) = lint(&bad_fp, &[&dir]);
    assert_eq!(code, 2);
    assert!(err.contains("protected_credentials[0].sha256"), "{err}");
    let bad_lines = write(&dir, "fps.txt", "apns-prod\n");
    assert_eq!(lint(&bad_lines, &[&dir]).0, 2);
    let bad_length = write(&dir, "fps-len.txt", &format!("apns-prod {PROD_FP} long\n"));
    assert_eq!(lint(&bad_length, &[&dir]).0, 2);
    let zero_length = write(&dir, "fps-zero.txt", &format!("apns-prod {PROD_FP} 0\n"));
    let (code, _, err) = lint(&zero_length, &[&dir]);
    assert_eq!(code, 2);
    assert!(err.contains("protected_credentials[0].length"), "{err}");
    let config = guard_config(&dir);
    assert_eq!(lint(&config, &[&dir.join("does-not-exist")]).0, 2);
    assert_eq!(lint(&dir.join("missing.json"), &[&dir]).0, 2);
    let out = bin().args(["lint", "--config"]).arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "no paths");
}

fn fingerprint(stdin: &[u8], args: &[&str]) -> (i32, String) {
    let mut child = bin()
        .arg("fingerprint")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.code().unwrap(), String::from_utf8(out.stdout).unwrap())
}

#[test]
fn fingerprint_strips_exactly_one_trailing_newline() {
    assert_eq!(fingerprint(format!("{PROD}\n").as_bytes(), &[]), (0, format!("{PROD_FP}\n")));
    assert_eq!(fingerprint(PROD.as_bytes(), &[]), (0, format!("{PROD_FP}\n")));
    assert_eq!(fingerprint(format!("{PROD}\r\n").as_bytes(), &[]), (0, format!("{PROD_FP}\n")));
    // sha256("abc"), from FIPS 180-2
    assert_eq!(fingerprint(b"abc\n", &[]).1, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n");
    assert_ne!(fingerprint(format!("{PROD}\n\n").as_bytes(), &[]).1, format!("{PROD_FP}\n"));
    assert_ne!(fingerprint(format!("{PROD}\n").as_bytes(), &["--keep-newline"]).1, format!("{PROD_FP}\n"));
    assert_eq!(
        fingerprint(PROD.as_bytes(), &["--label", "apns-prod"]),
        (0, format!("{{\"label\":\"apns-prod\",\"sha256\":\"{PROD_FP}\",\"length\":{}}}\n", PROD.len()))
    );
    assert_eq!(fingerprint(b"\n", &[]).0, 2);
    assert_eq!(fingerprint(b"x", &["--label", "bad label"]).0, 2);
}

#[test]
fn istio_wasm_plugin_with_the_guard_config_is_clean_and_a_planted_key_is_found() {
    let dir = tree();
    let config = guard_config(&dir);
    let manifest = format!(
        "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata:\n  name: guard\nspec:\n  pluginConfig:\n    environment: uat\n    production: false\n    protected_credentials:\n    - {{ label: apns-prod, sha256: {PROD_FP} }}\n    patterns:\n    - {{ label: stripe-live, prefix: sk_live_ }}\n    production_hosts: [api.push.apple.com]\n---\napiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata:\n  name: pusher\nspec:\n  vmConfig:\n    env:\n    - name: APNS_KEY\n      value: {PROD}\n"
    );
    let clean = write(&dir, "istio/guard.yaml", manifest.split("---").next().unwrap());
    let (code, out, _) = lint(&config, &[&clean]);
    assert_eq!((code, out.as_str()), (0, ""));
    let planted = write(&dir, "istio/all.yaml", &manifest);
    let (code, out, _) = lint(&config, &[&planted]);
    assert_eq!((code, out), (1, format!("{}:23: apns-prod (yaml spec.vmConfig.env[0].value)\n", planted.display())));
}
