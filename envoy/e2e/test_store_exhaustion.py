"""Issue 13, items 5 and 6, through real Envoy: no tenant can exhaust a shared store (per-tenant
quotas, secret bucket placement), and a configuration reload never makes a live record claimable
again (a reload that changes a table's geometry is refused; one that keeps it keeps the records)."""

import hashlib
import json
import struct
import uuid

import pytest

import harness

JSON = [("content-type", "application/json")]
BOTH_KEYS = [{"id": harness.DEMO_KEY_ID, "secret_env": harness.DEMO_KEY_ENV},
             {"id": harness.SECOND_KEY_ID, "secret_env": harness.SECOND_KEY_ENV}]
ENV_KEYS = [harness.DEMO_KEY_ENV, harness.SECOND_KEY_ENV]
SIG = "firebreak.request_signature"
GUARD = "firebreak.replay_guard"


def signature(**overrides) -> dict:
    config = harness.signature_config(keys=BOTH_KEYS, covered_headers_when_present=["idempotency-key"])
    config.update(overrides)
    return harness.wasm_filter("request_signature", config, host_env_keys=ENV_KEYS)


def guard(**overrides) -> dict:
    config = {"routes": [{"name": "payouts", "match": {"methods": ["POST"], "path_exact": "/v1/payouts"},
                          "require_principal": True}],
              "ttl_seconds": 3600, "in_flight_timeout_ms": 30000}
    config.update(overrides)
    return harness.wasm_filter("replay_guard", config)


def transfer(ref: str) -> bytes:
    return json.dumps({"from": "acc-alice", "to": "acc-bob", "amount": 1, "reference": ref}).encode()


def payout(ref: str) -> bytes:
    return json.dumps({"account": "acc-bob", "amount": 7, "reference": ref}).encode()


def new_ref() -> str:
    return f"exh-{uuid.uuid4().hex[:10]}"


def signed(envoy, path: str, body: bytes, key_id=harness.DEMO_KEY_ID, nonce=None, idem=None):
    """Signature headers (and the covered Idempotency-Key) for one request."""
    secret = harness.DEMO_SECRET_B64 if key_id == harness.DEMO_KEY_ID else harness.SECOND_SECRET_B64
    extra = ["--nonce", nonce] if nonce else []
    headers = list(JSON)
    if idem:
        extra += ["-H", f"idempotency-key: {idem}", "--cover", "idempotency-key"]
        headers.append(("idempotency-key", idem))
    return headers + harness.sign("POST", envoy.url(path), body, key_id=key_id, secret_b64=secret, extra=extra)


def unkeyed_bucket(key_id: str, nonce: str, buckets: int) -> int:
    """Where the nonce table put a nonce before placement was keyed by a secret: the first four
    bytes of KeyHash::of(["nonce", key_id, nonce]) (SHA-256 of length-prefixed parts) mod buckets.
    A client could compute it, and so aim every record it sends at one bucket."""
    h = hashlib.sha256()
    for part in (b"nonce", key_id.encode(), nonce.encode()):
        h.update(struct.pack(">Q", len(part)) + part)
    return struct.unpack(">I", h.digest()[:4])[0] % buckets


def aimed_nonces(key_id: str, buckets: int, target: int, n: int) -> list[str]:
    out, i = [], 0
    while len(out) < n:
        nonce = f"aim-{uuid.uuid4().hex[:6]}-{i}"
        if unkeyed_bucket(key_id, nonce, buckets) == target:
            out.append(nonce)
        i += 1
    return out


def test_one_key_id_flooding_fresh_nonces_cannot_fail_another_and_cannot_aim(demo_api, envoy_factory):
    # 64 buckets x 4 slots; each key id may record 16 nonces per window. The attacker's nonces are
    # all chosen to land in one bucket under the old (unkeyed) placement, and so are the victim's:
    # with the old placement the attacker filled that bucket with 4 and every later nonce aimed
    # there (the victim's included) got 503 nonce_store_full.
    envoy = envoy_factory([signature(nonce_store={"buckets": 64, "slots_per_bucket": 4, "quota_per_key_id": 16})])
    attacker = aimed_nonces(harness.DEMO_KEY_ID, 64, 0, 24)
    statuses = []
    for nonce in attacker:
        ref = new_ref()
        r = envoy.request("POST", "/v1/transfers", signed(envoy, "/v1/transfers", transfer(ref), nonce=nonce),
                          transfer(ref))
        statuses.append((r.status, r.error))
    # Placement is secret: the aimed nonces spread over the table instead of filling one bucket
    # (16 accepted, where the unkeyed placement let 4 in); then the key id's quota stops it.
    assert statuses[:16] == [(201, None)] * 16, statuses
    assert statuses[16:] == [(429, "tenant_quota_exceeded")] * 8, statuses
    # The victim, its nonces aimed at the same old bucket, is unaffected.
    for nonce in aimed_nonces(harness.SECOND_KEY_ID, 64, 0, 4):
        ref = new_ref()
        r = envoy.request("POST", "/v1/transfers",
                          signed(envoy, "/v1/transfers", transfer(ref), key_id=harness.SECOND_KEY_ID, nonce=nonce),
                          transfer(ref))
        assert r.status == 201, (r.status, r.body)
        assert demo_api.executed(ref) == 1
    assert envoy.counter(f"{SIG}.rejected.tenant_quota_exceeded") == 8
    assert envoy.counter(f"{SIG}.rejected.nonce_store_full") == 0
    assert "firebreak request_signature reject status=429 code=tenant_quota_exceeded" in envoy.logs()


def test_a_refused_request_consumes_no_nonce(demo_api, envoy_factory):
    # Tiny table (4 x 2, default quota 1 per key id): the second fresh nonce is refused by the
    # quota, and was not recorded: signed again (same nonce) by another key id it is another
    # nonce, and under the same key id it is still refused by the quota, not as a replay.
    envoy = envoy_factory([signature(nonce_store={"buckets": 4, "slots_per_bucket": 2})])
    ref = new_ref()
    assert envoy.request("POST", "/v1/transfers", signed(envoy, "/v1/transfers", transfer(ref)), transfer(ref)).status == 201
    ref = new_ref()
    r = envoy.request("POST", "/v1/transfers", signed(envoy, "/v1/transfers", transfer(ref), nonce="kept"), transfer(ref))
    assert (r.status, r.error) == (429, "tenant_quota_exceeded")
    r = envoy.request("POST", "/v1/transfers", signed(envoy, "/v1/transfers", transfer(ref), nonce="kept"), transfer(ref))
    assert (r.status, r.error) == (429, "tenant_quota_exceeded"), "not nonce_replayed: the nonce was not recorded"
    assert demo_api.executed(ref) == 0
    # The other key id (its own quota) is unaffected by the table's tiny size.
    r = envoy.request("POST", "/v1/transfers",
                      signed(envoy, "/v1/transfers", transfer(ref), key_id=harness.SECOND_KEY_ID, nonce="kept"),
                      transfer(ref))
    assert r.status == 201 and demo_api.executed(ref) == 1


def test_one_principal_flooding_fresh_idempotency_keys_cannot_fail_another(demo_api, envoy_factory):
    # 8 x 4 key table: each principal may claim 4 keys per ttl (default capacity / 8).
    envoy = envoy_factory([harness.buffer_filter(), signature(), guard(key_store={"buckets": 8, "slots_per_bucket": 4})])
    results = []
    refs = [new_ref() for _ in range(10)]
    for ref in refs:
        r = envoy.request("POST", "/v1/payouts", signed(envoy, "/v1/payouts", payout(ref), idem=f'"{uuid.uuid4()}"'),
                          payout(ref))
        results.append((r.status, r.error))
    assert results == [(201, None)] * 4 + [(429, "tenant_quota_exceeded")] * 6, results
    assert [demo_api.executed(ref) for ref in refs] == [1] * 4 + [0] * 6
    for _ in range(2):
        ref = new_ref()
        r = envoy.request("POST", "/v1/payouts",
                          signed(envoy, "/v1/payouts", payout(ref), key_id=harness.SECOND_KEY_ID, idem=f'"{uuid.uuid4()}"'),
                          payout(ref))
        assert r.status == 201, (r.status, r.body)
        assert demo_api.executed(ref) == 1
    assert envoy.counter(f"{GUARD}.rejected.tenant_quota_exceeded") == 6
    assert envoy.counter(f"{GUARD}.rejected.replay_store_full") == 0


@pytest.mark.parametrize("layout", ["modules", "chain"])
def test_a_reload_that_changes_a_table_geometry_is_refused_while_records_are_live(demo_api, envoy_factory, layout):
    nonce_store = {"buckets": 64, "slots_per_bucket": 4}
    key_store = {"buckets": 64, "slots_per_bucket": 4}
    field_prefix = {"modules": ("", ""), "chain": ("filters[0].request_signature.", "filters[1].replay_guard.")}[layout]

    def filters(nonce=nonce_store, keys=key_store, **sig):
        sig_config = harness.signature_config(keys=BOTH_KEYS, covered_headers_when_present=["idempotency-key"],
                                              nonce_store=nonce, **sig)
        guard_config = {"routes": [{"name": "payouts", "match": {"methods": ["POST"], "path_exact": "/v1/payouts"},
                                    "require_principal": True}],
                        "ttl_seconds": 3600, "in_flight_timeout_ms": 30000, "key_store": keys}
        if layout == "chain":
            return [harness.buffer_filter(),
                    harness.chain_filter([{"request_signature": sig_config}, {"replay_guard": guard_config}])]
        return [harness.buffer_filter(),
                harness.wasm_filter("request_signature", sig_config, host_env_keys=ENV_KEYS),
                harness.wasm_filter("replay_guard", guard_config)]

    envoy = envoy_factory(filters(), lds=True)
    ref, idem = new_ref(), f'"{uuid.uuid4()}"'
    captured = signed(envoy, "/v1/payouts", payout(ref), idem=idem)
    first = envoy.request("POST", "/v1/payouts", captured, payout(ref))
    assert first.status == 201, first.body

    def replays_refused():
        # The captured signed request: its nonce is still recorded.
        r = envoy.request("POST", "/v1/payouts", captured, payout(ref))
        assert (r.status, r.error) == (409, "nonce_replayed"), (r.status, r.body)
        # Freshly signed, same Idempotency-Key: the completed payout is replayed, not repeated.
        r = envoy.request("POST", "/v1/payouts", signed(envoy, "/v1/payouts", payout(ref), idem=idem), payout(ref))
        assert r.status == 201 and r.headers.get("idempotent-replayed") == "true", (r.status, r.headers, r.body)
        assert demo_api.executed(ref) == 1

    served_since = envoy.listener_updated_at()
    for changed, field in [
        (filters(nonce={"buckets": 128, "slots_per_bucket": 4}), field_prefix[0] + "nonce_store.buckets"),
        (filters(keys={"buckets": 64, "slots_per_bucket": 8}), field_prefix[1] + "key_store.slots_per_bucket"),
    ]:
        assert envoy.reload_listener(changed) is False, f"a reload changing {field} was accepted"
        assert f"config_error field={field} " in envoy.logs()
        assert "claimable again" in envoy.logs()
        # The old listener keeps serving, with its records.
        assert envoy.listener_updated_at() == served_since
        replays_refused()

    # The same geometry (another setting changed) is accepted, and the records survive it.
    assert envoy.reload_listener(filters(max_age_seconds=301)) is True
    assert envoy.listener_updated_at() != served_since
    replays_refused()
    ref2 = new_ref()
    r = envoy.request("POST", "/v1/payouts", signed(envoy, "/v1/payouts", payout(ref2), idem=f'"{uuid.uuid4()}"'), payout(ref2))
    assert r.status == 201 and demo_api.executed(ref2) == 1


def test_on_redis_a_key_ids_nonce_quota_holds_across_instances_and_every_key_expires(demo_api, envoy_factory):
    bridge = harness.RedisBridge()
    try:
        state = harness.redis_state(timeout_ms=2000)
        filters = [signature(state=state, nonce_store={"buckets": 64, "slots_per_bucket": 4, "quota_per_key_id": 3})]
        a, b = (envoy_factory(filters, extra_clusters=[bridge.cluster()]) for _ in range(2))
        host = "money.example"

        def send(envoy, key_id=harness.DEMO_KEY_ID):
            body = transfer(new_ref())
            secret = harness.DEMO_SECRET_B64 if key_id == harness.DEMO_KEY_ID else harness.SECOND_SECRET_B64
            h = JSON + harness.sign("POST", f"http://{host}/v1/transfers", body, key_id=key_id, secret_b64=secret)
            return envoy.request("POST", "/v1/transfers", h, body, host=host), h, body

        sent = [send((a, b)[i % 2]) for i in range(5)]
        results = [r for r, _, _ in sent]
        results_headers = [h for _, h, _ in sent]
        results_bodies = [body for _, _, body in sent]
        assert [(r.status, r.error) for r in results] == [(201, None)] * 3 + [(429, "tenant_quota_exceeded")] * 2
        # Another key id is unaffected; its replay is still a replay, on the other instance.
        r, captured, body = send(b, key_id=harness.SECOND_KEY_ID)
        assert r.status == 201, r.body
        r = a.request("POST", "/v1/transfers", captured, body, host=host)
        assert (r.status, r.error) == (409, "nonce_replayed"), r.body
        # The demo key id's replay too: refused as a replay, not as over quota.
        r = b.request("POST", "/v1/transfers", results_headers[0], results_bodies[0], host=host)
        assert (r.status, r.error) == (409, "nonce_replayed"), r.body
        keys = subprocess_keys(bridge, f"{state['key_prefix']}:sig:*")
        assert any(":sig:quota:" in k for k in keys) and any(":sig:nonce:" in k for k in keys), keys
        for key in keys:
            ttl = bridge.command("PTTL", key)["PTTL"]
            assert 0 < ttl <= 400_000, (key, ttl)
    finally:
        bridge.stop()


def subprocess_keys(bridge, pattern: str) -> list[str]:
    import subprocess
    out = subprocess.run(["redis-cli", "-p", str(bridge.redis_port), "--scan", "--pattern", pattern],
                         check=True, capture_output=True, text=True, timeout=10).stdout
    return [line for line in out.splitlines() if line]
