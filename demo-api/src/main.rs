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
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::{json, Value};
use tiny_http::{Header, Method, Request, Response, Server};

const MAX_BODY: u64 = 1024 * 1024;

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
    let server = match Server::http(&listen) {
        Ok(server) => Arc::new(server),
        Err(e) => {
            eprintln!("demo-api: cannot listen on {listen}: {e}");
            std::process::exit(1);
        }
    };
    let mut bank = Bank::default();
    for (account, balance) in [("acc-alice", 100_000), ("acc-bob", 100_000), ("acc-carol", 100_000), ("acc-platform", 10_000_000)] {
        bank.balances.insert(account.to_string(), balance);
    }
    let bank = Arc::new(Mutex::new(bank));
    eprintln!("demo-api: listening on http://{listen}");
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let server = server.clone();
            let bank = bank.clone();
            std::thread::spawn(move || {
                while let Ok(request) = server.recv() {
                    handle(request, &bank);
                }
            })
        })
        .collect();
    for worker in workers {
        let _ = worker.join();
    }
}

fn header<'a>(request: &'a Request, name: &'static str) -> Option<&'a str> {
    request.headers().iter().find(|h| h.field.equiv(name)).map(|h| h.value.as_str())
}

fn reply(request: Request, status: u16, body: Value) {
    let content_type = Header::from_bytes("content-type", "application/json").ok();
    let mut response = Response::from_string(body.to_string()).with_status_code(status);
    if let Some(h) = content_type {
        response = response.with_header(h);
    }
    let _ = request.respond(response);
}

fn error(request: Request, status: u16, code: &str, message: &str) {
    reply(request, status, json!({"error": code, "message": message}));
}

fn handle(mut request: Request, bank: &Mutex<Bank>) {
    let url = request.url().to_string();
    let path = url.split('?').next().unwrap_or("").to_string();
    let method = request.method().clone();
    match (&method, path.as_str()) {
        (Method::Get, "/healthz") => reply(request, 200, json!({"ok": true})),
        (Method::Get, "/v1/ledger") => {
            let bank = match bank.lock() {
                Ok(b) => b,
                Err(_) => return error(request, 500, "internal", "ledger lock poisoned"),
            };
            let body = json!({"count": bank.ledger.len(), "operations": bank.ledger});
            drop(bank);
            reply(request, 200, body)
        }
        (Method::Get, p) if p.starts_with("/v1/accounts/") && p.ends_with("/balance") => {
            let id = p.trim_start_matches("/v1/accounts/").trim_end_matches("/balance").to_string();
            let balance = bank.lock().ok().and_then(|b| b.balances.get(&id).copied());
            match balance {
                Some(balance) => reply(request, 200, json!({"account": id, "balance": balance})),
                None => error(request, 404, "account_not_found", "no such account"),
            }
        }
        (Method::Post, "/v1/transfers" | "/v1/withdrawals" | "/v1/payouts") => {
            let kind = path.trim_start_matches("/v1/").trim_end_matches('s').to_string();
            let mut body = Vec::new();
            if request.as_reader().take(MAX_BODY + 1).read_to_end(&mut body).is_err() || body.len() as u64 > MAX_BODY {
                return error(request, 400, "bad_body", "unreadable or too large body");
            }
            let parsed: MoneyRequest = match serde_json::from_slice(&body) {
                Ok(p) => p,
                Err(e) => return error(request, 400, "bad_json", &e.to_string()),
            };
            if let Some(ms) = header(&request, "x-demo-delay-ms").and_then(|v| v.parse::<u64>().ok()) {
                std::thread::sleep(Duration::from_millis(ms.min(10_000)));
            }
            let principal = header(&request, "x-firebreak-principal").map(str::to_string);
            let idempotency_key = header(&request, "idempotency-key").map(str::to_string);
            let fail_after_commit = header(&request, "x-demo-fault") == Some("fail-after-commit");
            let outcome = execute(bank, &kind, &parsed, principal, idempotency_key);
            match outcome {
                Ok(operation) if fail_after_commit => {
                    let _ = operation;
                    error(request, 503, "upstream_unavailable", "the channel timed out (the operation did execute)")
                }
                Ok(operation) => reply(request, 201, operation),
                Err((status, code, message)) => error(request, status, code, &message),
            }
        }
        _ => error(request, 404, "not_found", "no such endpoint"),
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
