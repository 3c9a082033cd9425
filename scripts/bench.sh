#!/usr/bin/env bash
# The benchmark (not part of the test suite): what each Firebreak filter and the whole chain (as
# separate modules and as one module; and each filter and the chain in the native module,
# libfirebreak.so) cost against bare Envoy and Envoy's native local_ratelimit, measured in one run.
# Regenerates docs/benchmarks.md and docs/benchmarks.png. About 30 minutes on two cores;
# `--quick` (about 15 minutes) for development. Other options: see `python3 bench/run.py --help`.
#   bash scripts/bench.sh [--quick] [--rounds N] [--duration S] [--skip-memory] [--skip-micro]
# Where each filter's cost goes (bench/cost.py) is part of every run; only that, keeping the
# other figures of the previous run (.run/bench/results.json) and its Redis section:
#   bash scripts/bench.sh --only ladder,hostcalls [--cost-rounds N] [--duration S]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# The load generator (Debian's wrk) and taskset (util-linux).
if ! command -v wrk >/dev/null 2>&1 || ! command -v taskset >/dev/null 2>&1; then
  echo "bench: installing wrk (apt-get)"
  sudo_cmd=""
  if [ "$(id -u)" != 0 ]; then sudo_cmd="sudo"; fi
  $sudo_cmd apt-get update -qq
  $sudo_cmd apt-get install -y -qq wrk util-linux >/dev/null
fi
if [ "$(nproc)" -lt 2 ]; then
  echo "bench: needs at least two cores (Envoy on one, load generator and upstream on the other)" >&2
  exit 1
fi

bash scripts/setup.sh
stamp=".venv/.firebreak-bench-requirements"
if ! cmp -s bench/requirements.txt "$stamp" 2>/dev/null; then
  echo "bench: installing bench/requirements.txt into .venv"
  .venv/bin/pip install --quiet --disable-pip-version-check -r bench/requirements.txt
  cp bench/requirements.txt "$stamp"
fi

# The parts to run (bench/run.py --only): main, ladder, hostcalls; all by default.
only="main,ladder,hostcalls"
prev=""
for arg in "$@"; do
  case "$arg" in --only=*) only="${arg#--only=}" ;; esac
  [ "$prev" = "--only" ] && only="$arg"
  prev="$arg"
done

build_flag=()
if ! bash scripts/build.sh; then
  echo "bench: WARNING: scripts/build.sh failed; benchmarking the modules already in target/ (see docs/benchmarks.md)" >&2
  build_flag=(--build-failed)
  cargo build --quiet --release -p firebreak-cli -p firebreak-demo-api || true
fi
# The bench tool: its own crate (not a workspace member; it links the decision core and the test
# host), built optimised into target/bench. `soft-sha`: native SHA-256 on the portable backend,
# the same code as in wasm.
echo "bench: building bench/tool (the first build compiles wasmtime: a few minutes)"
CARGO_TARGET_DIR="$root/target/bench" cargo build --quiet --release --manifest-path bench/tool/Cargo.toml --features soft-sha
# The reference trivial wasm filter (reads one header, sets one).
CARGO_TARGET_DIR="$root/target/bench" cargo build --quiet --release --target wasm32-wasip1 \
  --manifest-path bench/trivial-filter/Cargo.toml
# The signature decision loop compiled to wasm (micro-benchmark: the same code, wasm vs native).
CARGO_TARGET_DIR="$root/target/bench" cargo build --quiet --release --target wasm32-wasip1 \
  --manifest-path bench/core-wasm/Cargo.toml

# The cost breakdown's modules: the host-call probe, request-signature's ladder, the shadow runs.
case ",$only," in
  *,ladder,*|*,hostcalls,*) bash bench/build_modules.sh ;;
esac

.venv/bin/python bench/run.py "${build_flag[@]}" "$@"
.venv/bin/python bench/report.py
# The latency the Redis path adds (request-signature and rate-limit, local vs Redis via webdis).
# With --only and without main, report.py keeps the previous run's Redis section.
case ",$only," in
  *,main,*)
    redis_flags=()
    for arg in "$@"; do [ "$arg" = "--quick" ] && redis_flags=(--quick); done
    .venv/bin/python bench/redis_path.py "${redis_flags[@]}"
    ;;
esac
