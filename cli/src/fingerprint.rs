//! `firebreak fingerprint`: the SHA-256 fingerprint of a secret read from standard input, for the
//! env-guard configuration (which never holds the secret itself).

use std::io::Read;

#[derive(Debug, Clone, clap::Args)]
pub struct FingerprintArgs {
    /// Print a `protected_credentials` entry (`{"label": .., "sha256": .., "length": ..}`) instead
    /// of the bare hex. The length (in bytes) lets env-guard hash only candidates of that length.
    #[arg(long)]
    pub label: Option<String>,
    /// Keep a trailing newline (by default exactly one trailing `\n` or `\r\n` is removed, so
    /// `echo "$SECRET" | firebreak fingerprint` and `printf %s "$SECRET" | ...` agree).
    #[arg(long)]
    pub keep_newline: bool,
}

/// The secret's bytes as the fingerprint sees them: one trailing newline stripped unless kept.
pub fn secret_bytes(mut input: Vec<u8>, keep_newline: bool) -> Vec<u8> {
    if !keep_newline && input.last() == Some(&b'\n') {
        input.pop();
        if input.last() == Some(&b'\r') {
            input.pop();
        }
    }
    input
}

pub fn fingerprint_of(input: Vec<u8>, args: &FingerprintArgs) -> Result<String, String> {
    let secret = secret_bytes(input, args.keep_newline);
    if secret.is_empty() {
        return Err("no secret on standard input".to_string());
    }
    let hex = firebreak_core::envguard::fingerprint(&secret);
    Ok(match &args.label {
        None => format!("{hex}\n"),
        Some(label) => {
            if !firebreak_core::envguard::config::valid_label(label) {
                return Err("--label: 1 to 64 characters of A-Z a-z 0-9 - _".to_string());
            }
            // Key order as in the README: label, sha256, length.
            format!("{{\"label\":{},\"sha256\":\"{hex}\",\"length\":{}}}\n", serde_json::json!(label), secret.len())
        }
    })
}

pub fn run(args: &FingerprintArgs) -> Result<String, String> {
    let mut input = Vec::new();
    std::io::stdin().read_to_end(&mut input).map_err(|e| format!("reading standard input: {e}"))?;
    fingerprint_of(input, args)
}
