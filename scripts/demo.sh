#!/usr/bin/env bash
# The demo: builds everything, starts the demo money API on 127.0.0.1:18080 and Envoy with every
# Firebreak filter on 127.0.0.1:10000 (admin on 127.0.0.1:9901). Ctrl-C stops both.
#   bash scripts/demo.sh            the chain as one wasm module (envoy/demo.yaml)
#   bash scripts/demo.sh --native   the same chain in the Envoy dynamic module (libfirebreak.so)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

bash scripts/setup.sh
bash scripts/build.sh

# The demo keys' secrets (documented in the README; never use it anywhere real).
export FIREBREAK_DEMO_KEY="${FIREBREAK_DEMO_KEY:-ZGVtby1jbGllbnQtc2VjcmV0LWRvLW5vdC11c2UtaW4tcHJvZHVjdGlvbiE=}"
export FIREBREAK_SECOND_KEY="${FIREBREAK_SECOND_KEY:-c2Vjb25kLWNsaWVudC1zZWNyZXQtZm9yLXRlc3RzLW9ubHktMzJieXRlcyE=}"

pids=()
cleanup() {
  trap - INT TERM EXIT
  echo
  echo "demo: stopping"
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup INT TERM EXIT

target/release/demo-api --listen 127.0.0.1:18080 &
pids+=($!)
config=envoy/demo.yaml
if [ "${1:-}" = "--native" ]; then
  # envoy/demo.yaml with its wasm chain replaced by the same sections in libfirebreak.so.
  mkdir -p .run
  config=.run/demo-native.json
  .venv/bin/python - "$config" <<'PY'
import json, sys
import yaml
sys.path.insert(0, "envoy/e2e")
import harness
config = harness.native_bootstrap(yaml.safe_load(open("envoy/demo.yaml")))
json.dump(config, open(sys.argv[1], "w"), indent=1)
PY
  export ENVOY_DYNAMIC_MODULES_SEARCH_PATH="$root/target/native"
fi
.venv/bin/envoy -c "$config" --concurrency 2 --use-dynamic-base-id --log-level warn \
  --component-log-level wasm:info,dynamic_modules:info &
pids+=($!)

for _ in $(seq 1 100); do
  if curl -fsS http://127.0.0.1:9901/ready >/dev/null 2>&1; then break; fi
  sleep 0.1
done
cat <<'TXT'

Firebreak demo: Envoy on http://127.0.0.1:10000 -> demo money API (ledger: GET /v1/ledger)
Try (from another terminal, in this directory):
  export FIREBREAK_DEMO_KEY=ZGVtby1jbGllbnQtc2VjcmV0LWRvLW5vdC11c2UtaW4tcHJvZHVjdGlvbiE=
  BODY='{"from":"acc-alice","to":"acc-bob","amount":100}'
  eval "$(target/release/firebreak sign --format curl -X POST --url http://127.0.0.1:10000/v1/transfers -H 'content-type: application/json' -d "$BODY")"
  curl -s http://127.0.0.1:10000/v1/ledger
Ctrl-C stops the demo.
TXT
wait -n "${pids[@]}"
