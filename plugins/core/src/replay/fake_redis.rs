//! Redis behind the webdis bridge, as far as replay-guard's commands go (tests only): the
//! command in webdis path form in, webdis's JSON answer out. No clock: values do not expire (each
//! key's TTL is recorded).

use std::cell::RefCell;
use std::collections::HashMap;

use crate::flow::CallAnswer;
use crate::remote::{
    CLAIM_OR_GET_WITHIN_QUOTA_SCRIPT, COMPARE_AND_DELETE_SCRIPT, COMPARE_AND_SET_SCRIPT, SET_NX_WITHIN_QUOTA_SCRIPT,
};

use super::redis::RemoteCommand;

fn unescape(segment: &[u8]) -> String {
    percent_encoding::percent_decode(segment).decode_utf8().unwrap().into_owned()
}

#[derive(Default)]
pub struct FakeRedis {
    pub data: RefCell<HashMap<String, String>>,
    pub ttl: RefCell<HashMap<String, u64>>,
}

impl FakeRedis {
    /// The quota part of the scripts: false at the limit (nothing written).
    fn count(data: &mut HashMap<String, String>, ttl: &mut HashMap<String, u64>, quota: &str, limit: &str, window: &str) -> bool {
        let n: u64 = data.get(quota).map_or(0, |v| v.parse().unwrap());
        if n >= limit.parse().unwrap() {
            return false;
        }
        if n == 0 {
            ttl.insert(quota.to_string(), window.parse().unwrap());
        }
        data.insert(quota.to_string(), (n + 1).to_string());
        true
    }

    pub fn run(&self, command: &RemoteCommand) -> (Option<u16>, Vec<u8>) {
        let answer = self.answer(&command.body);
        (answer.status, answer.body)
    }

    /// The bridge's answer to one command (its first segment names the reply's member).
    /// A Redis that holds every script already: an `EVALSHA` runs the script its SHA-1 names, and
    /// the answer's member is `EVALSHA`, as webdis names it.
    pub fn answer(&self, command: &[u8]) -> CallAnswer {
        let sha = command.starts_with(b"EVALSHA/");
        let command = crate::remote::eval_fallback(command).unwrap_or_else(|| command.to_vec());
        let args: Vec<String> = command.split(|b| *b == b'/').map(unescape).collect();
        let mut data = self.data.borrow_mut();
        let reply = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
            ["GET", key] => data.get(*key).map_or(serde_json::json!(null), |v| serde_json::json!(v)),
            ["EVAL", script, "2", key, quota, value, ttl, limit, window] if *script == CLAIM_OR_GET_WITHIN_QUOTA_SCRIPT => {
                if let Some(held) = data.get(*key) {
                    serde_json::json!([0, held, 1000])
                } else {
                    let allowed = Self::count(&mut data, &mut self.ttl.borrow_mut(), quota, limit, window);
                    if allowed {
                        data.insert(key.to_string(), value.to_string());
                        self.ttl.borrow_mut().insert(key.to_string(), ttl.parse().unwrap());
                        serde_json::json!([1])
                    } else {
                        serde_json::json!([2])
                    }
                }
            }
            ["EVAL", script, "2", key, quota, ttl, limit, window] if *script == SET_NX_WITHIN_QUOTA_SCRIPT => {
                let allowed =
                    !data.contains_key(*key) && Self::count(&mut data, &mut self.ttl.borrow_mut(), quota, limit, window);
                if data.contains_key(*key) {
                    serde_json::json!(0)
                } else if !allowed {
                    serde_json::json!(2)
                } else {
                    data.insert(key.to_string(), "1".to_string());
                    self.ttl.borrow_mut().insert(key.to_string(), ttl.parse().unwrap());
                    serde_json::json!(1)
                }
            }
            ["EVAL", script, "1", key, expected, value, ttl] if *script == COMPARE_AND_SET_SCRIPT => {
                if data.get(*key).map(String::as_str) == Some(*expected) {
                    data.insert(key.to_string(), value.to_string());
                    self.ttl.borrow_mut().insert(key.to_string(), ttl.parse().unwrap());
                    serde_json::json!(1)
                } else {
                    serde_json::json!(0)
                }
            }
            ["EVAL", script, "1", key, expected] if *script == COMPARE_AND_DELETE_SCRIPT => {
                if data.get(*key).map(String::as_str) == Some(*expected) {
                    data.remove(*key);
                    serde_json::json!(1)
                } else {
                    serde_json::json!(0)
                }
            }
            other => panic!("unexpected command {other:?}"),
        };
        let verb = if sha { "EVALSHA".to_string() } else { args.first().cloned().unwrap_or_default() };
        CallAnswer { status: Some(200), body: serde_json::json!({ verb: reply }).to_string().into_bytes() }
    }
}
