"""replay-guard on Redis (through webdis): two Envoy instances (request-signature then replay-guard,
both with state on one Redis) in front of one money API. A key claimed on one instance is claimed
for both; a completed key replays on the other; when Redis is down money routes fail closed with
503 state_unavailable (never forwarded) and recover when it returns."""

import base64
import json
import subprocess
import threading
import time
import uuid

import pytest

import harness

JSON = [("content-type", "application/json")]
PREFIX = "firebreak.replay_guard"
HOST = "money.example"
OPERATOR_PATH = "/ops/replay/clear"


@pytest.fixture(scope="module")
def redis_bridge():
    bridge = harness.RedisBridge()
    yield bridge
    bridge.stop()


def guard_config(state: dict, **overrides) -> dict:
    config = {
        "routes": [
            {"name": "payouts", "match": {"methods": ["POST"], "path_prefix": "/v1/payouts"}},
            {"name": "transfers", "match": {"methods": ["POST"], "path_prefix": "/v1/transfers"},
             "idempotency_key": "optional", "collapse_window_ms": 5000},
        ],
        "ttl_seconds": 3600,
        "in_flight_timeout_ms": 30000,
        "max_stored_body_bytes": 4096,
        "operator_clear": {"path": OPERATOR_PATH, "principals": [harness.DEMO_KEY_ID]},
        "state": state,
    }
    config.update(overrides)
    return config


def gateways(envoy_factory, redis_bridge, n=2, signed=True, **overrides):
    """`n` Envoy instances sharing one Redis (same key prefix), each with the buffer filter,
    request-signature (if `signed`) and replay-guard."""
    # A generous callout timeout: the machine running the suite may be loaded; the failure tests
    # stop Redis (webdis then answers 503 at once) or point at a closed port.
    sig_state = harness.redis_state(timeout_ms=2000)
    guard_state = harness.redis_state(timeout_ms=2000)
    filters = [harness.buffer_filter()]
    if signed:
        filters.append(harness.signature_filter(state=sig_state, routes=[{"methods": ["POST"], "path_prefix": "/"}]))
    filters.append(harness.wasm_filter("replay_guard", guard_config(guard_state, **overrides)))
    envoys = [envoy_factory(filters, extra_clusters=[redis_bridge.cluster()]) for _ in range(n)]
    return envoys, guard_state


def new_ref() -> str:
    return f"rgr-{uuid.uuid4().hex[:12]}"


def new_key() -> str:
    return f'"{uuid.uuid4()}"'


def payout(reference: str, amount: int = 1) -> bytes:
    return json.dumps({"account": "acc-bob", "amount": amount, "reference": reference}).encode()


def signed_headers(path: str, body: bytes, key: str | None, extra=()) -> list:
    """A freshly signed request (its own nonce) for the authority both instances accept."""
    headers = list(JSON) + list(extra) + harness.sign("POST", f"http://{HOST}{path}", body)
    if key is not None:
        headers.append(("Idempotency-Key", key))
    return headers


def post(envoy, path, body, key=None, extra=()):
    return envoy.request("POST", path, signed_headers(path, body, key, extra), body, host=HOST)


def redis_keys(bridge, pattern: str) -> list[str]:
    """Keys matching `pattern`, straight from redis-server (webdis does not render SCAN's reply)."""
    out = subprocess.run(["redis-cli", "-p", str(bridge.redis_port), "--scan", "--pattern", pattern],
                         check=True, capture_output=True, text=True, timeout=10).stdout
    return [line for line in out.splitlines() if line]


def wait_until(predicate, seconds=15.0, what="condition"):
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_fifty_concurrent_requests_with_one_key_over_two_instances_execute_once(envoy_factory, redis_bridge, demo_api):
    (a, b), _ = gateways(envoy_factory, redis_bridge)
    ref, key = new_ref(), new_key()
    body = payout(ref)
    prepared = [signed_headers("/v1/payouts", body, key) for _ in range(50)]
    barrier = threading.Barrier(50)
    results = [None] * 50

    def fire(i):
        barrier.wait(timeout=60)
        results[i] = (a, b)[i % 2].request("POST", "/v1/payouts", prepared[i], body, host=HOST, timeout=30)

    threads = [threading.Thread(target=fire, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is not None for r in results)
    assert demo_api.executed(ref) == 1
    firsts = [r for r in results if r.status == 201 and "idempotent-replayed" not in r.headers]
    replays = [r for r in results if r.status == 201 and r.headers.get("idempotent-replayed") == "true"]
    in_flight = [r for r in results if (r.status, r.error) == (409, "request_in_flight")]
    assert len(firsts) == 1, [(r.status, r.body[:80]) for r in results]
    assert len(firsts) + len(replays) + len(in_flight) == 50, [(r.status, r.body[:80]) for r in results]
    assert all(r.body == firsts[0].body for r in replays)
    forwarded = a.counter(f"{PREFIX}.forwarded") + b.counter(f"{PREFIX}.forwarded")
    assert forwarded == 1
    stats = [{k: v for k, v in gw.stats().items() if PREFIX in k and v} for gw in (a, b)]
    assert a.counter(f"{PREFIX}.completed") + b.counter(f"{PREFIX}.completed") == 1, stats


def test_a_completed_key_replays_on_the_other_instance(envoy_factory, redis_bridge, demo_api):
    (a, b), state = gateways(envoy_factory, redis_bridge)
    ref, key = new_ref(), new_key()
    first = post(a, "/v1/payouts", payout(ref), key)
    assert first.status == 201, first.body
    again = post(b, "/v1/payouts", payout(ref), key)
    assert again.status == 201
    assert again.headers.get("idempotent-replayed") == "true"
    assert again.body == first.body
    assert again.headers.get("content-type") == first.headers.get("content-type")
    assert b.counter(f"{PREFIX}.replayed") == 1
    # The same key for another amount, on either instance: 422, not forwarded.
    other = post(b, "/v1/payouts", payout(ref, amount=2), key)
    assert (other.status, other.error) == (422, "idempotency_key_mismatch")
    assert demo_api.executed(ref) == 1

    # In Redis: one key per idempotency key, base64 of the record (and the response), expiring
    # with the record's TTL.
    keys = redis_keys(redis_bridge, f"{state['key_prefix']}:replay:key:*")
    assert len(keys) == 1, keys
    ttl = redis_bridge.command("PTTL", keys[0])["PTTL"]
    assert 0 < ttl <= 3600 * 1000
    value = base64.b64decode(redis_bridge.command("GET", keys[0])["GET"] + "==")
    assert value[0] == 1 and value[1] == 2  # record version 1, state "completed"
    assert first.body in value


def test_a_response_too_large_to_store_is_not_replayed_but_never_repeated(envoy_factory, redis_bridge, demo_api):
    (a, b), _ = gateways(envoy_factory, redis_bridge, max_stored_body_bytes=8)
    ref, key = new_ref(), new_key()
    assert post(a, "/v1/payouts", payout(ref), key).status == 201
    assert a.counter(f"{PREFIX}.completed_not_stored") == 1
    again = post(b, "/v1/payouts", payout(ref), key)
    assert (again.status, again.error) == (409, "response_not_stored")
    assert again.headers.get("x-firebreak-original-status") == "201"
    assert demo_api.executed(ref) == 1


def test_no_key_duplicates_collapse_across_instances(envoy_factory, redis_bridge, demo_api):
    (a, b), _ = gateways(envoy_factory, redis_bridge)
    ref = new_ref()
    body = json.dumps({"from": "acc-alice", "to": "acc-carol", "amount": 1, "reference": ref}).encode()
    assert post(a, "/v1/transfers", body).status == 201
    dup = post(b, "/v1/transfers", body)
    assert (dup.status, dup.error) == (409, "duplicate_request")
    assert demo_api.executed(ref) == 1


def test_outcome_unknown_is_shared_and_an_operator_clears_it_through_redis(envoy_factory, redis_bridge, demo_api):
    (a, b), _ = gateways(envoy_factory, redis_bridge)
    ref, key = new_ref(), new_key()
    r = post(a, "/v1/payouts", payout(ref), key, extra=[("x-demo-fault", "fail-after-commit")])
    assert r.status == 503
    assert a.counter(f"{PREFIX}.outcome_unknown_recorded") == 1
    retry = post(b, "/v1/payouts", payout(ref), key)
    assert (retry.status, retry.error) == (409, "outcome_unknown")
    assert demo_api.executed(ref) == 1

    clear = json.dumps({"route": "payouts", "principal": harness.DEMO_KEY_ID,
                        "idempotency_key": key.strip('"')}).encode()
    cleared = post(b, OPERATOR_PATH, clear)
    assert cleared.status == 200, cleared.body
    assert cleared.json == {"cleared": True, "stale_in_flight": False}
    assert b.counter(f"{PREFIX}.operator_cleared") == 1
    missing = post(a, OPERATOR_PATH, clear)
    assert (missing.status, missing.error) == (404, "key_not_found")
    # After reconciliation the operator decided: the next request with the key is forwarded.
    assert post(a, "/v1/payouts", payout(ref), key).status == 201
    assert demo_api.executed(ref) == 2
    done = post(b, OPERATOR_PATH, clear)
    assert (done.status, done.error) == (409, "key_not_clearable")


def test_redis_stopped_mid_run_fails_closed_and_recovers(envoy_factory, redis_bridge, demo_api):
    (a, b), _ = gateways(envoy_factory, redis_bridge)
    # replay-guard alone (no request-signature in front, anonymous keys): its own fail-closed.
    (alone,), _ = gateways(envoy_factory, redis_bridge, n=1, signed=False)
    ok_ref, slow_ref = new_ref(), new_ref()
    assert post(a, "/v1/payouts", payout(ok_ref), new_key()).status == 201

    # A request claimed and forwarded while Redis is up; Redis stops before its answer: the
    # client still gets the upstream's answer (the operation executed), the update fails loudly.
    slow = {}
    slow_thread = threading.Thread(target=lambda: slow.setdefault("r", post(
        a, "/v1/payouts", payout(slow_ref), new_key(), extra=[("x-demo-delay-ms", "3000")])))
    slow_thread.start()
    wait_until(lambda: a.counter(f"{PREFIX}.forwarded") == 2, what="the slow request to be forwarded")
    redis_bridge.stop_redis()
    try:
        slow_thread.join(timeout=30)
        assert slow["r"].status == 201
        assert a.counter(f"{PREFIX}.finish_failed") == 1
        assert "finish_failed status=201" in a.logs()
        before = len(demo_api.ledger())
        refs = [new_ref() for _ in range(4)]
        for gw, ref in zip((a, b, alone, alone), refs):
            r = gw.request("POST", "/v1/payouts", signed_headers("/v1/payouts", payout(ref), new_key()), payout(ref),
                           host=HOST) if gw is not alone else gw.request(
                "POST", "/v1/payouts", list(JSON) + [("Idempotency-Key", new_key())], payout(ref))
            assert (r.status, r.error) == (503, "state_unavailable"), r.body
        # Never forwarded: the ledger did not move.
        assert len(demo_api.ledger()) == before
        assert all(demo_api.executed(ref) == 0 for ref in refs)
        assert alone.counter(f"{PREFIX}.rejected.state_unavailable") == 2
        assert alone.counter(f"{PREFIX}.remote_error") == 2
        # Each failed claim tried to delete its own record first (in case Redis applied it).
        assert alone.counter(f"{PREFIX}.claim_unwind_failed") == 2
        assert alone.counter(f"{PREFIX}.forwarded") == 0
        assert "remote_error op=claim store_error=" in alone.logs()
        no_key = json.dumps({"from": "acc-alice", "to": "acc-carol", "amount": 1, "reference": refs[0]}).encode()
        r = alone.request("POST", "/v1/transfers", JSON, no_key)
        assert (r.status, r.error) == (503, "state_unavailable")
        assert demo_api.executed(refs[0]) == 0
    finally:
        redis_bridge.start_redis()

    for gw, signed in ((a, True), (b, True), (alone, False)):
        ref = new_ref()

        def attempt():
            key = new_key()
            if signed:
                return gw.request("POST", "/v1/payouts", signed_headers("/v1/payouts", payout(ref), key),
                                  payout(ref), host=HOST)
            return gw.request("POST", "/v1/payouts", list(JSON) + [("Idempotency-Key", key)], payout(ref))

        deadline = time.monotonic() + 15
        r = attempt()
        while r.status == 503 and time.monotonic() < deadline:
            time.sleep(0.2)
            r = attempt()
        assert r.status == 201, r.body
        assert demo_api.executed(ref) == 1


def test_unreachable_bridge_fails_closed(envoy_factory, demo_api):
    dead = harness.free_port()
    cluster = {"name": "dead_bridge", "type": "STATIC", "connect_timeout": "0.2s",
               "load_assignment": {"cluster_name": "dead_bridge", "endpoints": [{"lb_endpoints": [{
                   "endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": dead}}}}]}]}}
    gw = envoy_factory([harness.buffer_filter(), harness.wasm_filter(
        "replay_guard", guard_config(harness.redis_state("dead_bridge")))], extra_clusters=[cluster])
    ref = new_ref()
    r = gw.request("POST", "/v1/payouts", list(JSON) + [("Idempotency-Key", new_key())], payout(ref))
    assert (r.status, r.error) == (503, "state_unavailable")
    assert r.headers.get("retry-after") == "1"
    assert demo_api.executed(ref) == 0
    assert "store_error=" in gw.logs()


@pytest.mark.parametrize("state, field", [
    ({"backend": "redis"}, "state.cluster"),
    ({"backend": "redis", "cluster": "firebreak_redis", "failure_mode": "open"}, "state.failure_mode"),
    ({"backend": "redis", "cluster": "firebreak_redis", "timeout_ms": 0}, "state.timeout_ms"),
    ({"backend": "redis", "cluster": "firebreak_redis", "key_prefix": "a b"}, "state.key_prefix"),
    ({"backend": "etcd"}, "state.backend"),
])
def test_a_configuration_error_names_the_field(demo_api, state, field):
    e = harness.Envoy([harness.wasm_filter("replay_guard", guard_config(state))], demo_api.port, expect_failure=True)
    assert f"config_error field={field}" in e.logs()


def test_a_principals_quota_holds_across_instances_and_every_key_has_a_ttl(demo_api, envoy_factory, redis_bridge):
    # The per-tenant quota on Redis (issue 13): counted in the claim's script, cluster-wide.
    (a, b), state = gateways(envoy_factory, redis_bridge, key_store={"buckets": 1024, "slots_per_bucket": 8,
                                                                   "quota_per_principal": 3},
                             collapse_store={"buckets": 256, "slots_per_bucket": 8, "quota_per_principal": 1})
    refs = [new_ref() for _ in range(5)]
    results = []
    for i, ref in enumerate(refs):
        r = post((a, b)[i % 2], "/v1/payouts", payout(ref), new_key())
        results.append((r.status, r.error))
    assert results == [(201, None)] * 3 + [(429, "tenant_quota_exceeded")] * 2, results
    assert [demo_api.executed(ref) for ref in refs] == [1, 1, 1, 0, 0]
    # A keyless duplicate is still a duplicate; a second distinct keyless transfer is over quota.
    body = json.dumps({"from": "acc-alice", "to": "acc-bob", "amount": 1, "reference": new_ref()}).encode()
    assert post(a, "/v1/transfers", body).status == 201
    assert post(b, "/v1/transfers", body).error == "duplicate_request"
    other = json.dumps({"from": "acc-alice", "to": "acc-bob", "amount": 2, "reference": new_ref()}).encode()
    assert post(b, "/v1/transfers", other).error == "tenant_quota_exceeded"
    # Every key the guard wrote expires by itself.
    keys = redis_keys(redis_bridge, f"{state['key_prefix']}:replay:*")
    assert any(":replay:quota:key:" in k for k in keys) and any(":replay:quota:dup:" in k for k in keys), keys
    for key in keys:
        ttl = redis_bridge.command("PTTL", key)["PTTL"]
        assert 0 < ttl <= 3600 * 1000, (key, ttl)
