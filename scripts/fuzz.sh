#!/usr/bin/env bash
# The fuzz targets of fuzz/ (cargo fuzz, libFuzzer; docs/robustness.md).
#
#   bash scripts/fuzz.sh                 # short: replay fuzz/regressions, then each target 4 s from its corpus
#   bash scripts/fuzz.sh --time 60       # each target 60 s
#   bash scripts/fuzz.sh --long          # each target 10,000,000 executions (--runs N to change)
#   bash scripts/fuzz.sh --long --time 3600   # each target one hour
#   bash scripts/fuzz.sh --minimize      # merge what runs found into the committed corpora, minimized
#   bash scripts/fuzz.sh ... -- path flow     # only these targets
#
# Installs what it needs (the nightly toolchain, cargo-fuzz) when missing. One fuzz process at a
# time, one process (no -jobs). New inputs go to fuzz/corpus-run/<target> (git-ignored); the committed seeds in
# fuzz/corpus/<target> are only read. A crash stops the script and is left in
# fuzz/artifacts/<target>/: fix it, add a regression test in plugins/core, and commit the input
# under fuzz/regressions/<target>/ (replayed by every run of this script, and so by scripts/test.sh).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

mode=short
seconds=4
runs=10000000
time_given=false
minimize=false
targets=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --long) mode=long; shift ;;
    --time) seconds="$2"; time_given=true; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    --minimize) minimize=true; shift ;;
    --) shift; targets=("$@"); break ;;
    *) echo "usage: $0 [--long] [--time S] [--runs N] [--minimize] [-- target...]" >&2; exit 2 ;;
  esac
done

# Tools, installed once.
if ! rustup toolchain list | grep -q '^nightly'; then
  echo "== installing the nightly toolchain (rustup toolchain install nightly --profile minimal)"
  rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz (cargo install cargo-fuzz --locked)"
  cargo install cargo-fuzz --locked
fi

if [[ ${#targets[@]} -eq 0 ]]; then
  mapfile -t targets < <(cargo fuzz list --fuzz-dir fuzz)
fi

# Optimized (-O), without a sanitizer (-s none): plugins/core forbids unsafe code, so ASan would
# only slow every execution down; panics, overflows (debug assertions) and the targets' own
# property assertions abort the run.
echo "== building the fuzz targets (cargo +nightly fuzz build -O -s none --debug-assertions)"
start=$(date +%s)
cargo +nightly fuzz build -O -s none --debug-assertions --fuzz-dir fuzz
echo "   built in $(( $(date +%s) - start )) s"
bin="fuzz/target/x86_64-unknown-linux-gnu/release"

# Every crash ever found, replayed.
for target in "${targets[@]}"; do
  dir="fuzz/regressions/$target"
  if [[ -d "$dir" ]] && compgen -G "$dir/*" >/dev/null; then
    echo "== replaying $(ls "$dir" | wc -l) regression input(s) of $target"
    "$bin/$target" -runs=1 "$dir"/* >"fuzz/target/replay-$target.log" 2>&1 || {
      cat "fuzz/target/replay-$target.log" >&2
      echo "regression input of $target fails again" >&2
      exit 1
    }
  fi
done

if $minimize; then
  for target in "${targets[@]}"; do
    echo "== minimizing fuzz/corpus/$target (with fuzz/corpus-run/$target)"
    mkdir -p "fuzz/corpus-run/$target" "fuzz/corpus/$target"
    tmp="$(mktemp -d)"
    "$bin/$target" -merge=1 "$tmp" "fuzz/corpus/$target" "fuzz/corpus-run/$target" >/dev/null 2>&1
    rm -rf "fuzz/corpus/$target"
    mv "$tmp" "fuzz/corpus/$target"
    echo "   $(ls "fuzz/corpus/$target" | wc -l) inputs"
  done
  exit 0
fi

if [[ $mode == long && $time_given == false ]]; then
  limit=(-runs="$runs")
  echo "== long campaign: ${runs} executions per target"
elif [[ $mode == long ]]; then
  limit=(-max_total_time="$seconds")
  echo "== long campaign: ${seconds} s per target"
else
  limit=(-max_total_time="$seconds")
fi

mkdir -p fuzz/target/logs
printf '%-16s %12s %8s %10s %8s %8s %8s\n' target executions seconds exec/s cov ft corpus
for target in "${targets[@]}"; do
  mkdir -p "fuzz/corpus-run/$target" "fuzz/artifacts/$target" "fuzz/corpus/$target"
  log="fuzz/target/logs/$target.log"
  t0=$(date +%s.%N)
  if ! "$bin/$target" "${limit[@]}" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
      -artifact_prefix="fuzz/artifacts/$target/" "fuzz/corpus-run/$target" "fuzz/corpus/$target" >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "fuzz target $target failed: the input is in fuzz/artifacts/$target/ (see the top of this script)" >&2
    exit 1
  fi
  t1=$(date +%s.%N)
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  last=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  corp=$(sed -n 's/.* corp: \([0-9]*\)\/.*/\1/p' <<<"$last")
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  rate=$(awk -v n="${execs:-0}" -v s="$secs" 'BEGIN { printf "%d", (s > 0 ? n / s : 0) }')
  printf '%-16s %12s %8s %10s %8s %8s %8s\n' "$target" "${execs:-?}" "$secs" "$rate" "${cov:-?}" "${ft:-?}" "${corp:-?}"
done
