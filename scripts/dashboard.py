"""Draws the panels of the operators' dashboard (docs/dashboard/firebreak.json) from a real run.

Starts the demo money API and Envoy with the dashboard's gateway (envoy/e2e/dashboard_traffic.py:
the demo chain, small local tables, a Redis-backed stage whose Redis is down), sends two minutes
of traffic in phases (baseline; an unsigned flood; a retry storm; payouts whose outcome is
unknown; a looping user; a production credential; Redis down), scrapes /stats/prometheus every two seconds, writes the scrapes to
`.run/dashboard-scrapes.jsonl`, and draws every panel's queries evaluated over the scrapes into
docs/dashboard/panels.png. `--scrapes FILE` draws from an earlier run's scrapes without running
anything. Run it with `bash scripts/dashboard.sh` (it builds and installs what this needs).

The queries are evaluated here, not by Prometheus: the dashboard uses only
`sum|max [by (labels)] (rate|increase(<metric>{matchers}[w]))` and `max by (labels) (<metric>)`,
which this evaluates with `rate` as the increase between the scrapes around a 10 s window
divided by its length (Prometheus extrapolates; the shapes are the same).
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "envoy" / "e2e"))

import dashboard_traffic as traffic  # noqa: E402
import harness  # noqa: E402

WINDOW_S = 10.0
SCRAPE_EVERY_S = 2.0


# ---- the run ----

def phases(t: float, duration: float) -> list[str]:
    """What the traffic does at `t` seconds of a run of `duration` seconds."""
    f = t / duration
    out = ["legit"] if int(t) % 2 == 0 else []
    if 0.15 <= f < 0.35:
        out.append("flood")
    if 0.35 <= f < 0.55 and int(t) % 3 == 0:
        out.append("storm")
    if 0.55 <= f < 0.65:
        out.append("looping")
    if 0.62 <= f < 0.66:
        out.append("leak")
    if 0.7 <= f < 0.85:
        out.append("redis")
    if 0.45 <= f < 0.5 or 0.88 <= f < 0.9:
        out.append("uncertain")
    if int(t) % 4 == 0:
        out.append("payout")
    return out


def act(envoy, what: str):
    if what == "legit":
        traffic.legit(envoy, n=1)
    elif what == "flood":
        traffic.unsigned_flood(envoy, n=12)
    elif what == "storm":
        traffic.payout_with_retries(envoy, retries=2)
        traffic.concurrent_duplicates(envoy, n=4)
    elif what == "looping":
        traffic.looping_user(envoy, n=4)
    elif what == "leak":
        traffic.credential_leak(envoy)
    elif what == "redis":
        for _ in range(4):
            traffic.redis_down(envoy)
    elif what == "uncertain":
        traffic.uncertain_payout(envoy, retries=2)
    elif what == "payout":
        traffic.payout_with_retries(envoy, retries=0)


def run(native: bool, duration: float, scrapes_path: Path) -> list[dict]:
    api = harness.DemoApi()
    envoy = harness.Envoy([], api.port, bootstrap_config=traffic.gateway_config(native))
    samples = []
    try:
        start = time.monotonic()
        next_scrape = start
        with scrapes_path.open("w") as out:
            while (now := time.monotonic()) - start < duration:
                t = now - start
                for what in phases(t, duration):
                    act(envoy, what)
                if time.monotonic() >= next_scrape:
                    text = harness.send(envoy.admin_port, "GET", "/stats/prometheus").body.decode()
                    sample = {"t": round(time.monotonic() - start, 3), "host": "native" if native else "wasm",
                              "families": traffic.parse_prometheus(text)}
                    out.write(json.dumps(sample) + "\n")
                    samples.append(sample)
                    next_scrape += SCRAPE_EVERY_S
                time.sleep(max(0.0, 1.0 - (time.monotonic() - now)))
    finally:
        envoy.stop()
        api.stop()
    return samples


# ---- the queries ----

QUERY = re.compile(
    r"^(?P<agg>sum|max)(?: by \((?P<by>[^)]*)\))?\s*\("
    r"(?:(?P<fn>rate|increase)\((?P<m1>[\w:]+)(?P<s1>\{[^}]*\})?\[[^\]]+\]\)|(?P<m2>[\w:]+)(?P<s2>\{[^}]*\})?)\)$")


def matchers(braces: str | None) -> list[tuple[str, str, str]]:
    return re.findall(r'(\w+)\s*(=~|=)\s*"([^"]*)"', braces or "")


def selected(labels: dict, wanted: list[tuple[str, str, str]]) -> bool:
    for label, op, value in wanted:
        have = labels.get(label, "")
        if op == "=" and have != value:
            return False
        if op == "=~" and not re.fullmatch(value, have):
            return False
    return True


def evaluate(expr: str, samples: list[dict], prefix: str) -> dict[tuple, list[tuple[float, float]]]:
    """{group labels: [(t, value)]} of one panel query over the scrapes."""
    expr = expr.replace("${ns}", prefix).replace("$__rate_interval", f"{int(WINDOW_S)}s")
    m = QUERY.match(expr)
    if not m:
        raise ValueError(f"query shape not supported by the renderer: {expr}")
    metric, braces = (m["m1"], m["s1"]) if m["m1"] else (m["m2"], m["s2"])
    wanted = matchers(braces)
    by = [label.strip() for label in (m["by"] or "").split(",") if label.strip()]
    agg = sum if m["agg"] == "sum" else max

    def series_at(sample):
        return {tuple(sorted(labels.items())): value
                for labels, value in sample["families"].get(metric, []) if selected(labels, wanted)}

    out: dict[tuple, list[tuple[float, float]]] = {}
    for i, sample in enumerate(samples):
        now = series_at(sample)
        if m["fn"]:
            earlier = [s for s in samples[:i] if sample["t"] - s["t"] >= WINDOW_S - 0.5]
            if not earlier:
                continue
            before = earlier[-1]
            span = sample["t"] - before["t"]
            then = series_at(before)
            values = {k: max(0.0, v - then.get(k, 0.0)) for k, v in now.items()}
            if m["fn"] == "rate":
                values = {k: v / span for k, v in values.items()}
        else:
            values = now
        groups: dict[tuple, list[float]] = {}
        for key, value in values.items():
            labels = dict(key)
            groups.setdefault(tuple(labels.get(label, "") for label in by), []).append(value)
        for group, vals in groups.items():
            out.setdefault(group, []).append((sample["t"], agg(vals)))
    return out


def legend(fmt: str, by: list[str], group: tuple) -> str:
    labels = dict(zip(by, group))
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda g: labels.get(g.group(1), ""), fmt).strip()


def draw(samples: list[dict], out: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dashboard = traffic.dashboard()
    prefix = traffic.PREFIXES[samples[0]["host"]]
    panels = dashboard["panels"]
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(19, 4.3 * rows), squeeze=False)
    for ax, panel in zip([a for row in axes for a in row], panels):
        drawn = 0
        for target in panel["targets"]:
            m = QUERY.match(target["expr"].replace("${ns}", prefix).replace("$__rate_interval", "10s"))
            by = [label.strip() for label in ((m and m["by"]) or "").split(",") if label.strip()]
            for group, points in sorted(evaluate(target["expr"], samples, prefix).items()):
                if not points or max(v for _, v in points) <= 0:
                    continue
                ts, vs = zip(*points)
                ax.plot(ts, vs, label=legend(target["legendFormat"], by, group) or target["refId"], linewidth=1.6)
                drawn += 1
        for step in panel["fieldConfig"]["defaults"].get("thresholds", {}).get("steps", []):
            if step["value"] is not None:
                ax.axhline(step["value"], color=step["color"], linestyle="--", linewidth=1)
        unit = panel["fieldConfig"]["defaults"].get("unit")
        ax.set_title(panel["title"], fontsize=11, loc="left")
        ax.set_xlabel("seconds into the run", fontsize=8)
        ax.set_ylabel({"reqps": "requests/s", "short": f"per {int(WINDOW_S)} s", "none": "per mille"}.get(unit, ""),
                      fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=7, loc="best", framealpha=0.7)
        else:
            ax.text(0.5, 0.5, "no data in this run", ha="center", va="center", transform=ax.transAxes, color="grey")
    for ax in [a for row in axes for a in row][len(panels):]:
        ax.axis("off")
    host = "native module (libfirebreak.so)" if samples[0]["host"] == "native" else "one-module wasm chain"
    fig.suptitle(f"Firebreak dashboard: the demo chain in Envoy 1.40 ({host}), {len(samples)} scrapes of "
                 f"/stats/prometheus over {samples[-1]['t']:.0f} s", fontsize=13)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(out, dpi=80)
    print(f"dashboard: wrote {out}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--native", action="store_true", help="run the native module instead of the wasm chain")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of traffic (default 120)")
    parser.add_argument("--scrapes", type=Path, help="draw from this scrape file instead of running")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard" / "panels.png")
    args = parser.parse_args()
    # A SIGTERM stops Envoy and the demo API too (the `finally` of `run`).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    if args.scrapes:
        samples = [json.loads(line) for line in args.scrapes.read_text().splitlines() if line.strip()]
    else:
        harness.RUN_DIR.mkdir(exist_ok=True)
        path = harness.RUN_DIR / "dashboard-scrapes.jsonl"
        samples = run(args.native, args.duration, path)
        print(f"dashboard: {len(samples)} scrapes in {path}")
    if len(samples) < 2:
        sys.exit("dashboard: not enough scrapes to draw")
    draw(samples, args.out)


if __name__ == "__main__":
    main()
