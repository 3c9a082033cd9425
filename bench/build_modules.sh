#!/usr/bin/env bash
# Builds the benchmark's own wasm modules for the cost breakdown (run by scripts/bench.sh after
# scripts/build.sh; not part of the test suite), into target/bench/ladder/:
#   probe.wasm                       bench/probe: N host calls of one kind per request
#   noop/<module>.wasm               bench/probe with no call, trimmed to <module>'s callbacks
#                                    (tools/wasm-trim): a module that does nothing, same exports
#   step<N>/request_signature.wasm   bench/ladder --features stepN: request-signature up to step N
#   shadow/<module>.wasm             bench/ladder without a feature (the shadow module), trimmed to
#                                    <module>'s callbacks
# Each variant is one build of its crate (workspace members, the modules' release profile).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="$root/target/bench/ladder"
built="$root/target/wasm32-wasip1/release"
trim="$root/target/release/firebreak-wasm-trim"
[ -x "$trim" ] || cargo build --quiet --release -p firebreak-wasm-trim
mkdir -p "$out/noop" "$out/shadow"
modules=(request_signature rate_limit env_guard replay_guard firebreak_chain)

# A copy, never a hard link: cargo's output is a hard link to its deps/ file, which the next
# build rewrites and which tools/wasm-trim must not trim in place.
take() {  # take <built file> <destination>
  rm -f "$2"
  cp "$1" "$2"
}

build() {  # build <package> [features]
  local features=()
  [ -n "${2:-}" ] && features=(--features "$2")
  cargo build --quiet --release --target wasm32-wasip1 -p "$1" "${features[@]}"
}

echo "bench: building bench/probe and bench/ladder (the cost breakdown's modules)"
build bench-probe
take "$built/bench_probe.wasm" "$out/probe.wasm"
for m in "${modules[@]}"; do
  take "$out/probe.wasm" "$out/noop/$m.wasm"
  "$trim" "$out/noop/$m.wasm" >/dev/null
done
for step in 1 2 3 4 5; do
  build bench-ladder "step$step"
  mkdir -p "$out/step$step"
  take "$built/bench_ladder.wasm" "$out/step$step/request_signature.wasm"
  "$trim" "$out/step$step/request_signature.wasm" >/dev/null
done
build bench-ladder
take "$built/bench_ladder.wasm" "$out/shadow.wasm"
for m in "${modules[@]}"; do
  take "$out/shadow.wasm" "$out/shadow/$m.wasm"
  "$trim" "$out/shadow/$m.wasm" >/dev/null
done
ls -l "$out"/*.wasm "$out"/*/*.wasm | awk '{print "bench: built " $NF " (" $5 " bytes)"}'
# Cargo's own copies are not modules of the project: keep target/wasm32-wasip1/release/ to them.
rm -f "$built/bench_probe.wasm" "$built/bench_ladder.wasm"
