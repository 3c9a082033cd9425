"""The one-module chain (firebreak_chain.wasm) through real Envoy: what only the one module does.
The demo's scenarios run on it in test_demo.py and the chain scenario files in the host tests;
here, every stage waiting for Redis in turn (each resume hands over to the next stage), two
instances sharing that state, a Redis outage, and configuration errors named by field."""

import json
import threading
import uuid

import pytest
import yaml

import harness

JSON = [("content-type", "application/json")]
HOST = "money.example"
MONEY = [{"methods": ["POST"], "path_prefix": "/v1/"}]


@pytest.fixture(scope="module")
def redis_bridge():
    bridge = harness.RedisBridge()
    yield bridge
    bridge.stop()


def sections(prefix: str, burst: int = 50) -> list[dict]:
    """request-signature, per-user rate-limit and replay-guard, every one with its state on Redis
    under one key prefix (shared by the instances built with it)."""

    def state():
        return harness.redis_state(timeout_ms=2000, key_prefix=prefix)

    return [
        {"request_signature": harness.signature_config(routes=MONEY, state=state(),
                                                       covered_headers_when_present=["idempotency-key"])},
        {"rate_limit": {"name": "per-user", "state": state(), "response_headers": True,
                        "rules": [{"name": "user-money", "routes": MONEY, "key": "user",
                                   "requests": 1, "per_seconds": 3600, "burst": burst}]}},
        {"replay_guard": {"routes": [{"name": "payouts", "match": {"methods": ["POST"], "path_exact": "/v1/payouts"},
                                      "require_principal": True}],
                          "ttl_seconds": 3600, "in_flight_timeout_ms": 30000, "state": state()}},
    ]


def gateways(envoy_factory, redis_bridge, n=2, burst=50):
    prefix = f"fb-chain-{uuid.uuid4().hex[:8]}"
    filters = [harness.buffer_filter(), harness.chain_filter(sections(prefix, burst))]
    return [envoy_factory(filters, extra_clusters=[redis_bridge.cluster()]) for _ in range(n)]


def payout(ref: str) -> bytes:
    return json.dumps({"account": "acc-bob", "amount": 7, "reference": ref}).encode()


def signed(body: bytes, key: str) -> list:
    """A freshly signed payout (its own nonce, the idempotency key covered) for `HOST`."""
    sig = harness.sign("POST", f"http://{HOST}/v1/payouts", body,
                       extra=["-H", f"idempotency-key: {key}", "--cover", "idempotency-key"])
    return JSON + [("idempotency-key", key)] + sig


def new_ref() -> str:
    return f"chain-{uuid.uuid4().hex[:10]}"


def test_every_stage_waits_for_redis_in_turn_across_two_instances(envoy_factory, redis_bridge, demo_api):
    a, b = gateways(envoy_factory, redis_bridge)
    ref, key = new_ref(), f'"{uuid.uuid4()}"'
    first_headers = signed(payout(ref), key)
    first = a.request("POST", "/v1/payouts", first_headers, payout(ref), host=HOST)
    assert first.status == 201, first.body
    # Every stage ran: the nonce, the user's budget and the key are in Redis, and the headers of
    # the per-user stage (which answered after request-signature's resume) are on the response.
    assert "ratelimit-policy" in first.headers
    retry = b.request("POST", "/v1/payouts", signed(payout(ref), key), payout(ref), host=HOST)
    assert retry.status == 201 and retry.headers.get("idempotent-replayed") == "true", retry.body
    replayed_signature = b.request("POST", "/v1/payouts", first_headers, payout(ref), host=HOST)
    assert (replayed_signature.status, replayed_signature.error) == (409, "nonce_replayed")
    assert demo_api.executed(ref) == 1
    # The stages count under the separate modules' names. Refusals are counted at once; the
    # counts of passed requests are written by the chain's tick (every second).
    assert b.counter("firebreak.request_signature.rejected.nonce_replayed") == 1
    assert b.counter("firebreak.replay_guard.replayed") == 1
    harness.wait_for(lambda: a.counter("firebreak.request_signature.accepted") == 1, 5, "the accepted count")
    harness.wait_for(lambda: a.counter("firebreak.rate_limit.per-user.allowed") == 1, 5, "the allowed count")
    harness.wait_for(lambda: a.counter("firebreak.replay_guard.forwarded") == 1, 5, "the forwarded count")
    assert "firebreak chain configured stages=request_signature,rate_limit,replay_guard" in a.logs()


def test_the_per_user_budget_is_shared_by_both_instances(envoy_factory, redis_bridge, demo_api):
    a, b = gateways(envoy_factory, redis_bridge, burst=3)
    statuses = []
    for i in range(5):
        ref = new_ref()
        gw = (a, b)[i % 2]
        r = gw.request("POST", "/v1/payouts", signed(payout(ref), f'"{uuid.uuid4()}"'), payout(ref), host=HOST)
        statuses.append((r.status, r.error))
    assert statuses[:3] == [(201, None)] * 3, statuses
    assert statuses[3:] == [(429, "rate_limited")] * 2, statuses


def test_twenty_concurrent_copies_across_two_instances_execute_once(envoy_factory, redis_bridge, demo_api):
    a, b = gateways(envoy_factory, redis_bridge)
    ref, key = new_ref(), f'"{uuid.uuid4()}"'
    prepared = [signed(payout(ref), key) for _ in range(20)]
    barrier = threading.Barrier(20)
    results = [None] * 20

    def fire(i):
        barrier.wait(timeout=60)
        results[i] = (a, b)[i % 2].request("POST", "/v1/payouts", prepared[i], payout(ref), host=HOST, timeout=30)

    threads = [threading.Thread(target=fire, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert demo_api.executed(ref) == 1
    assert all(r is not None and r.status in (201, 409) for r in results), [(r.status, r.error) for r in results if r]
    firsts = [r for r in results if r.status == 201 and "idempotent-replayed" not in r.headers]
    assert len(firsts) == 1


def test_redis_down_fails_closed_at_the_first_stage_and_recovers(envoy_factory, redis_bridge, demo_api):
    (gw,) = gateways(envoy_factory, redis_bridge, n=1)
    redis_bridge.stop_redis()
    try:
        ref = new_ref()
        r = gw.request("POST", "/v1/payouts", signed(payout(ref), f'"{uuid.uuid4()}"'), payout(ref), host=HOST)
        assert (r.status, r.error) == (503, "state_unavailable"), r.body
        assert demo_api.executed(ref) == 0
    finally:
        redis_bridge.start_redis()
    ref = new_ref()
    harness.wait_for(lambda: redis_bridge.command("PING") == {"PING": [True, "PONG"]}, 10, "redis back")
    r = gw.request("POST", "/v1/payouts", signed(payout(ref), f'"{uuid.uuid4()}"'), payout(ref), host=HOST)
    assert r.status == 201, r.body
    assert demo_api.executed(ref) == 1


@pytest.mark.parametrize("chain_config, field", [
    ({"filters": [{"env_guard": {"environment": "uat", "production": False, "production_hosts": ["api.push.apple.com"]}},
                  {"request_signature": harness.signature_config(keys=[])}]}, "filters[1].request_signature.keys"),
    ({"filters": [{"waf": {}}]}, "filters[0].waf"),
    ({"filters": []}, "filters"),
    ({"filters": [{"rate_limit": {"name": "a", "rules": []}}, {"rate_limit": {"name": "a", "rules": []}}]},
     "filters[1].rate_limit.name"),
    ({"stages": []}, "stages"),
    # A stage's own field, from a typed enum of its configuration, under the stage's section.
    ({"filters": [{"replay_guard": {"routes": [{"name": "p", "match": {"path_prefix": "/"}, "on_uncertain": "retry"}]}}]},
     "filters[0].replay_guard.routes[0].on_uncertain"),
])
def test_a_wrong_chain_configuration_stops_envoy_and_names_the_field(demo_api, chain_config, field):
    chain = harness.wasm_filter("firebreak_chain", chain_config, root_id="firebreak")
    e = harness.Envoy([chain], demo_api.port, expect_failure=True)
    assert f"config_error field={field}" in e.logs(), e.logs()[-2000:]


def test_the_readme_snippet_works_as_documented(demo_api):
    """The `http_filters` of plugins/chain/README.md, as written (only the module path made
    absolute): a signed payout executes once however often it is retried; an unsigned one is 401."""
    readme = (harness.ROOT / "plugins" / "chain" / "README.md").read_text()
    snippet = next(block for block in readme.split("```yaml\n")[1:] if block.startswith("http_filters:"))
    http_filters = yaml.safe_load(snippet.split("```")[0])["http_filters"]
    code = http_filters[1]["typed_config"]["config"]["vm_config"]["code"]["local"]
    code["filename"] = str(harness.ROOT / code["filename"])
    # The http_connection_manager settings the README gives beside the filters (defence in depth).
    hcm_block = next(block for block in readme.split("```yaml\n")[1:] if "normalize_path: true" in block)
    hcm_options = yaml.safe_load(hcm_block.split("```")[0])
    assert hcm_options == harness.HARDENED_HCM, hcm_options
    gw = harness.Envoy(http_filters[:-1], demo_api.port, hcm_options=hcm_options)  # the harness adds the router
    try:
        ref, key = new_ref(), f'"{uuid.uuid4()}"'
        url = gw.url("/v1/payouts")
        answers = []
        for _ in range(3):
            sig = harness.sign("POST", url, payout(ref), extra=["-H", f"idempotency-key: {key}", "--cover", "idempotency-key"])
            answers.append(gw.request("POST", "/v1/payouts", JSON + [("idempotency-key", key)] + sig, payout(ref)))
        assert [a.status for a in answers] == [201, 201, 201], [a.body for a in answers]
        assert [a.headers.get("idempotent-replayed") for a in answers] == [None, "true", "true"]
        assert demo_api.executed(ref) == 1
        unsigned = gw.request("POST", "/v1/payouts", JSON + [("idempotency-key", f'"{uuid.uuid4()}"')], payout(new_ref()))
        assert (unsigned.status, unsigned.error) == (401, "signature_missing")
    finally:
        gw.stop()
