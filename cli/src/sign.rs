//! `firebreak sign`: the headers that make a request acceptable to the request-signature filter.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use firebreak_core::signature::{sign, SignRequest};

/// Parsed `firebreak sign` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct SignArgs {
    /// Key id (`keyid` parameter).
    #[arg(long, default_value = "demo-client")]
    pub key_id: String,
    /// Base64 secret. Prefer --secret-env: command lines are visible to other users.
    #[arg(long, conflicts_with = "secret_env")]
    pub secret_base64: Option<String>,
    /// Environment variable holding the base64 secret.
    #[arg(long, default_value = "FIREBREAK_DEMO_KEY")]
    pub secret_env: String,
    #[arg(long, short = 'X', default_value = "POST")]
    pub method: String,
    /// Full URL, e.g. http://127.0.0.1:10000/v1/transfers
    #[arg(long)]
    pub url: String,
    /// Request body.
    #[arg(long, short = 'd', conflicts_with = "data_file")]
    pub data: Option<String>,
    /// Read the body from a file.
    #[arg(long)]
    pub data_file: Option<std::path::PathBuf>,
    /// Extra header `name: value` sent with the request (repeatable). Covered when --cover names it.
    #[arg(long = "header", short = 'H')]
    pub headers: Vec<String>,
    /// Also cover this header (repeatable), e.g. idempotency-key.
    #[arg(long)]
    pub cover: Vec<String>,
    /// Exact component list instead of the default (comma separated).
    #[arg(long, value_delimiter = ',')]
    pub components: Option<Vec<String>>,
    /// Nonce; random when absent.
    #[arg(long)]
    pub nonce: Option<String>,
    /// Unix seconds; now when absent.
    #[arg(long)]
    pub created: Option<u64>,
    #[arg(long)]
    pub expires: Option<u64>,
    #[arg(long, default_value = "sig1")]
    pub label: String,
    /// Output: `headers` (one `Name: value` per line), `json`, or `curl` (a complete command).
    #[arg(long, default_value = "headers")]
    pub format: String,
}

/// A URL split the way the verifier sees it.
pub struct Target {
    pub scheme: String,
    pub authority: String,
    pub path_and_query: String,
}

pub fn parse_url(url: &str) -> Result<Target, String> {
    let (scheme, rest) = url.split_once("://").ok_or("the URL needs a scheme (http:// or https://)")?;
    if scheme != "http" && scheme != "https" {
        return Err(format!("unsupported scheme `{scheme}`"));
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err("the URL has no host".into());
    }
    Ok(Target { scheme: scheme.into(), authority: authority.into(), path_and_query: path.into() })
}

fn random_nonce() -> Result<String, String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| format!("cannot read /dev/urandom for a nonce: {e}"))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// Runs `firebreak sign`; returns what to print.
pub fn run(args: &SignArgs) -> Result<String, String> {
    let secret_b64 = match &args.secret_base64 {
        Some(s) => s.clone(),
        None => std::env::var(&args.secret_env)
            .map_err(|_| format!("set {} to the base64 secret, or pass --secret-base64", args.secret_env))?,
    };
    let secret = base64::engine::general_purpose::STANDARD
        .decode(secret_b64.trim())
        .map_err(|_| "the secret is not valid base64".to_string())?;
    let target = parse_url(&args.url)?;
    let body = match (&args.data, &args.data_file) {
        (Some(d), _) => d.clone().into_bytes(),
        (None, Some(path)) => std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?,
        (None, None) => Vec::new(),
    };
    let mut headers = Vec::new();
    for h in &args.headers {
        let (name, value) = h.split_once(':').ok_or_else(|| format!("header `{h}` is not `name: value`"))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    let nonce = match &args.nonce {
        Some(n) => n.clone(),
        None => random_nonce()?,
    };
    let created = match args.created {
        Some(c) => c,
        None => SystemTime::now().duration_since(UNIX_EPOCH).map_err(|e| e.to_string())?.as_secs(),
    };
    let cover: Vec<String> = args.cover.iter().map(|c| c.to_ascii_lowercase()).collect();
    let signed = sign(&SignRequest {
        method: &args.method,
        scheme: &target.scheme,
        authority: &target.authority,
        path_and_query: &target.path_and_query,
        headers: &headers,
        body: &body,
        key_id: &args.key_id,
        secret: &secret,
        created,
        expires: args.expires,
        nonce: Some(&nonce),
        label: &args.label,
        components: args.components.clone(),
        extra_covered_headers: &cover,
    })?;
    let pairs = signed.pairs();
    Ok(match args.format.as_str() {
        "headers" => pairs.iter().map(|(n, v)| format!("{n}: {v}\n")).collect(),
        "json" => {
            let map: serde_json::Map<String, serde_json::Value> =
                pairs.into_iter().map(|(n, v)| (n, serde_json::Value::String(v))).collect();
            format!("{}\n", serde_json::Value::Object(map))
        }
        "curl" => {
            let mut cmd = format!("curl -sS -X {} {}", args.method, shell_quote(&args.url));
            for (n, v) in headers.iter().chain(pairs.iter()) {
                cmd.push_str(&format!(" \\\n  -H {}", shell_quote(&format!("{n}: {v}"))));
            }
            if !body.is_empty() {
                cmd.push_str(&format!(" \\\n  --data-binary {}", shell_quote(&String::from_utf8_lossy(&body))));
            }
            cmd.push('\n');
            cmd
        }
        other => return Err(format!("unknown --format `{other}` (headers, json, curl)")),
    })
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
