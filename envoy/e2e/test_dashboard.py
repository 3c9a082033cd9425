"""The operators' view against a live scrape (docs/dashboard/): the demo chain in real Envoy, on
the proxy-wasm chain module and on the native module, gets one round of traffic touching every
panel (refusals, replays, a credential leak, Redis down; the same sections as separate wasm
modules too), then every metric the Grafana
dashboard and the Prometheus alert rules name must be in `/stats/prometheus`, with the labels
they select and group by; the fill-level gauges must show the records the traffic left; and the
alert rules must be well-formed."""

import re
import time

import pytest
import yaml

import dashboard_traffic as traffic
import harness
import test_demo


@pytest.fixture(params=["wasm", "separate modules", "native"])
def gateway(request, demo_api):
    """The chain module, the same sections as separate wasm modules (each root sweeps its own
    tables on its own tick), and the native module."""
    config = traffic.gateway_config(request.param == "native")
    if request.param == "separate modules":
        config = test_demo.separate_modules(config)
    envoy = harness.Envoy([], demo_api.port, bootstrap_config=config)
    yield ("native" if request.param == "native" else "wasm"), envoy
    envoy.stop()


def matches(series_labels: dict[str, str], matchers: dict[str, str]) -> bool:
    for label, pattern in matchers.items():
        value = series_labels.get(label, "")
        if not re.fullmatch(pattern, value):
            return False
    return True


def test_every_metric_the_dashboard_and_the_rules_name_is_exported(gateway):
    host, envoy = gateway
    rounds = traffic.one_round(envoy)
    # The traffic did what the panels show (so the scrape below is not of idle counters).
    assert 401 in rounds["unsigned"], rounds
    assert 429 in rounds["looping"], rounds
    assert rounds["payout"][0] == 201 and rounds["payout"][1:] == [201] * 3, rounds
    assert 403 in rounds["leak"] and 503 in rounds["redis"], rounds
    assert rounds["uncertain"] == [503, 409, 409], rounds
    families = traffic.scrape(envoy)
    problems = []
    for expr in traffic.expressions(host):
        names = traffic.selectors(expr)
        assert names, f"no metric found in {expr!r}"
        for name, matchers in names:
            series = families.get(name)
            if not series:
                problems.append(f"{name} (in {expr!r}) is not exported")
                continue
            # Every label the expression selects on exists (an empty matcher selects its absence,
            # a regex over a filter not configured here, e.g. amount_limit.*, is not required).
            required = {k: v for k, v in matchers.items() if v and not v.endswith(".*")}
            if not any(matches(labels, required) for labels, _ in series):
                problems.append(f"{name}{matchers} (in {expr!r}) matches no series")
        for label in traffic.grouping_labels(expr):
            if not any(label in labels for name, _ in names for labels, _ in families.get(name, [])):
                problems.append(f"label {label} (in {expr!r}) is on no series of {[n for n, _ in names]}")
    assert not problems, "\n".join(problems)

    prefix = traffic.PREFIXES[host]

    def value(name, **labels):
        return sum(v for series, v in families.get(f"{prefix}_{name}", []) if matches(series, labels))

    # The counters behind the main panels moved.
    assert value("rejected", firebreak_filter="request_signature", firebreak_code="signature_missing") >= 10
    assert value("rejected", firebreak_filter="rate_limit.per-user", firebreak_code="rate_limited") >= 1
    assert value("replayed", firebreak_filter="replay_guard") >= 3
    assert value("outcome_unknown_recorded", firebreak_filter="replay_guard") >= 1
    assert value("rejected", firebreak_filter="replay_guard", firebreak_code="outcome_unknown") >= 2
    assert value("rejected", firebreak_filter="replay_guard", firebreak_code="duplicate_request") >= 1
    assert value("rejected", firebreak_filter="rate_limit.shared", firebreak_code="state_unavailable") >= 1
    assert value("detected", firebreak_label="stripe-live", firebreak_place="body") >= 1
    assert value("store_capacity", firebreak_filter="replay_guard", firebreak_store="keys") == 16 * 8
    assert rounds["trial"] and 429 not in rounds["trial"], rounds
    assert value("would_reject", firebreak_filter="rate_limit.trial", firebreak_code="rate_limited") >= 2


def test_the_fill_gauges_count_the_live_records(gateway):
    """The payouts' idempotency keys fill replay-guard's key table (16 x 8 records); a sweep
    (about 10 ticks of 1 s) counts them. The native module sweeps at the end of a stream, so
    requests keep coming while we wait."""
    host, envoy = gateway
    for _ in range(3):
        traffic.payout_with_retries(envoy, retries=0)
    prefix = traffic.PREFIXES[host]
    deadline = time.monotonic() + 30
    used = permille = 0
    while time.monotonic() < deadline:
        envoy.request("GET", "/v1/ledger")
        families = traffic.scrape(envoy)
        keys = {"firebreak_filter": "replay_guard", "firebreak_store": "keys"}
        used = sum(v for labels, v in families.get(f"{prefix}_store_used", []) if traffic_matches(labels, keys))
        permille = sum(v for labels, v in families.get(f"{prefix}_store_fill_permille", []) if traffic_matches(labels, keys))
        if used >= 3:
            break
        time.sleep(0.5)
    assert used >= 3, f"{host}: replay_guard keys used={used}"
    assert permille == used * 1000 // 128


def traffic_matches(labels, wanted):
    return all(labels.get(k) == v for k, v in wanted.items())


def test_the_alert_rules_are_well_formed():
    doc = yaml.safe_load((traffic.DASHBOARD_DIR / "alerts.yml").read_text())
    assert set(doc) == {"groups"}
    names = set()
    for group in doc["groups"]:
        assert set(group) <= {"name", "rules", "interval"} and group["name"] and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rule["alert"]), rule["alert"]
            assert rule["expr"].count("(") == rule["expr"].count(")"), rule["expr"]
            assert rule["labels"]["severity"] in {"warning", "critical"}
            assert {"summary", "description"} <= set(rule["annotations"])
            if "for" in rule:
                assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["for"]
            names.add(rule["alert"])
    # A flood, a retry storm, a store near full, any production credential seen.
    assert names == {"FirebreakFlood", "FirebreakRetryStorm", "FirebreakStoreNearlyFull",
                     "FirebreakProductionCredentialSeen"}
    by_name = {rule["alert"]: rule["expr"] for group in doc["groups"] for rule in group["rules"]}
    assert "> 900" in by_name["FirebreakStoreNearlyFull"]
    assert "> 0" in by_name["FirebreakProductionCredentialSeen"]


def test_the_picture_script_evaluates_every_panel_query():
    """scripts/dashboard.py draws docs/dashboard/panels.png by evaluating the panels' queries
    itself: each query must have a shape it evaluates, and a made-up pair of scrapes gives the
    rate it should."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dashboard_script", harness.ROOT / "scripts" / "dashboard.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for panel in traffic.dashboard()["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("${ns}", "firebreak").replace("$__rate_interval", "10s")
            assert script.QUERY.match(expr), expr
    labels = {"firebreak_filter": "request_signature", "firebreak_code": "signature_missing"}
    samples = [{"t": float(t), "host": "wasm", "families": {"firebreak_rejected": [(labels, 5.0 * t)]}}
               for t in range(0, 21, 2)]
    expr = 'sum by (firebreak_filter, firebreak_code) (rate(${ns}_rejected{firebreak_detail=""}[$__rate_interval]))'
    series = script.evaluate(expr, samples, "firebreak")
    assert list(series) == [("request_signature", "signature_missing")]
    assert {round(v, 6) for _, v in series[("request_signature", "signature_missing")]} == {5.0}


def test_the_demo_carries_the_dashboards_stats_tags():
    tags = yaml.safe_load((traffic.DASHBOARD_DIR / "envoy-stats-tags.yaml").read_text())
    demo = yaml.safe_load((harness.ROOT / "envoy" / "demo.yaml").read_text())
    assert demo["stats_config"] == tags["stats_config"]
