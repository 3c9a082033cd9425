//! Path canonicalization and the scope decision (core::route).
//!
//! Properties, for any `:path`:
//! - no bypass: when a lenient upstream (an independent model, `lenient_reading`) would route the
//!   path to a protected canonical path, the decision is never "out of scope";
//! - a canonical path is stable: a lenient normalization only lower-cases it, one decoding
//!   leaves nothing to decode, and its decoding normalizes to itself (no separator, dot segment or
//!   parameter hides in an escape); it is decided In or Out, never NotCanonical;
//! - the decision on a canonical path is the rule's own match.
#![no_main]

use firebreak_core::route::{is_canonical, lenient_forms, parse_routes, scope, RouteConfig, RouteMatch, Scope};
use firebreak_fuzz::{lenient_reading, percent_decode};
use libfuzzer_sys::fuzz_target;

fn routes() -> &'static Vec<RouteMatch> {
    static ROUTES: std::sync::OnceLock<Vec<RouteMatch>> = std::sync::OnceLock::new();
    ROUTES.get_or_init(|| {
        let raw: Vec<RouteConfig> = serde_json::from_str(
            r#"[{"methods":["POST"],"path_exact":"/v1/payouts"},
                {"methods":["POST","PUT"],"path_prefix":"/v1/transfers/"},
                {"path_prefix":"/admin"},
                {"methods":["DELETE"],"path_exact":"/v1/accounts/%5Bid%5D","case_sensitive":true}]"#,
        )
        .expect("routes");
        parse_routes(&raw, "routes").expect("routes parse")
    })
}

fuzz_target!(|input: (u8, String)| {
    let (m, raw) = input;
    let method = ["POST", "PUT", "DELETE", "GET", "post"][usize::from(m) % 5];
    let routes = routes();
    let decision = scope(routes, method, &raw);
    let path = raw.split_once('?').map_or(raw.as_str(), |(p, _)| p);
    let (_forms, _exhausted) = lenient_forms(path);

    if is_canonical(path) {
        assert!(path.is_ascii());
        assert!(!matches!(decision, Scope::NotCanonical), "a canonical path was refused as not canonical");
        let lower = path.to_ascii_lowercase();
        assert_eq!(lenient_reading(path.as_bytes(), 0), lower.as_bytes(), "a canonical path changes under normalization");
        let decoded = percent_decode(path.as_bytes());
        assert_eq!(percent_decode(&decoded), decoded, "a canonical path decodes twice");
        assert_eq!(lenient_reading(&decoded, 0), decoded.to_ascii_lowercase(), "an escape in a canonical path hides structure");
        let first = routes.iter().position(|r| r.matches(method, path));
        assert_eq!(decision, first.map_or(Scope::Out, Scope::In));
    }

    // No bypass: what a lenient upstream routes to, read as a canonical path, is protected only if
    // this path is not out of scope.
    for rounds in 0..=3 {
        let reading = lenient_reading(path.as_bytes(), rounds);
        if let Ok(reading) = std::str::from_utf8(&reading) {
            if is_canonical(reading) && routes.iter().any(|r| r.matches(method, reading)) {
                assert_ne!(
                    decision,
                    Scope::Out,
                    "{path:?} reads as protected {reading:?} after {rounds} decodings but is out of scope"
                );
            }
        }
    }
});
