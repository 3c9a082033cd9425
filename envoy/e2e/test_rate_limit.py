"""rate-limit through real Envoy (--concurrency 2, many connections): GCRA budgets per client
network and per verified user, one budget per key across both workers, 429 with Retry-After and
the RateLimit headers, and no way around a per-IP limit with a forged X-Forwarded-For."""

import json
import os
import re
import subprocess
import threading
import time
import uuid

import pytest

import harness

SECOND_KEY_ID = "second-client"
SECOND_SECRET_B64 = "c2Vjb25kLWNsaWVudC1zZWNyZXQtZm9yLXRlc3RzLW9ubHktMzJieXRlcyE="
SECOND_KEY_ENV = "FIREBREAK_SECOND_KEY"

BALANCE = "/v1/accounts/acc-alice/balance"
JSON = [("content-type", "application/json")]


def rule(name="r", key="ip", requests=1, per_seconds=3600, burst=3, routes=None, **extra) -> dict:
    return {"name": name, "routes": routes or [{"methods": ["GET"], "path_prefix": "/v1/accounts/"}],
            "key": key, "requests": requests, "per_seconds": per_seconds, "burst": burst, **extra}


def rate_limit(name: str, rules: list[dict], root_id: str | None = None, **extra) -> dict:
    """One rate-limit instance; instances share the VM (vm_id) but never a budget (name)."""
    return harness.wasm_filter("rate_limit", {"name": name, "rules": rules, **extra},
                               vm_id="rate_limit", root_id=root_id or f"rate_limit_{name}")


def two_key_signature_filter() -> dict:
    config = harness.signature_config(keys=[
        {"id": harness.DEMO_KEY_ID, "secret_env": harness.DEMO_KEY_ENV},
        {"id": SECOND_KEY_ID, "secret_env": SECOND_KEY_ENV},
    ])
    return harness.wasm_filter("request_signature", config, host_env_keys=[harness.DEMO_KEY_ENV],
                               key_values={SECOND_KEY_ENV: SECOND_SECRET_B64})


PROBE = "/probe/ping"


@pytest.fixture
def bootstrap_patch(monkeypatch):
    """Start the next Envoys with `xff_num_trusted_hops: hops` (a trusted proxy in front of
    Envoy), and with `/probe/` answered by Envoy itself (`direct_response`, after every filter).
    The probe route keeps the many-connection tests independent of the demo API's own
    connection handling: they measure the filter, not the upstream."""
    def patch(hops: int = 0):
        original = harness.bootstrap

        def patched(*args, **kwargs):
            config = original(*args, **kwargs)
            hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
            assert hcm["use_remote_address"] is True
            hcm["xff_num_trusted_hops"] = hops
            routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
            routes.insert(0, {"match": {"prefix": "/probe/"},
                              "direct_response": {"status": 200, "body": {"inline_string": "pong"}}})
            return config
        monkeypatch.setattr(harness, "bootstrap", patched)
    return patch


@pytest.fixture
def trusted_hops(bootstrap_patch):
    return bootstrap_patch


def new_ref() -> str:
    return f"rl-{uuid.uuid4().hex[:12]}"


def transfer(reference: str) -> bytes:
    return json.dumps({"from": "acc-alice", "to": "acc-bob", "amount": 1, "reference": reference}).encode()


def signed_transfer(envoy, reference, key_id=harness.DEMO_KEY_ID, secret=harness.DEMO_SECRET_B64):
    body = transfer(reference)
    sig = harness.sign("POST", envoy.url("/v1/transfers"), body, key_id=key_id, secret_b64=secret)
    return envoy.request("POST", "/v1/transfers", JSON + sig, body)


def parallel(n_threads: int, per_thread: int, call) -> list:
    """Runs `call(thread, i)` on many threads, each request on its own connection."""
    results, lock = [], threading.Lock()

    def worker(t):
        for i in range(per_thread):
            r = call(t, i)
            with lock:
                results.append(r)
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def assert_limited(envoy, r, instance: str, rule_name: str):
    assert (r.status, r.error) == (429, "rate_limited"), r.body
    assert r.headers["x-firebreak-error"] == "rate_limited"
    assert r.headers["content-type"] == "application/json"
    assert set(r.json) == {"error", "message"} and rule_name in r.json["message"]
    assert int(r.headers["retry-after"]) >= 1
    assert re.fullmatch(rf'"{rule_name}";q=\d+;w=\d+', r.headers["ratelimit-policy"]), r.headers
    assert re.fullmatch(rf'"{rule_name}";r=0;t=\d+', r.headers["ratelimit"]), r.headers
    assert envoy.counter(f"firebreak.rate_limit.{instance}.rejected.rate_limited") >= 1
    assert envoy.counter(f"firebreak.rate_limit.{instance}.rule.{rule_name}.limited") >= 1
    assert f"code=rate_limited instance={instance}" in envoy.logs()


def test_burst_then_429_with_retry_after_and_ratelimit_headers(envoy_factory):
    envoy = envoy_factory([rate_limit("edge", [rule("per-ip", burst=3, requests=1, per_seconds=3600)])])
    statuses = [envoy.request("GET", BALANCE).status for _ in range(3)]
    assert statuses == [200, 200, 200]
    r = envoy.request("GET", BALANCE)
    assert_limited(envoy, r, "edge", "per-ip")
    assert r.headers["ratelimit-policy"] == '"per-ip";q=3;w=10800'
    assert r.headers["ratelimit"] == '"per-ip";r=0;t=10800'
    assert 3590 <= int(r.headers["retry-after"]) <= 3600
    assert "ip=127.0.0.1/32" in envoy.logs()
    # Routes outside the rules are not limited.
    assert envoy.request("GET", "/v1/ledger").status == 200


def test_a_limited_money_request_never_reaches_the_api(demo_api, envoy_factory):
    money = [{"methods": ["POST"], "path_prefix": "/v1/"}]
    envoy = envoy_factory([harness.buffer_filter(),
                           rate_limit("money", [rule("transfers", burst=2, routes=money)])])
    refs = [new_ref() for _ in range(5)]
    statuses = [envoy.request("POST", "/v1/transfers", JSON, transfer(ref)).status for ref in refs]
    assert statuses == [201, 201, 429, 429, 429]
    assert [demo_api.executed(ref) for ref in refs] == [1, 1, 0, 0, 0]


def test_refill_after_retry_after(envoy_factory):
    envoy = envoy_factory([rate_limit("refill", [rule("slow", requests=1, per_seconds=4, burst=1)])])
    assert envoy.request("GET", BALANCE).status == 200
    r = envoy.request("GET", BALANCE)
    assert r.status == 429
    wait = int(r.headers["retry-after"])
    assert 1 <= wait <= 4
    # Retry-After is rounded up: after it, one request is admitted again, and only one.
    time.sleep(wait + 0.5)
    assert envoy.request("GET", BALANCE).status == 200
    assert envoy.request("GET", BALANCE).status == 429


def test_two_users_are_independent(demo_api, envoy_factory):
    money = [{"methods": ["POST"], "path_prefix": "/v1/"}]
    envoy = envoy_factory([harness.buffer_filter(), two_key_signature_filter(),
                           rate_limit("per-user", [rule("user-transfers", key="user", burst=2, routes=money)])])
    first = [signed_transfer(envoy, new_ref()).status for _ in range(4)]
    assert first == [201, 201, 429, 429], "the verified principal is read by the later filter"
    second = [signed_transfer(envoy, new_ref(), SECOND_KEY_ID, SECOND_SECRET_B64).status for _ in range(2)]
    assert second == [201, 201], "another user from the same IP keeps their whole budget"
    r = signed_transfer(envoy, new_ref(), SECOND_KEY_ID, SECOND_SECRET_B64)
    assert_limited(envoy, r, "per-user", "user-transfers")
    assert f"user={SECOND_KEY_ID}" in envoy.logs() and f"user={harness.DEMO_KEY_ID}" in envoy.logs()


def test_a_client_set_principal_header_is_not_a_user(envoy_factory):
    # No signature filter on this route: a forged principal header must not give a budget.
    envoy = envoy_factory([rate_limit("forged", [rule("per-user", key="user", burst=5)])])
    r = envoy.request("GET", BALANCE, [("x-firebreak-principal", "alice")])
    assert (r.status, r.error) == (401, "rate_limit_unauthenticated"), r.body
    assert envoy.counter("firebreak.rate_limit.forged.rejected.rate_limit_unauthenticated") == 1


def test_spoofed_x_forwarded_for_does_not_evade_a_per_ip_limit(envoy_factory):
    envoy = envoy_factory([rate_limit("spoof", [rule("per-ip", burst=3)])])
    statuses = [envoy.request("GET", BALANCE, [("x-forwarded-for", f"198.51.100.{i}")]).status
                for i in range(10)]
    assert statuses.count(200) == 3, statuses
    assert "ip=127.0.0.1/32" in envoy.logs() and "198.51.100" not in envoy.logs()


def test_behind_a_trusted_proxy_the_left_most_entry_is_ignored(envoy_factory, trusted_hops):
    # One trusted proxy in front of Envoy: the client is the right-most X-Forwarded-For entry
    # (the address that proxy saw); anything to its left is whatever the client wrote.
    trusted_hops(1)
    envoy = envoy_factory([rate_limit("hop", [rule("per-ip", burst=3)])])
    statuses = [envoy.request("GET", BALANCE, [("x-forwarded-for", f"198.51.100.{i}, 203.0.113.7")]).status
                for i in range(10)]
    assert statuses.count(200) == 3, statuses
    assert envoy.request("GET", BALANCE, [("x-forwarded-for", "203.0.113.8")]).status == 200, \
        "another client behind the proxy has its own budget"
    assert "ip=203.0.113.7/32" in envoy.logs() and "ip=198.51.100" not in envoy.logs()


def test_ipv6_neighbours_in_one_64_share_a_budget(envoy_factory, trusted_hops):
    # Loopback offers one IPv6 address (::1), so the clients are simulated the way production
    # sees them behind a trusted proxy: Envoy takes the client address from the trusted hop.
    trusted_hops(1)
    envoy = envoy_factory([rate_limit("v6", [rule("per-net", burst=2)])])

    def get(addr):
        return envoy.request("GET", BALANCE, [("x-forwarded-for", addr)]).status
    assert [get("2001:db8:1:2::1"), get("2001:db8:1:2:ffff::9"), get("2001:db8:1:2::77")] == [200, 200, 429]
    assert get("2001:db8:1:3::1") == 200, "the next /64 is another client"
    assert "ip=2001:db8:1:2::/64" in envoy.logs()


def test_workers_share_one_budget(envoy_factory, bootstrap_patch):
    bootstrap_patch()
    burst = 20
    probe = [{"methods": ["GET"], "path_prefix": "/probe/"}]
    envoy = envoy_factory([rate_limit("shared", [rule("per-ip", burst=burst, routes=probe)])])
    results = parallel(16, 15, lambda t, i: envoy.request("GET", PROBE).status)
    assert len(results) == 240
    assert results.count(200) == burst, f"admitted {results.count(200)} for a budget of {burst}"
    assert results.count(429) == 240 - burst
    # Both workers refused requests: the budget they enforced is the same one.
    threads = set(re.findall(r"\]\[(\d+)\]\[warning\]\[wasm\].*code=rate_limited instance=shared", envoy.logs()))
    assert len(threads) == 2, threads
    assert envoy.counter("firebreak.rate_limit.shared.allowed") == burst


def test_demo_chain_throttles_a_looping_client_while_another_user_continues(demo_api, envoy_factory):
    money = [{"methods": ["POST"], "path_prefix": "/v1/"}]
    envoy = envoy_factory([
        harness.buffer_filter(),
        # Budget for 30 requests at once plus one a second: the 20 signed ones fit, the flood not.
        rate_limit("per-ip", [rule("ip-money", requests=1, per_seconds=1, burst=30, routes=money)]),
        two_key_signature_filter(),
        rate_limit("per-user", [rule("user-money", key="user", requests=1, per_seconds=60, burst=5, routes=money)]),
    ])
    looping = [new_ref() for _ in range(15)]
    statuses = [signed_transfer(envoy, ref).status for ref in looping]
    assert statuses == [201] * 5 + [429] * 10
    assert sum(demo_api.executed(ref) for ref in looping) == 5
    other = [new_ref() for _ in range(5)]
    assert [signed_transfer(envoy, ref, SECOND_KEY_ID, SECOND_SECRET_B64).status for ref in other] == [201] * 5
    # Unsigned floods are refused before signature checking costs anything, by the per-IP rule
    # once its budget is spent; the per-user instance never saw them.
    unsigned = [envoy.request("POST", "/v1/transfers", JSON, transfer(new_ref())).status for _ in range(60)]
    assert 429 in unsigned and set(unsigned) <= {401, 429}
    assert envoy.counter("firebreak.rate_limit.per-ip.rejected.rate_limited") >= 1
    assert envoy.counter("firebreak.rate_limit.per-user.rejected.rate_limited") == 10


def test_report_only_counts_and_logs_without_blocking(envoy_factory):
    envoy = envoy_factory([rate_limit("trial", [rule("per-ip", burst=2, mode="report_only")])])
    assert [envoy.request("GET", BALANCE).status for _ in range(5)] == [200] * 5
    assert envoy.counter("firebreak.rate_limit.trial.rule.per-ip.would_limit") == 3
    assert envoy.counter("firebreak.rate_limit.trial.would_reject.rate_limited") == 3
    assert envoy.counter("firebreak.rate_limit.trial.rule.per-ip.allowed") == 2
    assert envoy.logs().count("would_reject status=429 code=rate_limited instance=trial") == 3
    assert envoy.logs().count("rule=per-ip ip=127.0.0.1/32 retry_after_ms=") == 3


def test_headers_on_allowed_responses_when_configured(envoy_factory):
    envoy = envoy_factory([rate_limit("hdr", [rule("per-ip", burst=3)], response_headers=True)])
    r = envoy.request("GET", BALANCE)
    assert r.status == 200
    assert r.headers["ratelimit-policy"] == '"per-ip";q=3;w=10800'
    assert r.headers["ratelimit"] == '"per-ip";r=2;t=3600'
    quiet = envoy_factory([rate_limit("quiet", [rule("per-ip", burst=3)])])
    assert "ratelimit" not in quiet.request("GET", BALANCE).headers


@pytest.mark.parametrize("config, field", [
    ({"rules": [rule()]}, "name"),
    ({"name": "x", "rules": []}, "rules"),
    ({"name": "x", "rules": [rule(burst=0)]}, "rules[0].burst"),
    ({"name": "x", "rules": [rule(key="header")]}, "rules[0].key"),
    ({"name": "x", "rules": [rule()], "ipv6_prefix": 200}, "ipv6_prefix"),
])
def test_invalid_configuration_refuses_to_start(envoy_factory, config, field):
    envoy = envoy_factory([harness.wasm_filter("rate_limit", config)], expect_failure=True)
    assert f"config_error field={field}" in envoy.logs()
    assert envoy.proc.returncode != 0


def test_admitted_rate_under_five_times_overload(envoy_factory, bootstrap_patch):
    """Issue 6 accuracy, measured through real Envoy: 20/s offered 100/s for 10 s. GCRA admits at
    most burst + rate * elapsed (a hard bound); while the client never pauses longer than the burst
    takes to refill (here 500 ms), it admits within 2% of that."""
    # FIREBREAK_RL_ACCURACY_SECONDS=60 for a longer measurement (the README reports both).
    seconds = int(os.environ.get("FIREBREAK_RL_ACCURACY_SECONDS", "10"))
    rate, burst, offered = 20, 10, 100
    bootstrap_patch()
    probe = [{"methods": ["GET"], "path_prefix": "/probe/"}]
    envoy = envoy_factory([rate_limit("accuracy", [rule("per-ip", requests=rate, per_seconds=1, burst=burst, routes=probe)])])
    sends, lock = [], threading.Lock()
    start = time.monotonic()

    def worker(t):
        n = 0
        while True:
            due = start + (n * 5 + t) / offered  # 5 threads, interleaved, `offered` per second
            if due >= start + seconds:
                return
            time.sleep(max(0.0, due - time.monotonic()))
            sent = time.monotonic()
            status = envoy.request("GET", PROBE).status
            with lock:
                sends.append((sent, status))
            n += 1
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    end = time.monotonic()
    admitted = sum(1 for _, s in sends if s == 200)
    assert set(s for _, s in sends) <= {200, 429}
    elapsed = end - start
    assert admitted <= burst + rate * elapsed + 1, (admitted, elapsed)
    times = sorted(t for t, _ in sends)
    max_gap = max(b - a for a, b in zip(times, times[1:]))
    expected = burst + rate * (times[-1] - start)
    print(f"\naccuracy: offered {len(sends)} in {elapsed:.2f}s, admitted {admitted}, "
          f"expected {expected:.1f} ({100 * (admitted - expected) / expected:+.2f}%), max client gap {max_gap * 1000:.0f} ms")
    if max_gap >= burst / rate:
        pytest.skip(f"client stalled {max_gap:.2f}s (machine overloaded): lower bound not meaningful")
    assert admitted >= 0.98 * expected, (admitted, expected)


def test_the_readme_envoy_yaml_works_as_documented(demo_api, tmp_path):
    """plugins/rate-limit/envoy.yaml, with free ports and this run's demo API: the README's claim."""
    text = (harness.ROOT / "plugins" / "rate-limit" / "envoy.yaml").read_text()
    port, admin = harness.free_port(), harness.free_port()
    for old, new in [("port_value: 10000", f"port_value: {port}"), ("port_value: 9901", f"port_value: {admin}"),
                     ("port_value: 18080", f"port_value: {demo_api.port}"),
                     ("filename: target/", f"filename: {harness.ROOT}/target/")]:
        assert old in text, old
        text = text.replace(old, new)
    config = tmp_path / "envoy.yaml"
    config.write_text(text)
    log = tmp_path / "envoy.log"
    env = dict(os.environ, **{harness.DEMO_KEY_ENV: harness.DEMO_SECRET_B64})
    proc = subprocess.Popen([str(harness.ENVOY), "-c", str(config), "--concurrency", "2", "--use-dynamic-base-id",
                             "--disable-hot-restart", "-l", "warning"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    try:
        harness.wait_for(lambda: harness.send(admin, "GET", "/ready", timeout=1).status == 200, 30, "envoy", proc, log)
        url = f"http://127.0.0.1:{port}/v1/transfers"
        statuses = []
        for _ in range(7):
            body = transfer(new_ref())
            statuses.append(harness.send(port, "POST", "/v1/transfers", JSON + harness.sign("POST", url, body), body).status)
        assert statuses == [201] * 5 + [429] * 2
        assert harness.send(port, "GET", BALANCE).status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def raw_request(port: int, request_line: bytes) -> int:
    """The status of one request whose request line is sent as raw bytes (0: connection closed)."""
    import socket
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request_line + b"\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    m = re.match(rb"HTTP/1\.1 (\d{3})", data)
    return int(m.group(1)) if m else 0


def test_a_path_that_is_not_utf8_is_not_an_unlimited_path(envoy_factory):
    # The filter reads header values lossily; a path it cannot read must not match "no route".
    # Envoy 1.40's HTTP/1 codec refuses such a request line itself (the filter's own refusal,
    # 400 request_headers_invalid, is defence in depth for hosts and codecs that pass it).
    envoy = envoy_factory([rate_limit("raw", [rule(routes=[{"path_prefix": "/v1/"}], burst=1)])])
    statuses = [raw_request(envoy.port, b"GET /v1/accounts/\xff\xfe/balance HTTP/1.1") for _ in range(3)]
    # Either Envoy refuses such a path itself, or the filter does; it never passes unlimited.
    assert all(status in (0, 400) for status in statuses), statuses
