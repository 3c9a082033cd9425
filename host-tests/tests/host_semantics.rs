//! The host's own semantic tests: each checks one of Envoy's behaviours through a real module
//! (host-tests/test-filter), so the host is held to what Envoy does, not to what the SDK expects.

mod common;

use std::time::Duration;

use common::test_filter;
use firebreak_host_tests::{
    CalloutReply, Chain, GrpcAnswer, GrpcReply, Host, PluginSpec, Request, StartError, Status, Upstream, DEFAULT_START_NANOS,
};

fn host() -> Host {
    Host::builder(&test_filter()).config("{}").start().expect("starts")
}

#[test]
fn a_plain_request_is_forwarded_and_the_response_passes_through_the_filter() {
    let mut h = host();
    let v = h.send(Request::post("/pay").header("x-a", "1").body("hello"));
    assert_eq!(v.status, 200);
    assert!(v.forwarded());
    assert_eq!(v.upstream_header("x-a"), Some("1"));
    assert_eq!(v.upstream_header("x-forwarded-proto"), Some("http"));
    assert_eq!(v.upstream_body(), Some(&b"hello"[..]));
    assert_eq!(v.response_header("x-test-filter"), Some("seen"));
    assert_eq!(v.response_body, br#"{"upstream":"ok"}"#);
}

#[test]
fn get_header_returns_the_first_of_duplicated_headers() {
    let mut h = host();
    let v = h.send(Request::get("/").header("x-dup", "first").header("x-dup", "second"));
    assert_eq!(v.upstream_header("x-first-dup"), Some("first"));
}

#[test]
fn header_add_replace_and_remove_follow_envoy() {
    let mut h = host();
    let v = h.send(
        Request::get("/")
            .header("x-test-add", "X-Added=yes")
            .header("x-gone", "1")
            .header("x-gone", "2")
            .header("x-test-remove", "x-gone"),
    );
    let up = v.upstream.unwrap();
    assert_eq!(up.header("x-added"), Some("yes"), "names are lower-cased");
    assert!(up.header("x-gone").is_none(), "remove drops every occurrence");
}

#[test]
fn a_local_reply_ends_the_stream() {
    let mut h = host();
    let v = h.send(Request::post("/pay").header("x-test-deny", "418").body("never seen"));
    assert_eq!(v.status, 418);
    assert_eq!(v.error_code().as_deref(), Some("denied"));
    assert!(!v.forwarded());
    assert_eq!(v.response_header("x-denied"), Some("1"));
    assert_eq!(v.response_header("content-type"), Some("application/json"));
    assert!(!v.host_calls.contains_key("proxy_get_buffer_bytes"), "no body callback after a local reply");
}

#[test]
fn pause_from_a_body_callback_buffers_until_the_end() {
    let mut h = host();
    let v = h.send(Request::post("/").header("x-test-body", "buffer").chunks(["hel", "lo ", "world"]));
    assert!(v.forwarded());
    assert_eq!(v.upstream_body(), Some(&b"HELLO WORLD"[..]));
    // "deny" split across chunks is only visible because the chunks were buffered.
    let v = h.send(Request::post("/").header("x-test-body", "buffer").chunks(["de", "ny"]));
    assert_eq!(v.status, 400);
    assert_eq!(v.error_code().as_deref(), Some("body_denied"));
    assert!(!v.forwarded(), "the request never reached the upstream whole");
    assert!(v.upstream_headers_sent, "Envoy streams the headers before the body");
}

#[test]
fn continue_from_a_body_callback_streams_each_chunk() {
    let mut h = host();
    let v = h.send(Request::post("/").chunks(["de", "ny"]));
    assert_eq!(v.status, 200);
    assert_eq!(v.upstream_body(), Some(&b"deny"[..]));
}

#[test]
fn a_trap_fails_every_in_flight_stream_of_that_vm_with_503() {
    let mut h = Host::builder(&test_filter())
        .config("{}")
        .workers(2)
        .callout("authz", CalloutReply::Hold)
        .start()
        .unwrap();
    let held = h.open(0, Request::get("/held").header("x-test-callout", "authz"));
    let other_worker = h.open(1, Request::get("/other").header("x-test-callout", "authz"));
    assert_eq!(h.pending_callouts().len(), 2);

    let v = h.send_on(0, Request::get("/boom").header("x-test-panic", "1"));
    assert_eq!(v.status, 503);
    assert_eq!(v.local_reply.as_ref().unwrap().details, "wasm_fail_stream");
    assert!(v.trap.as_deref().unwrap().contains("proxy_on_request_headers"));
    assert!(v.logs.iter().any(|l| l.contains("x-test-panic asked for a trap")), "{:?}", v.logs);
    assert!(!v.forwarded());

    let held = h.finish(held);
    assert_eq!(held.status, 503, "the in-flight stream on the failed VM fails too");
    assert!(!held.forwarded());
    // Fail closed: later streams on that VM get 503 without reaching the module.
    let later = h.send_on(0, Request::get("/later"));
    assert_eq!(later.status, 503);
    assert!(later.host_calls.is_empty());
    // The other worker's VM is unaffected.
    let pending = h.pending_callouts();
    let (_, call) = pending.iter().find(|(w, _)| *w == 1).unwrap();
    h.answer(1, call.token, CalloutReply::ok("fine"));
    let other = h.finish(other_worker);
    assert_eq!(other.status, 200);
    assert_eq!(other.upstream_header("x-callout-body"), Some("fine"));
}

#[test]
fn on_configure_returning_false_means_the_plugin_does_not_start() {
    let e = Host::builder(&test_filter()).config(r#"{"reject": true}"#).start().err().unwrap();
    match e {
        StartError::ConfigureFailed { logs } => {
            assert!(logs.iter().any(|l| l.contains("rejected configuration")), "{logs:?}")
        }
        other => panic!("expected ConfigureFailed, got {other:?}"),
    }
}

#[test]
fn shared_data_claims_and_cas() {
    let mut h = host();
    let first = h.send(Request::get("/").header("x-test-claim", "nonce-1"));
    assert_eq!(first.upstream_header("x-claim"), Some("won"));
    let again = h.send(Request::get("/").header("x-test-claim", "nonce-1"));
    assert_eq!(again.status, 409);
    assert_eq!(again.error_code().as_deref(), Some("replay"));
    let (value, cas) = h.shared_data("nonce-1").unwrap();
    assert_eq!(value, b"claimed");
    // The store's own rules, as another VM would meet them.
    assert_eq!(h.set_shared_data("nonce-1", b"x", cas.wrapping_add(7)), Status::CasMismatch);
    assert_eq!(h.set_shared_data("nonce-1", b"x", cas), Status::Ok);
    assert_eq!(h.set_shared_data("nonce-1", b"y", cas), Status::CasMismatch, "the token is spent");
    assert_eq!(h.set_shared_data("nonce-1", b"z", 0), Status::Ok, "CAS 0 is unconditional");
    assert_eq!(h.set_shared_data("fresh", b"v", 999), Status::Ok, "absent keys are inserted whatever the CAS");
}

#[test]
fn race_two_workers_both_see_the_key_absent() {
    // get(0) get(1) set(0) set(1): both saw the key absent, so both CAS-0 writes succeed: the
    // get-then-set claim is not atomic across workers, and the host reproduces it every time.
    let mut h = Host::builder(&test_filter()).config("{}").workers(2).start().unwrap();
    let req = || Request::get("/").header("x-test-claim", "nonce-race");
    let before = h.shared_trace().len();
    let v = h.race(vec![(0, req()), (1, req())], &[0, 1, 0, 1]);
    assert_eq!(v[0].upstream_header("x-claim"), Some("won"));
    assert_eq!(v[1].upstream_header("x-claim"), Some("won"));
    let trace: Vec<String> = h.shared_trace().into_iter().skip(before).map(|(w, d)| format!("{w}:{d}")).collect();
    assert!(trace[0].starts_with("0:get nonce-race -> absent"), "{trace:?}");
    assert!(trace[1].starts_with("1:get nonce-race -> absent"), "{trace:?}");

    // Serialised, the second worker loses.
    let mut h = Host::builder(&test_filter()).config("{}").workers(2).start().unwrap();
    let v = h.race(vec![(0, req()), (1, req())], &[0, 0, 1]);
    assert_eq!(v[0].status, 200);
    assert_eq!(v[1].status, 409);
}

#[test]
fn race_cas_mismatch_makes_the_loser_retry() {
    let mut h = Host::builder(&test_filter()).config("{}").workers(2).start().unwrap();
    assert_eq!(h.set_shared_data("counter", b"5", 0), Status::Ok);
    let before = h.shared_trace().len();
    let req = || Request::get("/").header("x-test-counter", "counter");
    // Both read 5 with the same CAS; worker 0 writes 6; worker 1's write mismatches, it
    // re-reads 6 and writes 7.
    let v = h.race(vec![(0, req()), (1, req())], &[0, 1, 0, 1, 1, 1]);
    assert_eq!(v[0].upstream_header("x-counter"), Some("6"));
    assert_eq!(v[1].upstream_header("x-counter"), Some("7"));
    let trace: Vec<String> = h.shared_trace().into_iter().skip(before).map(|(_, d)| d).collect();
    assert!(trace[3].ends_with("CasMismatch"), "{trace:?}");
    assert_eq!(h.shared_data("counter").unwrap().0, b"7");
}

#[test]
fn callouts_answer_fail_or_time_out_as_scripted() {
    let start = |reply: CalloutReply| Host::builder(&test_filter()).config("{}").callout("authz", reply).start().unwrap();
    let req = || Request::get("/").header("x-test-callout", "authz");

    let v = start(CalloutReply::ok("granted")).send(req());
    assert_eq!(v.status, 200);
    assert_eq!(v.upstream_header("x-callout-body"), Some("granted"));
    assert_eq!(v.callouts.len(), 1);
    assert_eq!(v.callouts[0].cluster, "authz");
    assert!(v.callouts[0].headers.contains(&(":path".into(), "/check".into())));
    assert_eq!(v.callouts[0].timeout_ms, 500);
    assert!(v.host_calls.contains_key("proxy_set_effective_context"));
    assert!(v.host_calls.contains_key("proxy_continue_stream"));

    let v = start(CalloutReply::status(403, "no")).send(req());
    assert_eq!((v.status, v.error_code().as_deref()), (403, Some("callout_denied")));

    let v = start(CalloutReply::Fail).send(req());
    assert_eq!((v.status, v.error_code().as_deref()), (503, Some("callout_failed")));
    assert!(!v.forwarded());

    // Envoy's async client answers a timeout itself, with 504.
    let v = start(CalloutReply::Timeout).send(req());
    assert_eq!((v.status, v.error_code().as_deref()), (403, Some("callout_denied")));

    // A callout to a cluster Envoy does not know is refused at dispatch.
    let v = start(CalloutReply::ok("")).send(Request::get("/").header("x-test-callout", "nowhere"));
    assert_eq!((v.status, v.error_code().as_deref()), (503, Some("callout_failed")));
}

#[test]
fn a_held_callout_is_answered_by_the_test() {
    let mut h = Host::builder(&test_filter()).config("{}").callout("authz", CalloutReply::Hold).start().unwrap();
    let s = h.open(0, Request::get("/").header("x-test-callout", "authz"));
    let pending = h.pending_callouts();
    assert_eq!(pending.len(), 1);
    h.answer(0, pending[0].1.token, CalloutReply::ok("late"));
    let v = h.finish(s);
    assert_eq!(v.status, 200);
    assert_eq!(v.upstream_header("x-callout-body"), Some("late"));
}

#[test]
fn pause_in_headers_withholds_the_body_until_continued() {
    // proxy-wasm-cpp-host turns Pause from on_request_headers into StopAllIterationAndWatermark:
    // the body is withheld from the filter (so its Continue cannot resume the stream early) and
    // handed over in one piece once the filter continues.
    let mut h = Host::builder(&test_filter()).config("{}").callout("authz", CalloutReply::Hold).start().unwrap();
    let s = h.open(0, Request::post("/").header("x-test-callout", "authz").chunks(["a", "b"]));
    assert_eq!(h.pending_callouts().len(), 1);
    let token = h.pending_callouts()[0].1.token;
    h.answer(0, token, CalloutReply::ok("granted"));
    let v = h.finish(s);
    assert!(v.forwarded());
    assert_eq!(v.upstream_header("x-callout-body"), Some("granted"));
    assert_eq!(v.upstream_body(), Some(&b"ab"[..]));
}

#[test]
fn a_stream_left_paused_is_reported_stalled() {
    let mut h = Host::builder(&test_filter()).config("{}").callout("authz", CalloutReply::Hold).start().unwrap();
    let v = h.send(Request::get("/").header("x-test-callout", "authz"));
    assert!(v.stalled);
    assert_eq!(v.status, 0);
    assert!(!v.forwarded());
}

#[test]
fn grpc_callouts() {
    let start = |reply: GrpcReply| Host::builder(&test_filter()).config("{}").grpc("checker", reply).start().unwrap();
    let req = || Request::get("/").header("x-test-grpc", "checker");
    let v = start(GrpcReply::Ok(b"pong".to_vec())).send(req());
    assert_eq!(v.upstream_header("x-grpc"), Some("ok"));
    assert_eq!(v.callouts[0].grpc_method.as_deref(), Some("test.Check/Check"));
    assert_eq!(v.callouts[0].body, b"ping");
    let v = start(GrpcReply::Status(14, "unavailable".into())).send(req());
    assert_eq!((v.status, v.error_code().as_deref()), (503, Some("grpc_failed")));
}

#[test]
fn close_stream_resets() {
    let v = host().send(Request::get("/").header("x-test-reset", "1"));
    assert!(v.reset);
    assert_eq!(v.status, 0);
    assert!(!v.forwarded());
}

#[test]
fn properties_builtin_and_from_earlier_filters() {
    let mut h = Host::builder(&test_filter()).config("{}").root_id("my_root").start().unwrap();
    let v = h.send(
        Request::get("/a/b?q=1")
            .header("x-test-props", "1")
            .from("10.1.2.3:5555")
            .property("firebreak_upstream", "set-earlier"),
    );
    let up = v.upstream.unwrap();
    assert_eq!(up.header("x-prop-source-address"), Some("10.1.2.3:5555"));
    assert_eq!(up.header("x-prop-path"), Some("/a/b?q=1"));
    assert_eq!(up.header("x-prop-method"), Some("GET"));
    assert_eq!(up.header("x-prop-root-id"), Some("my_root"));
    assert_eq!(up.header("x-prop-upstream"), Some("set-earlier"));
    assert_eq!(up.header("x-prop-roundtrip"), Some("stored"));
}

#[test]
fn fake_clock_time_and_timers() {
    let mut h = Host::builder(&test_filter()).config(r#"{"tick_ms": 100}"#).workers(2).start().unwrap();
    assert_eq!(h.tick_period_ms(0), 100);
    let v = h.send(Request::get("/").header("x-test-time", "1"));
    assert_eq!(v.upstream_header("x-now-ms"), Some((DEFAULT_START_NANOS / 1_000_000).to_string().as_str()));
    h.advance(Duration::from_millis(350));
    // Three ticks on each of two workers, counted with CAS in shared data.
    assert_eq!(h.shared_data("ticks").unwrap().0, b"6");
    let v = h.send(Request::get("/").header("x-test-time", "1"));
    assert_eq!(v.upstream_header("x-now-ms"), Some((DEFAULT_START_NANOS / 1_000_000 + 350).to_string().as_str()));
}

/// Envoy arms a root context's tick timer at now + period when the period is set, and again at
/// the firing time + period after each `on_tick`: advancing 12 s with a 5 s period fires two ticks
/// that see the clock at +5 s and +10 s, not both at +12 s.
#[test]
fn each_tick_fires_at_its_own_time() {
    let mut h = Host::builder(&common::test_service()).config(r#"{"tick_ms": 5000}"#).start().unwrap();
    assert_eq!(h.root_logs(0), ["[info] test-service: started", "[info] test-service: configured tick_ms=5000"]);
    h.advance(Duration::from_secs(12));
    assert_eq!(h.root_logs(0)[2..], ["[info] test-service: tick 1 at +5000 ms", "[info] test-service: tick 2 at +10000 ms"]);
    assert_eq!(h.metric("test_service.ticks"), Some(2));
    // The next is due at +15 s: 2.999 s more fires nothing, 1 ms more fires it.
    h.advance(Duration::from_millis(2999));
    assert_eq!(h.root_logs(0).len(), 4);
    h.advance(Duration::from_millis(1));
    assert_eq!(h.root_logs(0)[4], "[info] test-service: tick 3 at +15000 ms");
}

/// A period changed in `on_tick` takes effect from that tick; a period of 0 stops the ticks; each
/// worker's root context ticks on its own timer, in time order.
#[test]
fn tick_period_changes_and_stops() {
    let mut h = Host::builder(&common::test_service())
        .config(r#"{"tick_ms": 1000, "retick_ms": 300, "stop_after": 3}"#)
        .workers(2)
        .start()
        .unwrap();
    h.advance(Duration::from_secs(10));
    for w in 0..2 {
        assert_eq!(
            h.root_logs(w)[2..],
            [
                "[info] test-service: tick 1 at +1000 ms",
                "[info] test-service: tick 2 at +1300 ms",
                "[info] test-service: tick 3 at +1600 ms"
            ]
        );
    }
    assert_eq!(h.tick_period_ms(0), 0);
    assert_eq!(h.metric("test_service.ticks"), Some(6));
}

#[test]
fn shared_queues_deliver_to_the_registering_root() {
    let mut h = host();
    h.send(Request::get("/").header("x-test-enqueue", "hello"));
    assert_eq!(h.shared_data("queue_last").unwrap().0, b"hello");
    assert!(h.root_host_calls(0).contains_key("proxy_dequeue_shared_queue"));
}

#[test]
fn metrics_are_counted() {
    let mut h = host();
    h.send(Request::get("/"));
    h.send(Request::get("/"));
    assert_eq!(h.metric("test_filter.requests"), Some(2));
}

#[test]
fn vm_environment_variables_reach_the_module() {
    let mut h = Host::builder(&test_filter()).config("{}").env("FIREBREAK_TEST", "yes").start().unwrap();
    let v = h.send(Request::get("/").header("x-test-env", "FIREBREAK_TEST"));
    assert_eq!(v.upstream_header("x-env"), Some("yes"));
}

#[test]
fn strict_mode_fails_on_unexpected_host_calls() {
    let mut h = Host::builder(&test_filter())
        .config("{}")
        .allow_only(&["proxy_get_header_map_value", "proxy_increment_metric", "proxy_log"])
        .start()
        .unwrap();
    // Only the allowed calls: fine.
    assert!(h.try_send_on(0, Request::get("/")).is_err(), "the response path replaces a header");
    let mut h = Host::builder(&test_filter()).config("{}").strict().start().unwrap();
    assert!(h.try_send_on(0, Request::get("/")).is_ok());
    let e = h.try_send_on(0, Request::get("/").header("x-test-callout", "nowhere")).unwrap_err();
    assert!(e.to_string().contains("unknown cluster"), "{e}");
}

#[test]
fn host_calls_are_counted_per_request() {
    let mut h = host();
    let plain = h.send(Request::get("/"));
    let props = h.send(Request::get("/").header("x-test-props", "1"));
    assert!(plain.host_call_total() > 0);
    assert!(props.host_call_total() > plain.host_call_total());
    // Six from x-test-props, one for `response.code_details` on the response.
    assert_eq!(props.host_calls["proxy_get_property"], 7);
}

#[test]
fn hosts_are_isolated() {
    let mut a = host();
    let mut b = host();
    a.send(Request::get("/").header("x-test-claim", "k"));
    let v = b.send(Request::get("/").header("x-test-claim", "k"));
    assert_eq!(v.status, 200, "another host's shared data is not visible");
}

#[test]
fn the_upstream_answer_is_scripted() {
    let mut h = Host::builder(&test_filter())
        .config("{}")
        .upstream(Upstream {
            status: 201,
            headers: vec![("x-up".into(), "1".into())],
            body: b"made".to_vec(),
            ..Upstream::default()
        })
        .start()
        .unwrap();
    let v = h.send(Request::get("/"));
    assert_eq!(v.status, 201);
    assert_eq!(v.response_header("x-up"), Some("1"));
    assert_eq!(v.response_body, b"made");
}

#[test]
fn every_import_of_an_sdk_module_is_implemented() {
    let m = test_filter();
    assert!(m.unknown_imports().is_empty(), "{:?}", m.unknown_imports());
    for product in ["request_signature", "rate_limit", "env_guard"] {
        let path = firebreak_host_tests::workspace_root().join(format!("target/wasm32-wasip1/release/{product}.wasm"));
        if path.exists() {
            let m = firebreak_host_tests::Module::load(&path).unwrap();
            assert!(m.unknown_imports().is_empty(), "{product}: {:?}", m.unknown_imports());
        }
    }
}

#[test]
fn a_module_is_compiled_once_and_instantiated_cheaply() {
    let m = test_filter();
    let t = std::time::Instant::now();
    for _ in 0..20 {
        let mut h = Host::builder(&m).config("{}").start().unwrap();
        assert_eq!(h.send(Request::get("/")).status, 200);
    }
    // Generous: a debug-built host on a loaded 2-core machine; typically a few ms each.
    assert!(t.elapsed() < Duration::from_secs(10), "{:?} for 20 hosts", t.elapsed());
}

fn chain_of_two() -> Chain {
    let spec = |vm: &str| PluginSpec {
        configuration: b"{}".to_vec(),
        vm_id: vm.to_string(),
        callouts: [("authz".to_string(), CalloutReply::ok("granted"))].into_iter().collect(),
        ..PluginSpec::default()
    };
    Chain::start(vec![(test_filter(), spec("first")), (test_filter(), spec("second"))], Upstream::default())
        .map_err(|(i, e)| format!("filter {i}: {e}"))
        .unwrap()
}

#[test]
fn chain_a_local_reply_from_the_first_filter_is_never_seen_by_the_second() {
    let mut c = chain_of_two();
    let v = c.send(Request::get("/").header("x-test-deny", "403").header("x-test-counter", "n"));
    assert_eq!((v.status, v.error_code().as_deref()), (403, Some("denied")));
    assert!(!v.forwarded());
    assert!(c.shared_data("first", "n").is_none(), "the first filter denied before counting");
    assert!(c.shared_data("second", "n").is_none(), "the second filter never saw the request");
    let v = c.send(Request::get("/").header("x-test-counter", "n"));
    assert_eq!(v.status, 200);
    assert_eq!(c.shared_data("first", "n").unwrap().0, b"1");
    assert_eq!(c.shared_data("second", "n").unwrap().0, b"1");
}

#[test]
fn chain_filter_state_set_by_an_earlier_filter_is_read_by_a_later_one() {
    // The first filter sets `firebreak_test`; the second reads `firebreak_upstream`, which the
    // request carries as filter state from before the chain.
    let mut c = chain_of_two();
    let v = c.send(Request::get("/").header("x-test-props", "1").property("firebreak_upstream", "earlier"));
    assert_eq!(v.upstream_header("x-prop-upstream"), Some("earlier"));
    assert_eq!(v.upstream_header("x-prop-roundtrip"), Some("stored"));
}

#[test]
fn chain_a_pause_in_the_first_filter_holds_the_second() {
    let mut c = chain_of_two();
    let v = c.send(Request::post("/").header("x-test-callout", "authz").body("b"));
    assert_eq!(v.status, 200);
    assert_eq!(v.callouts.len(), 2, "each filter made its callout");
    assert_eq!(v.upstream_body(), Some(&b"b"[..]));
}

#[test]
fn a_module_of_another_abi_is_refused_with_a_reason() {
    // A hand-assembled module exporting only `proxy_abi_version_0_1_0`.
    let name = b"proxy_abi_version_0_1_0";
    let mut wasm = vec![0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00];
    wasm.extend_from_slice(&[0x01, 0x04, 0x01, 0x60, 0x00, 0x00]); // type: () -> ()
    wasm.extend_from_slice(&[0x03, 0x02, 0x01, 0x00]); // one function of type 0
    wasm.extend_from_slice(&[0x07, (name.len() + 4) as u8, 0x01, name.len() as u8]);
    wasm.extend_from_slice(name);
    wasm.extend_from_slice(&[0x00, 0x00]); // export function 0
    wasm.extend_from_slice(&[0x0a, 0x04, 0x01, 0x02, 0x00, 0x0b]); // empty body
    let e = firebreak_host_tests::Module::from_bytes("old.wasm", &wasm).err().expect("refused");
    assert!(e.to_string().contains("not a proxy-wasm ABI 0.2.x module"), "{e}");
    assert!(e.to_string().contains("proxy_abi_version_0_1_0"), "{e}");
}

#[test]
fn wasi_randomness_is_reproducible_per_host_and_distinct_per_worker() {
    let value = |worker: usize| {
        let mut h = Host::builder(&test_filter()).config("{}").workers(2).start().unwrap();
        h.send_on(worker, Request::get("/").header("x-test-random", "1"))
            .upstream_header("x-random")
            .map(str::to_string)
    };
    assert!(value(0).is_some());
    assert_eq!(value(0), value(0), "the same seed gives the same run");
    assert_ne!(value(0), value(1), "each worker's VM has its own randomness, as in Envoy");
}

#[test]
fn what_a_module_prints_is_kept() {
    let mut h = host();
    let v = h.send(Request::get("/").header("x-test-print", "hello"));
    assert_eq!(v.status, 200);
    assert!(h.guest_output(0).contains("test-filter prints hello"), "{:?}", h.guest_output(0));
}

#[test]
fn response_code_details_say_who_answered() {
    // Envoy 1.40 (checked by scenarios/test-filter-upstream-answers.yaml): `via_upstream` for
    // any upstream answer, `response_timeout` / `upstream_reset_before_response_started{..}`
    // for the router's own replies, a local reply's details otherwise.
    let mut h = Host::builder(&test_filter()).config("{}").route_timeout_ms(1000).start().unwrap();
    let start = h.now_nanos();
    let v = h.send(Request::get("/").answered_by(Upstream { status: 503, body: b"boom".to_vec(), ..Upstream::default() }));
    assert_eq!((v.status, v.code_details.as_deref()), (503, Some("via_upstream")));
    assert_eq!(v.response_header("x-code-details"), Some("via_upstream"));
    assert_eq!(v.response_body, b"boom");
    let v = h.send(Request::post("/").body("x").answered_by(Upstream { delay_ms: 1000, ..Upstream::default() }));
    assert_eq!((v.status, v.response_header("x-code-details")), (504, Some("response_timeout")));
    assert_eq!(v.response_body, b"upstream request timeout");
    assert!(v.forwarded(), "the upstream had the request when the router gave up");
    assert_eq!(h.now_nanos() - start, 1_000_000_000, "the fake clock moved by the route timeout");
    let v = h.send(Request::post("/").body("x").answered_by(Upstream { reset: true, ..Upstream::default() }));
    assert_eq!(
        (v.status, v.response_header("x-code-details")),
        (503, Some("upstream_reset_before_response_started{connection_termination}"))
    );
    let v = h.send(Request::get("/").header("x-test-deny", "403"));
    assert_eq!((v.status, v.code_details.as_deref()), (403, Some("")));
    // The next request without its own answer gets the host's default again.
    let v = h.send(Request::get("/"));
    assert_eq!((v.status, v.response_header("x-code-details")), (200, Some("via_upstream")));
}

#[test]
fn chain_every_filter_sees_the_routers_timeout_details() {
    let mut c = chain_of_two();
    let v = c.send(Request::post("/").body("x").answered_by(Upstream { delay_ms: 20_000, ..Upstream::default() }));
    assert_eq!((v.status, v.code_details.as_deref()), (504, Some("response_timeout")));
    assert_eq!(v.response_header("x-code-details"), Some("response_timeout"));
    let v = c.send(Request::get("/").header("x-test-deny", "403"));
    assert_eq!((v.status, v.code_details.as_deref()), (403, Some("")));
}

#[test]
fn request_trailers_reach_the_upstream_and_the_body_is_not_given_a_content_length() {
    let mut h = host();
    let v = h.send(Request::post("/").body("abc").trailer("x-t", "1"));
    let up = v.upstream.expect("forwarded");
    // As the filter left them: it counts the trailers it saw.
    assert_eq!(up.trailers, vec![("x-t".to_string(), "1".to_string()), ("x-trailers-seen".to_string(), "1".to_string())]);
    assert_eq!(up.body, b"abc");
    assert_eq!(up.header("content-length"), None, "chunked with trailers, as the client sent it");
}

#[test]
fn a_client_that_goes_away_before_the_answer_gets_nothing_and_the_filter_sees_no_response() {
    let mut h = host();
    let mut r = Request::post("/").body("x").answered_by(Upstream { delay_ms: 500, ..Upstream::default() });
    r.disconnect = true;
    let v = h.send(r);
    assert_eq!((v.status, v.reset, v.code_details.as_deref()), (0, true, None));
    assert_eq!(v.upstream_body(), Some(&b"x"[..]), "the upstream had the whole request");
    assert_eq!(h.send(Request::get("/")).status, 200);
}

#[test]
fn an_upstream_body_cut_short_resets_the_stream_after_the_part_sent() {
    let mut h = host();
    let v =
        h.send(Request::get("/").answered_by(Upstream { body: b"abcdef".to_vec(), body_cut_at: Some(2), ..Upstream::default() }));
    assert_eq!((v.status, v.reset), (0, true));
    assert!(v.forwarded());
}

/// The filter modules do not export the callbacks their filter does not act on
/// (`scripts/build.sh` trims them: tools/wasm-trim), so Envoy never enters their VM for those;
/// replay-guard and the chain act on every event and keep them all.
#[test]
fn each_filter_module_exports_only_the_callbacks_its_filter_acts_on() {
    const OPTIONAL: [&str; 8] = [
        "proxy_on_request_headers",
        "proxy_on_request_body",
        "proxy_on_request_trailers",
        "proxy_on_response_headers",
        "proxy_on_response_body",
        "proxy_on_response_trailers",
        "proxy_on_http_call_response",
        "proxy_on_log",
    ];
    let expected: [(&str, &[&str]); 5] = [
        ("env_guard", &OPTIONAL[..3]),
        (
            "request_signature",
            &["proxy_on_request_headers", "proxy_on_request_body", "proxy_on_request_trailers", "proxy_on_http_call_response"],
        ),
        (
            "rate_limit",
            &[
                "proxy_on_request_headers",
                "proxy_on_request_body",
                "proxy_on_request_trailers",
                "proxy_on_response_headers",
                "proxy_on_http_call_response",
            ],
        ),
        ("replay_guard", &OPTIONAL),
        ("firebreak_chain", &OPTIONAL),
    ];
    for (module, callbacks) in expected {
        let path = firebreak_host_tests::workspace_root().join(format!("target/wasm32-wasip1/release/{module}.wasm"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (run scripts/build.sh)", path.display()));
        let mut exported = Vec::new();
        for payload in wasmparser::Parser::new(0).parse_all(&bytes) {
            if let wasmparser::Payload::ExportSection(reader) = payload.unwrap() {
                for export in reader {
                    exported.push(export.unwrap().name.to_string());
                }
            }
        }
        let present: Vec<&str> = OPTIONAL.iter().copied().filter(|name| exported.iter().any(|e| e == name)).collect();
        assert_eq!(present, callbacks, "{module}");
        // What every module keeps: the context lifecycle and the root's callbacks.
        for name in ["proxy_on_context_create", "proxy_on_done", "proxy_on_delete", "proxy_on_configure", "proxy_on_vm_start"] {
            assert!(exported.iter().any(|e| e == name), "{module} lacks {name}");
        }
    }
}

#[test]
fn a_body_held_past_the_buffer_limit_gets_413_and_a_response_body_a_reset() {
    // Envoy 1.40 (scenarios/test-grpc-buffer-limit*.yaml): one byte past the limit is too much.
    let host = |limit: u64| Host::builder(&test_filter()).config("{}").buffer_limit_bytes(limit).start().unwrap();
    let req = |n: usize| Request::post("/").header("x-test-body", "buffer").body(vec![b'x'; n]);
    let v = host(10).send(req(11));
    assert_eq!((v.status, v.response_body.as_slice(), v.forwarded()), (413, &b"Payload Too Large"[..], false));
    assert_eq!(v.code_details.as_deref(), Some("request_payload_too_large"));
    let v = host(10).send(req(10));
    assert_eq!((v.status, v.forwarded()), (200, true));
    let v = host(10).send(
        Request::get("/")
            .header("x-test-response-body", "1")
            .answered_by(Upstream { body: vec![b'x'; 11], ..Upstream::default() }),
    );
    assert_eq!((v.status, v.reset), (0, true));
}

#[test]
fn a_grpc_call_answered_past_its_timeout_is_ended_by_envoy() {
    // Envoy 1.40's own timer: 14, "upstream request timeout{response_timeout}" (a server that
    // enforces grpc-timeout may answer 4 first in real Envoy: a race).
    let late = GrpcAnswer { body: b"late".to_vec(), delay_ms: 600, ..GrpcAnswer::default() };
    let mut h = Host::builder(&test_filter())
        .config("{}")
        .callout("checker", CalloutReply::Grpc(late))
        .start()
        .unwrap();
    let t0 = h.now_nanos();
    let v = h.send(Request::get("/").header("x-test-grpc", "checker"));
    assert_eq!((v.status, v.error_code().as_deref()), (503, Some("grpc_failed")));
    assert_eq!(h.now_nanos() - t0, 500_000_000, "the clock moved by the call's timeout");
}
