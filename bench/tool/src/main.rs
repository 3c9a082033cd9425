//! The benchmark's Rust side (driven by `bench/run.py`, started by `bash scripts/bench.sh`).
//!
//! `firebreak-bench requests --out DIR --count N --created UNIX_SECS [--sizes 0,1024,10240]`
//!     Pre-signs N distinct requests per body size (unique nonce, Idempotency-Key and client id
//!     each) as fixed-width HTTP/1.1 header blocks, so that `wrk` (bench/replay.lua) can replay
//!     them at full speed: every request the filters see is a real, acceptable signed POST.
//!
//! `firebreak-bench micro --wasm-dir DIR [--iterations N]`
//!     Each decision core natively and the same code in its wasm module in the test host
//!     (host-tests), on the same inputs; host calls per accepted request, per filter and for the
//!     whole chain (separate modules and the one-module chain). Prints JSON.
//!
//! `firebreak-bench calls --wasm-dir DIR [--size S]`
//!     Host calls per accepted request of each module and of the one-module chain at body size S
//!     (the test host's count), for the cost breakdown. Prints JSON.

#[cfg(feature = "count-allocs")]
pub mod allocs;
mod coreloop;
mod flows;
mod micro;
mod requests;

use std::collections::BTreeMap;
use std::process::ExitCode;

pub const AUTHORITY: &str = "bench.firebreak";
pub const PATH: &str = "/v1/transfers";
pub const KEY_ID: &str = "demo-client";
/// The demo key of the README (never used anywhere real).
pub const SECRET_B64: &str = "ZGVtby1jbGllbnQtc2VjcmV0LWRvLW5vdC11c2UtaW4tcHJvZHVjdGlvbiE=";

/// `--name value` pairs.
pub struct Args(BTreeMap<String, String>);

impl Args {
    fn parse(raw: &[String]) -> Result<Args, String> {
        let mut map = BTreeMap::new();
        let mut it = raw.iter();
        while let Some(name) = it.next() {
            let Some(name) = name.strip_prefix("--") else { return Err(format!("unexpected argument {name}")) };
            let value = it.next().ok_or_else(|| format!("--{name} needs a value"))?;
            map.insert(name.to_string(), value.clone());
        }
        Ok(Args(map))
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    pub fn req(&self, name: &str) -> Result<&str, String> {
        self.get(name).ok_or_else(|| format!("--{name} is required"))
    }

    pub fn num<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T, String> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| format!("--{name}: not a number: {v}")),
        }
    }

    pub fn sizes(&self) -> Result<Vec<usize>, String> {
        self.get("sizes")
            .unwrap_or("0,1024,10240")
            .split(',')
            .map(|s| s.trim().parse().map_err(|_| format!("--sizes: {s}")))
            .collect()
    }
}

/// A JSON money request of exactly `size` bytes (empty for 0).
pub fn body(size: usize) -> Vec<u8> {
    if size == 0 {
        return Vec::new();
    }
    let head = r#"{"from":"acc-alice","to":"acc-bob","amount":100,"currency":"CNY","memo":""#;
    let tail = r#""}"#;
    let fill = size.saturating_sub(head.len() + tail.len());
    let mut out = format!("{head}{}{tail}", "x".repeat(fill)).into_bytes();
    out.truncate(size.max(head.len() + tail.len()));
    out
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = argv.split_first() else {
        eprintln!("usage: firebreak-bench requests|micro --option value ...");
        return ExitCode::from(2);
    };
    let result = Args::parse(rest).and_then(|args| match command.as_str() {
        "requests" => requests::run(&args),
        "micro" => micro::run(&args),
        "calls" => micro::calls(&args),
        "flows" => flows::run(&args),
        other => Err(format!("unknown command {other}")),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("firebreak-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
