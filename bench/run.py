"""Firebreak's benchmark driver (started by `bash scripts/bench.sh`; see docs/benchmarks.md).

One run, one machine, ratios against bare Envoy measured in the same run:
  * Envoy CPU time per proxied request (utime+stime of the Envoy process from /proc/<pid>/stat,
    before and after each load run, divided by the responses wrk completed), Envoy pinned to core 1
    with one worker, the load generator (wrk) and the upstream (a second Envoy answering with a
    direct_response) on core 0. Rounds interleave every configuration (A B C ... A B C ...), the
    order rotated each round; the headline is the median over rounds of the per-round ratio.
  * Latency added at one connection (wrk -c1; mean and p99), per configuration.
  * Envoy RSS after 100,000 distinct tracked keys (nonces, idempotency keys, rate-limit keys),
    against bare Envoy after the same 100,000 requests.
  * Micro-benchmarks from bench/tool (native decision core vs the wasm module in the test host,
    host calls per accepted request, per filter and for the whole chain in both forms).
  * Where each filter's cost goes (bench/cost.py): the host-call cost table, request-signature's
    ladder, and each filter's CPU split into fixed cost, host calls, decision code in the VM and
    Envoy running slower, in rounds of their own at one body size. `--only ladder,hostcalls` runs
    only those and keeps the rest of the previous results.json.
Writes .run/bench/results.json; bench/report.py turns it into docs/benchmarks.md and the chart.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "envoy" / "e2e"))
import harness  # noqa: E402

OUT = ROOT / ".run" / "bench"
TOOL = ROOT / "target" / "bench" / "release" / "firebreak-bench"
LUA = ROOT / "bench" / "replay.lua"
MODULES = ["request_signature", "replay_guard", "rate_limit", "env_guard", "firebreak_chain"]
LOAD_CORE, ENVOY_CORE = os.environ.get("BENCH_LOAD_CORE", "0"), os.environ.get("BENCH_ENVOY_CORE", "1")


def log(msg: str):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def have(module: str) -> bool:
    if module == "@trivial":
        return TRIVIAL_WASM.exists()
    if module == "@native":
        return NATIVE_SO.exists()
    if module.startswith("@file:"):
        return Path(module[len("@file:"):]).exists()
    return (harness.WASM_DIR / f"{module}.wasm").exists()


# ---------------------------------------------------------------------------------------------
# Filter configurations. `purpose` is "cpu" (throughput/latency runs) or "memory" (100,000
# distinct keys): the tables are sized for what the run puts in them, as an operator would.

def signature(purpose: str) -> dict:
    # One key id signs every request of a run: its quota is the most a table allows
    # (capacity / 2), and the table is sized so a run stays under it.
    buckets = 65536 if purpose == "cpu" else 16384
    return harness.wasm_filter("request_signature", harness.signature_config(
        max_age_seconds=3600,
        covered_headers_when_present=["idempotency-key"],
        nonce_store={"buckets": buckets, "slots_per_bucket": 16, "quota_per_key_id": buckets * 16 // 2},
    ), host_env_keys=[harness.DEMO_KEY_ENV])


def local_ratelimit() -> dict:
    """Envoy's native local rate limit: one token bucket, never empty in these runs."""
    return {
        "name": "envoy.filters.http.local_ratelimit",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
            "stat_prefix": "bench_local_ratelimit",
            "token_bucket": {"max_tokens": 1000000000, "tokens_per_fill": 1000000000, "fill_interval": "1s"},
            "filter_enabled": {"runtime_key": "bench_rl_enabled", "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
            "filter_enforced": {"runtime_key": "bench_rl_enforced", "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
        },
    }


# The native module (scripts/build.sh); every Envoy the bench starts (harness.Envoy) has
# ENVOY_DYNAMIC_MODULES_SEARCH_PATH set to its directory.
NATIVE_SO = harness.NATIVE_DIR / "libfirebreak.so"
CORE_WASM = ROOT / "target" / "bench" / "wasm32-wasip1" / "release" / "bench-core-wasm.wasm"
TRIVIAL_WASM = ROOT / "target" / "bench" / "wasm32-wasip1" / "release" / "bench_trivial_filter.wasm"


def trivial_filter(n: int = 0) -> dict:
    """bench/trivial-filter: reads one header, sets one. What any Rust wasm filter costs."""
    f = harness.wasm_filter("bench_trivial_filter", {}, vm_id=f"bench_trivial_{n}", root_id=f"bench_trivial_{n}")
    f["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] = str(TRIVIAL_WASM)
    return f


# Each entry: name -> (modules it needs, builder(purpose) -> http_filters). Filled in below as
# each filter's configuration is known; a configuration whose modules are missing is skipped
# and reported as missing.
CONFIGS: dict[str, tuple[list[str], object]] = {
    "bare": ([], lambda p: []),
    "buffer": ([], lambda p: [harness.buffer_filter()]),
    "request_signature": (["request_signature"], lambda p: [harness.buffer_filter(), signature(p)]),
    "native_local_ratelimit": ([], lambda p: [local_ratelimit()]),
    "trivial_wasm": (["@trivial"], lambda p: [trivial_filter()]),
    # Four of them, each in its own VM as the four Firebreak modules are: what a chain pays
    # for being four modules, before any of them decides anything.
    "trivial_wasm_x4": (["@trivial"], lambda p: [trivial_filter(i) for i in range(4)]),
}

import filters as _filters  # noqa: E402  (bench/filters.py: the other filters and the chain)

_filters.register(CONFIGS, harness, signature)

import cost as _cost  # noqa: E402  (bench/cost.py: the cost breakdown's configurations)

LABELS = {
    "bare": "bare Envoy (router only)",
    "buffer": "Envoy buffer filter only",
    "request_signature": "request-signature",
    "replay_guard": "replay-guard",
    "rate_limit": "rate-limit",
    "env_guard": "env-guard",
    "native_local_ratelimit": "Envoy native local_ratelimit",
    "trivial_wasm": "trivial Rust wasm filter (reference)",
    "trivial_wasm_x4": "4 trivial wasm filters, 4 VMs (reference)",
    "chain": "full chain, separate modules",
    "chain_one_module": "full chain, one module",
    "native_request_signature": "request-signature (native)",
    "native_replay_guard": "replay-guard (native)",
    "native_rate_limit": "rate-limit (native)",
    "native_env_guard": "env-guard (native)",
    "native_chain": "full chain, native module",
}


# ---------------------------------------------------------------------------------------------

def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # fields[0] is state (field 3); utime, stime are fields 14, 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def core_busy_seconds(core: str) -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{core} "):
            v = [int(x) for x in line.split()[1:]]
            # user nice system idle iowait irq softirq steal
            return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")
    return 0.0


def proc_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Upstream:
    """A second Envoy answering every request itself (direct_response): the fast upstream, the
    same for every configuration, pinned to the load generator's core."""

    def __init__(self):
        self.port = harness.free_port()
        admin = harness.free_port()
        OUT.mkdir(parents=True, exist_ok=True)
        config = {
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
            "static_resources": {"listeners": [{
                "name": "upstream",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": self.port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "upstream",
                        "route_config": {"virtual_hosts": [{"name": "up", "domains": ["*"], "routes": [{
                            "match": {"prefix": "/"},
                            "direct_response": {"status": 200, "body": {"inline_string": '{"ok":true}'}},
                        }]}]},
                        # The buffer filter first: the answer goes out only after the whole
                        # request is read. Answering before the body ends makes Envoy close the
                        # connection, and the proxy would open a new one per request.
                        "http_filters": [harness.buffer_filter(), {"name": "envoy.filters.http.router", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                    },
                }]}],
            }]},
        }
        path = OUT / "upstream.json"
        path.write_text(json.dumps(config))
        self.log = OUT / "upstream.log"
        self.proc = subprocess.Popen(
            ["taskset", "-c", LOAD_CORE, str(harness.ENVOY), "-c", str(path), "--concurrency", "1",
             "--use-dynamic-base-id", "--disable-hot-restart", "--log-level", "warn"],
            stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        harness.wait_for(lambda: harness.send(admin, "GET", "/ready", timeout=1).status == 200, 30,
                         "upstream envoy", self.proc, self.log)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Requests:
    """The pre-signed request files (bench/tool `requests`)."""

    def __init__(self, meta: dict):
        self.meta = meta

    def args(self, size: int, first: int, count: int, mode: str) -> list[str]:
        m = self.meta["sizes"][str(size)]
        if first + count > m["count"]:
            raise ValueError(f"slice {first}+{count} beyond the {m['count']} requests of size {size}")
        return [m["headers"], m["body"], str(m["record_len"]), str(first), str(count), mode]


def wrk(port: int, req_args: list[str], connections: int, duration: float) -> dict:
    cmd = ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "5s",
           "-s", str(LUA), f"http://127.0.0.1:{port}/", "--"] + req_args
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"wrk produced no result: {out.stdout}\n{out.stderr}")


def wrk_until(envoy: harness.Envoy, req_args: list[str], connections: int, count: int, limit_s: float = 300) -> dict:
    """Runs wrk until Envoy has completed `count` requests (wrk's own thread stop still waits for
    its duration), then interrupts it (wrk prints its summary on SIGINT)."""
    cmd = ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{connections}", f"-d{int(limit_s)}s", "--timeout", "5s",
           "-s", str(LUA), f"http://127.0.0.1:{envoy.port}/", "--"] + req_args
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
        done = sum(v for k, v in envoy.stats("downstream_rq_completed").items() if k == "http.money.downstream_rq_completed")
        if done >= count:
            break
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"wrk produced no result: {out}\n{err}")


MEMORY_ALLOCATOR_MANAGER = {"bytes_to_release": 1073741824, "memory_release_interval": "0.5s"}


def start_envoy(name: str, purpose: str, upstream: Upstream) -> harness.Envoy:
    _, build = CONFIGS[name]
    # A port picked free can be taken before Envoy binds it (wrk's own connections use the same
    # ephemeral range during a run): try again on new ports, a few times.
    filters = build(purpose)
    # Every configuration, bare included, returns the heap it freed to the system (Envoy's
    # memory_allocator_manager, as the chain README advises operators): V8 frees much of what
    # compiling a module allocated, and tcmalloc keeps freed pages unless asked.
    config = harness.bootstrap(0, 0, 0, filters)
    config["memory_allocator_manager"] = MEMORY_ALLOCATOR_MANAGER
    for attempt in range(4):
        try:
            return harness.Envoy(filters, upstream.port, concurrency=1, cpu_core=int(ENVOY_CORE), bootstrap_config=config)
        except RuntimeError as error:
            if "Address already in use" not in str(error) or attempt == 3:
                raise
            log(f"{name}: a port was taken before Envoy bound it; starting again on new ports")
    raise RuntimeError("unreachable")


def measured_run(envoy: harness.Envoy, req_args: list[str], connections: int, duration: float) -> dict:
    pid = envoy.proc.pid
    cpu0, t0, busy0 = proc_cpu_seconds(pid), time.monotonic(), core_busy_seconds(ENVOY_CORE)
    result = wrk(envoy.port, req_args, connections, duration)
    cpu1, t1, busy1 = proc_cpu_seconds(pid), time.monotonic(), core_busy_seconds(ENVOY_CORE)
    # Share of Envoy's core used by other processes meanwhile (the machine is shared).
    result["core_busy_others"] = max(0.0, (busy1 - busy0) - (cpu1 - cpu0)) / max(t1 - t0, 1e-9)
    n = max(result["requests"], 1)
    result["envoy_cpu_s"] = cpu1 - cpu0
    result["wall_s"] = t1 - t0
    result["cpu_us_per_req"] = (cpu1 - cpu0) * 1e6 / n
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    # Envoy's core utilisation over the load window: near 1.0 means Envoy was the bottleneck.
    result["envoy_util"] = (cpu1 - cpu0) / (result["duration_us"] / 1e6)
    result["non_2xx"] = result["status_errors"]
    return result


def upstream_connections(envoy: harness.Envoy) -> int:
    return envoy.stats("upstream_cx_total").get("cluster.money_api.upstream_cx_total", 0)


def machine_facts() -> dict:
    def cmd(args):
        try:
            return subprocess.run(args, capture_output=True, text=True, timeout=20).stdout.strip()
        except OSError:
            return ""
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 1048576, 1),
        "kernel": platform.release(),
        "envoy": cmd([str(harness.ENVOY), "--version"]).split("version:")[-1].strip(),
        "wrk": cmd(["wrk", "-v"]).splitlines()[0] if cmd(["wrk", "-v"]) else "",
        "rustc": cmd(["rustc", "--version"]),
        "commit": cmd(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def cost_phase(configs: list[str], rounds: int, args, duration: float, reqs: "Requests", cpu_n: int, lat_n: int,
               warm_n: int, upstream: "Upstream") -> dict:
    """The cost breakdown's rounds (bench/cost.py): every configuration at one body size, Envoys
    started afresh each round, order rotated, as the headline's rounds."""
    size = args.cost_size
    out = {"facts": machine_facts(), "params": {
        "size": size, "rounds": rounds, "duration_s": duration, "connections": args.connections,
        "probe_calls": args.probe_calls, "shadow_repeat": args.shadow_repeat}, "configs": configs, "runs": [],
        "probes": _cost.PROBES, "calls": None}
    calls = subprocess.run([str(TOOL), "calls", "--wasm-dir", str(harness.WASM_DIR), "--size", str(size)],
                           capture_output=True, text=True)
    out["calls"] = json.loads(calls.stdout) if calls.returncode == 0 else {"error": calls.stderr[-2000:]}
    for r in range(rounds):
        log(f"cost round {r + 1}/{rounds}: {len(configs)} configurations at {size} B")
        order = configs[r % len(configs):] + configs[:r % len(configs)]
        # Envoys in groups (a round holds many): each group starts, warms up, is measured, stops.
        for first in range(0, len(order), 12):
            group = order[first:first + 12]
            envoys = {}
            try:
                for c in group:
                    envoys[c] = start_envoy(c, "cpu", upstream)
                for c in group:
                    wrk(envoys[c].port, reqs.args(size, cpu_n + lat_n, warm_n, "wrap"), args.connections, 1)
                for c in group:
                    stats0 = envoys[c].stats("bench.shadow.refused")
                    res = measured_run(envoys[c], reqs.args(size, 0, cpu_n, "wrap"), args.connections, duration)
                    refused = sum(envoys[c].stats("bench.shadow.refused").values()) - sum(stats0.values())
                    res.update(round=r, size=size, config=c, shadow_refused=refused)
                    out["runs"].append(res)
                    log(f"  cost {c:36s} {res['cpu_us_per_req']:7.2f} us/req  {res['rps']:8.0f} rps  "
                        f"non-2xx {res['non_2xx']}" + (f"  shadow refused {refused}" if refused else ""))
            finally:
                for e in envoys.values():
                    e.stop()
    return out


def _terminate(signum, frame):
    raise SystemExit(f"bench: stopped by signal {signum}")


def main():
    signal.signal(signal.SIGTERM, _terminate)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short runs for development (numbers are noisier)")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--duration", type=int, help="seconds per CPU run")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--sizes", default="0,1024,10240")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-micro", action="store_true")
    ap.add_argument("--configs", help="comma-separated subset of configurations (development)")
    ap.add_argument("--only", default="main,ladder,hostcalls",
                    help="comma-separated parts to run: main (the headline, latency, memory, micro-benchmarks), "
                         "ladder (request-signature's ladder and the four-part split), hostcalls (the host-call "
                         "cost table). Without main, the previous results.json keeps its other parts.")
    ap.add_argument("--cost-size", type=int, default=0, help="body size of the cost breakdown (default 0)")
    ap.add_argument("--cost-rounds", type=int, help="rounds of the cost breakdown (default: --rounds)")
    ap.add_argument("--probe-calls", type=int, default=32, help="host calls per request of each probe")
    ap.add_argument("--shadow-repeat", type=int, default=4, help="extra in-VM runs of a flow per request")
    ap.add_argument("--build-failed", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 4)
    duration = args.duration or 2
    lat_duration = 1 if args.quick else 2
    sizes = [int(s) for s in args.sizes.split(",")]
    mem_keys = 100_000
    parts = set(args.only.split(","))
    unknown = parts - {"main", "ladder", "hostcalls"}
    if unknown:
        ap.error(f"--only: unknown part(s) {sorted(unknown)} (main, ladder, hostcalls)")
    run_main = "main" in parts

    missing = [f"{m}.wasm" for m in MODULES if not have(m)] + ([] if have("@native") else [NATIVE_SO.name])
    configs = [c for c, (mods, _) in CONFIGS.items() if all(have(m) for m in mods)]
    if args.configs:
        wanted = args.configs.split(",")
        configs = [c for c in configs if c in wanted or c == "bare"]
    skipped = [c for c, (mods, _) in CONFIGS.items() if c not in configs]
    # The cost breakdown's configurations (bench/cost.py), after the main ones are chosen.
    cost_groups = _cost.register(CONFIGS, LABELS, harness, args.probe_calls, args.shadow_repeat)
    available = [c for c, (mods, _) in CONFIGS.items() if all(have(m) for m in mods)]
    cost_configs = _cost.phase_configs(cost_groups, parts, available) if parts & {"ladder", "hostcalls"} else []
    if args.configs:
        cost_configs = [c for c in cost_configs if c in args.configs.split(",") or c in ("bare", "buffer")]
    cost_missing = [c for g in sorted(parts & set(cost_groups)) for c in cost_groups[g] if c not in available]
    if not run_main:
        configs, skipped, sizes = [], [], []
    log(f"modules missing: {missing or 'none'}; configurations: {configs}; skipped: {skipped}")
    if cost_configs:
        log(f"cost breakdown at {args.cost_size} B: {len(cost_configs)} configurations; missing: {cost_missing or 'none'}")

    OUT.mkdir(parents=True, exist_ok=True)
    # Pool per size: [0, cpu_n) CPU runs, then latency, then warm-up slices. Envoy restarts every
    # round, so each Envoy sees each nonce and Idempotency-Key once.
    # Sized for the fastest configuration on this kind of machine (native modules: about 27,000
    # requests per second, 1 s of warm-up): a slice that wraps repeats nonces and keys, which are
    # then refused or replayed (cheaper than accepted requests: a flattering ratio).
    cpu_n = int(40000 * duration) + 10000
    lat_n = int(8000 * lat_duration) + 2000
    warm_n = 40000
    pool = max(cpu_n + lat_n + warm_n, mem_keys)
    created = int(time.time())
    signed_sizes = sorted(set(sizes) | ({args.cost_size} if cost_configs else set()))
    log(f"pre-signing {pool} requests per body size {signed_sizes}")
    meta = json.loads(subprocess.run(
        [str(TOOL), "requests", "--out", str(OUT / "requests"), "--count", str(pool), "--created", str(created),
         "--sizes", ",".join(map(str, signed_sizes))], check=True, capture_output=True, text=True).stdout)
    reqs = Requests(meta)
    lat_size = 1024 if 1024 in sizes else (sizes[0] if sizes else args.cost_size)
    mem_size = min(sizes) if sizes else args.cost_size  # the keys are what is measured; small bodies make the 100,000 requests quick

    results = {"facts": machine_facts(), "params": {
        "rounds": rounds, "duration_s": duration, "latency_duration_s": lat_duration, "connections": args.connections,
        "sizes": sizes, "quick": args.quick, "memory_keys": mem_keys, "latency_size": lat_size, "memory_size": mem_size,
    }, "build_failed": args.build_failed, "modules_missing": missing, "configs": configs, "skipped_configs": skipped, "labels": LABELS,
        "chain_members": _filters.chain_members(harness), "cpu_runs": [], "latency_runs": [], "memory": {}, "micro": None}

    upstream = Upstream()
    try:
        for r in range(rounds if run_main else 0):
            log(f"round {r + 1}/{rounds}: starting {len(configs)} Envoys")
            envoys = {}
            try:
                for c in configs:
                    envoys[c] = start_envoy(c, "cpu", upstream)
                for c in configs:  # warm-up: V8 tiers up, connections and tables exist
                    wrk(envoys[c].port, reqs.args(lat_size, cpu_n + lat_n, warm_n, "wrap"), args.connections, 1)
                order = configs[r % len(configs):] + configs[:r % len(configs)]
                for size in sizes:
                    for c in order:
                        cx0 = upstream_connections(envoys[c])
                        res = measured_run(envoys[c], reqs.args(size, 0, cpu_n, "wrap"), args.connections, duration)
                        res["upstream_connections_opened"] = upstream_connections(envoys[c]) - cx0
                        res.update(round=r, size=size, config=c)
                        results["cpu_runs"].append(res)
                        log(f"  cpu  {c:24s} {size:6d} B  {res['cpu_us_per_req']:7.2f} us/req  {res['rps']:8.0f} rps  "
                            f"util {res['envoy_util']:.2f}  non-2xx {res['non_2xx']}  new upstream conns {res['upstream_connections_opened']}")
                for c in order:
                    res = measured_run(envoys[c], reqs.args(lat_size, cpu_n, lat_n, "wrap"), 1, lat_duration)
                    res.update(round=r, size=lat_size, config=c)
                    results["latency_runs"].append(res)
                    log(f"  lat  {c:24s} mean {res['lat_mean_us']:7.1f} us  p99 {res['lat_p99_us']:6d} us  non-2xx {res['non_2xx']}")
            finally:
                for e in envoys.values():
                    e.stop()

        if cost_configs:
            cost_rounds = args.cost_rounds if args.cost_rounds is not None else rounds
            results["cost"] = cost_phase(cost_configs, cost_rounds, args, duration, reqs, cpu_n, lat_n, warm_n, upstream)
            results["cost"]["groups"] = sorted(parts & {"ladder", "hostcalls"})
            results["cost"]["missing"] = cost_missing
        if run_main and not args.skip_memory:
            log(f"memory: {mem_keys} distinct keys per configuration")
            for c in [c for c in configs if c != "buffer"]:
                e = start_envoy(c, "memory", upstream)
                try:
                    rss0 = proc_rss_kib(e.proc.pid)
                    res = wrk_until(e, reqs.args(mem_size, 0, mem_keys, "stop"), 16, mem_keys)
                    time.sleep(1.0)
                    rss1 = proc_rss_kib(e.proc.pid)
                    stats = {**e.stats("wasmcustom"), **e.stats("dynamicmodulescustom")}
                    results["memory"][c] = {"rss_start_kib": rss0, "rss_kib": rss1, "requests": res["requests"],
                                            "non_2xx": res["status_errors"], "counters": stats}
                    log(f"  mem  {c:24s} rss {rss0} -> {rss1} KiB after {res['requests']} requests, non-2xx {res['status_errors']}")
                finally:
                    e.stop()
    finally:
        upstream.stop()

    if run_main and not args.skip_micro:
        log("micro-benchmarks (bench/tool micro)")
        micro = subprocess.run([str(TOOL), "micro", "--wasm-dir", str(harness.WASM_DIR), "--core-wasm", str(CORE_WASM),
                                "--iterations", "1000" if args.quick else "4000", "--reps", "3" if args.quick else "5"],
                               capture_output=True, text=True)
        if micro.returncode == 0:
            results["micro"] = json.loads(micro.stdout)
        else:
            results["micro"] = {"error": micro.stderr[-2000:]}
        if micro.stderr:
            log(micro.stderr.strip()[-2000:])

    if not run_main:
        # Only the cost breakdown: keep the rest of the previous run (its own date and commit).
        previous = OUT / "results.json"
        if previous.exists():
            kept = json.loads(previous.read_text())
            kept["cost"] = results.get("cost")
            kept["labels"] = {**kept.get("labels", {}), **LABELS}
            results = kept
    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    log(f"wrote {OUT / 'results.json'}")


if __name__ == "__main__":
    main()
