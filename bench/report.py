"""Turns .run/bench/results.json (bench/run.py) into docs/benchmarks.md and docs/benchmarks.png.
Every number in the document comes from that file; the prose around a missed target is chosen
by which target was missed and by how much."""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / ".run" / "bench" / "results.json"
DOC = ROOT / "docs" / "benchmarks.md"
CHART = ROOT / "docs" / "benchmarks.png"

FILTERS = ["request_signature", "replay_guard", "rate_limit", "env_guard"]
# The full chain as separate modules (one wasm filter each) and as one module (firebreak_chain).
CHAINS = ["chain", "chain_one_module"]
# The same filters and chain in the native module (libfirebreak.so, bench/filters.py).
NATIVE_FILTERS = [f"native_{x}" for x in FILTERS]
NATIVE_CHAIN = "native_chain"
FIREBREAK = FILTERS + CHAINS + NATIVE_FILTERS + [NATIVE_CHAIN]
TARGET_FILTER = 1.12
TARGET_CHAIN = 1.25
# Issue #15: the native chain at 0 B and 1 KiB, at 10 KiB (bodies over 1 KiB); each native filter.
TARGET_NATIVE_CHAIN = 1.15
TARGET_NATIVE_CHAIN_LARGE = 1.3
TARGET_NATIVE_FILTER = 1.05
TARGET_LAT_MEAN = 40.0
TARGET_LAT_P99 = 150.0
TARGET_WASM_NATIVE = 1.5
TARGET_HOST_CALLS = 8
TARGET_MEMORY = 1.2
SATURATED = 0.9


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=2, suffix=""):
    if v is None:
        return "n/a"
    return f"{v:.{digits}f}{suffix}"


def cpu_target(c, size):
    """The CPU target (ratio to bare Envoy) of a configuration at a body size; None for references."""
    if c in CHAINS:
        return TARGET_CHAIN
    if c in FILTERS:
        return TARGET_FILTER
    if c in NATIVE_FILTERS:
        return TARGET_NATIVE_FILTER
    if c == NATIVE_CHAIN:
        return TARGET_NATIVE_CHAIN_LARGE if size > 1024 else TARGET_NATIVE_CHAIN
    return None


def target_cell(c, sizes):
    """The headline's target column: the target, or each target with its body sizes; None for references."""
    by_target = defaultdict(list)
    for s in sizes:
        by_target[cpu_target(c, s)].append(f"{s} B")
    if None in by_target:
        return None
    if len(by_target) == 1:
        return f"<= {next(iter(by_target))}x"
    return "<= " + ", ".join(f"{t}x ({', '.join(ss)})" for t, ss in sorted(by_target.items()))


def verdict(value, target, lower_is_better=True):
    if value is None:
        return "not measured"
    ok = value <= target if lower_is_better else value >= target
    if ok:
        return "**met**"
    return f"**missed** by {value / target - 1:.0%}" if target else "**missed**"


class Results:
    def __init__(self, data: dict):
        self.d = data
        self.labels = data["labels"]
        self.configs = data["configs"]
        self.sizes = data["params"]["sizes"]
        self.rounds = data["params"]["rounds"]
        # runs[(config, size)][round] = run
        self.cpu = defaultdict(dict)
        for run in data["cpu_runs"]:
            self.cpu[(run["config"], run["size"])][run["round"]] = run
        self.lat = defaultdict(dict)
        for run in data["latency_runs"]:
            self.lat[run["config"]][run["round"]] = run

    def label(self, c):
        label = self.labels.get(c, c)
        members = [m.replace("_", "-") for m in self.d.get("chain_members", [])]
        if c == "chain":
            label += " (" + " + ".join(["buffer"] + members) + ")"
        elif c == "chain_one_module":
            label += " (buffer + firebreak_chain: " + ", ".join(members) + ")"
        elif c == NATIVE_CHAIN:
            label += " (buffer + libfirebreak.so chain: " + ", ".join(members) + ")"
        return label

    def cpu_ratio(self, c, size, base="bare"):
        """Median over rounds of the per-round ratio of Envoy CPU time per request."""
        ratios = []
        for r, run in self.cpu[(c, size)].items():
            b = self.cpu[(base, size)].get(r)
            if b and b["cpu_us_per_req"] > 0:
                ratios.append(run["cpu_us_per_req"] / b["cpu_us_per_req"])
        return med(ratios)

    def cpu_added(self, c, size, base="bare"):
        diffs = []
        for r, run in self.cpu[(c, size)].items():
            b = self.cpu[(base, size)].get(r)
            if b:
                diffs.append(run["cpu_us_per_req"] - b["cpu_us_per_req"])
        return med(diffs)

    def saving_share(self, size):
        """CPU per request one module saves, as a share (%) of what the separate-modules chain adds."""
        saved, added = self.cpu_added("chain", size, base="chain_one_module"), self.cpu_added("chain", size)
        return saved * 100 / added if saved is not None and added else None

    def cpu_field(self, c, size, field):
        return med([run[field] for run in self.cpu[(c, size)].values()])

    def non2xx(self, c, size=None):
        runs = [run for (cc, s), rr in self.cpu.items() if cc == c and (size is None or s == size) for run in rr.values()]
        return sum(r["non_2xx"] for r in runs), sum(r["requests"] for r in runs)

    def lat_added(self, c, field):
        diffs = []
        for r, run in self.lat[c].items():
            b = self.lat["bare"].get(r)
            if b:
                diffs.append(run[field] - b[field])
        return med(diffs)

    def latency_noisy(self) -> bool:
        """Bare Envoy's own one-connection latency far above the targets: the machine's noise."""
        bare = self.lat_field("bare", "lat_mean_us")
        return bare is not None and bare > 10 * TARGET_LAT_MEAN

    def lat_field(self, c, field):
        return med([run[field] for run in self.lat[c].values()])


def chart(res: Results, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = res.configs
    short = [res.labels.get(c, c).replace(" (router only)", "").replace("Envoy ", "") for c in configs]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))

    ax = axes[0]
    xs = range(len(configs))
    ratios = {size: [res.cpu_ratio(c, size) or 0 for c in configs] for size in res.sizes}
    width = 0.8 / max(len(res.sizes), 1)
    for i, size in enumerate(res.sizes):
        ax.bar([x + i * width for x in xs], ratios[size], width, label=f"{size} B body")
    ax.axhline(TARGET_FILTER, color="tab:orange", ls="--", lw=1, label=f"target one filter {TARGET_FILTER}x")
    ax.axhline(TARGET_CHAIN, color="tab:red", ls="--", lw=1, label=f"target chain {TARGET_CHAIN}x")
    if any(c in configs for c in NATIVE_FILTERS + [NATIVE_CHAIN]):
        ax.axhline(TARGET_NATIVE_FILTER, color="tab:green", ls=":", lw=1, label=f"target native filter {TARGET_NATIVE_FILTER}x")
        ax.axhline(TARGET_NATIVE_CHAIN, color="tab:purple", ls=":", lw=1,
                   label=f"target native chain {TARGET_NATIVE_CHAIN}x ({TARGET_NATIVE_CHAIN_LARGE}x at 10 KiB)")
    ax.set_xticks([x + width * (len(res.sizes) - 1) / 2 for x in xs], short, rotation=30, ha="right")
    ax.set_ylabel("Envoy CPU per request / bare Envoy")
    ax.set_title("Envoy CPU per proxied request\n(median ratio to bare Envoy)")
    ax.legend(fontsize=8)

    ax = axes[1]
    means = [res.lat_field(c, "lat_mean_us") or 0 for c in configs]
    p99s = [res.lat_field(c, "lat_p99_us") or 0 for c in configs]
    ax.bar([x - 0.2 for x in xs], means, 0.4, label="mean")
    ax.bar([x + 0.2 for x in xs], p99s, 0.4, label="p99")
    ax.set_xticks(list(xs), short, rotation=30, ha="right")
    ax.set_ylabel("microseconds (log scale)")
    ax.set_yscale("log")
    ax.set_title(f"Latency at one connection\n({res.d['params']['latency_size']} B body, median of rounds)")
    ax.legend(fontsize=8)

    ax = axes[2]
    for i, size in enumerate(res.sizes):
        rps = [res.cpu_field(c, size, "rps") or 0 for c in configs]
        ax.bar([x + i * width for x in xs], rps, width, label=f"{size} B body")
    ax.set_xticks([x + width * (len(res.sizes) - 1) / 2 for x in xs], short, rotation=30, ha="right")
    ax.set_ylabel("requests per second")
    ax.set_title(f"Throughput, {res.d['params']['connections']} connections\n(load-generator bound: see the table)")
    ax.legend(fontsize=8)

    fig.tight_layout()
    fig.savefig(path, dpi=110)


def render(res: Results) -> str:
    d = res.d
    p = d["params"]
    f = d["facts"]
    out = []
    w = out.append
    w("# Benchmarks: what each filter and the whole chain cost")
    w("")
    w("Generated by `bash scripts/bench.sh` from one run on one machine (" + f["date_utc"] +
      ", commit `" + f["commit"] + "`" + (", **--quick run: noisier numbers**" if p["quick"] else "") +
      "). Do not edit by hand: rerun the command.")
    w("")
    if d.get("build_failed"):
        w("**`scripts/build.sh` failed in this run**: the modules measured are those already in `target/`, possibly stale.")
        w("")
    if d["modules_missing"]:
        # File names (older results: wasm module names).
        names = [m if "." in m else m + ".wasm" for m in d["modules_missing"]]
        w(f"**Modules missing from this run** (not built when it ran): {', '.join('`' + m + '`' for m in names)}. "
          "Their rows are absent or marked n/a.")
        w("")
    if "replay_guard" not in d.get("chain_members", []) and "replay_guard" not in d["modules_missing"]:
        w("**replay-guard** is built but has no benchmark configuration yet (`bench/filters_replay.py`): "
          "it is measured neither alone nor in the chain.")
        w("")
    w("## How it is measured")
    w("")
    w(f"""- **Command:** `bash scripts/bench.sh` (about 35 minutes; `--quick` about 15). It installs `wrk` (Debian) and
  matplotlib (`bench/requirements.txt`, into `.venv`), builds the modules and the bench tool, runs
  `bench/run.py`, then `bench/report.py` writes this file and `docs/benchmarks.png`.
- **Bootstrap:** every Envoy under test, bare included, has `memory_allocator_manager` (return up
  to 1 GiB of freed heap every 0.5 s), as `plugins/chain/README.md` advises: tcmalloc otherwise keeps
  what V8 freed after compiling a module. Bare Envoy's figures do not change with it.
- **Topology:** Envoy under test, one worker (`--concurrency 1`) pinned to core 1 (`taskset`); the
  load generator `wrk` (one thread, keep-alive) and the upstream, a second Envoy that answers every
  request itself (`direct_response`, the same for every configuration), pinned to core 0.
- **Requests:** signed `POST /v1/transfers` with JSON bodies of {", ".join(f"{s} B" for s in p["sizes"])}: every
  request has its own nonce and `Idempotency-Key` (covered by the signature), pre-signed by
  `bench/tool` and replayed by `bench/replay.lua`; every Envoy sees each one once (the pool is sized
  for the fastest configuration: a run that wrapped round it would repeat nonces and keys, refused
  or replayed). The same bytes go
  to every configuration, bare Envoy included. Non-2xx responses are counted (tables below): the
  benchmark measures accepted requests. The upstream reads each whole request before answering,
  so every connection stays open (keep-alive on both sides; the table counts the upstream
  connections each configuration opened).
- **Headline:** Envoy CPU time per proxied request, from the kernel's accounting of the Envoy
  process (`utime+stime` in `/proc/<pid>/stat` before and after each {p["duration_s"]} s run, divided by the
  responses completed). {p["rounds"]} rounds; each round starts every configuration afresh and runs them
  one after another (order rotated each round), so A and B run seconds apart; a ratio is computed
  per round against bare Envoy of the same round, and the table shows the median over rounds.
- **The full chain** runs in two forms with the same filter configurations in the same order:
  separate modules (one wasm filter, and one VM, per filter) and one module (`firebreak_chain`,
  one wasm filter whose configuration has a section per filter).
- **The native module** (`libfirebreak.so`, the same engine as an Envoy dynamic module,
  `plugins/native`): each filter with its wasm row's configuration and the chain with the one-module
  chain's sections, behind the same buffer filter, measured in the same rounds ("(native)" rows,
  "full chain, native module").
- **Throughput** is reported only where Envoy's core was saturated (CPU time / wall time >= {SATURATED});
  elsewhere the load generator and the upstream on core 0 are the bottleneck and requests per second
  say nothing about the filters.
- **Latency added:** one connection (`wrk -c1`), {p["latency_duration_s"]} s per configuration per round, {p["latency_size"]} B bodies;
  added = configuration minus bare Envoy in the same round, median over rounds.
- **Memory:** Envoy's RSS (`VmRSS`) after {p["memory_keys"]:,} requests with distinct nonces,
  Idempotency-Keys and rate-limit keys, each configuration on a fresh Envoy, against bare Envoy
  after the same requests.
- **Micro-benchmarks:** `bench/tool micro`: each decision core built natively (sha2's portable
  backend, as in wasm) and the same code in the filter's wasm module run by the test host
  (`host-tests`, wasmtime), on the same signed inputs; host calls per accepted request as the test
  host counts them.
""")
    w("## The machine")
    w("")
    w("| Fact | Value |")
    w("|---|---|")
    for k, label in [("cpu", "CPU"), ("cores", "Cores"), ("memory_gib", "Memory (GiB)"), ("kernel", "Kernel"),
                     ("envoy", "Envoy"), ("wrk", "Load generator"), ("rustc", "Rust"), ("loadavg_at_start", "Load average at start")]:
        v = f.get(k)
        w(f"| {label} | {' '.join(v) if isinstance(v, list) else v} |")
    contention = [r.get("core_busy_others") for r in d["cpu_runs"] if r.get("core_busy_others") is not None]
    if contention:
        w(f"| Core 1 used by other processes during CPU runs (median) | {med(contention):.0%} |")
    w("")
    w("This machine is shared (other builds and tests run on it at the same time), which makes absolute figures "
      "noisy and higher than on a quiet host; ratios from interleaved runs are the figures to read.")
    w("")

    # Headline.
    w("## Headline: Envoy CPU per proxied request, against bare Envoy")
    w("")
    head = "| Configuration | Target | " + " | ".join(f"{s} B" for s in res.sizes) + " | Verdict (worst size) |"
    w(head)
    w("|---" * (3 + len(res.sizes)) + "|")
    for c in res.configs:
        if c == "bare":
            continue
        targets = [cpu_target(c, s) for s in res.sizes]
        ratios = [res.cpu_ratio(c, s) for s in res.sizes]
        # The worst size: the furthest above (or least below) its own target.
        judged = [(r, t) for r, t in zip(ratios, targets) if r is not None and t]
        worst = max(judged, key=lambda rt: rt[0] / rt[1], default=(None, None))
        cells = [f"{fmt(r)}x (+{fmt(res.cpu_added(c, s), 1)} us)" for r, s in zip(ratios, res.sizes)]
        tcell = target_cell(c, res.sizes) or ("reference (~1.03x)" if c == "native_local_ratelimit" else "reference")
        w(f"| {res.label(c)} | {tcell} | " + " | ".join(cells) + f" | {verdict(*worst) if any(targets) else '-'} |")
    w("")
    w("Each cell: median over rounds of (CPU per request of the configuration) / (CPU per request of bare Envoy in the same round), "
      "and in brackets the median CPU time added per request. Every filter, wasm or native, runs behind Envoy's `buffer` "
      "filter where it reads the body (as the filter READMEs require), so its row includes the buffer filter's own cost "
      "(the `buffer` row).")
    w("")
    if all(c in res.configs for c in CHAINS):
        w("**The chain as one module against separate modules** (same filter configurations, same order): "
          "CPU per request of the separate-modules chain minus the one-module chain, in the same round, median over rounds:")
        w("")
        w("| | " + " | ".join(f"{s} B" for s in res.sizes) + " |")
        w("|---" * (1 + len(res.sizes)) + "|")
        w("| Separate modules / bare | " + " | ".join(f"{fmt(res.cpu_ratio('chain', s))}x" for s in res.sizes) + " |")
        w("| One module / bare | " + " | ".join(f"{fmt(res.cpu_ratio('chain_one_module', s))}x" for s in res.sizes) + " |")
        w("| CPU saved per request by one module | " + " | ".join(
            f"{fmt(res.cpu_added('chain', s, base='chain_one_module'), 1, ' us')} "
            f"({fmt(res.saving_share(s), 0, '%')} of the separate chain's added CPU)" for s in res.sizes) + " |")
        if NATIVE_CHAIN in res.configs:  # the same sections in libfirebreak.so
            w("| Native module / bare | " + " | ".join(f"{fmt(res.cpu_ratio(NATIVE_CHAIN, s))}x" for s in res.sizes) + " |")
        w("")
    w("### Absolute figures per run (medians over rounds)")
    w("")
    w("| Configuration | Body | Envoy CPU per request | Requests per second | Envoy core busy | Non-2xx / requests | Upstream connections opened |")
    w("|---|---|---|---|---|---|---|")
    for c in res.configs:
        for s in res.sizes:
            util = res.cpu_field(c, s, "envoy_util")
            rps = res.cpu_field(c, s, "rps")
            bad, total = res.non2xx(c, s)
            rps_cell = f"{rps:,.0f} (Envoy saturated)" if util is not None and util >= SATURATED else f"({rps:,.0f}: load-generator bound)" if rps else "n/a"
            opened = sum(r.get("upstream_connections_opened", 0) for r in res.cpu[(c, s)].values())
            w(f"| {res.label(c)} | {s} B | {fmt(res.cpu_field(c, s, 'cpu_us_per_req'), 1, ' us')} | {rps_cell} | {fmt(util and util * 100, 0, '%')} | {bad} / {total:,} | {opened} |")
    w("")

    # Latency.
    w(f"## Latency added at one connection ({p['latency_size']} B body)")
    w("")
    w("Measured with `wrk -c1`: the configuration minus bare Envoy of the same round, median over rounds. "
      "The last column is the CPU time the configuration adds per request (headline table, same body size): at one "
      "connection that work is on the request's path, so it is the latency the filters add on an otherwise idle core; "
      "the measured figures add the scheduling noise of this shared machine.")
    w("")
    w(f"| Configuration | Mean | p50 | p99 | Mean added (target <= {TARGET_LAT_MEAN:.0f} us) | p50 added | p99 added (target <= {TARGET_LAT_P99:.0f} us) | CPU added per request | Non-2xx |")
    w("|---|---|---|---|---|---|---|---|---|")
    noisy = res.latency_noisy()
    mv = (lambda v, t: "(noise)") if noisy else verdict
    for c in res.configs:
        mean, p50, p99 = res.lat_field(c, "lat_mean_us"), res.lat_field(c, "lat_p50_us"), res.lat_field(c, "lat_p99_us")
        bad = sum(r["non_2xx"] for r in res.lat[c].values())
        if c == "bare":
            w(f"| {res.label(c)} | {fmt(mean, 0, ' us')} | {fmt(p50, 0, ' us')} | {fmt(p99, 0, ' us')} | - | - | - | - | {bad} |")
            continue
        am, a50, ap = res.lat_added(c, "lat_mean_us"), res.lat_added(c, "lat_p50_us"), res.lat_added(c, "lat_p99_us")
        cpu = res.cpu_added(c, p["latency_size"]) if p["latency_size"] in res.sizes else None
        w(f"| {res.label(c)} | {fmt(mean, 0, ' us')} | {fmt(p50, 0, ' us')} | {fmt(p99, 0, ' us')} | {fmt(am, 0, ' us')} {mv(am, TARGET_LAT_MEAN)} | "
          f"{fmt(a50, 0, ' us')} | {fmt(ap, 0, ' us')} {mv(ap, TARGET_LAT_P99)} | {fmt(cpu, 1, ' us')} {verdict(cpu, TARGET_LAT_MEAN) if c in FIREBREAK else ''} | {bad} |")
    w("")
    bare_mean, bare_p99 = res.lat_field("bare", "lat_mean_us"), res.lat_field("bare", "lat_p99_us")
    if noisy:
        w(f"**Noisy here:** bare Envoy's own mean at one connection is {bare_mean:.0f} us and its p99 {bare_p99:.0f} us "
          f"(three processes waking each other on two cores that other work shares), {bare_mean / TARGET_LAT_MEAN:.0f} times the "
          "mean target; differences between configurations at this scale are mostly scheduling noise. Read the CPU column, and rerun on "
          "a quiet machine for measured latency.")
        w("")

    # Memory.
    w(f"## Envoy memory with {p['memory_keys']:,} tracked keys")
    w("")
    mem = d.get("memory") or {}
    if mem:
        bare = mem.get("bare", {}).get("rss_kib")
        w(f"| Configuration | RSS at start | RSS after {p['memory_keys']:,} requests | vs bare after the same requests (target <= {TARGET_MEMORY}x) | Accepted (keys tracked) |")
        w("|---|---|---|---|---|")
        for c, m in mem.items():
            ratio = m["rss_kib"] / bare if bare else None
            accepted = m["requests"] - m["non_2xx"]
            cell = "-" if c == "bare" else f"{fmt(ratio)}x {verdict(ratio, TARGET_MEMORY) if c in FIREBREAK else ''}"
            w(f"| {res.label(c)} | {m['rss_start_kib'] / 1024:.1f} MiB | {m['rss_kib'] / 1024:.1f} MiB | {cell} | {accepted:,} |")
        w("")
    else:
        w("Not measured in this run (`--skip-memory`).")
        w("")

    # Micro.
    w("## Micro-benchmarks: wasm against the same code native")
    w("")
    micro = d.get("micro") or {}
    if "filters" in micro:
        w(f"Native SHA-256 backend: {micro.get('sha256_backend')}. Median of {micro.get('reps')} repetitions.")
        w("")
        core_rows = [(inp, r["core"]) for inp, r in micro["filters"].get("request_signature", {}).get("sizes", {}).items() if r.get("core")]
        if core_rows:
            w("**The same code, wasm against native** (the signature decision loop of `bench/tool/src/coreloop.rs`: "
              "`verify_headers`, `claim_nonce` over an in-memory store with Envoy's semantics, `verify_body`; compiled natively "
              "and, from the same file, to `wasm32-wasip1` by `bench/core-wasm` with the modules' release profile, run by "
              "wasmtime; same inputs, every request accepted by both):")
            w("")
            w(f"| Signature verification, body | Native | wasm | wasm / native (target <= {TARGET_WASM_NATIVE}x) |")
            w("|---|---|---|---|")
            for inp, c in core_rows:
                if c.get("wasm_ns") is None:
                    w(f"| {inp} B | {c['native_ns'] / 1000:.1f} us | not run (bench/core-wasm missing) | n/a |")
                else:
                    w(f"| {inp} B | {c['native_ns'] / 1000:.1f} us | {c['wasm_ns'] / 1000:.1f} us | {c['ratio']:.2f}x {verdict(c['ratio'], TARGET_WASM_NATIVE)} |")
            w("")
            w("**Each filter module in the test host** against its decision core natively (the whole filter path: "
              "callbacks and host calls as the test host implements them):")
            w("")
        w("| Decision | Input | Native core | wasm module in the test host | wasm, net of the host's per-request cost | wasm / native | net / native |")
        w("|---|---|---|---|---|---|---|")
        for name, m in micro["filters"].items():
            if "missing" in m or "error" in m or "sizes" not in m:
                w(f"| {name} | - | {'module missing' if 'missing' in m else 'error: ' + str(m.get('error'))[:80]} | | | | |")
                continue
            for inp, r in m["sizes"].items():
                if r.get("native_ns") is None:
                    w(f"| {name} | {inp} | n/a ({m.get('native_note', '')}) | {r['wasm_ns'] / 1000:.1f} us | {r['wasm_net_ns'] / 1000:.1f} us | n/a | n/a |")
                    continue
                w(f"| {name} | {inp} | {r['native_ns'] / 1000:.1f} us | {r['wasm_ns'] / 1000:.1f} us | {r['wasm_net_ns'] / 1000:.1f} us | "
                  f"{r['ratio']:.2f}x | {r['net_ratio']:.2f}x |")
        w("")
        w("\"wasm in the test host\" is the whole filter path per request in wasmtime (callbacks, host calls, the test host's "
          "own bookkeeping); \"net\" subtracts the same module passing the same request on a route it does not protect.")
        w("")
        w(f"### Host calls per accepted request (target <= {TARGET_HOST_CALLS} per filter)")
        w("")
        w("| Filter | Host calls | Verdict | By call |")
        w("|---|---|---|---|")
        for name, m in micro["filters"].items():
            hc = m.get("host_calls_accepted")
            if not hc:
                continue
            by = ", ".join(f"`{k}` {v}" for k, v in sorted(hc["by_call"].items()))
            w(f"| {name} | {hc['total']} | {verdict(hc['total'], TARGET_HOST_CALLS)} | {by} |")
        chain = micro.get("chain") or {}
        for form, label in [("separate_modules", "full chain, separate modules (sum)"), ("one_module", "full chain, one module")]:
            hc = (chain.get(form) or {}).get("host_calls_accepted")
            if not hc:
                continue
            stages = len(chain.get("members", [])) or 1
            per_stage = hc["total"] / stages
            by = ", ".join(f"`{k}` {v}" for k, v in sorted(hc["by_call"].items()))
            w(f"| {label} | {hc['total']} ({per_stage:.1f} per filter) | {verdict(per_stage, TARGET_HOST_CALLS)} | {by} |")
        w("")
        if chain.get("members"):
            w("The chain rows: one request accepted by all of " + ", ".join(m.replace("_", "-") for m in chain["members"]) +
              f" ({chain.get('input', '')}), with the configurations of the rows above (replay-guard requiring the "
              "principal request-signature verified); the separate form is four modules in one filter chain of the test "
              "host, its calls summed. The one-module chain runs the same stages; its stages share the reads of one "
              "callback (headers, body, clock), hand each other the principal and the body digest in memory, and write "
              "the counts of passed requests once a second instead of per request, so it makes fewer calls; it also "
              "saves the per-module cost around them (VMs, contexts, callbacks: the CPU tables).")
            w("")
        elif "error" in chain or "missing" in chain:
            w(f"The chain's host calls were not counted: {str(chain.get('error') or chain.get('missing'))[:200]}")
            w("")
    else:
        w("Not measured in this run: " + str(micro.get("error", "--skip-micro"))[:300])
        w("")

    # Where the cost goes (computed).
    w("## Where the cost goes")
    w("")
    w("CPU added per request against bare Envoy (median over rounds), and what of it every wasm module pays just by "
      "being there (the trivial filter rows):")
    w("")
    w("| Configuration | " + " | ".join(f"{s} B" for s in res.sizes) + " |")
    w("|---" * (1 + len(res.sizes)) + "|")
    for c in ["trivial_wasm", "trivial_wasm_x4", "buffer"] + FILTERS + CHAINS + NATIVE_FILTERS + [NATIVE_CHAIN]:
        if c in res.configs:
            w(f"| {res.label(c)} | " + " | ".join(fmt(res.cpu_added(c, s), 1, " us") for s in res.sizes) + " |")
    if all(c in res.configs for c in CHAINS):
        w("| Saved by one module (separate modules minus one module, same round) | " +
          " | ".join(fmt(res.cpu_added("chain", s, base="chain_one_module"), 1, " us") for s in res.sizes) + " |")
    if all(c in res.configs for c in ["trivial_wasm", "trivial_wasm_x4"]):
        w("| Three extra do-nothing modules (4 trivial filters minus 1) | " +
          " | ".join(fmt(res.cpu_added("trivial_wasm_x4", s, base="trivial_wasm"), 1, " us") for s in res.sizes) + " |")
    w("")

    def shares(part, whole, base_part="bare"):
        out = []
        for s_ in res.sizes:
            x, total = res.cpu_added(part, s_, base=base_part), res.cpu_added(whole, s_)
            if x is not None and total:
                out.append(f"{x / total:.0%} at {s_} B")
        return ", ".join(out) or "n/a"

    if "trivial_wasm_x4" in res.configs and "chain" in res.configs:
        w("- Share of the separate-modules chain's added CPU that four do-nothing modules already cost: " +
          shares("trivial_wasm_x4", "chain") + ".")
    if "trivial_wasm" in res.configs and "chain_one_module" in res.configs:
        w("- Share of the one-module chain's added CPU that one do-nothing module already costs: " +
          shares("trivial_wasm", "chain_one_module") + ".")
    if all(c in res.configs for c in CHAINS + ["trivial_wasm", "trivial_wasm_x4"]):
        w("- The saving row is what merging the four modules into one removed; the row below it is what three modules' "
          "fixed cost alone predicts (four trivial filters against one). The rest of the chain's added CPU is the "
          "filters' own work per request (their rows above).")
    w("")
    if mem and "bare" in mem:
        b = mem["bare"]
        w("Memory: the fixed cost of each configuration's VMs or native library (RSS at start minus bare Envoy's) against what "
          f"{p['memory_keys']:,} keys added (RSS growth during the requests minus bare Envoy's growth):")
        w("")
        w("| Configuration | VMs at start | Growth from the keys |")
        w("|---|---|---|")
        for c, m in mem.items():
            if c == "bare":
                continue
            fixed = (m["rss_start_kib"] - b["rss_start_kib"]) / 1024
            growth = ((m["rss_kib"] - m["rss_start_kib"]) - (b["rss_kib"] - b["rss_start_kib"])) / 1024
            w(f"| {res.label(c)} | {fixed:+.1f} MiB | {growth:+.1f} MiB |")
        w("")

    # Where each filter's cost goes, in four parts (bench/cost.py, its own rounds).
    sys.path.insert(0, str(ROOT / "bench"))
    import cost  # noqa: E402  (bench/cost.py)
    out.extend(cost.render(d, res.labels))

    # Targets.
    w("## Targets and gaps")
    w("")
    misses = gaps(res)
    if not misses:
        w("Every target measured in this run is met.")
    for line in misses:
        w(f"- {line}")
    w("")
    analysis = ROOT / "bench" / "analysis.md"
    if analysis.exists():
        w(analysis.read_text().strip())
        w("")
    w("![CPU ratio, latency and throughput](benchmarks.png)")
    w("")
    return "\n".join(out)


def gaps(res: Results) -> list[str]:
    out = []
    for c in res.configs:
        for s in res.sizes:
            r, target = res.cpu_ratio(c, s), cpu_target(c, s)
            if r is not None and target and r > target:
                out.append(f"CPU, {res.label(c)}, {s} B: {r:.2f}x against a target of {target}x "
                           f"(+{res.cpu_added(c, s):.1f} us per request; missed by {r / target - 1:.0%}).")
    for c in res.configs:
        if c in ("bare", "buffer", "native_local_ratelimit"):
            continue
        am, ap = res.lat_added(c, "lat_mean_us"), res.lat_added(c, "lat_p99_us")
        if res.latency_noisy():
            size = res.d["params"]["latency_size"]
            cpu = res.cpu_added(c, size) if c in FIREBREAK else None
            if cpu is not None and cpu > TARGET_LAT_MEAN:
                out.append(f"Latency, {res.label(c)}: {cpu:.0f} us of CPU added per request at {size} B, on the request's "
                           f"path at one connection, against {TARGET_LAT_MEAN:.0f} us mean added (measured latency: noise on this machine).")
            continue
        if am is not None and am > TARGET_LAT_MEAN:
            out.append(f"Latency, {res.label(c)}: mean added {am:.0f} us against {TARGET_LAT_MEAN:.0f} us.")
        if ap is not None and ap > TARGET_LAT_P99:
            out.append(f"Latency, {res.label(c)}: p99 added {ap:.0f} us against {TARGET_LAT_P99:.0f} us.")
    mem = res.d.get("memory") or {}
    bare = mem.get("bare", {}).get("rss_kib")
    for c, m in mem.items():
        if bare and c in FIREBREAK and m["rss_kib"] / bare > TARGET_MEMORY:
            out.append(f"Memory, {res.label(c)}: {m['rss_kib'] / bare:.2f}x bare Envoy's RSS against {TARGET_MEMORY}x "
                       f"(+{(m['rss_kib'] - bare) / 1024:.1f} MiB for {res.d['params']['memory_keys']:,} keys).")
    micro = (res.d.get("micro") or {}).get("filters", {})
    for name, m in micro.items():
        if name == "request_signature" and "sizes" in m:
            for inp, r in m["sizes"].items():
                c = r.get("core") or {}
                if c.get("ratio") is not None and c["ratio"] > TARGET_WASM_NATIVE:
                    out.append(f"wasm/native, signature verification (same code), {inp} B: {c['ratio']:.2f}x against {TARGET_WASM_NATIVE}x.")
        hc = m.get("host_calls_accepted")
        if hc and hc["total"] > TARGET_HOST_CALLS:
            out.append(f"Host calls, {name}: {hc['total']} per accepted request against {TARGET_HOST_CALLS}.")
    chain = (res.d.get("micro") or {}).get("chain") or {}
    hc = (chain.get("one_module") or {}).get("host_calls_accepted")
    stages = len(chain.get("members", []))
    if hc and stages and hc["total"] > TARGET_HOST_CALLS * stages:
        out.append(f"Host calls, full chain in one module: {hc['total']} per accepted request through {stages} stages "
                   f"against {TARGET_HOST_CALLS} per filter ({TARGET_HOST_CALLS * stages}).")
    return out


def main():
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS
    res = Results(json.loads(path.read_text()))
    DOC.parent.mkdir(exist_ok=True)
    if res.configs:
        chart(res, CHART)
    # The Redis section (bench/redis_path.py, run after this script by scripts/bench.sh) is kept
    # until that script replaces it: `--only ladder,hostcalls` does not run it.
    marker = "\n## The Redis path"
    previous = DOC.read_text() if DOC.exists() else ""
    redis = previous[previous.index(marker):] if marker in previous else ""
    DOC.write_text(render(res).rstrip("\n") + "\n" + redis)
    print(f"wrote {DOC}" + (f" and {CHART}" if res.configs else ""))


if __name__ == "__main__":
    main()
