//! The chain's semantics, with scripted stages driven through the in-memory host.

use std::cell::RefCell;
use std::rc::Rc;

use super::*;
use crate::flow::calls::Calls;
use crate::flow::memory::{exchange, MemoryEnv, MemoryRequest, MemoryUpstream};
use crate::flow::{CallAnswer, Level, Meter};
use crate::remote::{FailureMode, RedisConfig};
use crate::{Code, Rejection};

type Journal = Rc<RefCell<Vec<String>>>;

/// A stage that notes every event it sees; optionally calls Redis at the request headers and
/// holds until the answer, hands on a principal, or refuses on a header.
struct Scripted {
    name: &'static str,
    journal: Journal,
    call_at_headers: bool,
    sets_principal: Option<&'static str>,
    refuses_on: Option<&'static str>,
    calls: Calls<()>,
}

fn stage(name: &'static str, journal: &Journal) -> Scripted {
    Scripted {
        name,
        journal: journal.clone(),
        call_at_headers: false,
        sets_principal: None,
        refuses_on: None,
        calls: Calls::default(),
    }
}

fn redis() -> RedisConfig {
    RedisConfig {
        cluster: "webdis".into(),
        authority: "webdis".into(),
        timeout_ms: std::num::NonZeroU32::new(100).unwrap(),
        key_prefix: "t".into(),
        failure_mode: FailureMode::Closed,
    }
}

impl Flow for Scripted {
    fn on_event(&mut self, event: Event, host: &mut dyn Host) -> Step {
        let seen = match event {
            Event::RequestHeaders { .. } => "request_headers".to_string(),
            Event::RequestBody { .. } => "request_body".to_string(),
            Event::ResponseHeaders { .. } => "response_headers".to_string(),
            Event::CallAnswer { .. } => "answer".to_string(),
            Event::StreamEnd => "end".to_string(),
            other => format!("{other:?}"),
        };
        let principal = host.principal().ok().flatten().unwrap_or_default();
        self.journal.borrow_mut().push(format!("{}:{seen}:{principal}", self.name));
        match event {
            Event::RequestHeaders { .. } => {
                if let Some(header) = self.refuses_on {
                    if host.request_headers().ok().is_some_and(|h| crate::flow::header(&h, header).is_some()) {
                        let meter = Meter::new("scripted", "firebreak.scripted");
                        return crate::flow::reject(host, &meter, Level::Warn, Rejection::new(Code::RequestHeadersInvalid), "");
                    }
                }
                if let Some(principal) = self.sets_principal {
                    let _ = host.set_principal(principal);
                    host.set_body_sha256(&[1; 32], 5);
                }
                if self.call_at_headers {
                    return match self.calls.start(host, &redis(), b"GET/x", ()) {
                        Ok(()) => Step::Hold,
                        Err(_) => Step::Reply(Rejection::new(Code::StateUnavailable)),
                    };
                }
                Step::Continue
            }
            Event::CallAnswer { call, body_size } => match self.calls.deliver(host, call, body_size, 1024) {
                Some(((), Ok(_))) => Step::Continue,
                Some(((), Err(_))) => Step::Reply(Rejection::new(Code::StateUnavailable)),
                None => Step::Hold,
            },
            Event::RequestBody { .. } => {
                let digest = host.body_sha256(5);
                self.journal.borrow_mut().push(format!("{}:digest:{}", self.name, digest.is_some()));
                Step::Continue
            }
            _ => Step::Continue,
        }
    }
}

fn env_with_redis() -> MemoryEnv {
    MemoryEnv {
        redis: Some(Box::new(|_| CallAnswer { status: Some(200), body: br#"{"GET":null}"#.to_vec() })),
        ..MemoryEnv::default()
    }
}

fn request(extra: &[(&str, &str)], body: &[u8]) -> MemoryRequest {
    let mut headers = vec![(":method".to_string(), "POST".to_string()), (":path".to_string(), "/v1/x".to_string())];
    headers.extend(extra.iter().map(|(n, v)| (n.to_string(), v.to_string())));
    MemoryRequest::new(headers, body)
}

fn journal_of(journal: &Journal) -> Vec<String> {
    journal.borrow().clone()
}

#[test]
fn requests_run_first_to_last_and_responses_last_to_first() {
    let journal = Journal::default();
    let mut chain = Chain::new(vec![Box::new(stage("a", &journal)), Box::new(stage("b", &journal))]);
    let outcome = exchange(&mut chain, &mut MemoryEnv::default(), &request(&[], b""), &MemoryUpstream::default());
    assert!(outcome.passed());
    assert_eq!(
        journal_of(&journal),
        ["a:request_headers:", "b:request_headers:", "b:response_headers:", "a:response_headers:", "a:end:", "b:end:"]
    );
}

#[test]
fn a_stage_waiting_for_a_call_stops_the_later_stages_until_its_answer() {
    let journal = Journal::default();
    let waiting = Scripted { call_at_headers: true, ..stage("a", &journal) };
    let mut chain = Chain::new(vec![Box::new(waiting), Box::new(stage("b", &journal))]);
    let outcome = exchange(&mut chain, &mut env_with_redis(), &request(&[], b""), &MemoryUpstream::default());
    assert!(outcome.passed(), "{outcome:?}");
    assert_eq!(outcome.calls.len(), 1);
    // b sees the headers only after a's answer: the deferred resume.
    assert_eq!(
        journal_of(&journal)[..3],
        ["a:request_headers:".to_string(), "a:answer:".to_string(), "b:request_headers:".to_string()]
    );
}

#[test]
fn a_later_refusal_after_the_resume_is_the_answer() {
    let journal = Journal::default();
    let waiting = Scripted { call_at_headers: true, ..stage("a", &journal) };
    let refusing = Scripted { refuses_on: Some("x-bad"), ..stage("b", &journal) };
    let mut chain = Chain::new(vec![Box::new(waiting), Box::new(refusing)]);
    let outcome = exchange(&mut chain, &mut env_with_redis(), &request(&[("x-bad", "1")], b""), &MemoryUpstream::default());
    assert_eq!(outcome.reply.as_ref().map(|r| r.code), Some(Code::RequestHeadersInvalid.as_str()));
    assert!(!outcome.forwarded);
    assert_eq!(outcome.counter("firebreak.scripted.rejected.request_headers_invalid"), 1);
}

#[test]
fn a_failed_dispatch_or_a_lost_answer_fails_closed() {
    let journal = Journal::default();
    let waiting = Scripted { call_at_headers: true, ..stage("a", &journal) };
    let mut chain = Chain::new(vec![Box::new(waiting), Box::new(stage("b", &journal))]);
    // No bridge at all: the dispatch fails.
    let outcome = exchange(&mut chain, &mut MemoryEnv::default(), &request(&[], b""), &MemoryUpstream::default());
    assert_eq!(outcome.reply.as_ref().map(|r| r.code), Some(Code::StateUnavailable.as_str()));
    // An answer too large to read.
    let journal = Journal::default();
    let waiting = Scripted { call_at_headers: true, ..stage("a", &journal) };
    let mut chain = Chain::new(vec![Box::new(waiting)]);
    let mut env =
        MemoryEnv { redis: Some(Box::new(|_| CallAnswer { status: Some(200), body: vec![b'x'; 4096] })), ..MemoryEnv::default() };
    let outcome = exchange(&mut chain, &mut env, &request(&[], b""), &MemoryUpstream::default());
    assert_eq!(outcome.reply.as_ref().map(|r| r.code), Some(Code::StateUnavailable.as_str()));
    assert!(!outcome.forwarded);
}

#[test]
fn facts_pass_to_later_stages_in_memory() {
    let journal = Journal::default();
    let verifier = Scripted { sets_principal: Some("alice"), ..stage("a", &journal) };
    let mut chain = Chain::new(vec![Box::new(verifier), Box::new(stage("b", &journal))]);
    let outcome = exchange(&mut chain, &mut MemoryEnv::default(), &request(&[], b"hello"), &MemoryUpstream::default());
    assert!(outcome.passed());
    let journal = journal_of(&journal);
    assert!(journal.contains(&"b:request_headers:alice".to_string()), "{journal:?}");
    assert!(journal.contains(&"b:digest:true".to_string()), "{journal:?}");
    // The principal also reaches the host (the contract with what follows the chain); the digest
    // stays in the chain's memory.
    assert_eq!(outcome.principal.as_deref(), Some("alice"));
    assert_eq!(outcome.body_sha256, None);
}

#[test]
fn an_answer_to_a_stage_that_holds_nothing_resumes_nothing() {
    struct Background {
        calls: Calls<()>,
    }
    impl Flow for Background {
        fn on_event(&mut self, event: Event, host: &mut dyn Host) -> Step {
            match event {
                // Fire and forget: the request goes on while the call is in flight.
                Event::RequestHeaders { .. } => {
                    let _ = self.calls.start(host, &redis(), b"SET/x/1", ());
                    Step::Continue
                }
                Event::CallAnswer { call, body_size } => {
                    let _ = self.calls.deliver(host, call, body_size, 1024);
                    Step::Continue
                }
                _ => Step::Continue,
            }
        }
    }
    let journal = Journal::default();
    let mut chain = Chain::new(vec![Box::new(Background { calls: Calls::default() }), Box::new(stage("b", &journal))]);
    let mut host_env = env_with_redis();
    let outcome = exchange(&mut chain, &mut host_env, &request(&[], b""), &MemoryUpstream::default());
    assert!(outcome.passed());
    // b saw the headers once: the answer did not run them again.
    assert_eq!(journal_of(&journal).iter().filter(|e| e.as_str() == "b:request_headers:").count(), 1);
}
