//! Several filters' flows as one flow, with Envoy's semantics for a chain of filters:
//!
//! - request events run the stages first to last, response events last to first (as Envoy runs
//!   decoder and encoder filters);
//! - the first stage that does not continue (it refused, holds the body, or waits for a call)
//!   stops the event there, as Envoy stops iteration;
//! - when a stage that stopped the stream to wait for a call continues on its answer, the stages
//!   after it run the stopped event, and the stream resumes only if they all continue (the
//!   deferred resume);
//! - a call's answer goes to the stage that made the call;
//! - the facts a stage hands on (the verified principal, the body's SHA-256) are kept here, in
//!   memory, for the stages after it. The principal also goes to the host: it is the contract
//!   with anything after the chain.

use super::{CallId, Direction, Event, Flow, Host, HostFailed, Step};
use crate::remote::RedisConfig;

/// The flows of one stream's stages, in configuration order.
pub struct Chain {
    stages: Vec<Box<dyn Flow>>,
    /// The event a stage stopped, and that stage's position in the event's order.
    stopped: Option<(Event, usize)>,
    facts: Facts,
    /// Which stage made each call in flight.
    callers: Vec<(CallId, usize)>,
}

/// What the stages hand each other within one stream.
#[derive(Debug, Default)]
struct Facts {
    principal: Option<String>,
    body_sha256: Option<[u8; 32]>,
}

impl Chain {
    pub fn new(stages: Vec<Box<dyn Flow>>) -> Self {
        Chain { stages, stopped: None, facts: Facts::default(), callers: Vec::new() }
    }

    /// The stage at `position` in the order of `direction`.
    fn index(&self, direction: Direction, position: usize) -> usize {
        match direction {
            Direction::Request => position,
            Direction::Response => self.stages.len().saturating_sub(position + 1),
        }
    }

    fn run_stage(&mut self, index: usize, event: Event, host: &mut dyn Host) -> Step {
        let Some(stage) = self.stages.get_mut(index) else { return Step::Continue };
        let mut stage_host = StageHost { inner: host, facts: &mut self.facts, callers: &mut self.callers, stage: index };
        stage.on_event(event, &mut stage_host)
    }

    /// Runs `event` on the stages from `position` on, until one does not continue.
    fn run(&mut self, event: Event, direction: Direction, from: usize, host: &mut dyn Host) -> Step {
        for position in from..self.stages.len() {
            let index = self.index(direction, position);
            let step = self.run_stage(index, event, host);
            if step != Step::Continue {
                self.stopped = Some((event, position));
                return step;
            }
        }
        self.stopped = None;
        Step::Continue
    }

    fn answer(&mut self, call: CallId, body_size: usize, host: &mut dyn Host) -> Step {
        let Some(at) = self.callers.iter().position(|(id, _)| *id == call) else { return Step::Hold };
        let (_, index) = self.callers.swap_remove(at);
        let step = self.run_stage(index, Event::CallAnswer { call, body_size }, host);
        if step != Step::Continue {
            return step;
        }
        // The stage continues: if it is the one that stopped the stream, the stages after it run
        // the stopped event now; else it has nothing to resume.
        let Some((event, position)) = self.stopped else { return Step::Hold };
        let Some(direction) = event.direction() else { return Step::Hold };
        if self.index(direction, position) != index {
            return Step::Hold;
        }
        self.run(event, direction, position + 1, host)
    }
}

impl Flow for Chain {
    fn on_event(&mut self, event: Event, host: &mut dyn Host) -> Step {
        match event {
            Event::CallAnswer { call, body_size } => self.answer(call, body_size, host),
            Event::StreamEnd => {
                for index in 0..self.stages.len() {
                    let _ = self.run_stage(index, Event::StreamEnd, host);
                }
                Step::Continue
            }
            _ => match event.direction() {
                Some(direction) => self.run(event, direction, 0, host),
                None => Step::Continue,
            },
        }
    }
}

/// The host as one stage sees it: facts from the stages before it, and its calls recorded.
struct StageHost<'a> {
    inner: &'a mut dyn Host,
    facts: &'a mut Facts,
    callers: &'a mut Vec<(CallId, usize)>,
    stage: usize,
}

impl Host for StageHost<'_> {
    forward_to_inner!(
        now_ms,
        request_headers,
        request_headers_lossy,
        with_request_body,
        request_trailers_raw,
        set_request_header,
        response_headers_raw,
        response_body,
        add_response_header,
        response_from_upstream,
        source_address,
        store,
        call_answer,
        count,
        count_passed,
        gauge,
        logs_debug,
        log
    );

    fn principal(&mut self) -> Result<Option<String>, HostFailed> {
        match &self.facts.principal {
            Some(principal) => Ok(Some(principal.clone())),
            None => self.inner.principal(),
        }
    }

    fn set_principal(&mut self, principal: &str) -> Result<(), HostFailed> {
        self.facts.principal = Some(principal.to_string());
        self.inner.set_principal(principal)
    }

    fn body_sha256(&mut self, body_len: usize) -> Option<[u8; 32]> {
        self.facts.body_sha256.or_else(|| self.inner.body_sha256(body_len))
    }

    /// In memory only: a later stage reads it whatever the body's size, at no host call.
    fn set_body_sha256(&mut self, digest: &[u8; 32], _body_len: usize) {
        self.facts.body_sha256 = Some(*digest);
    }

    fn call_redis(&mut self, redis: &RedisConfig, command: &[u8]) -> Result<CallId, HostFailed> {
        let call = self.inner.call_redis(redis, command)?;
        self.callers.push((call, self.stage));
        Ok(call)
    }
}

#[cfg(test)]
mod tests;
