//! The one callout runtime: every flow that calls Redis keeps its calls in flight here, each with
//! what its answer is for, and reads answers here. A dispatch that fails, an answer that never
//! came, and an answer too large to read are all one [`RemoteError::Unreachable`]; what that means
//! for the request (fail closed, or open where a filter allows it) is the flow's
//! [`crate::remote::FailureMode`].

use super::{CallId, Host};
use crate::remote::{RedisConfig, RemoteError};

/// The calls one flow has in flight, each with `P`: what its answer is for.
#[derive(Debug)]
pub struct Calls<P> {
    in_flight: Vec<InFlight<P>>,
}

#[derive(Debug)]
struct InFlight<P> {
    call: CallId,
    pending: P,
    /// The call again with its script's text, while an `EVALSHA` may still get `NOSCRIPT`.
    fallback: Option<(RedisConfig, Vec<u8>)>,
}

impl<P> Default for Calls<P> {
    fn default() -> Self {
        Calls { in_flight: Vec::new() }
    }
}

/// An answer that arrived, or why there is none usable.
pub type Delivered = Result<super::CallAnswer, RemoteError>;

impl<P> Calls<P> {
    /// Sends `command` to `redis` and keeps `pending` for its answer. A dispatch that fails gives
    /// `pending` back with the error: the flow decides at once.
    pub fn start(
        &mut self,
        host: &mut dyn Host,
        redis: &RedisConfig,
        command: &[u8],
        pending: P,
    ) -> Result<(), (P, RemoteError)> {
        match host.call_redis(redis, command) {
            Ok(call) => {
                let fallback = crate::remote::eval_fallback(command).map(|eval| (redis.clone(), eval));
                self.in_flight.push(InFlight { call, pending, fallback });
                Ok(())
            }
            Err(_) => Err((pending, RemoteError::Unreachable("dispatch failed".into()))),
        }
    }

    /// The answer to `call`, with what it is for; `None` when `call` is not one of these calls.
    /// A body over `max_bytes` is not read (an error naming its size).
    ///
    /// Redis answering `NOSCRIPT` to an `EVALSHA` (it does not hold the script yet) is not an
    /// answer: the same call goes out once more with the script's text, and its answer is the
    /// one delivered (`None` meanwhile: the flow keeps waiting). A failed resend is delivered as
    /// unreachable.
    pub fn deliver(&mut self, host: &mut dyn Host, call: CallId, body_size: usize, max_bytes: usize) -> Option<(P, Delivered)> {
        let index = self.in_flight.iter().position(|f| f.call == call)?;
        let InFlight { pending, fallback, .. } = self.in_flight.swap_remove(index);
        let answer = host
            .call_answer(body_size, max_bytes)
            .ok_or_else(|| RemoteError::Unreachable(format!("reply of {body_size} bytes exceeds {max_bytes}")));
        if let (Ok(reply), Some((redis, eval))) = (&answer, &fallback) {
            if crate::remote::is_noscript(reply.status, &reply.body) {
                return match host.call_redis(redis, eval) {
                    Ok(call) => {
                        self.in_flight.push(InFlight { call, pending, fallback: None });
                        None
                    }
                    Err(_) => Some((pending, Err(RemoteError::Unreachable("dispatch of the script failed".into())))),
                };
            }
        }
        Some((pending, answer))
    }

    /// Whether any call is still in flight.
    pub fn waiting(&self) -> bool {
        !self.in_flight.is_empty()
    }

    pub fn pending(&self) -> impl Iterator<Item = &P> {
        self.in_flight.iter().map(|f| &f.pending)
    }
}
