"""Where each filter's cost goes (issue 16): the configurations and the measuring phase of the cost
breakdown, run by bench/run.py (`bash scripts/bench.sh`, or only these parts with
`bash scripts/bench.sh --only ladder,hostcalls`). The modules come from bench/build_modules.sh.

Three groups of configurations, measured like the headline (Envoy CPU per request from the
kernel's accounting, Envoy pinned to its core, rounds interleaving every configuration, each
against bare Envoy of the same round), at one body size (`--cost-size`, 0 B by default):

* `hostcalls`: the host-call cost table. bench/probe making N calls of one kind per request
  against the same module making none: (CPU(N calls) - CPU(none)) / N is one call's price.
* `ladder`: request-signature returning early after each step (bench/ladder, one build per
  step: step 0 is the do-nothing module, step 6 the real module); the one-module chain with its
  first 1, 2, 3 stages (what each stage adds inside one module); and, for each filter and the
  one-module chain, the pieces of the four-part split:
    - fixed cost: the do-nothing module with the filter's own exports (bench/probe, no call,
      trimmed by tools/wasm-trim), against Envoy with the same filters in front (buffer or none);
    - host calls: the calls the module makes per accepted request at that size (the test host's
      count, `firebreak-bench calls`) priced with the host-call table of the same run;
    - decision code in the VM: the filter as its module runs it plus N more runs of its flow per
      request on an in-VM host answering from memory (bench/ladder `shadow`), against the same
      module with no extra run: (CPU(N) - CPU(0)) / N;
    - Envoy running slower: what is left of the filter's CPU once the three above are taken out
      (cache and TLB interference: Envoy's own code runs slower next to the module's).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LADDER_DIR = ROOT / "target" / "bench" / "ladder"

# The configurations broken down (bench/run.py names) and the module each one runs.
TARGETS = {
    "request_signature": "request_signature",
    "rate_limit": "rate_limit",
    "env_guard": "env_guard",
    "replay_guard": "replay_guard",
    "chain_one_module": "firebreak_chain",
}

# Host-call kinds of bench/probe, by the proxy-wasm ABI function each one prices.
PROBES = {
    "header_map": "proxy_get_header_map_pairs",
    "header": "proxy_get_header_map_value",
    "set_header": "proxy_replace_header_map_value",
    "shared_get_cold": "proxy_get_shared_data",
    "shared_get_warm": "proxy_get_shared_data (same key every call)",
    "shared_set": "proxy_set_shared_data",
    "counter": "proxy_increment_metric",
    "clock": "proxy_get_current_time_nanoseconds",
    "log_filtered": "proxy_log (below the log level)",
    "get_property": "proxy_get_property",
    "set_property": "proxy_set_property",
    "buffer": "proxy_get_buffer_bytes",
}
PROBE_LABELS = {
    "header_map": "get the request header map",
    "header": "get one request header",
    "set_header": "set one request header",
    "shared_get_cold": "shared-data get, cold bucket (a different key each call, 16,384 keys)",
    "shared_get_warm": "shared-data get, warm bucket (the same key each call)",
    "shared_set": "shared-data set (512 B)",
    "counter": "counter increment",
    "clock": "get the clock",
    "log_filtered": "log line filtered out by the log level",
    "get_property": "get a property (source.address)",
    "set_property": "set a filter-state property",
    "buffer": "get the response body (11 B)",
}
# The probe that prices each ABI function the test host counts (shared-data gets land on cold
# buckets: nonces, idempotency keys and rate-limit keys spread over a table).
PRICE_OF = {
    "proxy_get_header_map_pairs": "header_map",
    "proxy_get_header_map_value": "header",
    "proxy_replace_header_map_value": "set_header",
    "proxy_add_header_map_value": "set_header",
    "proxy_remove_header_map_value": "set_header",
    "proxy_get_shared_data": "shared_get_cold",
    "proxy_set_shared_data": "shared_set",
    "proxy_increment_metric": "counter",
    "proxy_get_current_time_nanoseconds": "clock",
    "proxy_log": "log_filtered",
    "proxy_get_property": "get_property",
    "proxy_set_property": "set_property",
    "proxy_get_buffer_bytes": "buffer",
}

# request-signature's ladder: step -> (configuration, what the step adds).
LADDER = [
    ("cost_noop:request_signature", "a module that does nothing (request-signature's callbacks): the fixed cost"),
    ("cost_step1", "+ read the request header map (one host call), as UTF-8 headers"),
    ("cost_step2", "+ route (canonical scope), client copies of the principal header, content-length, the clock (one host call)"),
    ("cost_step3", "+ parse Signature-Input and Signature, parameters, components, coverage (up to the time check)"),
    ("cost_step4", "+ the signature base and HMAC-SHA256 (the MAC verified)"),
    ("cost_step5", "+ the nonce claimed in shared data (bucket reads and writes: nonce table, key id quota)"),
    ("request_signature", "the real module: + the principal published (a header, a property), the accepted counter, the engine's flow"),
]


def _module_entry(filters: list[dict]) -> tuple[int, dict, str]:
    """The index, entry and module name of the (last) wasm filter of a configuration."""
    for i in range(len(filters) - 1, -1, -1):
        entry = filters[i]
        if entry.get("name") == "envoy.filters.http.wasm":
            filename = entry["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"]
            return i, entry, Path(filename).stem
    raise ValueError("no wasm filter in the configuration")


def _with_module(filters: list[dict], path: Path, configuration: str | None = None) -> list[dict]:
    filters = copy.deepcopy(filters)
    i, entry, _ = _module_entry(filters)
    config = entry["typed_config"]["config"]
    config["vm_config"]["code"]["local"]["filename"] = str(path)
    if configuration is not None:
        config["configuration"]["value"] = configuration
    filters[i] = entry
    return filters


def register(configs: dict, labels: dict, harness, probe_calls: int, shadow_repeat: int) -> dict[str, list[str]]:
    """Adds the cost configurations to bench/run.py's CONFIGS and LABELS; returns them by group."""
    groups: dict[str, list[str]] = {"ladder": [], "hostcalls": []}

    def add(group: str, name: str, needs: list[str], build, label: str):
        configs[name] = (needs, build)
        labels[name] = label
        groups[group].append(name)

    for target, module in TARGETS.items():
        if target not in configs:
            continue
        needs, base = configs[target]
        noop = LADDER_DIR / "noop" / f"{module}.wasm"
        shadow = LADDER_DIR / "shadow" / f"{module}.wasm"
        add("ladder", f"cost_noop:{target}", needs + [f"@file:{noop}"],
            lambda p, base=base, noop=noop: _with_module(base(p), noop, "{}"),
            f"do-nothing module, {module}'s callbacks")
        for n in (0, shadow_repeat):
            def build(p, base=base, shadow=shadow, module=module, n=n):
                filters = base(p)
                _, entry, _ = _module_entry(filters)
                own = json.loads(entry["typed_config"]["config"]["configuration"]["value"])
                wrapped = json.dumps({"filter": module, "bench_repeat": n, "config": own})
                return _with_module(filters, shadow, wrapped)
            add("ladder", f"cost_shadow{n}:{target}", needs + [f"@file:{shadow}"], build,
                f"{labels.get(target, target)} + {n} in-VM runs of its flow")
    if "chain_one_module" in configs:
        # The one-module chain with its first k sections (k = 1 .. all but the last): each stage's
        # share of the chain, measured inside one module.
        needs, base = configs["chain_one_module"]
        sections = json.loads(_module_entry(base("cpu"))[1]["typed_config"]["config"]["configuration"]["value"])["filters"]
        for k in range(1, len(sections)):
            def build_prefix(p, base=base, k=k):
                filters = base(p)
                _, entry, _ = _module_entry(filters)
                own = json.loads(entry["typed_config"]["config"]["configuration"]["value"])
                return _with_module(filters, Path(entry["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"]),
                                    json.dumps({"filters": own["filters"][:k]}))
            names = " + ".join(next(iter(section)) for section in sections[:k])
            add("ladder", f"cost_chain:{k}", needs, build_prefix, f"one-module chain, first {k} stage(s): {names}")
    if "request_signature" in configs:
        needs, base = configs["request_signature"]
        for step in range(1, 6):
            path = LADDER_DIR / f"step{step}" / "request_signature.wasm"
            add("ladder", f"cost_step{step}", needs + [f"@file:{path}"],
                lambda p, base=base, path=path: _with_module(base(p), path), f"request-signature up to step {step}")
    probe = LADDER_DIR / "probe.wasm"
    for kind in ["none"] + list(PROBES):
        n = 0 if kind == "none" else probe_calls

        def build_probe(p, kind=kind, n=n):
            f = harness.wasm_filter("bench_probe", {"call": kind, "n": n}, vm_id="bench_probe", root_id="bench_probe")
            f["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] = str(probe)
            return [f]
        add("hostcalls", f"cost_probe:{kind}", [f"@file:{probe}"], build_probe,
            "host-call probe, no call" if kind == "none" else f"host-call probe, {n} x {kind}")
    return groups


def phase_configs(groups: dict[str, list[str]], wanted: set[str], available: list[str]) -> list[str]:
    """The configurations of the cost phase: bare Envoy, the buffer filter, the filters broken
    down, and the wanted groups' configurations whose modules exist."""
    names = ["bare", "buffer"]
    if "ladder" in wanted:
        names += [t for t in TARGETS if t in available]
    for group in ("ladder", "hostcalls"):
        if group in wanted:
            names += groups[group]
    return [n for n in dict.fromkeys(names) if n in available]


# ---------------------------------------------------------------------------------------------
# The document's section (bench/report.py calls render()).

# Issue 16's CPU targets at 0 B (ratio to bare Envoy): which of the four parts is left where one
# is missed.
TARGETS_0B = {"request_signature": 1.35, "rate_limit": 1.25, "env_guard": 1.25, "chain_one_module": 1.8}
# The configurations behind Envoy's buffer filter (bench/filters.py: filters that read the body).
BUFFERED = {"request_signature", "replay_guard", "env_guard", "chain_one_module"}
# The host calls each ladder step adds (what bench/ladder/src/ladder.rs calls; step 6: the real
# module's remaining calls at 0 B, as the test host counts them).
STEP_CALLS = {
    "cost_noop:request_signature": {},
    "cost_step1": {"header_map": 1},
    "cost_step2": {"clock": 1},
    "cost_step3": {},
    "cost_step4": {},
    "cost_step5": {"shared_get_cold": 2, "shared_set": 2},
    "request_signature": {"set_header": 1, "set_property": 1, "counter": 1},
}


def _median(values):
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


class Cost:
    def __init__(self, cost: dict):
        self.c = cost
        self.p = cost["params"]
        self.by = {}
        for run in cost["runs"]:
            self.by.setdefault(run["config"], {})[run["round"]] = run

    def has(self, *names) -> bool:
        return all(n in self.by for n in names)

    def diff(self, a: str, b: str):
        """Median over rounds of CPU per request of `a` minus `b` (same round)."""
        ra, rb = self.by.get(a, {}), self.by.get(b, {})
        return _median([ra[r]["cpu_us_per_req"] - rb[r]["cpu_us_per_req"] for r in ra if r in rb])

    def price(self, kind: str):
        n = self.p["probe_calls"]
        d = self.diff(f"cost_probe:{kind}", "cost_probe:none")
        return d / n if d is not None and n else None

    def calls(self, module: str):
        return ((self.c.get("calls") or {}).get("modules") or {}).get(module) or {}

    def host_calls(self, by_call: dict) -> tuple[float | None, list[str]]:
        """The priced sum of `by_call` (ABI name -> count) and the names no probe prices (None
        without the host-call table)."""
        if not self.has("cost_probe:none"):
            return None, []
        total, unpriced = 0.0, []
        for name, count in by_call.items():
            price = self.price(PRICE_OF[name]) if name in PRICE_OF else None
            if price is None:
                unpriced.append(name)
            else:
                total += count * price
        return total, unpriced

    def split(self, target: str):
        """The four parts of `target`'s CPU per request (and Envoy's buffer filter), or None."""
        module = TARGETS[target]
        base = "buffer" if target in BUFFERED else "bare"
        n = self.p["shadow_repeat"]
        total = self.diff(target, "bare")
        buffer = self.diff("buffer", "bare") if base == "buffer" else 0.0
        fixed = self.diff(f"cost_noop:{target}", base)
        slope = self.diff(f"cost_shadow{n}:{target}", f"cost_shadow0:{target}")
        decision = slope / n if slope is not None and n else None
        counted = self.calls(module)
        calls, unpriced = self.host_calls(counted.get("by_call", {})) if "by_call" in counted else (None, [])
        parts = [total, buffer, fixed, calls, decision]
        slower = None if any(v is None for v in parts) else total - buffer - fixed - calls - decision
        bare = _median([r["cpu_us_per_req"] for r in self.by.get("bare", {}).values()])
        return {"total": total, "buffer": buffer, "fixed": fixed, "calls": calls, "decision": decision,
                "slower": slower, "unpriced": unpriced, "count": counted.get("total"), "bare": bare}


def _us(v, digits=1):
    return "n/a" if v is None else f"{v:.{digits}f} us"


def _share(part, total):
    return "" if part is None or not total else f" ({part / total:.0%})"


def render(d: dict, labels: dict) -> list[str]:
    cost = d.get("cost")
    out: list[str] = []
    w = out.append
    w("## Where each filter's cost goes: fixed cost, host calls, decision code, Envoy running slower")
    w("")
    if not cost or not cost.get("runs"):
        w("Not measured in this run (`bash scripts/bench.sh --only ladder,hostcalls` measures it alone).")
        w("")
        return out
    c = Cost(cost)
    p, f = c.p, cost["facts"]
    main_date = (d.get("facts") or {}).get("date_utc")
    w(f"Measured by `bench/cost.py` ({'in a run of its own, ' if main_date != f['date_utc'] else ''}{f['date_utc']}, "
      f"commit `{f['commit']}`, load average at start {' '.join(f['loadavg_at_start'])}): {p['rounds']} round{'s' if p['rounds'] != 1 else ''} of "
      f"{p['duration_s']} s per configuration, {p['size']} B signed POSTs, {p['connections']} connections, the headline's method "
      "(Envoy CPU per request from the kernel's accounting, Envoy pinned to its core, configurations interleaved and "
      "rotated, each difference taken within a round, the median over rounds). Rerun alone on an idle machine with "
      "`bash scripts/bench.sh --only ladder,hostcalls`.")
    w("")
    contention = [r.get("core_busy_others") for r in cost["runs"] if r.get("core_busy_others") is not None]
    if contention:
        w(f"Envoy's core was used by other processes {_median(contention):.0%} of the time (median over runs): "
          "differences of a few microseconds are within this run's noise.")
        w("")
    bad = sum(r["non_2xx"] for r in cost["runs"])
    refused = sum(r.get("shadow_refused", 0) for r in cost["runs"])
    if bad or refused:
        w(f"**Check:** {bad} non-2xx answers over {sum(r['requests'] for r in cost['runs']):,} requests; "
          f"{refused} shadow runs refused (expected 0: the breakdown is of accepted requests).")
        w("")
    if cost.get("missing"):
        w("Not measured (module not built): " + ", ".join(f"`{m}`" for m in cost["missing"]) + ".")
        w("")

    # The four parts.
    targets = [t for t in TARGETS if c.has(t)]
    if targets:
        n = p["shadow_repeat"]
        w(f"### The four parts, per accepted request at {p['size']} B")
        w("")
        w("| Configuration | Added to bare Envoy | Envoy's buffer filter | Fixed cost of a wasm module | Host calls | "
          "Decision code in the VM | Envoy running slower |")
        w("|---|---|---|---|---|---|---|")
        for t in targets:
            s = c.split(t)
            tot = s["total"]
            calls = _us(s["calls"]) + (f", {s['count']} calls" if s["count"] is not None else "")
            ratio = f" ({tot / s['bare'] + 1:.2f}x)" if tot is not None and s["bare"] else ""
            w(f"| {labels.get(t, t)} | {_us(tot)}{ratio} | {_us(s['buffer']) if t in BUFFERED else '-'} | "
              f"{_us(s['fixed'])}{_share(s['fixed'], tot)} | {calls}{_share(s['calls'], tot)} | "
              f"{_us(s['decision'])}{_share(s['decision'], tot)} | {_us(s['slower'])}{_share(s['slower'], tot)} |")
        w("")
        w("How each part is measured, in the same rounds:")
        w("")
        w("- **Fixed cost:** a module that does nothing (`bench/probe` with no call), trimmed to the filter's own "
          "callbacks by `tools/wasm-trim`, against Envoy with the same filters in front of it (the buffer filter or "
          "none): the VM entries for every callback the module exports, the context per stream, and Envoy's own code "
          "running slower next to a trivial module.")
        w("- **Host calls:** the calls the module makes per accepted request at this size, as the test host counts "
          "them (`firebreak-bench calls`), each priced by the host-call table below (a shared-data get at the cold "
          "bucket's price).")
        w(f"- **Decision code in the VM:** the filter's flow run {n} more times per request inside the same VM, on an "
          "in-VM host that answers from memory (`bench/ladder` `shadow`: the request read once, shared data in an "
          "in-VM store per run, the headers copied from memory where the module reads them from Envoy), against the "
          "same module running it no extra time: the slope is the flow's own code per request, with warm caches and "
          "no host call.")
        w("- **Envoy running slower:** the rest: the filter's added CPU minus the buffer filter and the three parts "
          "above. It is what the module's code and memory do to Envoy's own code (caches, TLB) and what the parts "
          "above miss (the VM's cold first run of the flow; host calls the probe prices low). It also carries this "
          "run's noise: a negative or small value means the parts above account for the whole cost within it.")
        w("")
        for t in targets:
            s = c.split(t)
            if s["unpriced"]:
                w(f"- {labels.get(t, t)}: host calls without a price in this run: " + ", ".join(f"`{u}`" for u in s["unpriced"]) + ".")
        parts = {"fixed cost": "fixed", "host calls": "calls", "decision code in the VM": "decision",
                 "Envoy running slower": "slower"}
        for t in targets:
            s = c.split(t)
            known = {k: s[v] for k, v in parts.items() if s[v] is not None}
            if not known or not s["total"] or not s["bare"]:
                continue
            ranked = sorted(known, key=known.get, reverse=True)
            line = f"- {labels.get(t, t)} adds {s['total']:.1f} us; by size: " + ", ".join(f"{k} {known[k]:.1f} us" for k in ranked)
            target = TARGETS_0B.get(t) if p["size"] == 0 else None
            if target:
                ratio = s["total"] / s["bare"] + 1
                over = (ratio - target) * s["bare"]
                line += (f". Target {target}x: **met** ({ratio:.2f}x)" if over <= 0 else
                         f". Target {target}x: **missed** ({ratio:.2f}x, {over:.1f} us over; the largest part left: {ranked[0]})")
            w(line + ".")
        w("")

    # The ladder.
    if c.has("bare", "buffer") and any(c.has(step) for step, _ in LADDER):
        w(f"### request-signature step by step (the ladder, {p['size']} B)")
        w("")
        w("Each step is its own build of `bench/ladder` (a cargo feature): request-signature's accepted path through "
          "core's functions, returning (and continuing the request) after that step; step 0 is the do-nothing module "
          "and step 6 the real `request_signature.wasm`. Every row runs behind the buffer filter, as the filter does.")
        w("")
        w("| Step | What it adds | Added to Envoy with the buffer filter | Added by the step | of which its host calls (priced) | the step's code and Envoy running slower |")
        w("|---|---|---|---|---|---|")
        prev = None
        for i, (step, what) in enumerate(LADDER):
            if not c.has(step):
                continue
            added = c.diff(step, "buffer")
            inc = c.diff(step, prev) if prev else added
            calls = sum(cnt * (c.price(k) or 0.0) for k, cnt in STEP_CALLS.get(step, {}).items())
            priced = all(c.price(k) is not None for k in STEP_CALLS.get(step, {}))
            rest = inc - calls if inc is not None and priced else None
            names = ", ".join(f"{cnt} x {k}" for k, cnt in STEP_CALLS.get(step, {}).items()) or "none"
            w(f"| {i} | {what} | {_us(added)} | {_us(inc)} | {_us(calls) if priced else 'n/a'} ({names}) | {_us(rest)} |")
            prev = step
        w("")

    # The chain, stage by stage.
    chain = sorted((r for r in c.by if r.startswith("cost_chain:")), key=lambda r: int(r.split(":")[1]))
    if chain and c.has("buffer", "chain_one_module"):
        w(f"### The one-module chain stage by stage ({p['size']} B)")
        w("")
        w("`firebreak_chain.wasm` configured with its first stages only (the same sections, in order): what each stage "
          "adds inside one module. Row 0 is the do-nothing module with the chain's callbacks.")
        w("")
        w("| Stages | Added to Envoy with the buffer filter | Added by the last stage |")
        w("|---|---|---|")
        rows = [("cost_noop:chain_one_module", "0: do-nothing module")] + \
            [(r, f"{r.split(':')[1]}: {labels.get(r, r).split(': ', 1)[-1]}") for r in chain] + \
            [("chain_one_module", f"{len(chain) + 1}: the whole chain")]
        prev = None
        for name, label in rows:
            if not c.has(name):
                continue
            added = c.diff(name, "buffer")
            w(f"| {label} | {_us(added)} | {_us(c.diff(name, prev) if prev else added)} |")
            prev = name
        w("")

    # The host-call table.
    if c.has("cost_probe:none"):
        w(f"### What one host call costs in Envoy ({p['probe_calls']} calls per request against none)")
        w("")
        w("| Host call | ABI function | CPU per call |")
        w("|---|---|---|")
        for kind in PROBES:
            if c.has(f"cost_probe:{kind}"):
                w(f"| {PROBE_LABELS[kind]} | `{PROBES[kind].split(' ')[0]}` | {_us(c.price(kind), 2)} |")
        w("")
        w(f"Each row: `bench/probe` making {p['probe_calls']} calls of one kind per request (in the request-headers "
          "callback; the body in the response-body callback) against the same module making none, divided by the "
          "calls. A call that returns data costs more than a setter: Envoy calls back into the VM to allocate the "
          "answer. Reading the whole header map costs more than one header, a cold shared-data bucket more than a "
          "warm one.")
        w("")
    return out
