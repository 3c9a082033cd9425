"""Cluster-wide state on Redis (through webdis): two Envoy instances in front of one money API share
nonces; when Redis is down, money routes fail closed and recover when it returns."""

import json
import subprocess
import time
import uuid

import pytest

import harness


@pytest.fixture(scope="module")
def redis_bridge():
    bridge = harness.RedisBridge()
    yield bridge
    bridge.stop()


def body(ref):
    return json.dumps({"from": "acc-alice", "to": "acc-carol", "amount": 1, "reference": ref}).encode()


JSON = [("content-type", "application/json")]


def two_gateways(envoy_factory, redis_bridge, state):
    filters = [harness.buffer_filter(), harness.signature_filter(state=state)]
    return [envoy_factory(filters, extra_clusters=[redis_bridge.cluster()]) for _ in range(2)]


def test_a_signed_request_replayed_to_the_other_instance_is_rejected(envoy_factory, redis_bridge, demo_api):
    a, b = two_gateways(envoy_factory, redis_bridge, harness.redis_state())
    ref = f"redis-{uuid.uuid4().hex[:10]}"
    # Sign for an authority both instances accept: the one the client uses is part of the signature.
    sig = harness.sign("POST", "http://money.example/v1/transfers", body(ref))
    first = a.request("POST", "/v1/transfers", JSON + sig, body(ref), host="money.example")
    assert first.status == 201, first.body
    replay = b.request("POST", "/v1/transfers", JSON + sig, body(ref), host="money.example")
    assert (replay.status, replay.error) == (409, "nonce_replayed")
    assert demo_api.executed(ref) == 1
    assert b.counter("firebreak.request_signature.rejected.nonce_replayed") == 1


def test_redis_down_fails_closed_and_recovers(envoy_factory, redis_bridge, demo_api):
    a, _ = two_gateways(envoy_factory, redis_bridge, harness.redis_state())
    redis_bridge.stop_redis()
    try:
        ref = f"redis-{uuid.uuid4().hex[:10]}"
        r = a.signed("POST", "/v1/transfers", body(ref), headers=JSON)
        assert (r.status, r.error) == (503, "state_unavailable")
        assert demo_api.executed(ref) == 0
        assert "store_error=" in a.logs()
    finally:
        redis_bridge.start_redis()
    ref = f"redis-{uuid.uuid4().hex[:10]}"
    deadline = time.monotonic() + 15
    while True:
        r = a.signed("POST", "/v1/transfers", body(ref), headers=JSON)
        if r.status != 503 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.status == 201, r.body
    assert demo_api.executed(ref) == 1


def test_unreachable_bridge_fails_closed(envoy_factory, demo_api):
    dead = harness.free_port()
    cluster = {"name": "dead_bridge", "type": "STATIC", "connect_timeout": "0.2s",
               "load_assignment": {"cluster_name": "dead_bridge", "endpoints": [{"lb_endpoints": [{
                   "endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": dead}}}}]}]}}
    closed = envoy_factory([harness.signature_filter(state=harness.redis_state("dead_bridge"))],
                           extra_clusters=[cluster])
    ref = f"redis-{uuid.uuid4().hex[:10]}"
    r = closed.signed("POST", "/v1/transfers", body(ref), headers=JSON)
    assert (r.status, r.error) == (503, "state_unavailable")
    assert demo_api.executed(ref) == 0


def test_failure_mode_open_is_refused_at_configuration(demo_api):
    # An unrecorded nonce is a replay that cannot be refused: there is no safe "open".
    e = harness.Envoy([harness.signature_filter(state=harness.redis_state("dead_bridge", failure_mode="open"))],
                      demo_api.port, expect_failure=True)
    assert e.proc.returncode != 0
    assert "config_error field=state.failure_mode" in e.logs()


def test_the_nonce_ttl_on_redis_covers_the_replica_clock_skew(envoy_factory, redis_bridge, demo_api):
    state = harness.redis_state()
    gw = envoy_factory([harness.buffer_filter(), harness.signature_filter(state=state,
                                                                          max_replica_clock_skew_seconds=45)],
                       extra_clusters=[redis_bridge.cluster()])
    ref = f"redis-{uuid.uuid4().hex[:10]}"
    assert gw.signed("POST", "/v1/transfers", body(ref), headers=JSON).status == 201
    # Straight to redis-server (the bridge refuses KEYS): the key name is the filter's business.
    cli = ["redis-cli", "-h", "127.0.0.1", "-p", str(redis_bridge.redis_port)]
    keys = subprocess.run(cli + ["--scan", "--pattern", f"{state['key_prefix']}:sig:nonce:*"],
                          check=True, capture_output=True, text=True).stdout.split()
    assert len(keys) == 1, keys
    pttl = redis_bridge.command("PTTL", keys[0])["PTTL"]
    # max_age 300 + future skew 5 + replica skew 45 + 1 s, whatever the gateway's clock.
    assert 350_000 < pttl <= 351_000, pttl


def test_fifty_concurrent_copies_across_two_instances_execute_once(envoy_factory, redis_bridge, demo_api):
    import threading
    a, b = two_gateways(envoy_factory, redis_bridge, harness.redis_state())
    ref = f"redis-{uuid.uuid4().hex[:10]}"
    sig = harness.sign("POST", "http://money.example/v1/transfers", body(ref))
    gate = threading.Barrier(50)
    results = []

    def fire(gw):
        gate.wait()
        results.append(gw.request("POST", "/v1/transfers", JSON + sig, body(ref), host="money.example"))

    threads = [threading.Thread(target=fire, args=((a, b)[i % 2],)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.status for r in results) == [201] + [409] * 49
    assert demo_api.executed(ref) == 1


def test_invalid_state_configuration_is_refused(demo_api):
    e = harness.Envoy([harness.signature_filter(state={"backend": "redis"})], demo_api.port, expect_failure=True)
    assert "config_error field=state.cluster" in e.logs()


@pytest.mark.parametrize("buffered", [True, False])
def test_the_body_is_still_verified_after_waiting_for_redis(envoy_factory, redis_bridge, demo_api, buffered):
    filters = ([harness.buffer_filter()] if buffered else []) + [harness.signature_filter(state=harness.redis_state())]
    gw = envoy_factory(filters, extra_clusters=[redis_bridge.cluster()])
    ref = f"redis-{uuid.uuid4().hex[:10]}"
    sig = harness.sign("POST", gw.url("/v1/transfers"), body(ref))
    tampered = body(ref).replace(b'"amount": 1', b'"amount": 9')
    r = gw.request("POST", "/v1/transfers", JSON + sig, tampered)
    assert (r.status, r.error) == (401, "content_digest_mismatch")
    assert demo_api.executed(ref) == 0
