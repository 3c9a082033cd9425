//! The engine's flows: the demo chain (rate-limit per IP, env-guard, request-signature, rate-limit
//! per user, replay-guard; envoy/demo.yaml) driven through the in-memory host
//! (`core::flow::memory`) by sequences of up to four requests with arbitrary headers, bodies
//! (in chunks), trailers, clocks and upstream answers, some of them correctly signed.
//!
//! Properties: never panics; every reply the chain sends is a documented code with its status,
//! JSON body and counter; a request with an unsafe method that was not signed by the demo key is
//! never forwarded; a payout is forwarded at most once per idempotency key unless the upstream
//! said it did not execute it (`not_executed_statuses`); a stream never stalls.
#![no_main]

use std::collections::HashMap;

use arbitrary::Arbitrary;
use firebreak_core::filters::{configure_chain, ChainFactory, Setup};
use firebreak_core::flow::memory::{exchange, MemoryEnv, MemoryRequest, MemoryUpstream};
use firebreak_core::flow::FlowFactory;
use firebreak_core::replay::DEFAULT_NOT_EXECUTED_STATUSES;
use firebreak_core::signature::config::is_safe_method;
use firebreak_core::signature::{sign, SignRequest};
use firebreak_core::store::MemoryStore;
use firebreak_fuzz::{check_rejection, decode_b64, demo_env, DEMO_CHAIN, DEMO_KEY_B64, SECOND_KEY_B64};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
enum Method {
    Post,
    Get,
    Put,
    Delete,
    Other(String),
}

#[derive(Debug, Arbitrary)]
enum Path {
    Payouts,
    Transfers,
    Withdrawals,
    Ledger,
    Other(String),
}

#[derive(Debug, Arbitrary)]
struct Signing {
    second_key: bool,
    nonce: u16,
    age_s: u8,
}

#[derive(Debug, Arbitrary)]
struct Request {
    method: Method,
    path: Path,
    idempotency_key: Option<u8>,
    content_type: Option<u8>,
    headers: Vec<(String, String)>,
    chunks: Vec<Vec<u8>>,
    trailers: Option<Vec<(String, String)>>,
    sign: Option<Signing>,
    source: Option<u8>,
    advance_ms: u16,
    upstream_status: u8,
    via_upstream: bool,
    cut: bool,
    disconnect: bool,
}

fn factory() -> &'static ChainFactory {
    static FACTORY: std::sync::OnceLock<ChainFactory> = std::sync::OnceLock::new();
    FACTORY.get_or_init(|| {
        let store = Box::leak(Box::new(MemoryStore::default()));
        let setup = Setup { env: &demo_env, store, entropy: [3; 32] };
        configure_chain(DEMO_CHAIN.as_bytes(), &setup).expect("the demo chain configures")
    })
}

fuzz_target!(|requests: Vec<Request>| {
    let factory = factory();
    let mut env = MemoryEnv::default();
    // (principal, key) -> a forward whose outcome forbids another one.
    let mut locked: HashMap<(bool, u8), bool> = HashMap::new();
    for (index, request) in requests.into_iter().take(4).enumerate() {
        let now_ms = env.now_ms.unwrap_or(0).saturating_add(u64::from(request.advance_ms));
        env.now_ms = Some(now_ms);
        let method = match &request.method {
            Method::Post => "POST",
            Method::Get => "GET",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
            Method::Other(m) => m.as_str(),
        };
        let path = match &request.path {
            Path::Payouts => "/v1/payouts",
            Path::Transfers => "/v1/transfers",
            Path::Withdrawals => "/v1/withdrawals",
            Path::Ledger => "/v1/ledger",
            Path::Other(p) => p.as_str(),
        };
        let mut headers = vec![
            (":method".to_string(), method.to_string()),
            (":scheme".to_string(), "http".to_string()),
            (":authority".to_string(), "127.0.0.1:10000".to_string()),
            (":path".to_string(), path.to_string()),
        ];
        if let Some(key) = request.idempotency_key {
            headers.push(("idempotency-key".into(), format!("\"key-{}\"", key % 4)));
        }
        if let Some(ct) = request.content_type {
            let types =
                ["application/json", "application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=b"];
            headers.push(("content-type".into(), types[usize::from(ct % 4)].into()));
        }
        headers.extend(request.headers.iter().cloned());
        let body: Vec<u8> = request.chunks.concat();
        let mut signed_by_demo = false;
        if let Some(signing) = &request.sign {
            let secret = decode_b64(if signing.second_key { SECOND_KEY_B64 } else { DEMO_KEY_B64 });
            let key_id = if signing.second_key { "second-client" } else { "demo-client" };
            let covered: Vec<String> =
                if request.idempotency_key.is_some() { vec!["idempotency-key".into()] } else { Vec::new() };
            let nonce = format!("n-{index}-{}", signing.nonce);
            let sign_headers: Vec<(String, String)> = headers.iter().filter(|(n, _)| !n.starts_with(':')).cloned().collect();
            let to_sign = SignRequest {
                method,
                scheme: "http",
                authority: "127.0.0.1:10000",
                path_and_query: path,
                headers: &sign_headers,
                body: &body,
                key_id,
                secret: &secret,
                created: now_ms / 1000 - u64::from(signing.age_s),
                expires: None,
                nonce: Some(&nonce),
                label: "sig1",
                components: None,
                extra_covered_headers: &covered,
            };
            if let Ok(signed) = sign(&to_sign) {
                headers.retain(|(n, _)| !matches!(n.as_str(), "content-digest" | "signature" | "signature-input"));
                headers.extend(signed.pairs());
                signed_by_demo = true;
            }
        }
        let memory_request = MemoryRequest {
            headers,
            chunks: request.chunks.clone(),
            trailers: request.trailers.clone(),
            source_address: request.source.map(|s| format!("10.0.0.{s}:4000")),
            principal: None,
            disconnect: request.disconnect,
        };
        let status = [201, 200, 503, 409, 500, 422, 302][usize::from(request.upstream_status % 7)];
        let upstream = MemoryUpstream {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            chunks: vec![b"{\"id\":\"op-1\"}".to_vec()],
            trailers: None,
            via_upstream: request.via_upstream,
            cut: request.cut,
        };
        let mut flow = factory.new_flow();
        let outcome = exchange(flow.as_mut(), &mut env, &memory_request, &upstream);

        assert!(!outcome.stalled, "the stream stalled");
        if let Some(rejection) = &outcome.reply {
            check_rejection(rejection);
            let counter = format!("rejected.{}", rejection.code);
            assert!(outcome.counters.keys().any(|c| c.ends_with(&counter)), "no counter {counter} in {:?}", outcome.counters);
        }
        if outcome.forwarded && !is_safe_method(method) {
            assert!(signed_by_demo, "an unsigned {method} {path:?} was forwarded");
        }
        if outcome.forwarded && method == "POST" && path == "/v1/payouts" {
            let Some(key) = request.idempotency_key else { panic!("a payout without a key was forwarded") };
            let principal = request.sign.as_ref().is_some_and(|s| s.second_key);
            let slot = (principal, key % 4);
            assert!(!locked.get(&slot).copied().unwrap_or(false), "payout key {slot:?} forwarded twice");
            // The upstream's own status saying it did not execute the request releases the key
            // (even if its body was then cut); a local reply or no answer does not.
            let released = request.via_upstream && !request.disconnect && DEFAULT_NOT_EXECUTED_STATUSES.contains(&status);
            locked.insert(slot, !released);
        }
    }
});
