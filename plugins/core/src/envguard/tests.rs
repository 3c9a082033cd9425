use std::io::Write;

use base64::Engine as _;

use super::request::{CODE_CREDENTIAL, CODE_ENCODING, CODE_HOST, CODE_TOO_DEEP, CODE_TOO_LARGE, CODE_UNDECODABLE};
use super::*;

/// The demo's fake production push key (documented as fake; never a real credential).
const PROD: &str = "fake-apns-prod-key-0123456789abcdef";
/// A test environment's own key: must pass.
const TEST_KEY: &str = "fake-apns-test-key-0123456789abcdef";
/// Basic-auth production password.
const PROD_PASSWORD: &str = "Pr0d-Passw0rd-For-FCM!";

/// The credentials with their `length` (as `firebreak fingerprint --label` prints them).
fn credentials() -> String {
    format!(
        r#"[{{"label":"apns-prod","sha256":"{}","length":{}}},{{"label":"fcm-prod-password","sha256":"{}","length":{}}}]"#,
        fingerprint(PROD.as_bytes()),
        PROD.len(),
        fingerprint(PROD_PASSWORD.as_bytes()),
        PROD_PASSWORD.len()
    )
}

/// The same credentials without `length` (configurations written before it existed).
fn credentials_without_lengths() -> String {
    format!(
        r#"[{{"label":"apns-prod","sha256":"{}"}},{{"label":"fcm-prod-password","sha256":"{}"}}]"#,
        fingerprint(PROD.as_bytes()),
        fingerprint(PROD_PASSWORD.as_bytes())
    )
}

fn config_with(credentials: &str, production: bool, extra: &str) -> String {
    format!(
        r#"{{"environment":"uat","production":{production},
            "protected_credentials":{credentials},
            "patterns":[{{"label":"stripe-live","prefix":"sk_live_"}},{{"label":"aws-prod-key","regex":"AKIA[0-9A-Z]{{16}}"}}],
            "production_hosts":["api.push.apple.com","*.prod.example.com"]{extra}}}"#
    )
}

fn config(production: bool, extra: &str) -> String {
    config_with(&credentials(), production, extra)
}

fn policy() -> GuardPolicy {
    GuardPolicy::from_json(config(false, "").as_bytes()).unwrap()
}

/// Fingerprints only (no pattern): the decode bounds apply in full.
fn fingerprints_only_policy() -> GuardPolicy {
    let json = format!(r#"{{"environment":"uat","production":false,"protected_credentials":{}}}"#, credentials());
    GuardPolicy::from_json(json.as_bytes()).unwrap()
}

fn policy_without_lengths() -> GuardPolicy {
    GuardPolicy::from_json(config_with(&credentials_without_lengths(), false, "").as_bytes()).unwrap()
}

fn policy_with(extra: &str) -> GuardPolicy {
    GuardPolicy::from_json(config(false, extra).as_bytes()).unwrap()
}

fn req(method: &str, path: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut h = vec![
        (":method".to_string(), method.to_string()),
        (":path".to_string(), path.to_string()),
        (":authority".to_string(), "uat-api.example.com".to_string()),
        (":scheme".to_string(), "http".to_string()),
    ];
    h.extend(extra.iter().map(|(n, v)| (n.to_string(), v.to_string())));
    h
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn zlib(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Header-time verdict; on success the body verdict too.
fn run(p: &GuardPolicy, headers: &[(String, String)], body: &[u8]) -> Result<BodyOutcome, GuardError> {
    let plan = check_headers(p, headers)?;
    check_body(p, &plan, body)
}

fn credential(result: Result<BodyOutcome, GuardError>) -> (String, String) {
    match result {
        Err(GuardError::Credential { label, location, .. }) => (label, location),
        other => panic!("expected a credential finding, got {other:?}"),
    }
}

// --- incident 4 regressions ----------------------------------------------------------------

#[test]
fn incident4_prod_push_key_in_uat_push_request_body_is_refused() {
    let p = policy();
    let body = format!(r#"{{"push":{{"key":"{PROD}","alert":"hhhhh"}}}}"#);
    let h = req("POST", "/v1/push", &[("content-type", "application/json")]);
    let (label, location) = credential(run(&p, &h, body.as_bytes()));
    assert_eq!(label, "apns-prod");
    assert_eq!(location, "body json $.push.key");
    let rejection = GuardError::Credential { label, place: Place::Body, location }.rejection("uat");
    assert_eq!(rejection.status, 403);
    assert_eq!(rejection.code, CODE_CREDENTIAL);
    assert!(rejection.message.contains("apns-prod") && rejection.message.contains("uat"));
    assert!(!rejection.message.contains(PROD));
}

#[test]
fn incident4_test_keys_pass() {
    let p = policy();
    let body = format!(r#"{{"push":{{"key":"{TEST_KEY}","alert":"hhhhh"}}}}"#);
    let h = req(
        "POST",
        "/v1/push?token=".to_string().add(TEST_KEY).as_str(),
        &[("content-type", "application/json"), ("authorization", &format!("Bearer {TEST_KEY}")), ("x-api-key", TEST_KEY)],
    );
    assert_eq!(run(&p, &h, body.as_bytes()), Ok(BodyOutcome::Clean));
}

trait Add {
    fn add(self, s: &str) -> String;
}
impl Add for String {
    fn add(mut self, s: &str) -> String {
        self.push_str(s);
        self
    }
}

// --- headers --------------------------------------------------------------------------------

#[test]
fn bearer_basic_and_plain_headers() {
    let p = policy();
    type Case<'a> = (Vec<(&'a str, String)>, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (vec![("authorization", format!("Bearer {PROD}"))], "apns-prod", "header authorization (bearer)"),
        (vec![("authorization", format!("bearer   {PROD}  "))], "apns-prod", "header authorization (bearer)"),
        (
            vec![("authorization", format!("Basic {}", b64(format!("svc:{PROD_PASSWORD}").as_bytes())))],
            "fcm-prod-password",
            "header authorization (basic password)",
        ),
        (vec![("authorization", format!("Basic {}", b64(PROD.as_bytes())))], "apns-prod", "header authorization (basic)"),
        (vec![("authorization", format!("key={PROD}"))], "apns-prod", "header authorization"),
        (vec![("x-apns-key", PROD.to_string())], "apns-prod", "header x-apns-key"),
        (vec![("x-apns-key", format!(" {PROD}\t"))], "apns-prod", "header x-apns-key"),
        (vec![("x-apns-key", b64(PROD.as_bytes()))], "apns-prod", "header x-apns-key (base64)"),
        (
            vec![("x-apns-key", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(PROD))],
            "apns-prod",
            "header x-apns-key (base64)",
        ),
        (vec![("cookie", format!("session=abc; push_key={PROD}; x=1"))], "apns-prod", "header cookie push_key"),
        (vec![("x-stripe", "sk_live_51Habcdefghijklmnop".to_string())], "stripe-live", "header x-stripe"),
        (vec![("x-aws", "creds AKIAIOSFODNN7EXAMPLE here".to_string())], "aws-prod-key", "header x-aws"),
    ];
    for (extra, label, location) in cases {
        let extra: Vec<(&str, &str)> = extra.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let got = credential(run(&p, &req("GET", "/", &extra), b""));
        assert_eq!(got, (label.to_string(), location.to_string()), "{extra:?}");
    }
}

#[test]
fn query_parameters_plain_and_encoded() {
    let p = policy();
    let enc: String = percent_encoding::utf8_percent_encode(PROD, percent_encoding::NON_ALPHANUMERIC).to_string();
    for (path, location) in [
        (format!("/push?token={PROD}"), "query param token"),
        (format!("/push?a=1&token={enc}"), "query param token"),
        (format!("/push?token={}", b64(PROD.as_bytes()).replace('=', "%3D")), "query param token (base64)"),
        (format!("/keys/{PROD}/send"), "path"),
    ] {
        let (label, got) = credential(run(&p, &req("GET", &path, &[]), b""));
        assert_eq!((label.as_str(), got.as_str()), ("apns-prod", location), "{path}");
    }
}

#[test]
fn production_hosts_exact_and_wildcard_with_port_and_case() {
    let p = policy();
    for host in ["api.push.apple.com", "API.Push.Apple.com:443", "api.push.apple.com.", "fcm.prod.example.com"] {
        let mut h = req("POST", "/3/device/x", &[]);
        h[2].1 = host.to_string();
        assert_eq!(check_headers(&p, &h).unwrap_err().code(), CODE_HOST, "{host}");
    }
    for host in ["api.sandbox.push.apple.com", "prod.example.com", "notprod.example.com", "push.apple.com"] {
        let mut h = req("POST", "/", &[]);
        h[2].1 = host.to_string();
        assert!(check_headers(&p, &h).is_ok(), "{host}");
    }
    // HTTP/1 Host header without :authority.
    let h = vec![(":path".to_string(), "/".to_string()), ("host".to_string(), "api.push.apple.com".to_string())];
    assert_eq!(check_headers(&p, &h).unwrap_err().code(), CODE_HOST);
}

#[test]
fn trailers_are_checked() {
    let p = policy();
    let t = vec![("x-checksum".to_string(), "abc".to_string()), ("x-push-key".to_string(), PROD.to_string())];
    match check_trailers(&p, &t) {
        Err(GuardError::Credential { location, .. }) => assert_eq!(location, "trailer x-push-key"),
        other => panic!("{other:?}"),
    }
    assert!(check_trailers(&p, &t[..1]).is_ok());
}

// --- bodies ----------------------------------------------------------------------------------

#[test]
fn json_at_any_depth_and_arrays_and_encodings() {
    let p = policy();
    let json = |body: String| run(&p, &req("POST", "/", &[("content-type", "application/json; charset=utf-8")]), body.as_bytes());
    assert_eq!(credential(json(format!(r#"{{"a":[1,{{"b":{{"c":["x","{PROD}"]}}}}]}}"#))).1, "body json $.a[1].b.c[1]");
    assert_eq!(
        credential(json(format!(r#"{{"push":{{"key":"{}"}}}}"#, b64(PROD.as_bytes())))).1,
        "body json $.push.key (base64)"
    );
    assert_eq!(credential(json(r#"{"k":"\u0066ake-apns-prod-key-0123456789abcdef"}"#.to_string())).1, "body json $.k");
    assert_eq!(credential(json(format!(r#"{{"weird key!":"{PROD}"}}"#))).1, r#"body json $["?"]"#);
    assert_eq!(credential(json(format!(r#"{{"url":"https://push.example/send?key={PROD}&x=1"}}"#))).1, "body json $.url");
    // base64 of a JSON document carrying the key
    let inner = b64(format!(r#"{{"key":"{PROD}"}}"#).as_bytes());
    assert_eq!(credential(json(format!(r#"{{"payload":"{inner}"}}"#))).1, "body json $.payload (base64)");
    // double base64
    let twice = b64(b64(PROD.as_bytes()).as_bytes());
    assert_eq!(credential(json(format!(r#"{{"p":"{twice}"}}"#))).1, "body json $.p (base64, base64)");
    // not JSON although declared: scanned as text
    assert_eq!(credential(json(format!(r#"{{"key": "{PROD}""#))).1, "body text");
    assert_eq!(json(format!(r#"{{"key":"{TEST_KEY}"}}"#)), Ok(BodyOutcome::Clean));
}

#[test]
fn form_fields_and_raw_text() {
    let p = policy();
    let enc: String = percent_encoding::utf8_percent_encode(PROD, percent_encoding::NON_ALPHANUMERIC).to_string();
    let form = req("POST", "/", &[("content-type", "application/x-www-form-urlencoded")]);
    assert_eq!(credential(run(&p, &form, format!("to=1&key={enc}").as_bytes())).1, "body form field key");
    let text = req("POST", "/", &[("content-type", "text/plain")]);
    for body in [
        format!("please use {PROD} for the push"),
        format!("key:{PROD}\n"),
        format!("line1\nAPNS_KEY=\"{PROD}\"\nline3"),
        format!("ends with it {PROD}."),
        format!("see https://x.example/k/{PROD}/send"),
        format!("wrapped: {}", b64(format!("token {PROD} inside").as_bytes())),
    ] {
        let (label, location) = credential(run(&p, &text, body.as_bytes()));
        assert_eq!(label, "apns-prod", "{body}");
        assert!(location.starts_with("body text"), "{location}");
    }
    assert_eq!(run(&p, &text, format!("nothing here {TEST_KEY} but tests").as_bytes()), Ok(BodyOutcome::Clean));
}

#[test]
fn mime_wrapped_base64_body_is_decoded() {
    // base64 wrapped at 16 characters (MIME wraps at 76), of a JSON document carrying the key.
    let p = policy();
    let encoded = b64(format!(r#"{{"push":{{"key":"{PROD}","alert":"hhhhh"}}}}"#).as_bytes());
    let wrapped: Vec<String> = encoded.as_bytes().chunks(16).map(|c| String::from_utf8(c.to_vec()).unwrap()).collect();
    let h = req("POST", "/", &[("content-type", "application/octet-stream")]);
    assert_eq!(
        credential(run(&p, &h, wrapped.join("\r\n").as_bytes())),
        ("apns-prod".to_string(), "body text (base64)".to_string())
    );
}

#[test]
fn gzip_and_deflate_bodies_are_decoded() {
    let p = policy();
    let body = format!(r#"{{"push":{{"key":"{}"}}}}"#, b64(PROD.as_bytes()));
    let h = req("POST", "/", &[("content-type", "application/json"), ("content-encoding", "gzip")]);
    assert_eq!(credential(run(&p, &h, &gzip(body.as_bytes()))).1, "body json $.push.key (gzip, base64)");
    let h = req("POST", "/", &[("content-type", "application/json"), ("content-encoding", "deflate")]);
    assert_eq!(credential(run(&p, &h, &zlib(body.as_bytes()))).1, "body json $.push.key (deflate, base64)");
    // raw deflate (no zlib header) is accepted as "deflate" too
    let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(body.as_bytes()).unwrap();
    assert_eq!(credential(run(&p, &h, &e.finish().unwrap())).0, "apns-prod");
    // stacked: deflate applied first, then gzip
    let h = req("POST", "/", &[("content-type", "application/json"), ("content-encoding", "deflate, gzip")]);
    assert_eq!(credential(run(&p, &h, &gzip(&zlib(body.as_bytes())))).1, "body json $.push.key (gzip, deflate, base64)");
    // clean gzip passes
    let h = req("POST", "/", &[("content-type", "application/json"), ("content-encoding", "gzip")]);
    assert_eq!(run(&p, &h, &gzip(br#"{"key":"fine"}"#)), Ok(BodyOutcome::Clean));
}

#[test]
fn unknown_or_broken_encodings_fail_closed() {
    let p = policy();
    for coding in ["br", "zstd", "compress", "gzip, br", "gzip, gzip, gzip, gzip"] {
        let err = check_headers(&p, &req("POST", "/", &[("content-encoding", coding)])).unwrap_err();
        assert_eq!(err.code(), CODE_ENCODING, "{coding}");
        assert_eq!(err.rejection("uat").status, 415);
    }
    let h = req("POST", "/", &[("content-encoding", "gzip")]);
    assert_eq!(run(&p, &h, b"definitely not gzip").unwrap_err().code(), CODE_UNDECODABLE);
    let mut truncated = gzip(PROD.as_bytes());
    truncated.truncate(truncated.len() - 6);
    assert_eq!(run(&p, &h, &truncated).unwrap_err().code(), CODE_UNDECODABLE);
    // identity is fine
    assert!(check_headers(&p, &req("POST", "/", &[("content-encoding", "identity")])).is_ok());
}

#[test]
fn zip_bomb_is_bounded_and_follows_over_limit() {
    // 64 MiB of zeros compresses to ~64 KiB; the limit is 1 MiB decoded.
    let zeros = vec![0u8; 64 * 1024 * 1024];
    let bomb = gzip(&zeros);
    drop(zeros);
    let h = req("POST", "/", &[("content-encoding", "gzip")]);
    let block = policy_with(r#","max_decoded_bytes":1048576"#);
    let err = run(&block, &h, &bomb).unwrap_err();
    assert_eq!(err, GuardError::TooLarge { decoded: true });
    assert_eq!(err.rejection("uat").status, 413);
    let pass = policy_with(r#","max_decoded_bytes":1048576,"over_limit":"pass""#);
    assert_eq!(run(&pass, &h, &bomb), Ok(BodyOutcome::Uninspected));
    // exactly at the limit is inspected
    let at = policy_with(r#","max_decoded_bytes":64"#);
    let body = format!("{PROD} {}", "x".repeat(64 - PROD.len() - 1));
    assert_eq!(body.len(), 64);
    assert_eq!(credential(run(&at, &h, &gzip(body.as_bytes()))).0, "apns-prod");
    assert_eq!(run(&at, &h, &gzip(format!("{body}x").as_bytes())).unwrap_err().code(), CODE_TOO_LARGE);
}

#[test]
fn body_over_max_body_bytes_follows_over_limit() {
    let h = req("POST", "/", &[]);
    let body = format!("{PROD} {}", "y".repeat(200));
    let block = policy_with(r#","max_body_bytes":100"#);
    assert_eq!(run(&block, &h, body.as_bytes()).unwrap_err().code(), CODE_TOO_LARGE);
    let pass = policy_with(r#","max_body_bytes":100,"over_limit":"pass""#);
    assert_eq!(run(&pass, &h, body.as_bytes()), Ok(BodyOutcome::Uninspected));
    assert_eq!(over_limit(&block).unwrap_err().code(), CODE_TOO_LARGE);
}

// --- configuration ---------------------------------------------------------------------------

#[test]
fn production_true_parses_and_the_guard_is_told_not_to_block() {
    let p = GuardPolicy::from_json(config(true, "").as_bytes()).unwrap();
    assert!(p.production);
    // A production environment may omit everything to guard.
    let p = GuardPolicy::from_json(br#"{"environment":"prod","production":true}"#).unwrap();
    assert!(p.production && p.detector.is_empty());
}

#[test]
fn routes_limit_what_is_guarded() {
    let p = policy_with(r#","routes":[{"methods":["POST"],"path_prefix":"/v1/"}]"#);
    assert!(p.guards("POST", "/v1/push").applies());
    assert!(!p.guards("GET", "/v1/push").applies());
    assert!(policy().guards("GET", "/anything").applies());
}

#[test]
fn each_bad_field_is_named() {
    let fp = fingerprint(PROD.as_bytes());
    let cases = [
        (r#"{"production":false,"production_hosts":["a.example"]}"#.to_string(), "environment"),
        (r#"{"environment":"u a t","production":false,"production_hosts":["a.example"]}"#.to_string(), "environment"),
        (r#"{"environment":"uat","production_hosts":["a.example"]}"#.to_string(), "production"),
        (r#"{"environment":"uat","production":false}"#.to_string(), "protected_credentials"),
        (r#"{"environment":"uat","production":false,"protected_credentials":[{"label":"a","sha256":"abc"}]}"#.to_string(), "protected_credentials[0].sha256"),
        (format!(r#"{{"environment":"uat","production":false,"protected_credentials":[{{"label":"a","sha256":"{}"}}]}}"#, "z".repeat(64)), "protected_credentials[0].sha256"),
        // the secret itself instead of its fingerprint
        (format!(r#"{{"environment":"uat","production":false,"protected_credentials":[{{"label":"a","sha256":"{PROD}"}}]}}"#), "protected_credentials[0].sha256"),
        (format!(r#"{{"environment":"uat","production":false,"protected_credentials":[{{"label":"a b","sha256":"{fp}"}}]}}"#), "protected_credentials[0].label"),
        (format!(r#"{{"environment":"uat","production":false,"protected_credentials":[{{"label":"a","sha256":"{fp}"}},{{"label":"b","sha256":"{}"}}]}}"#, fp.to_uppercase()), "protected_credentials[1].sha256"),
        (r#"{"environment":"uat","production":false,"patterns":[{"label":"a","prefix":"sk"}]}"#.to_string(), "patterns[0].prefix"),
        (r#"{"environment":"uat","production":false,"patterns":[{"label":"a"}]}"#.to_string(), "patterns[0]"),
        (r#"{"environment":"uat","production":false,"patterns":[{"label":"a","prefix":"sk_live_","regex":"x"}]}"#.to_string(), "patterns[0]"),
        (r#"{"environment":"uat","production":false,"patterns":[{"label":"a","regex":"("}]}"#.to_string(), "patterns[0].regex"),
        (r#"{"environment":"uat","production":false,"patterns":[{"label":"a","regex":"x*"}]}"#.to_string(), "patterns[0].regex"),
        (r#"{"environment":"uat","production":false,"production_hosts":["https://a.example"]}"#.to_string(), "production_hosts[0]"),
        (r#"{"environment":"uat","production":false,"production_hosts":["a.example:443"]}"#.to_string(), "production_hosts[0]"),
        (r#"{"environment":"uat","production":false,"production_hosts":["A.example"]}"#.to_string(), "production_hosts[0]"),
        (r#"{"environment":"uat","production":false,"production_hosts":["*"]}"#.to_string(), "production_hosts[0]"),
        (r#"{"environment":"uat","production":false,"production_hosts":["a.example"],"routes":[]}"#.to_string(), "routes"),
        (r#"{"environment":"uat","production":false,"production_hosts":["a.example"],"routes":[{"methods":["post"],"path_prefix":"/"}]}"#.to_string(), "routes[0].methods"),
        (r#"{"environment":"uat","production":false,"production_hosts":["a.example"],"max_body_bytes":0}"#.to_string(), "max_body_bytes"),
        (r#"{"environment":"uat","production":false,"production_hosts":["a.example"],"max_decoded_bytes":67108865}"#.to_string(), "max_decoded_bytes"),
        (r#"{"environment":"uat","production":false,"production_hosts":["a.example"],"over_limit":"allow"}"#.to_string(), "over_limit"),
    ];
    for (json, field) in cases {
        let err = GuardPolicy::from_json(json.as_bytes()).unwrap_err();
        assert_eq!(err.field, field, "{json}: {err}");
        assert!(!err.message.contains(PROD), "{err}");
    }
    let err = GuardPolicy::from_json(br#"{"environment":"uat","production":false,"bogus":1}"#).unwrap_err();
    assert!(err.message.contains("bogus"), "{err}");
    // Upper-case hex is accepted (and equal to lower-case).
    let upper = format!(
        r#"{{"environment":"uat","production":false,"protected_credentials":[{{"label":"a","sha256":"{}"}}]}}"#,
        fp.to_uppercase()
    );
    let p = GuardPolicy::from_json(upper.as_bytes()).unwrap();
    assert!(p.detector.scan(PROD.as_bytes(), &[]).is_some());
}

// --- detector edge cases ---------------------------------------------------------------------

#[test]
fn near_misses_do_not_match() {
    let d = &policy().detector;
    for value in [
        &PROD[..PROD.len() - 1],
        &format!("{PROD}x"),
        &format!("x{PROD}"),
        &PROD.to_uppercase(),
        "sk_test_51Habcdefghij",
        "sk_live_",
        "AKIA_short",
        "",
        "   ",
    ] {
        assert_eq!(d.scan(value.as_bytes(), &[]), None, "{value}");
    }
}

#[test]
fn the_message_and_log_never_carry_the_value() {
    let p = policy();
    let h = req("GET", &format!("/x?{PROD}=1"), &[]);
    let err = check_headers(&p, &h).unwrap_err();
    let r = err.rejection("uat");
    assert!(!r.message.contains(PROD) && !err.log_context().contains(PROD), "{r:?}");
    // A header whose *name* is the secret is named "?".
    let h = req("GET", "/", &[(PROD, PROD)]);
    let err = check_headers(&p, &h).unwrap_err();
    assert!(!format!("{err:?}").contains(PROD), "{err:?}");
    assert_eq!(err.detection_counter().as_deref(), Some("detected.apns-prod.header"));
}

#[test]
fn large_text_is_scanned_in_linear_work() {
    // 1 MiB of words with the key at the end: must finish (no quadratic search) and find it.
    let p = policy_with(r#","max_body_bytes":2097152"#);
    let mut body = "lorem ipsum dolorsit amet consectetur ".repeat(1024 * 1024 / 38);
    body.push_str(PROD);
    let h = req("POST", "/", &[("content-type", "text/plain")]);
    assert_eq!(credential(run(&p, &h, body.as_bytes())).0, "apns-prod");
    let long_token = "A".repeat(1024 * 1024);
    assert_eq!(run(&p, &h, long_token.as_bytes()), Ok(BodyOutcome::Clean));
}

#[test]
fn fingerprint_is_sha256_hex() {
    assert_eq!(fingerprint(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    assert_eq!(parse_fingerprint(&fingerprint(b"abc")).map(|f| f.len()), Some(32));
    assert_eq!(parse_fingerprint("ba78"), None);
}

#[test]
fn arbitrary_inputs_never_panic() {
    // Deterministic xorshift: bodies, headers and codings built from random bytes biased towards
    // the characters the detector cares about.
    let p = policy_with(r#","max_decoded_bytes":65536"#);
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let alphabet = b"aZ09+/=-_%:.{}[]\",;& \n\r\t\\?#@!\x00\xff\xc3";
    for round in 0..1000 {
        let len = (next() % 200) as usize;
        let mut body: Vec<u8> = (0..len).map(|_| alphabet[(next() % alphabet.len() as u64) as usize]).collect();
        if round % 7 == 0 {
            body.extend_from_slice(PROD.as_bytes());
        }
        let text = String::from_utf8_lossy(&body).replace(['\r', '\n', '\0'], "x");
        for (ct, ce) in
            [("application/json", ""), ("application/x-www-form-urlencoded", ""), ("text/plain", "gzip"), ("", "deflate")]
        {
            let mut extra = vec![("content-type", ct), ("x-h", text.as_str()), ("authorization", text.as_str())];
            if !ce.is_empty() {
                extra.push(("content-encoding", ce));
            }
            let path = format!("/v1/x?{}", text.replace(' ', "+"));
            let h = req("POST", &path, &extra);
            if let Ok(plan) = check_headers(&p, &h) {
                let _ = check_body(&p, &plan, &body);
                if !ce.is_empty() {
                    let _ = check_body(&p, &plan, &gzip(&body));
                }
            }
        }
        let _ = p.detector.production_host_in_text(&body);
        let _ = super::detect::host_of(&text);
    }
}

// --- cost cuts keep every detection ----------------------------------------------------------

fn url_encoded(value: &str) -> String {
    percent_encoding::utf8_percent_encode(value, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// The detections the length check, the decode bounds and the header skip list must not lose,
/// with lengths configured, without (backward compatibility), and with fingerprints only (no
/// pattern: the tightest bounds).
#[test]
fn detection_holds_with_and_without_lengths() {
    let json_h = req("POST", "/v1/push", &[("content-type", "application/json")]);
    let gzip_h = req("POST", "/v1/push", &[("content-type", "application/json"), ("content-encoding", "gzip")]);
    let basic = format!("Basic {}", b64(format!("push-svc:{PROD}").as_bytes()));
    let bearer = format!("Bearer {PROD}");
    let b64_key = b64(PROD.as_bytes());
    let url_key = url_encoded(PROD);
    let deep = format!(r#"{{"a":{{"b":[1,{{"c":{{"d":["x","{PROD}"]}}}}]}}}}"#);
    let deep_b64 = format!(r#"{{"a":{{"b":[{{"c":"{b64_key}"}}]}}}}"#);
    let gz = gzip(format!(r#"{{"push":{{"key":"{PROD}"}}}}"#).as_bytes());
    type Case = (Vec<(String, String)>, Vec<u8>, &'static str);
    let cases: Vec<Case> = vec![
        (req("GET", "/", &[("x-apns-key", PROD)]), vec![], "header x-apns-key"),
        (req("GET", "/", &[("authorization", &bearer)]), vec![], "header authorization (bearer)"),
        (req("GET", "/", &[("authorization", &basic)]), vec![], "header authorization (basic password)"),
        (req("GET", "/", &[("x-apns-key", &b64_key)]), vec![], "header x-apns-key (base64)"),
        (req("GET", "/", &[("x-apns-key", &url_key)]), vec![], "header x-apns-key (url-encoded)"),
        (req("GET", &format!("/push?key={url_key}"), &[]), vec![], "query param key"),
        (req("GET", &format!("/push?key={}", url_encoded(&b64_key)), &[]), vec![], "query param key (base64)"),
        (json_h.clone(), deep.into_bytes(), "body json $.a.b[1].c.d[1]"),
        (json_h.clone(), deep_b64.into_bytes(), "body json $.a.b[0].c (base64)"),
        (gzip_h, gz, "body json $.push.key (gzip)"),
    ];
    for (name, p) in
        [("lengths", policy()), ("fingerprints only", fingerprints_only_policy()), ("no lengths", policy_without_lengths())]
    {
        assert_eq!(p.detector.lengths_known(), name != "no lengths");
        for (headers, body, location) in &cases {
            let (label, got) = credential(run(&p, headers, body));
            assert_eq!((label.as_str(), got.as_str()), ("apns-prod", *location), "{name}: {headers:?}");
        }
    }
}

#[test]
fn a_token_of_the_same_length_that_is_not_the_key_passes() {
    // Same length as PROD, one character different: hashed (length matches), no match.
    let other = PROD.replace("0123", "0124");
    assert_eq!(other.len(), PROD.len());
    let json_h = req("POST", "/v1/push", &[("content-type", "application/json")]);
    for p in [policy(), fingerprints_only_policy()] {
        let body = format!(r#"{{"push":{{"key":"{other}","k2":"{}"}}}}"#, b64(other.as_bytes()));
        let h = req(
            "POST",
            &format!("/v1/push?key={}", url_encoded(&other)),
            &[
                ("content-type", "application/json"),
                ("authorization", &format!("Bearer {other}")),
                ("x-apns-key", &b64(other.as_bytes())),
                ("x-other", &other),
            ],
        );
        assert_eq!(run(&p, &h, body.as_bytes()), Ok(BodyOutcome::Clean));
        assert_eq!(run(&p, &json_h, format!(r#"["{other}"]"#).as_bytes()), Ok(BodyOutcome::Clean));
    }
}

#[test]
fn a_short_credential_is_found_as_a_whole_value() {
    // Shorter than the token minimum (8): found only as a whole value, as before.
    let short = "Zq7!x2";
    let json = format!(
        r#"{{"environment":"uat","production":false,"protected_credentials":[{{"label":"pin","sha256":"{}","length":{}}}]}}"#,
        fingerprint(short.as_bytes()),
        short.len()
    );
    let p = GuardPolicy::from_json(json.as_bytes()).unwrap();
    assert_eq!(p.detector.shortest_match(), short.len());
    assert_eq!(credential(run(&p, &req("GET", "/", &[("x-pin", short)]), b"")).1, "header x-pin");
    let basic = format!("Basic {}", b64(format!("u:{short}").as_bytes()));
    assert_eq!(
        credential(run(&p, &req("GET", "/", &[("authorization", &basic)]), b"")).1,
        "header authorization (basic password)"
    );
    assert_eq!(run(&p, &req("GET", "/", &[("x-pin", "Zq7!x3")]), b""), Ok(BodyOutcome::Clean));
}

/// Every header is inspected, those skipped before included (`signature`, `signature-input`,
/// `content-digest`, `idempotency-key`, `:method`, `:scheme`, `:authority`/`host`), in headers
/// and in trailers, whatever the case of the name.
#[test]
fn every_header_is_inspected_none_skipped() {
    let p = policy();
    for name in
        ["signature", "signature-input", "content-digest", "idempotency-key", "x-signature", "digest", "X-Push-Key", "te", "via"]
    {
        let h = req("POST", "/", &[(name, PROD)]);
        assert_eq!(credential(run(&p, &h, b"")).1, format!("header {}", name.to_ascii_lowercase()), "{name}");
        match check_trailers(&p, &[(name.to_string(), PROD.to_string())]) {
            Err(GuardError::Credential { location, .. }) => {
                assert_eq!(location, format!("trailer {}", name.to_ascii_lowercase()))
            }
            other => panic!("{name}: {other:?}"),
        }
    }
    // Structured headers: the key inside a signature's parameters, or as an RFC 9530 digest.
    let sig = format!(r#"sig1=("@method" "@path");created=1;keyid="{PROD}""#);
    assert_eq!(credential(run(&p, &req("POST", "/", &[("signature-input", &sig)]), b"")).1, "header signature-input");
    let digest = format!("sha-256=:{}:", b64(PROD.as_bytes()));
    assert_eq!(credential(run(&p, &req("POST", "/", &[("content-digest", &digest)]), b"")).1, "header content-digest (base64)");
    // Pseudo-headers: a custom method token, the scheme, the authority (not a production host).
    for (i, name) in [(0, ":method"), (3, ":scheme"), (2, ":authority")] {
        let mut h = req("GET", "/", &[]);
        h[i].1 = if name == ":authority" { format!("{PROD}.uat.example.com") } else { PROD.to_string() };
        assert_eq!(credential(run(&p, &h, b"")).1, format!("header {name}"), "{name}");
    }
    let h = vec![(":path".to_string(), "/".to_string()), ("host".to_string(), format!("{PROD}.uat.example.com:8080"))];
    assert_eq!(credential(run(&p, &h, b"")).1, "header host");
    // A realistic signed request (RFC 9421 + RFC 9530 + idempotency key) is clean.
    let h = req(
        "POST",
        "/v1/transfers",
        &[
            (
                "signature-input",
                r#"sig1=("@method" "@path" "content-digest");created=1767000000;keyid="client-a";nonce="b3k2pQ9xZ7Lm""#,
            ),
            ("signature", "sig1=:dGhpcyBpcyBub3QgYSByZWFsIG1hYyBidXQgMzIgYnl0ZXM=:"),
            ("content-digest", "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:"),
            ("idempotency-key", "3f1c9a52-7b0e-4d8a-9c61-2e5f0b7d4a19"),
        ],
    );
    assert_eq!(run(&p, &h, b""), Ok(BodyOutcome::Clean));
    // :path (query) and :authority are still checked.
    assert_eq!(credential(run(&p, &req("GET", &format!("/?k={PROD}"), &[]), b"")).1, "query param k");
    let mut h = req("GET", "/", &[]);
    h[2].1 = "api.push.apple.com".to_string();
    assert_eq!(check_headers(&p, &h).unwrap_err().code(), CODE_HOST);
}

#[test]
fn length_and_regex_configuration_errors_are_named() {
    let fp = fingerprint(PROD.as_bytes());
    let cred = |length: &str| {
        format!(
            r#"{{"environment":"uat","production":false,"protected_credentials":[{{"label":"a","sha256":"{fp}","length":{length}}}]}}"#
        )
    };
    for length in ["0", "65537"] {
        let err = GuardPolicy::from_json(cred(length).as_bytes()).unwrap_err();
        assert_eq!(err.field, "protected_credentials[0].length", "{length}: {err}");
    }
    // Not a number: serde's type error.
    for length in ["-1", "\"36\"", "1.5"] {
        assert!(GuardPolicy::from_json(cred(length).as_bytes()).is_err(), "{length}");
    }
    assert!(GuardPolicy::from_json(cred("65536").as_bytes()).is_ok());
    // A mix of entries with and without length: every length is hashed.
    let mixed = format!(
        r#"{{"environment":"uat","production":false,"protected_credentials":[{{"label":"a","sha256":"{fp}","length":{}}},{{"label":"b","sha256":"{}"}}]}}"#,
        PROD.len(),
        fingerprint(b"other")
    );
    let p = GuardPolicy::from_json(mixed.as_bytes()).unwrap();
    assert!(!p.detector.lengths_known());
    assert!(p.detector.scan(b"other", &[]).is_some());
    // A wrong length hides the credential: `firebreak fingerprint` prints the right one.
    let wrong = GuardPolicy::from_json(cred(&(PROD.len() + 1).to_string()).as_bytes()).unwrap();
    assert!(wrong.detector.scan(PROD.as_bytes(), &[]).is_none());

    let pattern = |regex: &str| {
        format!(r#"{{"environment":"uat","production":false,"patterns":[{{"label":"a","regex":{}}}]}}"#, serde_json::json!(regex))
    };
    let err = GuardPolicy::from_json(pattern("clé_[0-9]+").as_bytes()).unwrap_err();
    assert_eq!(err.field, "patterns[0].regex");
    assert!(err.message.contains("ASCII"), "{err}");
    // ASCII classes and case folding work without the Unicode tables.
    let p = GuardPolicy::from_json(pattern(r"(?i)akia\d{4}\w\s").as_bytes()).unwrap();
    assert!(p.detector.scan(b"x AKIA1234z y", &[]).is_some());
    assert!(p.detector.scan("AKIA１２３４z ".as_bytes(), &[]).is_none());
    assert!(p.detector.scan(b"AKIA12z ", &[]).is_none());
}

#[test]
fn decode_bounds_are_upper_bounds() {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
    for n in 0..80usize {
        let data: Vec<u8> = (0..n).map(|i| (i * 37 % 256) as u8).collect();
        let padded = STANDARD.encode(&data);
        let bare = STANDARD_NO_PAD.encode(&data);
        assert!(detect::base64_decoded_max(padded.len()) >= n, "{n}");
        assert_eq!(detect::base64_decoded_max(bare.len()), n, "{n}");
    }
    for text in ["", "%", "%4", "%41", "a%41b%4", "%%41", "%zz%41%42", "%41%", "100%", "%e2%82%ac"] {
        let decoded: Vec<u8> = percent_encoding::percent_decode(text.as_bytes()).collect();
        assert_eq!(decoded.len(), text.len() - 2 * detect::percent_escapes(text.as_bytes()), "{text}");
    }
}

/// Whatever the input, a policy with lengths decides exactly as the same policy without them
/// (which hashes every candidate and decodes everything decodable).
#[test]
fn lengths_change_the_cost_never_the_verdict() {
    let with = policy();
    let without = policy_without_lengths();
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let url_prod = url_encoded(PROD);
    let b64_prod = b64(PROD.as_bytes());
    let basic = b64(format!("svc:{PROD_PASSWORD}").as_bytes());
    let plants: [&str; 7] = [PROD, PROD_PASSWORD, &url_prod, &b64_prod, &basic, "sk_live_abcdef123", "AKIAIOSFODNN7EXAMPLE"];
    let alphabet = b"aZ09+/=-_%:.{}[]\",;& \n\\?#@!";
    let (mut hits, mut rounds) = (0, 0);
    for round in 0..2000 {
        let len = (next() % 120) as usize;
        let mut text: String = (0..len).map(|_| alphabet[(next() % alphabet.len() as u64) as usize] as char).collect();
        if round % 3 == 0 {
            let plant = plants[(next() % plants.len() as u64) as usize];
            let at = (next() % (text.len() as u64 + 1)) as usize;
            text.insert_str(at, plant);
        }
        let header_value = text.replace('\n', " ");
        for (ct, scheme) in [("application/json", "Bearer "), ("application/x-www-form-urlencoded", "Basic "), ("text/plain", "")]
        {
            let auth = format!("{scheme}{header_value}");
            let h = req(
                "POST",
                &format!("/v1/x?q={}", text.replace([' ', '\n', '#'], "+")),
                &[("content-type", ct), ("x-h", &header_value), ("authorization", &auth)],
            );
            let body = format!(r#"{{"k":{}}}"#, serde_json::json!(text));
            let a = run(&with, &h, body.as_bytes());
            assert_eq!(a, run(&without, &h, body.as_bytes()), "{text:?}");
            let a2 = run(&with, &req("POST", "/", &[("content-type", ct)]), text.as_bytes());
            assert_eq!(a2, run(&without, &req("POST", "/", &[("content-type", ct)]), text.as_bytes()), "{text:?}");
            rounds += 1;
            hits += usize::from(a.is_err()) + usize::from(a2.is_err());
        }
    }
    // The plants are found often enough for the comparison to mean something.
    assert!(hits > rounds / 4, "{hits} of {rounds}");
}

// --- issue 13: nested encodings, multipart transfer encodings, every header -------------------

fn pct(data: &[u8]) -> String {
    percent_encoding::percent_encode(data, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn too_deep(result: Result<BodyOutcome, GuardError>) -> String {
    match result {
        Err(GuardError::TooDeep { location, .. }) => location,
        other => panic!("expected encoding_too_deep, got {other:?}"),
    }
}

/// `layers` applied innermost first: "b" base64, "p" percent-encoding, "g" gzip (then base64),
/// "j" a JSON document `{"k": ...}`.
fn wrap(secret: &str, layers: &str) -> String {
    let mut value = secret.to_string();
    for layer in layers.chars() {
        value = match layer {
            'b' => b64(value.as_bytes()),
            'p' => pct(value.as_bytes()),
            'g' => b64(&gzip(value.as_bytes())),
            'j' => serde_json::json!({ "k": value }).to_string(),
            _ => unreachable!(),
        };
    }
    value
}

fn json_body(value: &str) -> (Vec<(String, String)>, Vec<u8>) {
    let h = req("POST", "/v1/transfers", &[("content-type", "application/json")]);
    (
        h,
        serde_json::json!({ "from": "acc-alice", "to": "acc-bob", "amount": 1, "reference": value })
            .to_string()
            .into_bytes(),
    )
}

#[test]
fn three_to_six_nested_layers_of_mixed_encodings_are_detected() {
    let p = policy();
    for layers in [
        "bbb",
        "pbb",
        "bpb",
        "bbp",
        "jpbj",
        "bjpb",
        "pjb",
        "gb", // 3 (j is not a layer; g is gzip + base64)
        "bbbb",
        "pbpb",
        "pjbjbb",
        "bpbp",
        "gbb",
        "bgb", // 4
        "bbbbb",
        "pbbbb",
        "bjbjbjpbp",
        "bbgb", // 5
        "bbbbbb",
        "pbpbpb",
        "bgbpb",
        "bbgbb", // 6 = MAX_DEPTH
    ] {
        let value = wrap(PROD, layers);
        // In a JSON body, in a header, in a query parameter, in a text body.
        let (h, body) = json_body(&value);
        let (label, location) = credential(run(&p, &h, &body));
        assert_eq!(label, "apns-prod", "{layers}");
        assert!(location.starts_with("body json $.reference ("), "{layers}: {location}");
        let (label, _) = credential(run(&p, &req("GET", "/", &[("x-push-key", &value)]), b""));
        assert_eq!(label, "apns-prod", "{layers}");
        let text = req("POST", "/", &[("content-type", "text/plain")]);
        assert_eq!(credential(run(&p, &text, format!("payload {value} end").as_bytes())).0, "apns-prod", "{layers}");
    }
    // The layers are named in the message (outermost first).
    let (h, body) = json_body(&wrap(PROD, "pbgb"));
    assert_eq!(credential(run(&p, &h, &body)).1, "body json $.reference (base64, base64, gzip, base64, url-encoded)");
    // Escapes of a JSON document inside a decoding are undone (`\u0066` = `f`).
    let escaped = b64(br#"{"key":"\u0066ake-apns-prod-key-0123456789abcdef"}"#);
    let (h, body) = json_body(&escaped);
    assert_eq!(credential(run(&p, &h, &body)).1, "body json $.reference (base64)");
    // A JSON body sent as text/plain: parsed all the same.
    let text = req("POST", "/", &[("content-type", "text/plain")]);
    assert_eq!(credential(run(&p, &text, br#"{"key":"\u0066ake-apns-prod-key-0123456789abcdef"}"#)).1, "body text");
}

#[test]
fn deeper_than_the_bound_is_refused_with_its_own_code() {
    let p = policy();
    assert_eq!(detect::MAX_DEPTH, 6);
    for layers in ["bbbbbbb", "pbpbpbp", "bbbbbbbb", "bgbbbbbb", "bbgbbb", "bbbbbbbbbbbb"] {
        let value = wrap(PROD, layers);
        let (h, body) = json_body(&value);
        let location = too_deep(run(&p, &h, &body));
        assert!(
            location.starts_with("body json $.reference (base64") || location.starts_with("body json $.reference (url-encoded"),
            "{location}"
        );
        let err = run(&p, &h, &body).unwrap_err();
        let r = err.rejection("uat");
        assert_eq!((r.status, r.code), (422, CODE_TOO_DEEP), "{layers}");
        assert!(r.message.contains("6 layers"), "{}", r.message);
        assert!(!r.message.contains(PROD) && !err.log_context().contains(PROD));
        assert_eq!(err.detection_counter(), None);
        // In a header and in the query too; never passed, whatever over_limit says.
        assert_eq!(check_headers(&p, &req("GET", "/", &[("x-push-key", &value)])).unwrap_err().code(), CODE_TOO_DEEP, "{layers}");
        let q = format!("/v1/x?k={}", pct(value.as_bytes()));
        assert_eq!(check_headers(&p, &req("GET", &q, &[])).unwrap_err().code(), CODE_TOO_DEEP, "{layers}");
        let pass = policy_with(r#","over_limit":"pass""#);
        assert_eq!(run(&pass, &h, &body).unwrap_err().code(), CODE_TOO_DEEP);
    }
    // Not only credentials: anything hidden under more layers than the guard follows.
    let (h, body) = json_body(&wrap("an innocent but very deeply wrapped sentence", "bbbbbbb"));
    assert_eq!(run(&p, &h, &body).unwrap_err().code(), CODE_TOO_DEEP);
    // `%25` chains: eight layers of percent-encoding.
    let (h, body) = json_body(&format!("100%{}41 off", "25".repeat(8)));
    assert_eq!(run(&p, &h, &body).unwrap_err().code(), CODE_TOO_DEEP);
    // Within the bound, innocent data passes.
    for layers in ["b", "bb", "bbb", "pbp", "bbbbbb", "gb"] {
        let (h, body) = json_body(&wrap("an innocent sentence, wrapped a few times", layers));
        assert_eq!(run(&p, &h, &body), Ok(BodyOutcome::Clean), "{layers}");
    }
}

#[test]
fn realistic_payment_bodies_and_deep_looking_noise_pass() {
    let p = policy();
    let png: Vec<u8> = (0..3000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let body = serde_json::json!({
        "from": "acc-alice",
        "to": "acc-bob",
        "amount": "1250.00",
        "currency": "EUR",
        "reference": "Invoice 2026-11 / ORDER#A1B2C3D4E5, thanks!",
        "iban": "DE89370400440532013000",
        "bic": "COBADEFFXXX",
        "idempotency_key": "3f1c9a52-7b0e-4d8a-9c61-2e5f0b7d4a19",
        "callback_url": "https://merchant.example/cb?id=abc%20def&sig=dGVzdA%3D%3D&next=%2Fpay%2F%3Fstep%3D2",
        "token": "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhY2MtYWxpY2UiLCJpYXQiOjE3NjcwMDAwMDB9.c2lnbmF0dXJlLW5vdC1yZWFs",
        "attachment": b64(&png),
        "nested": {"memo": b64(b64(b64(b"a memo encoded three times").as_bytes()).as_bytes()), "tags": ["QUJDREVGR0hJSktMTU5PUA", "%E2%82%AC100", "ZZZZZZZZZZZZZZZZZZZZ"]},
        "deep_looking": ["QUFBQUFBQUFBQUFB!!!==", "%%%%%2525zz%2", "H4sIAAAAAAAA/wXBMQ0AAAgDsFv", "eJzLSM3JyVcozy_KSVEEAA", "Base64Base64Base64Base64=="],
    });
    let h = req(
        "POST",
        "/v1/transfers",
        &[
            ("content-type", "application/json"),
            ("authorization", &format!("Bearer {TEST_KEY}")),
            ("cookie", "session=eyJ1c2VyIjoiYWxpY2UifQ%3D%3D; theme=dark; _ga=GA1.2.123456789.1767000000"),
            ("user-agent", "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36"),
            ("accept", "application/json, text/plain;q=0.9, */*;q=0.8"),
            ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ],
    );
    assert_eq!(run(&p, &h, body.to_string().as_bytes()), Ok(BodyOutcome::Clean));
    let form = req("POST", "/v1/transfers", &[("content-type", "application/x-www-form-urlencoded")]);
    assert_eq!(
        run(&p, &form, b"from=acc-alice&to=acc-bob&amount=12.50&reference=Rent+March%2C+flat+3&next=%252Fhome"),
        Ok(BodyOutcome::Clean)
    );
}

#[test]
fn decodings_inside_values_are_bounded_by_max_decoded_bytes() {
    // 40 base64 values of 300 bytes of text: 12 000 decoded bytes, over a 4 096-byte budget.
    let text = "an ordinary sentence of a memo field ".repeat(8);
    let values: Vec<String> = (0..40).map(|_| b64(text.as_bytes())).collect();
    let body = serde_json::json!({ "memos": values }).to_string();
    let h = req("POST", "/", &[("content-type", "application/json")]);
    let block = policy_with(r#","max_decoded_bytes":4096"#);
    let err = run(&block, &h, body.as_bytes()).unwrap_err();
    assert_eq!(err, GuardError::TooLarge { decoded: true });
    assert_eq!(err.rejection("uat").status, 413);
    let pass = policy_with(r#","max_decoded_bytes":4096,"over_limit":"pass""#);
    assert_eq!(run(&pass, &h, body.as_bytes()), Ok(BodyOutcome::Uninspected));
    // The default budget inspects it all.
    assert_eq!(run(&policy(), &h, body.as_bytes()), Ok(BodyOutcome::Clean));
    // A gzip bomb inside a base64 value: bounded too.
    let bomb = b64(&gzip(&vec![b'a'; 8 * 1024 * 1024]));
    let body = serde_json::json!({ "blob": bomb }).to_string();
    let limited = policy_with(r#","max_decoded_bytes":1048576,"max_body_bytes":4194304"#);
    assert_eq!(run(&limited, &h, body.as_bytes()).unwrap_err().code(), CODE_TOO_LARGE);
    // Header decodings too: with `pass` the plan says the headers were not all inspected.
    let header = b64(text.repeat(20).as_bytes());
    let plan = check_headers(&pass, &req("GET", "/", &[("x-memo", &header)])).unwrap();
    assert!(plan.headers_uninspected);
    assert_eq!(check_headers(&block, &req("GET", "/", &[("x-memo", &header)])).unwrap_err().code(), CODE_TOO_LARGE);
    assert!(!check_headers(&policy(), &req("GET", "/", &[("x-memo", &header)])).unwrap().headers_uninspected);
}

// --- multipart ---------------------------------------------------------------------------------

/// A multipart body from `(part headers, part body)`, with `eol` line endings.
fn multipart(boundary: &str, eol: &str, parts: &[(&str, &str)]) -> Vec<u8> {
    let mut out = format!("preamble{eol}");
    for (headers, body) in parts {
        out.push_str(&format!("--{boundary}{eol}{}{eol}{eol}{body}{eol}", headers.replace('\n', eol)));
    }
    out.push_str(&format!("--{boundary}--{eol}epilogue{eol}"));
    out.into_bytes()
}

fn mp_headers(boundary: &str) -> Vec<(String, String)> {
    req("POST", "/v1/upload", &[("content-type", &format!("multipart/form-data; boundary=\"{boundary}\""))])
}

/// PROD in quoted-printable, split by a soft line break and with an escaped byte, so that no
/// piece of it is the key.
fn qp_prod(eol: &str) -> String {
    format!("fake-apns-prod-={eol}key-0123456789=61bcdef")
}

/// base64 of a JSON document whose key crosses a line (wrapped at 76, as MIME does).
fn b64_json_wrapped(eol: &str) -> String {
    let json = format!(r#"{{"push":{{"alert":"hhhhh, a note long enough","key":"{PROD}"}}}}"#);
    let encoded = b64(json.as_bytes());
    encoded
        .as_bytes()
        .chunks(76)
        .map(|c| String::from_utf8(c.to_vec()).unwrap())
        .collect::<Vec<_>>()
        .join(eol)
}

#[test]
fn multipart_parts_are_decoded_by_their_transfer_encoding() {
    let p = policy();
    for eol in ["\r\n", "\n"] {
        for cte in ["Content-Transfer-Encoding", "content-transfer-encoding", "CONTENT-TRANSFER-encoding"] {
            let qp = format!("Content-Disposition: form-data; name=\"note\"\n{cte}: quoted-printable");
            let body = multipart("XyZ-42", eol, &[("Content-Disposition: form-data; name=\"a\"", "hello"), (&qp, &qp_prod(eol))]);
            let got = credential(run(&p, &mp_headers("XyZ-42"), &body));
            assert_eq!(got, ("apns-prod".to_string(), "body part 2 text (quoted-printable)".to_string()), "{eol:?} {cte}");

            let b = format!("Content-Disposition: form-data; name=\"payload\"\nContent-Type: application/json\n{cte}:  BASE64 ");
            let body = multipart("XyZ-42", eol, &[(&b, &b64_json_wrapped(eol))]);
            let got = credential(run(&p, &mp_headers("XyZ-42"), &body));
            assert_eq!(got.1, "body part 1 json $.push.key (base64)", "{eol:?} {cte}");
        }
        // The same parts without the transfer decoding hide the key: the decoding is what finds it.
        let d = &p.detector;
        assert!(d.scan(qp_prod(eol).as_bytes(), &[]).is_none());
        // A clean upload passes.
        let body = multipart("b", eol, &[
            ("Content-Disposition: form-data; name=\"from\"", "acc-alice"),
            ("Content-Disposition: form-data; name=\"memo\"\nContent-Transfer-Encoding: quoted-printable", "caf=C3=A9 cr=C3=A8me=\r\n br=C3=BBl=C3=A9e"),
            ("Content-Disposition: form-data; name=\"f\"; filename=\"a.png\"\nContent-Type: image/png\nContent-Transfer-Encoding: base64", &b64(&[0x89, b'P', b'N', b'G', 0, 1, 2, 3, 4, 5, 6, 7, 8, 9])),
        ]);
        assert_eq!(run(&p, &mp_headers("b"), &body), Ok(BodyOutcome::Clean), "{eol:?}");
    }
}

#[test]
fn multipart_nested_and_malformed() {
    let p = policy();
    // multipart/mixed inside a part, its part in base64, gzip inside.
    let inner = String::from_utf8(multipart(
        "inner",
        "\r\n",
        &[("Content-Type: text/plain\r\nContent-Transfer-Encoding: base64", &b64(format!("push key {PROD} here").as_bytes()))],
    ))
    .unwrap();
    let outer = multipart(
        "outer",
        "\r\n",
        &[("Content-Disposition: form-data; name=\"a\"", "x"), ("Content-Type: multipart/mixed; boundary=inner", &inner)],
    );
    assert_eq!(credential(run(&p, &mp_headers("outer"), &outer)).1, "body part 2.1 text (base64)");
    // A part header carrying the key, and the key in the preamble.
    let body = multipart("b", "\n", &[(&format!("Content-Disposition: form-data; name=\"a\"\nX-Key: {PROD}"), "x")]);
    assert_eq!(credential(run(&p, &mp_headers("b"), &body)).1, "body part 1 header x-key");
    let mut body = format!("{PROD}\r\n").into_bytes();
    body.extend(multipart("b", "\r\n", &[("Content-Type: text/plain", "x")]));
    assert_eq!(credential(run(&p, &mp_headers("b"), &body)).1, "body multipart preamble");
    // Too many nested multiparts: refused as too deep.
    let mut body = "the innermost part".to_string();
    for level in 0..8 {
        body = String::from_utf8(multipart(
            &format!("b{level}"),
            "\r\n",
            &[(&format!("Content-Type: multipart/mixed; boundary=b{}", level.max(1) - 1), &body)],
        ))
        .unwrap();
    }
    let body = multipart("top", "\r\n", &[("Content-Type: multipart/mixed; boundary=b7", &body)]);
    assert_eq!(run(&p, &mp_headers("top"), &body).unwrap_err().code(), CODE_TOO_DEEP);
    // Unknown transfer encoding: 415; broken base64: 400; no boundary or no delimiter: 400.
    let body = multipart("b", "\r\n", &[("Content-Transfer-Encoding: x-uuencode", "begin 644 k")]);
    let err = run(&p, &mp_headers("b"), &body).unwrap_err();
    assert_eq!((err.code(), err.rejection("uat").status), (CODE_ENCODING, 415));
    let body = multipart("b", "\r\n", &[("Content-Transfer-Encoding: base64", "this is *not* base64 !!")]);
    assert_eq!(run(&p, &mp_headers("b"), &body).unwrap_err().code(), CODE_UNDECODABLE);
    let h = req("POST", "/", &[("content-type", "multipart/form-data")]);
    assert_eq!(run(&p, &h, b"--x\r\n\r\nhello\r\n--x--").unwrap_err().code(), CODE_UNDECODABLE);
    assert_eq!(run(&p, &mp_headers("b"), b"no delimiter at all").unwrap_err().code(), CODE_UNDECODABLE);
    // A line that only starts with the delimiter is content, not a delimiter.
    let body = b"--b\r\nContent-Type: text/plain\r\n\r\n--bogus line\r\nhello\r\n--b--\r\n";
    assert_eq!(run(&p, &mp_headers("b"), body), Ok(BodyOutcome::Clean));
    // No closing delimiter: the last part runs to the end, and is still inspected.
    let body = format!("--b\r\nContent-Transfer-Encoding: base64\r\n\r\n{}", b64(PROD.as_bytes()));
    assert_eq!(credential(run(&p, &mp_headers("b"), body.as_bytes())).1, "body part 1 text (base64)");
}

#[test]
fn credentials_in_every_header_kind() {
    let p = policy();
    // Unpadded: not what Basic requires, found by the scan of the whole value.
    let basic_url_safe = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("svc1:{PROD}"));
    let cases: Vec<(&str, String, &str)> = vec![
        ("cookie", format!("a=1; push=\"{PROD}\"; b=2"), "header cookie push"),
        ("cookie", format!("a=1;push={}", pct(b64(PROD.as_bytes()).as_bytes())), "header cookie push (url-encoded, base64)"),
        ("cookie", format!("{PROD}=1"), "header cookie name"),
        ("authorization", format!("Basic {}", b64(format!("svc:{PROD}").as_bytes())), "header authorization (basic password)"),
        ("authorization", format!("Basic {basic_url_safe}"), "header authorization (base64)"),
        ("authorization", format!("Bearer {}", wrap(PROD, "bbb")), "header authorization (bearer, base64, base64, base64)"),
        ("proxy-authorization", format!("Bearer {PROD}"), "header proxy-authorization (bearer)"),
        ("authorization", format!("ApiKey {PROD}"), "header authorization"),
        ("x-custom-token", PROD.to_string(), "header x-custom-token"),
        (
            "x-forwarded-client-cert",
            format!("By=spiffe://uat/a;Hash={};Subject=\"CN=x\"", b64(PROD.as_bytes())),
            "header x-forwarded-client-cert (base64)",
        ),
        ("idempotency-key", PROD.to_string(), "header idempotency-key"),
        ("signature", format!("sig1=:{}:", b64(PROD.as_bytes())), "header signature (base64)"),
    ];
    for (name, value, location) in cases {
        let got = credential(run(&p, &req("GET", "/", &[(name, &value)]), b""));
        assert_eq!(got, ("apns-prod".to_string(), location.to_string()), "{name}: {value}");
        // The same in a trailer.
        match check_trailers(&p, &[(name.to_string(), value.clone())]) {
            Err(GuardError::Credential { label, .. }) => assert_eq!(label, "apns-prod"),
            other => panic!("trailer {name}: {other:?}"),
        }
    }
}
