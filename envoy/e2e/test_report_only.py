"""Report-only mode through real Envoy, for every filter, on the wasm modules and on the native
module (libfirebreak.so): a filter configured with `"mode": "report_only"` decides as ever, counts
each would-be refusal (`<prefix>.would_reject.<code>`), logs one `would_reject` line, and lets the
request reach the money API unchanged; switching the same listener to `"mode": "enforce"` (a real
configuration reload, LDS) refuses the same request."""

import hashlib
import json
import uuid

import pytest

import harness

JSON = [("content-type", "application/json")]
RUNTIMES = ["wasm", "native"]


def filter_entry(runtime: str, name: str, config: dict, **wasm_kw) -> dict:
    if runtime == "native":
        return harness.native_filter(name, config)
    return harness.wasm_filter(name, config, **wasm_kw)


def start(envoy_factory, runtime: str, name: str, config: dict, **wasm_kw):
    """Envoy with the buffer filter then `name` in report-only mode, on a reloadable listener."""
    filters = [harness.buffer_filter(), filter_entry(runtime, name, dict(config, mode="report_only"), **wasm_kw)]
    return envoy_factory(filters, lds=True)


def enforce(envoy, runtime: str, name: str, config: dict, **wasm_kw):
    """The same listener, the same filter, switched to enforce mode."""
    filters = [harness.buffer_filter(), filter_entry(runtime, name, dict(config, mode="enforce"), **wasm_kw)]
    assert envoy.reload_listener(filters)


def would_reject_lines(envoy, plugin: str, code: str) -> int:
    return sum(1 for line in envoy.logs().splitlines()
               if f"firebreak {plugin} would_reject " in line and f" code={code} " in line)


def new_ref() -> str:
    return f"ro-{uuid.uuid4().hex[:12]}"


def transfer(reference: str, amount: int = 1) -> bytes:
    return json.dumps({"from": "acc-alice", "to": "acc-bob", "amount": amount, "reference": reference}).encode()


def payout(reference: str) -> bytes:
    return json.dumps({"account": "acc-bob", "amount": 1, "reference": reference}).encode()


def operations(demo_api, reference: str) -> list[dict]:
    return [op for op in demo_api.ledger() if op.get("reference") == reference]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_request_signature_reports_then_refuses_after_the_switch(envoy_factory, demo_api, runtime):
    config = harness.signature_config()
    kw = {"host_env_keys": [harness.DEMO_KEY_ENV]}
    envoy = start(envoy_factory, runtime, "request_signature", config, **kw)
    # Unsigned, with a forged principal: it reaches the API without any principal.
    ref = new_ref()
    r = envoy.request("POST", "/v1/transfers", JSON + [("x-firebreak-principal", "admin")], transfer(ref))
    assert r.status == 201, r.body
    [op] = operations(demo_api, ref)
    assert op["principal"] is None
    # A replayed signature: the second copy reaches the API, without the principal.
    ref2 = new_ref()
    body = transfer(ref2)
    signature = harness.sign("POST", envoy.url("/v1/transfers"), body)
    assert envoy.request("POST", "/v1/transfers", JSON + signature, body).status == 201
    assert envoy.request("POST", "/v1/transfers", JSON + signature, body).status == 201
    ops = operations(demo_api, ref2)
    assert [op["principal"] for op in ops] == [harness.DEMO_KEY_ID, None]
    assert envoy.counter("firebreak.request_signature.would_reject.signature_missing") == 1
    assert envoy.counter("firebreak.request_signature.would_reject.nonce_replayed") == 1
    assert envoy.counter("firebreak.request_signature.rejected.signature_missing") == 0
    assert would_reject_lines(envoy, "request_signature", "signature_missing") == 1
    assert would_reject_lines(envoy, "request_signature", "nonce_replayed") == 1

    enforce(envoy, runtime, "request_signature", config, **kw)
    ref3 = new_ref()
    r = envoy.request("POST", "/v1/transfers", JSON, transfer(ref3))
    assert (r.status, r.error) == (401, "signature_missing")
    assert operations(demo_api, ref3) == []


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_replay_guard_forwards_and_reports_duplicates_then_refuses_after_the_switch(envoy_factory, demo_api, runtime):
    config = {
        "routes": [{"name": "payouts", "match": {"methods": ["POST"], "path_prefix": "/v1/payouts"}}],
        "ttl_seconds": 3600,
        "in_flight_timeout_ms": 30000,
    }
    envoy = start(envoy_factory, runtime, "replay_guard", config)
    key = [("idempotency-key", f'"{uuid.uuid4()}"')]
    ref = new_ref()
    first = envoy.request("POST", "/v1/payouts", JSON + key, payout(ref))
    assert first.status == 201
    # The retry executes again (report-only never replays), counted as a would-be replay.
    retry = envoy.request("POST", "/v1/payouts", JSON + key, payout(ref))
    assert retry.status == 201
    assert "idempotent-replayed" not in retry.headers
    assert retry.json["id"] != first.json["id"]
    # Another body with the key: executed, counted as a would-be 422.
    other_ref = new_ref()
    assert envoy.request("POST", "/v1/payouts", JSON + key, payout(other_ref)).status == 201
    assert len(operations(demo_api, ref)) == 2 and len(operations(demo_api, other_ref)) == 1
    assert envoy.counter("firebreak.replay_guard.would_replay") == 1
    assert envoy.counter("firebreak.replay_guard.would_reject.idempotency_key_mismatch") == 1
    assert envoy.counter("firebreak.replay_guard.replayed") == 0
    assert envoy.logs().count("firebreak replay_guard would_replay status=201 route=payouts") == 1
    assert would_reject_lines(envoy, "replay_guard", "idempotency_key_mismatch") == 1

    # Enforce (the record of the key's first request was kept: shared data outlives the reload).
    enforce(envoy, runtime, "replay_guard", config)
    replayed = envoy.request("POST", "/v1/payouts", JSON + key, payout(ref))
    assert replayed.status == 201
    assert replayed.headers.get("idempotent-replayed") == "true"
    assert replayed.json["id"] == first.json["id"]
    refused = envoy.request("POST", "/v1/payouts", JSON + key, payout(other_ref))
    assert (refused.status, refused.error) == (422, "idempotency_key_mismatch")
    assert len(operations(demo_api, ref)) == 2 and len(operations(demo_api, other_ref)) == 1


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_rate_limit_reports_then_refuses_after_the_switch(envoy_factory, runtime):
    rule = {"name": "per-ip", "routes": [{"methods": ["GET"], "path_prefix": "/v1/accounts/"}], "key": "ip",
            "requests": 1, "per_seconds": 3600, "burst": 2}
    config = {"name": "trial", "rules": [rule]}
    envoy = start(envoy_factory, runtime, "rate_limit", config)
    balance = "/v1/accounts/acc-alice/balance"
    assert [envoy.request("GET", balance).status for _ in range(5)] == [200] * 5
    assert envoy.counter("firebreak.rate_limit.trial.rule.per-ip.would_limit") == 3
    assert envoy.counter("firebreak.rate_limit.trial.would_reject.rate_limited") == 3
    assert envoy.counter("firebreak.rate_limit.trial.rejected.rate_limited") == 0
    assert envoy.logs().count("firebreak rate_limit would_reject status=429 code=rate_limited instance=trial") == 3

    # Enforce: the budget the report-only requests spent is the same table; refused at once.
    enforce(envoy, runtime, "rate_limit", config)
    r = envoy.request("GET", balance)
    assert (r.status, r.error) == (429, "rate_limited")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_rate_limit_rule_mode_overrides_the_instance(envoy_factory, runtime):
    trial = {"name": "trial", "mode": "report_only", "routes": [{"methods": ["GET"], "path_prefix": "/v1/accounts/"}],
             "key": "ip", "requests": 1, "per_seconds": 3600, "burst": 1}
    envoy = envoy_factory([filter_entry(runtime, "rate_limit", {"name": "rules", "rules": [trial]})])
    assert [envoy.request("GET", "/v1/accounts/acc-alice/balance").status for _ in range(3)] == [200] * 3
    assert envoy.counter("firebreak.rate_limit.rules.rule.trial.would_limit") == 2
    assert envoy.counter("firebreak.rate_limit.rules.would_reject.rate_limited") == 2


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_env_guard_reports_then_refuses_after_the_switch(envoy_factory, demo_api, runtime):
    prod_key = "FAKE-apns-prod-key-firebreak-demo-0001"
    config = {
        "environment": "uat",
        "production": False,
        "protected_credentials": [{"label": "apns-prod", "sha256": hashlib.sha256(prod_key.encode()).hexdigest(),
                                   "length": len(prod_key)}],
        "routes": [{"path_prefix": "/v1/"}],
        "max_body_bytes": 65536,
    }
    envoy = start(envoy_factory, runtime, "env_guard", config)
    ref = new_ref()
    body = transfer(ref)
    headers = JSON + [("x-push-key", prod_key)]
    r = envoy.request("POST", "/v1/transfers", headers, body)
    assert r.status == 201, r.body
    assert len(operations(demo_api, ref)) == 1
    code = "production_credential_in_non_production"
    assert envoy.counter(f"firebreak.env_guard.would_reject.{code}") == 1
    assert envoy.counter("firebreak.env_guard.detected.apns-prod.header") == 1
    assert envoy.counter(f"firebreak.env_guard.rejected.{code}") == 0
    assert would_reject_lines(envoy, "env_guard", code) == 1
    assert prod_key not in envoy.logs()

    enforce(envoy, runtime, "env_guard", config)
    ref2 = new_ref()
    body = transfer(ref2)
    r = envoy.request("POST", "/v1/transfers", headers, body)
    assert (r.status, r.error) == (403, code)
    assert operations(demo_api, ref2) == []
