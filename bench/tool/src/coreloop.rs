//! The signature decision loop, compiled twice from this one file: natively into the bench tool,
//! and to wasm32-wasip1 in bench/core-wasm (run by wasmtime from the bench tool). Both read the
//! same JSON input and time the same code: the "same code, wasm against native" comparison
//! without any proxy-wasm host in between.
//!
//! Input: {"config": "<signature policy JSON>", "now_ms": N, "reps": R,
//!         "requests": [{"headers": [[name, value], ...], "body": "..."}]}
//! Output: {"ns_per_request": [one per repetition], "accepted": n}

use firebreak_core::signature::{claim_nonce, verify_body, verify_headers, RequestView, SignaturePolicy};
use firebreak_core::store::MemoryStore;

pub fn run(input: &str) -> Result<String, String> {
    let v: serde_json::Value = serde_json::from_str(input).map_err(|e| e.to_string())?;
    let config = v["config"].as_str().ok_or("config")?;
    let now_ms = v["now_ms"].as_u64().ok_or("now_ms")?;
    let reps = v["reps"].as_u64().ok_or("reps")? as usize;
    let policy = SignaturePolicy::from_json(config.as_bytes(), &|_| None).map_err(|e| format!("{e:?}"))?;
    let mut requests: Vec<(Vec<(String, String)>, Vec<u8>)> = Vec::new();
    for r in v["requests"].as_array().ok_or("requests")? {
        let headers = r["headers"]
            .as_array()
            .ok_or("headers")?
            .iter()
            .map(|p| (p[0].as_str().unwrap_or("").to_string(), p[1].as_str().unwrap_or("").to_string()))
            .collect();
        requests.push((headers, r["body"].as_str().unwrap_or("").as_bytes().to_vec()));
    }
    let find = |h: &[(String, String)], name: &str| h.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    let mut times = Vec::new();
    let mut accepted = 0usize;
    for _ in 0..reps {
        let store = MemoryStore::default();
        accepted = 0;
        let start = std::time::Instant::now();
        for (headers, body) in &requests {
            let path = find(headers, ":path").unwrap_or_default();
            let authority = find(headers, ":authority").unwrap_or_default();
            let view = RequestView { method: "POST", scheme: "http", authority: &authority, path_and_query: &path, headers };
            let Ok(verified) = verify_headers(&policy, &view, now_ms) else { continue };
            if claim_nonce(&policy, &store, &verified, now_ms).is_err() {
                continue;
            }
            if verify_body(&policy, &verified, find(headers, "content-digest").as_deref(), body).is_ok() {
                accepted += 1;
            }
        }
        times.push(start.elapsed().as_nanos() as f64 / requests.len().max(1) as f64);
    }
    Ok(serde_json::json!({"ns_per_request": times, "accepted": accepted}).to_string())
}
