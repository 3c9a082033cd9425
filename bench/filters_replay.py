"""replay-guard's bench configuration (as in plugins/replay-guard/README.md): the transfers route
with a required Idempotency-Key (every benchmark request has its own), tables sized for the keys a
run creates. Alone it runs without request-signature, so without a principal; in the chain it
requires the principal request-signature verified, as on a money route."""

MONEY_ROUTE = {"methods": ["POST"], "path_exact": "/v1/transfers"}


def replay_guard(harness, purpose: str, in_chain: bool = False) -> dict:
    return harness.wasm_filter("replay_guard", {
        "routes": [{"name": "transfers", "match": MONEY_ROUTE, "idempotency_key": "required",
                    "require_principal": in_chain}],
        "ttl_seconds": 86400,
        "in_flight_timeout_ms": 30000,
        "max_stored_body_bytes": 4096,
        "stored_headers": ["content-type", "location"],
        # One tenant sends every request of a run: its quota is the most a table allows
        # (capacity / 2), and the table is sized so a run stays under it.
        "key_store": {"buckets": 65536, "slots_per_bucket": 16, "quota_per_principal": 65536 * 16 // 2},
        "collapse_store": {"buckets": 256, "slots_per_bucket": 8},
    })
