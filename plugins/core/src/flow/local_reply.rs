//! A flow's own local reply, delivered back to it as Envoy delivers it to a proxy-wasm filter.
//!
//! A local reply a filter sends on the request path (a [`Step::Reply`] or [`Step::Respond`]
//! before any response started) crosses that filter's own encoder callbacks before it reaches
//! the client: the flow sees the reply's response headers (not from the upstream), then its
//! body. That is how a stage of a chain learns that a later stage refused a request it had
//! claimed (replay-guard releases the Idempotency-Key of a request amount-limit refused, since
//! a Firebreak refusal carries `x-firebreak-error`), and how rate-limit puts its headers on a
//! refusal. Envoy 1.40 never hands a dynamic module its own local reply, so the native host
//! delivers it with [`LocalReply`] before it sends the reply; the in-memory host does the same.
//! A reply sent on the response path goes straight to the client in Envoy: no delivery.
//!
//! The flow may hold on one of those events (replay-guard writing the outcome to Redis): the
//! reply then waits, as Envoy keeps a local reply whose encoding a filter stopped, and the call's
//! answer resumes it ([`LocalReply::run`] with the answer). A reply the flow sends while its own
//! reply crosses it is ignored (Envoy lets a filter send one local reply per stream).

use super::{Event, Flow, Host, HostFailed, RawHeaders, Response, Step};

/// A local reply on its way to the client, delivered to the flow that sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    /// What the client gets (with the headers the flow added while the reply crossed it).
    pub response: Response,
    /// Envoy's `response.code_details` for it (`firebreak_<code>`, `firebreak_response`).
    pub details: String,
    next: Next,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    Headers,
    Body,
    Done,
}

impl LocalReply {
    /// The reply `step` sends (`None`: the step sends none).
    pub fn of(step: &Step) -> Option<LocalReply> {
        let (response, details) = match step {
            Step::Reply(rejection) => {
                let headers = rejection
                    .response_headers()
                    .into_iter()
                    .map(|(name, value)| (name.to_string(), value.to_string()))
                    .collect();
                (Response { status: rejection.status, headers, body: rejection.body() }, format!("firebreak_{}", rejection.code))
            }
            Step::Respond(response) => (response.clone(), "firebreak_response".to_string()),
            Step::Continue | Step::Hold => return None,
        };
        Some(LocalReply { response, details, next: Next::Headers })
    }

    /// Delivers `answer` (a call's answer while the reply waits; `None` to start) and then the
    /// reply's events still due to `flow`, the stream's reads and writes of the response going
    /// to the reply. `Continue`: send the reply now. `Hold`: the flow waits for a call; run
    /// again with its answer.
    pub fn run(&mut self, flow: &mut dyn Flow, answer: Option<Event>, host: &mut dyn Host) -> Step {
        let mut reply_host = ReplyHost { inner: host, response: &mut self.response };
        if let Some(answer) = answer {
            if flow.on_event(answer, &mut reply_host) == Step::Hold {
                return Step::Hold;
            }
        }
        loop {
            let empty = reply_host.response.body.is_empty();
            let (event, next) = match self.next {
                Next::Headers if empty => (Event::ResponseHeaders { end_of_stream: true }, Next::Done),
                Next::Headers => (Event::ResponseHeaders { end_of_stream: false }, Next::Body),
                Next::Body => {
                    let buffered = reply_host.response.body.len();
                    (Event::ResponseBody { buffered, end_of_stream: true }, Next::Done)
                }
                Next::Done => return Step::Continue,
            };
            self.next = next;
            // A reply of its own meanwhile is ignored (one local reply per filter and stream).
            if flow.on_event(event, &mut reply_host) == Step::Hold {
                return Step::Hold;
            }
        }
    }

    /// Every event of the reply reached the flow.
    pub fn delivered(&self) -> bool {
        self.next == Next::Done
    }
}

/// The stream's host, its response being the local reply: the reply's headers (with Envoy's
/// `content-length`) and body, not from the upstream; a response header added goes on the reply.
struct ReplyHost<'a> {
    inner: &'a mut dyn Host,
    response: &'a mut Response,
}

impl Host for ReplyHost<'_> {
    forward_to_inner!(
        now_ms,
        request_headers,
        request_headers_lossy,
        with_request_body,
        request_trailers_raw,
        set_request_header,
        source_address,
        principal,
        set_principal,
        body_sha256,
        set_body_sha256,
        store,
        call_redis,
        call_answer,
        count,
        count_passed,
        gauge,
        logs_debug,
        log
    );

    fn response_headers_raw(&mut self) -> Result<RawHeaders, HostFailed> {
        let mut headers = vec![(":status".to_string(), self.response.status.to_string().into_bytes())];
        headers.extend(self.response.headers.iter().map(|(name, value)| (name.clone(), value.clone().into_bytes())));
        headers.push(("content-length".to_string(), self.response.body.len().to_string().into_bytes()));
        Ok(headers)
    }

    fn response_body(&mut self, size: usize) -> Result<Vec<u8>, HostFailed> {
        Ok(self.response.body.get(..size.min(self.response.body.len())).unwrap_or_default().to_vec())
    }

    fn add_response_header(&mut self, name: &str, value: &str) -> Result<(), HostFailed> {
        self.response.headers.push((name.to_string(), value.to_string()));
        Ok(())
    }

    fn response_from_upstream(&mut self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::super::memory::{exchange, MemoryEnv, MemoryRequest, MemoryUpstream};
    use super::*;
    use crate::flow::CallId;
    use crate::{Code, Rejection};

    /// Records what reaches it; refuses the request at its headers, holds on the reply's headers
    /// when `hold`, and tries to refuse the reply too.
    struct Refuser {
        hold: bool,
        seen: Vec<String>,
    }

    impl Flow for Refuser {
        fn on_event(&mut self, event: Event, host: &mut dyn Host) -> Step {
            match event {
                Event::RequestHeaders { .. } => Step::Reply(Rejection::new(Code::AmountLimited)),
                Event::ResponseHeaders { end_of_stream } => {
                    let headers = host.response_headers().unwrap();
                    let error = super::super::header(&headers, "x-firebreak-error").unwrap_or("").to_string();
                    let status = super::super::header(&headers, ":status").unwrap_or("").to_string();
                    self.seen
                        .push(format!("headers {status} {error} eos={end_of_stream} upstream={}", host.response_from_upstream()));
                    host.add_response_header("x-added", "1").unwrap();
                    if self.hold {
                        Step::Hold
                    } else {
                        Step::Reply(Rejection::new(Code::FilterFailed))
                    }
                }
                Event::ResponseBody { buffered, end_of_stream } => {
                    let body = host.response_body(buffered).unwrap();
                    self.seen.push(format!("body {} eos={end_of_stream}", String::from_utf8_lossy(&body)));
                    Step::Continue
                }
                Event::CallAnswer { .. } => {
                    self.seen.push("answer".into());
                    Step::Continue
                }
                Event::StreamEnd => {
                    self.seen.push("end".into());
                    Step::Continue
                }
                _ => Step::Continue,
            }
        }
    }

    #[test]
    fn the_reply_crosses_the_flow_before_it_is_sent_and_keeps_what_the_flow_added() {
        let mut flow = Refuser { hold: false, seen: Vec::new() };
        let step = Step::Reply(Rejection::new(Code::AmountLimited));
        let mut reply = LocalReply::of(&step).unwrap();
        let mut env = MemoryEnv::default();
        let request = MemoryRequest::new(vec![(":method".into(), "GET".into()), (":path".into(), "/".into())], b"");
        // Through the memory host: the flow refuses at its headers, its reply crosses it, then
        // the stream ends.
        let outcome = exchange(&mut flow, &mut env, &request, &MemoryUpstream::default());
        assert_eq!(outcome.reply.map(|r| r.code), Some("amount_limited"));
        let body = String::from_utf8(Rejection::new(Code::AmountLimited).body()).unwrap();
        assert_eq!(
            flow.seen,
            [
                "headers 429 amount_limited eos=false upstream=false".to_string(),
                format!("body {body} eos=true"),
                "end".to_string()
            ]
        );
        // Run by hand: the header the flow added is on the reply; its own second reply is ignored.
        let mut flow = Refuser { hold: false, seen: Vec::new() };
        assert_eq!(reply.details, "firebreak_amount_limited");
        let _ = run_alone(&mut reply, &mut flow, None);
        assert!(reply.delivered());
        assert_eq!(reply.response.status, 429);
        assert!(reply.response.headers.contains(&("x-added".to_string(), "1".to_string())));
        assert!(reply.response.headers.contains(&("x-firebreak-error".to_string(), "amount_limited".to_string())));
    }

    #[test]
    fn a_flow_that_holds_on_the_reply_resumes_it_with_the_answer() {
        let mut flow = Refuser { hold: true, seen: Vec::new() };
        let response = Response { status: 200, headers: vec![("x-replayed".into(), "true".into())], body: b"stored".to_vec() };
        let mut reply = LocalReply::of(&Step::Respond(response)).unwrap();
        assert_eq!(reply.details, "firebreak_response");
        assert_eq!(run_alone(&mut reply, &mut flow, None), Step::Hold);
        assert!(!reply.delivered());
        assert_eq!(flow.seen, ["headers 200  eos=false upstream=false"]);
        let answer = Event::CallAnswer { call: CallId(1), body_size: 0 };
        assert_eq!(run_alone(&mut reply, &mut flow, Some(answer)), Step::Continue);
        assert!(reply.delivered());
        assert_eq!(flow.seen[1..], ["answer".to_string(), "body stored eos=true".to_string()]);
        // Nothing more to deliver.
        assert_eq!(run_alone(&mut reply, &mut flow, None), Step::Continue);
        assert_eq!(flow.seen.len(), 3);
        // No body: the headers end the reply.
        let mut flow = Refuser { hold: false, seen: Vec::new() };
        let mut empty = LocalReply::of(&Step::Respond(Response { status: 204, headers: Vec::new(), body: Vec::new() })).unwrap();
        assert_eq!(run_alone(&mut empty, &mut flow, None), Step::Continue);
        assert_eq!(flow.seen, ["headers 204  eos=true upstream=false"]);
        assert_eq!(LocalReply::of(&Step::Continue), None);
        assert_eq!(LocalReply::of(&Step::Hold), None);
    }

    /// Runs `reply` against `flow` on a fresh memory host.
    fn run_alone(reply: &mut LocalReply, flow: &mut dyn Flow, answer: Option<Event>) -> Step {
        struct Relay<'a> {
            reply: &'a mut LocalReply,
            answer: Option<Event>,
            inner: &'a mut dyn Flow,
            step: Option<Step>,
        }
        impl Flow for Relay<'_> {
            fn on_event(&mut self, _event: Event, host: &mut dyn Host) -> Step {
                if self.step.is_none() {
                    self.step = Some(self.reply.run(self.inner, self.answer.take(), host));
                }
                Step::Continue
            }
        }
        let mut relay = Relay { reply, answer, inner: flow, step: None };
        let request = MemoryRequest::new(vec![(":method".into(), "GET".into()), (":path".into(), "/".into())], b"");
        let _ = super::super::memory::step(
            &mut relay,
            Event::StreamEnd,
            &mut MemoryEnv::default(),
            &request,
            &MemoryUpstream::default(),
        );
        relay.step.unwrap_or(Step::Hold)
    }
}
