"""rate-limit on Redis (through webdis): two Envoy instances in front of one money API share one
budget per key; when Redis is down money routes fail closed (503 state_unavailable, never
forwarded) and recover when it returns; a route configured to fail open passes with a counter;
the reconciled (lease) mode stays within its documented bound across two instances."""

import json
import re
import time
import uuid

import pytest

import harness

JSON = [("content-type", "application/json")]
BALANCE = "/v1/accounts/acc-alice/balance"
MONEY = [{"methods": ["POST"], "path_prefix": "/v1/"}]
READS = [{"methods": ["GET"], "path_prefix": "/v1/accounts/"}]


@pytest.fixture(scope="module")
def redis_bridge():
    bridge = harness.RedisBridge()
    yield bridge
    bridge.stop()


def rule(name, key="user", requests=1, per_seconds=3600, burst=4, routes=MONEY, **extra) -> dict:
    return {"name": name, "routes": routes, "key": key, "requests": requests, "per_seconds": per_seconds,
            "burst": burst, **extra}


def rate_limit(name, rules, state, **extra) -> dict:
    return harness.wasm_filter("rate_limit", {"name": name, "rules": rules, "state": state, **extra},
                               vm_id="rate_limit", root_id=f"rate_limit_{name}")


def new_ref() -> str:
    return f"rlr-{uuid.uuid4().hex[:12]}"


def transfer(ref) -> bytes:
    return json.dumps({"from": "acc-alice", "to": "acc-bob", "amount": 1, "reference": ref}).encode()


def signed_transfer(envoy, ref):
    return envoy.signed("POST", "/v1/transfers", transfer(ref), headers=JSON)


def dead_cluster() -> dict:
    port = harness.free_port()
    return {"name": "dead_bridge", "type": "STATIC", "connect_timeout": "0.2s",
            "load_assignment": {"cluster_name": "dead_bridge", "endpoints": [{"lb_endpoints": [{
                "endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}


def test_a_per_user_limit_holds_across_two_instances(envoy_factory, redis_bridge, demo_api):
    state = harness.redis_state()
    filters = [harness.buffer_filter(), harness.signature_filter(state=harness.redis_state()),
               rate_limit("per-user", [rule("user-money", burst=4)], state, response_headers=True)]
    a, b = (envoy_factory(filters, extra_clusters=[redis_bridge.cluster()]) for _ in range(2))
    refs = [new_ref() for _ in range(8)]
    results = [signed_transfer((a, b)[i % 2], ref) for i, ref in enumerate(refs)]
    # The burst is admitted once across the pair, whichever instance a request reaches.
    assert [r.status for r in results] == [201] * 4 + [429] * 4, [r.body for r in results]
    assert [demo_api.executed(ref) for ref in refs] == [1] * 4 + [0] * 4
    assert results[0].headers["ratelimit"] == '"user-money";r=3;t=3600'
    for r, gw in zip(results[4:], (a, b, a, b)):
        assert (r.error, r.headers["x-firebreak-error"]) == ("rate_limited", "rate_limited")
        assert 3590 <= int(r.headers["retry-after"]) <= 3600
        assert r.headers["ratelimit-policy"] == '"user-money";q=4;w=14400'
        assert re.fullmatch(r'"user-money";r=0;t=\d+', r.headers["ratelimit"])
    for gw in (a, b):
        assert gw.counter("firebreak.rate_limit.per-user.rule.user-money.allowed") == 2
        assert gw.counter("firebreak.rate_limit.per-user.rejected.rate_limited") == 2
        assert gw.counter("firebreak.rate_limit.per-user.redis.calls") == 4
        assert "code=rate_limited instance=per-user" in gw.logs() and "user=demo-client" in gw.logs()


def test_a_refusal_by_one_rule_costs_nothing_in_the_other_across_instances(envoy_factory, redis_bridge):
    # One script call carries both keys: `narrow` (burst 2) refuses, `wide` (burst 3) is not charged.
    state = harness.redis_state()
    filters = [rate_limit("multi", [rule("narrow", key="ip", burst=2, routes=READS),
                                    rule("wide", key="ip", burst=3, routes=[{"methods": ["GET"], "path_prefix": "/v1/"}])],
                          state)]
    a, b = (envoy_factory(filters, extra_clusters=[redis_bridge.cluster()]) for _ in range(2))
    assert [(a, b)[i % 2].request("GET", BALANCE).status for i in range(4)] == [200, 200, 429, 429]
    r = b.request("GET", BALANCE)
    assert r.status == 429 and "narrow" in r.json["message"]
    assert r.headers["ratelimit-policy"] == '"narrow";q=2;w=7200, "wide";q=3;w=10800'
    # `wide` admitted only the two requests `narrow` admitted: one more is left, on either instance.
    assert a.request("GET", "/v1/ledger").status == 200
    r = b.request("GET", "/v1/ledger")
    assert r.status == 429 and "wide" in r.json["message"]


def test_redis_down_money_routes_fail_closed_and_recover(envoy_factory, redis_bridge, demo_api):
    # Signature nonces stay local here, so the rate limiter is what meets the outage.
    state = harness.redis_state()
    filters = [harness.buffer_filter(), harness.signature_filter(),
               rate_limit("per-user", [rule("user-money", burst=50)], state)]
    a, b = (envoy_factory(filters, extra_clusters=[redis_bridge.cluster()]) for _ in range(2))
    assert signed_transfer(a, new_ref()).status == 201
    redis_bridge.stop_redis()
    try:
        refs = [new_ref() for _ in range(4)]
        results = [signed_transfer((a, b)[i % 2], ref) for i, ref in enumerate(refs)]
        for r in results:
            assert (r.status, r.error) == (503, "state_unavailable"), r.body
            assert r.headers["x-firebreak-error"] == "state_unavailable"
        assert [demo_api.executed(ref) for ref in refs] == [0] * 4, "never forwarded unchecked"
        for gw in (a, b):
            assert gw.counter("firebreak.rate_limit.per-user.rejected.state_unavailable") == 2
            assert gw.counter("firebreak.rate_limit.per-user.redis.failed") == 2
            assert gw.counter("firebreak.rate_limit.per-user.rule.user-money.error.state_unavailable") == 2
            assert "code=state_unavailable instance=per-user" in gw.logs() and "store_error=" in gw.logs()
    finally:
        redis_bridge.start_redis()
    for gw in (a, b):
        ref = new_ref()
        deadline = time.monotonic() + 15
        while True:
            r = signed_transfer(gw, ref)
            if r.status != 503 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert r.status == 201, r.body
        assert demo_api.executed(ref) == 1


def test_a_route_configured_to_fail_open_passes_with_the_counter(envoy_factory, demo_api):
    # Reads fail open (rule fail_open); money stays closed in the same instance.
    state = harness.redis_state("dead_bridge")
    gw = envoy_factory([rate_limit("mixed", [rule("reads", key="ip", routes=READS, fail_open=True),
                                             rule("money", key="ip", routes=MONEY)], state)],
                       extra_clusters=[dead_cluster()])
    assert gw.request("GET", BALANCE).status == 200
    assert gw.counter("firebreak.rate_limit.mixed.state_unavailable_failed_open") == 1
    assert gw.counter("firebreak.rate_limit.mixed.rule.reads.error.state_unavailable") == 1
    assert "fail_open rate_limit_unchecked instance=mixed" in gw.logs()
    ref = new_ref()
    r = gw.request("POST", "/v1/transfers", JSON, transfer(ref))
    assert (r.status, r.error) == (503, "state_unavailable")
    assert demo_api.executed(ref) == 0
    # The state's failure_mode: open lets every rule of the instance through.
    open_all = envoy_factory([rate_limit("open", [rule("money", key="ip", routes=MONEY)],
                                         harness.redis_state("dead_bridge", failure_mode="open"))],
                             extra_clusters=[dead_cluster()])
    ref = new_ref()
    assert open_all.request("POST", "/v1/transfers", JSON, transfer(ref)).status == 201
    assert demo_api.executed(ref) == 1
    assert open_all.counter("firebreak.rate_limit.open.state_unavailable_failed_open") == 1


def test_reconciled_mode_stays_within_its_bound_across_two_instances(envoy_factory, redis_bridge):
    """Leases of 3 tokens, burst 10, no refill during the test, two instances: the pair never
    admits more than the burst, and loses at most instances x (lease - 1) = 4 to stranded leases."""
    burst, lease, instances = 10, 3, 2
    state = harness.redis_state()
    filters = [rate_limit("leased", [rule("reads", key="ip", burst=burst, routes=READS)], state,
                          reconcile={"lease_tokens": lease, "lease_ms": 60000})]
    a, b = (envoy_factory(filters, extra_clusters=[redis_bridge.cluster()]) for _ in range(instances))
    statuses = [(a, b)[(i // 2) % 2].request("GET", BALANCE).status for i in range(30)]
    admitted = statuses.count(200)
    assert set(statuses) == {200, 429}
    assert burst - instances * (lease - 1) <= admitted <= burst, statuses
    calls = sum(gw.counter("firebreak.rate_limit.leased.redis.calls") for gw in (a, b))
    local = sum(gw.counter("firebreak.rate_limit.leased.lease.local_decisions") for gw in (a, b))
    assert calls + local == 30
    # Most decisions need no round trip: spent leases, and refusals remembered until Retry-After.
    assert calls <= 10, (calls, local)
    r = a.request("GET", BALANCE)
    assert r.status == 429 and int(r.headers["retry-after"]) >= 3500


@pytest.mark.parametrize("config, field", [
    ({"state": {"backend": "redis"}}, "state.cluster"),
    ({"state": {"backend": "redis", "cluster": "c", "timeout_ms": 0}}, "state.timeout_ms"),
    ({"reconcile": {"lease_tokens": 5, "lease_ms": 100}}, "reconcile"),
    ({"state": {"backend": "redis", "cluster": "c"}, "reconcile": {"lease_tokens": 0, "lease_ms": 100}},
     "reconcile.lease_tokens"),
])
def test_invalid_state_configuration_is_refused(demo_api, config, field):
    e = harness.Envoy([harness.wasm_filter("rate_limit", {"name": "x", "rules": [rule("r")], **config})],
                      demo_api.port, expect_failure=True)
    assert f"config_error field={field}" in e.logs()


def test_the_readme_envoy_redis_yaml_shares_one_budget_across_two_instances(demo_api, redis_bridge, tmp_path):
    """plugins/rate-limit/envoy-redis.yaml started twice (free ports, this run's demo API and
    webdis): the per-user burst of 5 is admitted once across both instances."""
    import os
    import subprocess
    text = (harness.ROOT / "plugins" / "rate-limit" / "envoy-redis.yaml").read_text()
    prefix = f"fb-{uuid.uuid4().hex[:8]}"
    assert '"key_prefix": "firebreak"' in text
    text = text.replace('"key_prefix": "firebreak"', f'"key_prefix": "{prefix}"')
    procs, ports = [], []
    try:
        for n in range(2):
            port, admin = harness.free_port(), harness.free_port()
            config = text
            for old, new in [("port_value: 10000", f"port_value: {port}"), ("port_value: 9901", f"port_value: {admin}"),
                             ("port_value: 18080", f"port_value: {demo_api.port}"),
                             ("port_value: 7379", f"port_value: {redis_bridge.webdis_port}"),
                             ("filename: target/", f"filename: {harness.ROOT}/target/")]:
                assert old in config, old
                config = config.replace(old, new)
            path = tmp_path / f"envoy-{n}.yaml"
            path.write_text(config)
            log = tmp_path / f"envoy-{n}.log"
            env = dict(os.environ, **{harness.DEMO_KEY_ENV: harness.DEMO_SECRET_B64})
            proc = subprocess.Popen([str(harness.ENVOY), "-c", str(path), "--concurrency", "2", "--use-dynamic-base-id",
                                     "--disable-hot-restart", "-l", "warning"],
                                    stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
            procs.append(proc)
            harness.wait_for(lambda: harness.send(admin, "GET", "/ready", timeout=1).status == 200, 30, "envoy", proc, log)
            ports.append(port)
        statuses = []
        for i in range(8):
            port = ports[i % 2]
            body = transfer(new_ref())
            sig = harness.sign("POST", f"http://127.0.0.1:{port}/v1/transfers", body)
            statuses.append(harness.send(port, "POST", "/v1/transfers", JSON + sig, body).status)
        assert statuses == [201] * 5 + [429] * 3
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)


def test_concurrent_requests_across_two_instances_spend_one_budget_exactly(envoy_factory, redis_bridge):
    """Each decision is one atomic script: 60 requests at once, spread over two instances and
    their four workers, admit exactly the burst."""
    import threading
    burst = 12
    filters = [rate_limit("race", [rule("reads", key="ip", burst=burst, routes=READS)], harness.redis_state())]
    a, b = (envoy_factory(filters, extra_clusters=[redis_bridge.cluster()]) for _ in range(2))
    gate = threading.Barrier(20)
    results, lock = [], threading.Lock()

    def fire(gw):
        gate.wait()
        for _ in range(3):
            r = gw.request("GET", BALANCE)
            with lock:
                results.append(r.status)
    threads = [threading.Thread(target=fire, args=((a, b)[i % 2],)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 60 and set(results) <= {200, 429}
    assert results.count(200) == burst, results
    assert sum(gw.counter("firebreak.rate_limit.race.allowed") for gw in (a, b)) == burst


def test_a_slow_redis_times_out_and_fails_closed(envoy_factory, redis_bridge, demo_api):
    """Redis frozen (SIGSTOP): webdis waits, the callout times out after state.timeout_ms, the
    money request is refused and never forwarded."""
    import os
    import signal
    filters = [harness.buffer_filter(), harness.signature_filter(),
               rate_limit("slow", [rule("user-money", burst=50)], harness.redis_state(timeout_ms=200))]
    gw = envoy_factory(filters, extra_clusters=[redis_bridge.cluster()])
    assert signed_transfer(gw, new_ref()).status == 201
    os.kill(redis_bridge.redis.pid, signal.SIGSTOP)
    try:
        ref = new_ref()
        r = signed_transfer(gw, ref)
        assert (r.status, r.error) == (503, "state_unavailable"), r.body
        assert demo_api.executed(ref) == 0
        # Envoy reports a callout that timed out as its own 504 (or no answer at all).
        assert re.search(r'store_error="state store unreachable: (bridge answered HTTP 504|no answer)', gw.logs())
    finally:
        os.kill(redis_bridge.redis.pid, signal.SIGCONT)
    ref = new_ref()
    deadline = time.monotonic() + 15
    while True:
        r = signed_transfer(gw, ref)
        if r.status != 503 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.status == 201, r.body
