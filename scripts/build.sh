#!/usr/bin/env bash
# Builds every filter module to target/wasm32-wasip1/release/<name>.wasm, plus the native
# binaries the demo and the tests use (demo-api, firebreak CLI).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# Every crate under plugins/ with a cdylib target is a filter module.
plugins=()
for manifest in plugins/*/Cargo.toml; do
  # plugins/native is the Envoy dynamic module (built natively below), not a wasm module.
  if grep -q 'cdylib' "$manifest" && [ "$manifest" != plugins/native/Cargo.toml ]; then
    plugins+=(-p "$(sed -n 's/^name = "\(.*\)"/\1/p' "$manifest" | head -n 1)")
  fi
done
cargo build --quiet --release --target wasm32-wasip1 "${plugins[@]}"
cargo build --quiet --release -p firebreak-demo-api -p firebreak-cli -p firebreak-wasm-trim
# Each filter's module without the callbacks its filter does not act on (tools/wasm-trim): Envoy
# never enters its VM for them. In place and idempotent.
for filter in request_signature replay_guard rate_limit env_guard; do
  target/release/firebreak-wasm-trim "target/wasm32-wasip1/release/$filter.wasm" >/dev/null
done
# The Envoy dynamic module: target/native/libfirebreak.so. First its fault-injection build, for
# the tests only (target/native-faults/libfirebreak.so: a request can make a hook panic).
cargo build --quiet --profile native -p firebreak-native --features fault-injection
mkdir -p target/native-faults
cp target/native/libfirebreak.so target/native-faults/libfirebreak.so
cargo build --quiet --profile native -p firebreak-native
echo "built target/native/libfirebreak.so ($(stat -c %s target/native/libfirebreak.so) bytes)"
for wasm in target/wasm32-wasip1/release/*.wasm; do
  case "$(basename "$wasm")" in firebreak_test_filter.wasm) continue ;; esac
  echo "built $wasm ($(stat -c %s "$wasm") bytes)"
done
