#!/usr/bin/env bash
# The fault soak (docs/robustness.md, "Fault soak"): signed money traffic through two real Envoy
# 1.40 instances sharing Redis (through webdis) in front of the demo API, with concurrent
# duplicates and retries, while Redis, webdis, the upstream, the clients and a wasm VM fail on a
# schedule; then the ledger is checked against what the clients saw (nothing executed twice,
# nothing accepted and lost, every refusal with a documented code). Exits non-zero on a violation.
#
#   bash scripts/soak.sh                 # 180 s of traffic (about 3.5 minutes in all)
#   bash scripts/soak.sh --duration 60   # the short version scripts/test.sh runs
#   bash scripts/soak.sh --native        # the same on libfirebreak.so (the Envoy dynamic module)
#   bash scripts/soak.sh --inject-violation double|forward|loss|code   # self-test: must exit 1
#
# Expects scripts/setup.sh and scripts/build.sh to have run (scripts/test.sh runs them first);
# builds the test filter (host-tests/test-filter, the VM it makes trap) if it is missing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if [ ! -f target/test-filter/wasm32-wasip1/release/firebreak_test_filter.wasm ]; then
  cargo build --quiet --release --target wasm32-wasip1 --manifest-path host-tests/test-filter/Cargo.toml \
    --target-dir target/test-filter
fi
mkdir -p .run
# Bounded: the script caps --duration at 3600 s; this caps the whole run (startup, drain, verdict).
duration=180
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --duration) duration="${args[$((i + 1))]:-180}" ;;
    --duration=*) duration="${args[$i]#--duration=}" ;;
  esac
done
limit=$(( ${duration%.*} + 180 ))
exec timeout --signal=TERM --kill-after=30 "$limit" .venv/bin/python envoy/soak/soak.py "$@"
