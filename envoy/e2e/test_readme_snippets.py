"""Each filter README's Envoy snippet works as written: the `http_filters` block and the
`http_connection_manager` settings given beside it (only the module path made absolute), through
real Envoy, with one request the filter must refuse (nothing reaches the money API) and one it
must let through. The chain and rate-limit READMEs have their own snippet tests
(test_chain.py, test_rate_limit.py)."""

import base64
import json
import uuid

import pytest
import yaml

import harness

JSON = [("content-type", "application/json")]
PAYROLL_SECRET_B64 = base64.b64encode(b"payroll-2025-secret-for-the-readme-test!").decode()
PROD_KEY = "FAKE-apns-prod-key-firebreak-demo-0001"  # the demo's fake production credential


def yaml_blocks(readme: str) -> list[str]:
    return [block.split("```")[0] for block in readme.split("```yaml\n")[1:]]


def readme_snippet(plugin: str) -> tuple[list[dict], dict]:
    """The README's wasm `http_filters` (router dropped: the harness adds it) and its
    connection-manager settings."""
    readme = (harness.ROOT / "plugins" / plugin / "README.md").read_text()
    blocks = yaml_blocks(readme)
    filters_block = next(b for b in blocks if "envoy.filters.http.wasm" in b and "vm_config" in b and "buffer" in b)
    parsed = yaml.safe_load(filters_block)
    http_filters = parsed["http_filters"] if isinstance(parsed, dict) else parsed
    http_filters = [f for f in http_filters if f["name"] != "envoy.filters.http.router"]
    for f in http_filters:
        if f["name"] == "envoy.filters.http.wasm":
            code = f["typed_config"]["config"]["vm_config"]["code"]["local"]
            code["filename"] = str(harness.ROOT / code["filename"])
    hcm_block = next(b for b in blocks if "normalize_path: true" in b)
    hcm_options = yaml.safe_load(hcm_block)
    assert hcm_options == harness.HARDENED_HCM, f"{plugin}: {hcm_options}"
    return http_filters, hcm_options


def body(reference: str, **extra) -> bytes:
    return json.dumps({"from": "acc-alice", "to": "acc-bob", "amount": 1, "reference": reference, **extra}).encode()


def gateway(plugin: str, demo_api) -> harness.Envoy:
    http_filters, hcm_options = readme_snippet(plugin)
    return harness.Envoy(http_filters, demo_api.port, hcm_options=hcm_options, env={"PAYROLL_KEY": PAYROLL_SECRET_B64})


def test_request_signature_readme_snippet(demo_api):
    gw = gateway("request-signature", demo_api)
    try:
        # Protected by default: an unsigned POST on a path no route names, and a non-canonical
        # spelling of a money route, never reach the API.
        for path in ["/v1/transfers", "/v2/anything", "/V1/Transfers", "/v1//transfers", "/v1/%74ransfers"]:
            ref = f"unsigned-{uuid.uuid4()}"
            r = gw.request("POST", path, JSON, body(ref))
            assert r.status in (400, 401) and r.error in ("signature_missing", "path_not_canonical"), (path, r.body)
            assert demo_api.executed(ref) == 0, path
        ref = f"signed-{uuid.uuid4()}"
        payload = body(ref)
        signed = gw.request("POST", "/v1/transfers", JSON + harness.sign("POST", gw.url("/v1/transfers"), payload), payload)
        assert signed.status == 201, signed.body
        assert demo_api.executed(ref) == 1
        # The second key of the snippet is read from its own environment variable.
        ref = f"payroll-{uuid.uuid4()}"
        payload = body(ref)
        sig = harness.sign("POST", gw.url("/v1/transfers"), payload, key_id="payroll-2025", secret_b64=PAYROLL_SECRET_B64)
        assert gw.request("POST", "/v1/transfers", JSON + sig, payload).status == 201
        # The listed exemption passes unsigned (the demo API does not know the path: 404 from it).
        exempt = gw.request("POST", "/hooks/psp-callback", JSON, b"{}")
        assert exempt.error != "signature_missing", exempt.body
    finally:
        gw.stop()


def test_replay_guard_readme_snippet(demo_api):
    gw = gateway("replay-guard", demo_api)
    try:
        # Without request-signature in front there is no verified principal: every payout is refused.
        ref = f"payout-{uuid.uuid4()}"
        r = gw.request("POST", "/v1/payouts", JSON + [("idempotency-key", f'"{uuid.uuid4()}"')], body(ref))
        assert (r.status, r.error) == (401, "principal_required"), r.body
        spelled = gw.request("POST", "/v1/Payouts/", JSON + [("idempotency-key", f'"{uuid.uuid4()}"')], body(ref))
        assert spelled.status in (400, 401) and spelled.error in ("path_not_canonical", "principal_required"), spelled.body
        assert demo_api.executed(ref) == 0
        assert gw.request("GET", "/v1/ledger").status == 200
    finally:
        gw.stop()


def test_env_guard_readme_snippet(demo_api):
    gw = gateway("env-guard", demo_api)
    try:
        ref = f"leak-{uuid.uuid4()}"
        leaked = base64.b64encode(base64.b64encode(PROD_KEY.encode())).decode()  # two layers
        r = gw.request("POST", "/v1/transfers", JSON, body(ref, note={"push_key": leaked}))
        assert (r.status, r.error) == (403, "production_credential_in_non_production"), r.body
        assert demo_api.executed(ref) == 0
        ref = f"clean-{uuid.uuid4()}"
        assert gw.request("POST", "/v1/transfers", JSON, body(ref)).status == 201
        assert demo_api.executed(ref) == 1
    finally:
        gw.stop()


@pytest.mark.parametrize("plugin", ["request-signature", "replay-guard", "env-guard"])
def test_every_readme_gives_the_defence_in_depth_settings(plugin):
    readme_snippet(plugin)
