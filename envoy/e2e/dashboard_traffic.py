"""The gateway and the traffic behind the operators' view (docs/dashboard/): the demo's chain
(envoy/demo.yaml, with its Prometheus stats tags) with small local tables so their fill levels
move, and one more rate-limit stage whose budgets live on a Redis that is down (fail closed);
and one round of traffic that touches every panel: legitimate signed transfers, an unsigned
flood, a looping user, idempotent payouts and their retries, a production credential, a request
on the Redis-backed route. Used by envoy/e2e/test_dashboard.py (one round) and
scripts/dashboard.py (rounds over a minute or two, scraped for the picture)."""

from __future__ import annotations

import json
import re
import threading
import uuid

import yaml

import harness

DASHBOARD_DIR = harness.ROOT / "docs" / "dashboard"
JSON = [("content-type", "application/json")]
# The stage whose Redis is down: a closed port.
DEAD_REDIS = "firebreak_dead_redis"


def gateway_config(native: bool = False) -> dict:
    """envoy/demo.yaml's bootstrap, with smaller local tables and a Redis-backed stage."""
    config = yaml.safe_load((harness.ROOT / "envoy" / "demo.yaml").read_text())
    http_filters = harness.hcm(config)["http_filters"]
    (wasm,) = [f for f in http_filters if f["name"] == "envoy.filters.http.wasm"]
    value = wasm["typed_config"]["config"]["configuration"]
    chain = json.loads(value["value"])
    for section in chain["filters"]:
        (name, stage), = section.items()
        if name == "request_signature":
            stage["nonce_store"] = {"buckets": 128, "slots_per_bucket": 8, "quota_per_key_id": 512}
        if name == "rate_limit" and stage["name"] == "per-user":
            # A looping user still trips it; the second client's payouts and retries do not.
            stage["rules"][0].update(requests=120, per_seconds=60, burst=10)
        if name == "replay_guard":
            stage["key_store"] = {"buckets": 16, "slots_per_bucket": 8, "quota_per_principal": 64}
            stage["collapse_store"] = {"buckets": 16, "slots_per_bucket": 4, "quota_per_principal": 32}
    chain["filters"].append({"rate_limit": {
        "name": "shared",
        "rules": [{"name": "shared-reads", "routes": [{"methods": ["GET"], "path_prefix": "/v1/shared/"}],
                   "key": "ip", "requests": 100, "per_seconds": 1, "burst": 100}],
        "state": harness.redis_state(DEAD_REDIS, timeout_ms=100),
    }})
    chain["filters"].append({"rate_limit": {
        "name": "trial", "mode": "report_only",
        "rules": [{"name": "trial-reads", "routes": [{"methods": ["GET"], "path_prefix": "/v1/trial/"}],
                   "key": "ip", "requests": 1, "per_seconds": 60, "burst": 1}],
    }})
    value["value"] = json.dumps(chain)
    port = harness.free_port()  # nothing listens there
    config["static_resources"]["clusters"].append({
        "name": DEAD_REDIS, "type": "STATIC", "connect_timeout": "0.1s",
        "load_assignment": {"cluster_name": DEAD_REDIS, "endpoints": [{"lb_endpoints": [{
            "endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]},
    })
    return harness.native_bootstrap(config) if native else config


def report_only_trial(envoy, n=3) -> list[int]:
    """Reads on a route a report-only rate-limit would refuse after the first: all pass."""
    return [envoy.request("GET", "/v1/trial/balance").status for _ in range(n)]


def ref() -> str:
    return f"dash-{uuid.uuid4().hex[:10]}"


def signed(envoy: harness.Envoy, path: str, body: bytes, key_id=harness.DEMO_KEY_ID,
           secret=harness.DEMO_SECRET_B64, idempotency_key: str | None = None, more=()) -> harness.Response:
    extra, headers = None, list(JSON) + list(more)
    if idempotency_key:
        extra = ["-H", f'idempotency-key: "{idempotency_key}"', "--cover", "idempotency-key"]
        headers.append(("idempotency-key", f'"{idempotency_key}"'))
    sig = harness.sign("POST", envoy.url(path), body, key_id=key_id, secret_b64=secret, extra=extra)
    return envoy.request("POST", path, headers + sig, body)


def transfer(amount=1) -> bytes:
    return json.dumps({"from": "acc-alice", "to": "acc-bob", "amount": amount, "reference": ref()}).encode()


def legit(envoy, n=2) -> list[int]:
    """Signed transfers from the second client (under its per-user budget)."""
    return [signed(envoy, "/v1/transfers", transfer(), harness.SECOND_KEY_ID, harness.SECOND_SECRET_B64).status
            for _ in range(n)]


def unsigned_flood(envoy, n=10) -> list[int]:
    """Incident 1: a script sending unsigned withdrawals."""
    body = json.dumps({"account": "acc-alice", "amount": 20}).encode()
    return [envoy.request("POST", "/v1/withdrawals", JSON, body).status for _ in range(n)]


def looping_user(envoy, n=12) -> list[int]:
    """One verified user looping on transfers: over its per-user budget (burst 10)."""
    return [signed(envoy, "/v1/transfers", transfer()).status for _ in range(n)]


def payout_with_retries(envoy, retries=3) -> list[int]:
    """Incident 2: an idempotent payout retried: executed once, the retries replayed."""
    key, body = ref(), json.dumps({"account": "acc-carol", "amount": 5, "reference": ref()}).encode()
    return [signed(envoy, "/v1/payouts", body, harness.SECOND_KEY_ID, harness.SECOND_SECRET_B64, key).status
            for _ in range(1 + retries)]


def uncertain_payout(envoy, retries=2) -> list[int]:
    """A payout the upstream executes and then fails (`x-demo-fault: fail-after-commit`, 503): its
    outcome is unknown, so replay-guard locks the key and refuses the retries (409
    outcome_unknown) until an operator decides."""
    key, body = ref(), json.dumps({"account": "acc-carol", "amount": 7, "reference": ref()}).encode()
    fault = [("x-demo-fault", "fail-after-commit")]
    return [signed(envoy, "/v1/payouts", body, harness.SECOND_KEY_ID, harness.SECOND_SECRET_B64, key, fault).status
            for _ in range(1 + retries)]


def concurrent_duplicates(envoy, n=4) -> list[int]:
    """Incident 3: the same withdrawal sent several times at once (each copy freshly signed):
    executed once, the others collapsed."""
    body = json.dumps({"account": "acc-alice", "amount": 2, "reference": ref()}).encode()
    sigs = [harness.sign("POST", envoy.url("/v1/withdrawals"), body) for _ in range(n)]
    statuses = []

    def one(sig):
        statuses.append(envoy.request("POST", "/v1/withdrawals", JSON + sig, body).status)

    threads = [threading.Thread(target=one, args=(sig,)) for sig in sigs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


def credential_leak(envoy) -> int:
    """Incident 4: a production Stripe key in a request to this UAT gateway."""
    body = json.dumps({"account": "acc-alice", "amount": 1, "api_key": "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc"}).encode()
    return signed(envoy, "/v1/payouts", body, harness.SECOND_KEY_ID, harness.SECOND_SECRET_B64, ref()).status


def redis_down(envoy) -> int:
    """A read on the route whose budgets live on Redis, which is down: refused, fail closed."""
    return envoy.request("GET", "/v1/shared/balance").status


def one_round(envoy) -> dict[str, list[int]]:
    return {
        "legit": legit(envoy),
        "unsigned": unsigned_flood(envoy),
        "payout": payout_with_retries(envoy),
        "duplicates": concurrent_duplicates(envoy),
        "uncertain": uncertain_payout(envoy),
        "leak": [credential_leak(envoy)],
        "redis": [redis_down(envoy)],
        "trial": report_only_trial(envoy),
        "looping": looping_user(envoy),
    }


# ---- the dashboard's and the rules' PromQL ----

PREFIXES = {"wasm": "firebreak", "native": "envoy_dynamicmodulescustom_firebreak"}


def dashboard() -> dict:
    return json.loads((DASHBOARD_DIR / "firebreak.json").read_text())


def alert_rules() -> list[dict]:
    doc = yaml.safe_load((DASHBOARD_DIR / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def expressions(host: str) -> list[str]:
    """Every PromQL expression of the dashboard's panels and of the alert rules, for `host`
    (the dashboard's `$ns` variable set; the rules written for wasm get the native prefix)."""
    exprs = [t["expr"].replace("${ns}", PREFIXES[host]).replace("$__rate_interval", "1m")
             for panel in dashboard()["panels"] for t in panel["targets"]]
    for rule in alert_rules():
        expr = rule["expr"]
        if host == "native":
            labels = tag_names()
            expr = re.sub(r"\bfirebreak_[a-z_]+",
                          lambda m: m.group(0) if m.group(0) in labels else PREFIXES["native"] + m.group(0)[len("firebreak"):],
                          expr)
        exprs.append(expr)
    return exprs


def tag_names() -> set[str]:
    """The labels Envoy's stats tags add (docs/dashboard/envoy-stats-tags.yaml)."""
    doc = yaml.safe_load((DASHBOARD_DIR / "envoy-stats-tags.yaml").read_text())
    return {tag["tag_name"] for tag in doc["stats_config"]["stats_tags"]}


def selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """(metric name, {label: value}) of every vector selector in `expr`: each Firebreak name
    that is not one of the tags' label names, with its `=` / `=~` matchers."""
    labels_only = tag_names()
    out = []
    pattern = r"\b((?:envoy_dynamicmodulescustom_)?firebreak_[a-z_]+)\s*(\{[^}]*\})?"
    for match in re.finditer(pattern, expr):
        name, braces = match.group(1), match.group(2)
        if name in labels_only:
            continue
        out.append((name, dict(re.findall(r'(\w+)\s*=~?\s*"([^"]*)"', braces or ""))))
    return out


def grouping_labels(expr: str) -> set[str]:
    return {label.strip() for group in re.findall(r"by\s*\(([^)]*)\)", expr) for label in group.split(",") if label.strip()}


def parse_prometheus(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """`/stats/prometheus` as {metric name: [(labels, value)]}."""
    families: dict[str, list] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)", line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        families.setdefault(m.group(1), []).append((labels, float(m.group(4))))
    return families


def scrape(envoy: harness.Envoy) -> dict[str, list[tuple[dict[str, str], float]]]:
    return parse_prometheus(harness.send(envoy.admin_port, "GET", "/stats/prometheus").body.decode())
