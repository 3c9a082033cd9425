//! Pre-signed requests for the load generator, as fixed-width records (one HTTP/1.1 header block
//! each; the body of the size follows on the wire), so that `wrk` can seek to its slice.

use std::io::Write;

use base64::Engine;
use firebreak_core::signature::{sign, SignRequest};

use crate::{body, Args, AUTHORITY, KEY_ID, PATH, SECRET_B64};

/// One request's header block. Every number is zero-padded so every record has the same length.
pub fn header_block(size: usize, index: u64, created: u64, secret: &[u8], body: &[u8]) -> Result<String, String> {
    let nonce = format!("n{size:05}-{index:09}");
    let idempotency_key = format!("bench-{size:05}-{index:09}");
    let covered = vec![
        ("content-type".to_string(), "application/json".to_string()),
        ("idempotency-key".to_string(), format!("\"{idempotency_key}\"")),
    ];
    let extra = ["idempotency-key".to_string()];
    let signed = sign(&SignRequest {
        method: "POST",
        scheme: "http",
        authority: AUTHORITY,
        path_and_query: PATH,
        headers: &covered,
        body,
        key_id: KEY_ID,
        secret,
        created,
        expires: None,
        nonce: Some(&nonce),
        label: "sig1",
        components: None,
        extra_covered_headers: &extra,
    })?;
    let mut out = format!(
        "POST {PATH} HTTP/1.1\r\nhost: {AUTHORITY}\r\ncontent-type: application/json\r\ncontent-length: {len}\r\n\
         idempotency-key: \"{idempotency_key}\"\r\nx-bench-client: c{client:04}\r\nx-bench-user: u{index:09}\r\n",
        len = body.len(),
        client = index % 1000,
    );
    if let Some(digest) = &signed.content_digest {
        out.push_str(&format!("content-digest: {digest}\r\n"));
    }
    out.push_str(&format!("signature-input: {}\r\nsignature: {}\r\n\r\n", signed.signature_input, signed.signature));
    Ok(out)
}

pub fn run(args: &Args) -> Result<(), String> {
    let out_dir = std::path::PathBuf::from(args.req("out")?);
    let count: u64 = args.num("count", 100_000)?;
    let created: u64 = args.num("created", 0)?;
    if created == 0 {
        return Err("--created (Unix seconds) is required".into());
    }
    let secret = base64::engine::general_purpose::STANDARD.decode(SECRET_B64).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&out_dir).map_err(|e| e.to_string())?;
    let mut meta = serde_json::Map::new();
    for size in args.sizes()? {
        let body = body(size);
        let body_path = out_dir.join(format!("body-{size}.bin"));
        std::fs::write(&body_path, &body).map_err(|e| e.to_string())?;
        let hdr_path = out_dir.join(format!("req-{size}.hdr"));
        let file = std::fs::File::create(&hdr_path).map_err(|e| e.to_string())?;
        let mut writer = std::io::BufWriter::with_capacity(1 << 20, file);
        let mut width = None;
        for index in 0..count {
            let block = header_block(size, index, created, &secret, &body)?;
            match width {
                None => width = Some(block.len()),
                Some(w) if w != block.len() => {
                    return Err(format!("record {index} of size {size} is {} bytes, not {w}", block.len()))
                }
                Some(_) => {}
            }
            writer.write_all(block.as_bytes()).map_err(|e| e.to_string())?;
        }
        writer.flush().map_err(|e| e.to_string())?;
        meta.insert(
            size.to_string(),
            serde_json::json!({
                "headers": hdr_path, "body": body_path, "record_len": width.unwrap_or(0), "count": count,
            }),
        );
    }
    let meta = serde_json::json!({"created": created, "authority": AUTHORITY, "path": PATH, "sizes": meta});
    std::fs::write(out_dir.join("requests.json"), serde_json::to_vec_pretty(&meta).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    println!("{}", serde_json::to_string(&meta).map_err(|e| e.to_string())?);
    Ok(())
}
