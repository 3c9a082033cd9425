"""request-signature through real Envoy (--concurrency 2): every attack of incident 1 is refused with
its documented status and code, and never reaches the money API (checked in its ledger)."""

import base64
import json
import threading
import time
import uuid

import pytest
import requests

import harness

MONEY_METHODS = ["POST", "PUT", "PATCH", "DELETE"]


@pytest.fixture(scope="module")
def gateway(demo_api):
    envoy = harness.Envoy(
        [harness.signature_filter(routes=[{"methods": MONEY_METHODS, "path_prefix": "/v1/"}])],
        demo_api.port,
    )
    yield envoy
    envoy.stop()


def transfer_body(reference: str, amount: int = 100) -> bytes:
    return json.dumps({"from": "acc-alice", "to": "acc-bob", "amount": amount, "reference": reference}).encode()


def new_ref() -> str:
    return f"sig-{uuid.uuid4().hex[:12]}"


JSON = [("content-type", "application/json")]


def assert_refused(demo_api, gateway, response, reference, status, code):
    assert (response.status, response.error) == (status, code), response.body
    assert response.headers.get("content-type") == "application/json"
    assert response.headers.get("x-firebreak-error") == code
    assert set(response.json) == {"error", "message"} and response.json["message"]
    assert demo_api.executed(reference) == 0, "a refused request reached the money API"
    assert gateway.counter(f"firebreak.request_signature.rejected.{code}") >= 1
    assert f"code={code}" in gateway.logs()


def test_signed_request_reaches_the_api_with_the_verified_principal(demo_api, gateway):
    ref = new_ref()
    r = gateway.signed("POST", "/v1/transfers", transfer_body(ref), headers=JSON)
    assert r.status == 201, r.body
    assert demo_api.executed(ref) == 1
    [op] = [op for op in demo_api.ledger() if op["reference"] == ref]
    assert op["principal"] == harness.DEMO_KEY_ID
    assert gateway.counter("firebreak.request_signature.accepted") >= 1


def test_client_supplied_principal_is_stripped_everywhere(demo_api):
    # Only /v1/transfers is protected here: a forged principal on another route must not survive.
    envoy = harness.Envoy([harness.signature_filter(routes=[{"methods": ["POST"], "path_exact": "/v1/transfers"}])],
                          demo_api.port)
    try:
        ref = new_ref()
        body = json.dumps({"account": "acc-carol", "amount": 1, "reference": ref}).encode()
        r = envoy.request("POST", "/v1/withdrawals", JSON + [("x-firebreak-principal", "admin")], body)
        assert r.status == 201
        [op] = [op for op in demo_api.ledger() if op["reference"] == ref]
        assert op["principal"] is None
    finally:
        envoy.stop()


def tampered(gateway, sign_body: bytes, send_body: bytes, sign_path="/v1/transfers", send_path=None,
             sign_method="POST", send_method=None, extra=None):
    sig = harness.sign(sign_method, gateway.url(sign_path), sign_body, extra=extra)
    return gateway.request(send_method or sign_method, send_path or sign_path, JSON + sig, send_body)


def test_tampered_body(demo_api, gateway):
    ref = new_ref()
    r = tampered(gateway, transfer_body(ref), transfer_body(ref, amount=99999))
    assert_refused(demo_api, gateway, r, ref, 401, "content_digest_mismatch")


def test_tampered_path(demo_api, gateway):
    ref = new_ref()
    body = json.dumps({"account": "acc-alice", "amount": 5, "reference": ref}).encode()
    r = tampered(gateway, body, body, sign_path="/v1/payouts", send_path="/v1/withdrawals")
    assert_refused(demo_api, gateway, r, ref, 401, "signature_invalid")


def test_tampered_query(demo_api, gateway):
    ref = new_ref()
    r = tampered(gateway, transfer_body(ref), transfer_body(ref), sign_path="/v1/transfers?fee=0",
                 send_path="/v1/transfers?fee=1")
    assert_refused(demo_api, gateway, r, ref, 401, "signature_invalid")


def test_query_not_covered(demo_api, gateway):
    ref = new_ref()
    r = tampered(gateway, transfer_body(ref), transfer_body(ref), sign_path="/v1/transfers?fee=0",
                 extra=["--components", "@method,@authority,@path,content-digest"])
    assert_refused(demo_api, gateway, r, ref, 401, "signature_coverage_insufficient")


def test_changed_method(demo_api, gateway):
    ref = new_ref()
    r = tampered(gateway, transfer_body(ref), transfer_body(ref), send_method="PATCH")
    assert_refused(demo_api, gateway, r, ref, 401, "signature_invalid")


def test_wrong_key(demo_api, gateway):
    ref = new_ref()
    body = transfer_body(ref)
    wrong = base64.b64encode(b"x" * 44).decode()
    sig = harness.sign("POST", gateway.url("/v1/transfers"), body, secret_b64=wrong)
    r = gateway.request("POST", "/v1/transfers", JSON + sig, body)
    assert_refused(demo_api, gateway, r, ref, 401, "signature_invalid")


def test_unknown_key_id(demo_api, gateway):
    ref = new_ref()
    body = transfer_body(ref)
    sig = harness.sign("POST", gateway.url("/v1/transfers"), body, key_id="mallory")
    r = gateway.request("POST", "/v1/transfers", JSON + sig, body)
    assert_refused(demo_api, gateway, r, ref, 401, "signature_invalid")


def client_view(response):
    """Everything a client sees of a refusal, minus what differs between any two responses."""
    headers = {k: v for k, v in response.headers.items() if k not in ("date", "x-envoy-upstream-service-time")}
    return response.status, headers, response.body


def test_an_unknown_key_id_and_a_wrong_mac_look_the_same_but_are_counted_apart(demo_api, gateway):
    # No oracle: a caller cannot tell whether a key id exists; the operator can.
    def counts():
        return {reason: gateway.counter(f"firebreak.request_signature.rejected.signature_invalid.{reason}")
                for reason in ("unknown_key", "mac_mismatch")}

    before, total = counts(), gateway.counter("firebreak.request_signature.rejected.signature_invalid")
    ref = new_ref()
    body = transfer_body(ref)
    unknown = gateway.request("POST", "/v1/transfers",
                              JSON + harness.sign("POST", gateway.url("/v1/transfers"), body, key_id="mallory"), body)
    forged = gateway.request("POST", "/v1/transfers",
                             JSON + harness.sign("POST", gateway.url("/v1/transfers"), body,
                                                 secret_b64=base64.b64encode(b"y" * 44).decode()), body)
    assert client_view(unknown) == client_view(forged)
    assert (unknown.status, unknown.error) == (401, "signature_invalid")
    assert unknown.json == {"error": "signature_invalid", "message": "the signature does not verify"}
    assert demo_api.executed(ref) == 0
    after = counts()
    assert after == {"unknown_key": before["unknown_key"] + 1, "mac_mismatch": before["mac_mismatch"] + 1}
    assert gateway.counter("firebreak.request_signature.rejected.signature_invalid") == total + 2
    logs = gateway.logs()
    assert "code=signature_invalid reason=unknown_key" in logs and "keyid=mallory" in logs
    assert "code=signature_invalid reason=mac_mismatch" in logs


@pytest.mark.parametrize("offset,code", [(-301, "signature_stale"), (+60, "signature_from_future")])
def test_created_outside_the_window(demo_api, gateway, offset, code):
    ref = new_ref()
    r = tampered(gateway, transfer_body(ref), transfer_body(ref), extra=["--created", str(int(time.time()) + offset)])
    assert_refused(demo_api, gateway, r, ref, 401, code)


def test_expired(demo_api, gateway):
    ref = new_ref()
    now = int(time.time())
    r = tampered(gateway, transfer_body(ref), transfer_body(ref),
                 extra=["--created", str(now - 20), "--expires", str(now - 1)])
    assert_refused(demo_api, gateway, r, ref, 401, "signature_expired")


def test_replayed_nonce(demo_api, gateway):
    ref = new_ref()
    body = transfer_body(ref)
    sig = harness.sign("POST", gateway.url("/v1/transfers"), body)
    assert gateway.request("POST", "/v1/transfers", JSON + sig, body).status == 201
    r = gateway.request("POST", "/v1/transfers", JSON + sig, body)
    assert (r.status, r.error) == (409, "nonce_replayed")
    assert demo_api.executed(ref) == 1


def test_twenty_concurrent_copies_of_one_signed_request_execute_once(demo_api, gateway):
    ref = new_ref()
    body = transfer_body(ref, amount=1)
    sig = harness.sign("POST", gateway.url("/v1/transfers"), body)
    start = threading.Barrier(20)
    results = []

    def fire():
        start.wait()
        results.append(gateway.request("POST", "/v1/transfers", JSON + sig, body))

    threads = [threading.Thread(target=fire) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(r.status for r in results)
    assert statuses == [201] + [409] * 19, statuses
    assert {r.error for r in results if r.status == 409} == {"nonce_replayed"}
    assert demo_api.executed(ref) == 1


def test_missing_content_digest_on_a_body(demo_api, gateway):
    ref = new_ref()
    r = tampered(gateway, transfer_body(ref), transfer_body(ref), extra=["--components", "@method,@authority,@path"])
    assert_refused(demo_api, gateway, r, ref, 401, "signature_coverage_insufficient")
    # Covered but the header itself stripped.
    body = transfer_body(ref)
    sig = [h for h in harness.sign("POST", gateway.url("/v1/transfers"), body) if h[0] != "content-digest"]
    r = gateway.request("POST", "/v1/transfers", JSON + sig, body)
    assert_refused(demo_api, gateway, r, ref, 400, "signature_component_missing")


@pytest.mark.parametrize("header", ["signature", "signature-input", "content-digest"])
def test_duplicate_security_headers(demo_api, gateway, header):
    ref = new_ref()
    body = transfer_body(ref)
    sig = harness.sign("POST", gateway.url("/v1/transfers"), body)
    dup = [h for h in sig if h[0] == header]
    r = gateway.request("POST", "/v1/transfers", JSON + sig + dup, body)
    assert_refused(demo_api, gateway, r, ref, 400, "header_duplicated")


def test_unsigned_and_malformed(demo_api, gateway):
    ref = new_ref()
    r = gateway.request("POST", "/v1/transfers", JSON, transfer_body(ref))
    assert_refused(demo_api, gateway, r, ref, 401, "signature_missing")
    r = gateway.request("POST", "/v1/transfers", JSON + [("signature-input", "sig1=(\"@method\""),
                                                         ("signature", "sig1=:AAAA:")], transfer_body(ref))
    assert_refused(demo_api, gateway, r, ref, 400, "signature_malformed")
    sig = [(n, v.replace('"hmac-sha256"', '"rsa-v1_5-sha256"')) for n, v in
           harness.sign("POST", gateway.url("/v1/transfers"), transfer_body(ref))]
    r = gateway.request("POST", "/v1/transfers", JSON + sig, transfer_body(ref))
    assert_refused(demo_api, gateway, r, ref, 400, "signature_algorithm_unsupported")
    sig = harness.sign("POST", gateway.url("/v1/transfers"), transfer_body(ref), key_id="x" * 65)
    r = gateway.request("POST", "/v1/transfers", JSON + sig, transfer_body(ref))
    assert_refused(demo_api, gateway, r, ref, 400, "key_id_invalid")


def test_oversized_body(demo_api, gateway):
    ref = new_ref()
    big = json.dumps({"from": "acc-alice", "to": "acc-bob", "amount": 1, "reference": ref,
                      "pad": "x" * 70000}).encode()
    r = tampered(gateway, big, big)
    assert_refused(demo_api, gateway, r, ref, 413, "body_too_large")


def test_oversized_chunked_body_without_content_length(demo_api, gateway):
    import http.client
    ref = new_ref()
    big = json.dumps({"from": "acc-alice", "to": "acc-bob", "amount": 1, "reference": ref,
                      "pad": "x" * 70000}).encode()
    sig = harness.sign("POST", gateway.url("/v1/transfers"), big)
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    conn.putrequest("POST", "/v1/transfers", skip_accept_encoding=True)
    for n, v in JSON + sig + [("transfer-encoding", "chunked")]:
        conn.putheader(n, v)
    conn.endheaders()
    for i in range(0, len(big), 8192):
        chunk = big[i:i + 8192]
        conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    conn.send(b"0\r\n\r\n")
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    assert (resp.status, body["error"]) == (413, "body_too_large")
    assert demo_api.executed(ref) == 0


def test_a_request_signed_by_an_independent_rfc9421_library_passes(demo_api, gateway):
    from http_message_signatures import HTTPMessageSigner, MappingKeyResolver, algorithms

    secret = base64.b64decode(harness.DEMO_SECRET_B64)
    signer = HTTPMessageSigner(signature_algorithm=algorithms.HMAC_SHA256,
                               key_resolver=MappingKeyResolver(public_keys={}, private_keys={"demo-client": secret}))
    ref = new_ref()
    body = transfer_body(ref)
    request = requests.Request("POST", gateway.url("/v1/transfers?channel=a"), data=body,
                               headers={"Content-Type": "application/json"}).prepare()
    signer.sign(request, key_id="demo-client", nonce=uuid.uuid4().hex, label="sig1", body=body)
    assert "@target-uri" in request.headers["Signature-Input"]
    response = requests.Session().send(request, timeout=10)
    assert response.status_code == 201, response.text
    assert demo_api.executed(ref) == 1


def _independently_signed(gateway, ref):
    """A request signed by the independent RFC 9421 library, and its verifier."""
    from http_message_signatures import HTTPMessageSigner, HTTPMessageVerifier, MappingKeyResolver, algorithms

    secret = base64.b64decode(harness.DEMO_SECRET_B64)
    keys = MappingKeyResolver(public_keys={"demo-client": secret}, private_keys={"demo-client": secret})
    signer = HTTPMessageSigner(signature_algorithm=algorithms.HMAC_SHA256, key_resolver=keys)
    verifier = HTTPMessageVerifier(signature_algorithm=algorithms.HMAC_SHA256, key_resolver=keys)
    body = transfer_body(ref)
    request = requests.Request("POST", gateway.url("/v1/transfers?channel=a"), data=body,
                               headers={"Content-Type": "application/json"}).prepare()
    signer.sign(request, key_id="demo-client", nonce=uuid.uuid4().hex, label="sig1", body=body)
    return request, verifier, body


def test_a_signature_input_not_in_canonical_form_verifies_as_the_independent_library_reads_it(demo_api, gateway):
    # The @signature-params line is the serialization of the inner list (RFC 9421 2.3): the
    # received bytes when canonical, else the canonical form. Spaces inside the parentheses and
    # after `;` change the bytes, not the inner list: the independent library's verifier (which
    # re-serializes) accepts the rewritten field, and so does the filter.
    ref = new_ref()
    request, verifier, body = _independently_signed(gateway, ref)
    canonical = request.headers["Signature-Input"]
    assert canonical.startswith('sig1=("')
    spaced = canonical.replace('sig1=("', 'sig1=(  "', 1).replace('")', '" )', 1).replace(";", "; ")
    assert spaced != canonical
    request.headers["Signature-Input"] = spaced
    assert verifier.verify(request, body=body), "the independent library accepts the rewritten field"
    response = requests.Session().send(request, timeout=10)
    assert response.status_code == 201, response.text
    assert demo_api.executed(ref) == 1


def test_a_repeated_signature_parameter_is_refused(demo_api, gateway):
    # RFC 9651 would let the last `nonce` win; a verifier that took the first would act on
    # another value under the same MAC: refused instead.
    ref = new_ref()
    request, _, _ = _independently_signed(gateway, ref)
    request.headers["Signature-Input"] += ';nonce="another"'
    response = requests.Session().send(request, timeout=10)
    assert (response.status_code, response.headers.get("x-firebreak-error")) == (400, "signature_malformed"), response.text
    assert demo_api.executed(ref) == 0


def test_invalid_configuration_refuses_to_start_and_names_the_field(demo_api):
    for overrides, field in [({"max_age_seconds": 0}, "max_age_seconds"),
                             ({"keys": [{"id": "k", "secret_env": "FIREBREAK_NOT_SET"}]}, "keys[0].secret_env"),
                             ({"routes": [{"path_prefix": "v1"}]}, "routes[0]")]:
        envoy = harness.Envoy([harness.signature_filter(**overrides)], demo_api.port, expect_failure=True)
        assert envoy.proc.returncode != 0
        assert f"config_error field={field}" in envoy.logs()


class EchoUpstream(harness.RecordingUpstream):
    """Records the header names and values of every request exactly as they arrive (the names an
    upstream framework would read) and answers 200."""

    def principal_headers(self):
        """Every header line, in any spelling, an upstream could read as the principal header."""
        norm = lambda name: name.lower().replace("_", "-")  # noqa: E731
        return [(n, v) for _, _, headers in self.seen for n, v in headers if norm(n) == "x-firebreak-principal"]


SPELLINGS = ["x_firebreak_principal", "X_Firebreak-Principal", "x-firebreak_principal", "X-FIREBREAK-PRINCIPAL",
             "x-firebreak-principal"]


@pytest.mark.parametrize("underscores", [None, "REJECT_REQUEST", "DROP_HEADER"])
def test_no_client_spelling_of_the_principal_header_reaches_the_upstream(underscores):
    # Envoy passes header names with underscores through by default (ALLOW); the shipped
    # configurations may reject or drop them. The filter must hold either way.
    upstream = EchoUpstream()
    config = harness.bootstrap(0, 0, 0, [harness.signature_filter(
        routes=[{"methods": ["POST"], "path_prefix": "/v1/transfers"}])])
    if underscores:
        hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["common_http_protocol_options"] = {"headers_with_underscores_action": underscores}
    envoy = harness.Envoy([], upstream.port, bootstrap_config=config)
    try:
        def expected(name, signed):
            """(status, error) per spelling and Envoy setting."""
            if name.lower() == "x-firebreak-principal":  # Envoy lower-cases names: the exact one
                return (200, None) if signed else (401, "signature_missing")
            if underscores == "REJECT_REQUEST":
                return (400, None)  # Envoy's own refusal, before any filter
            if underscores == "DROP_HEADER":
                return (200, None) if signed else (401, "signature_missing")
            return (400, "principal_header_spoofed")

        # Unprotected route, one spelling per request and all at once: every copy removed.
        for name in SPELLINGS:
            r = envoy.request("POST", "/v1/accounts", JSON + [(name, "victim")], b"{}")
            assert (r.status, r.error) == ((400, None) if underscores == "REJECT_REQUEST" and "_" in name else (200, None))
        r = envoy.request("POST", "/v1/accounts", JSON + [(n, "victim") for n in SPELLINGS], b"{}")
        assert r.status == (400 if underscores == "REJECT_REQUEST" else 200)
        # Protected route, unsigned and signed.
        for name in SPELLINGS:
            r = envoy.request("POST", "/v1/transfers", JSON + [(name, "victim")], b"{}")
            assert (r.status, r.error) == expected(name, signed=False), (name, r.status, r.body)
            body = json.dumps({"spelling": name}).encode()
            r = envoy.signed("POST", "/v1/transfers", body, headers=JSON + [(name, "victim")])
            assert (r.status, r.error) == expected(name, signed=True), (name, r.status, r.body)
        # What the upstream saw: no client copy in any spelling; only the filter's own header
        # (the verified key id), once per accepted signed request.
        accepted = sum(1 for name in SPELLINGS if expected(name, signed=True)[0] == 200)
        assert upstream.principal_headers() == [("x-firebreak-principal", harness.DEMO_KEY_ID)] * accepted, upstream.seen
        assert len(upstream.seen) >= 2, "the unprotected requests were forwarded"
        if underscores is None:
            assert envoy.counter("firebreak.request_signature.rejected.principal_header_spoofed") == 6
            assert 'code=principal_header_spoofed method=POST path="/v1/transfers" header="x_firebreak_principal"' in envoy.logs()
    finally:
        envoy.stop()
        upstream.stop()
