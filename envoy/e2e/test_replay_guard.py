"""replay-guard through real Envoy (--concurrency 2, one connection per request): each money
operation reaches the money API exactly once, counted in its ledger; retries get the stored answer,
409 while in flight or when the outcome is unknown, 422 for a reused key; no-key floods collapse."""

import json
import threading
import time
import uuid

import pytest

import harness

JSON = [("content-type", "application/json")]
PREFIX = "firebreak.replay_guard"


def guard_config(**overrides) -> dict:
    config = {
        "routes": [
            {"name": "payouts", "match": {"methods": ["POST"], "path_prefix": "/v1/payouts"}},
            # Test-only: a route "safe to repeat", whose key is released on uncertain answers.
            {"name": "withdrawals", "match": {"methods": ["POST"], "path_prefix": "/v1/withdrawals"},
             "on_uncertain": "release"},
            {"name": "transfers", "match": {"methods": ["POST"], "path_prefix": "/v1/transfers"},
             "idempotency_key": "optional", "collapse_window_ms": 5000},
        ],
        "ttl_seconds": 3600,
        "in_flight_timeout_ms": 30000,
        "max_stored_body_bytes": 4096,
    }
    config.update(overrides)
    return config


def guard_filter(**overrides) -> dict:
    return harness.wasm_filter("replay_guard", guard_config(**overrides))


def start(envoy_factory, route_timeout="15s", **overrides):
    return envoy_factory([harness.buffer_filter(), guard_filter(**overrides)], route_timeout=route_timeout)


@pytest.fixture(scope="module")
def gateway(demo_api):
    envoy = harness.Envoy([harness.buffer_filter(), guard_filter()], demo_api.port)
    yield envoy
    envoy.stop()


def new_ref() -> str:
    return f"rg-{uuid.uuid4().hex[:12]}"


def new_key() -> str:
    return f'"{uuid.uuid4()}"'


def payout(reference: str, amount: int = 1) -> bytes:
    return json.dumps({"account": "acc-bob", "amount": amount, "reference": reference}).encode()


def post(envoy, path, body, key=None, extra=()):
    headers = list(JSON) + list(extra)
    if key is not None:
        headers.append(("Idempotency-Key", key))
    return envoy.request("POST", path, headers, body)


def concurrently(n, fn):
    """Runs fn(i) on n threads released together; each request opens its own connection."""
    barrier = threading.Barrier(n)
    results = [None] * n
    errors = []

    def run(i):
        try:
            barrier.wait(timeout=30)
            results[i] = fn(i)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return results


def assert_refused(response, status, code):
    assert (response.status, response.error) == (status, code), (response.status, response.body)
    assert response.headers.get("x-firebreak-error") == code
    assert response.headers.get("content-type") == "application/json"
    assert set(response.json) == {"error", "message"} and response.json["message"]


def wait_until(predicate, what, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"not reached: {what}")


# ---- Idempotency keys ----

def test_incident_1_fifty_concurrent_requests_with_one_key_execute_once(demo_api, gateway):
    ref, key = new_ref(), new_key()
    body = payout(ref)
    upstream_before = gateway.counter("cluster.money_api.upstream_rq_total")
    # The first request is held upstream for a while so the others arrive while it is in flight.
    results = concurrently(50, lambda i: post(gateway, "/v1/payouts", body, key, [("x-demo-delay-ms", "1500")]))
    assert demo_api.executed(ref) == 1
    originals = [r for r in results if r.status == 201 and "idempotent-replayed" not in r.headers]
    replays = [r for r in results if r.headers.get("idempotent-replayed") == "true"]
    in_flight = [r for r in results if r.error == "request_in_flight"]
    assert len(originals) == 1, [(r.status, r.body) for r in results]
    assert len(originals) + len(replays) + len(in_flight) == 50, [(r.status, r.body) for r in results]
    assert len(in_flight) >= 1
    for r in in_flight:
        assert_refused(r, 409, "request_in_flight")
        assert r.headers.get("retry-after") == "1"
    for r in replays:
        assert (r.status, r.body) == (201, originals[0].body)
    assert gateway.counter(f"{PREFIX}.rejected.request_in_flight") >= len(in_flight)
    # Retries that find the key in flight are answered at header time: the router never opens an
    # upstream request for them (the others are reset before their body is sent).
    assert gateway.counter(f"{PREFIX}.decided_at_headers") >= 1
    upstream = gateway.counter("cluster.money_api.upstream_rq_total") - upstream_before
    assert upstream < 50, upstream


def test_incident_2_a_completed_payout_retried_three_times_executes_once(demo_api, gateway):
    ref, key = new_ref(), new_key()
    first = post(gateway, "/v1/payouts", payout(ref), key)
    assert first.status == 201, first.body
    assert "idempotent-replayed" not in first.headers
    for _ in range(3):
        again = post(gateway, "/v1/payouts", payout(ref), key)
        assert (again.status, again.body) == (201, first.body)
        assert again.headers.get("idempotent-replayed") == "true"
        assert again.headers.get("content-type") == first.headers.get("content-type")
    assert demo_api.executed(ref) == 1
    [op] = [op for op in demo_api.ledger() if op["reference"] == ref]
    assert op["idempotency_key"] == key
    assert gateway.counter(f"{PREFIX}.replayed") >= 3
    assert "firebreak replay_guard replayed status=201 route=payouts" in gateway.logs()


def test_same_key_with_another_body_is_refused_422(demo_api, gateway):
    ref, other, key = new_ref(), new_ref(), new_key()
    assert post(gateway, "/v1/payouts", payout(ref), key).status == 201
    assert_refused(post(gateway, "/v1/payouts", payout(other), key), 422, "idempotency_key_mismatch")
    assert_refused(post(gateway, "/v1/payouts", payout(ref, amount=2), key), 422, "idempotency_key_mismatch")
    assert_refused(post(gateway, "/v1/payouts?x=1", payout(ref), key), 422, "idempotency_key_mismatch")
    assert demo_api.executed(ref) == 1 and demo_api.executed(other) == 0
    assert gateway.counter(f"{PREFIX}.rejected.idempotency_key_mismatch") >= 3


@pytest.mark.parametrize("value, code", [
    (None, "idempotency_key_missing"),
    ("bare-token", "idempotency_key_invalid"),
    ('""', "idempotency_key_invalid"),
    ('"a", "b"', "idempotency_key_invalid"),
    ("?1", "idempotency_key_invalid"),
    ('"' + "k" * 256 + '"', "idempotency_key_invalid"),
])
def test_bad_or_missing_keys_are_refused_400_and_never_forwarded(demo_api, gateway, value, code):
    ref = new_ref()
    assert_refused(post(gateway, "/v1/payouts", payout(ref), value), 400, code)
    assert demo_api.executed(ref) == 0
    assert f"code={code}" in gateway.logs()


def test_a_repeated_key_header_is_refused(demo_api, gateway):
    ref = new_ref()
    r = post(gateway, "/v1/payouts", payout(ref), new_key(), [("Idempotency-Key", new_key())])
    assert_refused(r, 400, "idempotency_key_duplicated")
    assert demo_api.executed(ref) == 0


def test_a_key_of_the_maximum_length_is_accepted(demo_api, gateway):
    ref = new_ref()
    assert post(gateway, "/v1/payouts", payout(ref), '"' + "k" * 250 + uuid.uuid4().hex[:5] + '"').status == 201
    assert demo_api.executed(ref) == 1


# ---- uncertain outcomes ----

def test_incident_2_upstream_503_after_commit_then_retries_are_not_forwarded(demo_api, gateway):
    ref, key = new_ref(), new_key()
    r = post(gateway, "/v1/payouts", payout(ref), key, [("x-demo-fault", "fail-after-commit")])
    assert r.status == 503
    assert demo_api.executed(ref) == 1, "the operation did execute"
    for _ in range(3):
        assert_refused(post(gateway, "/v1/payouts", payout(ref), key), 409, "outcome_unknown")
    assert demo_api.executed(ref) == 1
    assert gateway.counter(f"{PREFIX}.outcome_unknown_recorded") >= 1
    assert gateway.counter(f"{PREFIX}.rejected.outcome_unknown") >= 3
    assert "firebreak replay_guard outcome_unknown_recorded status=503" in gateway.logs()


def test_upstream_timeout_then_retry_is_not_forwarded(demo_api, envoy_factory):
    envoy = start(envoy_factory, route_timeout="1s")
    ref, key = new_ref(), new_key()
    r = post(envoy, "/v1/payouts", payout(ref), key, [("x-demo-delay-ms", "1800")])
    assert r.status == 504, r.body
    assert_refused(post(envoy, "/v1/payouts", payout(ref), key), 409, "outcome_unknown")
    # The money API executes the first request after its delay: the retry must not add another.
    wait_until(lambda: demo_api.executed(ref) == 1, "the delayed operation executes")
    assert_refused(post(envoy, "/v1/payouts", payout(ref), key), 409, "outcome_unknown")
    time.sleep(0.3)
    assert demo_api.executed(ref) == 1
    assert "outcome_unknown_recorded status=504 complete=true" in envoy.logs()


def test_a_client_that_disconnects_before_the_answer_leaves_the_key_outcome_unknown(demo_api, gateway):
    import socket
    ref, key = new_ref(), new_key()
    body = payout(ref)
    before = gateway.counter(f"{PREFIX}.outcome_unknown_recorded")
    forwarded = gateway.counter(f"{PREFIX}.forwarded")
    raw = (f"POST /v1/payouts HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
           f"idempotency-key: {key}\r\nx-demo-delay-ms: 1000\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body
    with socket.create_connection(("127.0.0.1", gateway.port)) as s:
        s.sendall(raw)
        wait_until(lambda: gateway.counter(f"{PREFIX}.forwarded") > forwarded, "forwarded")
    # The stream is reset with no answer: on_log records outcome_unknown.
    wait_until(lambda: gateway.counter(f"{PREFIX}.outcome_unknown_recorded") > before, "outcome recorded")
    assert "outcome_unknown_recorded status=0 complete=false" in gateway.logs()
    assert_refused(post(gateway, "/v1/payouts", body, key), 409, "outcome_unknown")
    # Whether the money API executed it depends on when the reset reached it; either way, not twice.
    time.sleep(1.2)
    assert_refused(post(gateway, "/v1/payouts", body, key), 409, "outcome_unknown")
    assert demo_api.executed(ref) <= 1


def test_a_route_safe_to_repeat_releases_the_key_on_uncertain_answers(demo_api, gateway):
    ref, key = new_ref(), new_key()
    body = json.dumps({"account": "acc-carol", "amount": 1, "reference": ref}).encode()
    assert post(gateway, "/v1/withdrawals", body, key, [("x-demo-fault", "fail-after-commit")]).status == 503
    again = post(gateway, "/v1/withdrawals", body, key)
    assert again.status == 201, again.body
    assert demo_api.executed(ref) == 2, "release means the operation is repeated: only for safe routes"
    assert gateway.counter(f"{PREFIX}.released") >= 1


def test_an_answer_that_proves_nothing_executed_frees_the_key(demo_api, gateway):
    ref, key = new_ref(), new_key()
    # 404 from the money API: unknown account, nothing executed; the corrected account later works.
    body = json.dumps({"account": "acc-nobody", "amount": 1, "reference": ref}).encode()
    r = post(gateway, "/v1/payouts", body, key)
    assert (r.status, r.error) == (404, "account_not_found")
    again = post(gateway, "/v1/payouts", body, key)
    assert (again.status, again.error) == (404, "account_not_found")
    assert "idempotent-replayed" not in again.headers, "forwarded again, not replayed"
    assert demo_api.executed(ref) == 0


# ---- duplicate collapse without a key ----

def test_incident_1_twenty_identical_posts_without_a_key_forward_one(demo_api, gateway):
    ref = new_ref()
    body = json.dumps({"from": "acc-alice", "to": "acc-carol", "amount": 1, "reference": ref}).encode()
    results = concurrently(20, lambda i: post(gateway, "/v1/transfers", body))
    assert demo_api.executed(ref) == 1
    assert sorted(r.status for r in results) == [201] + [409] * 19
    for r in results:
        if r.status == 409:
            assert_refused(r, 409, "duplicate_request")
    # A different body is not a duplicate.
    other = new_ref()
    body2 = json.dumps({"from": "acc-alice", "to": "acc-carol", "amount": 1, "reference": other}).encode()
    assert post(gateway, "/v1/transfers", body2).status == 201
    assert gateway.counter(f"{PREFIX}.rejected.duplicate_request") >= 19


def test_collapse_window_ends(demo_api, envoy_factory):
    routes = [{"name": "transfers", "match": {"methods": ["POST"], "path_prefix": "/v1/transfers"},
               "idempotency_key": "ignored", "collapse_window_ms": 1000}]
    envoy = start(envoy_factory, routes=routes)
    ref = new_ref()
    body = json.dumps({"from": "acc-alice", "to": "acc-carol", "amount": 1, "reference": ref}).encode()
    assert post(envoy, "/v1/transfers", body).status == 201
    assert_refused(post(envoy, "/v1/transfers", body), 409, "duplicate_request")
    time.sleep(1.2)
    assert post(envoy, "/v1/transfers", body).status == 201
    assert demo_api.executed(ref) == 2


# ---- TTL, in-flight timeout, full tables, stored-body bound ----

def test_ttl_edges(demo_api, envoy_factory):
    envoy = start(envoy_factory, ttl_seconds=3, in_flight_timeout_ms=1000)
    ref, key = new_ref(), new_key()
    assert post(envoy, "/v1/payouts", payout(ref), key).status == 201
    assert post(envoy, "/v1/payouts", payout(ref), key).headers.get("idempotent-replayed") == "true"
    time.sleep(3.2)
    after = post(envoy, "/v1/payouts", payout(ref), key)
    assert after.status == 201 and "idempotent-replayed" not in after.headers, "the key expired"
    assert demo_api.executed(ref) == 2


def test_an_in_flight_request_past_its_timeout_is_outcome_unknown_not_free(demo_api, envoy_factory):
    envoy = start(envoy_factory, ttl_seconds=30, in_flight_timeout_ms=500)
    ref, key = new_ref(), new_key()
    slow = []
    t = threading.Thread(target=lambda: slow.append(post(envoy, "/v1/payouts", payout(ref), key, [("x-demo-delay-ms", "3000")])))
    t.start()
    wait_until(lambda: envoy.counter(f"{PREFIX}.forwarded") >= 1, "first request forwarded")
    time.sleep(0.6)
    assert_refused(post(envoy, "/v1/payouts", payout(ref), key), 409, "outcome_unknown")
    assert envoy.counter(f"{PREFIX}.stale_in_flight") >= 1
    t.join(timeout=10)
    assert slow[0].status == 201
    # The slow owner's answer still lands: retries now get it.
    again = post(envoy, "/v1/payouts", payout(ref), key)
    assert (again.status, again.body) == (201, slow[0].body)
    assert again.headers.get("idempotent-replayed") == "true"
    assert demo_api.executed(ref) == 1


def test_one_caller_cannot_fill_the_table_its_quota_refuses_first_and_recovers_after_ttl(demo_api, envoy_factory):
    # A 1 x 2 table: the default quota (capacity / 8, at least 1) lets the anonymous callers of a
    # route claim one key per ttl, so they can never fill the table for others (before the
    # quotas, the second claim filled it and the third got 503 replay_store_full).
    envoy = start(envoy_factory, ttl_seconds=2, in_flight_timeout_ms=1000,
                  key_store={"buckets": 1, "slots_per_bucket": 2})
    refs = [new_ref() for _ in range(2)]
    keys = [new_key() for _ in range(2)]
    assert post(envoy, "/v1/payouts", payout(refs[0]), keys[0]).status == 201
    r = post(envoy, "/v1/payouts", payout(refs[1]), keys[1])
    assert_refused(r, 429, "tenant_quota_exceeded")
    assert demo_api.executed(refs[1]) == 0
    # Remembered keys are still answered (no quota needed).
    assert post(envoy, "/v1/payouts", payout(refs[0]), keys[0]).headers.get("idempotent-replayed") == "true"
    time.sleep(2.2)
    # The refused key was not recorded: it is claimed (once) when the window rolls.
    assert post(envoy, "/v1/payouts", payout(refs[1]), keys[1]).status == 201
    assert demo_api.executed(refs[1]) == 1
    assert envoy.counter(f"{PREFIX}.rejected.tenant_quota_exceeded") == 1
    assert "firebreak replay_guard reject status=429 code=tenant_quota_exceeded" in envoy.logs()


def test_a_response_larger_than_the_stored_bound_is_not_replayed_nor_repeated(demo_api, envoy_factory):
    envoy = start(envoy_factory, max_stored_body_bytes=16)
    ref, key = new_ref(), new_key()
    first = post(envoy, "/v1/payouts", payout(ref), key)
    assert first.status == 201 and len(first.body) > 16
    again = post(envoy, "/v1/payouts", payout(ref), key)
    assert_refused(again, 409, "response_not_stored")
    assert again.headers.get("x-firebreak-original-status") == "201"
    assert demo_api.executed(ref) == 1
    assert envoy.counter(f"{PREFIX}.completed_not_stored") == 1


# ---- with the request-signature filter: keys scoped to the verified principal ----

SECOND_SECRET = "c2Vjb25kLWRlbW8tY2xpZW50LXNlY3JldC1ub3QtZm9yLXByb2R1Y3Rpb24hIQ=="


def test_keys_are_scoped_to_the_verified_principal(demo_api, envoy_factory):
    sig = harness.signature_filter(keys=[{"id": harness.DEMO_KEY_ID, "secret_env": harness.DEMO_KEY_ENV},
                                         {"id": "second-client", "secret_base64": SECOND_SECRET}])
    routes = [{"name": "payouts", "match": {"methods": ["POST"], "path_prefix": "/v1/payouts"},
               "require_principal": True}]
    envoy = envoy_factory([harness.buffer_filter(), sig, guard_filter(routes=routes)])
    ref, key = new_ref(), new_key()
    body = payout(ref)
    headers = JSON + [("Idempotency-Key", key)]
    # Signed as demo-client, then retried (fresh signature and nonce each time).
    assert envoy.signed("POST", "/v1/payouts", body, headers=headers).status == 201
    again = envoy.signed("POST", "/v1/payouts", body, headers=headers)
    assert again.headers.get("idempotent-replayed") == "true"
    assert demo_api.executed(ref) == 1
    # The same key and body from another principal is another operation.
    sig2 = harness.sign("POST", envoy.url("/v1/payouts"), body, key_id="second-client", secret_b64=SECOND_SECRET)
    other = envoy.request("POST", "/v1/payouts", headers + sig2, body)
    assert other.status == 201 and "idempotent-replayed" not in other.headers
    assert demo_api.executed(ref) == 2
    assert {op["principal"] for op in demo_api.ledger() if op["reference"] == ref} == {"demo-client", "second-client"}
    # Accepted requests are logged only at debug level; the retry's "replayed" line carries the
    # verified principal in its context.
    replayed = [line for line in envoy.logs().splitlines() if "firebreak replay_guard replayed" in line]
    assert any(f"principal={harness.DEMO_KEY_ID}" in line for line in replayed), replayed
    assert "firebreak replay_guard forwarded" not in envoy.logs()


def test_a_route_requiring_a_principal_refuses_unsigned_requests(demo_api, envoy_factory):
    routes = [{"name": "payouts", "match": {"methods": ["POST"], "path_prefix": "/v1/payouts"},
               "require_principal": True}]
    envoy = start(envoy_factory, routes=routes)
    ref = new_ref()
    assert_refused(post(envoy, "/v1/payouts", payout(ref), new_key()), 401, "principal_required")
    assert demo_api.executed(ref) == 0


def test_unprotected_routes_pass(demo_api, gateway):
    r = gateway.request("GET", "/v1/accounts/acc-bob/balance")
    assert r.status == 200
    assert gateway.counter(f"{PREFIX}.passed_unprotected") >= 1


# ---- the recommended demo configuration (README "Envoy snippet") ----

DEMO_CONFIG = {
    "routes": [
        {"name": "payouts", "match": {"methods": ["POST"], "path_exact": "/v1/payouts"},
         "idempotency_key": "required", "require_principal": True},
        {"name": "withdrawals", "match": {"methods": ["POST"], "path_exact": "/v1/withdrawals"},
         "idempotency_key": "optional", "collapse_window_ms": 10000, "require_principal": True},
        {"name": "transfers", "match": {"methods": ["POST"], "path_exact": "/v1/transfers"},
         "idempotency_key": "optional", "collapse_window_ms": 10000, "require_principal": True},
    ],
    "ttl_seconds": 86400,
    "in_flight_timeout_ms": 30000,
    "max_stored_body_bytes": 4096,
    "stored_headers": ["content-type", "location"],
    "key_store": {"buckets": 1024, "slots_per_bucket": 8},
    "collapse_store": {"buckets": 256, "slots_per_bucket": 8},
}


def test_demo_chain_an_idempotent_payout_retried_three_times_executes_once(demo_api, envoy_factory):
    sig = harness.signature_filter(routes=[{"methods": ["POST", "PUT", "PATCH", "DELETE"], "path_prefix": "/v1/"}],
                                   covered_headers_when_present=["idempotency-key"])
    envoy = envoy_factory([harness.buffer_filter(), sig, harness.wasm_filter("replay_guard", DEMO_CONFIG)])
    ref, key = new_ref(), new_key()
    body = payout(ref)
    cover = ["-H", f"idempotency-key: {key}", "--cover", "idempotency-key"]
    headers = JSON + [("Idempotency-Key", key)]
    answers = [envoy.signed("POST", "/v1/payouts", body, headers=headers, sign_extra=cover) for _ in range(4)]
    assert [a.status for a in answers] == [201] * 4, [a.body for a in answers]
    assert [a.headers.get("idempotent-replayed") for a in answers] == [None, "true", "true", "true"]
    assert len({a.body for a in answers}) == 1
    assert demo_api.executed(ref) == 1
    # An unsigned payout never reaches replay-guard's store; a keyless one is refused.
    assert envoy.request("POST", "/v1/payouts", headers, body).status == 401
    assert_refused(envoy.signed("POST", "/v1/payouts", payout(new_ref()), headers=JSON), 400, "idempotency_key_missing")
    # The scripted flood of incident 1 (keyless identical withdrawals): one executes.
    wref = new_ref()
    wbody = json.dumps({"account": "acc-alice", "amount": 1, "reference": wref}).encode()
    results = concurrently(20, lambda i: envoy.signed("POST", "/v1/withdrawals", wbody, headers=JSON))
    assert sorted(r.status for r in results) == [201] + [409] * 19
    assert demo_api.executed(wref) == 1


# ---- operators clear outcome_unknown keys ----

OPS_SECRET = "b3BzLWFkbWluLWRlbW8tc2VjcmV0LW5vdC1mb3ItcHJvZHVjdGlvbi0wMTIzNDU2Nzg="


def test_an_operator_clears_an_outcome_unknown_key_after_reconciling(demo_api, envoy_factory):
    sig = harness.signature_filter(keys=[{"id": harness.DEMO_KEY_ID, "secret_env": harness.DEMO_KEY_ENV},
                                         {"id": "ops-admin", "secret_base64": OPS_SECRET}])
    routes = [{"name": "payouts", "match": {"methods": ["POST"], "path_prefix": "/v1/payouts"},
               "require_principal": True}]
    envoy = envoy_factory([harness.buffer_filter(), sig, guard_filter(
        routes=routes, operator_clear={"path": "/v1/ops/replay-guard/clear", "principals": ["ops-admin"]})])
    ref, key = new_ref(), new_key()
    body = payout(ref)
    headers = JSON + [("Idempotency-Key", key)]
    assert envoy.signed("POST", "/v1/payouts", body, headers=headers + [("x-demo-fault", "fail-after-commit")]).status == 503
    assert_refused(envoy.signed("POST", "/v1/payouts", body, headers=headers), 409, "outcome_unknown")

    clear_body = json.dumps({"route": "payouts", "principal": harness.DEMO_KEY_ID,
                             "idempotency_key": key.strip('"')}).encode()

    def clear(as_key, secret, payload=clear_body):
        sig_headers = harness.sign("POST", envoy.url("/v1/ops/replay-guard/clear"), payload, key_id=as_key, secret_b64=secret)
        return envoy.request("POST", "/v1/ops/replay-guard/clear", JSON + sig_headers, payload)

    # The client itself may not clear its key.
    assert_refused(envoy.signed("POST", "/v1/ops/replay-guard/clear", clear_body, headers=JSON), 403, "operator_forbidden")
    # Unknown key, bad request.
    other = json.dumps({"route": "payouts", "principal": harness.DEMO_KEY_ID, "idempotency_key": "nope"}).encode()
    assert_refused(clear("ops-admin", OPS_SECRET, other), 404, "key_not_found")
    assert_refused(clear("ops-admin", OPS_SECRET, b'{"route":"payouts"}'), 400, "clear_request_invalid")
    # The operator checked the ledger: the payout did execute. Here they clear anyway to show the effect.
    assert demo_api.executed(ref) == 1
    r = clear("ops-admin", OPS_SECRET)
    assert r.status == 200 and r.json == {"cleared": True, "stale_in_flight": False}, r.body
    assert demo_api.executed(ref) == 1, "the clear request itself never reaches the API"
    again = envoy.signed("POST", "/v1/payouts", body, headers=headers)
    assert again.status == 201 and "idempotent-replayed" not in again.headers
    assert demo_api.executed(ref) == 2
    # A completed key cannot be cleared.
    assert_refused(clear("ops-admin", OPS_SECRET), 409, "key_not_clearable")
    assert envoy.counter(f"{PREFIX}.operator_cleared") == 1
    assert "operator_cleared stale_in_flight=false operator_clear method=POST operator=ops-admin route=payouts" in envoy.logs()


# ---- configuration ----

@pytest.mark.parametrize("overrides, field", [
    ({"routes": []}, "routes"),
    ({"ttl_seconds": 0}, "ttl_seconds"),
    ({"ttl_seconds": 10, "in_flight_timeout_ms": 20000}, "in_flight_timeout_ms"),
    ({"max_key_length": 0}, "max_key_length"),
    ({"stored_headers": ["content-length"]}, "stored_headers[0]"),
    ({"not_executed_statuses": [500]}, "not_executed_statuses[0]"),
    ({"key_store": {"buckets": 0, "slots_per_bucket": 8}}, "key_store.buckets"),
    ({"routes": [{"name": "p", "match": {"path_prefix": "/v1/"}, "on_uncertain": "retry"}]}, "routes[0].on_uncertain"),
    ({"routes": [{"name": "p", "match": {"path_prefix": "/v1/"}, "idempotency_key": "ignored"}]},
     "routes[0].collapse_window_ms"),
    ({"routes": [{"name": "bad name", "match": {"path_prefix": "/v1/"}}]}, "routes[0].name"),
    ({"operator_clear": {"path": "/ops/clear", "principals": []}}, "operator_clear.principals"),
])
def test_invalid_configuration_is_refused_with_the_field_named(demo_api, envoy_factory, overrides, field):
    envoy = envoy_factory([harness.buffer_filter(), guard_filter(**overrides)], expect_failure=True)
    assert envoy.proc.returncode != 0
    assert f"firebreak replay_guard config_error field={field} " in envoy.logs()


def test_unknown_fields_are_refused(demo_api, envoy_factory):
    envoy = envoy_factory([harness.buffer_filter(), guard_filter(ttl=5)], expect_failure=True)
    assert "firebreak replay_guard config_error" in envoy.logs() and "ttl" in envoy.logs()
