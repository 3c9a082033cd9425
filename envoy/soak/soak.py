#!/usr/bin/env python3
"""The fault soak (issue 17, item 5): signed money traffic through two real Envoy 1.40 instances
running the one-module chain (request-signature, per-user rate-limit, replay-guard, every stage's
state on one Redis through webdis) in front of the demo money API, with concurrent duplicates and
client retries, while faults are injected on a schedule:

  redis_stop      redis-server stopped (SIGTERM) for a few seconds, then restarted
  redis_kill      redis-server killed (SIGKILL), then restarted (AOF, appendfsync always)
  webdis_kill     the webdis bridge killed (SIGKILL), then restarted on the same port
  upstream_5xx    the upstream answers 503 without executing, or executes then answers 503
  upstream_timeout the upstream answers after the route timeout (executed late, or never)
  disconnects    clients close their connection mid-request (before or while the upstream works)
  vm_trap        a wasm VM traps on an Envoy worker while money streams are in flight through it
                 (the project's test filter, first in the chain, on `x-test-panic`; its
                 failure_policy FAIL_RELOAD reloads the VM afterwards)

At the end the API's ledger (GET /v1/ledger) is compared with what the clients saw:
  - nothing executed twice: at most one ledger operation per Idempotency-Key;
  - nothing accepted and lost: every 2xx a client got is an operation of the ledger, for its key;
  - every refusal carries a documented code: an answer with `x-firebreak-error` has the same
    `error` in its JSON body, a code of plugins/core/src/reject.rs, with that file's status;
    every other non-2xx answer is one the faults explain (the upstream's 503, Envoy's 504 / 503
    reset / 503 of a failed VM); anything else is a violation.
An uncertain outcome (5xx, timeout, disconnect, `409 outcome_unknown`) may have executed once or
not at all (plugins/replay-guard/README.md, "An uncertain outcome is not a failure"); it is
counted, not a violation.

Run it with scripts/soak.sh [--duration S] [--native]. Exit status 1 on any violation.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
import harness  # noqa: E402

ROOT = harness.ROOT
HOST = "money.example"
PATH = "/v1/payouts"
MONEY = [{"methods": ["POST"], "path_prefix": "/v1/"}]
TEST_FILTER = ROOT / "target" / "test-filter" / "wasm32-wasip1" / "release" / "firebreak_test_filter.wasm"
ROUTE_TIMEOUT_S = 2.0
FAULT_KINDS = ["redis_stop", "upstream_5xx", "webdis_kill", "upstream_timeout", "disconnects", "vm_trap",
               "redis_kill"]


def documented_codes() -> dict[str, int]:
    """code -> status, read from the table of plugins/core/src/reject.rs."""
    text = (ROOT / "plugins" / "core" / "src" / "reject.rs").read_text()
    codes = {code: int(status) for status, code in re.findall(r'=\s*\((\d{3}),\s*"([a-z0-9_]+)"', text)}
    if len(codes) < 30:
        raise SystemExit(f"soak: could not read the code table of reject.rs (found {len(codes)})")
    return codes


# ---------------------------------------------------------------------------------------------
# The parts


class Bridge(harness.RedisBridge):
    """harness.RedisBridge with Redis run like a ledger (AOF, fsync on every write: the README's
    advice; a restart without persistence forgets every key, which is documented, not a bug) and
    webdis restartable."""

    volatile = False  # --redis-volatile: no persistence (a restart forgets every key)

    def start_redis(self):
        persistence = ["--appendonly", "no"] if self.volatile else ["--appendonly", "yes", "--appendfsync", "always"]
        self.redis = subprocess.Popen(
            ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
             *persistence, "--maxmemory-policy", "noeviction", "--dir", str(self.dir)],
            stdout=(self.dir / "redis.log").open("a"), stderr=subprocess.STDOUT)
        harness.wait_for(lambda: socket.create_connection(("127.0.0.1", self.redis_port), timeout=1).close() or True,
                         15, "redis-server", self.redis)
        # Loading the AOF: wait until Redis answers commands.
        harness.wait_for(self._redis_ready, 15, "redis-server loaded", self.redis)

    def _redis_ready(self) -> bool:
        out = subprocess.run(["redis-cli", "-p", str(self.redis_port), "PING"], capture_output=True, text=True,
                             timeout=5).stdout
        return out.strip() == "PONG"

    def kill_redis(self):
        if self.redis and self.redis.poll() is None:
            self.redis.kill()
            self.redis.wait(timeout=10)

    def kill_webdis(self):
        if self.webdis.poll() is None:
            self.webdis.kill()
            self.webdis.wait(timeout=10)

    def start_webdis(self):
        self.webdis = subprocess.Popen(["webdis", str(self.dir / "webdis.json")], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.STDOUT)
        harness.wait_for(lambda: self.command("PING") == {"PING": [True, "PONG"]}, 15, "webdis", self.webdis)


class FaultyUpstream:
    """A small proxy in front of the demo API whose answers the fault schedule changes: `mode` is
    `none`, `5xx`, `timeout` or `slow`. Counts what it did in `injected`."""

    def __init__(self, api_port: int, rng: random.Random):
        self.api_port = api_port
        self.mode = "none"
        self.rng = rng
        self.lock = threading.Lock()
        self.injected = Counter()
        self.incomplete = Counter()
        self.t0 = time.monotonic()
        self.seen: list[tuple[str, str]] = []  # (idempotency key, action) of every POST that reached it
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def handle_one_request(self):
                try:
                    super().handle_one_request()
                except (ConnectionError, OSError):
                    self.close_connection = True

            def do_any(self):
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                if len(body) < length:
                    # Headers, then a reset before the whole body: an incomplete request, which an
                    # HTTP server never executes. replay-guard's claim is at body time, after the
                    # router may have sent the headers (its README, "Body handling and the
                    # claim"): every request it answers itself (replay, in flight, ...) looks so.
                    with outer.lock:
                        outer.incomplete[f"{len(body)} of {length} body bytes"] += 1
                    self.close_connection = True
                    return
                headers = [(k, v) for k, v in self.headers.items()
                           if k.lower() not in ("connection", "content-length", "host", "keep-alive")]
                action = outer.decide(self.command)
                if self.command == "POST":
                    with outer.lock:
                        outer.seen.append((self.headers.get("idempotency-key", ""),
                                           f"{action}@{time.monotonic() - outer.t0:.2f}s/{len(body)}B"))
                if action == "refuse_503":
                    return self.reply(503, b'{"error":"soak_upstream_unavailable","message":"injected, not executed"}')
                if action == "hang":
                    time.sleep(ROUTE_TIMEOUT_S + 1.0)  # never forwarded: Envoy gives up first
                    self.close_connection = True
                    return
                if action == "fail_after_commit":
                    headers.append(("x-demo-fault", "fail-after-commit"))
                elif action == "late":
                    headers.append(("x-demo-delay-ms", str(int((ROUTE_TIMEOUT_S + 1.0) * 1000))))
                elif action == "slow":
                    headers.append(("x-demo-delay-ms", str(outer.rng.randint(300, 1200))))
                conn = http.client.HTTPConnection("127.0.0.1", outer.api_port, timeout=30)
                try:
                    conn.request(self.command, self.path, body=body, headers=dict(headers))
                    r = conn.getresponse()
                    data = r.read()
                    status = r.status
                except OSError:
                    self.close_connection = True
                    return
                finally:
                    conn.close()
                self.reply(status, data)

            def reply(self, status: int, data: bytes):
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    self.close_connection = True

            do_GET = do_POST = do_any

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def decide(self, method: str) -> str:
        if method != "POST":
            return "forward"
        with self.lock:
            roll = self.rng.random()
            action = "forward"
            if self.mode == "5xx":
                action = "refuse_503" if roll < 0.35 else "fail_after_commit" if roll < 0.7 else "forward"
            elif self.mode == "timeout":
                action = "late" if roll < 0.35 else "hang" if roll < 0.6 else "forward"
            elif self.mode == "slow":
                action = "slow" if roll < 0.8 else "forward"
            if action != "forward":
                self.injected[f"upstream_{action}"] += 1
            return action

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def sections(prefix: str) -> list[dict]:
    def state():
        return harness.redis_state(timeout_ms=1000, key_prefix=prefix)

    return [
        # The one key id signs every request: its nonce quota (default 16384 per window of
        # max_age + skew + 1 s) would refuse the soak's rate with 429 tenant_quota_exceeded.
        {"request_signature": harness.signature_config(routes=MONEY, state=state(),
                                                       covered_headers_when_present=["idempotency-key"],
                                                       nonce_store={"buckets": 32768, "slots_per_bucket": 16,
                                                                    "quota_per_key_id": 262144})},
        {"rate_limit": {"name": "per-user", "state": state(), "response_headers": True,
                        "rules": [{"name": "user-money", "routes": MONEY, "key": "user",
                                   "requests": 1000000, "per_seconds": 1, "burst": 1000000}]}},
        {"replay_guard": {"routes": [{"name": "payouts", "match": {"methods": ["POST"], "path_exact": PATH},
                                      "require_principal": True}],
                          # Every key of the soak stays live (no TTL ends during it) and within the
                          # one principal's quota (the default, 1024 keys, would refuse most).
                          "ttl_seconds": 7200, "in_flight_timeout_ms": 5000, "state": state(),
                          "key_store": {"buckets": 65536, "slots_per_bucket": 8, "quota_per_principal": 262144}}},
    ]


def trap_filter() -> dict:
    """The project's test filter (host-tests/test-filter): traps on `x-test-panic`. FAIL_RELOAD:
    Envoy fails the VM's in-flight streams and loads a fresh VM for later ones."""
    f = harness.wasm_filter("firebreak_test_filter", {}, vm_id="soak_trap", root_id="soak_trap")
    config = f["typed_config"]["config"]
    config["vm_config"]["code"]["local"]["filename"] = str(TEST_FILTER)
    del config["fail_open"]
    config["failure_policy"] = "FAIL_RELOAD"
    config["reload_config"] = {"backoff": {"base_interval": "0.1s"}}
    return f


# ---------------------------------------------------------------------------------------------
# Clients


class Answer:
    def __init__(self, status=None, headers=None, body=b"", note=""):
        self.status = status
        self.headers = headers or {}
        self.body = body
        self.note = note  # "disconnected" (the client hung up), "conn_error: ..." (no answer)

    def json(self):
        try:
            j = json.loads(self.body)
            return j if isinstance(j, dict) else None
        except ValueError:
            return None


def post(port: int, headers: list, body: bytes, disconnect_after: float | None = None, timeout: float = 15) -> Answer:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest("POST", PATH, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", HOST)
        for name, value in headers:
            conn.putheader(name, value)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        if disconnect_after is not None:
            time.sleep(disconnect_after)
            # RST rather than FIN: the client is gone.
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            conn.close()
            return Answer(note="disconnected")
        r = conn.getresponse()
        return Answer(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    except (OSError, http.client.HTTPException) as e:
        return Answer(note=f"conn_error: {type(e).__name__}")
    finally:
        conn.close()


def signed_headers(body: bytes, key: str) -> list:
    sig = harness.sign("POST", f"http://{HOST}{PATH}", body,
                       extra=["-H", f"idempotency-key: {key}", "--cover", "idempotency-key"])
    return [("content-type", "application/json"), ("idempotency-key", key)] + sig


class Soak:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.codes = documented_codes()
        self.lock = threading.Lock()
        self.attempts: list[dict] = []  # every request a client sent
        self.accepted: list[str] = []  # keys a client got a 2xx for
        self.ops: dict[str, dict] = {}  # idempotency key -> {"ref", "amount"}
        self.faults = Counter()
        self.fault_log: list[str] = []
        self.duplicates = Counter()
        self.stop_traffic = threading.Event()
        self.disconnect_rate = 0.02
        self.t0 = time.monotonic()

    # -- setup / teardown
    def start(self):
        harness.RUN_DIR.mkdir(exist_ok=True)
        self.api = harness.DemoApi()
        self.upstream = FaultyUpstream(self.api.port, random.Random(self.args.seed + 1))
        Bridge.volatile = self.args.redis_volatile
        self.bridge = Bridge()
        prefix = f"fb-soak-{uuid.uuid4().hex[:8]}"
        chain = (harness.native_chain_filter(sections(prefix)) if self.args.native
                 else harness.chain_filter(sections(prefix)))
        filters = [trap_filter(), harness.buffer_filter(), chain]
        self.envoys = [harness.Envoy(filters, self.upstream.port, extra_clusters=[self.bridge.cluster()],
                                     route_timeout=f"{ROUTE_TIMEOUT_S}s") for _ in range(2)]
        self.log(f"started: demo-api :{self.api.port}, faulty upstream :{self.upstream.port}, "
                 f"redis :{self.bridge.redis_port}, webdis :{self.bridge.webdis_port}, envoy "
                 f"{[e.port for e in self.envoys]} ({'native libfirebreak.so' if self.args.native else 'wasm chain'})")

    def stop(self):
        for part in getattr(self, "envoys", []):
            part.stop()
        for name in ("bridge", "upstream", "api"):
            part = getattr(self, name, None)
            if part is not None:
                try:
                    part.stop()
                except Exception as e:  # noqa: BLE001 - teardown goes on
                    self.log(f"teardown {name}: {e}")

    def log(self, message: str):
        print(f"[soak {time.monotonic() - self.t0:7.1f}s] {message}", flush=True)

    # -- traffic
    def record(self, key, instance, kind, answer: Answer):
        with self.lock:
            self.attempts.append({"key": key, "instance": instance, "kind": kind, "status": answer.status,
                                  "headers": answer.headers, "body": answer.body, "note": answer.note,
                                  "t": time.monotonic() - self.t0})

    def send(self, key, body, instance, kind, headers=None):
        headers = headers or signed_headers(body, key)
        disconnect = None
        if self.rng.random() < self.disconnect_rate:
            disconnect = self.rng.uniform(0.0, 1.0)
        answer = post(self.envoys[instance].port, headers, body, disconnect)
        self.record(key, instance, kind, answer)
        return answer

    def concurrently(self, calls):
        out = [None] * len(calls)
        threads = [threading.Thread(target=lambda i=i, c=c: out.__setitem__(i, c())) for i, c in enumerate(calls)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out

    def late_retry(self):
        """A client retrying an operation it was answered long ago (fresh signature, same key and
        body): it must be replayed, never executed again."""
        with self.lock:
            if not self.accepted:
                return
            key = self.rng.choice(self.accepted)
            op = self.ops[key]
        body = json.dumps({"account": "acc-bob", "amount": op["amount"], "reference": op["ref"]}).encode()
        self.duplicates["late_retry"] += 1
        self.send(key, body, self.rng.randrange(2), "late_retry")

    def one_operation(self):
        rng = self.rng
        if rng.random() < 0.05:
            self.late_retry()
        ref = f"soak-{uuid.uuid4().hex[:12]}"
        key = f'"{uuid.uuid4()}"'
        amount = rng.randint(1, 9)
        body = json.dumps({"account": "acc-bob", "amount": amount, "reference": ref}).encode()
        with self.lock:
            self.ops[key] = {"ref": ref, "amount": amount}
        roll = rng.random()
        if roll < 0.3:
            # The same signed request (same nonce) to both instances at once.
            headers = signed_headers(body, key)
            self.duplicates["same_signature_both_instances"] += 1
            answers = self.concurrently([lambda i=i: self.send(key, body, i, "dup_same_sig", headers) for i in (0, 1)])
        elif roll < 0.55:
            # The same key freshly signed twice, to both instances at once.
            self.duplicates["same_key_both_instances"] += 1
            sigs = [signed_headers(body, key) for _ in range(2)]
            answers = self.concurrently([lambda i=i: self.send(key, body, i, "dup_new_sig", sigs[i]) for i in (0, 1)])
        else:
            answers = [self.send(key, body, rng.randrange(2), "single")]
        # Client retries: fresh signature, same key, on either instance, while the answer leaves
        # the outcome open (no answer, 5xx, in flight); sometimes after a success too (replay).
        for attempt in range(3):
            if self.stop_traffic.is_set():
                break
            if any(a.status is not None and 200 <= a.status < 300 for a in answers):
                with self.lock:
                    self.accepted.append(key)
                if rng.random() < 0.3:
                    self.duplicates["retry_after_success"] += 1
                    self.send(key, body, rng.randrange(2), "retry")
                break
            if not any(retryable(a) for a in answers):
                break
            time.sleep(rng.uniform(0.2, 1.2))
            self.duplicates["retry"] += 1
            answers = [self.send(key, body, rng.randrange(2), "retry")]

    def client(self):
        while not self.stop_traffic.is_set():
            try:
                self.one_operation()
            except Exception as e:  # noqa: BLE001 - a client error must not end the soak silently
                self.log(f"client error: {type(e).__name__}: {e}")
                with self.lock:
                    self.faults["client_errors"] += 1
                time.sleep(0.5)

    # -- faults
    def inject(self, kind: str, hold: float):
        self.faults[kind] += 1
        self.fault_log.append(f"{time.monotonic() - self.t0:.1f}s {kind}")
        self.log(f"fault: {kind} ({hold:.1f}s)")
        b = self.bridge
        if kind == "redis_stop":
            b.stop_redis()
            time.sleep(hold)
            b.start_redis()
        elif kind == "redis_kill":
            b.kill_redis()
            time.sleep(hold)
            b.start_redis()
        elif kind == "webdis_kill":
            b.kill_webdis()
            time.sleep(hold)
            b.start_webdis()
        elif kind in ("upstream_5xx", "upstream_timeout"):
            self.upstream.mode = kind.split("_")[1]
            time.sleep(hold)
            self.upstream.mode = "none"
        elif kind == "disconnects":
            self.upstream.mode = "slow"
            self.disconnect_rate = 0.3
            time.sleep(hold)
            self.disconnect_rate = 0.02
            self.upstream.mode = "none"
        elif kind == "vm_trap":
            # Slow answers keep money streams in flight through the VM, then one request traps it
            # on each instance (it lands on one of its workers).
            self.upstream.mode = "slow"
            time.sleep(hold / 2)
            for e in self.envoys:
                r = post(e.port, [("x-test-panic", "1")], b"{}")
                self.faults["vm_trap_requests"] += 1
                if r.status != 503:
                    self.log(f"vm_trap: the trapping request got {r.status} {r.note}")
            time.sleep(hold / 2)
            self.upstream.mode = "none"

    def fault_loop(self, duration: float):
        if not self.args.faults:
            return
        slot = max(6.0, min(12.0, duration / (len(FAULT_KINDS) + 1)))
        hold = slot / 2
        i = 0
        deadline = self.t0 + duration
        time.sleep(min(3.0, slot / 3))
        while time.monotonic() + slot <= deadline and not self.stop_traffic.is_set():
            start = time.monotonic()
            self.inject(self.args.faults[i % len(self.args.faults)], hold)
            i += 1
            rest = slot - (time.monotonic() - start)
            if rest > 0:
                time.sleep(rest)

    def run(self):
        self.t0 = time.monotonic()
        clients = [threading.Thread(target=self.client, daemon=True) for _ in range(self.args.clients)]
        for t in clients:
            t.start()
        self.fault_loop(self.args.duration)
        remaining = self.args.duration - (time.monotonic() - self.t0)
        if remaining > 0:
            time.sleep(remaining)
        self.stop_traffic.set()
        for t in clients:
            t.join(timeout=60)
        # Let every late upstream answer land before reading the ledger.
        time.sleep(ROUTE_TIMEOUT_S + 2)

    # -- verdict
    def verify(self) -> int:
        ledger = self.api.ledger()
        if self.args.inject_violation == "double":
            # Self-test: a second execution of an accepted key, straight to the API behind Envoy.
            key = next(a["key"] for a in self.attempts if a["status"] and 200 <= a["status"] < 300)
            op = self.ops[key]
            harness.send(self.api.port, "POST", PATH, [("content-type", "application/json"), ("idempotency-key", key)],
                         json.dumps({"account": "acc-bob", "amount": op["amount"], "reference": op["ref"]}).encode())
            ledger = self.api.ledger()
        if self.args.inject_violation == "loss":
            # Self-test: the ledger as if it had lost the first accepted operation.
            lost = next(json.loads(a["body"])["id"] for a in self.attempts if a["status"] and 200 <= a["status"] < 300)
            ledger = [op for op in ledger if op["id"] != lost]
        if self.args.inject_violation == "forward":
            # Self-test: the upstream as if it had received one key's whole request twice.
            self.upstream.seen.append(next(entry for entry in self.upstream.seen if entry[1].startswith("forward")))
        if self.args.inject_violation == "code":
            # Self-test: a refusal whose code is not in the table.
            self.attempts.append({"key": next(iter(self.ops)), "instance": 0, "kind": "injected", "status": 409,
                                  "headers": {"x-firebreak-error": "not_a_code"},
                                  "body": b'{"error":"not_a_code","message":"x"}', "note": "", "t": 0})

        violations: list[str] = []
        by_key = defaultdict(list)
        by_id = {}
        for op in ledger:
            by_key[op.get("idempotency_key")].append(op)
            by_id[op["id"]] = op
        outcomes = Counter()
        refusals = Counter()
        accepted_keys = set()
        for a in self.attempts:
            status, headers, body = a["status"], a["headers"], a["body"]
            if status is None:
                outcomes["no answer (" + a["note"].split(":")[0] + ")"] += 1
                continue
            j = None
            try:
                j = json.loads(body)
            except ValueError:
                pass
            if 200 <= status < 300:
                replayed = headers.get("idempotent-replayed") == "true"
                outcomes["2xx replayed" if replayed else "2xx executed"] += 1
                accepted_keys.add(a["key"])
                op = by_id.get(j.get("id")) if isinstance(j, dict) else None
                want = self.ops[a["key"]]
                if op is None or op.get("idempotency_key") != a["key"] or op.get("reference") != want["ref"] \
                        or op.get("amount") != want["amount"]:
                    violations.append(f"loss: key {a['key']} answered {status} {body[:120]!r} but the ledger has "
                                      f"{[o['id'] for o in by_key.get(a['key'], [])]}")
                continue
            code = headers.get("x-firebreak-error")
            if code is not None:
                refusals[f"{status} {code}"] += 1
                outcomes["refused by firebreak"] += 1
                if self.codes.get(code) != status or not isinstance(j, dict) or j.get("error") != code \
                        or not isinstance(j.get("message"), str):
                    violations.append(f"undocumented refusal: {status} x-firebreak-error={code} body={body[:160]!r}")
                continue
            kind = explained(status, headers, body, j)
            if kind is None:
                violations.append(f"unexplained answer: {status} {headers.get('content-type')} {body[:160]!r}")
                outcomes["unexplained"] += 1
            else:
                outcomes[kind] += 1
        doubles = 0
        for key, ops in by_key.items():
            if len(ops) > 1:
                doubles += 1
                violations.append(f"double execution: key {key} executed {len(ops)} times: {[o['id'] for o in ops]}")
        executed_keys = {k for k in by_key if k in self.ops}
        # Exactly one forward per key: the upstream (the proxy in front of the API) saw each key
        # at most once, whether or not the API then executed it.
        reached = defaultdict(list)
        for key, action in self.upstream.seen:
            reached[key].append(action)
        for key, actions in reached.items():
            if len(actions) > 1:
                tries = [(round(a["t"] + self.t0 - self.upstream.t0, 2), a["instance"], a["kind"], a["status"],
                          a["headers"].get("x-firebreak-error"), a["headers"].get("idempotent-replayed"), a["note"])
                         for a in self.attempts if a["key"] == key]
                violations.append(f"forwarded twice: key {key} reached the upstream {len(actions)} times ({actions}); "
                                  f"ledger {[o['id'] for o in by_key.get(key, [])]}; the clients' attempts {tries}")
        # A refusal means "not forwarded": a key the ledger executed must have had at least one
        # attempt that may have reached the API (an executed 2xx, an uncertain answer, no answer).
        maybe_forwarded = {a["key"] for a in self.attempts if a["status"] is None
                           or (a["status"] >= 500 and "x-firebreak-error" not in a["headers"])
                           or (200 <= a["status"] < 300 and a["headers"].get("idempotent-replayed") != "true")}
        for key in sorted(executed_keys - maybe_forwarded):
            answers = [(a["status"], a["headers"].get("x-firebreak-error")) for a in self.attempts if a["key"] == key]
            violations.append(f"executed although every attempt was refused or replayed: key {key} {answers}")
        unknown_executed = len(executed_keys - accepted_keys)
        foreign = [op["id"] for op in ledger if op.get("idempotency_key") not in self.ops]
        if foreign:
            violations.append(f"ledger operations no client sent: {foreign[:10]}")
        dead = [e.port for e in self.envoys if e.proc.poll() is not None]
        if dead:
            violations.append(f"Envoy exited during the soak: {dead}")
        losses = len({v.split()[2] for v in violations if v.startswith("loss")})  # keys

        counters = Counter()
        for e in self.envoys:
            if e.proc.poll() is None:
                for name, value in e.stats("firebreak.").items():
                    counters[re.sub(r"^.*?firebreak\.", "firebreak.", name)] += value

        print()
        print(f"== fault soak summary ({'native libfirebreak.so' if self.args.native else 'wasm chain'}, "
              f"{self.args.duration:.0f}s, seed {self.args.seed}, {self.args.clients} clients, 2 Envoy instances)")
        print(f"requests sent:           {len(self.attempts)}")
        print(f"operations (keys):       {len(self.ops)}")
        print(f"duplicates sent:         {sum(v for k, v in self.duplicates.items())} "
              f"({', '.join(f'{k} {v}' for k, v in sorted(self.duplicates.items()))})")
        print(f"faults injected:         {sum(v for k, v in self.faults.items() if k in FAULT_KINDS)} "
              f"({', '.join(f'{k} {v}' for k, v in sorted(self.faults.items()))})")
        print(f"upstream faults:         {', '.join(f'{k} {v}' for k, v in sorted(self.upstream.injected.items()))}")
        print(f"incomplete at upstream:  {sum(self.upstream.incomplete.values())} requests whose headers reached the "
              f"upstream, then reset ({', '.join(f'{k} {v}' for k, v in sorted(self.upstream.incomplete.items()))})")
        print(f"answers:                 {', '.join(f'{k} {v}' for k, v in sorted(outcomes.items()))}")
        print(f"refusals by code:        {', '.join(f'{k} {v}' for k, v in sorted(refusals.items()))}")
        print(f"ledger operations:       {len(ledger)} (keys executed {len(executed_keys)}, of which accepted "
              f"{len(executed_keys & accepted_keys)}, executed with the outcome unknown to every client "
              f"{unknown_executed})")
        print(f"keys accepted:           {len(accepted_keys)}")
        print(f"double executions:       {doubles}")
        print(f"losses:                  {losses}")
        interesting = ["forwarded", "replayed", "outcome_unknown_recorded", "finish_failed", "claim_unwound",
                       "claim_unwind_failed", "remote_error", "stale_in_flight", "finish_not_owner"]
        print("replay_guard counters:   " + ", ".join(
            f"{n} {counters.get('firebreak.replay_guard.' + n, 0)}" for n in interesting))
        not_executed = self.upstream.injected["upstream_refuse_503"] + self.upstream.injected["upstream_hang"]
        forwarded = counters.get("firebreak.replay_guard.forwarded", 0)
        print(f"forwarded vs ledger:     forwarded {forwarded} - never executed by the upstream {not_executed} = "
              f"{forwarded - not_executed}; ledger {len(ledger)} (equal unless a client or a trap cut a forwarded "
              f"request before the upstream read it all)")
        print(f"violations:              {len(violations)}")
        for v in violations[:40]:
            print(f"  VIOLATION {v}")
        checks = {
            "nothing executed twice (one ledger operation per key at most)": "double execution",
            "nothing accepted and lost (every 2xx in the ledger, for its key)": "loss",
            "no key's whole request reached the upstream twice": "forwarded twice",
            "every refusal carries a documented code and status": "undocumented refusal",
            "every other non-2xx answer is explained by a fault": "unexplained answer",
            "every execution had an attempt that may have been forwarded": "executed although",
            "the ledger holds only what the clients sent": "ledger operations no client sent",
            "both Envoy instances alive at the end": "Envoy exited",
        }
        failed = 0
        for name, prefix in checks.items():
            bad = sum(1 for v in violations if v.startswith(prefix))
            failed += bool(bad)
            print(f"  {'FAIL' if bad else 'ok  '} {name}" + (f" ({bad})" if bad else ""))
        print(f"soak: {len(checks) - failed} passed, {failed} failed")
        if self.args.report:
            Path(self.args.report).write_text(json.dumps({
                "requests": len(self.attempts), "operations": len(self.ops), "duplicates": dict(self.duplicates),
                "faults": dict(self.faults), "upstream_faults": dict(self.upstream.injected),
                "answers": dict(outcomes), "refusals": dict(refusals), "ledger": len(ledger),
                "double_executions": doubles, "incomplete_at_upstream": dict(self.upstream.incomplete), "losses": losses, "violations": violations,
                "counters": dict(counters), "fault_log": self.fault_log}, indent=1))
        return 1 if violations else 0


def retryable(a: Answer) -> bool:
    if a.status is None:
        return True
    if a.status >= 500:
        return True
    return a.headers.get("x-firebreak-error") in ("request_in_flight", "nonce_replayed")


def explained(status: int, headers: dict, body: bytes, j) -> str | None:
    """A non-2xx answer without `x-firebreak-error` that a fault explains, or None."""
    err = j.get("error") if isinstance(j, dict) else None
    if status == 503 and err == "soak_upstream_unavailable":
        return "upstream 503 (not executed)"
    if status == 503 and err == "upstream_unavailable":
        return "upstream 503 (executed)"
    if status == 504 and body.startswith(b"upstream request timeout"):
        return "envoy 504 route timeout"
    if status == 503 and body.startswith(b"upstream connect error or disconnect/reset before headers"):
        return "envoy 503 upstream reset"
    if status == 503 and body == b"" and headers.get("content-length") == "0":
        return "envoy 503 failed VM (trap)"
    return None


def interrupted(*_):
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of traffic (default 180, max 3600)")
    parser.add_argument("--native", action="store_true", help="the chain in libfirebreak.so instead of wasm")
    parser.add_argument("--clients", type=int, default=4, help="concurrent client threads (default 4)")
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    parser.add_argument("--redis-volatile", action="store_true",
                        help="Redis without persistence (against the README's advice): its restarts forget keys")
    parser.add_argument("--faults", default=",".join(FAULT_KINDS),
                        help=f"the faults to inject, in turn (comma-separated; default all: {','.join(FAULT_KINDS)}; "
                             "'none' for none)")
    parser.add_argument("--report", help="also write the figures as JSON to this file")
    parser.add_argument("--inject-violation", choices=["double", "forward", "loss", "code"],
                        help="self-test: plant one violation of this kind; the soak must then fail")
    args = parser.parse_args()
    args.duration = max(10.0, min(args.duration, 3600.0))
    args.faults = [f for f in args.faults.split(",") if f and f != "none"]
    unknown = [f for f in args.faults if f not in FAULT_KINDS]
    if unknown:
        parser.error(f"unknown fault(s) {unknown}; known: {FAULT_KINDS}")
    for path in [harness.ENVOY, harness.BIN_DIR / "demo-api", harness.BIN_DIR / "firebreak", TEST_FILTER,
                 harness.WASM_DIR / "firebreak_chain.wasm"] + ([harness.NATIVE_DIR / "libfirebreak.so"] if args.native else []):
        if not Path(path).exists():
            print(f"soak: {path} is missing (scripts/soak.sh builds it)", file=sys.stderr)
            return 2
    soak = Soak(args)
    signal.signal(signal.SIGTERM, interrupted)
    try:
        soak.start()
        soak.run()
        return soak.verify()
    finally:
        soak.stop()


if __name__ == "__main__":
    sys.exit(main())
