"""amount-limit through real Envoy: the README's snippet as written; incident 1's pattern (twenty
concurrent signed withdrawals of 5 against a per-account budget of 20: the ledger never exceeds
the budget) in the one-module chain and in the native module; exact arithmetic at the budget's
edge and per-currency budgets; every malformed amount refused with its code before the money API;
report-only then enforce; two Envoy instances sharing one budget on Redis, failing closed when
Redis is down; a tenant's quota of debt records per quota window on Redis (nothing written over
it; re-charging existing records costs quota again once the window rolls over); and the
demo chain (envoy/demo.yaml) stopping the pattern."""

import json
import re
import subprocess
import threading
import time
import uuid

import pytest
import yaml

import harness

JSON = [("content-type", "application/json")]


def ref() -> str:
    return f"amt-{uuid.uuid4().hex[:12]}"


def withdrawal(account="acc-alice", amount=5, currency="CNY", reference=None, raw_amount=None) -> tuple[bytes, str]:
    reference = reference or ref()
    amount_text = raw_amount if raw_amount is not None else json.dumps(amount)
    body = f'{{"account": "{account}", "amount": {amount_text}, "currency": "{currency}", "reference": "{reference}"}}'
    return body.encode(), reference


def rule(**overrides) -> dict:
    r = {"name": "per-account", "routes": [{"methods": ["POST"], "path_exact": "/v1/withdrawals"}],
         "amount_pointer": "/amount", "amount_format": "minor_units", "currency_pointer": "/currency",
         "key": ["principal", "/account"],
         "budgets": {"CNY": {"exponent": 2, "amount_minor": 20, "window_s": 86400},
                     "JPY": {"exponent": 0, "amount_minor": 1000, "window_s": 86400}}}
    r.update(overrides)
    return r


def sections(amount_config: dict) -> list[dict]:
    """request-signature, then amount-limit last (it charges only what the chain forwards)."""
    return [{"request_signature": harness.signature_config()}, {"amount_limit": amount_config}]


def chain(runtime: str, amount_config: dict) -> list[dict]:
    if runtime == "native":
        return [harness.buffer_filter(), harness.native_chain_filter(sections(amount_config))]
    return [harness.buffer_filter(), harness.chain_filter(sections(amount_config))]


def concurrently(n: int, fire):
    gate = threading.Barrier(n)
    results = [None] * n

    def run(i):
        gate.wait()
        results[i] = fire(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return results


def ledger_total(demo_api, references) -> int:
    refs = set(references)
    return sum(op["amount"] for op in demo_api.ledger() if op.get("reference") in refs)


def yaml_blocks(readme: str) -> list[str]:
    return [block.split("```")[0] for block in readme.split("```yaml\n")[1:]]


def test_the_readme_snippet_works_as_written(envoy_factory, demo_api):
    readme = (harness.ROOT / "plugins" / "amount-limit" / "README.md").read_text()
    blocks = yaml_blocks(readme)
    parsed = yaml.safe_load(next(b for b in blocks if "envoy.filters.http.wasm" in b and "buffer" in b))
    http_filters = [f for f in parsed["http_filters"] if f["name"] != "envoy.filters.http.router"]
    for f in http_filters:
        if f["name"] == "envoy.filters.http.wasm":
            code = f["typed_config"]["config"]["vm_config"]["code"]["local"]
            code["filename"] = str(harness.ROOT / code["filename"])
    hcm_options = yaml.safe_load(next(b for b in blocks if "normalize_path: true" in b))
    assert hcm_options == harness.HARDENED_HCM
    gw = envoy_factory(http_filters, hcm_options=hcm_options)
    refs = []
    for _ in range(4):
        body, r = withdrawal(amount=5)
        refs.append(r)
        assert gw.request("POST", "/v1/withdrawals", JSON, body).status == 201
    body, r = withdrawal(amount=1)
    over = gw.request("POST", "/v1/withdrawals", JSON, body)
    assert (over.status, over.error) == (429, "amount_limited"), over.body
    assert over.headers["ratelimit-policy"] == '"per-account.CNY";q=20;w=86400'
    assert demo_api.executed(r) == 0
    assert ledger_total(demo_api, refs) == 20
    body, r = withdrawal(account="acc-bob", raw_amount="-5")
    bad = gw.request("POST", "/v1/withdrawals", JSON, body)
    assert (bad.status, bad.error) == (400, "amount_invalid") and demo_api.executed(r) == 0
    assert gw.counter("firebreak.amount_limit.rejected.amount_limited") == 1
    assert gw.counter("firebreak.amount_limit.rejected.amount_invalid.negative") == 1


@pytest.mark.parametrize("runtime", ["wasm", "native"])
def test_twenty_concurrent_withdrawals_of_five_never_exceed_a_budget_of_twenty(envoy_factory, demo_api, runtime):
    gw = envoy_factory(chain(runtime, {"rules": [rule()]}))
    bodies = [withdrawal(amount=5) for _ in range(20)]
    results = concurrently(20, lambda i: gw.signed("POST", "/v1/withdrawals", bodies[i][0], headers=JSON))
    statuses = sorted(r.status for r in results)
    assert statuses == [201] * 4 + [429] * 16, [r.body for r in results]
    assert all(r.error == "amount_limited" for r in results if r.status == 429)
    # The ledger: exactly the budget, never more.
    assert ledger_total(demo_api, [r for _, r in bodies]) == 20
    assert gw.counter("firebreak.amount_limit.rule.per-account.limited") == 16
    # The same account under another principal is another key; the same principal's other
    # account too.
    body, r = withdrawal(account="acc-bob", amount=20)
    assert gw.signed("POST", "/v1/withdrawals", body, headers=JSON).status == 201


@pytest.mark.parametrize("runtime", ["wasm", "native"])
def test_exact_edges_and_per_currency_budgets(envoy_factory, demo_api, runtime):
    gw = envoy_factory(chain(runtime, {"rules": [rule()]}))

    def send(**kw):
        body, r = withdrawal(**kw)
        return gw.signed("POST", "/v1/withdrawals", body, headers=JSON), r

    assert send(amount=19)[0].status == 201
    assert send(amount=1)[0].status == 201, "exactly at the budget"
    over, r = send(amount=1)
    assert (over.status, over.error) == (429, "amount_limited") and demo_api.executed(r) == 0
    # One unit comes back after 86400 / 20 = 4320 s (minus the seconds this test has taken).
    assert re.fullmatch(r'"per-account.CNY";r=0;t=86[34]\d\d', over.headers["ratelimit"]), over.headers["ratelimit"]
    assert 4300 <= int(over.headers["retry-after"]) <= 4320
    assert send(amount=1000, currency="JPY")[0].status == 201, "the yen has its own budget"
    assert send(amount=1, currency="JPY")[0].status == 429
    never, _ = send(account="acc-carol", amount=21)
    assert (never.status, never.error, never.headers["retry-after"]) == (429, "amount_limited", "86400")
    assert send(account="acc-carol", amount=20)[0].status == 201, "the refusal cost nothing"


MALFORMED = [
    ('"account": "acc-carol", "amount": -5, "currency": "CNY"', "amount_invalid", "negative"),
    ('"account": "acc-carol", "amount": 2.5, "currency": "CNY"', "amount_invalid", "fractional"),
    ('"account": "acc-carol", "amount": 5e0, "currency": "CNY"', "amount_invalid", "exponent"),
    ('"account": "acc-carol", "amount": 18446744073709551616, "currency": "CNY"', "amount_invalid", "overflow"),
    ('"account": "acc-carol", "amount": "5", "currency": "CNY"', "amount_invalid", "wrong_type"),
    ('"account": "acc-carol", "currency": "CNY"', "amount_invalid", "missing"),
    ('"account": "acc-carol", "amount": 1, "amount": 5000, "currency": "CNY"', "amount_body_invalid", "duplicate_key"),
    ('"account": "acc-carol", "amount": 5, "currency": "EUR"', "amount_currency_invalid", "unknown"),
    ('"amount": 5, "currency": "CNY"', "amount_key_invalid", "missing"),
    ('"account": 17, "amount": 5, "currency": "CNY"', "amount_key_invalid", "wrong_type"),
]


@pytest.mark.parametrize("runtime", ["wasm", "native"])
def test_every_malformed_amount_is_refused_with_its_code_and_never_reaches_the_api(envoy_factory, demo_api, runtime):
    gw = envoy_factory(chain(runtime, {"rules": [rule()]}))
    for fields, code, reason in MALFORMED:
        r = ref()
        body = f'{{{fields}, "reference": "{r}"}}'.encode()
        answer = gw.signed("POST", "/v1/withdrawals", body, headers=JSON)
        assert (answer.status, answer.error) == (400, code), (fields, answer.body)
        assert answer.headers["x-firebreak-error"] == code
        assert demo_api.executed(r) == 0, fields
        assert gw.counter(f"firebreak.amount_limit.rejected.{code}.{reason}") >= 1, (fields, reason)
    not_json = gw.signed("POST", "/v1/withdrawals", b"account=acc-carol&amount=5", headers=[("content-type", "text/plain")])
    assert (not_json.status, not_json.error) == (400, "amount_body_invalid")
    # Nothing of that consumed acc-carol's budget.
    body, r = withdrawal(account="acc-carol", amount=20)
    assert gw.signed("POST", "/v1/withdrawals", body, headers=JSON).status == 201
    assert f"code=amount_invalid reason=negative" in gw.logs()


def test_report_only_then_enforce(envoy_factory, demo_api):
    report = envoy_factory(chain("wasm", {"rules": [rule(mode="report_only")]}))
    bodies = [withdrawal(amount=5) for _ in range(5)]
    assert [report.signed("POST", "/v1/withdrawals", b, headers=JSON).status for b, _ in bodies] == [201] * 5
    assert ledger_total(demo_api, [r for _, r in bodies]) == 25
    assert report.counter("firebreak.amount_limit.would_reject.amount_limited") == 1
    assert "would_reject status=429 code=amount_limited" in report.logs()
    enforce = envoy_factory(chain("wasm", {"rules": [rule()]}))
    bodies = [withdrawal(amount=5) for _ in range(5)]
    assert [enforce.signed("POST", "/v1/withdrawals", b, headers=JSON).status for b, _ in bodies] == [201] * 4 + [429]


@pytest.fixture(scope="module")
def redis_bridge():
    bridge = harness.RedisBridge()
    yield bridge
    bridge.stop()


@pytest.mark.parametrize("runtime", ["wasm", "native"])
def test_two_instances_share_one_budget_on_redis_and_fail_closed_without_it(envoy_factory, demo_api, redis_bridge, runtime):
    config = {"rules": [rule(key=["/account"])], "state": harness.redis_state()}
    account = f"acc-{uuid.uuid4().hex[:6]}"  # a fresh key in the shared Redis
    a, b = (envoy_factory(chain(runtime, config), extra_clusters=[redis_bridge.cluster()]) for _ in range(2))
    # The account does not exist at the API (404 after the charge): only the charges count here.
    bodies = [withdrawal(account=account, amount=5) for _ in range(20)]
    results = concurrently(20, lambda i: (a, b)[i % 2].signed("POST", "/v1/withdrawals", bodies[i][0], headers=JSON))
    assert sorted(r.status for r in results).count(429) == 16, [r.body for r in results]
    assert {r.status for r in results} == {404, 429}
    for gw in (a, b):
        assert gw.counter("firebreak.amount_limit.redis.calls") >= 1
    # Exact at the edge on Redis too (the script's arithmetic), across the pair: 999 + 1 yen of a
    # 1000 budget pass, one more does not.
    yen = f"acc-{uuid.uuid4().hex[:6]}"
    assert a.signed("POST", "/v1/withdrawals", withdrawal(account=yen, amount=999, currency="JPY")[0], headers=JSON).status == 404
    assert b.signed("POST", "/v1/withdrawals", withdrawal(account=yen, amount=1, currency="JPY")[0], headers=JSON).status == 404
    over = a.signed("POST", "/v1/withdrawals", withdrawal(account=yen, amount=1, currency="JPY")[0], headers=JSON)
    assert (over.status, over.error) == (429, "amount_limited")
    assert over.headers["ratelimit-policy"] == '"per-account.JPY";q=1000;w=86400'
    redis_bridge.stop_redis()
    try:
        body, r = withdrawal(account=account, amount=0)
        down = a.signed("POST", "/v1/withdrawals", body, headers=JSON)
        assert (down.status, down.error) == (503, "state_unavailable") and demo_api.executed(r) == 0
        assert a.counter("firebreak.amount_limit.redis.failed") >= 1
    finally:
        redis_bridge.start_redis()


def redis_values(bridge, pattern: str) -> dict[str, str]:
    """Every key matching `pattern` with its value, straight from redis-server (webdis does not
    render SCAN's reply)."""
    out = subprocess.run(["redis-cli", "-p", str(bridge.redis_port), "--scan", "--pattern", pattern],
                         check=True, capture_output=True, text=True, timeout=10).stdout
    return {key: bridge.command("GET", key)["GET"] for key in out.splitlines() if key}


@pytest.mark.parametrize("runtime", ["wasm", "native"])
def test_a_tenant_over_its_quota_on_redis_is_refused_and_writes_nothing(envoy_factory, demo_api, redis_bridge, runtime):
    """The per-tenant quota of debt records holds on Redis (no tenant minting account ids can
    fill it): counted in the budget script, a refusal writes nothing, the tenant's existing
    records are still charged, and another tenant still opens new ones."""
    state = harness.redis_state()
    keys = [{"id": harness.DEMO_KEY_ID, "secret_env": harness.DEMO_KEY_ENV},
            {"id": harness.SECOND_KEY_ID, "secret_env": harness.SECOND_KEY_ENV}]
    stages = [{"request_signature": harness.signature_config(keys=keys)},
              {"amount_limit": {"rules": [rule(key=["/account"])], "table": {"quota_per_tenant": 2}, "state": state}}]
    stage = harness.native_chain_filter(stages) if runtime == "native" else harness.chain_filter(stages)
    gw = envoy_factory([harness.buffer_filter(), stage], extra_clusters=[redis_bridge.cluster()])
    pattern = f"{state['key_prefix']}:amt:*"
    accounts = [f"acc-{uuid.uuid4().hex[:8]}" for _ in range(3)]

    def send(account, key=(harness.DEMO_KEY_ID, harness.DEMO_SECRET_B64)):
        body, r = withdrawal(account=account, amount=5)
        sig = harness.sign("POST", gw.url("/v1/withdrawals"), body, key_id=key[0], secret_b64=key[1])
        return gw.request("POST", "/v1/withdrawals", JSON + sig, body), r

    # The accounts do not exist at the API (404 after the charge): only the charges count here.
    assert [send(a)[0].status for a in accounts[:2]] == [404, 404]
    before = redis_values(redis_bridge, pattern)
    counts = {k: v for k, v in before.items() if ":amt:quota:" in k}
    assert [v.split(":")[-1] for v in counts.values()] == ["2"] and len(before) == 3, before
    over, r = send(accounts[2])
    assert (over.status, over.error) == (429, "tenant_quota_exceeded"), over.body
    assert demo_api.executed(r) == 0
    assert redis_values(redis_bridge, pattern) == before, "nothing written"
    assert gw.counter("firebreak.amount_limit.rejected.tenant_quota_exceeded") == 1
    # Its existing record is charged (not a new one): one record's debt grows, the count does not.
    assert send(accounts[0])[0].status == 404
    after = redis_values(redis_bridge, pattern)
    assert after.keys() == before.keys() and [k for k in after if after[k] != before[k]] != [], after
    assert {k: after[k] for k in counts} == counts
    # Another tenant (another verified principal) opens its own records.
    assert send(accounts[2], key=(harness.SECOND_KEY_ID, harness.SECOND_SECRET_B64))[0].status == 404
    last = redis_values(redis_bridge, pattern)
    assert len(last) == 5 and sorted(v.split(":")[-1] for k, v in last.items() if ":amt:quota:" in k) == ["1", "2"], last
    # Every key expires by itself; a count with the longest window and a second.
    for key in last:
        ttl = redis_bridge.command("PTTL", key)["PTTL"]
        assert 0 < ttl <= 86_401_000, (key, ttl)


@pytest.mark.parametrize("runtime", ["wasm", "native"])
def test_re_charging_existing_records_costs_quota_again_in_each_window_on_redis(envoy_factory, demo_api, redis_bridge,
                                                                                runtime):
    """The quota counts the records a tenant charges per quota window, new or existing: with a
    quota of 2, records A and B fill it (charging A again is free), a new C is refused; once the
    quota window (a 2 s budget window and a second) rolls over, A and B, kept alive meanwhile,
    cost a unit each again, and a third distinct record in that window is refused. (The previous
    version counted only openings: A and B were free forever, and C passed in the new window.)"""
    state = harness.redis_state()
    short = rule(key=["/account"], budgets={"CNY": {"exponent": 2, "amount_minor": 20, "window_s": 2}})
    config = {"rules": [short], "table": {"quota_per_tenant": 2}, "state": state}
    gw = envoy_factory(chain(runtime, config), extra_clusters=[redis_bridge.cluster()])
    a, b, c = (f"acc-{uuid.uuid4().hex[:8]}" for _ in range(3))

    def send(account):
        body, r = withdrawal(account=account, amount=1)
        return gw.signed("POST", "/v1/withdrawals", body, headers=JSON), r

    # The accounts do not exist at the API (404 after the charge): only the charges count here.
    assert [send(x)[0].status for x in (a, b, a)] == [404, 404, 404]
    over, r = send(c)
    assert (over.status, over.error) == (429, "tenant_quota_exceeded") and demo_api.executed(r) == 0
    counts = redis_values(redis_bridge, f"{state['key_prefix']}:amt:quota:*")
    assert [v.split(":")[-1] for v in counts.values()] == ["2"], counts
    (count_key,) = counts
    # Keep A and B alive (a unit of debt drains in a second) until the quota window has ended.
    deadline = time.monotonic() + 10
    while redis_bridge.command("EXISTS", count_key)["EXISTS"]:
        assert time.monotonic() < deadline, "the quota window never ended"
        assert [send(x)[0].status for x in (a, b)] == [404, 404]
        time.sleep(0.3)
    records = redis_values(redis_bridge, f"{state['key_prefix']}:amt:*")
    assert len(records) == 2, records  # A and B, still alive: existing records
    assert [send(x)[0].status for x in (a, b)] == [404, 404]
    assert [v.split(":")[-1] for v in redis_values(redis_bridge, count_key).values()] == ["2"], "each cost a unit"
    over, r = send(c)
    assert (over.status, over.error) == (429, "tenant_quota_exceeded") and demo_api.executed(r) == 0
    assert gw.counter("firebreak.amount_limit.rejected.tenant_quota_exceeded") == 2


@pytest.mark.parametrize("runtime", ["wasm", "native"])
def test_a_report_only_rules_new_record_over_the_quota_on_redis_is_reported_and_not_written(envoy_factory, demo_api,
                                                                                            redis_bridge, runtime):
    """On real Redis: the enforced rule's charge goes on while a report-only rule's new record
    over the tenant's quota is left out (would_reject); an enforced rule's new record over it
    refuses the request and writes nothing."""
    state = harness.redis_state()
    shadow = rule(name="shadow", key=["/account"], mode="report_only")
    config = {"rules": [shadow, rule(key=["/account"])], "table": {"quota_per_tenant": 3}, "state": state}
    gw = envoy_factory(chain(runtime, config), extra_clusters=[redis_bridge.cluster()])
    pattern = f"{state['key_prefix']}:amt:*"
    accounts = [f"acc-{uuid.uuid4().hex[:8]}" for _ in range(3)]

    def send(account):
        body, r = withdrawal(account=account, amount=5)
        return gw.signed("POST", "/v1/withdrawals", body, headers=JSON), r

    assert send(accounts[0])[0].status == 404  # two new records (both rules)
    assert send(accounts[1])[0].status == 404  # the enforced rule's; the shadow's is over the quota
    # (A report-only rule's would_reject counters are declared at configure time: the native
    # module counts only declared counters.)
    assert gw.counter("firebreak.amount_limit.would_reject.tenant_quota_exceeded") == 1
    assert gw.counter("firebreak.native.uncounted") == 0
    assert "would_reject status=429 code=tenant_quota_exceeded" in gw.logs()
    before = redis_values(redis_bridge, pattern)
    assert len(before) == 4 and [v.split(":")[-1] for k, v in before.items() if ":amt:quota:" in k] == ["3"], before
    over, r = send(accounts[2])
    assert (over.status, over.error) == (429, "tenant_quota_exceeded") and demo_api.executed(r) == 0
    assert redis_values(redis_bridge, pattern) == before, "nothing written"


@pytest.mark.parametrize("runtime", ["wasm", "native"])
def test_a_refusal_after_replay_guard_on_redis_is_released_before_the_reply_leaves(envoy_factory, demo_api, redis_bridge,
                                                                                  runtime):
    """replay-guard with its state on Redis, then amount-limit: the 429 crosses replay-guard, which
    holds it (as it holds an upstream answer) until Redis has the release. On the native module
    the module's own reply waits for that write too, then leaves from the callout's answer."""
    replay = {"replay_guard": {"routes": [{"name": "withdrawals",
                                           "match": {"methods": ["POST"], "path_exact": "/v1/withdrawals"}}],
                               "ttl_seconds": 3600, "in_flight_timeout_ms": 30000,
                               "state": harness.redis_state(key_prefix=f"fb-al-{uuid.uuid4().hex[:8]}")}}
    stages = [replay, {"amount_limit": {"rules": [rule(key=["/account"])]}}]
    stage = harness.native_chain_filter(stages) if runtime == "native" else harness.chain_filter(stages)
    gw = envoy_factory([harness.buffer_filter(), stage], extra_clusters=[redis_bridge.cluster()])
    key = f'"{uuid.uuid4().hex}"'

    def send(amount):
        body, r = withdrawal(account="acc-carol", amount=amount)
        return gw.request("POST", "/v1/withdrawals", JSON + [("idempotency-key", key)], body), r

    refused, r1 = send(21)
    assert (refused.status, refused.error) == (429, "amount_limited"), refused.body
    again, r2 = send(5)
    assert again.status == 201, again.body
    assert (demo_api.executed(r1), demo_api.executed(r2)) == (0, 1)
    assert "firebreak replay_guard released" in gw.logs()
    assert "outcome_unknown_recorded" not in gw.logs()


@pytest.mark.parametrize("runtime", ["one module", "native module"])
def test_the_demo_stops_the_incident_1_pattern(demo_api, runtime):
    config = yaml.safe_load((harness.ROOT / "envoy" / "demo.yaml").read_text())
    if runtime == "native module":
        config = harness.native_bootstrap(config)
    demo = harness.Envoy([], demo_api.port, bootstrap_config=config)
    try:
        # Two clients (the per-user rate limit lets five of each through), twenty concurrent
        # withdrawals of 5.00 CNY from one account whose budget is 20.00 CNY per day.
        keys = [(harness.DEMO_KEY_ID, harness.DEMO_SECRET_B64), (harness.SECOND_KEY_ID, harness.SECOND_SECRET_B64)]
        bodies = [withdrawal(account="acc-alice", amount=500) for _ in range(20)]
        signed = [harness.sign("POST", demo.url("/v1/withdrawals"), body, key_id=keys[i % 2][0], secret_b64=keys[i % 2][1])
                  for i, (body, _) in enumerate(bodies)]
        results = concurrently(20, lambda i: demo.request("POST", "/v1/withdrawals", JSON + signed[i], bodies[i][0]))
        total = ledger_total(demo_api, [r for _, r in bodies])
        assert total == 2000, [(r.status, r.error) for r in results]
        errors = sorted(r.error for r in results if r.status != 201)
        assert errors.count("amount_limited") >= 1 and set(errors) <= {"amount_limited", "rate_limited"}, errors
        assert "firebreak amount_limit configured" in demo.logs()
    finally:
        demo.stop()


@pytest.mark.parametrize("runtime", ["one module", "native module"])
def test_a_refusal_after_replay_guard_releases_the_idempotency_key(demo_api, runtime):
    """In the demo chain amount-limit runs after replay-guard: its 429 is a local reply carrying
    x-firebreak-error, which replay-guard reads as "not forwarded" and releases the key it had
    claimed (instead of locking it as outcome unknown): the client may retry with the same key.
    The same on the native module: Envoy 1.40 gives a dynamic module no encoder callback for its
    own local reply, so the module hands the reply to its flows itself before sending it."""
    config = yaml.safe_load((harness.ROOT / "envoy" / "demo.yaml").read_text())
    if runtime == "native module":
        config = harness.native_bootstrap(config)
    demo = harness.Envoy([], demo_api.port, bootstrap_config=config)
    try:
        key = uuid.uuid4().hex

        def send(amount):
            body, r = withdrawal(account="acc-carol", amount=amount)
            headers = JSON + [("idempotency-key", f'"{key}"')]
            sig = harness.sign("POST", demo.url("/v1/withdrawals"), body,
                               extra=["-H", f'idempotency-key: "{key}"', "--cover", "idempotency-key"])
            return demo.request("POST", "/v1/withdrawals", headers + sig, body), r

        refused, r1 = send(2001)
        assert (refused.status, refused.error) == (429, "amount_limited"), refused.body
        # The 429 crossed the per-user rate-limit on its way out (it ran before amount-limit): it
        # carries that stage's RateLimit headers, in both runtimes.
        assert refused.headers.get("ratelimit", "").startswith('"user-money";'), refused.headers
        again, r2 = send(100)
        assert again.status == 201, again.body
        assert (demo_api.executed(r1), demo_api.executed(r2)) == (0, 1)
        assert "outcome_unknown_recorded" not in demo.logs()
    finally:
        demo.stop()
