"""The demo chain exactly as `bash scripts/demo.sh` runs it (envoy/demo.yaml, only its ports moved):
each incident's attack is stopped, and legitimate traffic goes through."""

import json
import threading
import uuid

import pytest
import yaml

import harness

JSON = [("content-type", "application/json")]


def separate_modules(config: dict) -> dict:
    """The demo bootstrap with its one-module chain split into one wasm filter per section, each
    running that filter's own module with the section as its configuration."""
    http_filters = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
    (index, chain), = [(i, f) for i, f in enumerate(http_filters) if f["name"] == "envoy.filters.http.wasm"]
    wasm = chain["typed_config"]["config"]
    sections = json.loads(wasm["configuration"]["value"])["filters"]
    host_env_keys = wasm["vm_config"]["environment_variables"]["host_env_keys"]
    split = []
    for section in sections:
        (filter_name, filter_config), = section.items()
        root_id = f"{filter_name}_{filter_config['name']}" if filter_name == "rate_limit" else filter_name
        split.append(harness.wasm_filter(filter_name, filter_config, host_env_keys=host_env_keys, root_id=root_id))
    http_filters[index:index + 1] = split
    return config


@pytest.fixture(params=["one module", "separate modules", "native module"])
def demo(request, demo_api):
    """A fresh demo gateway per test: budgets and idempotency records start empty. Every scenario
    runs on the demo's one-module chain, on the same chain as separate modules, and on the same
    chain in the native module (libfirebreak.so)."""
    config = yaml.safe_load((harness.ROOT / "envoy" / "demo.yaml").read_text())
    if request.param == "separate modules":
        config = separate_modules(config)
    if request.param == "native module":
        config = harness.native_bootstrap(config)
    envoy = harness.Envoy([], demo_api.port, bootstrap_config=config)
    yield envoy
    envoy.stop()


def ref():
    return f"demo-{uuid.uuid4().hex[:10]}"


def sign(demo, path, body, key_id=harness.DEMO_KEY_ID, secret=harness.DEMO_SECRET_B64, extra=None):
    return harness.sign("POST", demo.url(path), body, key_id=key_id, secret_b64=secret, extra=extra)


def test_every_filter_starts(demo):
    logs = demo.logs()
    for plugin in ("request_signature", "replay_guard", "rate_limit", "env_guard"):
        assert f"firebreak {plugin} configured" in logs, plugin


def test_a_signed_transfer_executes_and_an_unsigned_one_does_not(demo, demo_api):
    r1 = ref()
    body = json.dumps({"from": "acc-alice", "to": "acc-bob", "amount": 3, "reference": r1}).encode()
    ok = demo.request("POST", "/v1/transfers", JSON + sign(demo, "/v1/transfers", body), body)
    assert ok.status == 201, ok.body
    r2 = ref()
    body = json.dumps({"from": "acc-alice", "to": "acc-bob", "amount": 3, "reference": r2}).encode()
    refused = demo.request("POST", "/v1/transfers", JSON, body)
    assert (refused.status, refused.error) == (401, "signature_missing")
    assert (demo_api.executed(r1), demo_api.executed(r2)) == (1, 0)


def test_an_idempotent_payout_retried_three_times_executes_once(demo, demo_api):
    r = ref()
    key = uuid.uuid4().hex
    body = json.dumps({"account": "acc-carol", "amount": 50, "reference": r}).encode()
    answers = []
    for _ in range(4):  # the call and three retries, each freshly signed (new nonce)
        headers = JSON + [("idempotency-key", f'"{key}"')]
        sig = sign(demo, "/v1/payouts", body, extra=["-H", f'idempotency-key: "{key}"', "--cover", "idempotency-key"])
        answers.append(demo.request("POST", "/v1/payouts", headers + sig, body))
    assert answers[0].status == 201, answers[0].body
    for retry in answers[1:]:
        assert retry.status == 201 and retry.body == answers[0].body
        assert retry.headers.get("idempotent-replayed") == "true"
    assert demo_api.executed(r) == 1


def test_a_looping_client_is_throttled_while_another_user_continues(demo, demo_api):
    def transfer(key_id, secret):
        body = json.dumps({"from": "acc-bob", "to": "acc-alice", "amount": 1, "reference": ref()}).encode()
        return demo.request("POST", "/v1/transfers", JSON + sign(demo, "/v1/transfers", body, key_id, secret), body)

    statuses = [transfer(harness.DEMO_KEY_ID, harness.DEMO_SECRET_B64).status for _ in range(8)]
    assert 429 in statuses, statuses
    throttled = transfer(harness.DEMO_KEY_ID, harness.DEMO_SECRET_B64)
    assert (throttled.status, throttled.error) == (429, "rate_limited")
    assert int(throttled.headers["retry-after"]) >= 1
    other = transfer(harness.SECOND_KEY_ID, harness.SECOND_SECRET_B64)
    assert other.status == 201, other.body


def test_a_production_push_key_is_refused_in_uat(demo, demo_api):
    r = ref()
    body = json.dumps({"account": "acc-alice", "amount": 1, "reference": r,
                       "currency": "FAKE-apns-prod-key-firebreak-demo-0001"}).encode()
    refused = demo.request("POST", "/v1/withdrawals", JSON + sign(demo, "/v1/withdrawals", body), body)
    assert (refused.status, refused.error) == (403, "production_credential_in_non_production")
    assert "apns-prod" in refused.json["message"] and "FAKE-apns-prod" not in refused.json["message"]
    assert demo_api.executed(r) == 0


def test_twenty_identical_withdrawals_without_a_key_execute_once(demo, demo_api):
    r = ref()
    body = json.dumps({"account": "acc-platform", "amount": 5, "reference": r}).encode()
    # Each copy is validly signed by the (scripting) client: only duplicate collapse stops them.
    signed = [sign(demo, "/v1/withdrawals", body, key_id=harness.SECOND_KEY_ID, secret=harness.SECOND_SECRET_B64)
              for _ in range(20)]
    gate = threading.Barrier(20)
    results = []

    def fire(sig):
        gate.wait()
        results.append(demo.request("POST", "/v1/withdrawals", JSON + sig, body))

    threads = [threading.Thread(target=fire, args=(s,)) for s in signed]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert demo_api.executed(r) == 1
    assert sum(1 for x in results if x.status == 201) == 1
