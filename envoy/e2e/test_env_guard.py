"""env-guard through real Envoy (--concurrency 2): incident 4. In the non-production environment
`uat`, a request carrying the (fake) production push key is refused with 403
`production_credential_in_non_production` wherever it hides (header, query, nested JSON, base64,
gzip), and never reaches the money API (checked in its ledger); the UAT key passes; the same
configuration marked production passes; a production-only host is refused; on an egress listener
too (envoy/egress-example.yaml)."""

import base64
import gzip
import hashlib
import json
import re
import subprocess
import urllib.parse
import uuid
import zlib

import pytest

import harness

# FAKE demo credentials (documented as fake in plugins/env-guard/README.md): never real keys.
PROD_KEY = "FAKE-apns-prod-key-firebreak-demo-0001"
UAT_KEY = "FAKE-apns-uat-key-firebreak-demo-0001"
PROD_FP = hashlib.sha256(PROD_KEY.encode()).hexdigest()
CODE = "production_credential_in_non_production"


def guard_config(**overrides) -> dict:
    config = {
        "environment": "uat",
        "production": False,
        # With its length (`firebreak fingerprint --label`): only 38-byte candidates are hashed.
        # DEMO_CHAIN_CONFIG below keeps the older form without length.
        "protected_credentials": [{"label": "apns-prod", "sha256": PROD_FP, "length": len(PROD_KEY)}],
        "patterns": [{"label": "stripe-live", "prefix": "sk_live_"}],
        "production_hosts": ["api.push.apple.com", "*.prod.example.com"],
        "routes": [{"path_prefix": "/v1/"}],
        "max_body_bytes": 65536,
        "max_decoded_bytes": 262144,
        "over_limit": "block",
    }
    config.update(overrides)
    return config


def guard_filter(**overrides) -> dict:
    return harness.wasm_filter("env_guard", guard_config(**overrides))


@pytest.fixture(scope="module")
def gateway(demo_api):
    envoy = harness.Envoy([harness.buffer_filter(), guard_filter()], demo_api.port)
    yield envoy
    envoy.stop()


def new_ref() -> str:
    return f"eg-{uuid.uuid4().hex[:12]}"


def transfer(reference: str, **extra) -> dict:
    body = {"from": "acc-alice", "to": "acc-bob", "amount": 1, "reference": reference}
    body.update(extra)
    return body


JSON = [("content-type", "application/json")]


def assert_refused(demo_api, gateway, response, reference, location, label="apns-prod", code=CODE, status=403):
    assert (response.status, response.error) == (status, code), response.body
    assert response.headers.get("x-firebreak-error") == code
    message = response.json["message"]
    assert f"`{label}`" in message and "`uat`" in message, message
    if location is not None:
        assert f"found in {location};" in message, message
    assert PROD_KEY not in response.body.decode()
    assert demo_api.executed(reference) == 0, "a refused request reached the money API"


def post(gateway, reference, headers=(), body=None, path="/v1/transfers", raw: bytes | None = None):
    data = raw if raw is not None else json.dumps(body if body is not None else transfer(reference)).encode()
    return gateway.request("POST", path, JSON + list(headers), data)


# --- incident 4 through real Envoy ---------------------------------------------------------------

def test_production_key_in_bearer_header(demo_api, gateway):
    ref = new_ref()
    r = post(gateway, ref, [("authorization", f"Bearer {PROD_KEY}")])
    assert_refused(demo_api, gateway, r, ref, "header authorization (bearer)")


def test_production_key_in_basic_auth_password(demo_api, gateway):
    ref = new_ref()
    basic = base64.b64encode(f"push-svc:{PROD_KEY}".encode()).decode()
    r = post(gateway, ref, [("authorization", f"Basic {basic}")])
    assert_refused(demo_api, gateway, r, ref, "header authorization (basic password)")


def test_production_key_in_custom_header_base64(demo_api, gateway):
    ref = new_ref()
    r = post(gateway, ref, [("x-push-key", base64.b64encode(PROD_KEY.encode()).decode())])
    assert_refused(demo_api, gateway, r, ref, "header x-push-key (base64)")


def test_production_key_in_query(demo_api, gateway):
    ref = new_ref()
    r = post(gateway, ref, path=f"/v1/transfers?token={urllib.parse.quote(PROD_KEY)}")
    assert_refused(demo_api, gateway, r, ref, "query param token")


def test_production_key_in_a_json_string_the_api_accepts(demo_api, gateway):
    # Without the guard the demo API would execute this (currency is free text): the ledger check bites.
    ref = new_ref()
    r = post(gateway, ref, body=transfer(ref, currency=PROD_KEY))
    assert_refused(demo_api, gateway, r, ref, "body json $.currency")
    ref = new_ref()
    r = post(gateway, ref, body=transfer(ref, currency=base64.b64encode(PROD_KEY.encode()).decode()))
    assert_refused(demo_api, gateway, r, ref, "body json $.currency (base64)")


# The demo API refuses unknown fields (400 bad_json), so for the nested and compressed bodies below
# the 403 and its code are what prove the guard acted; the ledger check is kept for symmetry.

def test_production_key_in_nested_json_body(demo_api, gateway):
    ref = new_ref()
    body = transfer(ref, note={"push": {"provider": "apns", "key": PROD_KEY, "alert": "hhhhh"}})
    r = post(gateway, ref, body=body)
    assert_refused(demo_api, gateway, r, ref, "body json $.note.push.key")


def test_production_key_base64_in_json_body(demo_api, gateway):
    ref = new_ref()
    body = transfer(ref, note={"push": {"key": base64.b64encode(PROD_KEY.encode()).decode()}})
    r = post(gateway, ref, body=body)
    assert_refused(demo_api, gateway, r, ref, "body json $.note.push.key (base64)")


def test_production_key_in_gzipped_body(demo_api, gateway):
    ref = new_ref()
    raw = gzip.compress(json.dumps(transfer(ref, note={"key": PROD_KEY})).encode())
    r = post(gateway, ref, [("content-encoding", "gzip")], raw=raw)
    assert_refused(demo_api, gateway, r, ref, "body json $.note.key (gzip)")
    ref = new_ref()
    raw = gzip.compress(json.dumps(transfer(ref, currency=base64.b64encode(PROD_KEY.encode()).decode())).encode())
    r = post(gateway, ref, [("content-encoding", "gzip")], raw=raw)
    assert_refused(demo_api, gateway, r, ref, "body json $.currency (gzip, base64)")


def test_production_key_in_deflated_form_body(demo_api, gateway):
    ref = new_ref()
    form = urllib.parse.urlencode({"reference": ref, "push_key": PROD_KEY}).encode()
    r = gateway.request("POST", "/v1/transfers", [("content-type", "application/x-www-form-urlencoded"),
                                                   ("content-encoding", "deflate")], zlib.compress(form))
    assert_refused(demo_api, gateway, r, ref, "body form field push_key (deflate)")


def test_production_key_in_raw_text_body(demo_api, gateway):
    ref = new_ref()
    raw = f"reference={ref}\nplease push with {PROD_KEY}.\n".encode()
    r = gateway.request("POST", "/v1/transfers", [("content-type", "text/plain")], raw)
    assert_refused(demo_api, gateway, r, ref, "body text")


def test_production_only_pattern(demo_api, gateway):
    ref = new_ref()
    r = post(gateway, ref, [("x-payment-key", "sk_live_4eC39HqLyjWDarjtT1zdp7dc")])
    assert_refused(demo_api, gateway, r, ref, "header x-payment-key", label="stripe-live")


def test_production_only_host(demo_api, gateway):
    ref = new_ref()
    r = gateway.request("POST", "/v1/transfers", JSON, json.dumps(transfer(ref)).encode(), host="api.push.apple.com")
    assert (r.status, r.error) == (403, "production_host_in_non_production"), r.body
    assert "api.push.apple.com" in r.json["message"] and "`uat`" in r.json["message"]
    assert demo_api.executed(ref) == 0
    r = gateway.request("POST", "/v1/transfers", JSON, json.dumps(transfer(new_ref())).encode(), host="fcm.prod.example.com:443")
    assert r.error == "production_host_in_non_production"


def test_uat_key_passes_everywhere(demo_api, gateway):
    ref = new_ref()
    headers = [("authorization", f"Bearer {UAT_KEY}"), ("x-push-key", base64.b64encode(UAT_KEY.encode()).decode())]
    r = post(gateway, ref, headers, body=transfer(ref, currency=UAT_KEY), path=f"/v1/transfers?token={UAT_KEY}")
    assert r.status == 201, r.body
    assert demo_api.executed(ref) == 1
    # Gzipped: the demo API does not decode gzip, so its 400 bad_json proves the guard let it through.
    raw = gzip.compress(json.dumps(transfer(new_ref(), note={"push": {"key": UAT_KEY}})).encode())
    r = post(gateway, ref, headers + [("content-encoding", "gzip")], raw=raw)
    assert (r.status, r.error) == (400, "bad_json"), r.body


def test_unguarded_routes_are_not_inspected(gateway):
    r = gateway.request("GET", f"/healthz?token={PROD_KEY}")
    assert r.status == 200, r.body


# --- bounded work ------------------------------------------------------------------------------

def test_unknown_content_encoding_is_refused(demo_api, gateway):
    ref = new_ref()
    r = post(gateway, ref, [("content-encoding", "br")], raw=b"\x1b\x00\x00")
    assert (r.status, r.error) == (415, "content_encoding_not_inspectable"), r.body
    assert demo_api.executed(ref) == 0


def test_corrupt_gzip_is_refused(demo_api, gateway):
    ref = new_ref()
    r = post(gateway, ref, [("content-encoding", "gzip")], raw=b"not gzip at all")
    assert (r.status, r.error) == (400, "body_not_decodable"), r.body


def test_gzip_bomb_is_refused_without_inflating_it(demo_api, gateway):
    ref = new_ref()
    bomb = gzip.compress(b"\0" * (16 * 1024 * 1024))  # ~16 KiB on the wire, 16 MiB decoded
    assert len(bomb) < 65536
    r = post(gateway, ref, [("content-encoding", "gzip")], raw=bomb)
    assert (r.status, r.error) == (413, "body_too_large_to_inspect"), r.body
    assert "max_decoded_bytes" in r.json["message"]


def test_over_limit_body_block_and_pass(demo_api, envoy_factory):
    big = json.dumps(transfer("x", currency=PROD_KEY + " " + "p" * 70000)).encode()
    blocking = envoy_factory([harness.buffer_filter(), guard_filter()])
    ref = new_ref()
    r = post(blocking, ref, raw=big.replace(b'"x"', f'"{ref}"'.encode()))
    assert (r.status, r.error) == (413, "body_too_large_to_inspect"), r.body
    passing = envoy_factory([harness.buffer_filter(), guard_filter(over_limit="pass")])
    ref = new_ref()
    r = post(passing, ref, raw=big.replace(b'"x"', f'"{ref}"'.encode()))
    assert r.status == 201, r.body  # uninspected, as configured, and counted
    assert passing.counter("firebreak.env_guard.passed_uninspected_over_limit") == 1


# --- production: true ----------------------------------------------------------------------------

def test_same_config_marked_production_does_not_block(demo_api, envoy_factory):
    prod = envoy_factory([harness.buffer_filter(), guard_filter(environment="prod", production=True)])
    ref = new_ref()
    body = transfer(ref, currency=PROD_KEY)
    r = prod.request("POST", f"/v1/transfers?token={PROD_KEY}", JSON + [("authorization", f"Bearer {PROD_KEY}")],
                     json.dumps(body).encode(), host="api.push.apple.com")
    assert r.status == 201, r.body
    assert demo_api.executed(ref) == 1
    assert prod.counter("firebreak.env_guard.passed_production") >= 1
    assert "environment=prod production=true mode=pass-through" in prod.logs()


# --- observability -----------------------------------------------------------------------------

def test_loud_log_line_and_counters_never_the_value(demo_api, envoy_factory):
    envoy = envoy_factory([harness.buffer_filter(), guard_filter()])
    r = post(envoy, new_ref(), [("authorization", f"Bearer {PROD_KEY}")])
    assert r.status == 403
    r = post(envoy, new_ref(), body=transfer("r", currency=PROD_KEY))
    assert r.status == 403
    assert envoy.counter(f"firebreak.env_guard.rejected.{CODE}") == 2
    assert envoy.counter("firebreak.env_guard.detected.apns-prod.header") == 1
    assert envoy.counter("firebreak.env_guard.detected.apns-prod.body") == 1
    logs = envoy.logs()
    lines = [line for line in logs.splitlines() if f"code={CODE}" in line]
    assert len(lines) == 2, logs[-3000:]
    for line in lines:
        assert "[error]" in line and "environment=uat" in line and "label=apns-prod" in line, line
    assert PROD_KEY not in logs
    assert base64.b64encode(PROD_KEY.encode()).decode() not in logs


def test_invalid_configuration_refuses_to_start(demo_api):
    for overrides, field in [
        ({"protected_credentials": [{"label": "apns-prod", "sha256": PROD_KEY}]}, "protected_credentials[0].sha256"),
        ({"production": None}, "production"),
        ({"over_limit": "maybe"}, "over_limit"),
        ({"protected_credentials": [{"label": "apns-prod", "sha256": PROD_FP, "length": 0}]}, "protected_credentials[0].length"),
        ({"patterns": [{"label": "x", "regex": "cl\u00e9_[0-9]+"}]}, "patterns[0].regex"),
        ({"production_hosts": ["https://api.push.apple.com"]}, "production_hosts[0]"),
    ]:
        config = guard_config(**overrides)
        config = {k: v for k, v in config.items() if v is not None}
        envoy = harness.Envoy([guard_filter_raw(config)], demo_api.port, expect_failure=True)
        logs = envoy.logs()
        assert f"config_error field={field}" in logs, logs[-2000:]
        assert PROD_KEY not in logs


def guard_filter_raw(config: dict) -> dict:
    return harness.wasm_filter("env_guard", config)


# --- egress: envoy/egress-example.yaml, run as written (ports and provider swapped) ---------------

class EgressEnvoy(harness.Envoy):
    """Runs envoy/egress-example.yaml with free ports and the demo API as the push provider."""

    def __init__(self, provider_port: int):
        text = (harness.ROOT / "envoy" / "egress-example.yaml").read_text()
        text = re.sub(r"\n    # --- tls \(begin\).*?# --- tls \(end\)\n", "\n", text, flags=re.S)
        self.port = harness.free_port()
        self.admin_port = harness.free_port()
        text = text.replace("port_value: 15001", f"port_value: {self.port}")
        text = text.replace("port_value: 9902", f"port_value: {self.admin_port}")
        text = text.replace("address: api.sandbox.push.apple.com, port_value: 443",
                            f"address: 127.0.0.1, port_value: {provider_port}")
        text = text.replace("type: STRICT_DNS", "type: STATIC")
        assert "transport_socket" not in text and str(self.port) in text and str(provider_port) in text
        harness.RUN_DIR.mkdir(exist_ok=True)
        self.config_path = harness.RUN_DIR / f"egress-{self.port}.yaml"
        self.config_path.write_text(text)
        self.log = harness.RUN_DIR / f"egress-{self.port}.log"
        self.proc = subprocess.Popen(
            [str(harness.ENVOY), "-c", str(self.config_path), "--concurrency", "2", "--use-dynamic-base-id",
             "--log-level", "warn", "--component-log-level", "wasm:info", "--disable-hot-restart"],
            cwd=harness.ROOT, stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        harness.wait_for(self._ready, 30, "egress envoy", self.proc, self.log)


@pytest.fixture(scope="module")
def egress(demo_api):
    envoy = EgressEnvoy(demo_api.port)
    yield envoy
    envoy.stop()


def test_egress_example_blocks_a_uat_service_sending_the_production_push_key(demo_api, egress):
    ref = new_ref()
    body = transfer(ref, currency="hhhhh")
    r = egress.request("POST", "/v1/transfers", JSON + [("authorization", f"bearer {PROD_KEY}")],
                       json.dumps(body).encode(), host="api.sandbox.push.apple.com")
    assert_refused(demo_api, egress, r, ref, "header authorization (bearer)")


def test_egress_example_blocks_the_production_provider_host(demo_api, egress):
    ref = new_ref()
    r = egress.request("POST", "/v1/transfers", JSON + [("authorization", f"bearer {UAT_KEY}")],
                       json.dumps(transfer(ref)).encode(), host="api.push.apple.com")
    assert (r.status, r.error) == (403, "production_host_in_non_production"), r.body
    assert demo_api.executed(ref) == 0


def test_egress_example_forwards_the_uat_key_to_the_sandbox_provider(demo_api, egress):
    ref = new_ref()
    r = egress.request("POST", "/v1/transfers", JSON + [("authorization", f"bearer {UAT_KEY}")],
                       json.dumps(transfer(ref)).encode(), host="api.sandbox.push.apple.com")
    assert r.status == 201, r.body
    assert demo_api.executed(ref) == 1


# --- in a chain with request-signature (the recommended demo order: env-guard before it) ----------

DEMO_CHAIN_CONFIG = {
    "environment": "uat",
    "production": False,
    "protected_credentials": [{"label": "apns-prod", "sha256": PROD_FP}],
    "patterns": [{"label": "stripe-live", "prefix": "sk_live_"}],
    "production_hosts": ["api.push.apple.com"],
    "routes": [{"methods": ["POST", "PUT", "PATCH", "DELETE"], "path_prefix": "/v1/"}],
    "max_body_bytes": 65536,
    "max_decoded_bytes": 262144,
    "over_limit": "block",
}


def test_demo_chain_signed_requests_pass_and_a_signed_production_key_is_refused(demo_api, envoy_factory):
    chain = envoy_factory([harness.buffer_filter(), harness.wasm_filter("env_guard", DEMO_CHAIN_CONFIG),
                           harness.signature_filter()])
    ref = new_ref()
    body = json.dumps(transfer(ref)).encode()
    r = chain.signed("POST", "/v1/transfers", body, headers=JSON)
    assert r.status == 201, r.body  # signature headers (base64 MACs, digests) are not mistaken for keys
    assert demo_api.executed(ref) == 1
    ref = new_ref()
    body = json.dumps(transfer(ref, currency=PROD_KEY)).encode()
    r = chain.signed("POST", "/v1/transfers", body, headers=JSON)
    assert_refused(demo_api, chain, r, ref, "body json $.currency")
    assert chain.counter("firebreak.request_signature.accepted") == 1


# --- issue 13: evasions (nested encodings, multipart transfer encodings, every header) -----------

def upstream_requests(gateway) -> int:
    """Requests the upstream answered. (Not `upstream_rq_total`: for a body finding the router has
    already been handed the headers, so Envoy may open, or pick a pooled, upstream request that the
    refusal then cancels or resets before any body byte is sent; the upstream never answers it.)"""
    return gateway.counter("cluster.money_api.upstream_rq_completed")


def refused_unseen(gateway, demo_api, method, path, headers, body, status, code, reference=None):
    """Sends one request; the client gets `status`/`code` and the upstream never sees it."""
    before = upstream_requests(gateway)
    r = gateway.request(method, path, headers, body)
    assert (r.status, r.error) == (status, code), r.body
    assert r.headers.get("x-firebreak-error") == code
    assert set(r.json) == {"error", "message"}
    assert PROD_KEY not in r.body.decode()
    assert upstream_requests(gateway) == before, "a refused request reached the upstream (it answered)"
    if reference is not None:
        assert demo_api.executed(reference) == 0
    return r


def wrap(secret: str, layers: str) -> str:
    """`layers` applied innermost first: b base64, p percent-encoding, g gzip then base64,
    j a JSON document {"k": ...}."""
    value = secret
    for layer in layers:
        if layer == "b":
            value = base64.b64encode(value.encode()).decode()
        elif layer == "p":
            value = urllib.parse.quote(value, safe="")
        elif layer == "g":
            value = base64.b64encode(gzip.compress(value.encode())).decode()
        elif layer == "j":
            value = json.dumps({"k": value})
    return value


@pytest.mark.parametrize("layers", ["bbb", "pbb", "bjpb", "gb", "bbbb", "pbpb", "bgb", "bbbbb", "bbgb", "bbbbbb", "pbpbpb", "bbgbb"])
def test_nested_encodings_up_to_the_bound_are_found(demo_api, gateway, layers):
    ref = new_ref()
    value = wrap(PROD_KEY, layers)
    # In a JSON field the API accepts (it would execute the transfer), in a header, in the query.
    r = refused_unseen(gateway, demo_api, "POST", "/v1/transfers", JSON, json.dumps(transfer(ref, currency=value)).encode(),
                       403, CODE, ref)
    assert "found in body json $.currency (" in r.json["message"], r.json["message"]
    refused_unseen(gateway, demo_api, "POST", "/v1/transfers", JSON + [("x-push-key", value)],
                   json.dumps(transfer(ref)).encode(), 403, CODE, ref)
    refused_unseen(gateway, demo_api, "POST", f"/v1/transfers?k={urllib.parse.quote(value, safe='')}", JSON,
                   json.dumps(transfer(ref)).encode(), 403, CODE, ref)


@pytest.mark.parametrize("layers", ["bbbbbbb", "bgbbbb", "bbgbbb", "bbbbbbbbbb"])
def test_deeper_than_the_bound_is_refused_encoding_too_deep(demo_api, gateway, layers):
    ref = new_ref()
    value = wrap(PROD_KEY, layers)
    r = refused_unseen(gateway, demo_api, "POST", "/v1/transfers", JSON, json.dumps(transfer(ref, currency=value)).encode(),
                       422, "encoding_too_deep", ref)
    assert "after 6 layers" in r.json["message"], r.json["message"]
    refused_unseen(gateway, demo_api, "POST", "/v1/transfers", JSON + [("x-push-key", value)],
                   json.dumps(transfer(ref)).encode(), 422, "encoding_too_deep", ref)
    assert gateway.counter("firebreak.env_guard.rejected.encoding_too_deep") >= 2


def test_deep_looking_innocent_transfer_passes(demo_api, gateway):
    ref = new_ref()
    memo = wrap("a memo wrapped three times", "bbb")
    body = transfer(ref, currency="EUR")
    headers = JSON + [("x-memo", memo), ("x-noise", "QUFBQUFBQUFBQUFB!!!== %%%%%2525zz%2 H4sIAAAAAAAA/wXBMQ0AAAgDsFv"),
                      ("cookie", "session=eyJ1c2VyIjoiYWxpY2UifQ%3D%3D; theme=dark"),
                      ("signature", "sig1=:dGhpcyBpcyBub3QgYSByZWFsIG1hYyBidXQgMzIgYnl0ZXM=:"),
                      ("idempotency-key", str(uuid.uuid4()))]
    r = gateway.request("POST", "/v1/transfers", headers, json.dumps(body).encode())
    assert r.status == 201, r.body
    assert demo_api.executed(ref) == 1


def multipart_body(boundary: str, eol: str, parts) -> bytes:
    out = f"preamble{eol}"
    for headers, body in parts:
        out += f"--{boundary}{eol}{headers.replace(chr(10), eol)}{eol}{eol}{body}{eol}"
    out += f"--{boundary}--{eol}"
    return out.encode()


@pytest.mark.parametrize("eol", ["\r\n", "\n"])
@pytest.mark.parametrize("cte", ["Content-Transfer-Encoding", "content-transfer-encoding"])
def test_multipart_parts_quoted_printable_and_base64(demo_api, gateway, eol, cte):
    ref = new_ref()
    ct = [("content-type", 'multipart/form-data; boundary="fb-42"')]
    # quoted-printable: the key split by a soft line break, one byte escaped (=61 is "a").
    qp = PROD_KEY[:20] + "=" + eol + PROD_KEY[20:].replace("a", "=61")
    body = multipart_body("fb-42", eol, [(f'Content-Disposition: form-data; name="reference"', ref),
                                         (f'Content-Disposition: form-data; name="note"\n{cte}: quoted-printable', qp)])
    r = refused_unseen(gateway, demo_api, "POST", "/v1/transfers", ct, body, 403, CODE, ref)
    assert "found in body part 2 text (quoted-printable);" in r.json["message"], r.json["message"]
    # base64 of a JSON part, wrapped at 76 columns.
    doc = base64.b64encode(json.dumps({"push": {"alert": "hhhhh, long enough to wrap", "key": PROD_KEY}}).encode()).decode()
    wrapped = eol.join(doc[i:i + 76] for i in range(0, len(doc), 76))
    body = multipart_body("fb-42", eol, [(f'Content-Disposition: form-data; name="p"\nContent-Type: application/json\n{cte}: base64', wrapped)])
    r = refused_unseen(gateway, demo_api, "POST", "/v1/transfers", ct, body, 403, CODE, ref)
    assert "found in body part 1 json $.push.key (base64);" in r.json["message"], r.json["message"]


def test_multipart_nested_unknown_and_malformed(demo_api, gateway):
    ref = new_ref()
    inner = multipart_body("in", "\r\n", [("Content-Type: text/plain\nContent-Transfer-Encoding: base64",
                                           base64.b64encode(f"key {PROD_KEY}".encode()).decode())]).decode()
    body = multipart_body("out", "\r\n", [("Content-Type: multipart/mixed; boundary=in", inner)])
    ct = [("content-type", "multipart/mixed; boundary=out")]
    r = refused_unseen(gateway, demo_api, "POST", "/v1/transfers", ct, body, 403, CODE, ref)
    assert "body part 1.1 text (base64)" in r.json["message"]
    body = multipart_body("out", "\r\n", [("Content-Transfer-Encoding: x-uuencode", "begin 644 key")])
    refused_unseen(gateway, demo_api, "POST", "/v1/transfers", ct, body, 415, "content_encoding_not_inspectable", ref)
    refused_unseen(gateway, demo_api, "POST", "/v1/transfers", [("content-type", "multipart/form-data")],
                   b"--x\r\n\r\nhello\r\n--x--\r\n", 400, "body_not_decodable", ref)


@pytest.mark.parametrize("name,value,location", [
    ("cookie", f'theme=dark; push="{PROD_KEY}"', "header cookie push"),
    ("cookie", f"a=1;push={urllib.parse.quote(base64.b64encode(PROD_KEY.encode()).decode(), safe='')}", "header cookie push (url-encoded, base64)"),
    ("authorization", "Basic " + base64.b64encode(f"svc:{PROD_KEY}".encode()).decode(), "header authorization (basic password)"),
    ("authorization", f"Bearer {wrap(PROD_KEY, 'bb')}", "header authorization (bearer, base64, base64)"),
    ("x-custom-token", PROD_KEY, "header x-custom-token"),
    # Skipped before issue 13:
    ("idempotency-key", PROD_KEY, "header idempotency-key"),
    ("signature", f"sig1=:{base64.b64encode(PROD_KEY.encode()).decode()}:", "header signature (base64)"),
    ("signature-input", f'sig1=("@method");created=1;keyid="{PROD_KEY}"', "header signature-input"),
    ("content-digest", f"sha-256=:{base64.b64encode(PROD_KEY.encode()).decode()}:", "header content-digest (base64)"),
])
def test_credential_in_every_header_kind(demo_api, gateway, name, value, location):
    ref = new_ref()
    r = refused_unseen(gateway, demo_api, "POST", "/v1/transfers", JSON + [(name, value)], json.dumps(transfer(ref)).encode(),
                       403, CODE, ref)
    assert f"found in {location};" in r.json["message"], r.json["message"]
