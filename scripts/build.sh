#!/usr/bin/env bash
# Builds every filter module to target/wasm32-wasip1/release/<name>.wasm, plus the native
# binaries the demo and the tests use (demo-api, firebreak CLI).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# Every crate under plugins/ with a cdylib target is a filter module.
plugins=()
for manifest in plugins/*/Cargo.toml; do
  if grep -q 'cdylib' "$manifest"; then
    plugins+=(-p "$(sed -n 's/^name = "\(.*\)"/\1/p' "$manifest" | head -n 1)")
  fi
done
cargo build --quiet --release --target wasm32-wasip1 "${plugins[@]}"
cargo build --quiet --release -p firebreak-demo-api -p firebreak-cli
for wasm in target/wasm32-wasip1/release/*.wasm; do
  case "$(basename "$wasm")" in firebreak_test_filter.wasm) continue ;; esac
  echo "built $wasm ($(stat -c %s "$wasm") bytes)"
done
