//! Differential tests: the detector against its previous version ([`super::detect_reference`]),
//! on values that hide credentials (and near misses) under every layer the detector follows:
//! base64 (both alphabets, padded or not, wrapped), percent-encoding, gzip and zlib, JSON
//! strings and keys, `key=`/`user:` pairs, structured-field byte sequences, tokens in text, at
//! every depth up to and past [`MAX_DEPTH`], with budgets large and small. Every verdict, every
//! list of decodings and the budget left afterwards must be identical.

use std::io::Write;

use base64::Engine as _;
use proptest::prelude::*;
use sha2::{Digest, Sha256};

use super::detect::{self, Budget, Detector, MAX_DEPTH};
use super::detect_reference as reference;

const LONG: &[u8] = b"fake-apns-prod-key-0123456789abcdef";
const SHORT: &[u8] = b"s3cr3t!x";
/// The shortest token hashed ([`detect::MIN_TOKEN_LEN`]), word characters only.
const SHORT_WORD: &[u8] = b"Zq8wLm3T";
const WITH_DELIMITERS: &[u8] = b"pass word;42";
const WITH_COLON: &[u8] = b"user:Pa55w0rd";
const PASSWORD: &[u8] = b"Pr0d-Passw0rd-For-FCM!";

/// One configuration, built for both detectors.
struct Spec {
    /// (secret, length known)
    secrets: Vec<(&'static [u8], bool)>,
    prefixes: Vec<&'static str>,
    regexes: Vec<&'static str>,
    hosts: Vec<&'static str>,
}

fn specs() -> Vec<Spec> {
    vec![
        // As the filter's benchmark and tests: lengths known, a prefix and a regex.
        Spec {
            secrets: vec![(LONG, true), (PASSWORD, true), (SHORT_WORD, true)],
            prefixes: vec!["sk_live_"],
            regexes: vec!["AKIA[0-9A-Z]{16}"],
            hosts: vec!["api.push.apple.com", "*.prod.example.com"],
        },
        // Without lengths (every candidate hashed), short and delimiter-holding secrets.
        Spec {
            secrets: vec![(LONG, false), (SHORT, true), (WITH_DELIMITERS, true), (WITH_COLON, true)],
            prefixes: vec!["sk_live_", "ghp_"],
            regexes: vec![],
            hosts: vec![],
        },
        // Fingerprints only.
        Spec {
            secrets: vec![(LONG, true), (SHORT, true), (SHORT_WORD, false)],
            prefixes: vec![],
            regexes: vec![],
            hosts: vec!["prod.example"],
        },
        // A pattern only (the shortest match is the prefix's).
        Spec { secrets: vec![], prefixes: vec!["sk_live_"], regexes: vec!["xox[bp]-[0-9]{4}"], hosts: vec![] },
    ]
}

fn build(spec: &Spec) -> (Detector, reference::Detector) {
    let mut labels = Vec::new();
    let (mut new_fps, mut old_fps) = (Vec::new(), Vec::new());
    for (i, (secret, known)) in spec.secrets.iter().enumerate() {
        labels.push(format!("secret{i}"));
        let sha256: [u8; 32] = Sha256::digest(secret).into();
        let length = known.then_some(secret.len());
        new_fps.push(detect::Fingerprint { sha256, length, label: labels.len() - 1 });
        old_fps.push(reference::Fingerprint { sha256, length, label: labels.len() - 1 });
    }
    let (mut new_patterns, mut old_patterns) = (Vec::new(), Vec::new());
    for prefix in &spec.prefixes {
        labels.push(format!("prefix-{prefix}"));
        let label = labels.len() - 1;
        new_patterns.push(detect::Pattern { label, matcher: detect::PatternMatcher::Prefix(prefix.as_bytes().to_vec()) });
        old_patterns.push(reference::Pattern { label, matcher: reference::PatternMatcher::Prefix(prefix.as_bytes().to_vec()) });
    }
    for regex in &spec.regexes {
        labels.push(format!("regex-{regex}"));
        let label = labels.len() - 1;
        let compiled = regex::bytes::Regex::new(regex).unwrap();
        new_patterns.push(detect::Pattern { label, matcher: detect::PatternMatcher::Regex(compiled.clone()) });
        old_patterns.push(reference::Pattern { label, matcher: reference::PatternMatcher::Regex(compiled) });
    }
    let new_hosts = spec.hosts.iter().map(|h| detect::HostRule::parse(h).unwrap()).collect();
    let old_hosts = spec.hosts.iter().map(|h| reference::HostRule::parse(h).unwrap()).collect();
    (
        Detector::new(labels.clone(), new_fps, new_patterns, new_hosts),
        reference::Detector::new(labels, old_fps, old_patterns, old_hosts),
    )
}

/// Both detectors on one value: the same finding (or none), and the same budget left.
fn same(new: &Detector, old: &reference::Detector, value: &[u8]) {
    let prefixes: [&[&'static str]; 3] = [&[], &["bearer"], &["gzip"; 17]];
    for how in prefixes {
        for depth in [0, 1, MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1] {
            for budget in [1 << 20, 64, 300, value.len().saturating_mul(2)] {
                let (mut new_budget, mut old_budget) = (Budget::new(budget), reference::Budget::new(budget));
                let found = new.inspect(value, how, depth, &mut new_budget);
                let expected = old.inspect(value, how, depth, &mut old_budget);
                assert_eq!(
                    format!("{found:?}"),
                    format!("{expected:?}"),
                    "value {:?} how {how:?} depth {depth} budget {budget}",
                    String::from_utf8_lossy(value)
                );
                assert_eq!((new_budget.left(), new_budget.exceeded()), (old_budget.left(), old_budget.exceeded()));
            }
        }
    }
    assert_eq!(format!("{:?}", new.scan(value, &["x"])), format!("{:?}", old.scan(value, &["x"])));
    assert_eq!(format!("{:?}", new.exact(value, &[])), format!("{:?}", old.exact(value, &[])));
    if let Ok(text) = std::str::from_utf8(value) {
        assert_eq!(format!("{:?}", new.production_host(text)), format!("{:?}", old.production_host(text)));
        assert_eq!(detect::host_of(text), reference::host_of(text));
    }
}

fn same_everywhere(value: &[u8]) {
    for spec in specs() {
        let (new, old) = build(&spec);
        same(&new, &old, value);
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

fn zlib(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

/// One layer of encoding (or of context) around a value.
#[derive(Debug, Clone, Copy)]
enum Layer {
    Base64,
    Base64Unpadded,
    Base64Url,
    Base64Wrapped,
    Percent,
    PercentSome,
    Gzip,
    Zlib,
    JsonString,
    JsonKey,
    KeyEquals,
    UserColon,
    StructuredField,
    Quoted,
    Sentence,
    Dot,
    Bearer,
    Url,
}

fn apply(layer: Layer, data: &[u8], filler: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(data).into_owned();
    match layer {
        Layer::Base64 => base64::engine::general_purpose::STANDARD.encode(data).into_bytes(),
        Layer::Base64Unpadded => base64::engine::general_purpose::STANDARD_NO_PAD.encode(data).into_bytes(),
        Layer::Base64Url => base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data).into_bytes(),
        Layer::Base64Wrapped => {
            let encoded = base64::engine::general_purpose::STANDARD.encode(data).into_bytes();
            let mut out = Vec::new();
            for (i, chunk) in encoded.chunks(19).enumerate() {
                if i > 0 {
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(chunk);
            }
            out
        }
        Layer::Percent => data.iter().flat_map(|b| format!("%{b:02X}").into_bytes()).collect(),
        Layer::PercentSome => data
            .iter()
            .enumerate()
            .flat_map(|(i, b)| if i % 3 == 0 || !b.is_ascii_alphanumeric() { format!("%{b:02x}").into_bytes() } else { vec![*b] })
            .collect(),
        Layer::Gzip => gzip(data),
        Layer::Zlib => zlib(data),
        Layer::JsonString => {
            serde_json::to_vec(&serde_json::json!({ "note": String::from_utf8_lossy(filler), "v": [text] })).unwrap()
        }
        Layer::JsonKey => serde_json::to_vec(&serde_json::json!({ text: 1 })).unwrap(),
        Layer::KeyEquals => [b"key=".as_slice(), data].concat(),
        Layer::UserColon => [data, b":".as_slice(), filler].concat(),
        Layer::StructuredField => {
            [b"sha-256=:".as_slice(), base64::engine::general_purpose::STANDARD.encode(data).as_bytes(), b":"].concat()
        }
        Layer::Quoted => [b"\"".as_slice(), data, b"\""].concat(),
        Layer::Sentence => [filler, b" ".as_slice(), data, b" ", filler].concat(),
        Layer::Dot => [data, b".".as_slice()].concat(),
        Layer::Bearer => [b"Bearer ".as_slice(), data].concat(),
        Layer::Url => [b"https://x.example/a/".as_slice(), data, b"?q=", filler].concat(),
    }
}

fn layer() -> impl Strategy<Value = Layer> {
    prop_oneof![
        Just(Layer::Base64),
        Just(Layer::Base64Unpadded),
        Just(Layer::Base64Url),
        Just(Layer::Base64Wrapped),
        Just(Layer::Percent),
        Just(Layer::PercentSome),
        Just(Layer::Gzip),
        Just(Layer::Zlib),
        Just(Layer::JsonString),
        Just(Layer::JsonKey),
        Just(Layer::KeyEquals),
        Just(Layer::UserColon),
        Just(Layer::StructuredField),
        Just(Layer::Quoted),
        Just(Layer::Sentence),
        Just(Layer::Dot),
        Just(Layer::Bearer),
        Just(Layer::Url),
    ]
}

/// The innermost value: a credential, a near miss, or noise in the alphabet that matters.
fn core() -> impl Strategy<Value = Vec<u8>> {
    let noise = proptest::collection::vec(
        prop_oneof![
            4 => proptest::sample::select(b"abcXYZ019+/-_=%:;,. \t\r\n\"'{}[]()&?|\\<>!@#".to_vec()),
            1 => any::<u8>(),
        ],
        0..60,
    );
    prop_oneof![
        Just(LONG.to_vec()),
        Just(SHORT.to_vec()),
        Just(WITH_DELIMITERS.to_vec()),
        Just(PASSWORD.to_vec()),
        Just(SHORT_WORD.to_vec()),
        Just(WITH_COLON.to_vec()),
        Just([WITH_COLON, b":"].concat()),
        Just(b"sk_live_4eC39HqLyjWDarjtT1zdp7dc".to_vec()),
        Just(b"sk_live_".to_vec()),
        Just(b"ghp_0123456789abcdef".to_vec()),
        Just(b"AKIAABCDEFGHIJKLMNOP".to_vec()),
        Just(b"xoxb-1234".to_vec()),
        // Near misses: one byte changed, one missing.
        Just(b"fake-apns-prod-key-0123456789abcdeF".to_vec()),
        Just(b"fake-apns-prod-key-0123456789abcde".to_vec()),
        Just(b"s3cr3t!".to_vec()),
        noise.clone(),
        (
            noise,
            proptest::sample::select(vec![LONG, SHORT, PASSWORD, SHORT_WORD, WITH_COLON]),
            proptest::collection::vec(any::<u8>(), 0..12)
        )
            .prop_map(|(mut before, secret, after)| {
                before.push(b' ');
                before.extend_from_slice(secret);
                before.push(b' ');
                before.extend_from_slice(&after);
                before
            }),
    ]
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    (core(), proptest::collection::vec(layer(), 0..10), proptest::collection::vec(any::<u8>(), 0..16)).prop_map(
        |(core, layers, filler)| {
            let filler: Vec<u8> = filler.iter().map(|b| b"abc de=f:gh%2\n;X/+"[usize::from(*b) % 18]).collect();
            layers.iter().fold(core, |data, layer| apply(*layer, &data, &filler))
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn the_scan_finds_what_it_found_before(value in value()) {
        same_everywhere(&value);
    }

    #[test]
    fn the_scan_finds_what_it_found_before_in_any_bytes(value in proptest::collection::vec(any::<u8>(), 0..300)) {
        same_everywhere(&value);
    }
}

/// Every layer, alone and nested to past the depth bound, around every credential: the same
/// verdicts (a fixed table, so that a proptest seed cannot miss one).
#[test]
fn every_layer_at_every_depth_as_before() {
    let layers = [
        Layer::Base64,
        Layer::Base64Unpadded,
        Layer::Base64Url,
        Layer::Base64Wrapped,
        Layer::Percent,
        Layer::PercentSome,
        Layer::Gzip,
        Layer::Zlib,
        Layer::JsonString,
        Layer::JsonKey,
        Layer::KeyEquals,
        Layer::UserColon,
        Layer::StructuredField,
        Layer::Quoted,
        Layer::Sentence,
        Layer::Dot,
        Layer::Bearer,
        Layer::Url,
    ];
    let mut found = 0;
    for secret in [LONG, SHORT, SHORT_WORD, WITH_COLON, WITH_DELIMITERS, PASSWORD, b"sk_live_abcdefgh".as_slice()] {
        for (i, outer) in layers.iter().enumerate() {
            for inner in layers.iter().skip(i % 3).step_by(3) {
                for nesting in 1..=MAX_DEPTH + 2 {
                    let mut data = secret.to_vec();
                    for level in 0..nesting {
                        data = apply(if level % 2 == 0 { *inner } else { *outer }, &data, b"some text here");
                    }
                    same_everywhere(&data);
                    let (new, _) = build(&specs()[0]);
                    found += usize::from(new.inspect(&data, &[], 0, &mut Budget::new(1 << 20)).is_some());
                }
            }
        }
    }
    // The table holds findings (and too-deep values), not only clean values.
    assert!(found > 500, "{found}");
}

/// The headers of a signed request (as the benchmark sends them) and other everyday values.
#[test]
fn everyday_header_values_as_before() {
    for value in [
        "sig1=(\"@method\" \"@authority\" \"@path\" \"content-type\" \"content-digest\" \"idempotency-key\");created=1700000000;keyid=\"bench-key\";nonce=\"n00000-000000001\"",
        "sig1=:K2qGT5srn2OGbOIDzQ6kYT+ruaycnDAAUpKv+ePFfD0=:",
        "sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:",
        "application/json",
        "\"bench-00000-000000001\"",
        "u000000001",
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36",
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c",
        "API.Push.Apple.com:443",
        "x.PROD.example.com.",
        "[::1]:8080",
        "",
        "   ",
    ] {
        same_everywhere(value.as_bytes());
    }
}

/// `body_kind` as it was: the media type compared lower-cased.
fn body_kind_before(content_type: &str) -> super::request::BodyKind {
    use super::request::BodyKind;
    let mut params = content_type.split(';');
    let media = params.next().unwrap_or("").trim().to_ascii_lowercase();
    if media == "application/json" || media.ends_with("+json") {
        BodyKind::Json
    } else if media == "application/x-www-form-urlencoded" {
        BodyKind::Form
    } else if media.starts_with("multipart/") {
        let boundary = params
            .filter_map(|p| p.split_once('='))
            .find(|(name, _)| name.trim().eq_ignore_ascii_case("boundary"))
            .map(|(_, value)| {
                let value = value.trim();
                value.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(value).to_string()
            })
            .unwrap_or_default();
        BodyKind::Multipart(boundary)
    } else {
        BodyKind::Text
    }
}

#[test]
fn body_kind_as_before() {
    for content_type in [
        "",
        "application/json",
        "Application/JSON; charset=utf-8",
        "application/problem+json",
        "application/PROBLEM+JSON",
        "+json",
        "json",
        "application/x-www-form-urlencoded",
        "APPLICATION/X-WWW-FORM-URLENCODED;charset=utf-8",
        "multipart/form-data; boundary=xyz",
        "MULTIPART/mixed; BOUNDARY=\"a b\"",
        "multipart/",
        "multipart",
        "text/plain",
        " application/json ",
        "é+json",
        "multipart/é",
    ] {
        assert_eq!(super::request::body_kind(content_type), body_kind_before(content_type), "{content_type:?}");
    }
}

proptest! {
    #[test]
    fn body_kinds_and_hosts_as_before_on_any_text(text in "[ -~é]{0,40}") {
        let upper = text.to_ascii_uppercase();
        for text in [text.as_str(), upper.as_str()] {
            prop_assert_eq!(super::request::body_kind(text), body_kind_before(text));
            same_everywhere(text.as_bytes());
        }
    }
}
