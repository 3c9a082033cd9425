"""The bench configurations of rate-limit, env-guard, replay-guard and the full chain, the latter
in two forms: separate modules (one wasm filter per module) and one module (`firebreak_chain`,
one section per filter, the very same filter configurations in the same order). Then the same
again in the native module (`libfirebreak.so`, an Envoy dynamic module): each filter with its wasm
row's configuration, and the chain with the one-module chain's sections.

Each filter is configured as its README and end-to-end tests configure it, with budgets and
tables sized so that every benchmark request is accepted (the benchmark measures accepted
requests; rejections are counted and reported). The pre-signed requests carry
`x-bench-client: c0000..c0999` (1,000 clients, CPU runs) and `x-bench-user: u<n>` (one per
request, memory runs), and a unique `Idempotency-Key` covered by the signature.
"""

from __future__ import annotations

import hashlib
import json
import os

MONEY = [{"methods": ["POST"], "path_prefix": "/v1/"}]
CHAIN_ORDER = ["request_signature", "rate_limit", "env_guard", "replay_guard"]  # replay-guard last: README


def _have(harness, module: str) -> bool:
    return (harness.WASM_DIR / f"{module}.wasm").exists()


def register(configs: dict, harness, signature):
    def rate_limit(purpose: str) -> dict:
        # Keyed per client (1,000 clients) in CPU runs, per request (100,000 keys) in memory runs.
        header = "x-bench-client" if purpose == "cpu" else "x-bench-user"
        return harness.wasm_filter("rate_limit", {
            "name": "bench",
            "rules": [{"name": "per-user", "routes": MONEY, "key": "user",
                       "requests": 1000000, "per_seconds": 1, "burst": 1000000}],
            "trusted_user_header": header,
            "table": {"buckets": 16384, "slots_per_bucket": 16},
        }, vm_id="rate_limit", root_id="rate_limit_bench")

    def env_guard(purpose: str) -> dict:
        prod_key = "bench-production-push-key-never-sent"
        return harness.wasm_filter("env_guard", {
            "environment": "uat",
            "production": False,
            "protected_credentials": [{"label": "apns-prod", "sha256": hashlib.sha256(prod_key.encode()).hexdigest(),
                                       "length": len(prod_key.encode())}],
            "patterns": [{"label": "stripe-live", "prefix": "sk_live_"}],
            "production_hosts": ["api.push.apple.com", "*.prod.example.com"],
            "routes": [{"path_prefix": "/v1/"}],
            "max_body_bytes": 65536,
            "max_decoded_bytes": 262144,
            "over_limit": "block",
        })

    def replay_guard(purpose: str, in_chain: bool = False) -> dict:
        import filters_replay  # bench/filters_replay.py
        return filters_replay.replay_guard(harness, purpose, in_chain)

    builders = {"rate_limit": rate_limit, "env_guard": env_guard, "replay_guard": replay_guard,
                "request_signature": signature}
    body_filters = {"request_signature", "replay_guard", "env_guard"}

    for name in ["replay_guard", "rate_limit", "env_guard"]:
        if name == "replay_guard" and not _replay_known():
            continue

        def build(purpose, name=name):
            filters = [harness.buffer_filter()] if name in body_filters else []
            return filters + [builders[name](purpose)]
        configs[name] = ([name], build)

    def chain_stages(purpose: str) -> list[tuple[str, dict]]:
        """(filter, its wasm filter entry) for each chain member, in chain order."""
        return [(m, replay_guard(purpose, in_chain=True) if m == "replay_guard" else builders[m](purpose))
                for m in chain_members(harness)]

    def chain(purpose: str) -> list:
        return [harness.buffer_filter()] + [entry for _, entry in chain_stages(purpose)]

    def chain_sections(purpose: str) -> list[dict]:
        """The one-module chain's configuration: a section per member, in chain order."""
        return [{m: _configuration(entry)} for m, entry in chain_stages(purpose)]

    def chain_one_module(purpose: str) -> list:
        return [harness.buffer_filter(), harness.chain_filter(chain_sections(purpose))]

    configs["chain"] = (["request_signature"], chain)
    configs["chain_one_module"] = (["request_signature", "firebreak_chain"], chain_one_module)

    # Development: the one-module chain built another way (BENCH_CHAIN_VARIANT=<path to a
    # firebreak_chain.wasm>), to compare a build option against the default in one run.
    variant = os.environ.get("BENCH_CHAIN_VARIANT")
    if variant:
        def chain_one_module_variant(purpose: str) -> list:
            entry = harness.chain_filter(chain_sections(purpose), vm_id="firebreak_chain_variant")
            entry["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] = variant
            return [harness.buffer_filter(), entry]
        configs["chain_one_module_variant"] = (["request_signature", f"@file:{variant}"], chain_one_module_variant)

    # The native module: the same configurations, behind the same buffer filter.
    for name in ["request_signature", "replay_guard", "rate_limit", "env_guard"]:
        if name == "replay_guard" and not _replay_known():
            continue

        def build_native(purpose, name=name):
            filters = [harness.buffer_filter()] if name in body_filters else []
            return filters + [harness.native_filter(name, _configuration(builders[name](purpose)))]
        configs[f"native_{name}"] = (["@native"], build_native)

    def native_chain(purpose: str) -> list:
        return [harness.buffer_filter(), harness.native_chain_filter(chain_sections(purpose))]

    configs["native_chain"] = (["@native"], native_chain)


def _configuration(entry: dict) -> dict:
    """The filter configuration inside a wasm filter entry (harness.wasm_filter)."""
    return json.loads(entry["typed_config"]["config"]["configuration"]["value"])


def _replay_known() -> bool:
    return os.path.exists(os.path.join(os.path.dirname(__file__), "filters_replay.py"))


def chain_members(harness) -> list[str]:
    return [m for m in CHAIN_ORDER if _have(harness, m) and (m != "replay_guard" or _replay_known())]
