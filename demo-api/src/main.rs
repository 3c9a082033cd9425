//! The demo money API that Firebreak protects.
//!
//! It is deliberately naive in the way incident 1's API was: it trusts every request that reaches
//! it and executes each one, so the ledger (`GET /v1/ledger`) shows exactly how many money
//! operations the gateway let through.
//!
//! Test hooks (for the end-to-end tests and the demo; a real API has none):
//! - `x-demo-fault: fail-after-commit`: execute the operation, then answer 503 (an uncertain
//!   outcome, like payment channel A in incident 2);
//! - `x-demo-delay-ms: N` (at most 10000): wait before executing.

use std::collections::BTreeMap;
use std::io::{BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::{json, Value};

const MAX_BODY: usize = 1024 * 1024;
const MAX_HEAD: usize = 64 * 1024;

#[derive(Default)]
struct Bank {
    balances: BTreeMap<String, i64>,
    ledger: Vec<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MoneyRequest {
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    to: Option<String>,
    #[serde(default)]
    account: Option<String>,
    amount: i64,
    #[serde(default)]
    reference: Option<String>,
    #[serde(default)]
    currency: Option<String>,
}

/// One parsed HTTP/1.1 request.
struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

struct Reply {
    status: u16,
    body: Value,
}

fn main() {
    let mut listen = "127.0.0.1:8080".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = args.next().unwrap_or(listen),
            "-h" | "--help" => {
                println!("demo-api [--listen 127.0.0.1:8080]");
                return;
            }
            other => {
                eprintln!("demo-api: unknown argument {other}");
                std::process::exit(2);
            }
        }
    }
    let listener = match TcpListener::bind(&listen) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("demo-api: cannot listen on {listen}: {e}");
            std::process::exit(1);
        }
    };
    let mut bank = Bank::default();
    for (account, balance) in [("acc-alice", 100_000), ("acc-bob", 100_000), ("acc-carol", 100_000), ("acc-platform", 10_000_000)]
    {
        bank.balances.insert(account.to_string(), balance);
    }
    let bank = Arc::new(Mutex::new(bank));
    eprintln!("demo-api: listening on http://{listen}");
    // One thread per connection, HTTP/1.1 keep-alive: simple and predictable under the proxy's
    // connection pool.
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let bank = bank.clone();
        std::thread::spawn(move || serve_connection(stream, &bank));
    }
}

fn serve_connection(stream: TcpStream, bank: &Mutex<Bank>) {
    let _ = stream.set_nodelay(true);
    let Ok(write_half) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    let mut writer = write_half;
    loop {
        let request = match read_request(&mut reader) {
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err(message) => {
                let _ = write_reply(
                    &mut writer,
                    &Reply { status: 400, body: json!({"error": "bad_request", "message": message}) },
                    true,
                );
                return;
            }
        };
        let close = request.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let reply = handle(&request, bank);
        if write_reply(&mut writer, &reply, close).is_err() || close {
            return;
        }
    }
}

/// Reads one request (the shared HTTP/1.1 reader, `tools/http1`); `Ok(None)` when the peer
/// closed the connection between requests.
fn read_request(reader: &mut BufReader<TcpStream>) -> Result<Option<Request>, String> {
    let limits = firebreak_http1::Limits { max_head: MAX_HEAD, max_body: MAX_BODY, max_headers: 128 };
    let Some(m) = firebreak_http1::read_message(reader, firebreak_http1::Kind::Request, &limits).map_err(|e| e.0)? else {
        return Ok(None);
    };
    Ok(Some(Request { method: m.method, path: m.path, headers: m.headers, body: m.body }))
}

fn write_reply(writer: &mut TcpStream, reply: &Reply, close: bool) -> std::io::Result<()> {
    let body = reply.body.to_string();
    let reason = match reply.status {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        404 => "Not Found",
        422 => "Unprocessable Content",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let head = format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{}\r\n",
        reply.status,
        body.len(),
        if close { "connection: close\r\n" } else { "" }
    );
    writer.write_all(head.as_bytes())?;
    writer.write_all(body.as_bytes())?;
    writer.flush()
}

fn ok(status: u16, body: Value) -> Reply {
    Reply { status, body }
}

fn error(status: u16, code: &str, message: &str) -> Reply {
    Reply { status, body: json!({"error": code, "message": message}) }
}

fn handle(request: &Request, bank: &Mutex<Bank>) -> Reply {
    let path = request.path.split('?').next().unwrap_or("");
    match (request.method.as_str(), path) {
        ("GET", "/healthz") => ok(200, json!({"ok": true})),
        ("GET", "/v1/ledger") => match bank.lock() {
            Ok(bank) => ok(200, json!({"count": bank.ledger.len(), "operations": bank.ledger})),
            Err(_) => error(500, "internal", "ledger lock poisoned"),
        },
        ("GET", p) if p.starts_with("/v1/accounts/") && p.ends_with("/balance") => {
            let id = p.trim_start_matches("/v1/accounts/").trim_end_matches("/balance").to_string();
            let balance = bank.lock().ok().and_then(|b| b.balances.get(&id).copied());
            match balance {
                Some(balance) => ok(200, json!({"account": id, "balance": balance})),
                None => error(404, "account_not_found", "no such account"),
            }
        }
        ("POST", "/v1/transfers" | "/v1/withdrawals" | "/v1/payouts") => {
            let kind = path.trim_start_matches("/v1/").trim_end_matches('s');
            let parsed: MoneyRequest = match serde_json::from_slice(&request.body) {
                Ok(p) => p,
                Err(e) => return error(400, "bad_json", &e.to_string()),
            };
            if let Some(ms) = request.header("x-demo-delay-ms").and_then(|v| v.parse::<u64>().ok()) {
                std::thread::sleep(Duration::from_millis(ms.min(10_000)));
            }
            let principal = request.header("x-firebreak-principal").map(str::to_string);
            let idempotency_key = request.header("idempotency-key").map(str::to_string);
            let fail_after_commit = request.header("x-demo-fault") == Some("fail-after-commit");
            match execute(bank, kind, &parsed, principal, idempotency_key) {
                Ok(_) if fail_after_commit => {
                    error(503, "upstream_unavailable", "the channel timed out (the operation did execute)")
                }
                Ok(operation) => ok(201, operation),
                Err((status, code, message)) => error(status, code, &message),
            }
        }
        _ => error(404, "not_found", "no such endpoint"),
    }
}

fn execute(
    bank: &Mutex<Bank>,
    kind: &str,
    request: &MoneyRequest,
    principal: Option<String>,
    idempotency_key: Option<String>,
) -> Result<Value, (u16, &'static str, String)> {
    if request.amount <= 0 {
        return Err((422, "invalid_amount", "amount must be a positive integer (minor units)".into()));
    }
    let mut bank = bank.lock().map_err(|_| (500, "internal", "ledger lock poisoned".to_string()))?;
    let (debit, credit) = match kind {
        "transfer" => (request.from.clone(), request.to.clone()),
        "withdrawal" => (request.account.clone().or(request.from.clone()), None),
        _ => (Some("acc-platform".to_string()), request.account.clone().or(request.to.clone())),
    };
    if kind == "transfer" && (debit.is_none() || credit.is_none()) {
        return Err((422, "invalid_request", "a transfer needs `from` and `to`".into()));
    }
    for account in debit.iter().chain(credit.iter()) {
        if !bank.balances.contains_key(account) {
            return Err((404, "account_not_found", format!("no account `{account}`")));
        }
    }
    if let Some(account) = &debit {
        let balance = bank.balances.get(account).copied().unwrap_or(0);
        if balance < request.amount {
            return Err((422, "insufficient_funds", format!("`{account}` holds {balance}")));
        }
        bank.balances.insert(account.clone(), balance - request.amount);
    }
    if let Some(account) = &credit {
        let balance = bank.balances.get(account).copied().unwrap_or(0);
        bank.balances.insert(account.clone(), balance + request.amount);
    }
    let id = format!("op-{}", bank.ledger.len() + 1);
    let at_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let operation = json!({
        "id": id,
        "kind": kind,
        "from": debit,
        "to": credit,
        "amount": request.amount,
        "currency": request.currency.clone().unwrap_or_else(|| "CNY".into()),
        "reference": request.reference,
        "principal": principal,
        "idempotency_key": idempotency_key,
        "at_ms": at_ms,
    });
    bank.ledger.push(operation.clone());
    Ok(operation)
}
