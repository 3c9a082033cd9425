//! Route matching and the canonical scope. The spelling tests test the class: they generate
//! spellings that a lenient upstream routes to a protected path and assert that none is `Out`.

use super::*;

fn route(methods: &[&str], prefix: Option<&str>, exact: Option<&str>) -> RouteMatch {
    RouteMatch::parse(
        &RouteConfig {
            methods: methods.iter().map(|m| m.to_string()).collect(),
            path_prefix: prefix.map(str::to_string),
            path_exact: exact.map(str::to_string),
            case_sensitive: false,
        },
        "routes[0]",
    )
    .unwrap()
}

#[test]
fn prefix_and_methods() {
    let r = route(&["POST"], Some("/v1/"), None);
    assert!(r.matches("POST", "/v1/transfers"));
    assert!(r.matches("post", "/V1/Transfers"), "methods and paths compare ASCII case-insensitively");
    assert!(r.matches("POST", "/v1"), "a prefix `/v1/` also covers `/v1`");
    assert!(!r.matches("GET", "/v1/transfers"));
    assert!(!r.matches("POST", "/v2/x"));
}

#[test]
fn exact_covers_format_suffixes() {
    let r = route(&["POST"], None, Some("/v1/payouts"));
    assert!(r.matches("POST", "/v1/payouts"));
    assert!(r.matches("POST", "/v1/PAYOUTS.json"));
    assert!(!r.matches("POST", "/v1/payouts/123"));
    assert!(!r.matches("POST", "/v1/payoutsx"));
}

#[test]
fn case_sensitive_rules_compare_canonical_paths_exactly() {
    let r = RouteMatch::parse(
        &RouteConfig { methods: vec![], path_prefix: Some("/Admin/".into()), path_exact: None, case_sensitive: true },
        "r",
    )
    .unwrap();
    assert!(r.matches("GET", "/Admin/x"));
    assert!(!r.matches("GET", "/admin/x"));
    // A non-canonical spelling is still refused whatever its case.
    assert_eq!(scope([&r], "GET", "/admin//x"), Scope::NotCanonical);
}

#[test]
fn bad_routes_name_the_field() {
    let e = RouteMatch::parse(
        &RouteConfig { methods: vec!["post".into()], path_prefix: Some("/".into()), path_exact: None, case_sensitive: false },
        "routes[3]",
    )
    .unwrap_err();
    assert_eq!(e.field, "routes[3].methods");
    let e = RouteMatch::parse(&RouteConfig { methods: vec![], path_prefix: None, path_exact: None, case_sensitive: false }, "r")
        .unwrap_err();
    assert_eq!(e.field, "r");
    for bad in ["/v1//x", "/v1/./x", "/v1/%70ayouts", "/v1;x/", "/v1\\x"] {
        let e = RouteMatch::parse(
            &RouteConfig { methods: vec![], path_prefix: Some(bad.into()), path_exact: None, case_sensitive: false },
            "routes[1]",
        )
        .unwrap_err();
        assert_eq!(e.field, "routes[1]", "{bad}");
    }
}

#[test]
fn canonical_classification() {
    for ok in
        ["/", "/v1/payouts", "/V1/Payouts", "/v1/accounts/acc-1/balance", "/a:b@c!$&'()*+,=~_-", "/x%7By%7D", "/v1/payouts.json"]
    {
        assert!(is_canonical(ok), "{ok}");
    }
    for bad in [
        "",
        "v1/payouts",
        "//v1",
        "/v1/",
        "/v1//payouts",
        "/./v1",
        "/v1/..",
        "/v1/x/../payouts",
        "/v1/payouts.",
        "/v1%2Fpayouts",
        "/v1%2fpayouts",
        "/v1/%70ayouts",
        "/v1/%2E%2E",
        "/v1%5Cpayouts",
        "/v1/payouts%3B",
        "/v1/payouts%25",
        "/v1/payouts%3F",
        "/v1/payouts%23",
        "/v1/payouts%20",
        "/v1/payouts%00",
        "/v1/payouts%C3%A9",
        "/v1/pay%3aouts",
        "/v1/payouts%",
        "/v1/payouts%G1",
        "/x%3Ay",
        "/v1/payouts%3Abatch",
        "/v1/%40me",
        "/v1\\payouts",
        "/v1/payouts;jsessionid=1",
        "/v1;x/payouts",
        "/v1/payouts#x",
        "/v1/pay\u{7f}outs",
        "/v1/pay\touts",
        "/v1/paýouts",
        "/v1/pay outs",
    ] {
        assert!(!is_canonical(bad), "{bad:?}");
    }
}

/// The demo's rules: replay-guard's exact money routes and request-signature's `/v1/` prefix.
fn demo_rules() -> Vec<RouteMatch> {
    vec![
        route(&["POST"], None, Some("/v1/payouts")),
        route(&["POST"], None, Some("/v1/withdrawals")),
        route(&["POST"], None, Some("/v1/transfers")),
        route(&["POST", "PUT", "PATCH", "DELETE"], Some("/v1/"), None),
    ]
}

#[test]
fn ordinary_paths_are_decided_normally() {
    let rules = demo_rules();
    assert_eq!(scope(&rules, "POST", "/v1/payouts"), Scope::In(0));
    assert_eq!(scope(&rules, "POST", "/v1/transfers?x=1"), Scope::In(2));
    assert_eq!(scope(&rules, "POST", "/v1/ledger"), Scope::In(3));
    assert_eq!(scope(&rules, "GET", "/v1/ledger"), Scope::Out);
    assert_eq!(scope(&rules, "POST", "/healthz"), Scope::Out);
    assert_eq!(scope(&rules, "GET", "/healthz"), Scope::Out);
    assert_eq!(scope(&rules, "POST", "/v2/payouts"), Scope::Out);
    // A non-canonical path that no reading could route to a rule is out of scope, not refused.
    assert_eq!(scope(&rules, "POST", "/static//app.css"), Scope::Out);
    assert_eq!(scope(&rules, "GET", "/v1//ledger"), Scope::Out);
    // A query is not the path: `?` onwards may hold anything.
    assert_eq!(scope(&rules, "GET", "/healthz?next=/v1//payouts"), Scope::Out);
    assert_eq!(scope(&rules, "POST", "/v1//ledger"), Scope::NotCanonical);
    assert_eq!(scope(&rules, "POST", "/x/../v1/payouts"), Scope::NotCanonical);
    assert_eq!(scope(&rules, "POST", "v1/payouts"), Scope::NotCanonical);
    assert_eq!(scope(&rules, "POST", "http://h/v1/payouts"), Scope::NotCanonical);
}

/// Spellings a first review found `Out`: an escape of a character that may stand literally
/// (two canonical spellings of one path), an authority-looking first segment (`//host/...`,
/// which many URL parsers strip), and bytes no ASCII rule can be compared with (non-ASCII that a
/// router may fold or decode to ASCII, IIS `%uXXXX`).
#[test]
fn spellings_that_once_escaped_are_refused() {
    let batch = vec![route(&["POST"], None, Some("/v1/payouts:batch"))];
    assert_eq!(scope(&batch, "POST", "/v1/payouts:batch"), Scope::In(0));
    assert_eq!(scope(&batch, "POST", "/v1/payouts%3Abatch"), Scope::NotCanonical);
    let rules = demo_rules();
    for path in [
        "//x/v1/payouts",
        "//x/v1/transfers",
        "/\\x/v1/payouts",
        "\\\\x/v1/withdrawals",
        "//evil.example:80/v1/payouts?a=b",
        "/v1/payout%C5%BF",
        "/v1/payouts%C0%AF",
        "/%u0076%u0031/payouts",
        "/v1/pay%u006Futs",
    ] {
        assert_eq!(scope(&rules, "POST", path), Scope::NotCanonical, "{path:?}");
    }
    // The same spellings on a method no rule names are out of scope, whatever they read as.
    assert_eq!(scope(&rules, "GET", "//x/v1/payouts"), Scope::Out);
    assert_eq!(scope(&rules, "GET", "/v1/payout%C5%BF"), Scope::Out);
}

/// A small deterministic generator (xorshift64*): the tests need no crate and print the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

fn encode(rng: &mut Rng, b: u8) -> String {
    let hex = if rng.chance(50) { format!("{b:02X}") } else { format!("{b:02x}") };
    match rng.below(12) {
        0 => format!("%25{hex}"),     // double
        1 => format!("%2525{hex}"),   // triple
        2 => format!("%252525{hex}"), // quadruple: past the bound, refused as such
        _ => format!("%{hex}"),
    }
}

/// A spelling of `target` (e.g. `/v1/payouts`) that a lenient upstream routes to it.
fn spelling(rng: &mut Rng, target: &str) -> String {
    let mut out = String::new();
    let segments: Vec<&str> = target.split('/').skip(1).collect();
    for (i, segment) in segments.iter().enumerate() {
        // The separator before the segment.
        out += match rng.below(12) {
            0 => "//",
            1 => "/./",
            2 => "/x/../",
            3 => "\\",
            4 => "/%2F",
            5 => "/%2e/",
            6 => "%2f",
            7 => "%5C",
            8 => "/%252F",
            _ => "/",
        };
        for &b in segment.as_bytes() {
            let b = if rng.chance(30) { b.to_ascii_uppercase() } else { b };
            if rng.chance(15) {
                out += &encode(rng, b);
            } else {
                out.push(b as char);
            }
        }
        if rng.chance(10) {
            out += rng.pick(&[";jsessionid=1", ";a", ";x=%2F", "%3Bjsessionid=1"]);
        }
        if i + 1 < segments.len() && rng.chance(5) {
            out += "/deeper/..";
        }
    }
    if rng.chance(20) {
        out += rng.pick(&["/", "//", "/.", "/x/..", "\\", "%2F", ";p=1", "/;p=1", "%3F"]);
    }
    if rng.chance(20) {
        out += rng.pick(&["?a=b", "?", "?x=/v1/ledger"]);
    }
    out
}

/// An independent model of a lenient router (as in many frameworks): decode repeatedly (5 times),
/// backslash as slash, cut the query, drop `;params`, merge slashes, resolve dot segments,
/// ignore a trailing slash, fold case.
fn lenient_route(raw: &str) -> String {
    let mut bytes = raw.as_bytes().to_vec();
    if let Some(q) = bytes.iter().position(|&b| b == b'?') {
        bytes.truncate(q);
    }
    for _ in 0..5 {
        bytes = decode_once(&bytes);
    }
    let text = String::from_utf8_lossy(&bytes).replace('\\', "/");
    let text = text.split(['?', '#']).next().unwrap_or("").to_string();
    let mut stack: Vec<String> = Vec::new();
    for seg in text.split('/') {
        let seg = seg.split(';').next().unwrap_or("");
        match seg {
            "" | "." => {}
            ".." => {
                stack.pop();
            }
            s => stack.push(s.to_ascii_lowercase()),
        }
    }
    format!("/{}", stack.join("/"))
}

const SEEDS: [u64; 3] = [0x5EED_0013, 0xF12E_B12E, 0x0DD_BA11];

#[test]
fn no_spelling_of_a_money_route_is_out_of_scope() {
    let rules = demo_rules();
    let targets = [("/v1/payouts", 0), ("/v1/withdrawals", 1), ("/v1/transfers", 2), ("/v1/ledger", 3)];
    let methods = ["POST", "post", "Post", "pOST"];
    let mut refused = 0;
    for seed in SEEDS {
        let mut rng = Rng(seed);
        for n in 0..4000 {
            let (target, rule) = targets[n % targets.len()];
            let path = spelling(&mut rng, target);
            let method = methods[rng.below(methods.len())];
            assert_eq!(lenient_route(&path), target, "seed {seed:#x}: generator produced {path:?}");
            match scope(&rules, method, &path) {
                Scope::In(i) => assert!(i == rule, "seed {seed:#x}: {method} {path:?} matched rule {i}, expected {rule}"),
                Scope::NotCanonical => refused += 1,
                Scope::Out => panic!("seed {seed:#x}: {method} {path:?} (a lenient upstream routes it to {target}) is Out"),
            }
            // The exact rule itself (not just the broad `/v1/` prefix) catches it.
            if rule < 3 {
                let own = [rules[rule].clone()];
                assert_ne!(scope(&own, method, &path), Scope::Out, "seed {seed:#x}: {method} {path:?} escapes {target}");
            }
        }
    }
    assert!(refused > 1000, "most generated spellings are not canonical ({refused})");
}

#[test]
fn random_byte_soup_never_reaches_a_protected_path_out_of_scope() {
    // Strings over an alphabet of separators, escapes and the route's letters: any of them that
    // the lenient model routes to a protected path must not be Out.
    let rules = demo_rules();
    let own = [rules[0].clone()];
    let pieces = [
        "/",
        "//",
        ".",
        "..",
        "%2F",
        "%2f",
        "%5C",
        "\\",
        ";",
        "%3B",
        "%25",
        "%2E",
        "%2e",
        "v1",
        "V1",
        "payouts",
        "PayOuts",
        "%70ayouts",
        "pay%6Futs",
        "pay%256Futs",
        "%76%31",
        "x",
        "?",
        "#",
        "%3F",
    ];
    let mut hits = 0;
    for seed in SEEDS {
        let mut rng = Rng(seed ^ 0xABCD);
        for _ in 0..30_000 {
            let n = 1 + rng.below(9);
            let path: String = (0..n).map(|_| rng.pick(&pieces)).collect();
            let routed = lenient_route(&path);
            if routed == "/v1/payouts" {
                hits += 1;
                assert_ne!(scope(&own, "POST", &path), Scope::Out, "seed {seed:#x}: {path:?} escapes /v1/payouts");
            }
            if routed.starts_with("/v1/") || routed == "/v1" {
                assert_ne!(scope(&rules, "DELETE", &path), Scope::Out, "seed {seed:#x}: {path:?} escapes /v1/");
            }
        }
    }
    assert!(hits > 20, "the soup found few spellings ({hits})");
}

#[test]
fn lenient_forms_cover_decoding_orders() {
    let (forms, _) = lenient_forms("/v1/payouts/..%2F..%2Fledger");
    assert!(forms.iter().any(|f| f.starts_with(b"/v1/payouts")));
    let (forms, exhausted) = lenient_forms("/v1/pa%252579outs");
    assert!(forms.contains(&b"/v1/payouts".to_vec()), "three decodings");
    assert!(forms.contains(&b"/v1/pa%79outs".to_vec()), "two decodings");
    assert!(!exhausted);
    assert!(lenient_forms("/V1//PAYOUTS/").0.contains(&b"/v1/payouts".to_vec()));
    // A fourth layer is past the bound: refused wherever a rule exists for the method.
    assert!(lenient_forms("/v1/pa%25252579outs").1);
    let exact = [route(&["POST"], None, Some("/v1/payouts"))];
    assert_eq!(scope(&exact, "POST", "/v1/pa%25252579outs"), Scope::NotCanonical);
    assert_eq!(scope(&exact, "POST", "/elsewhere/%2525252541"), Scope::NotCanonical);
    assert_eq!(scope(&exact, "GET", "/v1/pa%25252579outs"), Scope::Out);
}

#[test]
fn every_filter_policy_decides_on_the_canonical_scope() {
    use crate::envguard::GuardPolicy;
    use crate::ratelimit::RateLimitPolicy;
    use crate::replay::{Exchange, ReplayError, ReplayPolicy, RequestFacts};
    use crate::signature::SignaturePolicy;

    let money = r#"[{"methods": ["POST"], "path_exact": "/v1/payouts"}]"#;
    let secret = "ZGVtby1jbGllbnQtc2VjcmV0LWRvLW5vdC11c2UtaW4tcHJvZHVjdGlvbiE=";
    let signature = SignaturePolicy::from_json(
        format!(r#"{{"routes": {money}, "max_age_seconds": 300, "keys": [{{"id": "a", "secret_base64": "{secret}"}}]}}"#)
            .as_bytes(),
        &|_| None,
    )
    .unwrap();
    let rate = RateLimitPolicy::from_json(
        format!(r#"{{"name": "ip", "rules": [{{"name": "r", "routes": {money}, "key": "ip", "requests": 1, "per_seconds": 1, "burst": 1}}]}}"#).as_bytes(),
    )
    .unwrap();
    let guard = GuardPolicy::from_json(
        format!(r#"{{"environment": "uat", "production": false, "patterns": [{{"label": "live", "prefix": "sk_live_"}}], "routes": {money}}}"#).as_bytes(),
    )
    .unwrap();
    let replay = ReplayPolicy::from_json(
        r#"{"routes": [{"name": "payouts", "match": {"methods": ["POST"], "path_exact": "/v1/payouts"}, "idempotency_key": "optional"}],
            "ttl_seconds": 60, "in_flight_timeout_ms": 1000}"#
            .as_bytes(),
    )
    .unwrap();
    let seed = 0x0013_5C0E;
    let mut rng = Rng(seed);
    for _ in 0..2000 {
        let path = spelling(&mut rng, "/v1/payouts");
        let expect = if is_canonical(split_path(&path).0) { Scope::In(0) } else { Scope::NotCanonical };
        assert_eq!(signature.scope("POST", &path), expect, "seed {seed:#x}: {path:?}");
        assert_eq!(rate.scope("POST", &path), expect, "seed {seed:#x}: {path:?}");
        assert_eq!(guard.guards("POST", &path), expect, "seed {seed:#x}: {path:?}");
        assert_eq!(replay.route_for("POST", &path), expect, "seed {seed:#x}: {path:?}");
        let facts = RequestFacts { method: "POST", path_and_query: &path, headers: &[], principal: Some("a") };
        match Exchange::begin(&replay, &facts) {
            Ok(Some(_)) => assert_eq!(expect, Scope::In(0)),
            Err((error, _)) => {
                assert_eq!(error, ReplayError::PathNotCanonical, "{path:?}");
                assert_eq!(error.rejection().code, CODE_PATH_NOT_CANONICAL);
                assert_eq!(error.rejection().status, 400);
            }
            Ok(None) => panic!("seed {seed:#x}: {path:?} escapes replay-guard"),
        }
    }
}

/// Fuzz regression (fuzz/regressions/path/absolute-form-read-as-relative): a path that looks like
/// an absolute form is also read as a relative path (`;://admin:;:/x` is `/admin:/x` to a router
/// that drops `;` parameters), and a protected reading is refused, not out of scope.
#[test]
fn a_lookalike_absolute_form_is_also_read_as_a_relative_path() {
    let rules = vec![route(&[], Some("/admin"), None)];
    assert_eq!(scope(&rules, "GET", ";://admin:;:/-:;"), Scope::NotCanonical);
    assert_eq!(scope(&rules, "GET", "x://host/admin"), Scope::NotCanonical);
    assert_eq!(scope(&rules, "GET", "x://host/public"), Scope::Out);
}
