#!/usr/bin/env python3
"""Where one configuration's CPU goes: `perf record` on its Envoy while wrk replays the benchmark's
pre-signed requests, then the samples by shared object (Envoy, the kernel, libc, the native module)
and the native module's hottest functions, with the Envoy/libc samples that the module's own calls
caused (a frame of libfirebreak.so below them on the stack). Complements the benchmark's ratios:
they say how much, this says where. Needs `perf` (Debian's linux-perf) and a quiet machine.

    .venv/bin/python bench/profile.py native_chain [--size 0] [--seconds 8]

Configurations are bench/run.py's (`python3 bench/run.py --help`) and the cost breakdown's
(bench/cost.py: `cost_step3`, `cost_shadow4:request_signature`, `cost_probe:header_map`, ...); run
scripts/bench.sh once first (it builds bench/tool and the cost breakdown's modules)."""
import argparse
import collections
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (bench/run.py: the configurations, the upstream, wrk)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--size", type=int, default=0)
    ap.add_argument("--seconds", type=int, default=8)
    args = ap.parse_args()
    run._cost.register(run.CONFIGS, run.LABELS, run.harness, 32, 4)
    os.chdir(run.ROOT)
    run.OUT.mkdir(parents=True, exist_ok=True)
    pool = 25000 * args.seconds + 10000
    meta = json.loads(subprocess.run(
        [str(run.TOOL), "requests", "--out", str(run.OUT / "requests"), "--count", str(pool),
         "--created", str(int(time.time())), "--sizes", str(args.size)], check=True, capture_output=True, text=True).stdout)
    reqs = run.Requests(meta)
    data = run.OUT / f"perf-{args.config}.data"
    upstream = run.Upstream()
    envoy = run.start_envoy(args.config, "cpu", upstream)
    try:
        run.wrk(envoy.port, reqs.args(args.size, pool - 6000, 6000, "wrap"), 16, 1)  # warm-up
        perf = subprocess.Popen(["perf", "record", "-F", "4999", "-g", "-p", str(envoy.proc.pid), "-o", str(data),
                                 "--", "sleep", str(args.seconds)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        result = run.measured_run(envoy, reqs.args(args.size, 0, pool - 6000, "wrap"), 16, args.seconds)
        perf.wait()
    finally:
        envoy.stop()
        upstream.stop()
    us = result["cpu_us_per_req"]
    print(f"{args.config} at {args.size} B: {us:.2f} us of Envoy CPU per request, {result['rps']:.0f} rps, "
          f"non-2xx {result['non_2xx']}")
    script = subprocess.run(["perf", "script", "-i", str(data), "-F", "ip,sym,dso"], capture_output=True, text=True).stdout
    by_dso, own, called = collections.Counter(), collections.Counter(), collections.Counter()
    total = 0
    for sample in script.split("\n\n"):
        frames = [line.strip() for line in sample.strip().splitlines() if line.strip()]
        if not frames:
            continue
        total += 1
        match = re.search(r"\(([^()]*)\)$", frames[0])
        dso = Path(match.group(1)).name if match else "?"
        by_dso[dso] += 1
        if "libfirebreak" in dso:
            own[re.sub(r"^\S+\s+", "", frames[0]).rsplit(" (", 1)[0][:90]] += 1
        elif any("libfirebreak" in f for f in frames[1:]):
            called[dso] += 1
    if not total:
        print("no samples (is perf allowed here?)")
        return
    share = lambda n: f"{100 * n / total:5.1f}%  {us * n / total:6.2f} us"  # noqa: E731
    print("\nsamples by shared object (share, us per request):")
    for dso, n in by_dso.most_common(8):
        print(f"  {share(n)}  {dso}")
    print("of which called by libfirebreak.so (its callbacks into Envoy, its allocations):")
    for dso, n in called.most_common(4):
        print(f"  {share(n)}  {dso}")
    print("libfirebreak.so's hottest functions (self):")
    for name, n in own.most_common(15):
        print(f"  {share(n)}  {name}")


if __name__ == "__main__":
    main()
